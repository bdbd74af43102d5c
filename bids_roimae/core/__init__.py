"""Pure numerics: token geometry, masking and signal scaling (numpy only; no I/O)."""
