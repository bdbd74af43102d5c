"""Reading and writing: BIDS discovery and names, BOLD, templates and atlases, the token
cache, derivatives and checkpoints."""
