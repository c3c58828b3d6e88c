"""Mixture models of multi-channel brain intensities: Gaussian, Student-t and multiple-scaled t.

Healthy tissue intensities (one vector of fused channels per voxel) are modelled by a mixture
fitted with the EM of :mod:`bids_anomaly.models.mixture.em`; a voxel is abnormal when the mixture
finds it improbable. The three registered model types differ only in the component family:

- ``gmm``: Gaussian components;
- ``tmm``: multivariate Student-t components, whose heavy tails absorb the lesions of a
  contaminated (mostly healthy) training cohort instead of bending the fit toward them;
- ``mmst``: multiple-scaled t components (Forbes & Wraith 2014; used for brain lesions by
  Arnaud et al. 2018), heavy-tailed along some principal directions only; they also give a
  weight-based outlyingness score.

Options common to all three: the number of components (or ``"auto"``: the lowest BIC), batch or
online EM streaming over subjects from disk, trimming, one mixture per template tissue class,
and a combination with the voxel-wise normative model (where the mixture knows what tissue looks
like and the normative model where it is).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from bids_anomaly.config import option
from bids_anomaly.errors import UsageError
from bids_anomaly.models.contract import BaseModel, register
from bids_anomaly.models.data import TrainingData, valid_voxels
from bids_anomaly.models.mixture import em
from bids_anomaly.models.normative.normative import MAD_TO_SD, NormativeModel

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

LOGGER = logging.getLogger(__name__)

SCORES = ("nll", "outlyingness")
SINGLE_SUBJECT_TRIM = 0.02
"""Default trimmed fraction when a mixture is fitted on one subject's own brain.

Heavy-tailed components otherwise absorb the subject's lesions: on a generated subject whose
lesion is 3 % of a tissue, an untrimmed one-component MMST gave the lesion p-values near 1e-3
(not significant among 4,000 voxels), trimming 2 % gave 4e-6 to 1e-4.
"""
WHOLE_BRAIN = 0
"""Region key of a mixture fitted on the whole brain."""
BIC_SAMPLES = 100_000
"""Voxels the BIC of each candidate number of components is computed on."""
EVALUATION_SAMPLES = 100_000
"""Voxels the online EM's convergence is checked on."""


