"""Synthetic anomalies: what self-supervised models learn to find, and what benchmarks insert.

:class:`AnomalyGenerator` corrupts a healthy-looking image (a 2D slice, a 3D patch or a whole
volume, any number of channels) with one or more anomalies and says where, and how strongly:

- **Shapes** (:data:`SHAPES`): ellipsoids of random size and orientation; smooth random blobs
  (thresholded low-frequency noise inside an ellipsoidal envelope); real lesion masks
  (:class:`LesionShapes`: e.g. MS or stroke lesions from a folder of masks in MNI space, carried
  onto the template grid with partial volume); and microbleeds, small magnetised spheres whose
  dipole field darkens the susceptibility-weighted channels beyond the sphere ("blooming",
  longer along B0; :func:`microbleed_loss`). Borders are soft (a partial-volume rim).
- **Textures** (:data:`TEXTURES`): an intensity shift whose sign and size per channel come from
  a contrast model (:data:`CONTRASTS`: MS-like lesions are bright on FLAIR and T2w and dark on
  T1w); the same with smooth noise; a foreign patch from another image blended in (FPI, Tan et
  al. 2021); or that patch blended in the gradient domain by solving Poisson's equation (PII, Tan
  et al. 2022).
- **Placement**: centres are drawn inside the brain mask, and the anomaly is cut to it.

Everything is drawn from the ``torch.Generator`` given, so the same seed gives the same anomaly
on the CPU and (up to floating-point order) on a GPU. The corrupted image, the anomaly mask
(0..1, with the soft border) and the per-voxel corruption strength (what a restoration model is
conditioned on) come back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bids_anomaly.imaging.susceptibility import (
    blooming_extent,
    blooming_signal,
    dephasing_for_bloom,
)

SHAPES = ("ellipsoid", "blob", "lesion", "microbleed")
"""Shape kinds; ``lesion`` needs a :class:`LesionShapes` library, ``microbleed`` a channel of
:data:`SUSCEPTIBILITY`."""

TEXTURES = ("shift", "noise", "foreign", "poisson")
"""Texture kinds: intensity shift, shift with noise, foreign patch, Poisson-blended patch."""

CONTRASTS = {
    "ms": {"FLAIR": 1.0, "T2w": 1.0, "PDw": 1.0, "T1w": -1.0},
    "stroke": {"FLAIR": 1.0, "T2w": 1.0, "PDw": 1.0, "T1w": -1.0},
    "tumour": {"FLAIR": 1.0, "T2w": 1.0, "PDw": 1.0, "T1w": 0.0},
    "free": {},
}
"""Direction of the intensity change per channel: +1 brighter, -1 darker, 0 either (drawn).

``ms``: white-matter lesions, hyperintense on FLAIR/T2w/PD, hypointense on T1w. ``stroke``:
chronic infarcts, the same signs (on FLAIR the cavity is dark while the gliotic rim is bright; the
bright sign is the one a FLAIR lesion search needs). ``tumour``: bright on FLAIR/T2w, either on
T1w. ``free``: every channel drawn independently.
"""

SUSCEPTIBILITY = {"T2starw": 1.0, "swi": 1.0, "MEGRE": 1.0, "T2w": 0.05}
"""Fraction of a microbleed's signal loss each channel shows (other channels: none).

