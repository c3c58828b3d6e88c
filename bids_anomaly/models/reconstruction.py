"""Deep reconstruction models: AE, VAE, VQ-VAE, ViT autoencoder and denoising AE.

A network trained to reconstruct healthy brains reconstructs a lesion as the healthy tissue it
expects there; the anomaly score of a voxel is the reconstruction residual, per channel, combined
over channels (mean of the absolute residuals), smoothed inside the brain and 0 outside it.

Three ways to see a brain, the ``mode``:

- ``2d``: axial slices (padded to the network's multiple), inference on all slices in batches;
- ``2.5d``: the same with ``context`` neighbouring slices on each side as extra input channels,
  reconstructing the centre slice;
- ``3d``: random patches in training, MONAI sliding-window inference (Gaussian-weighted
  overlapping windows) on the whole volume.

Any number of channels (the fused modalities) goes in; the same channels come out. The weights
are stored as safetensors with the architecture as plain hyperparameters; loading rebuilds the
network from them and refuses weights that do not fit.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from bids_anomaly.config import option, positive_int
from bids_anomaly.errors import BadDataError, UsageError
from bids_anomaly.models.contract import BaseModel, register
from bids_anomaly.models.data import TrainingData, valid_voxels
from bids_anomaly.models.deep import engine
from bids_anomaly.models.deep.datasets import (
    PatchDataset,
    SliceDataset,
    cached_volumes,
    check_image,
    pad_to,
    padded_shape,
    split_subjects,
    stack_slices,
)
from bids_anomaly.models.deep.networks import (
    Architecture,
    QuantisedReconstructor,
    Reconstructor,
    TokenReconstructor,
    VariationalReconstructor,
    check_input_shape,
    coarse_noise,
)
from bids_anomaly.models.directions import (
    check_channels,
    describe,
    directed,
    direction_option,
    parse_directions,
)

if TYPE_CHECKING:
    from bids_anomaly.config import Settings

LOGGER = logging.getLogger(__name__)

MODES = ("2d", "2.5d", "3d")
RESIDUALS = ("both", "hyper", "hypo")


@dataclass
class ReconstructionOptions:
    """What a reconstruction model is (its training is :class:`~.deep.engine.EngineOptions`)."""

    mode: str = option(
        "2d", "axial slices (2d), slices with their neighbours as extra channels (2.5d) or 3D "
              "patches with sliding-window inference (3d); default {default}",
        flags=("--mode",), choices=MODES)
    context: int = option(1, "neighbouring slices on each side in 2.5d mode")
    patch_size: int = option(64, "3d: side of the training patches and inference windows "
                                 "(default {default})", flags=("--patch-size",),
                             type=positive_int, metavar="VOXELS")
    width: int = option(32, "feature maps of the first network level (default {default})",
                        flags=("--width",), type=positive_int)
    latent: int = option(16, "bottleneck size: AE bottleneck channels, VAE code length / 16, "
                             "VQ-VAE embedding size (default {default})", flags=("--latent",),
                         type=positive_int)
    vit_patch: int = option(16, "token side of the ViT autoencoder")
    kl_weight: float = option(1e-3, "weight of the VAE's KL divergence per voxel")
    noise_std: float = option(0.2, "standard deviation of the denoising AE's coarse noise")
    noise_scale: int = option(8, "grid coarseness of the denoising AE's noise")
    patches_per_volume: int = option(16, "training patches per subject and epoch in 3d mode")
    smoothing: float = option(1.0, "sigma, in voxels, of the residual's Gaussian smoothing")
    residual: str = option(
        "both", "which residuals are anomalous: both signs, only brighter (hyper, e.g. FLAIR "
                "lesions) or only darker (hypo) than the reconstruction (default {default})",
        flags=("--residual",), choices=RESIDUALS)
    direction: list[str] = direction_option()


class DeepModel(BaseModel):
    """A MONAI network on slices, 2.5D stacks or 3D patches: training, inference, storage.

    What the network learns and how its output becomes a score is the subclass's:
    :class:`ReconstructionModel` (residuals of a reconstruction), and the self-supervised
    families of :mod:`bids_anomaly.models.selfsupervised.selfsupervised`.

    Parameters
    ----------
    mode : str
        ``2d``, ``2.5d`` or ``3d`` (see the module documentation).
    context : int
        Neighbouring slices on each side in ``2.5d`` mode.
    patch_size : int
        Side of the training patches and of the inference windows in ``3d`` mode.
    width : int
        Feature maps of the first network level.
    latent : int
        Bottleneck size (see :class:`~bids_anomaly.models.deep.networks.Architecture`).
    vit_patch : int
        Token side of the ViT autoencoder.
    kl_weight : float
        Weight of the VAE's KL divergence per voxel.
    noise_std, noise_scale : float, int
        The denoising AE's coarse noise: standard deviation and grid coarseness.
    patches_per_volume : int
        Training patches drawn per subject and epoch in ``3d`` mode.
    smoothing : float
        Standard deviation, in voxels, of the Gaussian smoothing of the residual (0: none).
    residual : str
        ``both`` (absolute residual), ``hyper`` (only voxels brighter than their
        reconstruction, as FLAIR lesions) or ``hypo``: the direction of channels that
        ``direction`` does not name.
    direction : list of str or dict, optional
        Per-channel directions, ``["FLAIR:+", "T1w:-"]`` (see :mod:`.directions`).
    channels : list of str, optional
        The channels' names (set by :meth:`fit`; the directions refer to them).
    training : EngineOptions, optional
        How to train (epochs, batch size, learning rate, workers, checkpoints...).
    cache_dir : Path, optional
        Where preprocessed volumes are cached for training (a temporary folder by default).
    """

    options = (ReconstructionOptions, engine.EngineOptions)
    options_scope = "training a deep model"
    reconstructor: ClassVar[type[Reconstructor]] = Reconstructor
    """How the family's network is run (what its loss adds to the reconstruction error)."""
    input_multiple: ClassVar[int] = 16
    """Every spatial size of an input must be a multiple of this (the total down-sampling)."""

    def __init__(self, mode: str = ReconstructionOptions.mode,
                 context: int = ReconstructionOptions.context,
                 patch_size: int = ReconstructionOptions.patch_size,
                 width: int = ReconstructionOptions.width,
                 latent: int = ReconstructionOptions.latent,
                 vit_patch: int = ReconstructionOptions.vit_patch,
                 kl_weight: float = ReconstructionOptions.kl_weight,
                 noise_std: float = ReconstructionOptions.noise_std,
                 noise_scale: int = ReconstructionOptions.noise_scale,
                 patches_per_volume: int = ReconstructionOptions.patches_per_volume,
                 smoothing: float = ReconstructionOptions.smoothing,
                 residual: str = ReconstructionOptions.residual,
                 direction: list[str] | dict[str, str] | None = None,
                 channels: list[str] | None = None,
                 training: engine.EngineOptions | None = None,
                 cache_dir: Path | None = None, architecture: dict | None = None,
                 image_shape: tuple[int, ...] | None = None, fit_report: dict | None = None
                 ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        if residual not in RESIDUALS:
            raise ValueError(f"residual {residual!r}: choose one of {', '.join(RESIDUALS)}")
        self.mode = mode
        self.context = context if mode == "2.5d" else 0
        self.patch_size = patch_size
        self.width = width
        self.latent = latent
        self.vit_patch = vit_patch
        self.kl_weight = kl_weight
        self.noise_std = noise_std
        self.noise_scale = noise_scale
        self.patches_per_volume = patches_per_volume
        self.smoothing = smoothing
        self.residual = residual
        self.direction = parse_directions(direction)
        self.channels = list(channels) if channels else None
        self.training = training or engine.EngineOptions()
        self.cache_dir = cache_dir
        self.image_shape = tuple(image_shape) if image_shape else None
        self.fit_report = fit_report or {}
        self.network: Reconstructor | None = None
        if architecture is not None:
            self.network = self._new_network(Architecture(
                **{**architecture, "input_shape": tuple(architecture["input_shape"])}))

    @classmethod
    def from_settings(cls, settings: Settings, single_subject: bool = False
                      ) -> DeepModel:
        """A model with the run's options; checkpoints go to ``WORK/train/model-<name>``."""
        from bids_anomaly import bids

        training, options = engine.options_from_settings(settings)
        return cls(training=training, cache_dir=bids.volume_cache_dir(settings.work_dir),
                   **options)

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """TensorBoard logging needs its package.

        Raises
        ------
        UsageError
            ``--tensorboard`` without the ``tensorboard`` package.
        """
        if given.get("tensorboard") and importlib.util.find_spec("tensorboard") is None:
            raise UsageError("--tensorboard needs the tensorboard package: pip install "
                             "tensorboard")
        parse_directions(given.get("direction"))

    # ----------------------------------------------------------------- description
    @property
    def hyperparameters(self) -> dict:
        """Everything needed to rebuild the model (stored with the weights)."""
        values = {"mode": self.mode, "context": self.context, "patch_size": self.patch_size,
                  "width": self.width, "latent": self.latent, "vit_patch": self.vit_patch,
                  "kl_weight": self.kl_weight, "noise_std": self.noise_std,
                  "noise_scale": self.noise_scale,
                  "patches_per_volume": self.patches_per_volume, "smoothing": self.smoothing,
                  "residual": self.residual, "direction": self.direction,
                  "channels": self.channels, "training": self.training.describe()}
        if self.network is not None:
            values["architecture"] = asdict(self.network.architecture)
            values["image_shape"] = list(self.image_shape)
        return values

    @property
    def n_channels(self) -> int | None:
        """Channels the trained network takes and returns (None before training)."""
        if self.network is None:
            return None
        return self.network.architecture.in_channels // (2 * self.context + 1)

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The grid of the training volumes (None before training)."""
        return self.image_shape

    # ----------------------------------------------------------------- network
    def _input_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        multiple = self.input_size_multiple()
        if self.mode == "3d":
            side = padded_shape((self.patch_size,), multiple)[0]
            return (side,) * 3
        return padded_shape(tuple(image_shape[:2]), multiple)

    def output_channels(self, channels: int) -> int:
        """Channels the network returns for ``channels`` input modalities (the same here)."""
        return channels

    def input_size_multiple(self) -> int:
        """Every spatial size of an input must be a multiple of this."""
        return self.input_multiple

    def build_network(self, architecture: Architecture) -> nn.Module:
        """The family's MONAI network for ``architecture`` (untrained)."""
        raise NotImplementedError

    def _new_network(self, architecture: Architecture) -> Reconstructor:
        check_input_shape(architecture, self.input_size_multiple())
        return self.reconstructor(architecture, self.build_network(architecture),
                                  kl_weight=self.kl_weight)

    def _corrupt(self, inputs: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        """What the network sees in training (the input itself; the denoising AE adds noise)."""
        return inputs

    def _batch_loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                    generator: torch.Generator | None) -> torch.Tensor:
        """Masked mean squared reconstruction error plus the model's regulariser."""
        inputs, target, mask = batch
        recon, extra = module(self._corrupt(inputs, mask, generator))
        error = ((recon.float() - target) ** 2 * mask).sum()
        count = (mask.sum() * target.shape[1]).clamp_min(1.0)
        return error / count + extra.float()

    # ----------------------------------------------------------------- training
    def fit(self, data: TrainingData) -> None:
        """Train on ``data`` (healthy subjects), early-stopping on some of them held out."""
        from bids_anomaly.models.deep import distributed
        check_channels(self.direction, list(data.channels))
        self.channels = list(data.channels)
        device = torch.device(data.device)
        seed = self.training.seed
        volumes, self.image_shape, self.cache_dir = cached_volumes(data.subjects,
                                                                   self.cache_dir)
        channels = len(data.channels)
        fit_index, validation_index = split_subjects(len(volumes), seed)
        fit_index, validation_index, repeats = self._with_annotated(data, fit_index,
                                                                    validation_index)
        input_shape = self._input_shape(self.image_shape)
        if self.mode == "3d":
            def dataset(index: list[int]) -> PatchDataset:
                return PatchDataset([volumes[i] for i in index], input_shape,
                                    self.patches_per_volume, seed)
        else:
            def dataset(index: list[int]) -> SliceDataset:
                return SliceDataset([volumes[i] for i in index], input_shape, self.context)
        architecture = Architecture(
            model_type=self.model_type, spatial_dims=3 if self.mode == "3d" else 2,
            in_channels=channels * (2 * self.context + 1),
            out_channels=self.output_channels(channels),
            input_shape=input_shape, width=self.width, latent=self.latent,
            vit_patch=self.vit_patch)
        torch.manual_seed(seed)
        self.network = self._new_network(architecture)
        initial = self.initial_state(architecture, data)
        if initial is not None:
            self.network.load_state_dict(initial)
        train_set = dataset([i for i in fit_index for _ in range(repeats.get(i, 1))])
        validation_set = dataset(validation_index)
        LOGGER.info("training %s (%s, %d parameters) on %d samples from %d subjects, "
                    "validating on %d samples from %d", self.model_type, self.mode,
                    sum(p.numel() for p in self.network.parameters()), len(train_set),
                    len(fit_index), len(validation_set), len(validation_index))
        identity = {"model_type": self.model_type,
                    "hyperparameters": {k: v for k, v in self.hyperparameters.items()
                                        if k != "training"},
                    "subjects": data.names, "channels": data.channels,
                    "world_size": distributed.world_size_now()}
        result = engine.train(self.network, self._batch_loss, train_set, validation_set,
                              self.training, device, identity)
        self.network.cpu().eval()
        self.fit_report = {**result.report(), "training_subjects": [data.names[i] for i in
                                                                    fit_index],
                           "validation_subjects": [data.names[i] for i in validation_index],
                           "parameters": sum(p.numel() for p in self.network.parameters())}

    def _with_annotated(self, data: TrainingData, fit_index: list[int],
                        validation_index: list[int]
                        ) -> tuple[list[int], list[int], dict[int, int]]:
        """Annotated subjects train (never only validate), repeated to half the samples.

        Returns the fitting and validation indices and the repeats of each annotated subject.

        Raises
        ------
        UsageError
            Annotated subjects given to a family that does not learn from annotations.
        """
        annotated = data.annotated
        if not annotated:
            return fit_index, validation_index, {}
        if not self.learns_from_annotations:
            raise UsageError(f"the {self.model_type} family does not learn from annotated "
                             "lesions")
        controls = [i for i in fit_index if i not in annotated]
        validation = [i for i in validation_index if i not in annotated] or controls[:1] or [
            annotated[0]]
        controls = [i for i in controls if i not in validation] or controls
        repeats = max(1, round(len(controls) / len(annotated)))
        return sorted(set(controls) | set(annotated)), validation, {i: repeats
                                                                     for i in annotated}

    def initial_state(self, architecture: Architecture, data: TrainingData) -> dict | None:
        """Weights to start training from (None: a fresh initialisation)."""
        return None

    # ----------------------------------------------------------------- inference
    def _check_input(self, image: torch.Tensor) -> None:
        check_image(self.model_type, image, self.n_channels, self.image_shape)

    def infer(self, image: torch.Tensor, condition: float | None = None,
              batch_size: int | None = None) -> torch.Tensor:
        """The network's output for a ``(C, X, Y, Z)`` image (brain-masked input).

        Slices (or sliding windows in 3D) in batches; ``condition`` is passed to networks that
        take one (a restoration model's severity). Returns ``(C_out, X, Y, Z)``.
        """
        if self.network is None:
            raise RuntimeError("the model is not fitted")
        self._check_input(image)
        device = image.device
        network = self.network.to(device).eval()
        batch_size = batch_size or self.training.batch_size
        dtype = engine.autocast_dtype(self.training.precision, device)

        def predict(batch: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                if condition is None:
                    return network(batch)[0].float()
                level = torch.full((batch.shape[0],), float(condition), device=device)
                return network(batch, level)[0].float()

        with torch.no_grad():
            if self.mode == "3d":
                from monai.inferers import SlidingWindowInferer

                inferer = SlidingWindowInferer(roi_size=network.architecture.input_shape,
                                               sw_batch_size=batch_size, overlap=0.5,
                                               mode="gaussian")
                return inferer(image[None], predict)[0]
            stacks = stack_slices(image, self.context)  # (Z, C', X, Y)
            padded, crop = pad_to(stacks, network.architecture.input_shape)
            output = torch.zeros((image.shape[-1], network.architecture.out_channels,
                                  *padded.shape[2:]), device=device)
            occupied = torch.nonzero(image.ne(0).any(dim=0).any(dim=0).any(dim=0)).flatten()
            for start in range(0, len(occupied), batch_size):
                index = occupied[start:start + batch_size]
                output[index] = predict(padded[index])
            return output[(slice(None), slice(None), *crop)].permute(1, 2, 3, 0)

    def smoothed(self, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(C, X, Y, Z)`` maps Gaussian-smoothed inside ``valid`` (``smoothing`` voxels).

        Normalised convolution, so the brain's edge is not darkened; 0 outside ``valid``.
        """
        values = torch.where(valid, values, 0.0)
        if self.smoothing > 0:
            from monai.networks.layers import GaussianFilter

            smooth = GaussianFilter(spatial_dims=3, sigma=self.smoothing).to(values.device)
            weight = smooth(valid[None, None].float())[0]
            values = smooth(values[:, None])[:, 0] / weight.clamp_min(1e-6)
        return torch.where(valid, values, 0.0)

    # ----------------------------------------------------------------- storage
    def tensors(self) -> dict[str, torch.Tensor]:
        """The network's weights."""
        if self.network is None:
            raise RuntimeError("the model is not fitted")
        return self.network.state_dict()

    def stored_hyperparameters(self) -> dict:
        """The hyperparameters, the architecture and the fit report."""
        return {**self.hyperparameters, "fit_report": self.fit_report}

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict) -> DeepModel:
        """Rebuild the (untrained) network from the stored hyperparameters.

        Raises
        ------
        BadDataError
            Hyperparameters that do not describe a network of this family.
        """
        return engine.rebuild(cls, hyperparameters, "a network")

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the network's weights.

        Raises
        ------
        BadDataError
            The weights do not fit the stored architecture.
        """
        try:
            self.network.load_state_dict(tensors, strict=True)
        except (AttributeError, RuntimeError) as error:
            raise BadDataError(f"the weights do not match the {self.model_type} architecture "
                               f"stored with them: {str(error)[:300]}") from error
        self.network.eval()


class ReconstructionModel(DeepModel):
    """A MONAI network trained to reconstruct healthy brains; scores are its residuals.

    The residual ``x - x_hat`` of each channel counts in the channel's direction (``residual``
    for every channel, or ``direction`` per channel), is smoothed inside the brain, and the
    channels' maps are averaged.
    """

    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar."""
        signs = describe(self.channels, self.direction, self.residual)
        return (f"{self.model_type} ({self.mode}) reconstruction residual x - x_hat of the "
                f"robust-z-scored intensities ({signs}), mean over channels, Gaussian-smoothed "
                f"(sigma {self.smoothing} voxels) inside the brain")

    def reconstruct(self, image: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """The network's reconstruction of a ``(C, X, Y, Z)`` image (brain-masked input)."""
        return self.infer(image, batch_size=batch_size)

    def channel_scores(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Smoothed directed residual of each channel, ``(C, X, Y, Z)``, 0 outside the brain."""
        valid = valid_voxels(image, mask)
        masked = torch.where(valid, image, 0.0)
        residual = directed(masked - self.reconstruct(masked), self.channels, self.direction,
                            self.residual)
        return self.smoothed(residual, valid)

    @staticmethod
    def combine(channel_scores: torch.Tensor) -> torch.Tensor:
        """The anomaly score from the per-channel residuals: their mean over channels."""
        return channel_scores.mean(dim=0)

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean smoothed residual over channels; 0 outside the valid brain."""
        return self.combine(self.channel_scores(image, mask))


@register
class AutoEncoderModel(ReconstructionModel):
    """Convolutional autoencoder (MONAI ``AutoEncoder``) with a narrow spatial bottleneck."""

    model_type = "ae"
    summary = "convolutional autoencoder; score: reconstruction residual"

    def build_network(self, architecture: Architecture) -> nn.Module:
        """MONAI ``AutoEncoder``: four stride-2 levels down to ``latent`` channels."""
        from monai.networks import nets

        a, w = architecture, architecture.width
        return nets.AutoEncoder(spatial_dims=a.spatial_dims, in_channels=a.in_channels,
                                out_channels=a.out_channels, channels=(w, 2 * w, 4 * w, a.latent),
                                strides=(2, 2, 2, 2), num_res_units=1, norm="INSTANCE")


@register
class VariationalAutoEncoderModel(ReconstructionModel):
    """Variational autoencoder (MONAI ``VarAutoEncoder``); the posterior mean reconstructs."""

    model_type = "vae"
    summary = "variational autoencoder; score: reconstruction residual"
    reconstructor = VariationalReconstructor

    def build_network(self, architecture: Architecture) -> nn.Module:
        """MONAI ``VarAutoEncoder`` with a code of ``16 * latent``."""
        from monai.networks import nets

        a, w = architecture, architecture.width
        return nets.VarAutoEncoder(spatial_dims=a.spatial_dims,
                                   in_shape=(a.in_channels, *a.input_shape),
                                   out_channels=a.out_channels, latent_size=a.latent * 16,
                                   channels=(w, 2 * w, 4 * w, 8 * w), strides=(2, 2, 2, 2),
                                   num_res_units=1, norm="INSTANCE", use_sigmoid=False,
                                   use_mean_at_inference=True)


@register
class VQVAEModel(ReconstructionModel):
    """Vector-quantised VAE (MONAI ``VQVAE``): reconstructions from a learned codebook."""

    model_type = "vqvae"
    summary = "vector-quantised VAE; score: reconstruction residual"
    reconstructor = QuantisedReconstructor
    input_multiple = 8

    def build_network(self, architecture: Architecture) -> nn.Module:
        """MONAI ``VQVAE`` with a 256-entry codebook of ``latent``-long embeddings."""
        from monai.networks import nets

        a, w = architecture, architecture.width
        return nets.VQVAE(spatial_dims=a.spatial_dims, in_channels=a.in_channels,
                          out_channels=a.out_channels, channels=(w, 2 * w, 4 * w),
                          num_res_layers=1, num_res_channels=(w, 2 * w, 4 * w),
                          downsample_parameters=((2, 4, 1, 1),) * 3,
                          upsample_parameters=((2, 4, 1, 1, 0),) * 3,
                          num_embeddings=256, embedding_dim=a.latent)


@register
class ViTAutoEncoderModel(ReconstructionModel):
    """Vision-transformer autoencoder (MONAI ``ViTAutoEnc``)."""

    model_type = "vit-ae"
    summary = "vision-transformer autoencoder; score: reconstruction residual"
    reconstructor = TokenReconstructor

    def input_size_multiple(self) -> int:
        """Inputs are cut into tokens of ``vit_patch`` voxels a side."""
        return self.vit_patch

    def build_network(self, architecture: Architecture) -> nn.Module:
        """MONAI ``ViTAutoEnc``: 6 layers, ``16 * width`` hidden size.

        Raises
        ------
        ValueError
            A token side that is not a perfect square (MONAI needs one).
        """
        from monai.networks import nets

        a, w = architecture, architecture.width
        if math.isqrt(a.vit_patch) ** 2 != a.vit_patch:
            raise ValueError(f"vit-ae: the token side {a.vit_patch} must be a perfect square")
        hidden = 16 * w
        return nets.ViTAutoEnc(in_channels=a.in_channels, img_size=a.input_shape,
                               patch_size=a.vit_patch, out_channels=a.out_channels,
                               deconv_chns=w, hidden_size=hidden, mlp_dim=4 * hidden,
                               num_layers=6, num_heads=max(1, hidden // 64),
                               spatial_dims=a.spatial_dims)


@register
class DenoisingAutoEncoderModel(ReconstructionModel):
    """Denoising U-Net trained to remove coarse noise (Kascenas et al., MIDL 2022)."""

    model_type = "dae"
    summary = "denoising U-Net trained to remove coarse noise; score: residual"
    input_multiple = 8

    def build_network(self, architecture: Architecture) -> nn.Module:
        """MONAI ``UNet`` with three stride-2 levels."""
        from monai.networks import nets

        a, w = architecture, architecture.width
        return nets.UNet(spatial_dims=a.spatial_dims, in_channels=a.in_channels,
                         out_channels=a.out_channels, channels=(w, 2 * w, 4 * w, 8 * w),
                         strides=(2, 2, 2), num_res_units=2, norm="INSTANCE")

    def _corrupt(self, inputs: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        """The input plus coarse noise inside the brain."""
        noise = coarse_noise(inputs.shape, self.noise_std, self.noise_scale, inputs.device,
                             generator)
        channels_per_slice = inputs.shape[1] // mask.shape[1]
        return inputs + noise * mask.repeat_interleave(channels_per_slice, dim=1)
