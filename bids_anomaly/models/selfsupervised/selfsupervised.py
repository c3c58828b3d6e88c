"""Self-supervised families: networks that learn what is abnormal from synthetic anomalies.

Reconstruction autoencoders rarely beat a FLAIR threshold (Meissen et al. 2021); the methods
that lead recent benchmarks learn from anomalies *inserted* into training images instead. The
supervision is synthetic (:mod:`bids_anomaly.models.selfsupervised.anomalies`), so both families
train on healthy controls and equally on a cohort that contains patients, without any lesion label:

- ``segment`` (FPI / PII / NSA style; Tan et al. 2021/2022, Schlüter et al. 2022): a MONAI
  U-Net predicts, per voxel, whether it lies in an inserted anomaly (binary cross-entropy plus
  soft Dice on the anomaly mask). Score: the predicted logit, as ``softplus(logit)`` so that it
  is >= 0 like every map, smoothed inside the brain.
- ``restore`` (DISYRe; Naval Marimont et al. 2024): a MONAI ``DiffusionModelUNet`` maps an image
  corrupted with severity ``s`` in [0, 1] (the anomalies' intensity changes scaled by ``s``)
  back to the healthy image, with ``s`` as the network's "timestep". Inference starts at
  ``s = 1`` and restores in ``restore_steps`` steps (``x <- x0 + (s_next / s) (x - x0)``, where
  ``x0`` is the network's healthy estimate at severity ``s``); the score is the residual
  ``x - x0`` per channel in each channel's direction, smoothed and averaged like the
  reconstruction models'.

``--direction FLAIR:+ T1w:-`` sets the sign of the inserted anomalies on those channels (which
kind of lesion to learn) and, for ``restore``, which residuals count. Both run in 2D, 2.5D and
3D through the deep engine (AMP, DDP, resume, early stopping).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bids_anomaly.config import option
from bids_anomaly.errors import MissingInputError, UsageError
from bids_anomaly.models.contract import register
from bids_anomaly.models.data import TrainingData, valid_voxels
from bids_anomaly.models.deep import engine
from bids_anomaly.models.deep.networks import Architecture, Reconstructor
from bids_anomaly.models.directions import describe
from bids_anomaly.models.reconstruction import (
    DeepModel,
    ReconstructionModel,
    ReconstructionOptions,
)
from bids_anomaly.models.selfsupervised.anomalies import (
    CONTRASTS,
    SHAPES,
    TEXTURES,
    AnomalyGenerator,
    GeneratorOptions,
    LesionShapes,
)

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

LOGGER = logging.getLogger(__name__)

SIGN_VALUES = {"+": 1.0, "-": -1.0, "+-": 0.0}
"""A direction as the generator's contrast sign (0: drawn per anomaly)."""


def _same_as(name: str) -> dataclasses.Field:
    """The reconstruction models' option ``name`` (same default, help and flag)."""
    item = {f.name: f for f in dataclasses.fields(ReconstructionOptions)}[name]
    if item.default_factory is not dataclasses.MISSING:
        return field(default_factory=item.default_factory, metadata=item.metadata)
    return field(default=item.default, metadata=item.metadata)


