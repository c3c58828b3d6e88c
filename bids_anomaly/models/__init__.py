"""Anomaly models: one interface (:mod:`bids_anomaly.models.base`), one module per family."""

from bids_anomaly.models.base import (
    REGISTRY,
    AnomalyModel,
    ModelCard,
    SubjectImages,
    TrainingData,
    load_model,
    save_model,
)
from bids_anomaly.models.mixture import GaussianMixtureModel
from bids_anomaly.models.normative import NormativeModel

__all__ = [
    "REGISTRY",
    "AnomalyModel",
    "GaussianMixtureModel",
    "ModelCard",
    "NormativeModel",
    "SubjectImages",
    "TrainingData",
    "load_model",
    "save_model",
]
