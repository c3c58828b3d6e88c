"""Stacking: a voxel classifier over what the project computes, fitted on a few annotations.

``train --model-type stacked --annotations DERIV [--members A B]`` learns, from the annotated
lesion voxels and healthy voxels, how to weigh features the other families already compute:

- each member's calibrated score: ``-log10 p`` of its map against its healthy calibration tail
  (:func:`~bids_anomaly.models.ensemble.log10_exceedance`; members are trained models, as for
  the ensemble; none is fine);
- each channel's normalised intensity and its signed voxel-wise z-score against the healthy
  subjects (a :class:`~bids_anomaly.models.normative.normative.NormativeModel` fitted here);
- the template's tissue probabilities (GM, WM, CSF), the distance to the edge of the subject's
  brain mask and to the template's ventricles (deep CSF), in mm;
- optionally (``--neighbourhood-features``) the 3 x 3 x 3 mean of the subject's features.

Healthy voxels come from the controls (the selected participants without an annotation) and
from the annotated subjects outside their lesions (one voxel away from them: borders are
uncertain). A class-balanced sample trains the classifier
(:mod:`~bids_anomaly.models.stacking.classifiers`: gradient-boosted trees by default, or a logistic
regression), whose log-odds are then shifted by the prior correction to the lesion prevalence of the
annotated subjects: the score is a calibrated lesion probability in patients like them. The train
level then tunes the threshold, minimum cluster size and restriction by cross-validation on
out-of-fold maps (:meth:`StackedModel.out_of_fold_scores`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from bids_anomaly.config import option
from bids_anomaly.errors import MissingInputError, UsageError
from bids_anomaly.models.contract import BaseModel, register
from bids_anomaly.models.data import TrainingData, valid_voxels
from bids_anomaly.models.ensemble import EnsembleModel, MemberOptions
from bids_anomaly.models.normative.normative import NormativeModel
from bids_anomaly.models.stacking.classifiers import (
    CLASSIFIERS,
    export_classifier,
    fit_classifier,
    predict_probability,
    prior_offset,
)

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

LOGGER = logging.getLogger(__name__)

TISSUES = ("GM", "WM", "CSF")
VENTRICLE_DEPTH_MM = 10.0
"""Template CSF farther than this from the brain's edge is taken as the ventricles."""


@dataclass
class StackingOptions:
    """How the stacked voxel classifier is built."""

    classifier: str = option(
        "hgb", "hgb (gradient-boosted trees, default) or logistic (logistic regression)",
        flags=("--classifier",), choices=CLASSIFIERS)
    neighbourhood_features: bool = option(
        False, "add the 3 x 3 x 3 neighbourhood mean of each feature",
        flags=("--neighbourhood-features",), action="store_true")
    healthy_voxels: int = option(
        20000, "healthy voxels sampled per subject (default: {default}); lesion voxels: all, "
               "at most as many", flags=("--healthy-voxels",), type=int, metavar="N")


