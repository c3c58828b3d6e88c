"""The model interface in one import: the contract, the training data and the store.

The names that :mod:`bids_anomaly.models.base` held before it was split, re-exported from where
they are defined: :mod:`~bids_anomaly.models.contract` (the protocols, :class:`BaseModel`, the
registry), :mod:`~bids_anomaly.models.data` (:class:`TrainingData`, :class:`SubjectImages`),
:mod:`~bids_anomaly.models.weights` and :mod:`~bids_anomaly.models.store` (the model folder).
A family defined outside the package (``tests/models/test_contract.py``) imports them from
here; the package imports them from their own modules.
"""

from __future__ import annotations

from bids_anomaly.models.contract import (
    REGISTRY,
    AnomalyModel,
    BaseModel,
    ChannelScorer,
    TissueSegmenter,
    needs_covariates,
    register,
    scorer_for,
)
from bids_anomaly.models.data import (
    SCALING_CHOICES,
    SCALING_QUANTILES,
    SCALING_VOXELS,
    SubjectImages,
    TrainingData,
    fit_channel_scaling,
    scale_channel,
    scaling_for,
    valid_voxels,
)
from bids_anomaly.models.store import (
    CALIBRATION_SLACK,
    CARD_FILE,
    ModelCard,
    card_checksum,
    card_signature,
    check_weights,
    file_checksum,
    load_model,
    non_finite_tensors,
    non_finite_weights,
    read_card,
    save_model,
    weights_channels,
)
from bids_anomaly.models.weights import (
    WEIGHTS_FILE,
    read_weights,
    write_weights,
)

__all__ = [
    "AnomalyModel",
    "BaseModel",
    "CALIBRATION_SLACK",
    "CARD_FILE",
    "ChannelScorer",
    "ModelCard",
    "REGISTRY",
    "SCALING_CHOICES",
    "SCALING_QUANTILES",
    "SCALING_VOXELS",
    "SubjectImages",
    "TissueSegmenter",
    "TrainingData",
    "WEIGHTS_FILE",
    "card_checksum",
    "card_signature",
    "check_weights",
    "file_checksum",
    "fit_channel_scaling",
    "load_model",
    "needs_covariates",
    "non_finite_tensors",
    "non_finite_weights",
    "read_card",
    "read_weights",
    "register",
    "save_model",
    "scale_channel",
    "scaling_for",
    "scorer_for",
    "valid_voxels",
    "weights_channels",
    "write_weights",
]
