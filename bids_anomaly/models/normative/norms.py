"""Covariate- and site-aware norms: every voxel's and region's healthy range for a participant.

The fitted state of ``train --model-type normative --covariates ... [--site-column ...]``:
for each channel, at every voxel the normative model could score (its support) and for each
region (the whole brain and the template's tissue classes), the coefficients of a
heteroscedastic location-scale regression on the covariates with site random effects
(:mod:`bids_anomaly.models.normative.location_scale`), the design's encoding
(:class:`~bids_anomaly.models.normative.covariates.CovariateEncoder`) and the scale floor.

:meth:`CovariateNorms.predict` gives a participant's expected value and predictive standard
deviation everywhere; :meth:`CovariateNorms.transfer` adds new sites from a few of their controls
without the original data (the population coefficients stay as they are, only the new sites'
random effects are estimated, shrunk as in the original fit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from bids_anomaly.imaging.normalization import IQR_TO_SD
from bids_anomaly.models.normative.covariates import CovariateEncoder, CovariateError
from bids_anomaly.models.normative.location_scale import fit_location_scale, leverage, predict

HETEROSCEDASTIC_SUBJECTS = 30
"""With ``heteroscedastic`` "auto", the scale depends on the covariates from this many training
subjects on (below, only the sites change the scale: a scale regression on ten subjects is
noise)."""

SITE_SCALE_SIGMA = 3.0
"""Smoothing (voxels) of a transferred site's log-scale offset: estimated from a few controls,
it is noisy voxel by voxel, while a scanner's noise level changes slowly across the brain."""

REGION_NAMES = ("brain", "GM", "WM", "CSF")
"""The regions of the regional norms: the brain, then the template's tissue labels 1, 2, 3."""

NORMS_COLUMNS = {
    "region": {"Description": "brain (the subject's brain mask) or a template tissue class"},
    "channel": {"Description": "the channel measured"},
    "n_voxels": {"Description": "valid voxels of the region in the subject"},
    "value": {"Description": "the channel's mean over the region's valid voxels"},
    "expected": {"Description": "the healthy expected mean for the participant's covariates "
                                "and site"},
    "sd": {"Description": "predictive standard deviation of healthy means for them"},
    "z": {"Description": "(value - expected) / sd"},
    "centile": {"Description": "the healthy centile of the value, 100 * Phi(z)", "Units": "%"},
}
"""Column definitions of ``*_norms.tsv`` (written to its JSON sidecar)."""

IQR_SAMPLES = 100_000
"""Voxel values per subject and channel read for the channel's interquartile range."""


def covariate_frame(rows: list[dict | None], names: list[str]) -> pd.DataFrame:
    """participants.tsv rows (as dicts) of subjects, refusing those without a row.

    Raises
    ------
    CovariateError
        A subject has no row in participants.tsv.
    """
    missing = [name for name, row in zip(names, rows, strict=True) if row is None]
    if missing:
        raise CovariateError(f"{missing[0]} has no row in participants.tsv, so its covariates "
                             "are unknown")
    frame = pd.DataFrame([dict(row) for row in rows])
    frame["participant_id"] = [name.split("_")[0] for name in names]
    return frame


