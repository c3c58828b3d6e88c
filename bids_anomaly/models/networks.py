"""The reconstruction networks of the deep models, all from MONAI, behind one small adapter.

Each model type gets a :class:`Reconstructor`: it builds the MONAI network from plain
hyperparameters (so a model directory rebuilds it without unpickling code), runs it, and says
what its training loss adds to the reconstruction error (the VAE's KL divergence, the VQ-VAE's
commitment loss). The denoising AE (Kascenas et al. 2022) is a MONAI U-Net trained to remove
coarse (low-frequency) noise; its corruption is part of the training step, in
:func:`coarse_noise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEEP_TYPES = ("ae", "vae", "vqvae", "vit-ae", "dae")
"""The registered deep model types."""


@dataclass
class Architecture:
    """What a network is built from (stored in the model directory).

    Parameters
    ----------
    model_type : str
        One of :data:`DEEP_TYPES`.
    spatial_dims : int
        2 (slices, 2.5D stacks of slices) or 3 (patches).
    in_channels : int
        Input channels (modalities, times the neighbouring slices in 2.5D).
    out_channels : int
        Reconstructed channels (the modalities).
    input_shape : tuple of int
        Spatial shape of one input (a padded slice or a patch); the VAE and the ViT need it.
    width : int
        Feature maps of the first level; deeper levels double it.
    latent : int
        Latent size: channels of the AE bottleneck, length of the VAE code, embedding size of
        the VQ-VAE codebook.
    vit_patch : int
        Side of a ViT token, in voxels (a perfect square, as MONAI's ViTAutoEnc requires).
    """

    model_type: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    width: int = 32
    latent: int = 16
    vit_patch: int = 16

    @property
    def divisor(self) -> int:
        """Every spatial size of an input must be a multiple of this."""
        return divisor(self.model_type, self.vit_patch)


def divisor(model_type: str, vit_patch: int = 16) -> int:
    """Multiple that input sizes must have for ``model_type`` (its total down-sampling)."""
    return {"ae": 16, "vae": 16, "vqvae": 8, "vit-ae": vit_patch, "dae": 8}[model_type]


class Reconstructor(nn.Module):
    """A MONAI network with a uniform ``forward(x) -> (reconstruction, extra_loss)``.

    ``extra_loss`` is the regulariser the model type adds to the reconstruction error (a
    scalar; 0 for plain autoencoders).
    """

    def __init__(self, architecture: Architecture, kl_weight: float = 1e-3) -> None:
        super().__init__()
        self.architecture = architecture
        self.kl_weight = kl_weight
        self.net = build_network(architecture)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct ``x`` (``(N, C_in, *spatial)``) into ``(N, C_out, *spatial)``."""
        kind = self.architecture.model_type
        zero = x.new_zeros(())
        if kind in ("ae", "dae"):
            return self.net(x), zero
        if kind == "vae":
            recon, mu, logvar, _ = self.net(x)
            kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
            return recon, self.kl_weight * kl / math.prod(self.architecture.input_shape)
        if kind == "vqvae":
            recon, quantization_loss = self.net(x)
            return recon, quantization_loss
        recon, _ = self.net(x)
        return recon, zero


def build_network(architecture: Architecture) -> nn.Module:
    """The MONAI network of ``architecture`` (untrained).

    Raises
    ------
    ValueError
        An unknown model type, or an input shape the network cannot take.
    """
    from monai.networks import nets

    a = architecture
    bad = [s for s in a.input_shape if s % a.divisor]
    if bad:
        raise ValueError(f"{a.model_type}: input shape {a.input_shape} is not a multiple of "
                         f"{a.divisor}")
    w = a.width
    if a.model_type == "ae":
        return nets.AutoEncoder(spatial_dims=a.spatial_dims, in_channels=a.in_channels,
                                out_channels=a.out_channels, channels=(w, 2 * w, 4 * w, a.latent),
                                strides=(2, 2, 2, 2), num_res_units=1, norm="INSTANCE")
    if a.model_type == "vae":
        return nets.VarAutoEncoder(spatial_dims=a.spatial_dims,
                                   in_shape=(a.in_channels, *a.input_shape),
                                   out_channels=a.out_channels, latent_size=a.latent * 16,
                                   channels=(w, 2 * w, 4 * w, 8 * w), strides=(2, 2, 2, 2),
                                   num_res_units=1, norm="INSTANCE", use_sigmoid=False,
                                   use_mean_at_inference=True)
    if a.model_type == "vqvae":
        return nets.VQVAE(spatial_dims=a.spatial_dims, in_channels=a.in_channels,
                          out_channels=a.out_channels, channels=(w, 2 * w, 4 * w),
                          num_res_layers=1, num_res_channels=(w, 2 * w, 4 * w),
                          downsample_parameters=((2, 4, 1, 1),) * 3,
                          upsample_parameters=((2, 4, 1, 1, 0),) * 3,
                          num_embeddings=256, embedding_dim=a.latent)
    if a.model_type == "vit-ae":
        if math.isqrt(a.vit_patch) ** 2 != a.vit_patch:
            raise ValueError(f"vit-ae: the token side {a.vit_patch} must be a perfect square")
        hidden = 16 * w
        return nets.ViTAutoEnc(in_channels=a.in_channels, img_size=a.input_shape,
                               patch_size=a.vit_patch, out_channels=a.out_channels,
                               deconv_chns=w, hidden_size=hidden, mlp_dim=4 * hidden,
                               num_layers=6, num_heads=max(1, hidden // 64),
                               spatial_dims=a.spatial_dims)
    if a.model_type == "dae":
        return nets.UNet(spatial_dims=a.spatial_dims, in_channels=a.in_channels,
                         out_channels=a.out_channels, channels=(w, 2 * w, 4 * w, 8 * w),
                         strides=(2, 2, 2), num_res_units=2, norm="INSTANCE")
    raise ValueError(f"unknown deep model type {a.model_type!r} (known: {', '.join(DEEP_TYPES)})")


def coarse_noise(shape: torch.Size, std: float, scale: int, device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise drawn on a grid ``scale`` times coarser and upsampled (Kascenas 2022).

    Parameters
    ----------
    shape : torch.Size
        ``(N, C, *spatial)`` of the batch to corrupt.
    std : float
        Standard deviation of the coarse noise.
    scale : int
        Down-sampling factor of the noise grid (8 on a 128-pixel slice gives their 16x16).
    device : torch.device
        Where to draw it.
    generator : torch.Generator, optional
        Random source (the global one by default).

    Returns
    -------
    torch.Tensor
        Noise of ``shape``, smooth at the scale of small lesions.
    """
    spatial = shape[2:]
    coarse = [max(1, math.ceil(s / scale)) for s in spatial]
    noise = torch.randn((*shape[:2], *coarse), device=device, generator=generator) * std
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(noise, size=tuple(spatial), mode=mode, align_corners=False)
