"""The subject's own tissues with anatomical priors; lesions are what they cannot explain.

``--single-subject tissue`` (and ``train --model-type tissue``, an ensemble member) needs no
healthy controls and no labels. On every image it scores, it fits a mixture of the channels'
intensities with a few Gaussians per tissue class (GM, WM, CSF) whose spatial priors are the
template's tissue maps (every subject is on the template grid after preprocessing), plus a broad
lesion class tied to white matter, allowed only on the lesion side of each directed channel
(FLAIR / T2w / PDw brighter than the subject's own GM, T1w darker than its WM) and weighted by a
location prior (white matter and its borders, or a lesion-frequency map): the model-based
outlier detection of Van Leemput et al. (IEEE TMI 20:677, 2001) and SAMSEG's lesion mode
(Cerri et al., NeuroImage 225, 2021), fitted robustly
(:mod:`bids_anomaly.models.tissue.spatial_em`).

The score is built in three steps:

1. the lesion log-odds of every voxel under the fitted model (the FLAIR-bright cortex, CSF
   edges and partial volume are explained by the tissue classes, not flagged);
2. lesion growth (Schmidt et al. 2012's LGA as a Potts prior): a voxel's log-odds rise with the
   number of its face neighbours above a seed level, so faint borders join their lesion;
3. a healthy version of the subject is drawn from the fitted tissue model (each voxel's tissue
   component from its posterior given that it is healthy, its intensities from that Gaussian)
   and scored the same way: the map is ``-log10 p`` of each voxel's score among those healthy
   voxels. The lesions are not in that draw, so lesion load cannot inflate the threshold, and
   ``--fpr`` / ``--fdr`` keep their meaning: the threshold at FPR ``a`` is ``-log10 a``.

The robust fit narrows the Gaussians (their tails weigh less); their covariances are corrected
by the consistency factor of the weights (:func:`~bids_anomaly.models.tissue.spatial_em.
typicality_consistency`), or the healthy draw would be too tight and flag too much.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from bids_anomaly.config import option, positive_int
from bids_anomaly.errors import BadDataError, MissingInputError, UsageError
from bids_anomaly.models.calibration import log10_exceedance, tail_table
from bids_anomaly.models.contract import BaseModel, register
from bids_anomaly.models.data import TrainingData, valid_voxels
from bids_anomaly.models.directions import DirectionError, check_channels, parse_directions
from bids_anomaly.models.tissue import spatial_em

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

TISSUES = ("GM", "WM", "CSF")
"""The tissue classes, in the order of the template maps (``TrainingData.tissues``)."""
LESION_DIRECTIONS = {"FLAIR": "+", "T2w": "+", "PDw": "+", "T1w": "-"}
"""Where white-matter lesions lie on each contrast; other channels are not constrained."""
LOCATION_PRIORS = ("wm", "none")
LOCATION_SIGMA_MM = 3.0
"""Gaussian smoothing of the template's WM map into the default location prior: white matter
and its borders (periventricular, juxtacortical), where MS lesions and WMH are."""
LOCATION_FLOOR = 1e-3
"""Smallest location prior: a lesion anywhere in the brain stays possible."""
SEED_FPR = 1e-3
"""Share of the healthy draw above the seed level that lesion growth starts from."""
NULL_VOXELS = 1_000_000
"""Healthy voxels drawn to calibrate one subject (whole healthy images, as many as needed)."""
PRIOR_SCALE = 255
"""Template priors are stored as uint8 in 1/255 steps (the same in every mode)."""


def _non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _location(value: str) -> str:
    if value in LOCATION_PRIORS:
        return value
    if not value.strip():
        raise argparse.ArgumentTypeError("give wm, none or a lesion-frequency map file")
    return value


@dataclass
class TissueOptions:
    """Options of the tissue model (see :class:`TissueModel`)."""

    components: list[int] = option(
        help="Gaussians per tissue class, GM WM CSF (default: 2 2 2)",
        factory=lambda: [2, 2, 2], flags=("--tissue-components",), nargs=3, type=positive_int,
        metavar=("GM", "WM", "CSF"), single_subject=True)
    outlier_distance: float = option(
        3.0, "robust fit: voxels farther than this Mahalanobis distance from every component of "
             "their tissue weigh less in the fit (Van Leemput's kappa; 0: off; default: "
             "{default})", flags=("--outlier-distance",), type=_non_negative, metavar="KAPPA",
        single_subject=True)
    lesion_prior: str = option(
        "wm", "where lesions may be: wm (template white matter smoothed by 3 mm: white matter "
              "and its borders; default), none (anywhere in the brain), or a lesion-frequency "
              "map in template space (NIfTI on the template grid)",
        flags=("--lesion-prior",), type=_location, metavar="wm|none|FILE", single_subject=True)
    growth: float = option(
        1.0, "lesion growth: log-odds added per face neighbour above the seed level (0: none; "
             "default: {default})", flags=("--lesion-growth",), type=_non_negative,
        metavar="NATS", single_subject=True)
    mrf: float = option(
        0.0, "Potts smoothing of the tissue classes (mean field, per face neighbour; 0: off)",
        flags=("--tissue-mrf",), type=_non_negative, metavar="BETA", single_subject=True)
    direction: list[str] = option(
        help="per-channel lesion side, e.g. FLAIR:+ T1w:- (+ brighter than grey matter, - "
             "darker than white matter, +- either); default FLAIR, T2w, PDw + and T1w -",
        factory=list, flags=("--direction",), nargs="+", metavar="CHANNEL:SIGN",
        single_subject=True)
    max_voxels: int = option(100_000, "voxels the mixture is fitted on (a random sample)")
    random_seed: int = option(0, "seed of every random choice (the run's --random-seed)")


@register
class TissueModel(BaseModel):
    """The subject's own tissue mixture with template priors; lesions as outliers.

    Parameters
    ----------
    components : list of int
        Gaussians per tissue class (GM, WM, CSF).
    outlier_distance : float
        Van Leemput's ``kappa`` for the robust fit (0: off).
    lesion_prior : str
        ``wm``, ``none`` or the path of a lesion-frequency map on the template grid.
    growth : float
        Lesion growth coupling, log-odds per confident face neighbour (0: off).
    mrf : float
        Potts coupling of the tissue classes (0: off).
    direction : list of str or dict, optional
        Lesion side per channel (``FLAIR:+``); unnamed channels follow
        :data:`LESION_DIRECTIONS`.
    channels : list of str, optional
        The channels' names (set by :meth:`fit`).
    prior_floor : float
        Share of the template priors spread over every class (registration is never exact).
    lesion_spread : float
        Lesion covariance as a multiple of the WM covariance (SAMSEG: about 50).
    max_voxels : int
        Voxels the mixture is fitted on.
    random_seed : int
        Seed of the subsample and of the healthy draw.
    """

    model_type = "tissue"
    summary = ("the subject's own GM/WM/CSF mixture with template priors, lesions as its "
               "outliers (no training, no controls)")
    single_subject = True
    calibration_only = True
    self_calibrated: ClassVar[bool] = True
    needs_training: ClassVar[bool] = False
    options = (TissueOptions,)
    options_scope = "the tissue model"
    posterior_labels: ClassVar[tuple[str, ...]] = (*TISSUES, "lesion")
    """The classes of :meth:`score_with_posteriors`, as written (``label-<class>_probseg``)."""

    def __init__(self, components: list[int] | tuple[int, ...] = (2, 2, 2),
                 outlier_distance: float = TissueOptions.outlier_distance,
                 lesion_prior: str = TissueOptions.lesion_prior,
                 growth: float = TissueOptions.growth, mrf: float = TissueOptions.mrf,
                 direction: list[str] | dict[str, str] | None = None,
                 channels: list[str] | None = None, prior_floor: float = 0.1,
                 lesion_spread: float = 50.0, max_voxels: int = TissueOptions.max_voxels,
                 random_seed: int = TissueOptions.random_seed) -> None:
        super().__init__()
        components = [int(c) for c in components]
        if len(components) != len(TISSUES) or min(components) < 1:
            raise ValueError(f"components: one positive count per class {TISSUES}, not "
                             f"{components}")
        if not 1e-3 <= prior_floor < 1:
            raise ValueError(f"prior_floor must be in [0.001, 1), not {prior_floor}")
        if min(outlier_distance, growth, mrf) < 0 or lesion_spread <= 1:
            raise ValueError("outlier_distance, growth and mrf must be >= 0, lesion_spread > 1")
        self.components = components
        self.outlier_distance = float(outlier_distance)
        self.lesion_prior = str(lesion_prior)
        self.growth = float(growth)
        self.mrf = float(mrf)
        self.directions = parse_directions(direction)
        self.channels = list(channels) if channels else None
        self.prior_floor = float(prior_floor)
        self.lesion_spread = float(lesion_spread)
        self.max_voxels = int(max_voxels)
        self.random_seed = int(random_seed)
        self.priors: torch.Tensor | None = None  # (3, X, Y, Z) uint8
        self.location: torch.Tensor | None = None  # (X, Y, Z) float16, None: no prior
        self.null_scores: np.ndarray | None = None
        self.subject_report: dict = {}

    # --------------------------------------------------------------- building
    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False) -> TissueModel:
        """A tissue model with the run's options (a lesion-prior file is resolved and checked).

        Raises
        ------
        MissingInputError
            ``--lesion-prior`` names a file that does not exist.
        """
        values = {**asdict(TissueOptions()), **settings.model.options,
                  "random_seed": settings.execution.random_seed}
        prior = values["lesion_prior"]
        if prior not in LOCATION_PRIORS:
            path = Path(prior).expanduser().resolve()
            if not path.is_file():
                raise MissingInputError(f"--lesion-prior {prior}: no such file (give wm, none "
                                        "or a lesion-frequency map on the template grid)")
            values["lesion_prior"] = str(path)
        return cls(**values)

    @classmethod
    def untrained(cls, channels: list[str], random_seed: int = 0) -> TissueModel:
        """The tissue model with its defaults (the channels are set by :meth:`fit`)."""
        return cls(random_seed=random_seed)

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """Directions must parse.

        Raises
        ------
        UsageError
            A ``--direction`` that is not ``CHANNEL:SIGN``.
        """
        parse_directions(given.get("direction"))

    @property
    def hyperparameters(self) -> dict:
        """Everything needed to rebuild the model."""
        return {"components": self.components, "outlier_distance": self.outlier_distance,
                "lesion_prior": self.lesion_prior, "growth": self.growth, "mrf": self.mrf,
                "direction": self.directions, "channels": self.channels,
                "prior_floor": self.prior_floor, "lesion_spread": self.lesion_spread,
                "max_voxels": self.max_voxels, "random_seed": self.random_seed}

    @property
    def score_definition(self) -> str:
        """What the score means (statmap sidecars, model card)."""
        named = self.sides_by_channel() if self.channels else {**LESION_DIRECTIONS,
                                                                **self.directions}
        sides = ", ".join(f"{c} {s}" for c, s in named.items()) or "none"
        location = {"wm": "template white matter smoothed by 3 mm", "none": "uniform"}.get(
            self.lesion_prior, "the lesion-frequency map given")
        return (
            "-log10 p of the voxel's lesion log-odds among a healthy version of the subject "
            "drawn from the model; the model: the subject's own intensities as Gaussians per "
            f"tissue class ({'/'.join(map(str, self.components))} for GM/WM/CSF) with the "
            "template's tissue maps as priors, fitted robustly (outlier distance "
            f"{self.outlier_distance:g}), and a lesion class tied to white matter "
            f"({self.lesion_spread:g} x its covariance) on the lesion side of each channel "
            f"({sides}; + brighter than GM, - darker than WM), location prior {location}; "
            f"lesion growth {self.growth:g} log-odds per "
            "face neighbour above the seed level"
            + (f", tissue MRF {self.mrf:g}" if self.mrf else ""))

    def sides_by_channel(self) -> dict[str, str]:
        """The lesion side of each channel (``+``, ``-`` or ``+-``)."""
        return {c: self.directions.get(c, LESION_DIRECTIONS.get(c, "+-"))
                for c in self.channels or []}

    @property
    def n_channels(self) -> int | None:
        """The channels the model was set up for (None before :meth:`fit`)."""
        return len(self.channels) if self.channels else None

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The template grid of its priors."""
        return None if self.priors is None else tuple(self.priors.shape[1:])

    # --------------------------------------------------------------- fitting
    def fit(self, data: TrainingData) -> None:
        """Take the template's tissue maps and the channels; the mixture is fitted per image.

        Raises
        ------
        MissingInputError
            The data carry no template tissue maps.
        BadDataError
            A lesion-frequency map on another grid than the template's.
        UsageError
            ``--direction`` names a channel the data lack.
        """
        if not data.tissues or len(data.tissues) != len(TISSUES):
            raise MissingInputError("the tissue model needs the template's GM, WM and CSF "
                                    "probability maps")
        try:
            check_channels(self.directions, list(data.channels))
        except DirectionError as error:
            raise UsageError(str(error)) from error
        self.channels = list(data.channels)
        maps = [nib.load(path) for path in data.tissues]
        priors = np.stack([np.asarray(img.dataobj, dtype=np.float32) for img in maps])
        self.priors = torch.from_numpy(
            np.rint(np.clip(priors, 0, 1) * PRIOR_SCALE).astype(np.uint8))
        voxel_mm = float(np.mean(maps[0].header.get_zooms()[:3]))
        self.location = self._location_prior(priors[TISSUES.index("WM")], voxel_mm)
        self.fit_report = {"template_grid": list(priors.shape[1:]),
                           "location_prior": self.lesion_prior}

    def _location_prior(self, white_matter: np.ndarray, voxel_mm: float
                        ) -> torch.Tensor | None:
        if self.lesion_prior == "none":
            return None
        if self.lesion_prior == "wm":
            values = ndimage.gaussian_filter(white_matter, LOCATION_SIGMA_MM / voxel_mm)
        else:
            image = nib.load(self.lesion_prior)
            if image.shape[:3] != white_matter.shape or image.ndim != 3:
                raise BadDataError(f"--lesion-prior {self.lesion_prior}: grid {image.shape} is "
                                   f"not the template's {white_matter.shape}")
            values = np.nan_to_num(np.asarray(image.dataobj, dtype=np.float32))
            peak = float(values.max())
            if not peak > 0:
                raise BadDataError(f"--lesion-prior {self.lesion_prior} is empty")
            values = values / peak
        return torch.from_numpy(np.clip(values, LOCATION_FLOOR, 1.0).astype(np.float16))

    # --------------------------------------------------------------- scoring
    def _check_image(self, image: torch.Tensor) -> None:
        if self.priors is None:
            raise RuntimeError("the tissue model has no template priors: call fit first")
        if tuple(image.shape[1:]) != self.grid_shape:
            raise BadDataError(f"the image grid {tuple(image.shape[1:])} is not the template "
                               f"grid {self.grid_shape} of the tissue model's priors")
        if self.channels and image.shape[0] != len(self.channels):
            raise BadDataError(f"the tissue model was set up for {len(self.channels)} "
                               f"channel(s) ({', '.join(self.channels)}), the image has "
                               f"{image.shape[0]}")

    def score_with_posteriors(self, image: torch.Tensor, mask: torch.Tensor
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Fit the subject's tissues, then the ``-log10 p`` map and the class posteriors.

        Parameters
        ----------
        image : torch.Tensor
            ``(C, X, Y, Z)`` channels on the grid of the model's priors (the template's).
        mask : torch.Tensor
            ``(X, Y, Z)`` brain mask.

        Returns
        -------
        score : torch.Tensor
            ``(X, Y, Z)`` float32, 0 outside the valid brain.
        posteriors : dict of str to torch.Tensor
            ``GM``, ``WM``, ``CSF`` and ``lesion`` posterior probabilities (float32 grids).

        Raises
        ------
        BadDataError
            Another grid or number of channels, or too few brain voxels to fit.
        """
        return self.score_sessions([image], mask)[0]

    def score_sessions(self, images: list[torch.Tensor], mask: torch.Tensor
                       ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Several images of one subject on one grid (its sessions), one shared tissue model.

        The mixture is fitted once on voxels of every image (the sessions share their tissue
        parameters, so that a difference between their maps is a change of the subject, not
        of two fits); each image then gets its posteriors, its healthy draw, its growth and
        its ``-log10 p`` map as in :meth:`score_with_posteriors`. Voxels count where every
        image has a value.

        Returns
        -------
        list of (score, posteriors)
            One per image, in order.
        """
        for image in images:
            self._check_image(image)
        device = images[0].device
        valid = mask.to(device)
        for image in images:
            valid = valid_voxels(image, valid)
        n_valid = int(valid.sum())
        if n_valid < 1000:
            raise BadDataError(f"only {n_valid} brain voxels with a value in every channel: too "
                               "few to fit the subject's tissues")
        xs = [image[:, valid].T.to(torch.float32) for image in images]
        priors = _normalised(self.priors.to(device)[:, valid].T.to(torch.float64) / PRIOR_SCALE)
        location = (torch.ones(n_valid, dtype=torch.float64, device=device)
                    if self.location is None
                    else self.location.to(device)[valid].to(torch.float64))
        sides = [{"+": 1, "-": -1}.get(s, 0) for s in self.sides_by_channel().values()]
        generator = torch.Generator().manual_seed(self.random_seed)
        per_image = max(1, self.max_voxels // len(xs))
        samples = [torch.randperm(n_valid, generator=generator)[:per_image].to(device)
                   for _ in xs]
        mixture = spatial_em.fit_tissue_mixture(
            torch.cat([x[sample] for x, sample in zip(xs, samples, strict=True)]),
            torch.cat([priors[sample] for sample in samples]),
            torch.cat([location[sample] for sample in samples]), self.components, sides,
            outlier_distance=self.outlier_distance, lesion_spread=self.lesion_spread,
            prior_floor=self.prior_floor)
        results, nulls = [], []
        for x in xs:  # the same random numbers for every session: equal images, equal maps
            draws = torch.Generator().manual_seed(self.random_seed + 1)
            score, maps, null = self._map(mixture, x, priors, location, valid, draws)
            results.append((score, maps))
            nulls.append(null)
        self.null_scores = np.concatenate(nulls)
        self.subject_report = {
            **mixture.report, "omega": mixture.omega, "sessions": len(xs),
            "class_means": {name: mixture.class_mean(i).tolist()
                            for i, name in enumerate(TISSUES)}}
        return results

    def _map(self, mixture: spatial_em.TissueMixture, x: torch.Tensor, priors: torch.Tensor,
             location: torch.Tensor, valid: torch.Tensor, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], np.ndarray]:
        """One image's ``-log10 p`` map, posteriors and healthy scores under ``mixture``."""
        device = x.device
        n_valid = len(x)
        posteriors, log_odds = spatial_em.class_posteriors(mixture, x, priors, location, valid,
                                                           self.mrf)
        replicates = math.ceil(NULL_VOXELS / n_valid)
        null_log_odds = [spatial_em.class_posteriors(
            mixture, spatial_em.simulate_healthy(mixture, x, priors, location,
                                              generator).to(torch.float32),
            priors, location, valid, self.mrf)[1] for _ in range(replicates)]
        seed_level = float(np.quantile(torch.cat(null_log_odds).double().cpu().numpy(),
                                       1.0 - SEED_FPR))
        grown = self._grow(log_odds, valid, seed_level)
        null = torch.cat([self._grow(values, valid, seed_level)
                          for values in null_log_odds]).double().cpu().numpy()
        tail = tail_table(null)
        score = torch.zeros(valid.shape, dtype=torch.float32, device=device)
        score[valid] = log10_exceedance(grown, tail).to(device)
        maps = {}
        for index, name in enumerate(self.posterior_labels):
            grid = torch.zeros(valid.shape, dtype=torch.float32, device=device)
            grid[valid] = posteriors[:, index].to(torch.float32)
            maps[name] = grid
        return score, maps, log10_exceedance(torch.from_numpy(null), tail).numpy()

    def _grow(self, log_odds: torch.Tensor, valid: torch.Tensor, seed_level: float
              ) -> torch.Tensor:
        """Lesion growth on the grid; the valid voxels' values back."""
        grid = torch.full(valid.shape, spatial_em.FLOOR_SCORE, dtype=log_odds.dtype,
                          device=log_odds.device)
        grid[valid] = log_odds
        return spatial_em.grow(grid, valid, seed_level, self.growth)[valid]

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``-log10 p`` of each voxel's lesion evidence under the subject's own tissue model."""
        return self.score_with_posteriors(image, mask)[0]

    def simulated_scores(self, n_samples: int = NULL_VOXELS) -> np.ndarray:
        """Healthy scores to calibrate with: the last scored subject's healthy draw.

        Before any subject is scored, the distribution every subject's healthy draw has by
        construction: ``-log10`` of uniform p-values (the threshold at FPR ``a`` is then
        ``-log10 a``).
        """
        if self.null_scores is not None:
            return self.null_scores[:n_samples]
        return -np.log10((np.arange(n_samples) + 0.5) / n_samples)

    # --------------------------------------------------------------- storage
    def tensors(self) -> dict[str, torch.Tensor]:
        """The template priors (uint8) and the location prior (float16)."""
        if self.priors is None:
            raise RuntimeError("the tissue model is not set up: call fit first")
        tensors = {"priors": self.priors}
        if self.location is not None:
            tensors["location"] = self.location
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the priors from :meth:`tensors`' output.

        Raises
        ------
        BadDataError
            Priors of another shape or type than three uint8 maps.
        """
        priors = tensors["priors"]
        if priors.dtype != torch.uint8 or priors.ndim != 4 or priors.shape[0] != len(TISSUES):
            raise BadDataError("the tissue model's priors are not three uint8 maps")
        self.priors = priors
        self.location = tensors.get("location")


def _normalised(priors: torch.Tensor) -> torch.Tensor:
    """Rows that sum to 1 (uniform where the template has no tissue at all)."""
    total = priors.sum(dim=1, keepdim=True)
    uniform = torch.full_like(priors, 1.0 / priors.shape[1])
    return torch.where(total > 0, priors / total.clamp_min(1e-12), uniform)
