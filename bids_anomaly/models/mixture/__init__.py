"""The mixture family: Gaussian, Student-t and multiple-scaled t mixtures of intensities.

- :mod:`~bids_anomaly.models.mixture.mixture`: the families (``--model-type gmm``, ``tmm``,
  ``mmst``);
- :mod:`~bids_anomaly.models.mixture.em`: expectation-maximisation for the three mixtures, batch and
  online.

The family's classes are re-exported here; it registers when :mod:`bids_anomaly.models`
imports it.
"""

from __future__ import annotations

from bids_anomaly.models.mixture.mixture import (
    GaussianMixtureModel,
    MixtureModel,
    MixtureOptions,
    MultipleScaledMixtureModel,
    StudentMixtureModel,
)

__all__ = [
    "GaussianMixtureModel",
    "MixtureModel",
    "MixtureOptions",
    "MultipleScaledMixtureModel",
    "StudentMixtureModel",
]
