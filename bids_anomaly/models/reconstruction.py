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

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bids_anomaly.errors import BadDataError
from bids_anomaly.models.base import (
    TrainingData,
    read_weights,
    register,
    valid_voxels,
    write_weights,
)
from bids_anomaly.models.networks import Architecture, Reconstructor, coarse_noise, divisor
from bids_anomaly.training import engine
from bids_anomaly.training.datasets import (
    PatchDataset,
    SliceDataset,
    VolumeCache,
    pad_to,
    padded_shape,
    stack_slices,
)

LOGGER = logging.getLogger(__name__)

MODES = ("2d", "2.5d", "3d")
RESIDUALS = ("both", "hyper", "hypo")
VALIDATION_FRACTION = 0.15
"""Fraction of the fitting subjects held out for the validation loss (early stopping)."""


def _split(n_subjects: int, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) subject indices; one subject validates on itself."""
    if n_subjects < 2:
        return [0], [0]
    order = np.random.default_rng(seed).permutation(n_subjects)
    n_validation = max(1, round(VALIDATION_FRACTION * n_subjects))
    return sorted(order[n_validation:].tolist()), sorted(order[:n_validation].tolist())


class ReconstructionModel:
    """A MONAI network trained to reconstruct healthy brains; scores are its residuals.

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
        Bottleneck size (see :class:`~bids_anomaly.models.networks.Architecture`).
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
        reconstruction, as FLAIR lesions) or ``hypo``.
    training : EngineOptions, optional
        How to train (epochs, batch size, learning rate, workers, checkpoints...).
    cache_dir : Path, optional
        Where preprocessed volumes are cached for training (a temporary folder by default).
    """

    model_type = "ae"

    def __init__(self, mode: str = "2d", context: int = 1, patch_size: int = 64,
                 width: int = 32, latent: int = 16, vit_patch: int = 16,
                 kl_weight: float = 1e-3, noise_std: float = 0.2, noise_scale: int = 8,
                 patches_per_volume: int = 16, smoothing: float = 1.0,
                 residual: str = "both", training: engine.EngineOptions | None = None,
                 cache_dir: Path | None = None, architecture: dict | None = None,
                 image_shape: tuple[int, ...] | None = None, fit_report: dict | None = None
                 ) -> None:
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
        self.training = training or engine.EngineOptions()
        self.cache_dir = cache_dir
        self.image_shape = tuple(image_shape) if image_shape else None
        self.fit_report = fit_report or {}
        self.network: Reconstructor | None = None
        if architecture is not None:
            self.network = self._new_network(Architecture(
                **{**architecture, "input_shape": tuple(architecture["input_shape"])}))

    # ----------------------------------------------------------------- description
    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar."""
        sign = {"both": "|x - x_hat|", "hyper": "max(x - x_hat, 0)",
                "hypo": "max(x_hat - x, 0)"}[self.residual]
        return (f"{self.model_type} ({self.mode}) reconstruction residual {sign} of the "
                f"robust-z-scored intensities, mean over channels, Gaussian-smoothed "
                f"(sigma {self.smoothing} voxels) inside the brain")

    @property
    def hyperparameters(self) -> dict:
        """Everything needed to rebuild the model (stored with the weights)."""
        values = {"mode": self.mode, "context": self.context, "patch_size": self.patch_size,
                  "width": self.width, "latent": self.latent, "vit_patch": self.vit_patch,
                  "kl_weight": self.kl_weight, "noise_std": self.noise_std,
                  "noise_scale": self.noise_scale,
                  "patches_per_volume": self.patches_per_volume, "smoothing": self.smoothing,
                  "residual": self.residual, "training": self.training.describe()}
        if self.network is not None:
            values["architecture"] = asdict(self.network.architecture)
            values["image_shape"] = list(self.image_shape)
        return values

    @property
    def n_channels(self) -> int | None:
        """Channels the trained network takes and returns (None before training)."""
        return None if self.network is None else self.network.architecture.out_channels

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The grid of the training volumes (None before training)."""
        return self.image_shape

    # ----------------------------------------------------------------- network
    def _input_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        multiple = divisor(self.model_type, self.vit_patch)
        if self.mode == "3d":
            side = padded_shape((self.patch_size,), multiple)[0]
            return (side,) * 3
        return padded_shape(tuple(image_shape[:2]), multiple)

    def _new_network(self, architecture: Architecture) -> Reconstructor:
        return Reconstructor(architecture, kl_weight=self.kl_weight)

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
        from bids_anomaly.training import distributed

        device = torch.device(data.device)
        seed = self.training.seed
        if self.cache_dir is None:
            self.cache_dir = Path(tempfile.mkdtemp(prefix="bids_anomaly_cache_"))
        cache = VolumeCache(self.cache_dir)
        volumes = [cache.get(subject) for subject in data.subjects]
        shapes = {v.shape[1:] for v in volumes}
        if len(shapes) != 1:
            raise BadDataError(f"the training subjects are on different grids: {sorted(shapes)}")
        self.image_shape = tuple(int(s) for s in shapes.pop())
        channels = len(data.channels)
        fit_index, validation_index = _split(len(volumes), seed)
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
            in_channels=channels * (2 * self.context + 1), out_channels=channels,
            input_shape=input_shape, width=self.width, latent=self.latent,
            vit_patch=self.vit_patch)
        torch.manual_seed(seed)
        self.network = self._new_network(architecture)
        train_set, validation_set = dataset(fit_index), dataset(validation_index)
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

    # ----------------------------------------------------------------- inference
    def _check_input(self, image: torch.Tensor) -> None:
        architecture = self.network.architecture
        if image.shape[0] != architecture.out_channels:
            raise BadDataError(f"the {self.model_type} model takes {architecture.out_channels} "
                               f"channel(s), the image has {image.shape[0]}")
        if tuple(image.shape[1:]) != tuple(self.image_shape):
            raise BadDataError(f"the {self.model_type} model was trained on a "
                               f"{tuple(self.image_shape)} grid, the image is "
                               f"{tuple(image.shape[1:])}")

    def reconstruct(self, image: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """The network's reconstruction of a ``(C, X, Y, Z)`` image (brain-masked input)."""
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
                return network(batch)[0].float()

        with torch.no_grad():
            if self.mode == "3d":
                from monai.inferers import SlidingWindowInferer

                inferer = SlidingWindowInferer(roi_size=network.architecture.input_shape,
                                               sw_batch_size=batch_size, overlap=0.5,
                                               mode="gaussian")
                return inferer(image[None], predict)[0]
            stacks = stack_slices(image, self.context)  # (Z, C', X, Y)
            padded, crop = pad_to(stacks, network.architecture.input_shape)
            output = torch.zeros((image.shape[-1], image.shape[0], *padded.shape[2:]),
                                 device=device)
            occupied = torch.nonzero(image.ne(0).any(dim=0).any(dim=0).any(dim=0)).flatten()
            for start in range(0, len(occupied), batch_size):
                index = occupied[start:start + batch_size]
                output[index] = predict(padded[index])
            return output[(slice(None), slice(None), *crop)].permute(1, 2, 3, 0)

    def channel_scores(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Smoothed residual of each channel, ``(C, X, Y, Z)``, 0 outside the valid brain."""
        valid = valid_voxels(image, mask)
        masked = torch.where(valid, image, 0.0)
        residual = masked - self.reconstruct(masked)
        if self.residual == "hyper":
            residual = residual.clamp_min(0)
        elif self.residual == "hypo":
            residual = (-residual).clamp_min(0)
        else:
            residual = residual.abs()
        residual = torch.where(valid, residual, 0.0)
        if self.smoothing > 0:
            from monai.networks.layers import GaussianFilter

            smooth = GaussianFilter(spatial_dims=3, sigma=self.smoothing).to(image.device)
            weight = smooth(valid[None, None].float())[0]
            residual = smooth(residual[:, None])[:, 0] / weight.clamp_min(1e-6)
        return torch.where(valid, residual, 0.0)

    @staticmethod
    def combine(channel_scores: torch.Tensor) -> torch.Tensor:
        """The anomaly score from the per-channel residuals: their mean over channels."""
        return channel_scores.mean(dim=0)

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean smoothed residual over channels; 0 outside the valid brain."""
        return self.combine(self.channel_scores(image, mask))

    # ----------------------------------------------------------------- storage
    def save(self, directory: Path) -> None:
        """Write the network's weights and the hyperparameters to ``weights.safetensors``."""
        if self.network is None:
            raise RuntimeError("the model is not fitted")
        hyperparameters = {**self.hyperparameters, "fit_report": self.fit_report}
        write_weights(directory, self.network.state_dict(), hyperparameters)

    @classmethod
    def load(cls, directory: Path) -> ReconstructionModel:
        """Rebuild the network from the stored hyperparameters and load its weights.

        Raises
        ------
        BadDataError
            The weights do not fit the stored architecture.
        """
        tensors, hyperparameters = read_weights(directory)
        training = engine.EngineOptions(**hyperparameters.pop("training", {}))
        try:
            model = cls(training=training, **hyperparameters)
            model.network.load_state_dict(tensors, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise BadDataError(f"{directory}: the weights do not match the {cls.model_type} "
                               f"architecture stored with them: {str(error)[:300]}") from error
        model.network.eval()
        return model


@register
class AutoEncoderModel(ReconstructionModel):
    """Convolutional autoencoder (MONAI ``AutoEncoder``) with a narrow spatial bottleneck."""

    model_type = "ae"


@register
class VariationalAutoEncoderModel(ReconstructionModel):
    """Variational autoencoder (MONAI ``VarAutoEncoder``); the posterior mean reconstructs."""

    model_type = "vae"


@register
class VQVAEModel(ReconstructionModel):
    """Vector-quantised VAE (MONAI ``VQVAE``): reconstructions from a learned codebook."""

    model_type = "vqvae"


@register
class ViTAutoEncoderModel(ReconstructionModel):
    """Vision-transformer autoencoder (MONAI ``ViTAutoEnc``)."""

    model_type = "vit-ae"


@register
class DenoisingAutoEncoderModel(ReconstructionModel):
    """Denoising U-Net trained to remove coarse noise (Kascenas et al., MIDL 2022)."""

    model_type = "dae"

    def _corrupt(self, inputs: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        """The input plus coarse noise inside the brain."""
        noise = coarse_noise(inputs.shape, self.noise_std, self.noise_scale, inputs.device,
                             generator)
        channels_per_slice = inputs.shape[1] // mask.shape[1]
        return inputs + noise * mask.repeat_interleave(channels_per_slice, dim=1)


DEEP_MODELS = {cls.model_type: cls for cls in (AutoEncoderModel, VariationalAutoEncoderModel,
                                               VQVAEModel, ViTAutoEncoderModel,
                                               DenoisingAutoEncoderModel)}
"""The deep model types and their classes."""

