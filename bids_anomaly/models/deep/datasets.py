"""Training samples for the deep models: slices, 2.5D slice stacks and 3D patches.

Preprocessed subjects are read from NIfTI once and cached as uncompressed ``.npy`` files
(brain-masked channels plus the mask) in the work directory; data-loader workers then map them
from the page cache instead of decompressing gzip every epoch. Every random choice of a sample
(which patch) depends only on ``(seed, epoch, index)``, so the samples are the same whatever
the number of workers or GPUs, and a resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bids_anomaly.errors import BadDataError
from bids_anomaly.models.data import SubjectImages, valid_voxels

MIN_SLICE_FRACTION = 0.1
"""Training slices hold at least this fraction of the brain voxels of the subject's largest."""
VALIDATION_FRACTION = 0.15
"""Fraction of the fitting subjects held out for the validation loss (early stopping)."""


def split_subjects(n_subjects: int, seed: int, fraction: float = VALIDATION_FRACTION
                   ) -> tuple[list[int], list[int]]:
    """(training, validation) subject indices; one subject validates on itself."""
    if n_subjects < 2:
        return [0], [0]
    order = np.random.default_rng(seed).permutation(n_subjects)
    n_validation = max(1, round(fraction * n_subjects))
    return sorted(order[n_validation:].tolist()), sorted(order[:n_validation].tolist())


def cached_volumes(subjects: list[SubjectImages], cache_dir: Path | None
                   ) -> tuple[list[np.ndarray], tuple[int, ...], Path]:
    """The subjects through a :class:`VolumeCache` (a temporary folder when ``cache_dir`` is None).

    Returns
    -------
    volumes : list of numpy.ndarray
        :meth:`VolumeCache.get` of each subject.
    grid : tuple of int
        Their common grid.
    cache_dir : Path
        The cache folder used.

    Raises
    ------
    BadDataError
        The subjects are on different grids.
    """
    if cache_dir is None:
        cache_dir = Path(tempfile.mkdtemp(prefix="bids_anomaly_cache_"))
    cache = VolumeCache(cache_dir)
    volumes = [cache.get(subject) for subject in subjects]
    shapes = {v.shape[1:] for v in volumes}
    if len(shapes) != 1:
        raise BadDataError(f"the training subjects are on different grids: {sorted(shapes)}")
    return volumes, tuple(int(s) for s in shapes.pop()), Path(cache_dir)


def check_image(model_type: str, image, n_channels: int | None,
                grid: tuple[int, ...] | None) -> None:
    """Refuse a ``(C, X, Y, Z)`` image with other channels or another grid than a model's.

    Raises
    ------
    BadDataError
        Another number of channels or another grid.
    """
    if image.shape[0] != n_channels:
        raise BadDataError(f"the {model_type} model takes {n_channels} channel(s), the image "
                           f"has {image.shape[0]}")
    if tuple(image.shape[1:]) != tuple(grid):
        raise BadDataError(f"the {model_type} model was trained on a {tuple(grid)} grid, the "
                           f"image is {tuple(image.shape[1:])}")


def padded_shape(shape: tuple[int, ...], multiple: int) -> tuple[int, ...]:
    """``shape`` rounded up to a multiple of ``multiple`` in every dimension."""
    return tuple(int(np.ceil(s / multiple) * multiple) for s in shape)


