"""The patch family: a siamese patch autoencoder's codes, modelled by one-class classifiers.

- :mod:`~bids_anomaly.models.patch_ocsvm.patch_ocsvm`: the family (``--model-type patch-ocsvm``);
- :mod:`~bids_anomaly.models.patch_ocsvm.siamese`: the siamese patch autoencoder (on the engine of
  :mod:`bids_anomaly.models.deep`);
- :mod:`~bids_anomaly.models.patch_ocsvm.ocsvm`: many RBF one-class SVMs, fitted by scikit-learn,
  evaluated in torch.

The family's classes are re-exported here; it registers when :mod:`bids_anomaly.models`
imports it.
"""

from __future__ import annotations

from bids_anomaly.models.patch_ocsvm.patch_ocsvm import (
    PatchOneClassModel,
    PatchOptions,
)

__all__ = [
    "PatchOneClassModel",
    "PatchOptions",
]
