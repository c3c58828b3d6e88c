"""Denoising diffusion models: a healthy brain is what is left after noising and denoising.

A MONAI ``DiffusionModelUNet`` learns to predict the noise added to healthy images (DDPM
training through MONAI's ``DDPMScheduler`` and ``DiffusionInferer``). To score an image, it is
noised only part of the way, to timestep ``noise_level`` of 1000 (*partial noising*, AnoDDPM:
enough to drown a lesion, not the anatomy around it), and denoised back in ``ddim_steps``
deterministic DDIM steps (MONAI's ``DDIMScheduler``, run by ``DiffusionInferer.sample``); the
reconstruction is the healthy brain the network expects there. The variants of the literature
are options of the one family:

- ``noise``: ``gaussian`` (DDPM), or ``simplex`` (AnoDDPM, Wyatt et al. 2022): structured noise
  made of gradient noise summed over octaves (:func:`gradient_noise`), which hides larger
  lesions than white noise does; the network is trained on the same noise;
- ``noise_patch``: only a box of that many voxels a side is noised while the rest of the image
  stays clean as context (pDDPM, Behrendt et al. 2023); training noises one box per image,
  centred in the brain, and scoring slides the box over the image (tiles, each denoised with
  its clean surroundings) and puts the reconstructed boxes together;
- ``condition_scale``: the network also sees the input averaged over blocks of that many voxels
  as extra channels (the subject's own contrast and anatomy at a scale coarser than a lesion),
  a concatenation in the spirit of cDDPM (Behrendt et al. 2024, who condition on an encoder's
  embedding of the input instead); the full-resolution input would let it copy the lesion;
- ``reconstructions`` and ``aggregation``: several reconstructions from independent noise,
  aggregated as the residual to their mean (``mean``), or as the residual divided by their
  spread per voxel (``mahalanobis``: a diagonal Mahalanobis distance of the input from the
  reconstructions, as sMHD, Behrendt et al. 2024).

The score is that of every reconstruction model: the residual of each channel in its direction
(``--residual``, ``--direction``), smoothed inside the brain, averaged over channels; the
threshold is calibrated on healthy subjects like every model's. Training and inference run on
2D axial slices or 3D patches through the deep engine (AMP, DDP, resume, early stopping), with
every random draw of scoring taken from a generator seeded by the model, so that a voxel scores
the same every time.

Inputs are the preprocessed, robust-z-scored intensities (about unit spread), the scale the
noise schedule expects. The network is trained only on the timesteps it denoises from
(``1..noise_level``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bids_anomaly.config import at_least, option, positive_int
from bids_anomaly.errors import UsageError
from bids_anomaly.models.contract import register
from bids_anomaly.models.data import valid_voxels
from bids_anomaly.models.deep import engine
from bids_anomaly.models.deep.networks import Architecture, Reconstructor, check_input_shape
from bids_anomaly.models.directions import describe, directed
from bids_anomaly.models.reconstruction import ReconstructionModel, ReconstructionOptions

TRAIN_TIMESTEPS = 1000
"""Length of the noise schedule (MONAI's linear beta schedule, 1e-4 to 0.02)."""
NOISES = ("gaussian", "simplex")
AGGREGATIONS = ("mean", "mahalanobis")
MODES = ("2d", "3d")
OCTAVE_PERSISTENCE = 0.8
"""Amplitude ratio of each octave of the simplex noise to the coarser one (AnoDDPM's)."""
SPREAD_FLOOR = 0.1
"""Smallest spread of the reconstructions, in the z-scored intensities, that the Mahalanobis
aggregation divides by (a voxel that every reconstruction agrees on is not infinitely sure)."""


def _reconstruction_option(name: str) -> dataclasses.Field:
    """The reconstruction models' option ``name``: one flag, one meaning, whichever family."""
    item = next(f for f in dataclasses.fields(ReconstructionOptions) if f.name == name)
    default = ({"default": item.default} if item.default is not dataclasses.MISSING
               else {"default_factory": item.default_factory})
    return dataclasses.field(metadata=item.metadata, **default)


@dataclass
class DiffusionOptions:
    """What a diffusion model is and how it reconstructs (training: the engine's options)."""

    mode: str = _reconstruction_option("mode")
    patch_size: int = _reconstruction_option("patch_size")
    width: int = _reconstruction_option("width")
    residual: str = _reconstruction_option("residual")
    direction: list[str] = _reconstruction_option("direction")
    noise: str = option(
        "gaussian", "ddpm: gaussian noise (DDPM) or simplex noise (AnoDDPM), in training and "
                    "scoring (default {default})", flags=("--noise",), choices=NOISES)
    noise_level: int = option(
        250, f"ddpm: timestep (of {TRAIN_TIMESTEPS}) to which an image is noised before it is "
             "denoised (partial noising; default {default})", flags=("--noise-level",),
        type=positive_int, metavar="T")
    noise_patch: int = option(
        0, "ddpm: noise only a box of this side, the rest of the image its clean context, and "
           "slide it over the image (pDDPM); 0: the whole image (default {default})",
        flags=("--noise-patch",), type=at_least(0), metavar="VOXELS")
    condition_scale: int = option(
        0, "ddpm: also give the network the input averaged over blocks of this side (cDDPM-like "
           "conditioning on the subject's coarse image); 0: unconditioned (default {default})",
        flags=("--condition-scale",), type=at_least(0), metavar="VOXELS")
    reconstructions: int = option(
        1, "ddpm: reconstructions from independent noise (default {default})",
        flags=("--reconstructions",), type=positive_int, metavar="N")
    aggregation: str = option(
        "mean", "ddpm: residual to the reconstructions' mean, or divided by their spread per "
                "voxel (mahalanobis, sMHD; needs --reconstructions 2 or more); default "
                "{default}", flags=("--aggregation",), choices=AGGREGATIONS)
    ddim_steps: int = option(
        10, "ddpm: DDIM steps from the noise level back to the image (default {default})",
        flags=("--ddim-steps",), type=positive_int, metavar="N")
    simplex_scale: int = option(
        16, "ddpm: side, in voxels, of the coarsest octave of simplex noise (default "
            "{default})", flags=("--simplex-scale",), type=positive_int, metavar="VOXELS")


@dataclass(frozen=True)
class Noising:
    """How images are noised and denoised (what the network is trained for and run with).

    See the module documentation for the meaning of each field.
    """

    noise: str = "gaussian"
    noise_level: int = 250
    noise_patch: int = 0
    condition_scale: int = 0
    ddim_steps: int = 10
    simplex_scale: int = 16

    def check(self) -> None:
        """Refuse values that do not make a noising.

        Raises
        ------
        UsageError
            An unknown noise, a level outside the schedule, steps or scales below their least.
        """
        if self.noise not in NOISES:
            raise UsageError(f"--noise {self.noise!r}: choose one of {', '.join(NOISES)}")
        if not 1 <= self.noise_level <= TRAIN_TIMESTEPS:
            raise UsageError(f"--noise-level {self.noise_level}: a timestep from 1 to "
                             f"{TRAIN_TIMESTEPS}")
        if self.ddim_steps < 1 or self.simplex_scale < 1:
            raise UsageError("--ddim-steps and --simplex-scale must be at least 1")
        if self.noise_patch < 0 or self.condition_scale < 0:
            raise UsageError("--noise-patch and --condition-scale must be 0 or more")
        if self.ddim_steps > self.noise_level:
            raise UsageError(f"--ddim-steps {self.ddim_steps} exceeds --noise-level "
                             f"{self.noise_level}: a step is at least one timestep")

    def schedule(self) -> tuple[int, int]:
        """``(number of DDIM steps, timestep between two steps)``.

        The step is the largest ``1000 // n`` (MONAI's DDIM steps are whole divisions of the
        schedule) that gives at least ``ddim_steps`` steps below ``noise_level``; the image is
        noised to ``steps * step``, at most ``noise_level``.

        >>> Noising(noise_level=250, ddim_steps=10).schedule()
        (10, 25)
        >>> Noising(noise_level=400, ddim_steps=1).schedule()
        (1, 333)
        """
        step = TRAIN_TIMESTEPS // math.ceil(TRAIN_TIMESTEPS * self.ddim_steps / self.noise_level)
        return self.noise_level // step, step


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic interpolation weight, ``6t^5 - 15t^4 + 10t^3``."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def _along(values: torch.Tensor, axis: int, dims: int) -> torch.Tensor:
    """A 1-D tensor shaped to broadcast along spatial ``axis`` of a ``(N, C, *spatial)`` array."""
    return values.reshape([1, 1] + [1] * axis + [-1] + [1] * (dims - axis - 1))


def _octave(shape: torch.Size, cell: float, device: torch.device,
            generator: torch.Generator | None) -> torch.Tensor:
    """Perlin gradient noise on a lattice of ``cell`` voxels, randomly offset, ``shape``."""
    spatial = shape[2:]
    dims = len(spatial)
    offsets = torch.rand(dims, generator=generator, device=device) * cell
    coordinates = [(torch.arange(size, device=device) + offsets[axis]) / cell
                   for axis, size in enumerate(spatial)]
    corners = [c.floor().long() for c in coordinates]
    fractions = [c - i for c, i in zip(coordinates, corners, strict=True)]
    lattice = [int(i.max()) + 2 for i in corners]
    gradients = torch.randn((*shape[:2], dims, *lattice), generator=generator, device=device)
    gradients = gradients / gradients.norm(dim=2, keepdim=True).clamp_min(1e-6)
    total = torch.zeros(shape, device=device)
    for corner in itertools.product((0, 1), repeat=dims):
        chosen = gradients
        for axis in range(dims):
            chosen = chosen.index_select(3 + axis, corners[axis] + corner[axis])
        dot = sum(chosen[:, :, axis] * _along(fractions[axis] - corner[axis], axis, dims)
                  for axis in range(dims))
        weight = math.prod(_along(_fade(fractions[axis]) if corner[axis]
                                  else 1 - _fade(fractions[axis]), axis, dims)
                           for axis in range(dims))
        total = total + weight * dot
    return total


def gradient_noise(shape: torch.Size, scale: int, device: torch.device,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Structured noise of ``shape`` (``(N, C, *spatial)``), zero mean and unit variance.

    Perlin gradient noise summed over octaves of cell sides ``scale``, ``scale / 2``, ... down
    to 2 voxels, each with :data:`OCTAVE_PERSISTENCE` times the amplitude of the previous: the
    noise AnoDDPM calls simplex noise (simplex noise is the same kind of noise on a triangular
    lattice), standardised per item and channel so that it takes the place of Gaussian noise in
    the diffusion schedule.

    >>> noise = gradient_noise(torch.Size((2, 1, 32, 32)), 8, torch.device("cpu"),
    ...                        torch.Generator().manual_seed(0))
    >>> noise.shape, round(float(noise[0].std()), 3)
    (torch.Size([2, 1, 32, 32]), 1.0)
    """
    total = torch.zeros(shape, device=device)
    cell, amplitude = float(scale), 1.0
    while True:
        total = total + amplitude * _octave(shape, cell, device, generator)
        cell, amplitude = cell / 2, amplitude * OCTAVE_PERSISTENCE
        if cell < 2:
            break
    flat = total.flatten(2)
    centred = flat - flat.mean(dim=2, keepdim=True)
    return (centred / centred.std(dim=2, keepdim=True).clamp_min(1e-6)).reshape(shape)


def tiles(spatial: tuple[int, ...], side: int) -> list[tuple[slice, ...]]:
    """Boxes of ``side`` (at most the image's) covering a grid, the last of each axis at its end.

    >>> [box[0] for box in tiles((10,), 4)]
    [slice(0, 4, None), slice(4, 8, None), slice(6, 10, None)]
    """
    starts = []
    for size in spatial:
        length = min(side, size)
        axis = list(range(0, size - length + 1, length))
        if axis[-1] + length < size:
            axis.append(size - length)
        starts.append([slice(s, s + length) for s in axis])
    return list(itertools.product(*starts))


class DenoisingNetwork(Reconstructor):
    """MONAI ``DiffusionModelUNet`` with its noising, as the engine and MONAI's inferer call it.

    ``forward(x, timesteps, clean=..., region=...)`` predicts the noise of ``x`` at
    ``timesteps`` (what ``DiffusionInferer`` calls): inside ``region`` the noised image, outside
    it ``clean`` (pDDPM's context); with ``condition_scale``, ``clean`` averaged over blocks goes
    in as extra channels. ``forward(x)`` reconstructs ``x`` as every :class:`Reconstructor`
    does: one partial noising and DDIM denoising, the noise drawn from :attr:`noise_source`
    (the global random state when None).
    """

    def __init__(self, architecture: Architecture, net: nn.Module, noising: Noising) -> None:
        super().__init__(architecture, net)
        self.noising = noising
        self.noise_source: torch.Generator | None = None

    # ----------------------------------------------------------------- the noise
    def draw_noise(self, shape: torch.Size, device: torch.device,
                   generator: torch.Generator | None) -> torch.Tensor:
        """Gaussian or simplex noise of ``shape``."""
        if self.noising.noise == "simplex":
            return gradient_noise(shape, self.noising.simplex_scale, device, generator)
        return torch.randn(shape, generator=generator, device=device)

    def training_region(self, mask: torch.Tensor, generator: torch.Generator | None
                        ) -> torch.Tensor | None:
        """Where a training item is noised: a box centred on a random brain voxel (pDDPM).

        None: the whole image. ``mask`` is ``(N, 1, *spatial)``; returns the same shape.
        """
        side = self.noising.noise_patch
        if not side:
            return None
        spatial = mask.shape[2:]
        weights = (mask.flatten(1) > 0).float() + 1e-6  # an empty item still draws a box
        centres = torch.multinomial(weights, 1, generator=generator).flatten().cpu()
        region = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
        for item, flat in enumerate(centres.tolist()):
            box = []
            for size in reversed(spatial):
                flat, position = divmod(flat, size)
                length = min(side, size)
                start = min(max(position - length // 2, 0), size - length)
                box.insert(0, slice(start, start + length))
            region[(item, slice(None), *box)] = True
        return region

    def condition(self, clean: torch.Tensor) -> torch.Tensor:
        """The input averaged over blocks of ``condition_scale`` voxels, back on its grid."""
        spatial = clean.shape[2:]
        coarse = [max(1, math.ceil(s / self.noising.condition_scale)) for s in spatial]
        pool = F.adaptive_avg_pool2d if len(spatial) == 2 else F.adaptive_avg_pool3d
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        return F.interpolate(pool(clean, coarse), size=tuple(spatial), mode=mode,
                             align_corners=False)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None,
                context: torch.Tensor | None = None, clean: torch.Tensor | None = None,
                region: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The predicted noise of ``x`` at ``timesteps``; without them, its reconstruction.

        ``context`` is what ``DiffusionInferer`` passes for cross-attention (unused: None).
        """
        if timesteps is None:
            return self.reconstruct(x), x.new_zeros(())
        if region is not None:
            x = torch.where(region, x, clean)
        if self.noising.condition_scale:
            x = torch.cat([x, self.condition(clean)], dim=1)
        return self.net(x, timesteps=timesteps)

    # ----------------------------------------------------------------- reconstruction
    def sampler(self) -> tuple[object, int]:
        """MONAI's DDIM scheduler over the timesteps below the noise level, and the first."""
        from monai.networks.schedulers import DDIMScheduler

        steps, step = self.noising.schedule()
        scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, clip_sample=False)
        scheduler.set_timesteps(TRAIN_TIMESTEPS // step)
        # the steps from the noise level down (MONAI's own grid runs from the last timestep)
        scheduler.timesteps = torch.arange(steps * step, 0, -step)
        return scheduler, steps * step

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """One reconstruction of ``x`` (``(N, C, *spatial)``): partial noising, then DDIM.

        With ``noise_patch``, each box of :func:`tiles` that holds a brain voxel is noised and
        denoised with the rest of the image clean; voxels of no such box keep their value.
        """
        from monai.inferers import DiffusionInferer

        scheduler, start = self.sampler()
        inferer = DiffusionInferer(scheduler)
        timesteps = torch.full((x.shape[0],), start, device=x.device, dtype=torch.long)
        boxes = ([None] if not self.noising.noise_patch
                 else tiles(tuple(x.shape[2:]), self.noising.noise_patch))
        total, count = torch.zeros_like(x), torch.zeros_like(x[:1, :1])
        for box in boxes:
            region = None
            if box is not None:
                if not x[(slice(None), slice(None), *box)].ne(0).any():
                    continue
                region = torch.zeros_like(x[:1, :1], dtype=torch.bool)
                region[(0, 0, *box)] = True
            noise = self.draw_noise(x.shape, x.device, self.noise_source)
            noised = scheduler.add_noise(original_samples=x, noise=noise, timesteps=timesteps)
            if region is not None:
                noised = torch.where(region, noised, x)
            denoised = inferer.sample(input_noise=noised, scheduler=scheduler, verbose=False,
                                      diffusion_model=partial(self, clean=x, region=region))
            if region is None:
                return denoised.float()
            total += torch.where(region, denoised.float(), 0.0)
            count += region
        return torch.where(count > 0, total / count.clamp_min(1.0), x)


@register
class DiffusionModel(ReconstructionModel):
    """Denoising diffusion model (AnoDDPM, pDDPM, cDDPM, sMHD as options; see the module).

    Parameters
    ----------
    noise, noise_level, noise_patch, condition_scale, ddim_steps, simplex_scale
        The :class:`Noising` (see :class:`DiffusionOptions` for their meaning).
    reconstructions : int
        Reconstructions from independent noise per scored image.
    aggregation : str
        ``mean`` (residual to their mean) or ``mahalanobis`` (divided by their spread).
    **deep
        The options of :class:`~.reconstruction.DeepModel` (mode, width, training, ...).
    """

    model_type = "ddpm"
    summary = ("denoising diffusion model, partial noising (AnoDDPM simplex, pDDPM patches, "
               "cDDPM-like conditioning, sMHD Mahalanobis); score: reconstruction residual")
    options = (DiffusionOptions, engine.EngineOptions)
    options_scope = "training a diffusion model"
    reconstructor = DenoisingNetwork
    input_multiple: ClassVar[int] = 8

    def __init__(self, noise: str = "gaussian", noise_level: int = 250, noise_patch: int = 0,
                 condition_scale: int = 0, ddim_steps: int = 10, simplex_scale: int = 16,
                 reconstructions: int = 1, aggregation: str = "mean", **deep) -> None:
        # set before the deep model's constructor, which rebuilds a stored network with it
        self.noising = Noising(noise, noise_level, noise_patch, condition_scale, ddim_steps,
                               simplex_scale)
        self.noising.check()
        mode = deep.get("mode", "2d")
        if mode not in MODES:
            raise UsageError(f"--mode {mode}: the ddpm family runs on 2d slices or 3d patches")
        if aggregation not in AGGREGATIONS:
            raise UsageError(f"--aggregation {aggregation!r}: choose one of "
                             f"{', '.join(AGGREGATIONS)}")
        if aggregation == "mahalanobis" and reconstructions < 2:
            raise UsageError("--aggregation mahalanobis needs --reconstructions 2 or more (the "
                             "spread of one reconstruction is not defined)")
        if reconstructions < 1:
            raise UsageError("--reconstructions must be at least 1")
        self.reconstructions = reconstructions
        self.aggregation = aggregation
        super().__init__(**deep)

    @classmethod
    def check_options(cls, given: dict, single_subject: bool = False) -> None:
        """Refuse what the model would refuse, before any preprocessing starts.

        Raises
        ------
        UsageError
            ``--mode 2.5d``, Mahalanobis with one reconstruction, steps beyond the noise level.
        """
        super().check_options(given, single_subject)
        checked = {"mode", "reconstructions", "aggregation",
                   *(f.name for f in dataclasses.fields(Noising))}
        cls(**{key: value for key, value in given.items() if key in checked})

    @property
    def hyperparameters(self) -> dict:
        """The deep options plus the noising and the aggregation (stored with the weights)."""
        return {**super().hyperparameters, **dataclasses.asdict(self.noising),
                "reconstructions": self.reconstructions, "aggregation": self.aggregation}

    @property
    def n_channels(self) -> int | None:
        """Channels the trained network reconstructs (the input's; the condition adds some)."""
        return None if self.network is None else self.network.architecture.out_channels

    def _new_network(self, architecture: Architecture) -> DenoisingNetwork:
        check_input_shape(architecture, self.input_size_multiple())
        return DenoisingNetwork(architecture, self.build_network(architecture), self.noising)

    def build_network(self, architecture: Architecture) -> nn.Module:
        """MONAI ``DiffusionModelUNet``: three levels, no attention, timestep-conditioned."""
        from monai.networks import nets

        a, w = architecture, architecture.width
        conditioned = 2 if self.noising.condition_scale else 1
        return nets.DiffusionModelUNet(
            spatial_dims=a.spatial_dims, in_channels=a.in_channels * conditioned,
            out_channels=a.out_channels, channels=(w, 2 * w, 4 * w),
            attention_levels=(False, False, False), num_res_blocks=1,
            norm_num_groups=math.gcd(w, 8))

    def with_inference(self, reconstructions: int | None = None, aggregation: str | None = None,
                       ddim_steps: int | None = None) -> DiffusionModel:
        """The same trained network, scoring with other reconstructions, aggregation or steps.

        Parameters
        ----------
        reconstructions, aggregation, ddim_steps
            New values (None: this model's).

        Raises
        ------
        UsageError
            Mahalanobis with fewer than two reconstructions, more DDIM steps than the noise
            level.
        """
        reconstructions = self.reconstructions if reconstructions is None else reconstructions
        aggregation = self.aggregation if aggregation is None else aggregation
        if aggregation == "mahalanobis" and reconstructions < 2:
            raise UsageError("--aggregation mahalanobis needs --reconstructions 2 or more")
        other = copy.copy(self)
        other.reconstructions, other.aggregation = reconstructions, aggregation
        if ddim_steps is not None and ddim_steps != self.noising.ddim_steps:
            other.noising = dataclasses.replace(self.noising, ddim_steps=ddim_steps)
            other.noising.check()
            if self.network is not None:  # the same weights, denoising in other steps
                other.network = copy.copy(self.network)
                other.network.noising = other.noising
        return other

    # ----------------------------------------------------------------- training
    def _batch_loss(self, module: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                    generator: torch.Generator | None) -> torch.Tensor:
        """Mean squared error of the predicted noise where the image was noised.

        Timesteps are drawn from 1 to ``noise_level`` (those scoring denoises from); the
        noise goes in through MONAI's ``DDPMScheduler`` and ``DiffusionInferer``.
        """
        from monai.inferers import DiffusionInferer
        from monai.networks.schedulers import DDPMScheduler

        inputs, _, mask = batch
        network = self.network
        device = inputs.device
        timesteps = torch.randint(1, self.noising.noise_level + 1, (inputs.shape[0],),
                                  generator=generator, device=device)
        noise = network.draw_noise(inputs.shape, device, generator)
        region = network.training_region(mask, generator)
        inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS,
                                                 clip_sample=False))
        predicted = inferer(inputs=inputs, noise=noise, timesteps=timesteps,
                            diffusion_model=partial(module, clean=inputs, region=region))
        weight = (torch.ones_like(inputs[:, :1]) if region is None else region.float())
        error = ((predicted.float() - noise) ** 2 * weight).sum()
        return error / (weight.sum() * inputs.shape[1]).clamp_min(1.0)

    # ----------------------------------------------------------------- scoring
    @property
    def score_definition(self) -> str:
        """What the score means, for the statmap sidecar."""
        signs = describe(self.channels, self.direction, self.residual)
        steps, step = self.noising.schedule()
        how = [f"{self.noising.noise} noise to timestep {steps * step} of {TRAIN_TIMESTEPS}"]
        if self.noising.noise_patch:
            how.append(f"{self.noising.noise_patch}-voxel boxes noised in turn (pDDPM)")
        if self.noising.condition_scale:
            how.append(f"conditioned on the input averaged over "
                       f"{self.noising.condition_scale}-voxel blocks")
        how.append(f"{steps} DDIM steps")
        residual = ("x - mean of the reconstructions" if self.aggregation == "mean"
                    else "(x - mean) / spread of the reconstructions (Mahalanobis)")
        return (f"ddpm ({self.mode}; {', '.join(how)}; {self.reconstructions} "
                f"reconstruction(s)): {residual} of the robust-z-scored intensities ({signs}), "
                f"mean over channels, Gaussian-smoothed (sigma {self.smoothing} voxels) inside "
                "the brain")

    def _reconstructions(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance over :attr:`reconstructions` reconstructions of ``image``.

        The noise comes from a generator seeded with the training seed: the same image always
        gets the same reconstructions.
        """
        network = self.network
        network.noise_source = torch.Generator(device=image.device).manual_seed(
            self.training.seed)
        try:
            mean = torch.zeros_like(image)
            spread = torch.zeros_like(image)
            for count in range(1, self.reconstructions + 1):  # Welford's running moments
                sample = self.infer(image)
                delta = sample - mean
                mean += delta / count
                spread += delta * (sample - mean)
        finally:
            network.noise_source = None
        return mean, spread / max(self.reconstructions - 1, 1)

    def reconstruct(self, image: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """The mean reconstruction of a ``(C, X, Y, Z)`` image (brain-masked input)."""
        return self._reconstructions(image)[0]

    def channel_scores(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Smoothed directed residual (or Mahalanobis distance) per channel, ``(C, X, Y, Z)``."""
        valid = valid_voxels(image, mask)
        masked = torch.where(valid, image, 0.0)
        mean, variance = self._reconstructions(masked)
        deviation = masked - mean
        if self.aggregation == "mahalanobis":
            spread = self.smoothed(variance, valid).clamp_min(0.0) + SPREAD_FLOOR ** 2
            deviation = deviation / spread.sqrt()
        residual = directed(deviation, self.channels, self.direction, self.residual)
        return self.smoothed(residual, valid)
