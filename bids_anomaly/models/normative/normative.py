"""Voxel-wise normative model: robust location and spread per template voxel and channel.

Without covariates, the location and spread of a voxel are the median and MAD of the healthy
subjects. With ``--covariates`` (participants.tsv columns such as age and sex) and/or
``--site-column``, they are functions of the participant's covariates and site
(:mod:`bids_anomaly.models.normative.norms`): a z-score then says how unusual a voxel is for someone
of this age and sex on this scanner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bids_anomaly.config import option
from bids_anomaly.errors import UsageError
from bids_anomaly.imaging.normalization import IQR_TO_SD
from bids_anomaly.models.contract import BaseModel, register
from bids_anomaly.models.data import TrainingData
from bids_anomaly.models.directions import (
    DirectionOptions,
    check_channels,
    describe,
    directed,
    parse_directions,
)
from bids_anomaly.models.normative.covariates import CovariateError
from bids_anomaly.models.normative.norms import CovariateNorms, covariate_frame

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

MAD_TO_SD = 1.4826
"""Median absolute deviation of a Gaussian, in standard deviations."""


IQR_SAMPLES = 1_000_000
"""Most voxel values per channel read for its interquartile range (an even stride)."""


def channel_robust_sd(values: torch.Tensor) -> torch.Tensor:
    """Robust standard deviation (IQR / 1.349) of each channel over subjects and voxels.

    NaN marks voxels outside the brain. For channels normalised to a robust z-score by
    preprocessing (:func:`bids_anomaly.imaging.normalization.robust_zscore`) it is about 1; for a
    diffusion map it carries the map's units.

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
        ranges.append(float(high - low) / IQR_TO_SD if high > low else 1.0)
    return torch.tensor(ranges, dtype=values.dtype)


def degrees_of_freedom(value: str) -> str:
    """``--covariate-df``: "auto" or a number of basis functions from 1 to 8."""
    if value == "auto" or (value.isdigit() and 1 <= int(value) <= 8):
        return value
    import argparse

    raise argparse.ArgumentTypeError(f"{value!r} is not auto or a whole number from 1 to 8")


