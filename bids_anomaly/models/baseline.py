"""Intensity thresholding: the classic baseline that flags unusually bright (or dark) voxels.

A voxel's score is a robust z-score of one channel against the brain of the same image, so
nothing is learned from healthy subjects: the model only remembers which channel to look at and
in which direction. It is the reference every learned model has to beat, in particular for
white-matter lesions on FLAIR.
"""

from __future__ import annotations

import torch

from bids_anomaly.errors import BadDataError
from bids_anomaly.models.contract import BaseModel, register
from bids_anomaly.models.data import TrainingData
from bids_anomaly.models.normative.normative import MAD_TO_SD

DIRECTIONS = ("hyper", "hypo", "both")
LESION_CONTRASTS = (("FLAIR", "hyper"), ("T2w", "hyper"), ("PDw", "hyper"), ("T1w", "hypo"))
"""The contrast the baseline thresholds, in order of preference, and where lesions lie on it."""


def lesion_contrast(channels: list[str]) -> tuple[int, str]:
    """The channel index and direction of the lesion contrast among ``channels``.

    FLAIR bright, else T2w or PDw bright, else T1w dark, else the first channel both ways.

    >>> lesion_contrast(["T1w", "FLAIR"])
    (1, 'hyper')
    >>> lesion_contrast(["T1w"])
    (0, 'hypo')
    """
    for name, direction in LESION_CONTRASTS:
        if name in channels:
            return channels.index(name), direction
    return 0, "both"


def robust_z_score(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Robust z-score of ``values`` against the voxels inside ``mask``, 0 outside.

    Parameters
    ----------
    values : torch.Tensor
        ``(X, Y, Z)`` intensities of one channel.
    mask : torch.Tensor
        ``(X, Y, Z)`` boolean brain mask on the same grid.

    Returns
    -------
    torch.Tensor
        float32 ``(x - median) / (1.4826 MAD)``, median and MAD taken over the masked voxels;
        all zeros when the mask is empty.

    Raises
    ------
    BadDataError
        The channel is constant inside the mask (MAD 0), so it has no intensity scale.

    Examples
    --------
    >>> import torch
    >>> values = torch.tensor([[[1.0, 2.0, 3.0, 100.0]]])
    >>> [round(z, 3) for z in robust_z_score(values, values < 50).flatten().tolist()]
    [-0.674, 0.0, 0.674, 0.0]
    """
    values = values.to(torch.float32)
    if not mask.any():
        return torch.zeros_like(values)
    brain = values[mask]
    median = brain.median()
    spread = MAD_TO_SD * (brain - median).abs().median()
    if spread == 0:
        raise BadDataError("the channel is constant inside most of the brain mask (MAD 0): "
                           "check that the image is not empty or saturated")
    return torch.where(mask, (values - median) / spread, 0.0)


@register
class IntensityBaseline(BaseModel):
    """Robust z-score of one channel within each image's own brain; no learning.

    Parameters
    ----------
    channel : int
        Index, into the model's channels, of the image to threshold (e.g. FLAIR).
    direction : {"hyper", "hypo", "both"}
        Which deviations are anomalous: brighter (``+z``), darker (``-z``) or both (``|z|``).

    Raises
    ------
    ValueError
        A negative channel or an unknown direction.
    """

    model_type = "intensity"
    summary = "robust z-score of one channel within each image's own brain (the baseline)"
    calibration_only = True  # nothing is learnt: every training subject calibrates
    needs_training = False
    score_definition = ("sign * (x - median) / (1.4826 MAD) of one channel, median and MAD over "
                        "the image's own brain voxels; sign +1 hyper, -1 hypo, |z| both")

    def __init__(self, channel: int = 0, direction: str = "hyper") -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, "
                             f"not {direction!r}")
        if channel < 0:
            raise ValueError(f"channel must be a non-negative index, not {channel}")
        super().__init__()
        self.channel = int(channel)
        self.direction = direction

    @classmethod
    def untrained(cls, channels: list[str], random_seed: int = 0) -> IntensityBaseline:
        """The baseline of the lesion contrast among ``channels`` (:func:`lesion_contrast`)."""
        channel, direction = lesion_contrast(channels)
        return cls(channel=channel, direction=direction)

    @property
    def hyperparameters(self) -> dict:
        """Settings needed to rebuild the model."""
        return {"channel": self.channel, "direction": self.direction}

    def fit(self, data: TrainingData) -> None:
        """Learn nothing; check that ``data`` has the channel to threshold.

        Raises
        ------
        ValueError
            ``channel`` is not an index into ``data.channels``.
        """
        if self.channel >= len(data.channels):
            raise ValueError(
                f"the intensity baseline thresholds channel {self.channel}, but the data have "
                f"only {len(data.channels)} channels ({', '.join(data.channels) or 'none'})"
            )

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Signed robust z-score of the chosen channel, 0 outside ``mask``.

        Parameters
        ----------
        image : torch.Tensor
            ``(C, X, Y, Z)`` float image.
        mask : torch.Tensor
            ``(X, Y, Z)`` boolean brain mask.

        Returns
        -------
        torch.Tensor
            ``(X, Y, Z)`` float32 scores on ``image.device``.
        """
        if self.channel >= image.shape[0]:
            raise BadDataError(f"the baseline reads channel {self.channel}, which does not "
                               f"exist in an image with {image.shape[0]} channel(s)")
        z = robust_z_score(image[self.channel], mask.to(image.device))
        if self.direction == "hypo":
            return -z
        if self.direction == "both":
            return z.abs()
        return z

    def tensors(self) -> dict[str, torch.Tensor]:
        """The channel index (everything else is a hyperparameter)."""
        return {"channel": torch.tensor([self.channel])}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Nothing to restore: the hyperparameters rebuild the model."""
