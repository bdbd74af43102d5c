"""bids_roimae: region-aware masked-autoencoder fMRI foundation model as a BIDS-App."""

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("bids_roimae")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

