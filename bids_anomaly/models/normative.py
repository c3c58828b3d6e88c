"""Voxel-wise normative model: robust location and spread per template voxel and channel."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bids_anomaly.models.base import BaseModel, TrainingData, register
from bids_anomaly.models.directions import (
    DirectionOptions,
    check_channels,
    describe,
    directed,
    parse_directions,
)

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

MAD_TO_SD = 1.4826
"""Median absolute deviation of a Gaussian, in standard deviations."""


IQR_SAMPLES = 1_000_000
"""Most voxel values per channel read for its interquartile range (an even stride)."""


def channel_iqr(values: torch.Tensor) -> torch.Tensor:
    """Interquartile range of each channel over subjects and voxels (NaN: outside the brain).

    Parameters
    ----------
    values : torch.Tensor
        ``(subjects, channels, X, Y, Z)``.

    Returns
    -------
    torch.Tensor
        ``(channels,)``; 1 for a channel without spread (so that the floor stays finite).
    """
    ranges = []
    for channel in range(values.shape[1]):
        flat = values[:, channel].reshape(-1)
        flat = flat[~flat.isnan()]
        flat = flat[:: max(1, flat.numel() // IQR_SAMPLES)].double()
        if flat.numel() < 2:
            ranges.append(1.0)
            continue
        low, high = torch.quantile(flat, torch.tensor([0.25, 0.75], dtype=flat.dtype))
        ranges.append(float(high - low) if high > low else 1.0)
    return torch.tensor(ranges, dtype=values.dtype)


@register
class NormativeModel(BaseModel):
    """Per-voxel median and scaled MAD of healthy subjects; scores are robust z-scores.

    The anomaly score of a voxel is its largest robust z-score over channels, each in its
    direction (absolute by default; ``--direction FLAIR:+ T1w:-`` keeps only brighter FLAIR and
    darker T1w): how many healthy standard deviations the most deviant channel is from the
    healthy median.

    With few training subjects a voxel's MAD is unstable (a few subjects agreeing by chance give
    a spread near 0 and huge z-scores), so the squared spread is pooled over a Gaussian
    neighbourhood (normalised convolution inside the supported voxels) before use.

    Parameters
    ----------
    min_fraction : float
        Voxels inside fewer than this fraction of the training brain masks (and fewer than 2)
        get no score (0): the brain's edge, where subjects disagree on what is brain.
    min_spread : float
        Floor of the spread, as a fraction of the channel's interquartile range over the
        training brains: about 0.1 normalised units for the anatomical channels (robust
        z-scores, IQR 1 per subject), and the same share of the range of a diffusion map
        whatever its units or scaling.
    spread_sigma : float
        Standard deviation, in voxels, of the Gaussian pooling of the spread (0: none).
    direction : list of str or dict, optional
        Per-channel directions (see :mod:`bids_anomaly.models.directions`).
    channels : list of str, optional
        The channels' names (set by :meth:`fit`).
    """

    model_type = "normative"
    summary = "voxel-wise median and MAD of healthy subjects; score: largest robust z-score"
    options = (DirectionOptions,)
    options_scope = "training a normative model"

    def __init__(self, min_fraction: float = 0.5, min_spread: float = 0.1,
                 spread_sigma: float = 1.0, direction: list[str] | dict | None = None,
                 channels: list[str] | None = None) -> None:
        super().__init__()
        self.min_fraction = min_fraction
        self.min_spread = min_spread
        self.spread_sigma = spread_sigma
        self.direction = parse_directions(direction)
        self.channels = list(channels) if channels else None
        self.location: torch.Tensor | None = None
        self.spread: torch.Tensor | None = None
        self.support: torch.Tensor | None = None

    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False) -> NormativeModel:
        """A model with the run's ``--direction``."""
        return cls(direction=settings.model.options.get("direction"))

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """Directions must parse.

        Raises
        ------
        UsageError
            A direction that is not ``CHANNEL:SIGN``.
        """
        parse_directions(given.get("direction"))

    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar."""
        if not self.direction:
            return "max over channels of |x - median| / (1.4826 MAD), healthy voxel-wise"
        return (f"max over channels of the directed (x - median) / (1.4826 MAD) "
                f"({describe(self.channels, self.direction)}), healthy voxel-wise")

    @property
    def hyperparameters(self) -> dict:
        """Settings needed to rebuild the model."""
        values = {"min_fraction": self.min_fraction, "min_spread": self.min_spread,
                  "spread_sigma": self.spread_sigma}
        if self.direction:  # models without directions keep their earlier card
            values.update(direction=self.direction, channels=self.channels)
        return values

    @property
    def n_channels(self) -> int | None:
        """Channels the fitted model takes (None before fitting)."""
        return None if self.location is None else int(self.location.shape[0])

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The template grid the model was fitted on (None before fitting)."""
        return None if self.location is None else tuple(self.location.shape[1:])

    def fit(self, data: TrainingData) -> None:
        """Compute the voxel-wise median and MAD over the subjects of ``data``.

        Raises
        ------
        UsageError
            ``direction`` names a channel that ``data`` does not have.
        """
        check_channels(self.direction, list(data.channels))
        self.channels = list(data.channels)
        stack = []
        for image, mask in data:
            stack.append(torch.where(mask, image, torch.nan).cpu())
        values = torch.stack(stack)
        count = (~values.isnan()).sum(dim=0).amin(dim=0)
        self.support = count >= max(2, self.min_fraction * len(stack))
        location = values.nanmedian(dim=0).values
        mad = MAD_TO_SD * (values - location).abs().nanmedian(dim=0).values
        support = self.support.to(values.dtype)
        variance = torch.nan_to_num(mad) ** 2 * support
        if self.spread_sigma > 0:
            from monai.networks.layers import GaussianFilter

            smooth = GaussianFilter(spatial_dims=3, sigma=self.spread_sigma)
            with torch.no_grad():
                pooled = smooth(variance[:, None])[:, 0]
                weight = smooth(support[None, None])[0, 0]
            variance = pooled / weight.clamp_min(1e-6)
        floor = self.min_spread * channel_iqr(values)[:, None, None, None]
        self.location = torch.nan_to_num(location) * support
        self.spread = torch.maximum(variance.sqrt(), floor) * support + (1 - support)

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Largest directed robust z-score over channels, 0 outside mask and support."""
        if self.location is None:
            raise RuntimeError("the model is not fitted")
        device = image.device
        z = (image - self.location.to(device)) / self.spread.to(device)
        score = directed(z, self.channels, self.direction).amax(dim=0)
        return torch.where(mask & self.support.to(device), score, 0.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Location, spread and support."""
        return {"location": self.location, "spread": self.spread,
                "support": self.support.to(torch.uint8)}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set location, spread and support."""
        self.location = tensors["location"]
        self.spread = tensors["spread"]
        self.support = tensors["support"].bool()
