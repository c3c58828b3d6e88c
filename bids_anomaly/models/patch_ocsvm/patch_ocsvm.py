"""Patch representation learning with one-class classifiers: the seed group's method family.

A siamese patch autoencoder (:mod:`bids_anomaly.models.patch_ocsvm.siamese`) learns, without labels,
a code of the small multi-modal patch around every voxel; normality is then modelled in that latent
space (``--latent-model``):

``voxel``
    One RBF one-class SVM per template voxel, fitted on the codes of that location across the
    training subjects (Alaverdyan et al., MedIA 2020), optionally pooling the codes of the
    ``(2 r + 1)^3`` neighbourhood (``--ocsvm-neighbourhood r``) to give each SVM more samples.
``global``
    An ensemble of ``global_svms`` OC-SVMs, each on ``global_samples`` codes drawn at random brain
    locations of random training subjects; score = their mean decision (Pinon et al., ISBI 2023).
``patient``
    A *patient-specific* OC-SVM fitted at scoring time on the subject's own codes (at most
    ``ocsvm_samples`` of them), ``nu`` being the expected outlier fraction (Pinon et al., MIDL
    2023): no registration-exact healthy reference is needed, and the autoencoder may learn from
    the patients' own unlabelled scans.
``mmst`` / ``gmm``
    The project's multiple-scaled Student-t (or Gaussian) mixture (:mod:`.em`) fitted on codes
    of the training subjects (K = 9 in Pinon et al.); score = negative log-likelihood.

The anomaly score is ``-decision`` for the SVMs (positive outside the learnt support, as
scikit-learn's decision is negative for outliers) and the negative log-likelihood for the
mixtures, at every valid brain voxel (0 elsewhere, and outside the voxel-wise SVMs' support).
The papers' abnormality threshold, the 98th percentile of control scores, is ``train --fpr
0.02`` (computed on held-out controls, the stricter form).

Departures from the papers, and why: patches default to 9 x 9 voxels at the project's 2 mm grid
(the papers' 15 x 15 at 1-1.5 mm cover about the same 18-22 mm); the SVMs' ``gamma`` is
``1 / (dim(z) var(z))`` (Pinon et al.'s choice, scikit-learn's ``scale``), per SVM for the global
and patient SVMs, and from the variance of all training codes for the voxel-wise ones, whose
few codes of one location (one per control) vary too little to set a kernel width: with their
own variance every healthy code of a new subject fell outside; the training
length and batch follow the deep engine's options with the papers' 20 epochs and batch 1000 as
this family's defaults, and early stopping on held-out pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch

from bids_anomaly.config import option, positive_int
from bids_anomaly.errors import BadDataError, UsageError
from bids_anomaly.models.contract import BaseModel, register
from bids_anomaly.models.data import TrainingData, valid_voxels
from bids_anomaly.models.deep import engine
from bids_anomaly.models.deep.datasets import cached_volumes, check_image, split_subjects
from bids_anomaly.models.mixture import em
from bids_anomaly.models.patch_ocsvm.ocsvm import OneClassSVMs, fit_one_class_svms
from bids_anomaly.models.patch_ocsvm.siamese import (
    PairDataset,
    PatchArchitecture,
    SiamesePatchAutoEncoder,
    brain_patches,
    scaled,
    scaling,
    siamese_loss,
)

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

LOGGER = logging.getLogger(__name__)

LATENT_MODELS = ("voxel", "global", "patient", "mmst", "gmm")
SCALINGS = ("cohort", "image")
LOW_QUANTILE = 0.01
"""Low bound of the cohort scaling: the 1st percentile (Pinon et al.'s q1)."""
PAPER_TRAINING = {"epochs": 20, "batch_size": 1000}
"""The papers' training length and batch, this family's defaults for the engine's options."""
VALIDATION_FRACTION = 0.2
CODE_BATCH = 8192
"""Patches encoded per forward pass when coding a whole brain."""
SVM_CHUNK = 2048
"""Voxel-wise SVMs fitted per call (bounded memory for their samples)."""


def _odd(smallest: int):
    def parse(value: str) -> int:
        number = positive_int(value)
        if number % 2 == 0 or number < smallest:
            raise argparse.ArgumentTypeError(f"must be an odd number >= {smallest}, got {value}")
        return number
    return parse


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def _pooled_variance(store: np.ndarray, chunk: int = 65536) -> float:
    """Variance of every code value of ``(N, V, D)`` codes (streamed over voxels)."""
    total = total_sq = 0.0
    count = 0
    for start in range(0, store.shape[1], chunk):
        block = np.asarray(store[:, start:start + chunk], dtype=np.float64)
        total += block.sum()
        total_sq += (block ** 2).sum()
        count += block.size
    mean = total / max(count, 1)
    return max(total_sq / max(count, 1) - mean ** 2, 1e-12)


@dataclass
class PatchOptions:
    """What the patch autoencoder and its latent normality model are."""

    patch_side: int = option(9, "side of the square axial patches, in voxels (odd; default "
                                "{default})", flags=("--patch-side",), type=_odd(5),
                             metavar="N")
    patch_slices: int = option(1, "axial slices per patch: 1 for 2D patches, 3 for 3D patches "
                                  "(default {default})", flags=("--patch-slices",),
                               type=_odd(1), metavar="N")
    patch_scaling: str = option(
        "cohort", "intensities to [0, 1]: cohort (between the training subjects' median 1st and "
                  "99th percentiles, not clipped; Pinon et al.) or image (each image's minimum "
                  "and 99th percentile, clipped; Alaverdyan et al.); default {default}",
        flags=("--patch-scaling",), choices=SCALINGS)
    code_size: int = option(16, "length of a patch's latent code (default {default})",
                            flags=("--code-size",), type=positive_int, metavar="N")
    encoder_filters: tuple[int, ...] = option((3, 4, 12), "feature maps of the encoder's "
                                                          "convolutions before the code")
    siamese_alpha: float = option(0.005, "weight of -cos(z1, z2) of a pair in the siamese loss "
                                         "(default {default})", flags=("--siamese-alpha",),
                                  type=float, metavar="ALPHA")
    pairs_per_subject: int = option(25_000, "training pairs per subject and epoch (default "
                                            "{default}; this family trains 20 epochs of "
                                            "batches of 1000 unless --epochs and --batch-size "
                                            "say otherwise)", flags=("--pairs-per-subject",),
                                    type=positive_int, metavar="N")
    latent_model: str = option("voxel", "normality model of the codes: voxel (an OC-SVM per "
                                        "voxel), global (an ensemble of OC-SVMs), patient (an "
                                        "OC-SVM on the subject's own codes), mmst or gmm "
                                        "(default {default})", flags=("--latent-model",),
                               choices=LATENT_MODELS)
    nu: float = option(0.03, "OC-SVM nu: the fraction of training codes allowed outside (for "
                             "--latent-model patient, the expected outlier fraction; default "
                             "{default})", flags=("--nu",), type=_fraction, metavar="NU")
    latent_per_tissue: bool = option(
        False, "global, patient, mmst, gmm: one latent model per template tissue class (GM, WM, "
               "CSF), so that a code normal in one tissue is abnormal in another",
        flags=("--latent-per-tissue",), action="store_true")
    ocsvm_neighbourhood: int = option(0, "voxel: also pool the codes of the voxels within this "
                                         "many voxels (default {default})",
                                      flags=("--ocsvm-neighbourhood",), type=int, metavar="R")
    ocsvm_samples: int = option(5000, "most codes per OC-SVM (voxel-wise pools are subsampled; "
                                      "the patient's OC-SVM uses this many of its codes)")
    global_svms: int = option(5, "OC-SVMs of the global ensemble")
    global_samples: int = option(500, "codes per OC-SVM of the global ensemble")
    mixture_components: int = option(9, "components of the latent mixture")
    mixture_samples: int = option(100_000, "codes the latent mixture is fitted on")


@register
class PatchOneClassModel(BaseModel):
    """Siamese patch autoencoder codes, with a one-class SVM or mixture model of normal codes.

    See the module documentation for the variants. Parameters are :class:`PatchOptions`'
    fields, plus:

    Parameters
    ----------
    training : EngineOptions, optional
        How the autoencoder is trained (epochs, batch size, workers, checkpoints...).
    cache_dir : Path, optional
        Where preprocessed volumes (and the training codes) are cached.
    n_jobs : int
        Processes fitting the voxel-wise SVMs (the result does not depend on it).
    random_seed : int
        Seed of every random choice outside the engine (code samples of the SVMs, mixtures).
    """

    model_type = "patch-ocsvm"
    summary = ("siamese patch autoencoder + one-class SVMs (voxel-wise, global, "
               "patient-specific) or a mixture on the codes")
    options = (PatchOptions, engine.EngineOptions)
    options_scope = "the patch autoencoder with one-class models"

    def __init__(self, patch_side: int = PatchOptions.patch_side,
                 patch_slices: int = PatchOptions.patch_slices,
                 patch_scaling: str = PatchOptions.patch_scaling,
                 code_size: int = PatchOptions.code_size,
                 encoder_filters: tuple[int, ...] | list[int] = PatchOptions.encoder_filters,
                 siamese_alpha: float = PatchOptions.siamese_alpha,
                 pairs_per_subject: int = PatchOptions.pairs_per_subject,
                 latent_model: str = PatchOptions.latent_model, nu: float = PatchOptions.nu,
                 latent_per_tissue: bool = PatchOptions.latent_per_tissue,
                 ocsvm_neighbourhood: int = PatchOptions.ocsvm_neighbourhood,
                 ocsvm_samples: int = PatchOptions.ocsvm_samples,
                 global_svms: int = PatchOptions.global_svms,
                 global_samples: int = PatchOptions.global_samples,
                 mixture_components: int = PatchOptions.mixture_components,
                 mixture_samples: int = PatchOptions.mixture_samples,
                 training: engine.EngineOptions | None = None, cache_dir: Path | None = None,
                 n_jobs: int = 1, random_seed: int = 0, image_shape: list[int] | None = None,
                 architecture: dict | None = None, fit_report: dict | None = None) -> None:
        super().__init__()
        if latent_model not in LATENT_MODELS:
            raise ValueError(f"latent_model {latent_model!r}: choose one of "
                             f"{', '.join(LATENT_MODELS)}")
        if patch_scaling not in SCALINGS:
            raise ValueError(f"patch_scaling {patch_scaling!r}: choose one of "
                             f"{', '.join(SCALINGS)}")
        if patch_side % 2 == 0 or patch_slices % 2 == 0:
            raise ValueError("patch sides and slices must be odd (a patch has a centre voxel)")
        if not 0 < nu <= 1:
            raise ValueError(f"nu must be in (0, 1], not {nu}")
        if ocsvm_neighbourhood < 0:
            raise ValueError(f"ocsvm_neighbourhood must be >= 0, not {ocsvm_neighbourhood}")
        self.patch_side = patch_side
        self.patch_slices = patch_slices
        self.patch_scaling = patch_scaling
        self.code_size = code_size
        self.encoder_filters = tuple(encoder_filters)
        self.siamese_alpha = siamese_alpha
        self.pairs_per_subject = pairs_per_subject
        self.latent_model = latent_model
        self.nu = nu
        self.latent_per_tissue = latent_per_tissue
        self.ocsvm_neighbourhood = ocsvm_neighbourhood
        self.ocsvm_samples = ocsvm_samples
        self.global_svms = global_svms
        self.global_samples = global_samples
        self.mixture_components = mixture_components
        self.mixture_samples = mixture_samples
        self.training = training or engine.EngineOptions(**PAPER_TRAINING)
        self.cache_dir = cache_dir
        self.n_jobs = n_jobs
        self.random_seed = random_seed
        self.image_shape = tuple(image_shape) if image_shape else None
        self.fit_report = fit_report or {}
        self.network: SiamesePatchAutoEncoder | None = None
        if architecture is not None:
            self.network = SiamesePatchAutoEncoder(PatchArchitecture(**{
                **architecture, "filters": tuple(architecture["filters"])}))
        self.svms: OneClassSVMs | None = None
        self.support: torch.Tensor | None = None
        self.mixtures: dict[int, em.Mixture] = {}
        self.regions: torch.Tensor | None = None
        self.groups: list[int] = [0]
        self.bounds: np.ndarray | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False
                      ) -> PatchOneClassModel:
        """A model with the run's options; the engine's defaults are the papers' (see above)."""
        from bids_anomaly import bids

        training, options = engine.options_from_settings(settings, PAPER_TRAINING)
        return cls(training=training, cache_dir=bids.volume_cache_dir(settings.work_dir),
                   n_jobs=settings.execution.nprocs, random_seed=settings.execution.random_seed,
                   **options)

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """The neighbourhood pooling belongs to the voxel-wise SVMs.

        Raises
        ------
        UsageError
            ``--ocsvm-neighbourhood`` with another latent model, or a negative radius.
        """
        if given.get("ocsvm_neighbourhood", 0) < 0:
            raise UsageError("--ocsvm-neighbourhood must be >= 0")
        if given.get("ocsvm_neighbourhood") and given.get(
                "latent_model", PatchOptions.latent_model) != "voxel":
            raise UsageError("--ocsvm-neighbourhood applies to --latent-model voxel")

    # ------------------------------------------------------------------ description
    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar and the model card."""
        if self._per_tissue:
            return self._score_definition() + ", one latent model per template tissue class"
        return self._score_definition()

    def _score_definition(self) -> str:
        code = (f"codes of {self.patch_side}x{self.patch_side}x{self.patch_slices} patches "
                f"from a siamese autoencoder")
        if self.latent_model == "voxel":
            pool = (f" pooling a radius of {self.ocsvm_neighbourhood} voxel(s)"
                    if self.ocsvm_neighbourhood else "")
            return (f"-decision of the voxel's own RBF one-class SVM (nu {self.nu}){pool} on "
                    f"the {code}")
        if self.latent_model == "global":
            return (f"-mean decision of {self.global_svms} RBF one-class SVMs (nu {self.nu}) on "
                    f"the {code}")
        if self.latent_model == "patient":
            return (f"-decision of an RBF one-class SVM fitted on the subject's own {code} "
                    f"(nu {self.nu}, the expected outlier fraction)")
        return (f"negative log-likelihood of a {self.latent_model} mixture "
                f"(K={self.mixture_components}) of the {code}")

    @property
    def hyperparameters(self) -> dict:
        """Everything needed to rebuild the model."""
        values = {"patch_side": self.patch_side, "patch_slices": self.patch_slices,
                  "patch_scaling": self.patch_scaling,
                  "code_size": self.code_size, "encoder_filters": list(self.encoder_filters),
                  "siamese_alpha": self.siamese_alpha,
                  "pairs_per_subject": self.pairs_per_subject,
                  "latent_model": self.latent_model, "nu": self.nu,
                  "latent_per_tissue": self.latent_per_tissue,
                  "ocsvm_neighbourhood": self.ocsvm_neighbourhood,
                  "ocsvm_samples": self.ocsvm_samples, "global_svms": self.global_svms,
                  "global_samples": self.global_samples,
                  "mixture_components": self.mixture_components,
                  "mixture_samples": self.mixture_samples, "random_seed": self.random_seed,
                  "training": self.training.describe()}
        if self.network is not None:
            values["architecture"] = dataclasses.asdict(self.network.architecture)
            values["image_shape"] = list(self.image_shape)
        return values

    @property
    def n_channels(self) -> int | None:
        """Channels the trained autoencoder takes (None before training)."""
        if self.network is None:
            return None
        return self.network.architecture.in_channels // self.patch_slices

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The template grid (None before training)."""
        return self.image_shape

    # ------------------------------------------------------------------ codes
    def codes(self, image: torch.Tensor, valid: torch.Tensor,
              coordinates: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, code_size)`` codes of the patches centred on ``coordinates`` (default: valid).

        The image is scaled as in training (``patch_scaling``); float32 on the image's device.
        """
        if self.network is None:
            raise RuntimeError("the model is not fitted")
        if self.patch_scaling == "cohort":
            volume = scaled(image, valid.expand_as(image), self.bounds, clip=False)
        else:
            volume = scaled(image, valid.expand_as(image), scaling(image.cpu(), valid.cpu()))
        if coordinates is None:
            coordinates = torch.nonzero(valid)
        network = self.network.to(image.device).eval()
        codes = torch.empty((len(coordinates), self.code_size), device=image.device)
        with torch.no_grad():
            for start in range(0, len(coordinates), CODE_BATCH):
                part = coordinates[start:start + CODE_BATCH]
                patches = brain_patches(volume, part, self.patch_side, self.patch_slices)
                codes[start:start + len(part)] = network.encode(patches).float()
        return codes

    # ------------------------------------------------------------------ training
    def fit(self, data: TrainingData) -> None:
        """Train the siamese autoencoder on pairs of ``data``, then the latent model."""
        device = torch.device(data.device)
        volumes, self.image_shape, self.cache_dir = cached_volumes(data.subjects,
                                                                   self.cache_dir)
        if self.patch_scaling == "cohort":
            self.bounds = np.median([scaling(v[:-1], v[-1], LOW_QUANTILE) for v in volumes],
                                    axis=0)
            bounds = [self.bounds] * len(volumes)
        else:
            bounds = [scaling(v[:-1], v[-1]) for v in volumes]
        clip = self.patch_scaling == "image"
        fit_index, validation_index = split_subjects(len(volumes), self.training.seed,
                                                     VALIDATION_FRACTION)
        partners = fit_index if len(fit_index) > 1 else list(range(len(volumes)))
        seed = self.training.seed
        train_set = PairDataset(volumes, bounds, fit_index, partners, self.patch_side,
                                self.patch_slices, self.pairs_per_subject, seed, clip)
        validation_set = PairDataset(volumes, bounds, validation_index, partners,
                                     self.patch_side, self.patch_slices,
                                     max(1, min(self.pairs_per_subject, 5000)), seed + 1,
                                     clip)
        architecture = PatchArchitecture(len(data.channels) * self.patch_slices,
                                         self.patch_side, self.code_size, self.encoder_filters)
        torch.manual_seed(seed)
        self.network = SiamesePatchAutoEncoder(architecture)
        LOGGER.info("training the siamese patch autoencoder (%d parameters) on %d pairs of %d "
                    "subjects", sum(p.numel() for p in self.network.parameters()),
                    len(train_set), len(fit_index))
        identity = {"model_type": self.model_type,
                    "hyperparameters": {k: v for k, v in self.hyperparameters.items()
                                        if k not in ("training", "latent_model", "nu",
                                                     "ocsvm_neighbourhood", "ocsvm_samples",
                                                     "global_svms", "global_samples",
                                                     "mixture_components", "mixture_samples")},
                    "subjects": data.names, "channels": data.channels}
        alpha = self.siamese_alpha

        def loss(module: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                 generator: torch.Generator | None) -> torch.Tensor:
            return siamese_loss(module, batch, alpha)

        result = engine.train(self.network, loss, train_set, validation_set, self.training,
                              device, identity)
        self.network.cpu().eval()
        self.fit_report = {**result.report(),
                           "training_subjects": [data.names[i] for i in fit_index],
                           "validation_subjects": [data.names[i] for i in validation_index],
                           "parameters": sum(p.numel() for p in self.network.parameters()),
                           "pair_similarity": self._pair_similarity(validation_set)}
        self._fit_latent(data, device)

    def _pair_similarity(self, pairs: PairDataset, n: int = 2000) -> dict:
        """Mean cosine of codes of matched pairs and of mismatched ones (a shuffle), held out."""
        items = [pairs[i] for i in range(min(n, len(pairs)))]
        first = torch.stack([a for a, _ in items])
        second = torch.stack([b for _, b in items])
        with torch.no_grad():
            z1, z2 = self.network.encode(first), self.network.encode(second)
        shuffled = z2[torch.roll(torch.arange(len(z2)), 1)]
        cosine = torch.nn.functional.cosine_similarity
        return {"matched": round(float(cosine(z1, z2).mean()), 4),
                "unmatched": round(float(cosine(z1, shuffled).mean()), 4)}

    def with_latent_model(self, latent_model: str, data: TrainingData) -> PatchOneClassModel:
        """A copy sharing this model's trained autoencoder, with another latent model fitted.

        The variants differ only in their latent model: comparing them needs one autoencoder.
        """
        if self.network is None:
            raise RuntimeError("the model is not fitted")
        values = {k: v for k, v in self.hyperparameters.items()
                  if k not in ("training", "architecture", "image_shape")}
        other = type(self)(**{**values, "latent_model": latent_model}, training=self.training,
                           cache_dir=self.cache_dir, n_jobs=self.n_jobs)
        other.network, other.image_shape, other.bounds = self.network, self.image_shape, self.bounds
        other.fit_report = {k: v for k, v in self.fit_report.items() if k != "latent"}
        other._fit_latent(data, torch.device(data.device))
        return other

    @property
    def _per_tissue(self) -> bool:
        """Whether the latent models are per tissue (the voxel-wise SVMs are per voxel)."""
        return self.latent_per_tissue and self.latent_model != "voxel"

    def _group_of(self, coordinates: torch.Tensor) -> torch.Tensor:
        """The latent model group (tissue label, or 0: the whole brain) of each voxel."""
        if self.regions is None:
            return torch.zeros(len(coordinates), dtype=torch.long, device=coordinates.device)
        return self.regions.to(coordinates.device).long()[tuple(coordinates.T)]

    def _fit_latent(self, data: TrainingData, device: torch.device) -> None:
        """The latent normality model of the variant, on the training subjects' codes."""
        from bids_anomaly.models.mixture.mixture import fill_regions

        rng = np.random.default_rng(self.random_seed)
        self.svms, self.mixtures, self.regions, self.groups = None, {}, None, [0]
        if self._per_tissue:
            self.regions = fill_regions(data.load_regions()).to(torch.uint8).cpu()
            self.groups = sorted(int(g) for g in torch.unique(self.regions) if g > 0)
        if self.latent_model == "patient":
            self.fit_report["latent"] = "fitted on each subject's own codes at scoring time"
            return
        if self.latent_model == "voxel":
            self._fit_voxelwise(data, device, rng)
            return
        budget = {"global": self.global_svms * self.global_samples,
                  "mmst": self.mixture_samples, "gmm": self.mixture_samples}[self.latent_model]
        per_subject = math.ceil(budget * len(self.groups) / len(data))
        samples, labels = [], []
        for image, mask in data:
            valid = valid_voxels(image, mask)
            coordinates = torch.nonzero(valid)
            pick = np.sort(rng.choice(len(coordinates), min(per_subject, len(coordinates)),
                                      replace=False))
            samples.append(self.codes(image, valid, coordinates[pick]).cpu())
            labels.append(self._group_of(coordinates[pick]).cpu())
        codes, labels = torch.cat(samples), torch.cat(labels)
        if self.latent_model == "global":
            groups = []
            for group in self.groups:
                own = codes[labels == group]
                order = rng.permutation(len(own))
                groups += [own[order[i::self.global_svms]][:self.global_samples].double().numpy()
                           for i in range(self.global_svms)]
            self.svms = fit_one_class_svms(groups, self.nu, "scale", n_jobs=1)
            self.fit_report["latent"] = {"svms": len(groups),
                                         "support_vectors": int(len(self.svms.dual_coef))}
            return
        report = {}
        for group in self.groups:
            result = em.fit_batch(codes[labels == group].to(device).double(),
                                  self.mixture_components,
                                  self.latent_model.replace("gmm", "gaussian"),
                                  seed=self.random_seed)
            self.mixtures[group] = result.mixture.to("cpu")
            report[str(group)] = {"iterations": result.n_iter, "converged": result.converged,
                                  "mean_log_likelihood": round(result.log_likelihood, 4)}
        self.fit_report["latent"] = report if self._per_tissue else report["0"]

    def _fit_voxelwise(self, data: TrainingData, device: torch.device,
                       rng: np.random.Generator) -> None:
        """One OC-SVM per voxel inside at least half of the training brains."""
        # the masks alone (every channel of every subject is read once, for its codes, below)
        count = sum(np.asarray(nib.load(subject.mask).dataobj) > 0 for subject in data.subjects)
        self.support = torch.from_numpy(count >= max(2, math.ceil(len(data) / 2)))
        coordinates = torch.nonzero(self.support)
        n_voxels, n_subjects = len(coordinates), len(data)
        # the training codes live in a memory-mapped file (memory does not grow with subjects)
        with tempfile.TemporaryDirectory(dir=self.cache_dir, prefix="codes_") as folder:
            store = np.lib.format.open_memmap(
                Path(folder) / "codes.npy", mode="w+", dtype=np.float32,
                shape=(n_subjects, n_voxels, self.code_size))
            for number, (image, mask) in enumerate(data):
                valid = valid_voxels(image, mask)
                store[number] = self.codes(image, valid, coordinates.to(image.device)).cpu().numpy()
            # gamma from the spread of every code: a voxel's few codes vary too little for their own
            gamma = 1.0 / (self.code_size * float(_pooled_variance(store)))
            neighbours = self._neighbours(coordinates)  # (V, K)
            n_samples = n_subjects * neighbours.shape[1]
            keep = (np.sort(rng.choice(n_samples, self.ocsvm_samples, replace=False))
                    if n_samples > self.ocsvm_samples else None)
            parts = []
            for start in range(0, n_voxels, SVM_CHUNK):
                block = neighbours[start:start + SVM_CHUNK]  # (M, K)
                samples = np.asarray(store[:, block])  # (N, M, K, D)
                samples = samples.transpose(1, 0, 2, 3).reshape(len(block), n_samples, -1)
                if keep is not None:
                    samples = samples[:, keep]
                parts.append(fit_one_class_svms(samples.astype(np.float64), self.nu, gamma,
                                                n_jobs=self.n_jobs))
            del store
        self.svms = OneClassSVMs.concatenate(parts)
        self.fit_report["latent"] = {
            "svms": n_voxels, "samples_per_svm": min(n_samples, self.ocsvm_samples),
            "gamma": gamma,
            "support_vectors": int(len(self.svms.dual_coef))}

    def _neighbours(self, coordinates: torch.Tensor) -> np.ndarray:
        """``(V, K)`` support indices of each voxel's neighbours within the radius.

        The voxel itself comes first; a neighbour outside the support is replaced by it.
        """
        r = self.ocsvm_neighbourhood
        offsets = [(0, 0, 0)] + [(i, j, k) for i in range(-r, r + 1) for j in range(-r, r + 1)
                                 for k in range(-r, r + 1) if (i, j, k) != (0, 0, 0)]
        n_voxels = len(coordinates)
        index = torch.full(self.image_shape, -1, dtype=torch.long)
        index[tuple(coordinates.T)] = torch.arange(n_voxels)
        grid = torch.tensor(self.image_shape)
        columns = []
        for offset in offsets:
            shifted = coordinates + torch.tensor(offset)
            inside = ((shifted >= 0) & (shifted < grid)).all(dim=1)
            found = torch.full((n_voxels,), -1, dtype=torch.long)
            found[inside] = index[tuple(shifted[inside].T)]
            columns.append(torch.where(found >= 0, found, torch.arange(n_voxels)))
        return torch.stack(columns, dim=1).numpy()

    # ------------------------------------------------------------------ inference
    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The variant's score at every valid voxel, 0 elsewhere."""
        if self.network is None:
            raise RuntimeError("the model is not fitted")
        check_image(self.model_type, image, self.n_channels, self.image_shape)
        device = image.device
        valid = valid_voxels(image, mask)
        if self.latent_model == "voxel":
            valid = valid & self.support.to(device)
            voxel_index = torch.full(self.image_shape, -1, dtype=torch.long, device=device)
            voxel_index[self.support.to(device)] = torch.arange(
                int(self.support.sum()), device=device)
        coordinates = torch.nonzero(valid)
        score = torch.zeros(valid.shape, device=device)
        if len(coordinates) == 0:
            return score
        codes = self.codes(image, valid, coordinates)
        if self.latent_model == "voxel":
            which = voxel_index[tuple(coordinates.T)]
            values = -self.svms.to(device).decision(codes, which)
            score[tuple(coordinates.T)] = values.float()
            return score
        groups = self._group_of(coordinates)
        rng = np.random.default_rng(self.random_seed)
        if self.latent_model == "global":
            decisions = self.svms.to(device).decision(codes)  # (N, groups x SVMs)
            decisions = decisions.reshape(len(codes), len(self.groups), self.global_svms)
        for number, group in enumerate(self.groups):
            inside = groups == group
            if not inside.any():
                continue
            own = codes[inside]
            if self.latent_model == "global":
                values = -decisions[inside, number].mean(dim=1)
            elif self.latent_model == "patient":
                pick = np.sort(rng.choice(len(own), min(self.ocsvm_samples, len(own)),
                                          replace=False))
                svm = fit_one_class_svms([own[pick].double().cpu().numpy()], self.nu, "scale")
                values = -svm.to(device).decision(own)[:, 0]
            else:
                values = -self.mixtures[group].to(device).log_prob(own.double())
            score[tuple(coordinates[inside].T)] = values.float()
        return score

    # ------------------------------------------------------------------ storage
    def tensors(self) -> dict[str, torch.Tensor]:
        """Autoencoder weights, then the latent model's tensors."""
        if self.network is None:
            raise RuntimeError("the model is not fitted")
        values = {f"network.{k}": v for k, v in self.network.state_dict().items()}
        if self.svms is not None:
            values.update(self.svms.tensors("svm"))
        if self.support is not None:
            values["support"] = self.support.to(torch.uint8)
        if self.bounds is not None:
            values["bounds"] = torch.from_numpy(np.asarray(self.bounds, dtype=np.float64))
        if self.regions is not None:
            values["regions"] = self.regions
        for group, mixture in self.mixtures.items():
            values.update({f"mixture.{group}.{k}": v for k, v in mixture.tensors().items()})
        return values

    def stored_hyperparameters(self) -> dict:
        """The hyperparameters and the fit report."""
        return {**self.hyperparameters, "fit_report": self.fit_report}

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict) -> PatchOneClassModel:
        """Rebuild the (untrained) model from stored hyperparameters.

        Raises
        ------
        BadDataError
            Hyperparameters that do not describe this family.
        """
        return engine.rebuild(cls, hyperparameters, "this model")

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the autoencoder and the latent model.

        Raises
        ------
        BadDataError
            Missing or mismatched tensors.
        """
        network = {k.split(".", 1)[1]: v for k, v in tensors.items()
                   if k.startswith("network.")}
        try:
            self.network.load_state_dict(network, strict=True)
            if self.patch_scaling == "cohort":
                self.bounds = tensors["bounds"].numpy()
                if self.bounds.shape != (self.n_channels, 2):
                    raise ValueError("the cohort scaling needs (low, high) per channel")
            if self.latent_model in ("voxel", "global"):
                self.svms = OneClassSVMs.from_tensors(tensors, "svm")
            if self.latent_model == "voxel":
                self.support = tensors["support"].bool()
                if int(self.support.sum()) != self.svms.n_svms:
                    raise ValueError("one SVM per support voxel is expected")
            if self._per_tissue:
                self.regions = tensors["regions"]
                self.groups = sorted(int(g) for g in torch.unique(self.regions) if g > 0)
            if self.latent_model == "global" and (
                    self.svms.n_svms != len(self.groups) * self.global_svms):
                raise ValueError(f"{self.global_svms} SVMs per group are expected")
            if self.latent_model in ("mmst", "gmm"):
                family = self.latent_model.replace("gmm", "gaussian")
                self.mixtures = {group: em.Mixture.from_tensors(family, {
                    k.split(".", 2)[2]: v for k, v in tensors.items()
                    if k.startswith(f"mixture.{group}.")}) for group in self.groups}
        except (AttributeError, KeyError, RuntimeError, ValueError) as error:
            raise BadDataError(f"the weights do not match the {self.model_type} model stored "
                               f"with them: {str(error)[:300]}") from error
        self.network.eval()