@dataclass
class CovariateOptions:
    """Covariates and sites of the normative model (:mod:`bids_anomaly.models.normative.norms`)."""

    covariates: list[str] = option(
        help="participants.tsv columns the norms depend on, e.g. age sex: numeric columns as "
             "B-splines (--covariate-df), others as categories; each participant is scored "
             "against the norms of its own values", factory=list, flags=("--covariates",),
        nargs="+", metavar="COLUMN")
    site_column: str | None = option(
        help="participants.tsv column of each participant's site or scanner: a random "
             "intercept and scale per site (new sites: train --transfer)",
        flags=("--site-column",), metavar="COLUMN")
    covariate_df: str = option(
        "auto", "basis functions of each numeric covariate: 1 linear, 2 quadratic, 3 cubic, "
                "4-8 cubic B-spline; auto: one per 15 training subjects, 1 to 4 (default: "
                "{default})", flags=("--covariate-df",), type=degrees_of_freedom,
        metavar="N|auto")
    heteroscedastic: str = option(
        "auto", "whether the voxels' spread depends on the covariates too (yes), only on the "
                "site (no), or yes from 30 training subjects on (auto, default)",
        flags=("--heteroscedastic",), choices=("auto", "yes", "no"))


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
        Floor of the spread, as a fraction of the channel's robust standard deviation (IQR /
        1.349) over the training brains: 0.1 normalised units for the anatomical channels
        (robust z-scores, whose IQR is 1.349), and the same share of a diffusion map's spread
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
    options = (DirectionOptions, CovariateOptions)
    options_scope = "training a normative model"

    def __init__(self, min_fraction: float = 0.5, min_spread: float = 0.1,
                 spread_sigma: float = 1.0, direction: list[str] | dict | None = None,
                 channels: list[str] | None = None, covariates: list[str] | None = None,
                 site_column: str | None = None, covariate_df: str | int = "auto",
                 heteroscedastic: str = "auto", site_shrinkage: float = 0.1,
                 site_scale_shrinkage: float = 0.5) -> None:
        super().__init__()
        self.min_fraction = min_fraction
        self.min_spread = min_spread
        self.spread_sigma = spread_sigma
        self.direction = parse_directions(direction)
        self.channels = list(channels) if channels else None
        self.covariates = list(covariates or [])
        self.site_column = site_column
        self.covariate_df = covariate_df
        self.heteroscedastic = heteroscedastic
        self.site_shrinkage = site_shrinkage
        self.site_scale_shrinkage = site_scale_shrinkage
        self.location: torch.Tensor | None = None
        self.spread: torch.Tensor | None = None
        self.support: torch.Tensor | None = None
        self.norms: CovariateNorms | None = None
        self._description: dict | None = None

    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False) -> NormativeModel:
        """A model with the run's ``--direction``, covariates and site column."""
        given = settings.model.options
        return cls(direction=given.get("direction"), covariates=given.get("covariates"),
                   site_column=given.get("site_column"),
                   covariate_df=given.get("covariate_df", "auto"),
                   heteroscedastic=given.get("heteroscedastic", "auto"))

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """Directions must parse; the covariate options need covariates or sites.

        Raises
        ------
        UsageError
            A direction that is not ``CHANNEL:SIGN``, a column named twice, or
            ``--covariate-df``/``--heteroscedastic`` without covariates.
        """
        parse_directions(given.get("direction"))
        covariates = list(given.get("covariates") or [])
        site = given.get("site_column")
        if len(set(covariates)) != len(covariates):
            raise UsageError(f"--covariates {' '.join(covariates)}: a column is named twice")
        if site and site in covariates:
            raise UsageError(f"--site-column {site} is also one of --covariates")
        if not (covariates or site) and (
                given.get("covariate_df", "auto") != "auto"
                or given.get("heteroscedastic", "auto") != "auto"):
            raise UsageError("--covariate-df and --heteroscedastic need --covariates or "
                             "--site-column")

    @property
    def needs_covariates(self) -> bool:
        """Whether a participant is scored against norms of its own covariates (:meth:`given`)."""
        return bool(self.covariates or self.site_column)

    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar."""
        if self.needs_covariates:
            given = ", ".join([*self.covariates, *([self.site_column] if self.site_column
                                                   else [])])
            return (f"max over channels of the {describe(self.channels, self.direction)} "
                    f"(x - expected) / predictive sd, expected value and sd of healthy "
                    f"subjects with the participant's {given} (location-scale regression)")
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
        if self.needs_covariates:  # nor do models without covariates
            values.update(covariates=self.covariates, site_column=self.site_column,
                          covariate_df=self.covariate_df,
                          heteroscedastic=self.heteroscedastic,
                          site_shrinkage=self.site_shrinkage,
                          site_scale_shrinkage=self.site_scale_shrinkage, channels=self.channels)
        return values

    def stored_hyperparameters(self) -> dict:
        """The hyperparameters, and the fitted norms' encoding and sites."""
        values = dict(self.hyperparameters)
        if self.norms is not None:
            values["norms"] = self.norms.description()
        return values

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict) -> NormativeModel:
        """An unfitted model; the stored norms' description waits for :meth:`restore`."""
        values = dict(hyperparameters)
        description = values.pop("norms", None)
        model = cls(**values)
        model._description = description
        return model

    @property
    def n_channels(self) -> int | None:
        """Channels the fitted model takes (None before fitting)."""
        if self.norms is not None:
            return int(self.norms.location.shape[1])
        return None if self.location is None else int(self.location.shape[0])

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The template grid the model was fitted on (None before fitting)."""
        if self.norms is not None:
            return tuple(self.norms.support.shape)
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
        if self.needs_covariates:
            self._fit_norms(data)
            return
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
        floor = self.min_spread * channel_robust_sd(values)[:, None, None, None]
        self.location = torch.nan_to_num(location) * support
        self.spread = torch.maximum(variance.sqrt(), floor) * support + (1 - support)

    def check_covariates(self, rows: list[dict | None], names: list[str]) -> None:
        """Refuse the training participants' covariates before any work (exit 65).

        Parameters
        ----------
        rows : list of dict or None
            Each training subject's participants.tsv row (None: no row).
        names : list of str
            Their names, for the messages.

        Raises
        ------
        CovariateError
            A missing row, column or value, text in a numeric column, a covariate that does
            not vary.
        """
        from bids_anomaly.models.normative.covariates import CovariateEncoder

        table = covariate_frame(rows, names)
        CovariateEncoder.from_table(table, self.covariates, self.site_column, self.covariate_df)

    def _fit_norms(self, data: TrainingData) -> None:
        """Fit the covariate- and site-aware norms (:class:`CovariateNorms`)."""
        from bids_anomaly.models.normative.covariates import CovariateEncoder

        table = covariate_frame([s.covariates for s in data.subjects], data.names)
        encoder = CovariateEncoder.from_table(table, self.covariates, self.site_column,
                                              self.covariate_df)
        tissue = data.load_regions().cpu()
        hetero = {"yes": True, "no": False}.get(self.heteroscedastic)
        self.norms = CovariateNorms.fit(
            data.subjects, self.channels, tissue, encoder, table,
            min_fraction=self.min_fraction, min_spread=self.min_spread,
            spread_sigma=self.spread_sigma, site_shrinkage=self.site_shrinkage,
            scale_shrinkage=self.site_scale_shrinkage, heteroscedastic=hetero, device=data.device)
        self.fit_report = self._norms_report()

    def _norms_report(self) -> dict:
        """The design and the median coefficients over the support, for the model card."""
        norms = self.norms
        columns = [*norms.encoder.columns, *[f"site[{s}]" for s in norms.encoder.sites]]
        median = norms.location.median(dim=2).values
        return {"design": columns, "sites": norms.site_counts,
                "heteroscedastic": bool((norms.log_variance[1:len(norms.encoder.columns)] != 0)
                                        .any()),
                "support_voxels": int(norms.support.sum()),
                "median_location_coefficients": {
                    channel: dict(zip(columns, (float(v) for v in median[:, c]), strict=True))
                    for c, channel in enumerate(self.channels)}}

    def given(self, covariates: dict | None, extrapolate: bool = False) -> NormativeModel:
        """The norms of one participant: a model without covariates that scores it.

        Parameters
        ----------
        covariates : dict
            The participant's participants.tsv row (column to value).
        extrapolate : bool
            Accept numeric covariates outside the training range.

        Raises
        ------
        CovariateError
            No row, a missing or impossible value, an unknown site, or (without
            ``extrapolate``) an age outside the training range.
        """
        if self.norms is None:
            raise RuntimeError("the model is not fitted")
        if covariates is None:
            raise CovariateError(f"the participant has no row in participants.tsv, so its "
                                 f"{', '.join(self.norms.encoder.needed)} are unknown")
        location, sd, _, _ = self.norms.predict(covariates, extrapolate)
        support = self.norms.support
        model = NormativeModel(self.min_fraction, self.min_spread, self.spread_sigma,
                               self.direction, self.channels)
        shape = (len(self.channels), *support.shape)
        model.location = torch.zeros(shape)
        model.spread = torch.ones(shape)
        model.location[:, support] = location
        model.spread[:, support] = sd
        model.support = support
        return model

    def normative_outputs(self, image: torch.Tensor, mask: torch.Tensor, covariates: dict | None,
                          extrapolate: bool = False):
        """A participant's per-channel z-maps and regional table (covariate models only).

        Returns
        -------
        z : torch.Tensor
            ``(C, X, Y, Z)``, 0 outside the mask and the support.
        table : pandas.DataFrame
            :meth:`CovariateNorms.regional_table`.
        scorer : NormativeModel
            :meth:`given`'s model of the participant, whose score is the anomaly map.
        """
        from bids_anomaly.models.data import valid_voxels

        scorer = self.given(covariates, extrapolate)
        device = image.device
        z = (image - scorer.location.to(device)) / scorer.spread.to(device)
        z = torch.where(mask & scorer.support.to(device), z, 0.0)
        table = self.norms.regional_table(image, valid_voxels(image, mask), self.channels,
                                          covariates, extrapolate)
        return z, table, scorer

    def accept(self, data: TrainingData) -> None:
        """Accept the covariates of ``data`` (the calibration controls) without extrapolating."""
        if self.norms is not None:
            table = covariate_frame([s.covariates for s in data.subjects], data.names)
            self.norms.encoder.accept(table)

    def transfer(self, data: TrainingData) -> list[str]:
        """Adapt the norms to the new sites of ``data`` (their controls), in place.

        Returns
        -------
        list of str
            The sites added.
        """
        table = covariate_frame([s.covariates for s in data.subjects], data.names)
        added = self.norms.transfer(data.subjects, table, spread_sigma=self.spread_sigma,
                                    device=data.device)
        self.fit_report = self._norms_report()
        return added

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Largest directed robust z-score over channels, 0 outside mask and support."""
        if self.norms is not None:
            raise RuntimeError("a normative model with covariates scores a participant "
                               "through given(covariates)")
        if self.location is None:
            raise RuntimeError("the model is not fitted")
        device = image.device
        z = (image - self.location.to(device)) / self.spread.to(device)
        score = directed(z, self.channels, self.direction).amax(dim=0)
        return torch.where(mask & self.support.to(device), score, 0.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Location, spread and support (the norms' coefficients with covariates)."""
        if self.norms is not None:
            return self.norms.tensors()
        return {"location": self.location, "spread": self.spread,
                "support": self.support.to(torch.uint8)}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set location, spread and support (or the norms)."""
        if self.needs_covariates:
            self.norms = CovariateNorms.restore(tensors, self._description)
            return
        self.location = tensors["location"]
        self.spread = tensors["spread"]
        self.support = tensors["support"].bool()