Gradient-echo images (T2*-weighted, SWI magnitude, multi-echo GRE) show all of it; on T2w a
microbleed is a few per cent darker; T1w, FLAIR and PDw do not show it.
"""

MICROBLEED_BLOOM = (2.0, 3.0)
"""Smallest and largest visible over true radius of a microbleed."""

MICROBLEED_TAIL = 0.05
"""Signal losses below this are left out, so that a microbleed has a finite extent."""


@dataclass
class GeneratorOptions:
    """What the generator draws from (sizes in voxels of the image it corrupts).

    Attributes
    ----------
    shapes, textures : tuple of str
        Kinds drawn uniformly (see :data:`SHAPES`, :data:`TEXTURES`).
    contrast : str
        Key of :data:`CONTRASTS`.
    count : (int, int)
        Fewest and most anomalies per image.
    radius : (float, float)
        Smallest and largest ellipsoid / blob radius, in voxels.
    strength : (float, float)
        Smallest and largest intensity change, in units of the image's in-brain standard
        deviation per channel (the preprocessed images are robust z-scores: about 1).
    border : float
        Width of the soft border, in voxels.
    probability : float
        Chance that an image gets any anomaly (the others teach what is normal).
    microbleed_radius : (float, float)
        Smallest and largest visible radius of a microbleed's dark focus (the sphere that holds
        as much volume as the part losing at least half its signal), in voxels; the default is
        1 to 5 mm (2 to 10 mm across) at 2 mm voxels.
    """

    shapes: tuple[str, ...] = ("ellipsoid", "blob")
    textures: tuple[str, ...] = ("shift", "noise", "foreign", "poisson")
    contrast: str = "ms"
    count: tuple[int, int] = (1, 3)
    radius: tuple[float, float] = (1.5, 8.0)
    strength: tuple[float, float] = (0.5, 3.0)
    border: float = 1.0
    probability: float = 0.8
    microbleed_radius: tuple[float, float] = (0.5, 2.5)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.shapes) - set(SHAPES)) + sorted(
            set(self.textures) - set(TEXTURES))
        if unknown or not self.shapes or not self.textures:
            raise ValueError(f"unknown or empty shapes/textures: {unknown}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"contrast {self.contrast!r}: choose one of {', '.join(CONTRASTS)}")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _rotation(dims: int, generator: torch.Generator) -> torch.Tensor:
    """A random rotation matrix (2x2 or 3x3)."""
    if dims == 2:
        angle = _uniform(generator, 0, 2 * math.pi)
        return torch.tensor([[math.cos(angle), -math.sin(angle)],
                             [math.sin(angle), math.cos(angle)]])
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def _soft(distance: torch.Tensor, border: float) -> torch.Tensor:
    """Partial volume from a signed distance-like field (< 1 inside): 1 inside, 0 outside."""
    return torch.clamp((1 - distance) / max(border, 1e-3) * 2 + 0.5, 0.0, 1.0)


def _grid(shape: tuple[int, ...], center: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates relative to ``center``, ``(dims, *shape)``."""
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")) - center.view(-1, *[1] * len(shape))


def ellipsoid(shape: tuple[int, ...], center: torch.Tensor, radii: torch.Tensor,
              generator: torch.Generator, border: float = 1.0) -> torch.Tensor:
    """A randomly rotated ellipsoid with a soft border, values 0..1."""
    rotation = _rotation(len(shape), generator)
    coordinates = torch.einsum("ij,j...->i...", rotation.T, _grid(shape, center))
    distance = torch.sqrt(((coordinates / radii.view(-1, *[1] * len(shape))) ** 2).sum(0))
    # distance is in units of the radius: the border is ``border`` voxels of the mean radius
    return _soft(distance, border / float(radii.mean()))


def blob(shape: tuple[int, ...], center: torch.Tensor, radius: float,
         generator: torch.Generator, border: float = 1.0) -> torch.Tensor:
    """An irregular blob: smooth noise above a threshold inside an ellipsoidal envelope."""
    dims = len(shape)
    coarse = [max(2, math.ceil(s / max(radius, 1.0))) for s in shape]
    noise = torch.randn(1, 1, *coarse, generator=generator)
    mode = "bilinear" if dims == 2 else "trilinear"
    smooth = F.interpolate(noise, size=shape, mode=mode, align_corners=False)[0, 0]
    envelope = ellipsoid(shape, center, torch.full((dims,), radius * 1.3), generator, border)
    field_ = (smooth - smooth[envelope > 0.5].mean() if (envelope > 0.5).any() else smooth)
    return torch.clamp(envelope * (0.5 + field_ / max(border, 0.5)), 0.0, 1.0) * (envelope > 0)