@register
class StackedModel(BaseModel):
    """A voxel classifier over member scores, intensities, z-scores and anatomy.

    Parameters
    ----------
    classifier : str
        ``hgb`` or ``logistic``.
    neighbourhood_features : bool
        Add the 3 x 3 x 3 mean of every subject feature.
    healthy_voxels : int
        Healthy voxels sampled per subject (lesion voxels: all, at most as many).
    random_seed : int
        Seed of the voxel sampling and of the classifier.
    members : list of dict, optional
        Stored members (as :class:`~bids_anomaly.models.ensemble.EnsembleModel` stores them).
    channels : list of str, optional
        The channels (set by :meth:`fit`).
    voxel_size : list of float, optional
        The template grid's voxel size in mm (set by :meth:`fit`).
    logit_offset : float
        The prior correction (set by :meth:`fit`).
    """

    model_type = "stacked"
    summary = ("voxel classifier over members' calibrated scores, intensities, z-scores and "
               "anatomy, fitted on annotations (train --annotations)")
    options = (MemberOptions, StackingOptions)
    options_scope = "stacking a classifier on annotations"
    supervised: ClassVar[bool] = True
    learns_from_annotations: ClassVar[bool] = True
    # a gradient-boosted tree splits at +inf to send every value but a missing one left
    infinite_tensors: ClassVar[tuple[str, ...]] = ("node_num_threshold",)

    def __init__(self, classifier: str = "hgb", neighbourhood_features: bool = False,
                 healthy_voxels: int = 20000, random_seed: int = 0,
                 members: list[dict] | None = None, channels: list[str] | None = None,
                 voxel_size: list[float] | None = None, logit_offset: float = 0.0) -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier {classifier!r}: choose one of {CLASSIFIERS}")
        if healthy_voxels < 100:
            raise ValueError("sample at least 100 healthy voxels per subject")
        self.classifier = classifier
        self.neighbourhood_features = neighbourhood_features
        self.healthy_voxels = healthy_voxels
        self.random_seed = random_seed
        self.members = EnsembleModel(members=members, channels=channels)
        self.channels = list(channels) if channels else None
        self.voxel_size = list(voxel_size) if voxel_size else None
        self.logit_offset = float(logit_offset)
        self.normative = NormativeModel()
        self.anatomy: torch.Tensor | None = None  # GM, WM, CSF, distance to ventricles
        self.parameters: dict[str, torch.Tensor] = {}
        self._samples: list[tuple[str, np.ndarray, np.ndarray]] = []
        # the annotated subjects' features from fit, for the out-of-fold maps
        self._annotated_features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._prevalence = 0.5

    # --------------------------------------------------------------- building
    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False) -> StackedModel:
        """A stacked model over the trained models named by ``--members`` (any number)."""
        given = settings.model.options
        model = cls(classifier=given.get("classifier", "hgb"),
                    neighbourhood_features=given.get("neighbourhood_features", False),
                    healthy_voxels=given.get("healthy_voxels", 20000),
                    random_seed=settings.execution.random_seed)
        if given.get("members"):
            model.members = EnsembleModel.from_members(settings, given["members"],
                                                       minimum=1)
        return model

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """A sample of at least 100 healthy voxels per subject.

        Raises
        ------
        UsageError
            ``--healthy-voxels`` below 100.
        """
        if given.get("healthy_voxels", 20000) < 100:
            raise UsageError("--healthy-voxels: sample at least 100 healthy voxels per subject")

    @property
    def feature_names(self) -> list[str]:
        """The classifier's inputs, in order."""
        if self.channels is None:
            return []
        names = [f"{m['name']}:-log10p" for m in self.members.members]
        names += [f"{c}:intensity" for c in self.channels] + [f"{c}:z" for c in self.channels]
        subject = list(names)
        names += [*TISSUES, "distance_to_brain_edge_mm", "distance_to_ventricles_mm"]
        if self.neighbourhood_features:
            names += [f"{name}:mean3" for name in subject]
        return names

    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar."""
        kind = {"hgb": "gradient-boosted trees", "logistic": "logistic regression"}
        return (f"lesion probability from {kind[self.classifier]} over "
                f"{', '.join(self.feature_names) or 'voxel features'}, fitted on annotated "
                "lesions and healthy voxels, prior-corrected to the annotated subjects' lesion "
                "prevalence")

    @property
    def hyperparameters(self) -> dict:
        """Everything :meth:`from_hyperparameters` needs (members included)."""
        members = self.members.hyperparameters["members"]
        return {"classifier": self.classifier,
                "neighbourhood_features": self.neighbourhood_features,
                "healthy_voxels": self.healthy_voxels, "random_seed": self.random_seed,
                "members": members, "channels": self.channels, "voxel_size": self.voxel_size,
                "logit_offset": self.logit_offset, "features": self.feature_names}

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict) -> StackedModel:
        """An unfitted model from stored hyperparameters (the feature list is derived)."""
        values = {k: v for k, v in hyperparameters.items() if k != "features"}
        return cls(**values)

    @property
    def n_channels(self) -> int | None:
        """Channels the fitted model takes (None before fitting)."""
        return None if self.channels is None else len(self.channels)

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The template grid (None before fitting)."""
        return None if self.anatomy is None else tuple(self.anatomy.shape[1:])

    # --------------------------------------------------------------- features
    def _anatomy(self, data: TrainingData) -> None:
        """Template tissue probabilities and the distance to the template's ventricles."""
        if not data.tissues or len(data.tissues) != len(TISSUES):
            raise MissingInputError("stacking needs the template's tissue probability maps "
                                    "(GM, WM, CSF) with the training data")
        images = [nib.load(path) for path in data.tissues]
        self.voxel_size = [float(v) for v in images[0].header.get_zooms()[:3]]
        maps = np.stack([img.get_fdata(dtype=np.float32) for img in images])
        brain = maps.sum(0) > 0.5
        depth = ndimage.distance_transform_edt(brain, sampling=self.voxel_size)
        ventricles = (maps[2] > 0.5) & (depth > VENTRICLE_DEPTH_MM)
        if not ventricles.any():
            ventricles = maps[2] >= maps[2].max()
        distance = ndimage.distance_transform_edt(~ventricles, sampling=self.voxel_size)
        self.anatomy = torch.from_numpy(np.concatenate([maps, distance[None].astype(np.float32)]))

    def features(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The feature matrix of a subject's valid voxels and those voxels.

        Returns
        -------
        features : numpy.ndarray
            ``(n, F)`` float64, columns as :attr:`feature_names`.
        valid : numpy.ndarray
            ``(X, Y, Z)`` boolean: the voxels the rows are, in C order.
        """
        if self.anatomy is None or self.channels is None:
            raise RuntimeError("the stacked model is not fitted")
        image, mask = image.cpu(), mask.cpu()
        valid = valid_voxels(image, mask)
        with torch.no_grad():
            maps = []
            if self.members.models:
                maps.append(self.members.member_maps(image, mask))
            z = (image - self.normative.location) / self.normative.spread
            maps += [image, torch.where(self.normative.support, z, 0.0)]
            subject = torch.cat(maps).float()
            subject = torch.where(valid, subject, 0.0)
        columns = [subject.numpy()]
        edge = ndimage.distance_transform_edt(mask.numpy(), sampling=self.voxel_size)
        columns.append(self.anatomy[:3].numpy())
        columns.append(np.stack([edge.astype(np.float32), self.anatomy[3].numpy()]))
        if self.neighbourhood_features:
            weight = ndimage.uniform_filter(valid.numpy().astype(np.float32), 3, mode="constant")
            means = np.stack([ndimage.uniform_filter(m, 3, mode="constant")
                              for m in subject.numpy()])
            columns.append(means / np.maximum(weight, 1e-6))
        stacked = np.concatenate(columns)
        inside = valid.numpy()
        return stacked[:, inside].T.astype(np.float64), inside

    # --------------------------------------------------------------- fitting
    def fit(self, data: TrainingData) -> None:
        """Fit the z-scores on healthy subjects, then the classifier on sampled voxels.

        Raises
        ------
        MissingInputError
            No annotated subject, or no healthy voxel to learn from.
        """
        annotated = set(data.annotated)
        if not annotated:
            raise MissingInputError("stacking needs annotated subjects (train --annotations)")
        self.channels = list(data.channels)
        if self.members.models:
            self.members.check_data(data)
        self._anatomy(data)
        controls = [i for i in range(len(data)) if i not in annotated]
        healthy = data.subset(controls) if len(controls) >= 2 else None
        if healthy is None:  # the annotated subjects outside their lesions are the reference
            healthy = _lesions_removed(data)
        self.normative = NormativeModel()
        self.normative.fit(healthy)
        rng = np.random.default_rng(self.random_seed)
        self._samples = []
        self._annotated_features = {}
        lesion_voxels = brain_voxels = 0
        for subject in data.subjects:
            image, mask = subject.load("cpu")
            features, valid = self.features(image, mask)
            labels = np.zeros(len(features), dtype=bool)
            lesion = subject.load_lesion("cpu")
            keep = np.ones(len(features), dtype=bool)
            if lesion is not None:
                lesion = lesion.numpy()
                labels = lesion[valid]
                near = ndimage.binary_dilation(lesion, iterations=1)[valid]
                keep = labels | ~near  # the lesion's border is neither lesion nor healthy
                lesion_voxels += int(labels.sum())
                brain_voxels += int(valid.sum())
                self._annotated_features[subject.name] = (features, valid)
            positive = np.flatnonzero(labels)
            negative = np.flatnonzero(keep & ~labels)
            chosen = [rng.choice(negative, min(self.healthy_voxels, len(negative)),
                                 replace=False)]
            if len(positive):
                chosen.append(rng.choice(positive, min(self.healthy_voxels, len(positive)),
                                         replace=False))
            rows = np.sort(np.concatenate(chosen))
            self._samples.append((subject.name, features[rows], labels[rows]))
        if lesion_voxels == 0:
            raise MissingInputError("the annotations hold no lesion voxel inside the brain")
        self._fit_classifier([name for name, _, _ in self._samples],
                             lesion_voxels / brain_voxels)

    def _fit_classifier(self, names: list[str], prevalence: float | None = None) -> None:
        """Fit the classifier on the stored samples of ``names``; set the prior correction."""
        rows = [(x, y) for name, x, y in self._samples if name in names]
        features = np.concatenate([x for x, _ in rows])
        labels = np.concatenate([y for _, y in rows])
        if prevalence is not None:
            self._prevalence = prevalence
        fitted = fit_classifier(self.classifier, features, labels, self.random_seed)
        self.parameters = export_classifier(self.classifier, fitted)
        self.logit_offset = prior_offset(float(labels.mean()), self._prevalence)
        self.fit_report = {"features": self.feature_names, "lesion_samples": int(labels.sum()),
                           "healthy_samples": int((~labels).sum()),
                           "lesion_prevalence": self._prevalence,
                           "logit_offset": self.logit_offset}

    def out_of_fold_scores(self, data: TrainingData) -> dict[str, np.ndarray]:
        """Each annotated subject's map from a classifier fitted without its voxels.

        The z-scores keep their fit (on the controls; on the annotated subjects outside their
        lesions when there are fewer than two controls). Needs two annotated subjects or more;
        the fitted classifier is restored afterwards. The features computed by :meth:`fit` are
        reused.
        """
        names = [name for name, _, _ in self._samples]
        fitted = (dict(self.parameters), self.logit_offset, dict(self.fit_report))
        out = {}
        try:
            for index in data.annotated:
                subject = data.subjects[index]
                self._fit_classifier([n for n in names if n != subject.name])
                features = self._annotated_features.get(subject.name)
                if features is None:
                    features = self.features(*subject.load("cpu"))
                out[subject.name] = self._probability_map(*features)
        finally:
            self.parameters, self.logit_offset, self.fit_report = fitted
        return out

    # --------------------------------------------------------------- scoring
    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Lesion probability of every valid brain voxel, 0 elsewhere."""
        if not self.parameters:
            raise RuntimeError("the stacked model is not fitted")
        return torch.from_numpy(self._probability_map(*self.features(image, mask))).to(
            image.device)

    def _probability_map(self, features: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The classifier's probabilities of :meth:`features`' rows, as a float32 volume."""
        out = np.zeros(valid.shape, dtype=np.float32)
        out[valid] = predict_probability(self.classifier, self.parameters, features,
                                         self.logit_offset)
        return out

    # --------------------------------------------------------------- storage
    def tensors(self) -> dict[str, torch.Tensor]:
        """Classifier parameters, z-score model, anatomy and members' tensors."""
        tensors = {f"classifier.{k}": v for k, v in self.parameters.items()}
        tensors.update({f"normative.{k}": v for k, v in self.normative.tensors().items()})
        tensors["anatomy"] = self.anatomy
        tensors.update({f"members.{k}": v for k, v in self.members.tensors().items()})
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the fitted state from :meth:`tensors`."""
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.parameters = part("classifier.")
        self.normative.restore(part("normative."))
        self.anatomy = tensors["anatomy"]
        self.members.restore(part("members."))


class _LesionFree(TrainingData):
    """Training data whose brain masks leave out each subject's annotated lesions."""

    def __iter__(self):
        for subject in self.subjects:
            image, mask = subject.load(self.device)
            lesion = subject.load_lesion(self.device)
            yield image, (mask if lesion is None else mask & ~lesion)


def _lesions_removed(data: TrainingData) -> TrainingData:
    """The subjects with their annotated lesions cut out of their brain masks (in memory)."""
    return _LesionFree(data.subjects, data.channels, data.device, data.regions, data.tissues)
