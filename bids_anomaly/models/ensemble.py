"""Ensembles: several calibrated models combined into one map on a common, calibrated scale.

Scores of different families live on different scales (z-scores, residuals, logits), so they
are first made comparable through each member's own healthy calibration: the stored upper tail
of its scores on held-out healthy voxels (``calibration_tail`` of its card) turns a score into
an exceedance probability ``p``, and the member's map into ``-log10 p`` (0 for typical tissue,
about 5 where a score is beyond every one of 100,000 healthy voxels). Beyond the largest stored
healthy score the tail is extrapolated exponentially (log p linear in the score, with the slope
of the stored tail's top decade), so the most abnormal voxels keep their order instead of all
sharing the floor ``1 / n``. The ensemble's score is the mean (evidence from several models
together) or the max (any model) of the members' ``-log10 p``; the train level then calibrates
the ensemble itself on held-out healthy subjects, like any model, under its own ``desc-``.

``bids_anomaly BIDS OUT train --model-type ensemble --members normative restore`` reads the
members from ``OUT/models/model-<name>``; the ensemble's directory holds copies of their
weights, so it stays usable if a member is retrained or removed. A member may also be a family
that needs no training (``--members tissue intensity segment``): it is built on the training
data with its defaults (the baseline on the lesion contrast), calibrated on them (the tissue
model on its own healthy draw), and stored like the others; a patients-only cohort is enough.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from bids_anomaly.config import option
from bids_anomaly.errors import BadDataError, MissingInputError, UsageError
from bids_anomaly.models.calibration import log10_exceedance, tail_table
from bids_anomaly.models.contract import REGISTRY, BaseModel, register
from bids_anomaly.models.data import TrainingData, valid_voxels
from bids_anomaly.models.store import load_model

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

LOGGER = logging.getLogger(__name__)

COMBINATIONS = ("mean", "max")


@dataclass
class MemberOptions:
    """Which trained models a model built on models (ensemble, stacked) uses."""

    members: list[str] = option(
        help="names of trained models (OUTPUT_DIR/models/model-<name>) to combine (ensemble) "
             "or whose calibrated scores are features (stacked)",
        factory=list, flags=("--members",), nargs="+", metavar="MODEL")


@dataclass
class EnsembleOptions:
    """How an ensemble combines its members."""

    combine: str = option(
        "mean", "how the members' -log10 p maps combine: mean or max (default {default})",
        flags=("--combine",), choices=COMBINATIONS)


@register
class EnsembleModel(BaseModel):
    """Combine calibrated models: mean or max of their ``-log10 p`` maps.

    Parameters
    ----------
    combine : str
        ``mean`` or ``max``.
    members : list of dict, optional
        Stored members (name, model_type, channels, hyperparameters, tail, threshold), as
        :attr:`hyperparameters` writes them; use :meth:`add` for models in memory.
    channels : list of str, optional
        The ensemble's channels (set by :meth:`fit`): each member takes its own among them.
    """

    model_type = "ensemble"
    summary = "mean or max of calibrated models' -log10 p maps (train --members A B)"
    options = (MemberOptions, EnsembleOptions)
    options_scope = "building an ensemble"
    calibration_only: ClassVar[bool] = True

    def __init__(self, combine: str = "mean", members: list[dict] | None = None,
                 channels: list[str] | None = None) -> None:
        super().__init__()
        if combine not in COMBINATIONS:
            raise ValueError(f"combine {combine!r}: choose mean or max")
        self.combine = combine
        self.channels = list(channels) if channels else None
        self.members: list[dict] = []
        self.models: list[BaseModel] = []
        self.cards: list = []  # the members' cards, when read from model directories
        for member in members or []:
            if member.get("untrained"):
                self.add_untrained(member["model_type"], member.get("random_seed", 0))
                continue
            model = REGISTRY[member["model_type"]].from_hyperparameters(
                member["hyperparameters"])
            self.add(member["name"], model, member["channels"], member["tail"],
                     member.get("threshold"))

    def add_untrained(self, family: str, random_seed: int = 0) -> None:
        """Add a member of a family that needs no training; it is built by :meth:`fit`."""
        self.members.append({"name": family, "model_type": family, "untrained": True,
                             "random_seed": random_seed})
        self.models.append(None)

    def add(self, name: str, model: BaseModel, channels: list[str], tail: dict,
            threshold: float | None = None) -> None:
        """Add a fitted model, its channels and its healthy calibration tail."""
        if not tail or not {"p", "score", "n"} <= set(tail):
            raise BadDataError(f"model {name} has no healthy calibration tail")
        self.members.append({"name": name, "model_type": model.model_type,
                             "channels": list(channels), "tail": tail, "threshold": threshold})
        self.models.append(model)

    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False) -> EnsembleModel:
        """An ensemble of the trained models named by ``--members``.

        Raises
        ------
        UsageError
            Fewer than two members, or a member that is an ensemble.
        MissingInputError
            A member that is not trained.
        """
        given = settings.model.options
        return cls.from_members(settings, given.get("members", []),
                                combine=given.get("combine", "mean"))

    @classmethod
    def from_members(cls, settings: Settings, names: list[str], minimum: int = 2,
                     combine: str = "mean") -> EnsembleModel:
        """An ensemble of the trained models ``names`` (OUTPUT_DIR/models/model-<name>).

        Raises
        ------
        UsageError
            Fewer than ``minimum`` members, a member that is an ensemble or a stacked model, a
            member with covariates, or members on different templates.
        MissingInputError
            A member that is not trained.
        """
        from bids_anomaly import bids

        names = list(dict.fromkeys(names))
        if len(names) < minimum:
            raise UsageError(f"--members: name at least {minimum} trained model"
                             f"{'s' if minimum > 1 else ''}")
        ensemble = cls(combine=combine)
        untrained = sorted(t for t, family in REGISTRY.items() if not family.needs_training)
        for name in names:
            directory = bids.model_dir(settings.output_dir, name)
            if not directory.exists() and name in untrained:
                ensemble.add_untrained(name, settings.execution.random_seed)
                continue
            if not directory.exists():
                trained = bids.model_names(settings.output_dir)
                raise MissingInputError(
                    f"--members {name}: no trained model of that name in "
                    f"{bids.models_dir(settings.output_dir)} (trained: "
                    f"{', '.join(trained) or 'none'}), and {name} is not a family that needs "
                    f"no training ({', '.join(untrained)})")
            model, card = load_model(directory)
            if card.model_type in (cls.model_type, "stacked"):
                raise UsageError(f"--members {name}: a {card.model_type} model cannot be a "
                                 "member")
            if getattr(model, "needs_covariates", False):
                raise UsageError(f"--members {name}: a model whose norms depend on covariates "
                                 "cannot be a member yet (an ensemble scores without "
                                 "participants.tsv)")
            first = ensemble.cards[0] if ensemble.cards else None
            space = (card.template, card.resolution)
            if first is not None and space != (first.template, first.resolution):
                raise UsageError(f"--members: {name} is on {card.template} at {card.resolution}"
                                 f" mm, {first.name} on {first.template} at {first.resolution}"
                                 " mm")
            ensemble.add(name, model, card.channels, card.extra.get("calibration_tail"),
                         card.threshold)
            ensemble.cards.append(card)
        return ensemble

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """At least two members.

        Raises
        ------
        UsageError
            Fewer than two distinct members.
        """
        if len(set(given.get("members", []))) < 2:
            raise UsageError("an ensemble needs --members with at least two trained models")

    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar."""
        names = ", ".join(f"{m['name']} ({m['model_type']})" for m in self.members)
        return (f"{self.combine} over the models {names} of -log10 p, p the exceedance "
                "probability of each model's score among its held-out healthy voxels")

    @property
    def hyperparameters(self) -> dict:
        """The combination and every member (type, channels, hyperparameters, tail)."""
        return {"combine": self.combine, "channels": self.channels,
                "members": [member if model is None
                            else {**member, "hyperparameters": model.stored_hyperparameters()}
                            for member, model in zip(self.members, self.models, strict=True)]}

    @property
    def n_channels(self) -> int | None:
        """The ensemble's channels (None before fitting)."""
        return None if self.channels is None else len(self.channels)

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The members' grid."""
        shapes = {m.grid_shape for m in self.models
                  if m is not None and m.grid_shape is not None}
        return shapes.pop() if len(shapes) == 1 else None

    def fit(self, data: TrainingData) -> None:
        """Nothing to learn: check that the data has every member's channels and grid.

        Raises
        ------
        UsageError
            Fewer than two members, or members on different grids.
        BadDataError
            A member channel that the data lacks.
        """
        if len(self.models) < 2:
            raise UsageError("an ensemble needs at least two members")
        self.build_untrained(data)
        self.check_data(data)

    def build_untrained(self, data: TrainingData) -> None:
        """Build and calibrate the members of families that need no training on ``data``.

        A self-calibrated member (``tissue``) keeps the healthy distribution its scores have by
        construction; the others are calibrated on every subject of ``data``.
        """
        for index, (member, model) in enumerate(zip(self.members, self.models, strict=True)):
            if model is not None:
                continue
            family = REGISTRY[member["model_type"]]
            model = family.untrained(list(data.channels), member.get("random_seed", 0))
            model.fit(data)
            scores = (model.simulated_scores() if family.self_calibrated
                      else _healthy_scores(model, data))
            self.members[index] = {"name": member["name"], "model_type": family.model_type,
                                   "channels": list(data.channels),
                                   "tail": tail_table(scores), "threshold": None}
            self.models[index] = model
            LOGGER.info("ensemble member %s built on %d subject(s) without training",
                        member["name"], len(data))

    def check_data(self, data: TrainingData) -> None:
        """Set the channels from ``data``, which must hold every member's channels and grid.

        Raises
        ------
        BadDataError
            A member channel that the data lacks.
        UsageError
            Members on different grids.
        """
        missing = sorted({c for m in self.members for c in m.get("channels", ())}
                         - set(data.channels))
        if missing:
            raise BadDataError(f"the members use {', '.join(missing)}, which the training data "
                               "lacks (--channels, or members trained on other channels)")
        shapes = {m.grid_shape for m in self.models
                  if m is not None and m.grid_shape is not None}
        if len(shapes) > 1:  # members without a grid (the intensity baseline) fit any
            raise UsageError(f"the members are on different grids: {sorted(map(str, shapes))}")
        self.channels = list(data.channels)
        trained = {p for card in self.cards for p in card.training_participants}
        overlap = sorted(trained & set(data.names))
        if overlap:
            LOGGER.warning("calibrated or fitted on %s, on which members were trained: the "
                           "members' scores there are lower than on new subjects",
                           ", ".join(overlap))

    def member_maps(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each member's ``-log10 p`` map, ``(M, X, Y, Z)``, 0 outside the valid brain."""
        if self.channels is None:
            raise RuntimeError("the ensemble is not fitted")
        valid = valid_voxels(image, mask)
        maps = []
        for member, model in zip(self.members, self.models, strict=True):
            index = [self.channels.index(c) for c in member["channels"]]
            score = model.score(image[index], mask)
            if not model.self_calibrated:  # a self-calibrated score is -log10 p already
                score = log10_exceedance(score, member["tail"])
            maps.append(torch.where(valid, score.clamp_min(0), 0.0))
        return torch.stack(maps)

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean or max of the members' ``-log10 p``; 0 outside the valid brain."""
        maps = self.member_maps(image, mask)
        return maps.mean(0) if self.combine == "mean" else maps.amax(0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every member's tensors, prefixed ``member<i>.``."""
        return {f"member{i}.{key}": value for i, model in enumerate(self.models)
                for key, value in model.tensors().items()}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Give each member its tensors.

        Raises
        ------
        BadDataError
            Tensors that do not belong to a stored member.
        """
        for i, model in enumerate(self.models):
            prefix = f"member{i}."
            model.restore({k[len(prefix):]: v for k, v in tensors.items()
                           if k.startswith(prefix)})
        known = tuple(f"member{i}." for i in range(len(self.models)))
        stray = [k for k in tensors if not k.startswith(known)]
        if stray:
            raise BadDataError(f"the ensemble's weights hold tensors of no member: {stray[:3]}")


def _healthy_scores(model: BaseModel, data: TrainingData) -> np.ndarray:
    """Scores of every valid brain voxel of ``data`` (a member's calibration)."""
    scores = []
    with torch.no_grad():
        for image, mask in data:
            scores.append(model.score(image, mask)[valid_voxels(image, mask)].double().cpu()
                          .numpy())
    return np.concatenate(scores)
