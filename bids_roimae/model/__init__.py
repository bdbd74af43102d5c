"""The masked autoencoder, its blocks and the classifier head (torch; no I/O)."""
