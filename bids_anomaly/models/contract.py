"""The model contract: what every family implements, and the registry of families.

Every method implements :class:`AnomalyModel`; training, inference, evaluation and reports only
ever use this interface. :class:`BaseModel` is what the families share (registration metadata,
options, storage of their tensors); :func:`register` adds a family to :data:`REGISTRY`, the
only list of model types (see :mod:`bids_anomaly.models` for the steps of a new family).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch

from bids_anomaly.models.data import SubjectImages, TrainingData
from bids_anomaly.models.weights import read_weights, write_weights

if TYPE_CHECKING:
    from bids_anomaly.config import Settings


def needs_covariates(model: object) -> bool:
    """Whether ``model`` scores a participant against norms of its covariates.

    Such a model implements ``given(covariates, extrapolate)``, returning the model that scores
    that participant (see :class:`~bids_anomaly.models.normative.normative.NormativeModel`).
    """
    return bool(getattr(model, "needs_covariates", False))


def scorer_for(model: AnomalyModel, subject: SubjectImages,
               extrapolate: bool = True) -> AnomalyModel:
    """The model that scores ``subject``: itself, or its norms for the subject's covariates.

    Healthy subjects held out at training time are scored with ``extrapolate`` (a held-out
    control may be a little older than every fitted one).
    """
    if needs_covariates(model):
        return model.given(subject.covariates, extrapolate)
    return model


@runtime_checkable
class AnomalyModel(Protocol):
    """What every anomaly model does and says; the levels use nothing else.

    Attributes
    ----------
    model_type : str
        The name it is registered and chosen under (``--model-type``).
    score_definition : str
        What the score means, for the statmap sidecars and the model card.
    hyperparameters : dict
        Everything needed to rebuild the model (stored with its weights and in the card).
    fit_report : dict
        What fitting found (iterations, losses, BIC...), for the model card.
    n_channels : int or None
        Channels the fitted model takes (None: any number).
    grid_shape : tuple of int or None
        Grid the fitted model works on (None: any grid).
    """

    model_type: str
    score_definition: str
    hyperparameters: dict
    fit_report: dict
    n_channels: int | None
    grid_shape: tuple[int, ...] | None

    def fit(self, data: TrainingData) -> None:
        """Learn healthy anatomy from ``data``."""

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Voxel-wise anomaly score of a ``(C, X, Y, Z)`` image, 0 outside ``mask``."""

    def save(self, directory: Path) -> None:
        """Write the weights (``weights.safetensors``) into ``directory``."""

    @classmethod
    def load(cls, directory: Path) -> AnomalyModel:
        """Read a model written by :meth:`save`."""


