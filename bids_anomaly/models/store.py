"""The model store: a trained model's folder, written once and checked whenever it is read.

A model folder (``OUTPUT_DIR/models/model-<name>/``, :func:`bids_anomaly.bids.model_dir`) is to
this package what a bundle is to MONAI: all that scoring new data needs, described by itself,
with no code to import and nothing to unpickle::

    model-<name>/
      weights.safetensors   the fitted state: named tensors, and in the file's metadata the
                            family's hyperparameters and the channels it was trained on
                            (:mod:`bids_anomaly.models.weights`)
      model.json            the model card (:class:`ModelCard`): what the weights are, how they
                            were trained and calibrated, sealed by a checksum and a signature

The fields of ``model.json``::

    name                      the model's name (``--model-name``)
    model_type                its family, a key of the registry (``--model-type``)
    channels                  the input channels, in order (T1w, FLAIR, ..., FA, MD)
    template, resolution      the space it works in: template name, voxel size in mm
    preprocessing             the preprocessing settings the data must have been made with
    hyperparameters           everything needed to rebuild the model (also in the weights)
    training_participants     the subjects it was fitted on
    calibration_participants  the held-out controls its threshold was calibrated on
    threshold, fpr            the score above which a voxel is abnormal, and the healthy
                              voxels' rate above it
    calibration_voxels        how many healthy voxels the threshold was calibrated on
    score_definition          what the score means (also in each anomaly map's sidecar)
    version                   the bids_anomaly version that trained it
    extra                     what else training recorded: calibration_tail (the healthy
                              scores at rates down to 1/n), fit (the fit's report),
                              training_key, channel_scaling; where asked, microbleeds,
                              postprocessing and weak_supervision (tuned on annotations), split
    checksum                  SHA-256 of weights.safetensors
    signature                 SHA-256 of every other field as canonical JSON
                              (:func:`card_signature`)

:func:`save_model` writes the weights, stamps their channels into them, then writes the card
last, with the checksum and the signature. :func:`load_model` reads the card and checks that
every field has a possible value (a known family, known channels, a finite threshold that
agrees with the stored calibration tail), that the weights match the checksum, load as the
card's family, hold no NaN or infinity and were stamped with the card's channels, and last that
the card matches its signature: an edited card is refused. The data are then checked against
the card (:meth:`ModelCard.check_compatible`: template, resolution, preprocessing, channels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bids_anomaly import __version__
from bids_anomaly.errors import BadDataError, MissingInputError, UsageError, file_problem
from bids_anomaly.models.contract import REGISTRY, AnomalyModel
from bids_anomaly.models.weights import WEIGHTS_FILE

CARD_FILE = "model.json"


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
