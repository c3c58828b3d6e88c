"""The stacking family: a voxel classifier over the other models' maps, fitted on annotations.

- :mod:`~bids_anomaly.models.stacking.stacking`: the family (``--model-type stacked``);
- :mod:`~bids_anomaly.models.stacking.classifiers`: scikit-learn voxel classifiers stored as plain
  arrays, evaluated without it.

The family's classes are re-exported here; it registers when :mod:`bids_anomaly.models`
imports it.
"""

from __future__ import annotations

from bids_anomaly.models.stacking.stacking import (
    StackedModel,
    StackingOptions,
)

__all__ = [
    "StackedModel",
    "StackingOptions",
]
