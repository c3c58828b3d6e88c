"""MONAI networks behind one small adapter, for the deep model families.

A family builds its MONAI network from plain hyperparameters (an :class:`Architecture`, so a model
directory rebuilds it without unpickling code) and wraps it in a :class:`Reconstructor`, whose
subclasses say what the training loss adds to the reconstruction error (the VAE's KL divergence,
the VQ-VAE's commitment loss). :func:`coarse_noise` is the denoising AE's corruption (Kascenas et
al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Architecture:
    """What a network is built from (stored in the model directory).

    Parameters
    ----------
    model_type : str
        The family that builds it (its ``build_network``).
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


class Reconstructor(nn.Module):
    """A MONAI network with a uniform ``forward(x) -> (reconstruction, extra_loss)``.

    ``extra_loss`` is the regulariser the network adds to the reconstruction error (a scalar; 0
    for plain autoencoders). Subclasses adapt networks whose output is a tuple.
    """

    def __init__(self, architecture: Architecture, net: nn.Module,
                 kl_weight: float = 1e-3) -> None:
        super().__init__()
        self.architecture = architecture
        self.kl_weight = kl_weight
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct ``x`` (``(N, C_in, *spatial)``) into ``(N, C_out, *spatial)``."""
        return self.net(x), x.new_zeros(())


class VariationalReconstructor(Reconstructor):
    """MONAI ``VarAutoEncoder``: the posterior mean reconstructs; the KL divergence regularises."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and the weighted KL divergence per voxel."""
        recon, mu, logvar, _ = self.net(x)
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        return recon, self.kl_weight * kl / math.prod(self.architecture.input_shape)


class QuantisedReconstructor(Reconstructor):
    """MONAI ``VQVAE``: the codebook's commitment loss regularises."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and the quantisation loss."""
        recon, quantization_loss = self.net(x)
        return recon, quantization_loss


class TokenReconstructor(Reconstructor):
    """MONAI ``ViTAutoEnc``, which also returns its hidden states."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (the hidden states are not used)."""
        recon, _ = self.net(x)
        return recon, x.new_zeros(())


def check_input_shape(architecture: Architecture, multiple: int) -> None:
    """Refuse an input shape that the network cannot take.

    Raises
    ------
    ValueError
        A side that is not a multiple of the network's total down-sampling.
    """
    bad = [s for s in architecture.input_shape if s % multiple]
    if bad:
        raise ValueError(f"{architecture.model_type}: input shape {architecture.input_shape} "
                         f"is not a multiple of {multiple}")


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