@runtime_checkable
class ChannelScorer(Protocol):
    """A model whose score combines one map per channel; each map is written too."""

    def channel_scores(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One score map per channel, ``(C, X, Y, Z)``."""

    def combine(self, channel_scores: torch.Tensor) -> torch.Tensor:
        """The anomaly score from the per-channel maps."""


@runtime_checkable
class TissueSegmenter(Protocol):
    """A model that segments the subject's tissues while scoring; the posteriors are written.

    Its class attribute ``posterior_labels`` names the classes, in the order of the returned
    maps (``label-<class>_desc-<model>_probseg`` derivatives).
    """

    def score_with_posteriors(self, image: torch.Tensor, mask: torch.Tensor
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The anomaly score and each class's posterior probability map (by label)."""


class BaseModel:
    """What the families share: registration metadata, options, safetensors storage.

    A family subclasses this, sets the class attributes, implements ``fit``, ``score``,
    ``hyperparameters``, :meth:`tensors` and :meth:`restore`, and is registered with
    :func:`register` (see :mod:`bids_anomaly.models` for the steps).

    Attributes
    ----------
    model_type : str
        ``--model-type`` name.
    summary : str
        One line for ``--help`` and the README's model table.
    single_subject : bool
        Whether ``participant --single-subject TYPE`` can fit it on one subject's own brain.
    supervised : bool
        It learns from annotated lesions (``train --annotations``, which it requires): the
        training data then holds the annotated subjects (their ``lesion`` set) beside the
        controls, and it implements ``out_of_fold_scores(data)`` (the maps of each annotated
        subject by a fit without it, for tuning the post-processing).
    learns_from_annotations : bool
        Given annotations, it trains on the annotated subjects with their lesions as well (the
        self-supervised ``segment``: real lesions mixed into the synthetic ones); without, it
        learns from controls alone. Supervised families learn from annotations too.
    calibration_only : bool
        Nothing is learnt from data (an ensemble of trained models): the train level calibrates
        on every selected subject instead of holding some out.
    needs_training : bool
        False for families that learn nothing from a cohort (the intensity baseline, the
        ``tissue`` model): an ensemble can name them as members without a trained model
        (:meth:`untrained`).
    self_calibrated : bool
        Each score is ``-log10 p`` against a healthy draw from a model fitted on the scored
        subject itself: the threshold at FPR ``a`` is about ``-log10 a`` without any healthy
        subject, and ``simulated_scores()`` gives the healthy scores to calibrate with.
    options : tuple of type
        The option dataclasses whose fields with flags are this family's command-line options
        (see :func:`bids_anomaly.config.option`).
    options_scope : str
        How ``--help`` and usage errors name the families these options apply to.
    infinite_tensors : tuple of str
        Endings of the names of stored tensors that hold infinities by design (a decision
        tree's split at +inf); any other infinity or NaN in the weights is refused at load.
    """

    model_type: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    single_subject: ClassVar[bool] = False
    supervised: ClassVar[bool] = False
    learns_from_annotations: ClassVar[bool] = False
    calibration_only: ClassVar[bool] = False
    self_calibrated: ClassVar[bool] = False
    needs_training: ClassVar[bool] = True
    options: ClassVar[tuple[type, ...]] = ()
    options_scope: ClassVar[str] = ""
    infinite_tensors: ClassVar[tuple[str, ...]] = ()
    score_definition: str = ""
    n_channels: int | None = None
    grid_shape: tuple[int, ...] | None = None

    def __init__(self) -> None:
        self.fit_report: dict = {}

    @property
    def hyperparameters(self) -> dict:
        """Everything needed to rebuild the model (none by default)."""
        return {}

    # --------------------------------------------------------------- building
    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False) -> BaseModel:
        """A new, unfitted model from a run's settings (family options included).

        ``single_subject``: for ``participant --single-subject`` (a fit on one subject's own
        brain). The base class takes no option.
        """
        return cls()

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """Refuse option values that do not fit together for this family (UsageError)."""

    @classmethod
    def untrained(cls, channels: list[str], random_seed: int = 0) -> BaseModel:
        """A model of this family, with its defaults, for data of ``channels``.

        Only for families that need no training (``needs_training`` False); they override it
        when the channels decide something (which contrast the baseline thresholds).
        """
        if cls.needs_training:
            raise ValueError(f"a {cls.model_type} model must be trained first")
        return cls()

    # --------------------------------------------------------------- storage
    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state, as named tensors."""
        raise NotImplementedError

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the fitted state from :meth:`tensors`' output."""
        raise NotImplementedError

    def stored_hyperparameters(self) -> dict:
        """What :meth:`save` stores beside the tensors (the hyperparameters by default)."""
        return self.hyperparameters

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict) -> BaseModel:
        """An unfitted model from stored hyperparameters (keyword arguments by default)."""
        return cls(**hyperparameters)

    def save(self, directory: Path) -> None:
        """Write the tensors and hyperparameters to ``weights.safetensors``."""
        write_weights(directory, self.tensors(), self.stored_hyperparameters())

    @classmethod
    def load(cls, directory: Path) -> BaseModel:
        """Read a model written by :meth:`save` (no code is unpickled)."""
        tensors, hyperparameters = read_weights(directory)
        model = cls.from_hyperparameters(hyperparameters)
        model.restore(tensors)
        return model


REGISTRY: dict[str, type[BaseModel]] = {}
"""Every model family by ``model_type``: the only list of model types."""


def register(cls: type[BaseModel]) -> type[BaseModel]:
    """Class decorator adding a model family to :data:`REGISTRY` under its ``model_type``.

    Raises
    ------
    ValueError
        No ``model_type``, or one already registered by another class.
    """
    if not cls.model_type:
        raise ValueError(f"{cls.__name__} has no model_type")
    if REGISTRY.get(cls.model_type, cls) is not cls:
        raise ValueError(f"model type {cls.model_type!r} is registered already by "
                         f"{REGISTRY[cls.model_type].__name__}")
    REGISTRY[cls.model_type] = cls
    return cls
