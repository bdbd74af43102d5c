"""Attribution, region fidelity, evaluation metrics, labels and group statistics (no file I/O)."""
