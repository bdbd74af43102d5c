"""Per-run derivatives, the participant and group reports, figures and HTML."""