@dataclass
class SelfSupervisedOptions:
    """What a self-supervised model is and which anomalies it learns from."""

    mode: str = _same_as("mode")
    context: int = _same_as("context")
    patch_size: int = _same_as("patch_size")
    width: int = _same_as("width")
    patches_per_volume: int = _same_as("patches_per_volume")
    smoothing: float = _same_as("smoothing")
    direction: list[str] = _same_as("direction")
    anomaly_shapes: list[str] = option(
        help="shapes of the synthetic anomalies: ellipsoid, blob, lesion (real masks of "
             "--lesion-shapes); default ellipsoid blob", factory=lambda: ["ellipsoid", "blob"],
        flags=("--anomaly-shapes",), nargs="+", choices=SHAPES)
    anomaly_textures: list[str] = option(
        help="textures: shift (intensity change), noise, foreign (a patch of another image), "
             "poisson (its gradients blended in); default all", factory=lambda: list(TEXTURES),
        flags=("--anomaly-textures",), nargs="+", choices=TEXTURES)
    anomaly_contrast: str = option(
        "ms", "sign of the anomalies per modality: ms (FLAIR/T2w bright, T1w dark), stroke, "
              "tumour or free (default {default}); --direction overrides named channels",
        flags=("--anomaly-contrast",), choices=tuple(CONTRASTS))
    lesion_shapes: str | None = option(
        None, "folder of binary lesion masks in MNI space (e.g. lesion_shapes/mslub) for the "
              "lesion shape", flags=("--lesion-shapes",), metavar="DIR")
    anomaly_probability: float = option(0.8, "chance that a training image gets anomalies")
    anomaly_radius: tuple[float, float] = option(
        (1.5, 8.0), "smallest and largest radius of ellipsoids and blobs, in voxels")
    restore_steps: int = option(
        4, "restore: restoration steps at inference (default {default})",
        flags=("--restore-steps",), type=int, metavar="N")
    finetune: str | None = option(
        None, "segment: start from the weights of the trained segment model MODEL (same "
              "channels and network options) instead of a fresh network; with --annotations, "
              "fine-tune it on the annotated lesions mixed into the synthetic anomalies",
        flags=("--finetune",), metavar="MODEL")
    negative_trim: float = option(
        0.0, "segment: leave the fraction F of 'normal' voxels with the largest loss out of "
             "every step, so that real lesions of a cohort with patients are not learnt as "
             "normal (default {default})", flags=("--negative-trim",), type=float,
        metavar="F")