def microbleed_loss(shape: tuple[int, ...], center: torch.Tensor, radius: float,
                    generator: torch.Generator, slices: int = 1) -> torch.Tensor:
    """Signal loss (0..1) of a microbleed whose dark focus has a visible radius ``radius``.

    The source is a sphere a third to a half as wide as the focus (the ratio is drawn from
    :data:`MICROBLEED_BLOOM`), placed a random fraction of a voxel off ``center``; its dipole
    field dephases the signal around it
    (:func:`~bids_anomaly.imaging.susceptibility.dipole_signal`, the physics of the synthetic
    microbleeds of the demo data), computed at several points per voxel and averaged (partial
    volume). Losses under :data:`MICROBLEED_TAIL` are left out.

    B0 runs along z: in 3D the last axis, along which the focus is longest (by 2^(1/3)). A 2D
    ``shape`` is an axial slice, as the 2D and 2.5D models cut volumes: B0 crosses the plane,
    so the focus is round in the slice through the centre; ``slices`` adjacent slices centred
    on that one are computed (the centre a random fraction of a slice off the middle one).

    Parameters
    ----------
    shape : tuple of int
        Spatial shape of the image (2D or 3D), voxels taken as isotropic.
    center : torch.Tensor
        The voxel the microbleed is centred in.
    radius : float
        Visible radius, in voxels (the sphere with the volume that loses at least half its
        signal).
    generator : torch.Generator
        Source of the random sizes and position.
    slices : int
        In 2D, the number of adjacent slices (odd); ignored in 3D.

    Returns
    -------
    torch.Tensor
        ``(slices, *shape)`` in 2D (the middle one is the image's slice), ``(1, *shape)`` in
        3D.
    """
    bloom = _uniform(generator, *MICROBLEED_BLOOM)
    jitter = torch.rand(3, generator=generator, dtype=torch.float64) - 0.5
    source = radius / bloom
    dephasing = dephasing_for_bloom(bloom)
    # The loss along B0 falls under the tail at this distance; one voxel more for partial volume.
    reach = blooming_extent(source, dephasing) * (math.log(2) / -math.log(1 - MICROBLEED_TAIL)
                                                  ) ** (1 / 3)
    half = math.ceil(reach) + 1
    dims = len(shape)
    voxel = [int(round(float(c))) for c in center]
    low = [max(0, c - half) for c in voxel]
    high = [min(n, c + half + 1) for c, n in zip(voxel, shape, strict=True)]
    local = [c - a + float(j) for c, a, j in zip(voxel, low, jitter[:dims], strict=True)]
    box_shape = [b - a for a, b in zip(low, high, strict=True)]
    if dims == 2:
        box_shape.append(slices)
        local.append(slices // 2 + float(jitter[2]))
    signal = blooming_signal(tuple(box_shape), np.asarray(local), source, dephasing)
    loss = torch.from_numpy(1.0 - signal)
    loss = torch.where(loss < MICROBLEED_TAIL, 0.0, loss)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    out = torch.zeros((1 if dims == 3 else slices, *shape))
    if dims == 3:
        out[0][box] = loss
    else:
        out[(slice(None), *box)] = loss.permute(2, 0, 1)
    return out


class LesionShapes:
    """Real lesion masks, each a connected component carried onto a target grid.

    Parameters
    ----------
    folder : Path
        Binary masks (``*.nii`` / ``*.nii.gz``) in MNI-like space; their affines place them.
    target : nibabel image
        The grid to carry them onto (the template at the working resolution).
    exclude : tuple of str
        Masks whose file names contain one of these strings are left out (e.g. the test
        subject's own lesions).
    files : list of Path, optional
        Use these files instead of every mask of ``folder`` (a train/test split of shapes).
    max_components : int
        Most components kept (the largest first, over all masks).
    """

    def __init__(self, folder: Path | None, target, exclude: tuple[str, ...] = (),
                 files: list[Path] | None = None, max_components: int = 2000) -> None:
        from scipy import ndimage

        from bids_anomaly.imaging.images import load_lesion_shape

        paths = files if files is not None else sorted(
            p for p in Path(folder).iterdir() if p.name.endswith((".nii", ".nii.gz")))
        paths = [p for p in paths if not any(word in p.name for word in exclude)]
        if not paths:
            raise ValueError(f"no lesion masks in {folder}")
        self.components: list[torch.Tensor] = []
        for path in paths:
            # the fraction of each target voxel that is lesion (volume-preserving)
            carried = load_lesion_shape(path, target)
            labels, count = ndimage.label(carried > 0.25)
            for index, box in enumerate(ndimage.find_objects(labels), start=1):
                # the component and its partial-volume rim (the voxels below the cut around it)
                box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1))
                            for b, n in zip(box, labels.shape, strict=True))
                own = labels[box] == index
                region = ndimage.binary_dilation(own) & (own | (labels[box] == 0))
                piece = np.where(region, carried[box], 0.0)
                if piece.sum() >= 1.0:
                    self.components.append(torch.from_numpy(piece.astype(np.float32)))
        self.components.sort(key=lambda c: -float(c.sum()))
        self.components = self.components[:max_components]
        if not self.components:
            raise ValueError(f"the lesion masks of {folder} are empty on the target grid")

    def __len__(self) -> int:
        return len(self.components)

    def draw(self, shape: tuple[int, ...], center: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """One component, mirrored at random, centred at ``center`` (an axial cut in 2D)."""
        piece = self.components[_randint(generator, 0, len(self.components) - 1)]
        if len(shape) == 2:
            piece = piece[:, :, _randint(generator, 0, piece.shape[2] - 1)]
        for axis in range(piece.ndim):
            if torch.rand((), generator=generator) < 0.5:
                piece = piece.flip(axis)
        out = torch.zeros(shape)
        starts = [int(round(float(c))) - s // 2 for c, s in zip(center, piece.shape, strict=True)]
        target = tuple(slice(max(0, a), min(n, a + s))
                       for a, s, n in zip(starts, piece.shape, shape, strict=True))
        source = tuple(slice(t.start - a, t.stop - a)
                       for t, a in zip(target, starts, strict=True))
        out[target] = piece[source]
        return out


def poisson_blend(target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor
                  ) -> torch.Tensor:
    """Blend ``source`` into ``target`` inside ``mask`` in the gradient domain (PII).

    Solves Poisson's equation on the mask's bounding box (with a margin): the Laplacian of the
    result is the source's inside the mask and the target's outside it, and the result equals
    the target on the box's border. The solve is exact and direct (a discrete sine transform
    diagonalises the Dirichlet Laplacian); voxels outside the mask keep the target's values.

    Parameters
    ----------
    target, source : torch.Tensor
        ``(C, *spatial)`` images.
    mask : torch.Tensor
        ``(*spatial)``, > 0.5 where the source's gradients are used.
    """
    from scipy.fft import dstn

    inside = mask > 0.5
    if not inside.any():
        return target.clone()
    dims = mask.ndim
    index = torch.nonzero(inside)
    box = tuple(slice(max(0, int(lo) - 3), min(n, int(hi) + 4))
                for lo, hi, n in zip(index.min(0).values, index.max(0).values, mask.shape,
                                     strict=True))
    if any(b.stop - b.start < 3 for b in box):
        return target.clone()
    t = target[(slice(None), *box)].double().cpu().numpy()
    s = source[(slice(None), *box)].double().cpu().numpy()
    region = inside[box].cpu().numpy()
    interior = (slice(1, -1),) * dims

    def laplacian(x: np.ndarray) -> np.ndarray:
        """The 2*dims+1-point Laplacian at the interior voxels."""
        centre = x[interior]
        total = -2 * dims * centre
        for axis in range(dims):
            for shift in (slice(0, -2), slice(2, None)):
                window = list(interior)
                window[axis] = shift
                total = total + x[tuple(window)]
        return total

    # result = t + u, u = 0 on the border, Laplacian(u) = mask * (Laplacian(s) - Laplacian(t))
    sizes = [n - 2 for n in t.shape[1:]]
    eigen = sum(np.meshgrid(*[2 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1)) - 2
                              for n in sizes], indexing="ij"))
    out = target.clone()
    blended = torch.from_numpy(t.copy())
    for channel in range(t.shape[0]):
        rhs = np.where(region[interior], laplacian(s[channel]) - laplacian(t[channel]), 0.0)
        u = dstn(dstn(rhs, type=1, norm="ortho") / eigen, type=1, norm="ortho")
        blended[channel][interior] += torch.from_numpy(u)
    crop = out[(slice(None), *box)]
    out[(slice(None), *box)] = torch.where(inside[box], blended.to(crop), crop)
    return out


