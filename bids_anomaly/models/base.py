"""The model interface, the registry and the model directory.

Every method implements :class:`AnomalyModel`; training, inference, evaluation and reports only
ever use this interface. A model directory holds ``weights.safetensors`` (written by the model)
and ``model.json`` (the :class:`ModelCard`, written here): what the model was trained on, its
calibrated threshold, the package version, the checksum of the weights and the card's
signature, a checksum of the card's other fields (the weights' checksum among them): card and
weights are sealed together, and an edited card is refused (:func:`load_model`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import nibabel as nib
import numpy as np
import torch

from bids_anomaly import __version__
from bids_anomaly.errors import BadDataError, MissingInputError, UsageError, file_problem

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model.json"


def valid_voxels(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Brain voxels with a finite, non-zero value in every channel.

    Preprocessing sets a channel to exactly 0 where its field of view did not cover the brain;
    such voxels carry no information for that channel and are neither fitted, scored nor used
    for calibration.
    """
    return mask & torch.isfinite(image).all(dim=0) & (image != 0).all(dim=0)


@dataclass
class SubjectImages:
    """Preprocessed template-space images of one subject/session.

    Attributes
    ----------
    name : str
        ``sub-<label>[_ses-<label>]``.
    channels : list of Path
        One image per channel, in the model's channel order.
    mask : Path
        Brain mask on the same grid.
    lesion : Path, optional
        The subject's annotated lesions on the same grid (``train --annotations``); only the
        families that learn from annotations (``learns_from_annotations``) are given it.
    scaling : tuple, optional
        Per channel, ``(q1, q99)`` to map to 0 and 1 (:func:`scale_channel`), or None to
        leave it as it is (see :func:`fit_channel_scaling`).
    covariates : dict, optional
        The participant's participants.tsv row (column to value, as written), for models whose
        norms depend on covariates (:func:`scorer_for`); None: no row.
    """

    name: str
    channels: list[Path]
    mask: Path
    lesion: Path | None = None
    scaling: tuple[tuple[float, float] | None, ...] | None = None
    covariates: dict[str, str] | None = None

    def load_lesion(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The annotated lesions as an ``(X, Y, Z)`` boolean tensor (None: not annotated)."""
        if self.lesion is None:
            return None
        return torch.from_numpy(np.asarray(nib.load(self.lesion).dataobj) > 0).to(device)

    def load(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Return the ``(C, X, Y, Z)`` float32 image and the ``(X, Y, Z)`` boolean mask."""
        mask_img = nib.load(self.mask)
        mask = torch.from_numpy(np.asarray(mask_img.dataobj) > 0)
        channels = []
        for path in self.channels:
            img = nib.load(path)
            if img.shape != mask_img.shape:
                raise BadDataError(f"{path}: grid {img.shape} differs from its mask {mask.shape}")
            channels.append(torch.from_numpy(img.get_fdata(dtype=np.float32)))
        for index, bounds in enumerate(self.scaling or ()):
            if bounds is not None:
                channels[index] = scale_channel(channels[index], *bounds)
        return torch.stack(channels).to(device), mask.to(device)


def needs_covariates(model: object) -> bool:
    """Whether ``model`` scores a participant against norms of its covariates.

    Such a model implements ``given(covariates, extrapolate)``, returning the model that scores
    that participant (see :class:`~bids_anomaly.models.normative.NormativeModel`).
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


SCALING_CHOICES = ("auto", "quantile", "none")
"""``--channel-scaling``: quantile scaling of the diffusion maps only (auto), of every channel,
or of none."""

SCALING_QUANTILES = (0.01, 0.99)
"""The quantiles mapped to 0 and 1 (Pinon et al., ISBI 2023: (X - q1) / (q99 - q1))."""

SCALING_VOXELS = 100_000
"""Most voxels per subject and channel read for the quantiles (an even stride over the brain):
the quantiles of a thousand subjects need no more memory than those of a few."""


def scale_channel(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``(values - low) / (high - low)``, keeping 0 (a voxel outside the field of view) 0.

    A measured value that lands exactly on 0 is moved to the smallest positive float32, so
    that it is not taken for a missing voxel (:func:`valid_voxels`).
    """
    scaled = (values - low) / (high - low)
    scaled = torch.where((scaled == 0) & (values != 0),
                         torch.tensor(np.finfo(np.float32).tiny), scaled)
    return torch.where(values != 0, scaled, torch.zeros_like(scaled))


def fit_channel_scaling(data: TrainingData, mode: str) -> dict[str, list[float]]:
    """The q1/q99 of each scaled channel over the brain voxels of ``data`` (training controls).

    Parameters
    ----------
    data : TrainingData
        The subjects the model is fitted on (never those it is calibrated or tested on).
    mode : str
        One of :data:`SCALING_CHOICES`: ``auto`` scales the diffusion maps (physical units:
        FA in 0-1, MD about 1e-3 mm^2/s) and leaves the anatomical channels, already
        normalised by preprocessing; ``quantile`` scales every channel; ``none`` nothing.

    Returns
    -------
    dict
        Channel name to ``[q1, q99]``, for the channels scaled.
    """
    from bids_anomaly.config import DIFFUSION_MAPS

    if mode not in SCALING_CHOICES:
        raise ValueError(f"unknown channel scaling {mode!r}")
    scaled = [c for c in data.channels
              if mode == "quantile" or (mode == "auto" and c in DIFFUSION_MAPS)]
    if not scaled:
        return {}
    samples: dict[str, list[np.ndarray]] = {c: [] for c in scaled}
    for subject in data.subjects:
        plain = dataclasses.replace(subject, scaling=None)
        image, mask = plain.load("cpu")
        valid = valid_voxels(image, mask)
        for index, channel in enumerate(data.channels):
            if channel in samples:
                values = image[index][valid].numpy()
                step = max(1, values.size // SCALING_VOXELS)
                samples[channel].append(values[::step])
    bounds = {}
    for channel, values in samples.items():
        pooled = np.concatenate(values) if values else np.zeros(0, np.float32)
        if pooled.size < 2:
            raise MissingInputError(f"channel {channel}: no brain voxel to scale by")
        low, high = (float(q) for q in np.quantile(pooled, SCALING_QUANTILES))
        if not high > low:
            raise BadDataError(f"channel {channel}: its 1st and 99th percentiles are equal "
                               f"({low:g}) in the training subjects; it cannot be scaled")
        bounds[channel] = [low, high]
    return bounds


def scaling_for(channels: list[str], bounds: dict[str, list[float]] | None
                ) -> tuple[tuple[float, float] | None, ...] | None:
    """The per-channel scaling of :class:`SubjectImages` from a card's ``channel_scaling``."""
    if not bounds:
        return None
    return tuple(tuple(bounds[c]) if c in bounds else None for c in channels)


@dataclass
class TrainingData:
    """Subjects to learn from, read one at a time (memory does not grow with their number).

    ``regions`` is an optional label image on the subjects' grid (the template's tissue
    segmentation) for models that learn one distribution per region; ``tissues`` the template's
    tissue probability maps (GM, WM, CSF) on that grid, for models that use them as features.
    """

    subjects: list[SubjectImages]
    channels: list[str]
    device: torch.device | str = "cpu"
    regions: Path | None = None
    tissues: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for subject in self.subjects:
            yield subject.load(self.device)

    @property
    def names(self) -> list[str]:
        """Subject/session names, in order."""
        return [subject.name for subject in self.subjects]

    def split(self, fraction: float, seed: int = 0) -> tuple[TrainingData, TrainingData]:
        """Split into (fit, held-out) parts; the held-out part has ``fraction`` of the subjects.

        At least one subject is held out and at least two are kept for fitting.
        """
        from bids_anomaly.config import MIN_TRAINING_SUBJECTS

        if len(self) < MIN_TRAINING_SUBJECTS:
            raise MissingInputError(
                f"training needs at least {MIN_TRAINING_SUBJECTS} subjects (2 to fit, 1 to "
                f"calibrate), got {len(self)}")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_held = min(max(1, round(fraction * len(self))), len(self) - 2)
        held = sorted(order[:n_held])
        fit = sorted(order[n_held:])
        return self.subset(fit), self.subset(held)

    def subset(self, index: list[int]) -> TrainingData:
        """The subjects at ``index``, with the same channels, device and template maps."""
        return dataclasses.replace(self, subjects=[self.subjects[i] for i in index])

    def scaled(self, bounds: dict[str, list[float]] | None) -> TrainingData:
        """The same subjects, their channels scaled by ``bounds`` when read.

        See :func:`fit_channel_scaling`.
        """
        scaling = scaling_for(self.channels, bounds)
        return dataclasses.replace(self, subjects=[dataclasses.replace(s, scaling=scaling)
                                                   for s in self.subjects])

    @property
    def annotated(self) -> list[int]:
        """Indices of the subjects with annotated lesions."""
        return [i for i, s in enumerate(self.subjects) if s.lesion is not None]

    def load_regions(self) -> torch.Tensor:
        """The region labels as an integer tensor on :attr:`device`.

        Raises
        ------
        MissingInputError
            The data have no region image.
        """
        if self.regions is None:
            raise MissingInputError("this model needs region labels (the template's tissue "
                                    "segmentation) but the training data have none")
        labels = np.asarray(nib.load(self.regions).dataobj).astype(np.int64)
        return torch.from_numpy(labels).to(self.device)


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


@dataclass
class ModelCard:
    """The self-description of a trained model (``model.json``).

    ``checksum`` is the SHA-256 of the weights; ``signature`` the SHA-256 of every other field
    of the card (:func:`card_signature`), written by :func:`save_model`.
    """

    name: str
    model_type: str
    channels: list[str]
    template: str
    resolution: int
    preprocessing: dict
    hyperparameters: dict
    training_participants: list[str]
    calibration_participants: list[str]
    threshold: float
    fpr: float
    calibration_voxels: int
    version: str = __version__
    checksum: str = ""
    score_definition: str = ""
    extra: dict = field(default_factory=dict)
    signature: str = ""

    def check_space(self, template: str, resolution: int, preprocessing: dict) -> None:
        """Refuse data in another template, resolution or preprocessing than the model's.

        Raises
        ------
        BadDataError
            Another template, resolution or preprocessing.
        """
        if template != self.template:
            raise BadDataError(
                f"model {self.name!r} was trained in template {self.template}, the data are in "
                f"{template}: train a model on data in {template}")
        if resolution != self.resolution:
            raise BadDataError(
                f"model {self.name!r} was trained at {self.resolution} mm, the data are at "
                f"{resolution} mm; use --resolution {self.resolution} or retrain")
        for key, value in self.preprocessing.items():
            if key in preprocessing and preprocessing[key] != value:
                raise BadDataError(
                    f"model {self.name!r} was trained with {key}={value!r}, the data were "
                    f"preprocessed with {key}={preprocessing[key]!r}"
                )

    def check_channels(self, channels: list[str]) -> None:
        """Refuse a subject that lacks one of the model's channels.

        Raises
        ------
        BadDataError
            A channel is missing.
        """
        missing = [c for c in self.channels if c not in channels]
        if missing:
            raise BadDataError(
                f"model {self.name!r} needs channels {self.channels} but {', '.join(missing)} "
                f"is missing (available: {', '.join(channels) or 'none'})"
            )

    def check_compatible(self, channels: list[str], template: str, resolution: int,
                         preprocessing: dict) -> None:
        """Refuse data the model was not trained for (space first, then channels).

        Raises
        ------
        BadDataError
            Missing channels, or another template, resolution or preprocessing.
        """
        self.check_space(template, resolution, preprocessing)
        self.check_channels(channels)


def file_checksum(path: Path) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_signature(values: dict) -> str:
    """SHA-256 of a card's fields but ``signature``, as canonical JSON.

    :func:`save_model` writes it as the card's ``signature``; :func:`load_model` checks it.
    """
    fields = {key: value for key, value in values.items() if key != "signature"}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_model(model: AnomalyModel, card: ModelCard, directory: Path) -> Path:
    """Write weights and card into ``directory`` (created), the card last, signed.

    Both files get the mode a new file gets here (the weights' writer makes them private).
    """
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory)
    _stamp_weights(directory / WEIGHTS_FILE, {"channels": json.dumps(list(card.channels))})
    card.checksum = file_checksum(directory / WEIGHTS_FILE)
    card.hyperparameters = json.loads(json.dumps(card.hyperparameters))
    values = json.loads(json.dumps(dataclasses.asdict(card)))  # as it will be read back
    card.signature = values["signature"] = card_signature(values)
    (directory / CARD_FILE).write_text(json.dumps(values, indent=2) + "\n")
    os.chmod(directory / WEIGHTS_FILE, stat.S_IMODE(os.stat(directory / CARD_FILE).st_mode))
    return directory


def _shown(value: object) -> str:
    """``repr`` of a card's value for a message, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite(value: object) -> bool:
    """Whether ``value`` is a finite JSON number (an integer of any length included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _card_problem(card: ModelCard) -> str | None:
    """What is wrong with a card's fields (None: nothing)."""
    from bids_anomaly.bids import check_model_name
    from bids_anomaly.config import CHANNELS, RESOLUTIONS

    number = _finite

    def names(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    if not isinstance(card.model_type, str) or card.model_type not in REGISTRY:
        return (f"unknown model type {card.model_type!r} (this version knows "
                f"{', '.join(sorted(REGISTRY))})")
    if (not names(card.channels) or not card.channels
            or len(set(card.channels)) != len(card.channels)
            or not set(card.channels) <= set(CHANNELS)):
        return (f"channels {card.channels!r} must be a non-empty list of distinct channels "
                f"among {', '.join(CHANNELS)}")
    if not number(card.threshold):
        return f"threshold {_shown(card.threshold)} is not a finite number"
    if not number(card.fpr) or not 0 < card.fpr < 1:
        return f"fpr {_shown(card.fpr)} is not a rate in (0, 1)"
    if (not isinstance(card.calibration_voxels, int) or isinstance(card.calibration_voxels, bool)
            or card.calibration_voxels < 1):
        return (f"calibration_voxels {_shown(card.calibration_voxels)} is not a number of "
                "voxels")
    if (not isinstance(card.resolution, int) or isinstance(card.resolution, bool)
            or card.resolution not in RESOLUTIONS):
        return (f"resolution {_shown(card.resolution)} is not a voxel size this version offers "
                f"({', '.join(map(str, RESOLUTIONS))} mm)")
    if not isinstance(card.template, str) or not card.template:
        return f"template {_shown(card.template)} is not a template name"
    if not isinstance(card.name, str):
        return f"name {_shown(card.name)} is not a model name"
    try:
        check_model_name(card.name)
    except UsageError as error:
        return f"its name comes from the card and is not a model name ({error})"
    if not names(card.training_participants) or not names(card.calibration_participants):
        return "training_participants and calibration_participants must be lists of names"
    if not isinstance(card.checksum, str) or len(card.checksum) != 64:
        return "checksum is not a SHA-256 digest"
    for key in ("preprocessing", "hyperparameters", "extra"):
        if not isinstance(getattr(card, key), dict):
            return f"{key} is not an object"
    if not isinstance(card.signature, str):
        return "signature is not a SHA-256 digest"
    return _calibration_problem(card)


CALIBRATION_SLACK = 4.0
"""How far (a factor on the false-positive rate) a card's threshold may sit from the quantile of
its stored calibration at its ``fpr``: the tail is stored at 200 points; a threshold tuned on
annotations has its own rate measured on the same calibration."""


def _calibration_problem(card: ModelCard) -> str | None:
    """What is wrong with a card's calibration tail, or its threshold and fpr against it."""
    tail = card.extra.get("calibration_tail")
    if tail is None:  # a hand-made card: nothing to compare with
        return None
    damaged = ("calibration_tail is damaged: it must hold p (rates rising to 1), score (the "
               "healthy scores at those rates, falling) and n (the healthy voxels)")
    if not isinstance(tail, dict) or not {"p", "score", "n"} <= set(tail):
        return damaged
    p, score, n = tail["p"], tail["score"], tail["n"]
    if (not isinstance(p, list) or not isinstance(score, list) or len(p) != len(score)
            or len(p) < 2 or not all(_finite(v) for v in [*p, *score])
            or isinstance(n, bool) or not isinstance(n, int) or n < 1):
        return damaged
    p, score = np.asarray(p, dtype=np.float64), np.asarray(score, dtype=np.float64)
    spread = float(np.abs(score).max()) or 1.0
    if (not (p > 0).all() or not p[-1] <= 1 or not (np.diff(p) > 0).all()
            or (np.diff(score) > 1e-9 * spread).any()):
        return damaged

    def score_at(rate: float) -> float:
        return float(np.interp(np.log(rate), np.log(p), score))

    fpr, threshold = float(card.fpr), float(card.threshold)
    high = score_at(fpr / CALIBRATION_SLACK) if fpr / CALIBRATION_SLACK >= p[0] else math.inf
    low = score_at(fpr * CALIBRATION_SLACK) if fpr * CALIBRATION_SLACK <= p[-1] else -math.inf
    slack = 1e-6 * spread
    if low - slack <= threshold <= high + slack:
        return None
    ascending = np.argsort(score, kind="stable")
    rate = (1.0 / n if threshold >= score[0] else 1.0 if threshold <= score[-1]
            else float(np.exp(np.interp(threshold, score[ascending], np.log(p[ascending])))))
    return (f"threshold {threshold:.6g} disagrees with the calibration stored with it: healthy "
            f"voxels score above it at a rate of about {rate:.3g}, the card says fpr {fpr:g}")


def _stamp_weights(path: Path, metadata: dict[str, str]) -> None:
    """Add entries to the metadata of a safetensors file (rewriting it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as stream:
        tensors = {key: stream.get_tensor(key) for key in stream.keys()}
        existing = stream.metadata() or {}
    save_file(tensors, str(path), metadata={**existing, **metadata})


def weights_channels(directory: Path) -> list[str] | None:
    """The channels stamped into a model's weights when it was saved (None: not stamped).

    The card can be edited by hand; the weights, whose checksum the card holds, cannot be
    without the checksum failing, so they are what the card's channels are checked against.
    """
    from safetensors import safe_open

    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as stream:
        stamped = (stream.metadata() or {}).get("channels")
    return json.loads(stamped) if stamped else None


def read_card(directory: Path) -> ModelCard:
    """Read and check ``model.json``; a clear :class:`BadDataError` when it is not a model.

    Raises
    ------
    MissingInputError
        The folder has no ``model.json``, or this user cannot read it.
    BadDataError
        The card is not JSON, lacks or adds fields, or a field has an impossible value (an
        unknown model type, channels that are not modalities, a threshold that is not a number,
        or that disagrees with the stored calibration, a damaged calibration tail).
    """
    path = Path(directory) / CARD_FILE
    if not os.path.lexists(path):
        raise MissingInputError(f"{directory} is not a model directory: {CARD_FILE} is missing")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise MissingInputError(file_problem(path, error) or f"{path}: {error}") from error
    except ValueError as error:  # not UTF-8, not JSON, an integer of thousands of digits
        raise BadDataError(f"{path} is not a valid model card: {_shown(str(error))}"
                           ) from error
    try:
        card = ModelCard(**values)
    except TypeError as error:  # not an object, fields missing or unknown
        raise BadDataError(f"{path} is not a valid model card: {error}") from error
    problem = _card_problem(card)
    if problem:
        raise BadDataError(f"{path} is not a valid model card: {problem}")
    return card


def card_checksum(directory: Path) -> str:
    """SHA-256 of a model's ``model.json``: with the weights' checksum, what a score depends on.

    A retrained model can have identical weights and another threshold; caches of scoring steps
    are keyed on both checksums.
    """
    return file_checksum(Path(directory) / CARD_FILE)


def check_weights(model: AnomalyModel, card: ModelCard,
                  grid_shape: tuple[int, ...] | None = None) -> None:
    """Refuse a card that does not describe its weights, or weights made for another grid.

    Raises
    ------
    BadDataError
        The weights take another number of channels than the card lists, or were fitted on
        another grid than ``grid_shape`` (the template's).
    """
    n_channels = getattr(model, "n_channels", None)
    if n_channels is not None and n_channels != len(card.channels):
        raise BadDataError(
            f"model {card.name!r}: its weights take {n_channels} channel(s) but {CARD_FILE} "
            f"lists {len(card.channels)} ({', '.join(card.channels)}); the card was edited or "
            "belongs to other weights"
        )
    model_grid = getattr(model, "grid_shape", None)
    if (grid_shape is not None and model_grid is not None
            and tuple(model_grid) != tuple(grid_shape)):
        raise BadDataError(
            f"model {card.name!r} was fitted on a {tuple(model_grid)} grid, the template grid "
            f"is {tuple(grid_shape)}: it was trained with another template"
        )


def load_model(directory: Path) -> tuple[AnomalyModel, ModelCard]:
    """Load a model directory, checking the card, the weights' checksum and their shapes.

    Raises
    ------
    MissingInputError
        No card or no weights, or files this user cannot read.
    BadDataError
        A damaged card, weights that do not match the card's checksum, weights that cannot
        be read as the card's model type with the card's channels or that hold NaN or
        infinite values, or a card that does not match its signature (edited after training,
        or written before cards were signed).
    """
    directory = Path(directory)
    card = read_card(directory)
    weights = directory / WEIGHTS_FILE
    if not os.path.lexists(weights):
        raise MissingInputError(f"{weights} is missing")
    try:
        checksum = file_checksum(weights)
    except OSError as error:
        raise MissingInputError(file_problem(weights, error) or f"{weights}: {error}"
                                ) from error
    if checksum != card.checksum:
        raise BadDataError(f"{weights} does not match the checksum in {CARD_FILE}: it was "
                           "modified or damaged; copy the model directory again")
    try:
        model = REGISTRY[card.model_type].load(directory)
    except Exception as error:  # safetensors, missing tensors, shapes: all mean "not these"
        raise BadDataError(f"{weights} cannot be read as a {card.model_type!r} model "
                           f"({error.__class__.__name__}: {error})") from error
    broken = non_finite_weights(directory)
    if broken:
        raise BadDataError(f"model {card.name!r}: its weights hold NaN or infinite values "
                           f"({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}): "
                           "they are damaged; train the model again")
    stamped = weights_channels(directory)
    if stamped is not None and stamped != list(card.channels):
        raise BadDataError(f"model {card.name!r}: its weights were trained on "
                           f"{', '.join(stamped)} but {CARD_FILE} lists "
                           f"{', '.join(card.channels)}; the card was edited or belongs to "
                           "other weights")
    check_weights(model, card)
    _check_signature(directory / CARD_FILE, card)
    return model, card


def _check_signature(path: Path, card: ModelCard) -> None:
    """Refuse a card whose fields are not those it was signed with (see :func:`save_model`).

    Checked last: a card whose edit another check describes better fails there first.
    """
    if not card.signature:
        raise BadDataError(f"model {card.name!r}: {path} has no signature (written by "
                           f"bids_anomaly {card.version}, before model cards were signed), so "
                           "an edit cannot be told apart from training; train the model again "
                           "with this version")
    if card_signature(dataclasses.asdict(card)) != card.signature:
        raise BadDataError(f"model {card.name!r}: {path} does not match its signature: the "
                           "card was edited or damaged after training; copy the model "
                           "directory again, or train the model again")


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or infinite values (none when sound).

    Infinities are accepted in the tensors a family declares (``infinite_tensors``).
    """
    allowed = tuple(ending for cls in REGISTRY.values() for ending in cls.infinite_tensors)
    return [key for key, tensor in tensors.items() if tensor.is_floating_point() and (
        tensor.isnan().any() or (tensor.isinf().any() and not key.endswith(allowed)))]


def non_finite_weights(directory: Path) -> list[str]:
    """Names of the stored tensors holding NaN or infinite values (:func:`non_finite_tensors`)."""
    from safetensors import safe_open

    broken = []
    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as stream:
        for key in stream.keys():
            broken += non_finite_tensors({key: stream.get_tensor(key)})
    return broken


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and hyperparameters stored by :func:`write_weights` (no code is unpickled)."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as stream:
        tensors = {key: stream.get_tensor(key) for key in stream.keys()}
        metadata = stream.metadata() or {}
    return tensors, json.loads(metadata.get("hyperparameters", "{}"))


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], hyperparameters: dict) -> None:
    """Write tensors and hyperparameters to ``weights.safetensors``."""
    from safetensors.torch import save_file

    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()},
              str(Path(directory) / WEIGHTS_FILE),
              metadata={"hyperparameters": json.dumps(hyperparameters)})