class SelfSupervisedModel(DeepModel):
    """A deep model trained on images with synthetic anomalies (see the module documentation).

    Parameters
    ----------
    anomaly_shapes, anomaly_textures : list of str
        What the generator draws (:data:`~.anomalies.SHAPES`, :data:`~.anomalies.TEXTURES`).
    anomaly_contrast : str
        The contrast model (:data:`~.anomalies.CONTRASTS`), overridden by ``direction``.
    lesion_shapes : str, optional
        Folder of lesion masks for the ``lesion`` shape.
    anomaly_probability : float
        Chance that a training image gets anomalies.
    anomaly_radius : (float, float)
        Radius range of ellipsoids and blobs, in voxels.
    restore_steps : int
        Restoration steps at inference (``restore``).
    negative_trim : float
        ``segment``: fraction of the voxels labelled normal whose loss is left out of each step
        (the largest losses: real lesions of a contaminated cohort look like anomalies).
    **deep
        The options of :class:`~.reconstruction.DeepModel` (mode, width, training, ...).
    """

    options = (SelfSupervisedOptions, engine.EngineOptions)
    options_scope = "training a self-supervised model"
    input_multiple: ClassVar[int] = 8

    def __init__(self, anomaly_shapes: list[str] | None = None,
                 anomaly_textures: list[str] | None = None, anomaly_contrast: str = "ms",
                 lesion_shapes: str | None = None, anomaly_probability: float = 0.8,
                 anomaly_radius: tuple[float, float] = (1.5, 8.0), restore_steps: int = 4,
                 negative_trim: float = 0.0, finetune: str | None = None, **deep) -> None:
        super().__init__(**deep)
        self.finetune = finetune
        self.finetune_dir: Path | None = None  # where the model to fine-tune is (training)
        self.generator_options = GeneratorOptions(
            shapes=tuple(anomaly_shapes or ("ellipsoid", "blob")),
            textures=tuple(anomaly_textures or TEXTURES), contrast=anomaly_contrast,
            radius=tuple(float(r) for r in anomaly_radius), probability=anomaly_probability)
        if "lesion" in self.generator_options.shapes and not lesion_shapes:
            raise UsageError("--anomaly-shapes lesion needs --lesion-shapes DIR")
        if restore_steps < 1:
            raise UsageError("--restore-steps must be at least 1")
        if not 0 <= negative_trim < 0.5:
            raise UsageError("--negative-trim must be in [0, 0.5)")
        self.negative_trim = negative_trim
        self.lesion_shapes = str(lesion_shapes) if lesion_shapes else None
        self.restore_steps = restore_steps
        self.anomalies: AnomalyGenerator | None = None

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """Directions parse; a lesion-shape folder exists and goes with the lesion shape.

        Raises
        ------
        UsageError
            A bad direction, a missing folder, or the lesion shape without a folder.
        """
        super().check_options(given, single_subject)
        folder = given.get("lesion_shapes")
        if folder is not None and not Path(folder).is_dir():
            raise UsageError(f"--lesion-shapes {folder}: not a folder")
        if "lesion" in given.get("anomaly_shapes", []) and folder is None:
            raise UsageError("--anomaly-shapes lesion needs --lesion-shapes DIR")

    @property
    def hyperparameters(self) -> dict:
        """The deep options plus the generator's (stored with the weights)."""
        options = self.generator_options
        return {**super().hyperparameters, "anomaly_shapes": list(options.shapes),
                "anomaly_textures": list(options.textures),
                "anomaly_contrast": options.contrast, "lesion_shapes": self.lesion_shapes,
                "anomaly_probability": options.probability,
                "anomaly_radius": list(options.radius), "restore_steps": self.restore_steps,
                "negative_trim": self.negative_trim,
                **({"finetune": self.finetune} if self.finetune else {})}

    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False
                      ) -> SelfSupervisedModel:
        """A model with the run's options; ``--finetune`` names a trained model to start from.

        Raises
        ------
        UsageError
            ``--finetune`` with another family than segment.
        MissingInputError
            ``--finetune`` names no trained model.
        """
        from bids_anomaly import bids

        model = super().from_settings(settings, single_subject)
        if model.finetune:
            if not cls.learns_from_annotations:
                raise UsageError(f"--finetune applies to segment, not {cls.model_type}")
            model.finetune_dir = bids.model_dir(settings.output_dir, model.finetune)
            if not (model.finetune_dir / "model.json").is_file():
                raise MissingInputError(f"--finetune {model.finetune}: no trained model in "
                                        f"{model.finetune_dir}")
        return model

    def initial_state(self, architecture, data: TrainingData) -> dict | None:
        """The weights of the ``--finetune`` model, checked to fit this network.

        Raises
        ------
        UsageError
            The model to fine-tune is another family, or has other channels or options.
        """
        if self.finetune_dir is None:
            return None
        from bids_anomaly.models.store import load_model

        trained, card = load_model(self.finetune_dir)
        if card.model_type != self.model_type:
            raise UsageError(f"--finetune {card.name}: a {card.model_type} model, not "
                             f"{self.model_type}")
        if list(card.channels) != list(data.channels):
            raise UsageError(f"--finetune {card.name}: trained on {', '.join(card.channels)}, "
                             f"these data have {', '.join(data.channels)} (--channels)")
        keys = ("mode", "width", "context", "patch_size", "latent")
        ours, theirs = self.hyperparameters, trained.hyperparameters
        different = [k for k in keys if ours.get(k) != theirs.get(k)]
        if different or trained.image_shape != self.image_shape:
            raise UsageError(f"--finetune {card.name}: its network differs "
                             f"({', '.join(different) or 'grid'}); give the same options")
        LOGGER.info("fine-tuning the weights of model %s", card.name)
        return trained.network.state_dict()

    # ----------------------------------------------------------------- training
    def _generator_for(self, data: TrainingData) -> AnomalyGenerator:
        """The anomaly generator for the training channels (2.5D: each slice of a window)."""
        lesions = None
        if "lesion" in self.generator_options.shapes:
            import nibabel as nib

            grid = nib.load(str(data.subjects[0].channels[0]))
            lesions = LesionShapes(Path(self.lesion_shapes), grid)
        window = 2 * self.context + 1
        channels = [name for name in data.channels for _ in range(window)]
        signs = {channel: SIGN_VALUES[sign] for channel, sign in self.direction.items()}
        try:
            return AnomalyGenerator(self.generator_options, channels, lesions, signs=signs,
                                    window=window)
        except ValueError as error:  # e.g. microbleeds without a T2*-weighted channel
            raise UsageError(f"--anomaly-shapes: {error}") from error

    def fit(self, data: TrainingData) -> None:
        """Train on ``data`` (controls, or a cohort with patients: the labels are synthetic)."""
        self.anomalies = self._generator_for(data)
        super().fit(data)

    @staticmethod
    def _random_source(generator: torch.Generator | None) -> torch.Generator:
        """A CPU generator seeded from ``generator`` or the global random state.

        Validation passes a fixed-seed generator; training uses the global state, which the
        engine seeds and restores on resume: the same seed gives the same anomalies.
        """
        if generator is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)))
        else:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator,
                                     device=generator.device))
        return torch.Generator().manual_seed(seed)

    def _corrupt_batch(self, inputs: torch.Tensor, mask: torch.Tensor,
                       generator: torch.Generator | None, severity: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert anomalies into each item: the corrupted batch and the anomaly masks.

        ``inputs`` ``(N, C', *spatial)``, ``mask`` ``(N, 1, *spatial)``; the image of the next
        item is the donor of foreign and Poisson textures. Returns the corrupted inputs and
        ``(N, 1, *spatial)`` masks (0..1), on the inputs' device.
        """
        source = self._random_source(generator)
        cpu_inputs, cpu_mask = inputs.detach().float().cpu(), mask.detach().cpu()
        corrupted, masks = [], []
        for index in range(inputs.shape[0]):
            donor = cpu_inputs[(index + 1) % inputs.shape[0]]
            result = self.anomalies(cpu_inputs[index], cpu_mask[index, 0] > 0, source, donor,
                                    None if severity is None else float(severity[index]))
            corrupted.append(result.image)
            masks.append(result.mask[None])
        return (torch.stack(corrupted).to(inputs.device, inputs.dtype),
                torch.stack(masks).to(inputs.device))


@register
class SegmentModel(SelfSupervisedModel):
    """U-Net that segments synthetic anomalies; the score is its logit (FPI / PII / NSA)."""

    model_type = "segment"
    summary = "U-Net trained to segment synthetic anomalies; score: predicted logit"
    learns_from_annotations: ClassVar[bool] = True

    def output_channels(self, channels: int) -> int:
        """One logit per voxel."""
        return 1

    def build_network(self, architecture: Architecture) -> nn.Module:
        """MONAI ``UNet`` with three stride-2 levels and one output channel."""
        from monai.networks import nets

        a, w = architecture, architecture.width
        return nets.UNet(spatial_dims=a.spatial_dims, in_channels=a.in_channels,
                         out_channels=a.out_channels, channels=(w, 2 * w, 4 * w, 8 * w),
                         strides=(2, 2, 2), num_res_units=2, norm="INSTANCE")

    def _batch_loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                    generator: torch.Generator | None) -> torch.Tensor:
        """Binary cross-entropy plus soft Dice of the predicted anomaly mask, in the brain."""
        from monai.losses import DiceLoss

        inputs, _, mask = batch
        corrupted, target = self._corrupt_batch(inputs, mask, generator)
        # annotated lesions (mask 2, train --annotations) are anomalies too
        target = torch.maximum(target, (mask > 1.5).to(target.dtype))
        logits = module(corrupted)[0].float()
        brain = mask > 0
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        brain = brain & ~trimmed_negatives(bce.detach(), brain & (target < 0.5),
                                           self.negative_trim)
        bce = (bce * brain).sum() / brain.sum().clamp_min(1.0)
        outside = torch.where(brain, logits, torch.full_like(logits, -20.0))
        dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)(outside, target)
        return bce + dice

    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar."""
        return (f"segment ({self.mode}) U-Net trained on synthetic anomalies: softplus of the "
                f"predicted anomaly logit, Gaussian-smoothed (sigma {self.smoothing} voxels) "
                "inside the brain")

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``softplus(logit)``, smoothed inside the valid brain; 0 outside it."""
        if self.network is None:
            raise RuntimeError("the model is not fitted")
        valid = valid_voxels(image, mask)
        logits = self.infer(torch.where(valid, image, 0.0))
        return self.smoothed(F.softplus(logits), valid)[0]


def trimmed_negatives(loss: torch.Tensor, negatives: torch.Tensor, fraction: float
                      ) -> torch.Tensor:
    """The ``fraction`` of ``negatives`` with the largest ``loss`` (to leave out of a step).

    >>> loss = torch.arange(10.0)
    >>> trimmed_negatives(loss, loss < 8, 0.25).nonzero().flatten().tolist()
    [6, 7]
    """
    count = int(negatives.sum())
    drop = int(fraction * count)
    if drop == 0:
        return torch.zeros_like(negatives)
    cut = torch.topk(loss[negatives], drop).values.min()
    return negatives & (loss >= cut)


class ConditionedRestorer(Reconstructor):
    """MONAI ``DiffusionModelUNet`` run with the corruption severity as its timestep."""

    TIMESTEPS = 1000
    """Severity 1 is timestep 1000 (the scale of the sinusoidal embedding)."""

    def forward(self, x: torch.Tensor, severity: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The healthy estimate of ``x`` at ``severity`` (``(N,)``, default 1)."""
        if severity is None:
            severity = x.new_ones(x.shape[0])
        return self.net(x, timesteps=severity.float() * self.TIMESTEPS), x.new_zeros(())


@register
class RestoreModel(SelfSupervisedModel, ReconstructionModel):
    """Diffusion-inspired synthetic restoration (DISYRe): score = restoration residual."""

    model_type = "restore"
    summary = ("diffusion U-Net restoring synthetic anomalies by severity (DISYRe); score: "
               "restoration residual")
    reconstructor = ConditionedRestorer
    input_multiple = 8

    def build_network(self, architecture: Architecture) -> nn.Module:
        """MONAI ``DiffusionModelUNet``: three levels, no attention, severity-conditioned."""
        from monai.networks import nets

        a, w = architecture, architecture.width
        return nets.DiffusionModelUNet(
            spatial_dims=a.spatial_dims, in_channels=a.in_channels,
            out_channels=a.out_channels, channels=(w, 2 * w, 4 * w),
            attention_levels=(False, False, False), num_res_blocks=1,
            norm_num_groups=math.gcd(w, 8))

    def _batch_loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                    generator: torch.Generator | None) -> torch.Tensor:
        """Masked squared error of the restored image at a random severity per item."""
        inputs, target, mask = batch
        if generator is None:
            severity = torch.rand(inputs.shape[0]) * 0.95 + 0.05
        else:
            severity = torch.rand(inputs.shape[0], generator=generator,
                                  device=generator.device).cpu() * 0.95 + 0.05
        corrupted, _ = self._corrupt_batch(inputs, mask, generator, severity)
        restored, _ = module(corrupted, severity.to(inputs.device))
        error = ((restored.float() - target) ** 2 * mask).sum()
        return error / (mask.sum() * target.shape[1]).clamp_min(1.0)

    def reconstruct(self, image: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """The healthy estimate after ``restore_steps`` steps from severity 1 down to 0."""
        levels = torch.linspace(1.0, 0.0, self.restore_steps + 1).tolist()
        current = image
        for level, following in zip(levels[:-1], levels[1:], strict=True):
            healthy = self.infer(current, condition=level, batch_size=batch_size)
            current = healthy + (following / level) * (current - healthy)
        return healthy

    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar."""
        signs = describe(self.channels, self.direction, self.residual)
        return (f"restore ({self.mode}, DISYRe, {self.restore_steps} steps): residual x - "
                f"x_restored of the robust-z-scored intensities ({signs}), mean over channels, "
                f"Gaussian-smoothed (sigma {self.smoothing} voxels) inside the brain")