def sample_voxels(data: TrainingData, n_samples: int, seed: int,
                  regions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n_samples`` valid brain voxels spread evenly over the subjects, with region labels.

    The samples come back in random order.

    Returns
    -------
    samples : torch.Tensor
        ``(N, C)`` float32 on the data's device.
    labels : torch.Tensor
        ``(N,)`` region label of each sample (:data:`WHOLE_BRAIN` without ``regions``).
    """
    generator = torch.Generator().manual_seed(seed)
    per_subject = max(1, n_samples // max(len(data), 1))
    samples, labels = [], []
    for image, mask in data:
        valid = valid_voxels(image, mask)
        voxels = image[:, valid].T
        pick = torch.randperm(len(voxels), generator=generator)[:per_subject].to(voxels.device)
        samples.append(voxels[pick])
        labels.append(regions[valid][pick] if regions is not None
                      else torch.zeros(len(pick), dtype=torch.int64, device=voxels.device))
    samples, labels = torch.cat(samples).float(), torch.cat(labels)
    # shuffled, so that any leading slice (BIC, initialisation, evaluation) mixes all subjects
    order = torch.randperm(len(samples), generator=generator).to(samples.device)
    return samples[order], labels[order]


def stream_batches(data: TrainingData, batch_size: int, seed: int, pool: int = 4,
                   regions: torch.Tensor | None = None,
                   region: int = WHOLE_BRAIN) -> Callable[[], Iterator[torch.Tensor]]:
    """A batch factory for online EM that reads the subjects from disk, ``pool`` at a time.

    Each epoch visits the subjects in a new random order; the valid voxels of ``pool`` subjects
    are shuffled together (so that a batch mixes subjects) and cut into batches. Memory holds
    at most ``pool`` subjects, whatever their total number.
    """
    generator = torch.Generator().manual_seed(seed)

    def epoch() -> Iterator[torch.Tensor]:
        order = torch.randperm(len(data.subjects), generator=generator).tolist()
        leftover = None
        for begin in range(0, len(order), pool):
            parts = [] if leftover is None else [leftover]
            for index in order[begin:begin + pool]:
                image, mask = data.subjects[index].load(data.device)
                valid = valid_voxels(image, mask)
                if regions is not None:
                    valid &= regions == region
                parts.append(image[:, valid].T.float())
            voxels = torch.cat(parts)
            voxels = voxels[torch.randperm(len(voxels), generator=generator).to(voxels.device)]
            whole = len(voxels) // batch_size * batch_size
            for start in range(0, whole, batch_size):
                yield voxels[start:start + batch_size]
            leftover = voxels[whole:]
        if leftover is not None and len(leftover):
            yield leftover

    return epoch


def fill_regions(labels: torch.Tensor) -> torch.Tensor:
    """Give every unlabelled voxel the label of its nearest labelled voxel.

    Subjects' brain masks reach a little beyond the template's tissue segmentation; their edge
    voxels then belong to the nearest tissue.
    """
    from scipy import ndimage

    values = labels.cpu().numpy()
    _, nearest = ndimage.distance_transform_edt(values == 0, return_indices=True)
    return torch.from_numpy(values[tuple(nearest)]).to(labels.device)


def _components(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {value}")
    return number


def _trim(value: str) -> float:
    number = float(value)
    if not 0 <= number < 0.5:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.5), got {value}")
    return number


@dataclass
class MixtureOptions:
    """Options of the mixture models (``gmm``, ``tmm``, ``mmst``); see :class:`MixtureModel`."""

    n_components: int | str = option(
        5, "components of a mixture, or 'auto' for the number in 1..8 with the lowest BIC "
           "(default: {default})", flags=("--components",), type=_components,
        metavar="K|auto", single_subject=True)
    online: bool = option(
        False, "online EM streaming over every voxel of every subject (memory independent of "
               "the number of subjects) instead of batch EM on a sample of 1 million voxels",
        flags=("--online",), action="store_true", single_subject=True)
    per_tissue: bool = option(
        False, "one mixture per template tissue class (GM, WM, CSF)", flags=("--per-tissue",),
        action="store_true", single_subject=True)
    trim: float | None = option(
        None, "leave this fraction of the least likely voxels out of each EM step, so that "
              f"lesions do not pull the fit (default: 0 for train, {SINGLE_SUBJECT_TRIM} for "
              "--single-subject, whose fit always contains the subject's lesions)",
        flags=("--trim",), type=_trim, metavar="FRACTION", single_subject=True)
    normative: bool = option(
        False, "add the voxel-wise normative score to the mixture's",
        flags=("--with-normative",), action="store_true")
    score: str = option(
        "nll", "negative log-likelihood, or for mmst the weight-based outlyingness "
               "(default: {default})", flags=("--mixture-score",), choices=SCORES,
        single_subject=True)
    max_components: int = option(8, "largest candidate number of components for 'auto'")
    max_samples: int = option(1_000_000, "voxels sampled for batch EM and the initialisation")
    batch_size: int = option(100_000, "voxels per online EM step")
    epochs: int = option(3, "most passes of online EM over the data")
    tol: float = option(1e-3, "convergence tolerance on the mean log-likelihood per voxel")
    max_iter: int = option(200, "most batch EM iterations")
    n_init: int = option(1, "restarts from different k-means++ seeds (the most likely wins)")
    random_seed: int = option(0, "seed of every random choice (the run's --random-seed)")


class MixtureModel(BaseModel):
    """A mixture of healthy multi-channel intensities; subclasses choose the component family.

    Parameters
    ----------
    n_components : int or "auto"
        Components per mixture; ``"auto"`` picks, for each mixture, the number in
        ``1..max_components`` with the lowest BIC on a sample of the training voxels.
    online : bool
        Online EM streaming over every voxel of every subject (memory independent of the
        number of subjects) instead of batch EM on ``max_samples`` voxels.
    per_tissue : bool
        One mixture per tissue class of the template (GM, WM, CSF): intensities that are normal
        in one tissue (CSF-like) are then abnormal in another (white matter).
    trim : float
        Fraction of the least likely voxels left out of each E-step (trimmed likelihood).
    normative : bool
        Also fit the voxel-wise normative model and add the two scores, each standardised by
        its median and MAD over healthy training voxels.
    score : str
        ``nll`` (negative log-likelihood) or, for ``mmst``, ``outlyingness`` (the weight-based
        score, in -log10 p-value units).
    max_components : int
        Largest candidate for ``"auto"``.
    max_samples : int
        Voxels sampled (evenly over subjects) for batch EM and for the initialisation.
    batch_size : int
        Voxels per online EM step.
    epochs : int
        Most passes of online EM over the data.
    tol : float
        Convergence tolerance on the mean log-likelihood per voxel.
    max_iter : int
        Most batch EM iterations.
    n_init : int
        Restarts from different k-means++ seeds; the most likely fit is kept.
    random_seed : int
        Seed of every random choice.
    """

    family = ""
    single_subject = True
    options = (MixtureOptions,)
    options_scope = "the mixture models"

    def __init__(self, n_components: int | str = MixtureOptions.n_components,
                 online: bool = MixtureOptions.online,
                 per_tissue: bool = MixtureOptions.per_tissue, trim: float = 0.0,
                 normative: bool = MixtureOptions.normative, score: str = MixtureOptions.score,
                 max_components: int = MixtureOptions.max_components,
                 max_samples: int = MixtureOptions.max_samples,
                 batch_size: int = MixtureOptions.batch_size,
                 epochs: int = MixtureOptions.epochs, tol: float = MixtureOptions.tol,
                 max_iter: int = MixtureOptions.max_iter, n_init: int = MixtureOptions.n_init,
                 random_seed: int = MixtureOptions.random_seed) -> None:
        super().__init__()
        if n_components != "auto" and (not isinstance(n_components, int) or n_components < 1):
            raise ValueError(f"n_components must be a positive integer or 'auto', not "
                             f"{n_components!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, not {score!r}")
        if score == "outlyingness" and self.family != "mmst":
            raise ValueError("the outlyingness score needs --model-type mmst")
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), not {trim}")
        self.n_components = n_components
        self.online = online
        self.per_tissue = per_tissue
        self.trim = trim
        self.normative = normative
        self.score_kind = score
        self.max_components = max_components
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.epochs = epochs
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.random_seed = random_seed
        self.mixtures: dict[int, em.Mixture] = {}
        self.region_voxels: dict[int, int] = {}
        self.regions: torch.Tensor | None = None
        self.normative_model: NormativeModel | None = None
        self.standardisation: torch.Tensor | None = None

    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False) -> MixtureModel:
        """A mixture with the run's options; ``single_subject`` trims 2 % by default."""
        values = {**asdict(MixtureOptions()), **settings.model.options,
                  "random_seed": settings.execution.random_seed}
        if values["trim"] is None:
            values["trim"] = SINGLE_SUBJECT_TRIM if single_subject else 0.0
        return cls(**values)

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """The outlyingness score needs multiple-scaled t components.

        Raises
        ------
        UsageError
            ``--mixture-score outlyingness`` with another family than ``mmst``.
        """
        if given.get("score") == "outlyingness" and cls.family != "mmst":
            raise UsageError("--mixture-score outlyingness needs --model-type mmst (or "
                             "--single-subject mmst)")

    @property
    def score_definition(self) -> str:
        """What the anomaly score means (written to the model card)."""
        what = ("weight-based outlyingness, -log10 of the Bonferroni-combined smallest tail "
                "probability along the principal directions of the most probable component"
                if self.score_kind == "outlyingness"
                else f"negative log-likelihood of the voxel's channel intensities under the "
                     f"{self.family} mixture")
        if self.per_tissue:
            what += " of its template tissue class"
        if self.normative:
            what += ", plus the voxel-wise normative score, each standardised by (x - median)" \
                    " / (1.4826 MAD) over healthy training voxels"
        return what

    @property
    def hyperparameters(self) -> dict:
        """Settings needed to rebuild the model."""
        return {"n_components": self.n_components, "online": self.online,
                "per_tissue": self.per_tissue, "trim": self.trim, "normative": self.normative,
                "score": self.score_kind, "max_components": self.max_components,
                "max_samples": self.max_samples, "batch_size": self.batch_size,
                "epochs": self.epochs, "tol": self.tol, "max_iter": self.max_iter,
                "n_init": self.n_init, "random_seed": self.random_seed}

    def fit(self, data: TrainingData) -> None:
        """Fit the mixture(s) on the healthy voxels of ``data``."""
        regions = None
        if self.per_tissue:
            regions = fill_regions(data.load_regions())
            self.regions = regions.to(torch.uint8).cpu()
        samples, labels = sample_voxels(data, self.max_samples, self.random_seed, regions)
        if len(samples) == 0:
            raise ValueError("the training subjects have no valid brain voxels")
        for region in torch.unique(labels).tolist():
            voxels = samples[labels == region]
            batches = None
            if self.online:
                batches = stream_batches(data, self.batch_size, self.random_seed,
                                         regions=regions, region=region)
            self.mixtures[region] = self._fit_mixture(voxels, batches, region)
            self.region_voxels[region] = len(voxels)
        if self.normative:
            self._fit_normative(data)

    def fit_voxels(self, voxels: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Fit on voxels in memory (``(N, C)``), one mixture per label when given."""
        if labels is None:
            labels = torch.full((len(voxels),), WHOLE_BRAIN, dtype=torch.int64,
                                device=voxels.device)
        generator = torch.Generator().manual_seed(self.random_seed)
        for region in torch.unique(labels).tolist():
            subset = voxels[labels == region]
            pick = torch.randperm(len(subset), generator=generator)[:self.max_samples]
            subset = subset[pick.to(subset.device)]
            batches = (em.shuffled_batches(subset, self.batch_size, self.random_seed)
                       if self.online else None)
            self.mixtures[region] = self._fit_mixture(subset, batches, region)
            self.region_voxels[region] = len(subset)

    def fit_subject(self, image: torch.Tensor, mask: torch.Tensor,
                    regions: torch.Tensor | None = None) -> None:
        """Single-subject mode: fit on one subject's own valid brain voxels.

        Parameters
        ----------
        image, mask : torch.Tensor
            ``(C, X, Y, Z)`` channels and ``(X, Y, Z)`` brain mask.
        regions : torch.Tensor, optional
            The template's tissue labels on the same grid (needed with ``per_tissue``).
        """
        valid = valid_voxels(image, mask)
        labels = None
        if self.per_tissue:
            if regions is None:
                raise ValueError("a per-tissue mixture needs the template's tissue labels")
            self.regions = fill_regions(regions).to(torch.uint8).cpu()
            labels = self.regions.to(image.device).long()[valid]
        self.fit_voxels(image[:, valid].T, labels)

    def _fit_mixture(self, voxels: torch.Tensor, batches, region: int) -> em.Mixture:
        """One mixture: choose K, run the restarts, keep the most likely."""
        report: dict = {"voxels": len(voxels)}
        n_components = self.n_components
        if n_components == "auto":
            candidates = range(1, self.max_components + 1)
            n_components, table = em.select_components(
                voxels[:BIC_SAMPLES], self.family, candidates, seed=self.random_seed,
                tol=self.tol, max_iter=self.max_iter, trim=self.trim)
            report["bic"] = {str(k): value for k, value in table.items()}
            LOGGER.info("region %d: %d components by BIC", region, n_components)
        best: em.FitResult | None = None
        for restart in range(self.n_init):
            seed = self.random_seed + restart
            if batches is None:
                result = em.fit_batch(voxels, n_components, self.family, tol=self.tol,
                                      max_iter=self.max_iter, trim=self.trim, seed=seed)
            else:
                init = em.kmeans_init(voxels[:50_000], n_components, self.family, seed)
                result = em.fit_online(batches, init, epochs=self.epochs,
                                       evaluation=voxels[:EVALUATION_SAMPLES], tol=self.tol,
                                       trim=self.trim)
            if best is None or result.log_likelihood > best.log_likelihood:
                best = result
        report.update(components=n_components, log_likelihood=best.log_likelihood,
                      iterations=best.n_iter, converged=best.converged,
                      seconds=round(best.seconds, 2))
        self.fit_report[str(region)] = report
        LOGGER.info("region %d: %s mixture, K=%d, mean log-likelihood %.4f after %d %s in "
                    "%.1f s", region, self.family, n_components, best.log_likelihood,
                    best.n_iter, "batches" if batches is not None else "iterations",
                    best.seconds)
        return best.mixture

    def _fit_normative(self, data: TrainingData) -> None:
        """Fit the voxel-wise model and the standardisation of both scores."""
        self.normative_model = NormativeModel()
        self.normative_model.fit(data)
        mixture_scores, normative_scores = [], []
        for index, (image, mask) in enumerate(data):
            if index >= 5:
                break
            valid = valid_voxels(image, mask)
            mixture_scores.append(self._mixture_map(image, valid)[valid])
            normative_scores.append(self.normative_model.score(image, mask)[valid])
        rows = []
        for values in (torch.cat(mixture_scores), torch.cat(normative_scores)):
            median = values.median()
            spread = MAD_TO_SD * (values - median).abs().median()
            rows.append(torch.stack([median, spread.clamp_min(1e-6)]))
        self.standardisation = torch.stack(rows).double()

    def voxel_scores(self, voxels: torch.Tensor, labels: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Anomaly score of each voxel ``(N, C)`` under its region's mixture (float64)."""
        if not self.mixtures:
            raise RuntimeError("the model is not fitted")
        if labels is None:
            labels = torch.full((len(voxels),), WHOLE_BRAIN, dtype=torch.int64,
                                device=voxels.device)
        scores = torch.zeros(len(voxels), dtype=torch.float64, device=voxels.device)
        for region, mixture in self.mixtures.items():
            chosen = labels == region
            if not chosen.any():
                continue
            mixture = mixture.to(voxels.device)
            subset = voxels[chosen].double()
            scores[chosen] = (mixture.outlyingness(subset) if self.score_kind == "outlyingness"
                              else -mixture.log_prob(subset))
        return scores

    def _mixture_map(self, image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        labels = None
        if self.regions is not None:
            labels = self.regions.to(image.device).long()[valid]
        out = torch.zeros(valid.shape, dtype=torch.float64, device=image.device)
        out[valid] = self.voxel_scores(image[:, valid].T, labels)
        return out

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Anomaly score of each valid brain voxel, 0 elsewhere (float32)."""
        valid = valid_voxels(image, mask)
        if self.regions is not None and self.regions.shape != mask.shape:
            raise ValueError(f"the model's region map is {tuple(self.regions.shape)}, the image "
                             f"{tuple(mask.shape)}: another template grid")
        scores = self._mixture_map(image, valid)
        if self.normative_model is not None:
            standard = self.standardisation.to(image.device)
            normative = self.normative_model.score(image, mask).double()
            scores = torch.where(
                valid,
                (scores - standard[0, 0]) / standard[0, 1]
                + (normative - standard[1, 0]) / standard[1, 1],
                0.0)
        return scores.float()

    def simulated_scores(self, n_samples: int = 1_000_000) -> np.ndarray:
        """Scores of samples drawn from the fitted mixtures (as many per region as it had).

        A model-based healthy distribution for when no held-out healthy data exist
        (single-subject mode): its ``1 - fpr`` quantile is the threshold at which the model
        itself expects a voxel false-positive rate ``fpr``.
        """
        if self.normative_model is not None:
            raise ValueError("a model combined with the normative model is calibrated on "
                             "held-out healthy subjects, not by simulation")
        generator = torch.Generator().manual_seed(self.random_seed)
        total = sum(self.region_voxels.values())
        scores = []
        for region, mixture in self.mixtures.items():
            n = max(1, round(n_samples * self.region_voxels[region] / total))
            drawn = mixture.sample(n, generator)
            labels = torch.full((n,), region, dtype=torch.int64, device=drawn.device)
            scores.append(self.voxel_scores(drawn, labels))
        return torch.cat(scores).cpu().numpy()

    @property
    def n_channels(self) -> int | None:
        """Channels the fitted model takes (None before fitting)."""
        if not self.mixtures:
            return None
        return next(iter(self.mixtures.values())).n_channels

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The template grid of the region map or normative part (None: any grid)."""
        if self.regions is not None:
            return tuple(self.regions.shape)
        if self.normative_model is not None:
            return self.normative_model.grid_shape
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every mixture's parameters, the region map and the normative part."""
        tensors: dict[str, torch.Tensor] = {}
        for region, mixture in self.mixtures.items():
            for name, value in mixture.tensors().items():
                tensors[f"region{region}.{name}"] = value
            tensors[f"region{region}.voxels"] = torch.tensor([self.region_voxels[region]])
        if self.regions is not None:
            tensors["regions"] = self.regions.to(torch.uint8)
        if self.normative_model is not None:
            for name, value in self.normative_model.tensors().items():
                tensors[f"normative.{name}"] = value
            tensors["standardisation"] = self.standardisation
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the mixtures, region map and normative part from :meth:`tensors`."""
        grouped: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("region") and "." in key:
                region, name = key.split(".", 1)
                grouped.setdefault(int(region.removeprefix("region")), {})[name] = value
        for region, values in grouped.items():
            self.region_voxels[region] = int(values.pop("voxels"))
            self.mixtures[region] = em.Mixture.from_tensors(self.family, values)
        if "regions" in tensors:
            self.regions = tensors["regions"]
        if "normative.location" in tensors:
            self.normative_model = NormativeModel()
            self.normative_model.restore({name.removeprefix("normative."): value
                                          for name, value in tensors.items()
                                          if name.startswith("normative.")})
            self.standardisation = tensors["standardisation"]


@register
class GaussianMixtureModel(MixtureModel):
    """Full-covariance Gaussian mixture (see :class:`MixtureModel`)."""

    model_type = "gmm"
    summary = "Gaussian mixture of the fused channels' intensities"
    family = "gaussian"


@register
class StudentMixtureModel(MixtureModel):
    """Multivariate Student-t mixture, one degrees-of-freedom per component."""

    model_type = "tmm"
    summary = "Student-t mixture (heavy tails absorb a contaminated cohort's lesions)"
    family = "student"


@register
class MultipleScaledMixtureModel(MixtureModel):
    """Multiple-scaled Student-t mixture, one degrees-of-freedom per principal direction."""

    model_type = "mmst"
    summary = "multiple-scaled Student-t mixture (heavy tails along some directions only)"
    family = "mmst"
