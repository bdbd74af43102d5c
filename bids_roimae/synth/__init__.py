"""The built-in example dataset: a synthetic BIDS dataset with fMRIPrep-style derivatives."""
