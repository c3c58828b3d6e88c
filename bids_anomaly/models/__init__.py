"""Anomaly models: one contract, one module (or one folder) per family.

The contract (:mod:`~bids_anomaly.models.contract`: :class:`AnomalyModel`, :class:`BaseModel`,
:data:`REGISTRY`) sits over what models learn from (:mod:`~bids_anomaly.models.data`:
:class:`TrainingData`) and under the model store (:mod:`~bids_anomaly.models.store`: a trained
model's folder, its card and checks; :mod:`~bids_anomaly.models.weights`: its tensors). A family
is one module (``baseline``, ``ensemble``, ``reconstruction``) or, when it has helpers of its
own, one folder (``normative``, ``mixture``, ``patch_ocsvm``, ``selfsupervised``, ``stacking``,
``tissue``: the family's module of the same name and its helpers). :mod:`~bids_anomaly.models.deep`
is the deep-learning engine the deep families share; ``calibration`` and ``directions`` are
shared helpers. Families sit above all of these, never below (pyproject's import-linter contract).

:data:`REGISTRY` is the only list of model types: the command line's choices, its per-family
option groups, the checks of which options go with which type, and the levels' dispatch all
read it.

Adding a model family
---------------------
1. Write one module here (deep families use :mod:`bids_anomaly.models.deep`; a family that
   grows helpers becomes a folder, its ``__init__`` re-exporting the family): a subclass of
   :class:`~bids_anomaly.models.contract.BaseModel` with ``model_type``, ``summary``, ``fit``,
   ``score``, ``score_definition``, ``hyperparameters``, ``n_channels`` / ``grid_shape``,
   ``tensors`` / ``restore`` (what is stored), decorated with
   :func:`~bids_anomaly.models.contract.register`. A score that combines one map per channel also
   implements :class:`~bids_anomaly.models.contract.ChannelScorer`; its maps are then written too.
2. Its options, if any: a dataclass whose fields are declared with
   :func:`bids_anomaly.config.option` (default, help, flag), named in the class's ``options``,
   and a ``from_settings`` classmethod that builds the model from ``settings.model.options``.
   The parser adds the flags, and refuses them with another model type.
3. Import the module below so that it registers (families are listed here, not discovered).
4. Tests in ``tests/models/``: fit on generated volumes, a lesion scores above healthy tissue,
   save/load round trip. ``tests/models/test_contract.py`` registers a toy family and runs it
   through train, participant and group: the same works for a new family with no other change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bids_anomaly.errors import UsageError
from bids_anomaly.models.baseline import IntensityBaseline
from bids_anomaly.models.contract import (
    REGISTRY,
    AnomalyModel,
    BaseModel,
    ChannelScorer,
    TissueSegmenter,
    register,
)
from bids_anomaly.models.data import SubjectImages, TrainingData
from bids_anomaly.models.ddpm import DiffusionModel
from bids_anomaly.models.ensemble import EnsembleModel
from bids_anomaly.models.mixture.mixture import (
    GaussianMixtureModel,
    MixtureModel,
    MultipleScaledMixtureModel,
    StudentMixtureModel,
)
from bids_anomaly.models.normative.normative import NormativeModel
from bids_anomaly.models.patch_ocsvm.patch_ocsvm import PatchOneClassModel
from bids_anomaly.models.reconstruction import DeepModel, ReconstructionModel
from bids_anomaly.models.selfsupervised.selfsupervised import RestoreModel, SegmentModel
from bids_anomaly.models.stacking.stacking import StackedModel
from bids_anomaly.models.store import ModelCard, load_model, save_model
from bids_anomaly.models.tissue.tissue import TissueModel

if TYPE_CHECKING:
    import dataclasses

    from bids_anomaly.config import Settings

__all__ = [
    "REGISTRY",
    "AnomalyModel",
    "BaseModel",
    "ChannelScorer",
    "DeepModel",
    "DiffusionModel",
    "EnsembleModel",
    "GaussianMixtureModel",
    "IntensityBaseline",
    "MixtureModel",
    "ModelCard",
    "MultipleScaledMixtureModel",
    "NormativeModel",
    "PatchOneClassModel",
    "ReconstructionModel",
    "RestoreModel",
    "SegmentModel",
    "StackedModel",
    "StudentMixtureModel",
    "SubjectImages",
    "TissueModel",
    "TissueSegmenter",
    "TrainingData",
    "build_model",
    "check_family_options",
    "family_options",
    "load_model",
    "register",
    "save_model",
]


def family_options(cls: type[BaseModel]) -> dict[str, dataclasses.Field]:
    """The command-line options of a family, by field name (from its ``options`` classes)."""
    from bids_anomaly.config import declared_options

    return {item.name: item for options in cls.options for item in declared_options(options)}


def _scope(name: str) -> str:
    """How usage errors name the families an option belongs to."""
    owners = [t for t, cls in sorted(REGISTRY.items()) if name in family_options(cls)]
    scopes = sorted({REGISTRY[t].options_scope for t in owners})
    return f"{' and '.join(scopes)} (train --model-type {'|'.join(owners)})"


def check_family_options(settings: Settings) -> None:
    """Refuse family options given with a model type (or level) they do not belong to.

    Raises
    ------
    UsageError
        An option of another family, an option given where no model is fitted, or values the
        family refuses together (:meth:`~bids_anomaly.models.contract.BaseModel.check_options`).
    """
    given = settings.model.options
    if not given:
        return
    single = settings.level == "participant" and settings.model.single_subject
    owner = (REGISTRY[settings.model.single_subject] if single
             else REGISTRY[settings.model.model_type] if settings.level == "train" else None)
    accepted = family_options(owner) if owner is not None else {}
    if single:
        accepted = {k: v for k, v in accepted.items() if v.metadata.get("single_subject")}
    wrong = [name for name in given if name not in accepted]
    if wrong:
        flags = ", ".join(_flag(name) for name in wrong)
        raise UsageError(f"{flags} apply to {_scope(wrong[0])}"
                         + (", some with participant --single-subject" if any(
                             _single_subject_option(name) for name in wrong) else ""))
    owner.check_options(given, single_subject=bool(single))


def _flag(name: str) -> str:
    for cls in REGISTRY.values():
        if name in family_options(cls):
            return family_options(cls)[name].metadata["flags"][0]
    return name


def _single_subject_option(name: str) -> bool:
    return any(name in family_options(cls) and family_options(cls)[name].metadata.get(
        "single_subject") for cls in REGISTRY.values())


def build_model(settings: Settings, single_subject: bool = False) -> BaseModel:
    """A new, unfitted model of the settings' type (``--single-subject``'s type when asked)."""
    model_type = settings.model.single_subject if single_subject else settings.model.model_type
    return REGISTRY[model_type].from_settings(settings, single_subject=single_subject)
