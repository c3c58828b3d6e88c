"""What models learn from: each subject's preprocessed images, read one at a time.

:class:`TrainingData` is the argument of every family's ``fit``; :class:`SubjectImages` one
subject/session's template-space channels and brain mask, optionally scaled per channel
(``--channel-scaling``, :func:`fit_channel_scaling`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bids_anomaly.errors import BadDataError, MissingInputError


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
