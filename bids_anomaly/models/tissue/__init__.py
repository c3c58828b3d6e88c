"""The tissue family: the subject's own tissues with anatomical priors.

- :mod:`~bids_anomaly.models.tissue.tissue`: the family (``--model-type tissue``, ``--single-subject
  tissue``);
- :mod:`~bids_anomaly.models.tissue.spatial_em`: EM for one subject's tissues, class weights varying
  over the brain.

The family's classes are re-exported here; it registers when :mod:`bids_anomaly.models`
imports it.
"""

from __future__ import annotations

from bids_anomaly.models.tissue.tissue import (
    TissueModel,
    TissueOptions,
)

__all__ = [
    "TissueModel",
    "TissueOptions",
]