def region_means(image: torch.Tensor, valid: torch.Tensor, tissue: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each channel over the valid voxels of each region, and the voxel counts.

    Returns
    -------
    means : torch.Tensor
        ``(C, R)``, NaN where a region has no valid voxel.
    counts : torch.Tensor
        ``(R,)``.
    """
    masks = [valid] + [valid & (tissue == label) for label in range(1, len(REGION_NAMES))]
    counts = torch.stack([m.sum() for m in masks])
    sums = torch.stack([image[:, m].double().sum(dim=1) for m in masks], dim=1)
    means = sums / counts.clamp_min(1)
    return torch.where(counts > 0, means, torch.nan).float(), counts


def _smooth_on_support(fields: torch.Tensor, support: torch.Tensor, sigma: float) -> torch.Tensor:
    """Normalised Gaussian smoothing of ``(K, N)`` values on the support voxels of a grid."""
    from monai.networks.layers import GaussianFilter

    grid = torch.zeros((fields.shape[0], *support.shape), dtype=torch.float32)
    grid[:, support] = fields.float()
    weight = support.float()
    smooth = GaussianFilter(spatial_dims=3, sigma=sigma)
    with torch.no_grad():
        pooled = smooth(grid[:, None])[:, 0]
        norm = smooth(weight[None, None])[0, 0]
    return (pooled / norm.clamp_min(1e-6))[:, support].to(fields.dtype)


@dataclass
class CovariateNorms:
    """Fitted norms of every support voxel and region, by channel.

    Attributes
    ----------
    encoder : CovariateEncoder
        The design (covariates, their encoding, the sites).
    support : torch.Tensor
        ``(X, Y, Z)`` bool: the voxels with norms.
    location, log_variance : torch.Tensor
        ``(q, C, N)``: coefficients at the ``N`` support voxels (``q``: the design's columns,
        then one per site).
    region_location, region_log_variance : torch.Tensor
        ``(q, C, R)``: the same for the regions' mean values.
    tissue : torch.Tensor
        ``(X, Y, Z)`` uint8: the template's tissue labels the regions were measured in.
    leverage : torch.Tensor
        ``(q, q)``: widens the predictive standard deviation by the uncertainty of the fit.
    floor : torch.Tensor
        ``(C,)``: the smallest standard deviation of a voxel.
    site_counts : dict
        Controls each site's effect was estimated from (transferred sites included).
    fitted_sites : int
        How many of the encoder's sites were fitted with the population (the others were
        added by :meth:`transfer`; ``leverage`` covers the design and the fitted sites).
    shrinkage : tuple of float
        Ridge of the sites' location and log-variance effects, in controls.
    """

    encoder: CovariateEncoder
    support: torch.Tensor
    location: torch.Tensor
    log_variance: torch.Tensor
    region_location: torch.Tensor
    region_log_variance: torch.Tensor
    tissue: torch.Tensor
    leverage: torch.Tensor
    floor: torch.Tensor
    site_counts: dict[str, int] = field(default_factory=dict)
    fitted_sites: int = 0
    shrinkage: tuple[float, float] = (0.1, 0.5)

    # ------------------------------------------------------------------ design
    def design(self, table: pd.DataFrame, extrapolate: bool = False,
               site_index: np.ndarray | None = None) -> torch.Tensor:
        """Design rows (covariates, then site indicators) of participants.tsv rows."""
        covariates = self.encoder.design(table, extrapolate)
        index = self.encoder.site_index(table) if site_index is None else site_index
        sites = np.zeros((len(table), len(self.encoder.sites)))
        for row, site in enumerate(index):
            if site >= 0:
                sites[row, site] = 1.0
        return torch.from_numpy(np.concatenate([covariates, sites], axis=1))

    def _predict(self, location: torch.Tensor, log_variance: torch.Tensor,
                 design: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected values and predictive sds of design rows, ``(n, C, K)`` each.

        The sd is widened by the uncertainty of the fitted prediction, ``sqrt(1 + h)``: ``h``
        from :attr:`leverage` for the fitted sites and the population; for a transferred site,
        whose offset was estimated against the population prediction (so that the population's
        own intercept error cancels), the covariate part of it plus ``1 / (n + shrinkage)``.
        """
        mean, sd = predict(location.double(), log_variance.double(), design)
        p = len(self.encoder.columns)
        q0 = p + self.fitted_sites
        g = self.leverage.double()
        fitted = design[:, :q0]
        h = ((fitted @ g) * fitted).sum(dim=1)
        sites = design[:, q0:]
        for k in range(sites.shape[1]):
            rows = sites[:, k] > 0
            if rows.any():
                count = self.site_counts[self.encoder.sites[self.fitted_sites + k]]
                part = design[rows, 1:p]
                h[rows] = (((part @ g[1:p, 1:p]) * part).sum(dim=1)
                           + 1.0 / (count + self.shrinkage[0]))
        scale = (1 + h).sqrt().reshape(-1, *([1] * (sd.dim() - 1)))
        return mean, sd * scale

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, subjects: list, channels: list[str], tissue: torch.Tensor,
            encoder: CovariateEncoder, table: pd.DataFrame, *, min_fraction: float,
            min_spread: float, spread_sigma: float, site_shrinkage: float,
            scale_shrinkage: float, heteroscedastic: bool | None, iterations: int = 3,
            device: torch.device | str = "cpu") -> CovariateNorms:
        """Fit the voxel and regional norms on ``subjects`` (read once per pass).

        Parameters
        ----------
        subjects : list of SubjectImages
            The training subjects, in the order of the rows of ``table``.
        table : pandas.DataFrame
            Their participants.tsv rows.
        heteroscedastic : bool or None
            Whether the scale depends on the covariates (None: from
            :data:`HETEROSCEDASTIC_SUBJECTS` subjects on).
        """
        from bids_anomaly.models.data import valid_voxels

        n = len(subjects)
        # pass over the masks: the support, and a sample of each channel for its spread
        count = None
        samples: list[list[torch.Tensor]] = [[] for _ in channels]
        regional_values = []  # (C * R,) per subject: small, kept for the regional passes
        for subject in subjects:
            image, mask = subject.load("cpu")
            regional_values.append(region_means(image, valid_voxels(image, mask),
                                                tissue.to(torch.uint8))[0].reshape(-1))
            inside = mask & torch.isfinite(image).all(dim=0)
            count = inside.int() if count is None else count + inside.int()
            for c in range(len(channels)):
                values = image[c][inside]
                samples[c].append(values[:: max(1, values.numel() // IQR_SAMPLES)])
        support = count >= max(2, min_fraction * n)
        iqr = []
        for c in range(len(channels)):
            pooled = torch.cat(samples[c]).double()
            low, high = (torch.quantile(pooled, torch.tensor([0.25, 0.75], dtype=pooled.dtype))
                         if pooled.numel() > 1 else (0.0, 1.0))
            iqr.append(float(high - low) / IQR_TO_SD if high > low else 1.0)
        floor = min_spread * torch.tensor(iqr)  # a share of the robust sd, as the plain model
        norms = cls(encoder=encoder, support=support, location=torch.zeros(0),
                    log_variance=torch.zeros(0), region_location=torch.zeros(0),
                    region_log_variance=torch.zeros(0), tissue=tissue.to(torch.uint8),
                    leverage=torch.zeros(0), floor=floor)
        design = norms.design(table)
        p = len(encoder.columns)
        shrinkage = (site_shrinkage, scale_shrinkage)
        penalty = torch.tensor([0.0] * p + [shrinkage[0]] * len(encoder.sites))
        scale_penalty = torch.tensor([0.0] * p + [shrinkage[1]] * len(encoder.sites))
        if heteroscedastic is None:
            heteroscedastic = n >= HETEROSCEDASTIC_SUBJECTS
        scale_columns = list(range(design.shape[1])) if heteroscedastic else (
            [0, *range(p, design.shape[1])])
        n_support, n_channels = int(support.sum()), len(channels)

        def voxels():
            for row, subject in enumerate(subjects):
                image, mask = subject.load("cpu")
                values = image[:, support]
                valid = (mask[support] & torch.isfinite(values)).reshape(-1)
                yield row, values.reshape(-1), valid

        min_variance = (floor[:, None] ** 2).expand(n_channels, n_support).reshape(-1)
        fitted = fit_location_scale(voxels, design, penalty, n_channels * n_support,
                                    iterations=iterations, min_variance=min_variance,
                                    scale_columns=scale_columns,
                                    scale_penalty=scale_penalty, device=device)
        norms.location = fitted.location.reshape(-1, n_channels, n_support).float().cpu()
        log_variance = fitted.log_variance.reshape(-1, n_channels, n_support).cpu()
        if spread_sigma > 0:
            log_variance = torch.stack([_smooth_on_support(coef, support, spread_sigma)
                                        for coef in log_variance])
        norms.log_variance = log_variance.float()

        def regions():
            for row, values in enumerate(regional_values):
                yield row, values, torch.isfinite(values)

        n_regions = len(REGION_NAMES)
        regional = fit_location_scale(regions, design, penalty, n_channels * n_regions,
                                      iterations=iterations,
                                      min_variance=(1e-6 * floor[:, None] ** 2).expand(
                                          n_channels, n_regions).reshape(-1),
                                      scale_columns=scale_columns,
                                      scale_penalty=scale_penalty, device=device)
        norms.region_location = regional.location.reshape(-1, n_channels, n_regions).cpu()
        norms.region_log_variance = regional.log_variance.reshape(
            -1, n_channels, n_regions).cpu()
        norms.leverage = leverage(design, penalty)
        norms.fitted_sites, norms.shrinkage = len(encoder.sites), shrinkage
        index = encoder.site_index(table)
        norms.site_counts = {site: int((index == k).sum())
                             for k, site in enumerate(encoder.sites)}
        return norms

    # ------------------------------------------------------------------ prediction
    def predict(self, covariates: dict, extrapolate: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A participant's expected values and predictive standard deviations.

        Returns
        -------
        location, sd : torch.Tensor
            ``(C, N)`` at the support voxels (the sd floored).
        region_location, region_sd : torch.Tensor
            ``(C, R)``.
        """
        table = pd.DataFrame([dict(covariates)])
        if "participant_id" not in table.columns:
            table["participant_id"] = "the participant"
        design = self.design(table, extrapolate)
        location, sd = self._predict(self.location, self.log_variance, design)
        sd = torch.maximum(sd[0], self.floor.double()[:, None])
        region_location, region_sd = self._predict(self.region_location,
                                                   self.region_log_variance, design)
        return location[0].float(), sd.float(), region_location[0], region_sd[0]

    def regional_table(self, image: torch.Tensor, valid: torch.Tensor, channels: list[str],
                       covariates: dict, extrapolate: bool = False) -> pd.DataFrame:
        """Each region's measured mean, expected value, z-score and centile, by channel."""
        _, _, expected, sd = self.predict(covariates, extrapolate)
        means, counts = region_means(image.cpu(), valid.cpu(), self.tissue)
        rows = []
        for c, channel in enumerate(channels):
            for r, region in enumerate(REGION_NAMES):
                value = float(means[c, r])
                z = (value - float(expected[c, r])) / float(sd[c, r])
                rows.append({
                    "region": region, "channel": channel, "n_voxels": int(counts[r]),
                    "value": value, "expected": float(expected[c, r]), "sd": float(sd[c, r]),
                    "z": z if math.isfinite(z) else float("nan"),
                    "centile": 100 * 0.5 * math.erfc(-z / math.sqrt(2))
                    if math.isfinite(z) else float("nan")})
        return pd.DataFrame(rows)

    def centile_curves(self, column: str, centiles: tuple[float, ...] = (5, 25, 50, 75, 95),
                       points: int = 60) -> pd.DataFrame:
        """Regional centiles against a numeric covariate, the others at their reference.

        Categorical covariates are drawn for each of their levels; numeric ones other than
        ``column`` at their training mean; sites at the population (no site effect).

        Returns
        -------
        pandas.DataFrame
            ``region``, ``channel`` index, ``level`` (the categorical levels, "all" without),
            ``column`` value and one column ``p<centile>`` per centile.
        """
        from statistics import NormalDist

        spec = self.encoder.numeric[column]
        grid = np.linspace(spec["min"], spec["max"], points)
        categorical = [c for c in self.encoder.covariates if c in self.encoder.levels]
        level_sets: list[dict[str, str]] = [{}]
        for cat in categorical:
            level_sets = [{**s, cat: level} for s in level_sets
                          for level in self.encoder.levels[cat]]
        frames = []
        for levels in level_sets:
            table = pd.DataFrame({column: grid})
            for other, other_spec in self.encoder.numeric.items():
                if other != column:
                    table[other] = other_spec["mean"]
            for cat, level in levels.items():
                table[cat] = level
            design = self.design(table, site_index=np.full(points, -1))
            location, sd = self._predict(self.region_location, self.region_log_variance,
                                         design)
            for c in range(location.shape[1]):
                for r, region in enumerate(REGION_NAMES):
                    frame = pd.DataFrame({"region": region, "channel": c,
                                          "level": " ".join(levels.values()) or "all",
                                          column: grid})
                    for p in centiles:
                        z = NormalDist().inv_cdf(p / 100)
                        frame[f"p{p:g}"] = (location[:, c, r] + z * sd[:, c, r]).numpy()
                    frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------------ transfer
    def transfer(self, subjects: list, table: pd.DataFrame, *, spread_sigma: float,
                 iterations: int = 3,
                 device: torch.device | str = "cpu") -> list[str]:
        """Add the new sites of ``subjects`` (controls) as random effects, in place.

        Only the new sites' location and log-scale offsets are estimated, with the population
        coefficients as known offsets; nothing of the original training data is needed.

        Returns
        -------
        list of str
            The sites added.

        Raises
        ------
        CovariateError
            The model has no site column, or a subject belongs to a site the model knows.
        """
        from bids_anomaly.models.data import valid_voxels

        column = self.encoder.site_column
        if not column:
            raise CovariateError("the model was trained without --site-column: it has no site "
                                 "effects to transfer; train it with --site-column")
        known = [str(v).strip() for v in table[column] if str(v).strip() in self.encoder.sites]
        if known:
            raise CovariateError(f"train --transfer adapts a model to new sites, but site "
                                 f"{known[0]!r} ({column}) is one it was trained on; select "
                                 "only the new site's controls")
        population = self.encoder.design(table, extrapolate=True)
        self.encoder.accept(table)  # the new site's controls are the model's too
        p = population.shape[1]
        names = [str(v).strip() for v in table[column]]
        added = sorted(set(names))
        n_support, n_channels = int(self.support.sum()), self.location.shape[1]
        pop_loc = torch.from_numpy(population) @ self.location[:p].double().reshape(p, -1)
        pop_scale = torch.from_numpy(population) @ self.log_variance[:p].double().reshape(p, -1)
        reg_loc = torch.from_numpy(population) @ self.region_location[:p].double().reshape(p, -1)
        reg_scale = (torch.from_numpy(population)
                     @ self.region_log_variance[:p].double().reshape(p, -1))
        min_variance = (self.floor[:, None] ** 2).expand(n_channels, n_support).reshape(-1)
        new_loc, new_scale, new_rloc, new_rscale = [], [], [], []
        for site in added:
            rows = [i for i, name in enumerate(names) if name == site]
            design = torch.ones(len(rows), 1, dtype=torch.float64)
            penalty, scale_penalty = (torch.tensor([value]) for value in self.shrinkage)

            def voxels(rows=rows):
                for k, row in enumerate(rows):
                    image, mask = subjects[row].load("cpu")
                    values = image[:, self.support]
                    valid = (mask[self.support] & torch.isfinite(values)).reshape(-1)
                    yield k, values.reshape(-1), valid

            regional_values = []
            for row in rows:  # small: read once, not once per pass
                image, mask = subjects[row].load("cpu")
                regional_values.append(region_means(image, valid_voxels(image, mask),
                                                    self.tissue)[0].reshape(-1))

            def regions(values=regional_values):
                for k, row_values in enumerate(values):
                    yield k, row_values, torch.isfinite(row_values)

            fitted = fit_location_scale(
                voxels, design, penalty, n_channels * n_support, iterations=iterations,
                min_variance=min_variance, scale_penalty=scale_penalty, device=device,
                location_offset=lambda k, rows=rows: pop_loc[rows[k]],
                scale_offset=lambda k, rows=rows: pop_scale[rows[k]])
            scale = fitted.log_variance.reshape(1, n_channels, n_support).cpu()
            if spread_sigma > 0:  # a scanner's noise level changes smoothly over the brain
                scale = _smooth_on_support(scale[0], self.support,
                                           max(spread_sigma, SITE_SCALE_SIGMA))[None]
            new_loc.append(fitted.location.reshape(1, n_channels, n_support).float().cpu())
            new_scale.append(scale.float())
            regional = fit_location_scale(
                regions, design, penalty, reg_loc.shape[1], iterations=iterations,
                min_variance=1e-6 * float(self.floor.min()) ** 2,
                scale_penalty=scale_penalty, device=device,
                location_offset=lambda k, rows=rows: reg_loc[rows[k]],
                scale_offset=lambda k, rows=rows: reg_scale[rows[k]])
            new_rloc.append(regional.location.reshape(1, n_channels, -1).cpu())
            new_rscale.append(regional.log_variance.reshape(1, n_channels, -1).cpu())
            self.site_counts[site] = len(rows)
        self.location = torch.cat([self.location, *new_loc])
        self.log_variance = torch.cat([self.log_variance, *new_scale])
        self.region_location = torch.cat([self.region_location, *new_rloc])
        self.region_log_variance = torch.cat([self.region_log_variance, *new_rscale])
        self.encoder.sites = [*self.encoder.sites, *added]
        return added

    # ------------------------------------------------------------------ storage
    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state as named tensors."""
        return {"support": self.support.to(torch.uint8), "location": self.location,
                "log_variance": self.log_variance, "region_location": self.region_location,
                "region_log_variance": self.region_log_variance, "tissue": self.tissue,
                "leverage": self.leverage, "floor": self.floor}

    def description(self) -> dict:
        """What is stored beside the tensors (the encoder and the sites' sizes)."""
        return {"encoder": self.encoder.to_dict(), "site_counts": self.site_counts,
                "fitted_sites": self.fitted_sites, "shrinkage": list(self.shrinkage)}

    @classmethod
    def restore(cls, tensors: dict[str, torch.Tensor], description: dict) -> CovariateNorms:
        """The norms stored by :meth:`tensors` and :meth:`description`."""
        return cls(encoder=CovariateEncoder.from_dict(description["encoder"]),
                   support=tensors["support"].bool(), location=tensors["location"],
                   log_variance=tensors["log_variance"],
                   region_location=tensors["region_location"],
                   region_log_variance=tensors["region_log_variance"],
                   tissue=tensors["tissue"], leverage=tensors["leverage"],
                   floor=tensors["floor"], site_counts=dict(description["site_counts"]),
                   fitted_sites=int(description["fitted_sites"]),
                   shrinkage=tuple(description["shrinkage"]))