def pad_to(array: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the trailing dimensions of ``array`` to ``shape``, centred.

    Returns
    -------
    padded : torch.Tensor
        The padded array.
    crop : tuple of slice
        Slices of the trailing dimensions that give back the original array.
    """
    spatial = array.shape[-len(shape):]
    pads, crop = [], []
    for size, target in zip(spatial, shape, strict=True):
        before = (target - size) // 2
        pads.append((before, target - size - before))
        crop.append(slice(before, before + size))
    flat = [value for pair in reversed(pads) for value in pair]
    return torch.nn.functional.pad(array, flat), tuple(crop)


def window_channels(window: torch.Tensor) -> torch.Tensor:
    """``(..., C, X, Y, W)`` slice windows as ``(..., C * W, X, Y)`` input channels.

    Channel ``c * W + offset`` holds channel ``c`` of the window's slice ``offset``: the one
    channel order of 2.5D inputs, in training and at inference.
    """
    return window.movedim(-1, -3).flatten(-4, -3)


def stack_slices(volume: torch.Tensor, context: int) -> torch.Tensor:
    """Axial slices with ``context`` neighbours on each side as extra channels.

    Parameters
    ----------
    volume : torch.Tensor
        ``(C, X, Y, Z)``.
    context : int
        Neighbouring slices on each side (0: plain 2D slices). Slices beyond the volume are 0.

    Returns
    -------
    torch.Tensor
        ``(Z, C * (2 * context + 1), X, Y)``: for each slice, the channels of slices
        ``z - context .. z + context`` (see :func:`window_channels`).
    """
    padded = torch.nn.functional.pad(volume, (context, context))
    windows = padded.unfold(-1, 2 * context + 1, 1)  # (C, X, Y, Z, 2k+1)
    return window_channels(windows.movedim(3, 0))


class VolumeCache:
    """Subjects' masked channels and masks as ``.npy`` files in ``directory``.

    Parameters
    ----------
    directory : Path
        Where the cache lives (the work directory); created when needed.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, subject: SubjectImages) -> Path:
        """Cache file of ``subject``, keyed by its files' paths, sizes and times."""
        key = hashlib.sha256()
        for path in [*subject.channels, subject.mask, *([subject.lesion] if subject.lesion
                                                        else [])]:
            stat = os.stat(path)
            key.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return self.directory / f"{subject.name}_{key.hexdigest()[:16]}.npy"

    def get(self, subject: SubjectImages) -> np.ndarray:
        """``(C + 1, X, Y, Z)`` float32 memory map: valid channels (0 elsewhere), then the mask.

        The mask is 1 in valid voxels, 2 in the annotated lesions of an annotated subject
        (``subject.lesion``), 0 elsewhere.
        """
        path = self.path(subject)
        if not path.is_file():
            image, mask = subject.load()
            valid = valid_voxels(image, mask)
            label = valid.float()
            lesion = subject.load_lesion()
            if lesion is not None:
                label = label + (lesion & valid).float()
            array = torch.cat([torch.where(valid, image, 0.0), label[None]]).numpy()
            self.directory.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.part")
            with open(partial, "wb") as stream:
                np.save(stream, array.astype(np.float32))
            partial.replace(path)
        return np.load(path, mmap_mode="r")


class SliceDataset(Dataset):
    """Axial slices (``context`` 0) or 2.5D stacks of neighbouring slices, padded.

    An item is ``(input, target, mask)``: ``(C * (2 context + 1), *shape)``, ``(C, *shape)``
    and ``(1, *shape)`` float32 tensors, the target being the centre slice.

    Parameters
    ----------
    volumes : list of numpy.ndarray
        Cached subjects from :meth:`VolumeCache.get`.
    shape : tuple of int
        Padded in-plane shape.
    context : int
        Neighbouring slices on each side, as extra input channels.
    """

    def __init__(self, volumes: list[np.ndarray], shape: tuple[int, int], context: int = 0
                 ) -> None:
        self.volumes = volumes
        self.shape = shape
        self.context = context
        self.index: list[tuple[int, int]] = []
        for number, volume in enumerate(volumes):
            counts = np.asarray(volume[-1]).sum(axis=(0, 1))
            keep = np.flatnonzero(counts >= MIN_SLICE_FRACTION * counts.max())
            self.index.extend((number, int(z)) for z in keep)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        number, z = self.index[key % len(self)]
        volume = self.volumes[number]
        depth = volume.shape[-1]
        k = self.context
        block = np.zeros((volume.shape[0], *volume.shape[1:3], 2 * k + 1), dtype=np.float32)
        low, high = max(0, z - k), min(depth, z + k + 1)
        block[..., low - (z - k):high - (z - k)] = volume[..., low:high]
        block = torch.from_numpy(block)
        channels = block[:-1]
        stacked = window_channels(channels)
        target = channels[..., k]
        mask = block[-1:, ..., k]
        return tuple(pad_to(t, self.shape)[0] for t in (stacked, target, mask))


class PatchDataset(Dataset):
    """Random 3D patches whose centres lie in the brain, ``per_volume`` per subject per epoch.

    Items are ``(input, target, mask)`` with ``input`` = ``target`` = ``(C, *patch)``.
    A key ``epoch * len(dataset) + index`` selects patch ``index`` of ``epoch``: each epoch
    draws new patches.
    """

    def __init__(self, volumes: list[np.ndarray], patch: tuple[int, int, int], per_volume: int,
                 seed: int) -> None:
        self.volumes = volumes
        self.patch = patch
        self.per_volume = per_volume
        self.seed = seed
        self.centres = [np.argwhere(np.asarray(v[-1]) > 0) for v in volumes]

    def __len__(self) -> int:
        return len(self.volumes) * self.per_volume

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, item = divmod(key, len(self))
        number = item // self.per_volume
        volume = self.volumes[number]
        rng = np.random.default_rng((self.seed, epoch, item))
        centre = self.centres[number][rng.integers(len(self.centres[number]))]
        size = np.asarray(self.patch)
        start = np.clip(centre - size // 2, 0, np.maximum(np.asarray(volume.shape[1:]) - size, 0))
        region = tuple(slice(int(s), int(s + n)) for s, n in zip(start, size, strict=True))
        block = torch.from_numpy(np.array(volume[(slice(None), *region)], dtype=np.float32))
        block = pad_to(block, self.patch)[0]
        channels = block[:-1]
        return channels, channels, block[-1:]
