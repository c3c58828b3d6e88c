"""The normative family: every voxel's healthy range, optionally by age, sex and site.

- :mod:`~bids_anomaly.models.normative.normative`: the family (``--model-type normative``);
- :mod:`~bids_anomaly.models.normative.norms`: covariate- and site-aware norms of voxels and
  regions, transfer to new sites;
- :mod:`~bids_anomaly.models.normative.covariates`: participants.tsv columns as a design matrix;
- :mod:`~bids_anomaly.models.normative.location_scale`: the torch IRLS fit of every voxel's location
  and scale at once.

The family's classes are re-exported here; it registers when :mod:`bids_anomaly.models`
imports it.
"""

from __future__ import annotations

from bids_anomaly.models.normative.normative import (
    CovariateOptions,
    NormativeModel,
)

__all__ = [
    "CovariateOptions",
    "NormativeModel",
]
