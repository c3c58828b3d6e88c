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
from bids_anomaly.models.baseline import IntensityBaseline
from bids_anomaly.models.mixture import (
    GaussianMixtureModel,
    MixtureModel,
    MultipleScaledMixtureModel,
    StudentMixtureModel,
)
from bids_anomaly.models.normative import NormativeModel
from bids_anomaly.models.reconstruction import DEEP_MODELS, ReconstructionModel

__all__ = [
    "DEEP_MODELS",
    "REGISTRY",
    "AnomalyModel",
    "GaussianMixtureModel",
    "IntensityBaseline",
    "MixtureModel",
    "ModelCard",
    "MultipleScaledMixtureModel",
    "NormativeModel",
    "ReconstructionModel",
    "StudentMixtureModel",
    "SubjectImages",
    "TrainingData",
    "load_model",
    "save_model",
]
