"""Unsupervised anomaly detection and segmentation in brain MRI, as a BIDS App."""

import os
from importlib.metadata import PackageNotFoundError, version

# Nipype asks a web service for newer versions when it is imported; this tool never goes online.
os.environ.setdefault("NIPYPE_NO_ET", "1")

try:
    __version__ = version("bids_anomaly")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
