"""Siamese patch autoencoder: small multi-modal patches to codes that are similar across brains.

The representation of Alaverdyan et al. (Medical Image Analysis 2020) and Pinon et al. (ISBI
2023): two weight-sharing convolutional autoencoders see a *pair* of patches taken at the same
template location in two different subjects; the loss of a pair is

    ||x1 - x1_hat||^2 + ||x2 - x2_hat||^2 - alpha * cos(z1, z2)

(summed squared errors per patch, no dissimilar pairs), so that a code describes the local
anatomy of a location rather than the subject. Weight sharing is one network applied to both
patches.

Patches are ``side x side`` axial squares, centred on a voxel, with ``slices`` neighbouring
axial slices (1: 2D patches, 3: 15x15x3-style patches) and the modalities as input channels
(channel ``c * slices + offset``, the order of :func:`~.datasets.window_channels`). Intensities
are scaled per channel to [0, 1] between a low value and the 99th percentile (:func:`scaling`):
per image and clipped, as Alaverdyan et al., or with bounds learnt from the training cohort and
not clipped, as Pinon et al.'s ``(x - q1) / (q99 - q1)``; voxels outside the brain are 0.

The encoder is Pinon et al.'s: valid convolutions with kernels 5, 3, 3, 3 and strides 1, 1, 3, 1,
GELU and batch normalisation (MONAI ``Convolution`` blocks), which take a 15 x 15 patch to a
1 x 1 code; layers that no longer fit a smaller patch are left out, and whatever spatial extent
remains is flattened into a linear layer to the code. The decoder mirrors it with transposed
convolutions and ends in a sigmoid (the inputs lie in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from bids_anomaly.models.deep.datasets import window_channels

KERNELS = (5, 3, 3, 3)
STRIDES = (1, 1, 3, 1)
TOP_FRACTION = 0.01
"""Brightest fraction of brain voxels clipped away before scaling to [0, 1]."""


def scaling(volume: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor,
            low_quantile: float = 0.0) -> np.ndarray:
    """Per-channel ``(low, high)`` of a ``(C, X, Y, Z)`` image's brain voxels.

    ``high`` is their 99th percentile (the top 1 % removed), ``low`` their ``low_quantile``
    (0: the minimum, the papers' per-image scaling); channels that are constant in the brain get
    ``high = low + 1``.

    Returns
    -------
    numpy.ndarray
        ``(C, 2)`` float64.
    """
    volume = np.asarray(volume)
    inside = np.asarray(mask) > 0
    bounds = np.zeros((volume.shape[0], 2))
    for channel in range(volume.shape[0]):
        values = np.asarray(volume[channel])[inside]
        if values.size == 0:
            bounds[channel] = (0.0, 1.0)
            continue
        low, high = np.quantile(values, [low_quantile, 1 - TOP_FRACTION])
        bounds[channel] = (low, high if high > low else low + 1.0)
    return bounds


def scaled(volume: torch.Tensor, mask: torch.Tensor, bounds: np.ndarray | torch.Tensor,
           clip: bool = True) -> torch.Tensor:
    """``(C, ...)`` values mapped by ``bounds`` (``(C, 2)``) to [0, 1], 0 outside ``mask``.

    ``clip``: values beyond the bounds are clipped (per-image scaling); otherwise they keep
    going beyond 0 and 1 (cohort bounds, where a lesion brighter than every control stays so).
    """
    bounds = torch.as_tensor(bounds, dtype=torch.float32, device=volume.device)
    shape = (-1,) + (1,) * (volume.dim() - 1)
    low, high = bounds[:, 0].reshape(shape), bounds[:, 1].reshape(shape)
    values = (volume - low) / (high - low)
    if clip:
        values = values.clamp(0.0, 1.0)
    return torch.where(mask.bool(), values, 0.0)


def patch_at(volume: np.ndarray, centre: tuple[int, int, int], side: int, slices: int
             ) -> torch.Tensor:
    """The ``(C * slices, side, side)`` patch of ``volume`` (``(C, X, Y, Z)``) at ``centre``.

    Zero beyond the volume's edges; the same values as :func:`brain_patches` gives.
    """
    half, depth = side // 2, slices // 2
    spatial = volume.shape[1:]
    block = np.zeros((volume.shape[0], side, side, slices), dtype=np.float32)
    source, target = [], []
    for centre_i, size, extent, reach in zip(centre, spatial, (side, side, slices),
                                             (half, half, depth), strict=True):
        low, high = centre_i - reach, centre_i - reach + extent
        source.append(slice(max(low, 0), min(high, size)))
        target.append(slice(max(low, 0) - low, min(high, size) - low))
    block[(slice(None), *target)] = volume[(slice(None), *source)]
    return window_channels(torch.from_numpy(block))


def brain_patches(volume: torch.Tensor, coordinates: torch.Tensor, side: int, slices: int
                  ) -> torch.Tensor:
    """Patches centred on ``coordinates`` (``(N, 3)``) of a ``(C, X, Y, Z)`` volume.

    Returns ``(N, C * slices, side, side)``, gathered from a strided view of the zero-padded
    volume (no copy of the whole set of patches is made beyond the ``N`` asked for).
    """
    half, depth = side // 2, slices // 2
    padded = F.pad(volume, (depth, depth, half, half, half, half))
    windows = padded.unfold(1, side, 1).unfold(2, side, 1).unfold(3, slices, 1)
    x, y, z = coordinates.unbind(dim=1)
    picked = windows[:, x, y, z]  # (C, N, side, side, slices)
    return window_channels(picked.movedim(1, 0))


@dataclass
class PatchArchitecture:
    """What the siamese autoencoder is built from (stored in the model directory)."""

    in_channels: int
    side: int
    code_size: int = 16
    filters: tuple[int, ...] = (3, 4, 12)

    def layers(self) -> list[tuple[int, int, int, int]]:
        """``(in_size, out_size, kernel, stride)`` of each convolution that fits the patch."""
        size, layers = self.side, []
        for number, (kernel, stride) in enumerate(zip(KERNELS, STRIDES, strict=True)):
            if size < kernel or number > len(self.filters):
                break
            out = (size - kernel) // stride + 1
            layers.append((size, out, kernel, stride))
            size = out
        return layers


class SiamesePatchAutoEncoder(nn.Module):
    """The patch autoencoder; one instance encodes both patches of a pair (shared weights).

    ``forward(x)`` returns ``(reconstruction, code)`` of ``(B, C, side, side)`` patches.
    """

    def __init__(self, architecture: PatchArchitecture) -> None:
        from monai.networks.blocks import Convolution

        super().__init__()
        self.architecture = architecture
        layers = architecture.layers()
        if not layers:
            raise ValueError(f"a patch side of {architecture.side} is smaller than the first "
                             f"kernel ({KERNELS[0]})")
        channels = [architecture.in_channels, *architecture.filters, architecture.code_size]
        widths = channels[:len(layers) + 1]
        last_is_code = len(layers) == len(KERNELS) and layers[-1][1] == 1
        if last_is_code:
            widths[-1] = architecture.code_size
        encoder: list[nn.Module] = []
        for number, (_, _, kernel, stride) in enumerate(layers):
            encoder.append(Convolution(2, widths[number], widths[number + 1], strides=stride,
                                       kernel_size=kernel, padding=0, act="GELU",
                                       norm="BATCH"))
        self.encoder = nn.Sequential(*encoder)
        self.inner = (widths[-1], layers[-1][1], layers[-1][1])
        flat = int(np.prod(self.inner))
        self.to_code = (nn.Identity() if last_is_code
                        else nn.Linear(flat, architecture.code_size))
        self.from_code = (nn.Identity() if last_is_code
                          else nn.Sequential(nn.Linear(architecture.code_size, flat), nn.GELU()))
        decoder: list[nn.Module] = []
        for number in reversed(range(len(layers))):
            size_in, size_out, kernel, stride = layers[number]
            output_padding = size_in - ((size_out - 1) * stride + kernel)
            out_channels = widths[number]
            final = number == 0
            decoder.append(Convolution(2, widths[number + 1], out_channels, strides=stride,
                                       kernel_size=kernel, padding=0, is_transposed=True,
                                       output_padding=output_padding, act=None if final
                                       else "GELU", norm=None if final else "BATCH",
                                       conv_only=final))
        self.decoder = nn.Sequential(*decoder)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, code_size)`` codes of ``(B, C, side, side)`` patches."""
        return self.to_code(self.encoder(patches).flatten(1))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Patches in [0, 1] from codes."""
        inner = self.from_code(codes).reshape(codes.shape[0], *self.inner)
        return torch.sigmoid(self.decoder(inner))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, code)``."""
        codes = self.encode(patches)
        return self.decode(codes), codes


def siamese_loss(module: nn.Module, batch: tuple[torch.Tensor, ...], alpha: float
                 ) -> torch.Tensor:
    """Mean over pairs of both patches' summed squared errors minus ``alpha`` cos(z1, z2)."""
    first, second = batch[0], batch[1]
    recon, codes = module(torch.cat([first, second]))
    errors = ((recon.float() - torch.cat([first, second])) ** 2).flatten(1).sum(dim=1)
    z1, z2 = codes.float().chunk(2)
    similarity = F.cosine_similarity(z1, z2, dim=1)
    pair_error = errors[:len(first)] + errors[len(first):]
    return (pair_error - alpha * similarity).mean()


class PairDataset(Dataset):
    """Pairs of patches at one location in two subjects, ``per_subject`` per subject and epoch.

    The first patch comes from subject ``index[i]`` (at one of its brain voxels), the second from
    another subject of ``partners`` at the same voxel. A key ``epoch * len + item`` draws
    everything from ``(seed, epoch, item)`` only, as the deep engine requires.

    Parameters
    ----------
    volumes : list of numpy.ndarray
        Cached ``(C + 1, X, Y, Z)`` subjects (channels, then the mask) of the whole cohort.
    bounds : list of numpy.ndarray
        Each subject's :func:`scaling` bounds (clipped to [0, 1] when ``clip``).
    index : list of int
        Subjects that give the first patch of a pair.
    partners : list of int
        Subjects that may give the second (never the first's own, unless it is the only one).
    """

    def __init__(self, volumes: list[np.ndarray], bounds: list[np.ndarray], index: list[int],
                 partners: list[int], side: int, slices: int, per_subject: int, seed: int,
                 clip: bool = True) -> None:
        self.volumes = volumes
        self.bounds = bounds
        self.clip = clip
        self.index = list(index)
        self.partners = list(partners)
        self.side = side
        self.slices = slices
        self.per_subject = per_subject
        self.seed = seed
        self.centres = {i: np.argwhere(np.asarray(volumes[i][-1]) > 0) for i in self.index}

    def __len__(self) -> int:
        return len(self.index) * self.per_subject

    def _patch(self, subject: int, centre: tuple[int, int, int]) -> torch.Tensor:
        volume = self.volumes[subject]
        patch = patch_at(volume, centre, self.side, self.slices)
        channels = volume.shape[0] - 1
        values = patch[:channels * self.slices]
        mask = patch[channels * self.slices:]
        bounds = np.repeat(self.bounds[subject], self.slices, axis=0)  # row c * slices + o
        return scaled(values, mask.repeat(channels, 1, 1), bounds, self.clip)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, item = divmod(key, len(self))
        first = self.index[item // self.per_subject]
        rng = np.random.default_rng((self.seed, epoch, item))
        choices = [p for p in self.partners if p != first] or [first]
        second = choices[int(rng.integers(len(choices)))]
        centres = self.centres[first]
        centre = tuple(int(v) for v in centres[int(rng.integers(len(centres)))])
        return self._patch(first, centre), self._patch(second, centre)