@dataclass
class Corruption:
    """What :class:`AnomalyGenerator` did to one image."""

    image: torch.Tensor
    mask: torch.Tensor
    strength: torch.Tensor
    signs: list[list[float]] = field(default_factory=list)


class AnomalyGenerator:
    """Insert synthetic anomalies into images (see the module documentation).

    Parameters
    ----------
    options : GeneratorOptions
        What to draw from.
    channels : list of str
        The channels' modalities, in order (for the contrast model).
    lesions : LesionShapes, optional
        Real lesion shapes (needed when ``options.shapes`` holds ``lesion``).
    signs : dict, optional
        ``{channel: +1 | -1 | 0}`` overriding the contrast model for those channels (0: drawn).
    window : int
        2.5D: the channels are ``window`` adjacent axial slices of each modality, channel
        ``c * window + offset`` (:func:`~bids_anomaly.models.deep.datasets.window_channels`),
        so that a microbleed darkens each slice by its own cut through the focus; the other
        shapes are the same in every slice. 1 for 2D and 3D images.

    Microbleeds darken each channel by its :data:`SUSCEPTIBILITY` share of the signal loss,
    whatever the contrast model says: the signal above the channel's darkest in-brain level
    (its 0.5th percentile, where no signal is left) is multiplied by 1 - share * loss. Their
    mask is 1 where the image's slice loses at least half its signal, with a soft rim down to
    :data:`MICROBLEED_TAIL`.
    """

    def __init__(self, options: GeneratorOptions, channels: list[str],
                 lesions: LesionShapes | None = None,
                 signs: dict[str, float] | None = None, window: int = 1) -> None:
        if "lesion" in options.shapes and lesions is None:
            raise ValueError("the lesion shape needs a folder of lesion masks")
        if window < 1 or window % 2 == 0 or len(channels) % window:
            raise ValueError(f"window {window}: give an odd number of slices that divides the "
                             f"{len(channels)} channels")
        self.options, self.channels, self.lesions = options, list(channels), lesions
        self.window = window
        contrast = {**CONTRASTS[options.contrast], **(signs or {})}
        self.signs = [contrast.get(channel, 0.0) for channel in self.channels]
        self.susceptibility = [SUSCEPTIBILITY.get(channel, 0.0) for channel in self.channels]
        if "microbleed" in options.shapes and max(self.susceptibility, default=0.0) < 1.0:
            raise ValueError("the microbleed shape needs a susceptibility-weighted channel: "
                             + ", ".join(k for k, v in SUSCEPTIBILITY.items() if v == 1.0))

    def _shape(self, kind: str, shape: tuple[int, ...], center: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        low, high = self.options.radius
        if kind == "lesion":
            return self.lesions.draw(shape, center, generator)
        if kind == "blob":
            return blob(shape, center, _uniform(generator, low, high), generator,
                        self.options.border)
        radii = torch.tensor([_uniform(generator, low, high) for _ in shape])
        return ellipsoid(shape, center, radii, generator, self.options.border)

    def _texture(self, kind: str, image: torch.Tensor, alpha: torch.Tensor,
                 donor: torch.Tensor, scale: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, list[float]]:
        """Corrupt ``image`` with weight ``alpha`` (0..1 per voxel); return it and the signs."""
        channels = image.shape[0]
        signs = [s if s != 0 else (1.0 if torch.rand((), generator=generator) < 0.5 else -1.0)
                 for s in self.signs] if self.signs else [1.0] * channels
        size = _uniform(generator, *self.options.strength)
        shift = torch.tensor(signs).view(-1, *[1] * alpha.ndim) * size * scale
        if kind in ("shift", "noise"):
            change = shift.expand_as(image)
            if kind == "noise":
                noise = torch.randn(image.shape, generator=generator)
                noise = F.avg_pool2d(noise, 3, 1, 1) if alpha.ndim == 2 else F.avg_pool3d(
                    noise[None], 3, 1, 1)[0]
                change = change * (1 + 0.5 * noise)
            return image + alpha * change, signs
        if kind == "foreign":  # the donor's intensities, pushed in the contrast's direction
            return (1 - alpha) * image + alpha * (donor + shift), signs
        # the donor's texture (its gradients) joined seamlessly to the image, then the shift:
        # gradient-domain blending keeps the border intensities, so it carries no offset itself
        blended = poisson_blend(image, donor, alpha)
        return (1 - alpha) * image + alpha * (blended + shift), signs

    def _darken(self, image: torch.Tensor, loss: torch.Tensor, dark: torch.Tensor
                ) -> torch.Tensor:
        """Take ``loss`` (``(slices, *spatial)``) of each channel's signal above ``dark``."""
        if loss.shape[0] > 1:  # 2.5D: one cut per slice of each modality's window
            loss = loss.repeat(image.shape[0] // loss.shape[0], *[1] * (loss.ndim - 1))
        share = torch.tensor(self.susceptibility).view(-1, *[1] * (image.ndim - 1))
        return image - share * loss * (image - dark).clamp_min(0)

    def __call__(self, image: torch.Tensor, brain: torch.Tensor, generator: torch.Generator,
                 donor: torch.Tensor | None = None, severity: float | None = None
                 ) -> Corruption:
        """Corrupt ``image`` (``(C, *spatial)``) inside ``brain`` (``(*spatial)``, bool).

        Parameters
        ----------
        donor : torch.Tensor, optional
            Another image of the same shape for the foreign and Poisson textures (default:
            ``image`` itself, shifted).
        severity : float, optional
            Scale every anomaly's weight by this (0..1): the "time" of a restoration model.
            By default anomalies are drawn with ``options.probability`` at full weight.

        Returns
        -------
        Corruption
            The corrupted image (unchanged outside the anomalies), the mask (0..1) and the
            per-voxel strength (mask times severity).
        """
        shape = tuple(image.shape[1:])
        mask = torch.zeros(shape)
        corrupted = image.clone()
        signs_used = []
        brain = brain.bool()
        if severity is None and float(torch.rand((), generator=generator)) >= \
                self.options.probability:
            return Corruption(corrupted, mask, mask.clone())
        candidates = torch.nonzero(brain)
        if len(candidates) == 0:
            return Corruption(corrupted, mask, mask.clone())
        if donor is None:
            donor = torch.roll(image, shifts=[s // 3 for s in shape],
                               dims=tuple(range(1, image.ndim)))
        inside = image[:, brain]
        scale = inside.std(dim=1).clamp_min(1e-3).view(-1, *[1] * len(shape))
        # where a microbleed leaves no signal: each channel's darkest in-brain level
        dark = inside.kthvalue(max(1, int(0.005 * inside.shape[1])), dim=1).values.view(
            -1, *[1] * len(shape)) if "microbleed" in self.options.shapes else None
        for _ in range(_randint(generator, *self.options.count)):
            center = candidates[_randint(generator, 0, len(candidates) - 1)].float()
            kind = self.options.shapes[_randint(generator, 0, len(self.options.shapes) - 1)]
            if kind == "microbleed":
                radius = _uniform(generator, *self.options.microbleed_radius)
                loss = microbleed_loss(shape, center, radius, generator, self.window) * brain
                if not (loss > 0).any():
                    continue
                corrupted = self._darken(corrupted, loss * (1.0 if severity is None else
                                                            severity), dark)
                signs_used.append([-1.0 if share > 0 else 0.0 for share in self.susceptibility])
                mask = torch.maximum(mask, torch.clamp(2 * loss[loss.shape[0] // 2], 0, 1))
                continue
            alpha = self._shape(kind, shape, center, generator) * brain
            if severity is not None:
                alpha = alpha * severity
            if not (alpha > 0).any():
                continue
            texture = self.options.textures[_randint(generator, 0,
                                                     len(self.options.textures) - 1)]
            corrupted, signs = self._texture(texture, corrupted, alpha, donor, scale, generator)
            signs_used.append(signs)
            mask = torch.maximum(mask, alpha if severity is None else alpha / max(severity,
                                                                                   1e-6))
        strength = mask * (1.0 if severity is None else severity)
        return Corruption(corrupted, mask.clamp(0, 1), strength, signs_used)
