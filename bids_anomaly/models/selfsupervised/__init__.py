"""The self-supervised families: networks that learn to find synthetic anomalies.

- :mod:`~bids_anomaly.models.selfsupervised.selfsupervised`: the families (``--model-type segment``,
  ``restore``);
- :mod:`~bids_anomaly.models.selfsupervised.anomalies`: the synthetic anomalies they learn from (and
  benchmarks insert).

The family's classes are re-exported here; it registers when :mod:`bids_anomaly.models`
imports it.
"""

from __future__ import annotations

from bids_anomaly.models.selfsupervised.selfsupervised import (
    RestoreModel,
    SegmentModel,
    SelfSupervisedModel,
    SelfSupervisedOptions,
)

__all__ = [
    "RestoreModel",
    "SegmentModel",
    "SelfSupervisedModel",
    "SelfSupervisedOptions",
]
