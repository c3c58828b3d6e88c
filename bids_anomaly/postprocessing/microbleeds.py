"""Cerebral microbleed candidates: small round dark foci on T2*-weighted and SWI images.

Microbleeds are 2 to 10 mm round hypointense foci (with "blooming" on T2*-weighted and
susceptibility-weighted images); users count them and place them on the Microbleed Anatomical
Rating Scale (MARS: lobar, deep, infratentorial; Gregoire et al. 2009), and a detector is judged
per lesion: sensitivity against false positives per subject.

Candidates are found in images already in template space (MNI152 2009, 1 or 2 mm isotropic
voxels, RAS+), normalised to a robust z-score inside the brain (median 0, IQR / 1.349 = 1), so
that every intensity below is in those units:

1. the multi-scale, scale-normalised Laplacian of Gaussian (Lindeberg 1998): for a dark ball of
   radius ``r`` and contrast ``c`` the response ``sigma^2 * LoG`` peaks at ``sigma = r / sqrt(3)``
   with the value ``0.92 * |c|``; candidates are its local maxima in space (3x3x3) and scale
   (adjacent scales) inside the brain mask eroded by one voxel. One more scale above the
   largest diameter is used only for comparison: a dark region whose response still grows
   beyond :data:`DIAMETERS_MM` is no maximum within the range;
2. the shape of the Hessian of the smoothed image at the candidate's scale: a blob has three
   eigenvalues of the same sign and similar magnitude, a vessel (vein: a dark tube) one near
   zero (:data:`MAX_ELONGATION`);
3. the isotropy of the surroundings: a microbleed is darker than its surroundings in every
   direction, whereas the rounded end or the bend of a vessel continues dark in one direction
   and a focus at the border of a large dark region (iron-rich basal ganglia) is no darker than
   the region (:data:`MIN_ISOTROPY`);
4. candidates closer than the larger of their radii are merged (the strongest is kept).

Air-bone borders at the brain's edge are kept out by the eroded mask and by filling the image
outside the mask with the brain's median (0); what remains is left to the scores.

Candidates are then scored (by an anomaly map, or by their blobness), placed on the MARS regions
by their template coordinates, and thresholded to a number of false positives per control
subject (:func:`threshold_for_fp`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from bids_anomaly.errors import BadDataError

DIAMETERS_MM = (2.0, 10.0)
"""Smallest and largest microbleed diameters (mm) searched (the usual 2-10 mm definition)."""

N_SCALES = 6
"""Number of scales spanning :data:`DIAMETERS_MM`, spaced geometrically."""


def blob_radii(diameters_mm: Sequence[float] = DIAMETERS_MM,
               n_scales: int = N_SCALES) -> np.ndarray:
    """Visible radii (mm) of the scales searched: geometric steps from the smallest diameter.

    >>> [round(float(r), 2) for r in blob_radii((2.0, 10.0), 6)]
    [1.0, 1.38, 1.9, 2.63, 3.62, 5.0]
    """
    low, high = (float(d) / 2 for d in diameters_mm)
    if not 0 < low <= high or n_scales < 1:
        raise ValueError(f"diameters must be positive and increasing, not {diameters_mm}")
    if n_scales == 1 or low == high:
        return np.array([low])
    return np.geomspace(low, high, n_scales)


RADII_MM = tuple(float(r) for r in blob_radii())
"""Visible radii (mm) of the default scales: 1.0, 1.38, 1.9, 2.63, 3.62 and 5.0."""

SIGMAS_MM = tuple(r / math.sqrt(3) for r in RADII_MM)
"""Gaussian scales (mm) of :data:`RADII_MM`: ``sigma = r / sqrt(3)``, where a ball of radius ``r``
gives its strongest scale-normalised Laplacian response."""

MIN_SIGMA_VOXELS = 0.7
"""Smallest Gaussian scale in voxels: below it the sampled Laplacian and Hessian alias.

At 0.5 voxel, for instance, the inner rim of a sharp-edged dark ball outscores its centre, and
voxel-level noise gives responses as strong as a microbleed's. Smaller scales are replaced by
this one: at 1 mm voxels the 2 mm diameter (a visible radius of 1.2 mm instead of 1 mm); at 2 mm
voxels the 2 to 3.8 mm diameters (a visible radius of 2.4 mm), where such microbleeds are
sub-voxel and show as one or two faintly darker voxels.
"""

MIN_BLOBNESS = 1.5
"""Default smallest scale-normalised Laplacian response of a candidate (robust z units).

A ball gives about 0.92 times its contrast: 1.5 keeps balls darker than about 1.6 robust SD
than their surroundings (microbleeds on SWI are far darker), and keeps the number of candidates
in noise small.
"""

MAX_ELONGATION = 3.0
"""Default largest ratio of the largest to the smallest Hessian eigenvalue magnitude.

A ball gives about 1 (1.1-2.0 in trials with noise of a sixth of its contrast); points
along a vessel 5 to several hundred. The rounded ends of a vessel (2-3) and foci at the border of
a large dark region (1.7-2.8) are left to :data:`MIN_ISOTROPY`.
"""

MIN_ISOTROPY = 0.25
"""Default smallest isotropy of the surroundings (:func:`blob_candidates`'s ``min_isotropy``).

A microbleed is darker than its surroundings in every direction; the rounded end of a vessel,
or a vessel's bend, has a dark continuation in one direction (isotropy near 0 or negative), and
a focus at the border of a large dark region is not darker than the region. In trials with
noise of a sixth of the contrast, balls scored 0.2-0.85, vessel ends below 0.1 and foci at the
border of a 25 mm dark ellipsoid mostly below 0.2.
"""

SURROUND_DIRECTIONS = np.array([v for v in np.ndindex(3, 3, 3) if v != (1, 1, 1)],
                               dtype=np.float64) - 1.0
SURROUND_DIRECTIONS /= np.linalg.norm(SURROUND_DIRECTIONS, axis=1, keepdims=True)
"""The 26 unit directions to the neighbours of a voxel, along which surroundings are sampled."""

SURROUND_STEPS = (1.5, 2.0, 2.5)
"""Distances (in candidate radii) at which the surroundings are sampled along each direction."""

EPS = 1e-6
"""Floor of the smallest eigenvalue magnitude in the elongation ratio."""

CANDIDATE_COLUMNS = {
    "candidate_id": {"Description": "candidate number: 1 for the strongest blob (largest "
                                    "blobness), then by decreasing blobness"},
    "x": {"Description": "x of the candidate's centre, template world coordinates",
          "Units": "mm"},
    "y": {"Description": "y of the candidate's centre, template world coordinates",
          "Units": "mm"},
    "z": {"Description": "z of the candidate's centre, template world coordinates",
          "Units": "mm"},
    "radius_mm": {"Description": "visible radius, sqrt(3) times the Gaussian scale at which the "
                                 "candidate is strongest", "Units": "mm"},
    "score": {"Description": "candidate score, higher is more likely a microbleed: the largest "
                             "anomaly score inside the candidate's sphere, or its blobness "
                             "without an anomaly map"},
    "blobness": {"Description": "scale-normalised Laplacian of Gaussian response (about 0.92 "
                                "times the contrast of a ball), robust z units"},
    "elongation": {"Description": "largest over smallest Hessian eigenvalue magnitude at the "
                                  "candidate's scale: 1 for a ball, large for a vessel"},
    "region": {"Description": "Microbleed Anatomical Rating Scale region, from approximate "
                              "boxes in MNI coordinates",
               "Levels": {"lobar": "cortex and subcortical white matter of the lobes",
                          "deep": "basal ganglia, thalamus, internal and external capsules "
                                  "and the deep white matter around them",
                          "infratentorial": "brainstem and cerebellum",
                          "outside": "outside the brain mask"}},
}
"""Column definitions of the microbleed candidate table (written to its JSON sidecar)."""

_CANDIDATE_FRAME = ("i", "j", "k", "radius_mm", "blobness", "elongation", "contrast")


def _voxel_size(voxel_size_mm: float | Sequence[float]) -> float:
    """One voxel size (mm) from a number or three zooms; template grids are isotropic."""
    sizes = np.atleast_1d(np.asarray(voxel_size_mm, dtype=np.float64)).ravel()
    if sizes.size not in (1, 3) or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise BadDataError(f"voxel size must be one or three positive numbers, not "
                           f"{voxel_size_mm!r}")
    if np.ptp(sizes) > 0.01 * sizes.max():
        raise BadDataError(f"microbleed detection needs isotropic voxels (template space), not "
                           f"{'x'.join(f'{s:g}' for s in sizes)} mm")
    return float(sizes.mean())


def _ball(radius_voxels: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n, 3) of the voxels within ``radius_voxels`` of a centre, and their distances."""
    h = int(math.floor(radius_voxels))
    grid = np.mgrid[-h:h + 1, -h:h + 1, -h:h + 1].reshape(3, -1).T
    distance = np.sqrt((grid ** 2).sum(axis=1))
    keep = distance <= radius_voxels + 1e-9
    return grid[keep], distance[keep]


def _empty_candidates() -> pd.DataFrame:
    frame = pd.DataFrame({name: pd.Series(dtype=np.int64 if name in "ijk" else np.float64)
                          for name in _CANDIDATE_FRAME})
    frame.index = pd.RangeIndex(1, 1, name="candidate_id")
    return frame


def _hessian_kernels(sigma: float) -> np.ndarray:
    """The six second-derivative-of-Gaussian kernels (6, n, n, n), as ``gaussian_filter`` uses.

    Order: xx, yy, zz, xy, xz, yz. All have even total order, so they are symmetric under
    ``u -> -u`` and correlation with them equals convolution.
    """
    half = int(4.0 * sigma + 0.5)
    delta = np.zeros((2 * half + 1,) * 3)
    delta[half, half, half] = 1.0
    orders = ((2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1))
    return np.stack([ndimage.gaussian_filter(delta, sigma, order=order, mode="constant")
                     for order in orders])


def _eigenvalues(padded: np.ndarray, points: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Hessian eigenvalues (n, 3) of the Gaussian-smoothed image at each point and its scale.

    Sorted by magnitude, ``|l1| <= |l2| <= |l3|``. ``padded`` must reach ``4 * sigma`` voxels
    beyond every point. The second derivatives are those of ``gaussian_filter(order=...)``
    (mode ``constant``), evaluated at the points only.
    """
    hessians = np.zeros((len(points), 3, 3))
    rows, cols = (0, 1, 2, 0, 0, 1), (0, 1, 2, 1, 2, 2)
    for sigma in np.unique(sigmas):
        kernels = _hessian_kernels(float(sigma))
        half = kernels.shape[1] // 2
        flat = kernels.reshape(6, -1)
        for n in np.flatnonzero(sigmas == sigma):
            c = points[n]
            patch = padded[c[0] - half:c[0] + half + 1, c[1] - half:c[1] + half + 1,
                           c[2] - half:c[2] + half + 1]
            entries = flat @ patch.ravel()
            hessians[n][rows, cols] = entries
            hessians[n][cols, rows] = entries
    eigen = np.linalg.eigvalsh(hessians)
    return np.take_along_axis(eigen, np.argsort(np.abs(eigen), axis=1), axis=1)


def _elongation(eigen: np.ndarray) -> np.ndarray:
    """``|l3| / max(|l1|, EPS)`` of magnitude-sorted eigenvalues: 1 for a ball."""
    return np.abs(eigen[:, 2]) / np.maximum(np.abs(eigen[:, 0]), EPS)


def _isotropy(padded: np.ndarray, points: np.ndarray, radii: np.ndarray,
              polarity: float) -> np.ndarray:
    """How evenly each blob stands out from its surroundings (1: the same in every direction).

    Along each of :data:`SURROUND_DIRECTIONS` the image is averaged at :data:`SURROUND_STEPS`
    radii from the centre (linear interpolation, 0 beyond the array), and compared with the
    mean over the voxels within the radius: ``d_u = polarity * (surround_u - core)``. The
    isotropy is ``min_u d_u / mean_u d_u``, and -1 where ``mean_u d_u <= 0``. ``padded`` must
    reach one radius beyond every point.
    """
    steps = np.array(SURROUND_STEPS)
    offsets = (SURROUND_DIRECTIONS[:, None, :] * steps[None, :, None]).reshape(-1, 3)
    result = np.empty(len(points))
    for n, (point, radius) in enumerate(zip(points, radii, strict=True)):
        core = float(padded[tuple((point + _ball(radius)[0]).T)].mean())
        samples = ndimage.map_coordinates(padded, (point + radius * offsets).T, order=1,
                                          mode="constant", cval=0.0)
        rise = polarity * (samples.reshape(len(SURROUND_DIRECTIONS), -1).mean(axis=1) - core)
        mean = rise.mean()
        result[n] = rise.min() / mean if mean > 0 else -1.0
    return result


def _local_mean(values: np.ndarray, inside: np.ndarray, centre: np.ndarray,
                offsets: np.ndarray) -> float:
    """Mean of ``values`` over ``centre + offsets`` restricted to ``inside`` (nan if empty)."""
    points = centre + offsets
    valid = np.all((points >= 0) & (points < values.shape), axis=1)
    points = points[valid]
    keep = inside[tuple(points.T)]
    return float(values[tuple(points[keep].T)].mean()) if keep.any() else math.nan


def blob_candidates(image: np.ndarray, mask: np.ndarray,
                    voxel_size_mm: float | Sequence[float],
                    diameters_mm: Sequence[float] = DIAMETERS_MM, dark: bool = True,
                    min_blobness: float = MIN_BLOBNESS,
                    max_elongation: float = MAX_ELONGATION,
                    min_isotropy: float = MIN_ISOTROPY) -> pd.DataFrame:
    """Round foci of the given polarity and size: microbleed candidates.

    Parameters
    ----------
    image : numpy.ndarray
        3D image in template space, robust z-scored inside the brain (T2*-weighted or SWI).
    mask : numpy.ndarray
        Brain mask on the same grid; candidates lie in it eroded by one voxel. Outside it, and
        where the image is not finite, the image is replaced by 0 (the brain's median).
    voxel_size_mm : float or sequence of float
        Isotropic voxel size (mm), or the three zooms of the grid.
    diameters_mm : sequence of float
        Smallest and largest diameters searched; :data:`N_SCALES` scales span them, with one
        more above the largest used only to reject larger structures.
    dark : bool
        Look for dark foci (microbleeds); ``False`` looks for bright ones.
    min_blobness : float
        Smallest scale-normalised Laplacian response kept (:data:`MIN_BLOBNESS`).
    max_elongation : float
        Largest Hessian elongation kept (:data:`MAX_ELONGATION`).
    min_isotropy : float
        Smallest isotropy of the surroundings kept (:data:`MIN_ISOTROPY`).

    Returns
    -------
    pandas.DataFrame
        One row per candidate, index ``candidate_id`` 1..n by decreasing blobness, columns
        ``i``, ``j``, ``k`` (voxel indices), ``radius_mm`` (visible radius,
        ``sqrt(3) * sigma``, at least ``sqrt(3)`` times :data:`MIN_SIGMA_VOXELS` voxels),
        ``blobness`` (``sigma^2 * LoG`` for dark foci, its negative for bright ones; about 0.92
        times a ball's contrast), ``elongation`` (``|l3| / |l1|`` of the Hessian eigenvalues
        sorted by magnitude, 1 for a ball) and ``contrast`` (mean image inside the radius
        minus the mean over the shell from one to two radii, in the brain;
        negative for dark foci).

    Raises
    ------
    BadDataError
        The image is not 3D, the mask's shape differs, or the voxels are not isotropic.

    Notes
    -----
    A local maximum of the response (in space and over adjacent scales, at a scale within
    ``diameters_mm``) is kept when

    - its response is at least ``min_blobness``;
    - its Hessian eigenvalues (at its scale) all have the sign of a dark blob (positive: the
      image has a minimum there; negative for bright blobs) and its elongation is at most
      ``max_elongation`` (vessels);
    - the isotropy of its surroundings is at least ``min_isotropy`` (vessel ends and bends,
      borders of large dark regions; see :data:`MIN_ISOTROPY`).

    Candidates closer than the larger of their radii are then merged into the one with the
    larger blobness.
    """
    image = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask) > 0
    if image.ndim != 3:
        raise BadDataError(f"microbleed detection needs a 3D image, not shape {image.shape}")
    if mask.shape != image.shape:
        raise BadDataError(f"the brain mask's shape {mask.shape} differs from the image's "
                           f"{image.shape}")
    size = _voxel_size(voxel_size_mm)
    mask &= np.isfinite(image)
    inside = ndimage.binary_erosion(mask, iterations=1)
    if not inside.any():
        return _empty_candidates()

    radii = blob_radii(diameters_mm)
    ratio = radii[-1] / radii[-2] if len(radii) > 1 else math.sqrt(2)
    sigmas = np.unique(np.maximum(radii / math.sqrt(3) / size, MIN_SIGMA_VOXELS))
    n_detect = len(sigmas)
    sigmas = np.append(sigmas, sigmas[-1] * ratio)  # the guard scale
    polarity = 1.0 if dark else -1.0

    # crop to the brain plus the largest kernel's reach (the image is 0 outside the brain)
    margin = int(4.0 * sigmas[-1] + 0.5) + 2
    corners = np.argwhere(mask)
    low = np.maximum(corners.min(axis=0) - margin, 0)
    high = np.minimum(corners.max(axis=0) + margin + 1, image.shape)
    crop = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    values = np.where(mask, image, 0.0)[crop].astype(np.float32)
    brain, inner = mask[crop], inside[crop]

    levels: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def level(s: int) -> tuple[np.ndarray, np.ndarray]:
        if s not in levels:
            response = polarity * sigmas[s] ** 2 * ndimage.gaussian_laplace(
                values, sigmas[s], mode="constant")
            levels[s] = response, ndimage.maximum_filter(response, size=3, mode="nearest")
        return levels[s]

    found = []
    for s in range(n_detect):
        response, spatial_max = level(s)
        peak = inner & (response >= min_blobness) & (response == spatial_max)
        if s > 0:
            peak &= response >= level(s - 1)[1]
        peak &= response >= level(s + 1)[1]
        for point in np.argwhere(peak):
            found.append((*point, s, response[tuple(point)]))
        levels.pop(s - 1, None)
    if not found:
        return _empty_candidates()
    table = np.array(found, dtype=np.float64)
    points, scale_index, blobness = table[:, :3].astype(int), table[:, 3].astype(int), table[:, 4]

    # Hessian at the candidate's scale, on the crop (0 beyond, as for the Laplacian)
    pad = int(4.0 * sigmas[-1] + 0.5)
    padded = np.pad(values, pad)
    eigen = _eigenvalues(padded, points + pad, sigmas[scale_index])
    elongation = _elongation(eigen)
    keep = np.all(polarity * eigen > 0, axis=1) & (elongation <= max_elongation)
    radius_mm = sigmas[scale_index] * math.sqrt(3) * size
    rest = np.flatnonzero(keep)
    keep[rest] = _isotropy(padded, points[rest] + pad, radius_mm[rest] / size,
                           polarity) >= min_isotropy
    if not keep.any():
        return _empty_candidates()

    order = np.flatnonzero(keep)[np.argsort(-blobness[keep], kind="stable")]
    kept: list[int] = []
    for n in order:
        if kept:
            distance = np.sqrt(((points[kept] - points[n]) ** 2).sum(axis=1)) * size
            if np.any(distance < np.maximum(radius_mm[kept], radius_mm[n])):
                continue
        kept.append(n)

    contrast = []
    for n in kept:
        r = radius_mm[n] / size
        core, _ = _ball(r)
        ring, distance = _ball(2 * r)
        ring = ring[distance > r]
        contrast.append(_local_mean(values, brain, points[n], core)
                        - _local_mean(values, brain, points[n], ring))
    centres = points[kept] + low
    frame = pd.DataFrame({
        "i": centres[:, 0].astype(np.int64), "j": centres[:, 1].astype(np.int64),
        "k": centres[:, 2].astype(np.int64), "radius_mm": radius_mm[kept],
        "blobness": blobness[kept], "elongation": elongation[kept],
        "contrast": np.array(contrast, dtype=np.float64),
    })
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="candidate_id")
    return frame


def _sphere_points(candidates: pd.DataFrame, voxel_size_mm: float | Sequence[float],
                   shape: tuple[int, ...]):
    """Per candidate (in row order), the in-grid voxel indices (n, 3) of its sphere."""
    size = _voxel_size(voxel_size_mm)
    centres = candidates[["i", "j", "k"]].to_numpy(dtype=np.int64)
    for centre, radius in zip(centres, candidates["radius_mm"].to_numpy(dtype=np.float64),
                              strict=True):
        points = centre + _ball(radius / size)[0]
        yield points[np.all((points >= 0) & (points < shape), axis=1)]


def score_candidates(candidates: pd.DataFrame, anomaly_map: np.ndarray,
                     voxel_size_mm: float | Sequence[float]) -> pd.Series:
    """Each candidate's score from a voxel-wise anomaly map (higher is more abnormal).

    The score is the largest finite value of the map among the voxels within ``radius_mm`` of
    the candidate's centre (its sphere, the centre voxel at least): a microbleed is flagged
    when any of its voxels is, whichever model made the map. Non-finite values are ignored; a
    sphere without any finite value scores nan.

    Parameters
    ----------
    candidates : pandas.DataFrame
        From :func:`blob_candidates`.
    anomaly_map : numpy.ndarray
        Voxel-wise anomaly score on the candidates' grid.
    voxel_size_mm : float or sequence of float
        Isotropic voxel size (mm).

    Returns
    -------
    pandas.Series
        ``score``, indexed like ``candidates``.
    """
    anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
    if anomaly_map.ndim != 3:
        raise BadDataError(f"the anomaly map must be 3D, not shape {anomaly_map.shape}")
    scores = []
    for points in _sphere_points(candidates, voxel_size_mm, anomaly_map.shape):
        inside = anomaly_map[tuple(points.T)]
        inside = inside[np.isfinite(inside)]
        scores.append(float(inside.max()) if inside.size else math.nan)
    return pd.Series(scores, index=candidates.index, name="score", dtype=np.float64)


def candidate_score(candidates: pd.DataFrame, anomaly_map: np.ndarray | None = None,
                    voxel_size_mm: float | Sequence[float] | None = None) -> pd.Series:
    """Candidates' scores: from an anomaly map when given, their blobness otherwise.

    Parameters
    ----------
    candidates : pandas.DataFrame
        From :func:`blob_candidates`.
    anomaly_map : numpy.ndarray, optional
        Voxel-wise anomaly score: the score is :func:`score_candidates`'s sphere maximum.
        Without it, the score is the candidate's ``blobness`` (a detector from the image alone).
    voxel_size_mm : float or sequence of float, optional
        Voxel size (mm); needed with ``anomaly_map``.

    Returns
    -------
    pandas.Series
        ``score``, indexed like ``candidates``.
    """
    if anomaly_map is None:
        return candidates["blobness"].astype(np.float64).rename("score")
    if voxel_size_mm is None:
        raise ValueError("scoring candidates by an anomaly map needs the voxel size")
    return score_candidates(candidates, anomaly_map, voxel_size_mm)


MARS_REGIONS = {1: "lobar", 2: "deep", 3: "infratentorial"}
"""Labels of the Microbleed Anatomical Rating Scale regions (Gregoire et al. 2009)."""

INFRATENTORIAL_BOXES_MM = (
    {"x": (-12.0, 12.0), "y": (-40.0, -10.0), "z": (-math.inf, -10.0)},
    {"x": (-22.0, 22.0), "y": (-44.0, -20.0), "z": (-math.inf, -18.0)},
    {"y": (-math.inf, -76.0), "z": (-math.inf, -18.0)},
)
"""MNI boxes (open intervals, mm) of the infratentorial region's front and back.

The brainstem column (midbrain, pons, medulla) below z = -10; the pons and the cerebellar
peduncles below z = -18 between y = -44 and -20, within 22 mm of the midline (lateral to
them lie the medial and inferior temporal lobes, which are lobar); and the back of the
cerebellum below z = -18 behind y = -76 (the occipital lobe lies above). Between y = -76 and
-44 the cerebellum lies under the tentorium (:data:`TENTORIUM_MM`). These are approximations
drawn on the MNI152 2009 template, not an atlas: positions within a few millimetres of the
borders (the tentorium, the midbrain-thalamus junction) deserve a look.
"""

TENTORIUM_MM = (-4.0, 0.42, (-76.0, -44.0))
"""The tentorium between y = -76 and -44 as a roof: ``z = -4 - 0.42 |x|`` (mm, MNI).

Its ridge (z = -4 at the midline, over the vermis) falls to z = -25 at |x| = 50, over the
cerebellar hemispheres; the cerebellum lies below, the fusiform and lingual gyri and the
occipital lobe above. An approximation of the template's anatomy, not an atlas.
"""

DEEP_BOX_MM = {"x": (-32.0, 32.0), "y": (-32.0, 28.0), "z": (-8.0, 20.0)}
"""MNI box (open intervals, mm) of the deep region: basal ganglia, thalamus, internal and
external capsules and the deep white matter around them; the insula (|x| of 35-40 mm) lies
outside. An approximation, not an atlas."""

DEEP_MIN_DEPTH_MM = 12.0
"""Deep-region voxels also lie more than this far inside the brain mask (mm): what lies nearer
the surface within the box (cortex of the medial and orbital surfaces) is lobar."""


def _in_box(coordinates: dict[str, np.ndarray], box: dict[str, tuple[float, float]]) -> np.ndarray:
    inside = np.ones(coordinates["x"].shape, dtype=bool)
    for axis, (low, high) in box.items():
        inside &= (coordinates[axis] > low) & (coordinates[axis] < high)
    return inside


def mars_regions(brain_mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """MARS regions of a brain mask in MNI space, from approximate coordinate boxes.

    Parameters
    ----------
    brain_mask : numpy.ndarray
        Brain mask on a grid in MNI space (the template's).
    affine : numpy.ndarray
        Voxel-to-MNI matrix of the grid.

    Returns
    -------
    numpy.ndarray
        uint8 labels (:data:`MARS_REGIONS`): 3 (infratentorial) in
        :data:`INFRATENTORIAL_BOXES_MM` or under :data:`TENTORIUM_MM`, else 2 (deep) in
        :data:`DEEP_BOX_MM` and more than :data:`DEEP_MIN_DEPTH_MM` inside the mask, else 1
        (lobar); 0 outside the mask.

    Raises
    ------
    BadDataError
        The mask is not 3D or the affine not a 4x4 matrix.
    """
    brain = np.asarray(brain_mask) > 0
    affine = np.asarray(affine, dtype=np.float64)
    if brain.ndim != 3 or affine.shape != (4, 4):
        raise BadDataError(f"MARS regions need a 3D mask and a 4x4 affine, not shapes "
                           f"{brain.shape} and {affine.shape}")
    axes = [np.arange(n, dtype=np.float64).reshape([-1 if a == d else 1 for a in range(3)])
            for d, n in enumerate(brain.shape)]
    coordinates = {name: np.broadcast_to(
        sum(affine[row, d] * axes[d] for d in range(3)) + affine[row, 3], brain.shape)
        for row, name in enumerate("xyz")}
    ridge, slope, (back, front) = TENTORIUM_MM
    x, y, z = coordinates["x"], coordinates["y"], coordinates["z"]
    infratentorial = (y > back) & (y <= front) & (z < ridge - slope * np.abs(x))
    for box in INFRATENTORIAL_BOXES_MM:
        infratentorial |= _in_box(coordinates, box)
    depth = ndimage.distance_transform_edt(
        brain, sampling=np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    deep = _in_box(coordinates, DEEP_BOX_MM) & (depth > DEEP_MIN_DEPTH_MM)
    labels = np.where(infratentorial, 3, np.where(deep, 2, 1)).astype(np.uint8)
    labels[~brain] = 0
    return labels


def candidate_table(candidates: pd.DataFrame, scores: pd.Series | np.ndarray,
                    affine: np.ndarray, regions: np.ndarray) -> pd.DataFrame:
    """The table a reader sees: one row per candidate, highest score first.

    Parameters
    ----------
    candidates : pandas.DataFrame
        From :func:`blob_candidates`.
    scores : pandas.Series or numpy.ndarray
        Their scores (:func:`candidate_score`): a series aligned on ``candidate_id``, or values
        in the rows' order.
    affine : numpy.ndarray
        Voxel-to-template matrix of the grid.
    regions : numpy.ndarray
        :func:`mars_regions` labels on the grid.

    Returns
    -------
    pandas.DataFrame
        The columns of :data:`CANDIDATE_COLUMNS`, sorted by decreasing score (ties by
        ``candidate_id``); ``region`` is ``outside`` where the label is 0.
    """
    if isinstance(scores, pd.Series):
        values = scores.reindex(candidates.index).to_numpy(dtype=np.float64)
    else:
        values = np.asarray(scores, dtype=np.float64).ravel()
        if values.size != len(candidates):
            raise ValueError(f"{values.size} scores for {len(candidates)} candidates")
    if len(candidates) == 0:
        return pd.DataFrame(columns=list(CANDIDATE_COLUMNS))
    affine = np.asarray(affine, dtype=np.float64)
    voxels = candidates[["i", "j", "k"]].to_numpy(dtype=np.int64)
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    labels = np.asarray(regions)[tuple(voxels.T)]
    table = pd.DataFrame({
        "candidate_id": candidates.index.to_numpy(dtype=np.int64),
        "x": world[:, 0], "y": world[:, 1], "z": world[:, 2],
        "radius_mm": candidates["radius_mm"].to_numpy(dtype=np.float64),
        "score": values,
        "blobness": candidates["blobness"].to_numpy(dtype=np.float64),
        "elongation": candidates["elongation"].to_numpy(dtype=np.float64),
        "region": [MARS_REGIONS.get(int(label), "outside") for label in labels],
    })
    table = table.sort_values(["score", "candidate_id"], ascending=[False, True],
                              kind="stable", na_position="last")
    return table[list(CANDIDATE_COLUMNS)].reset_index(drop=True)


def candidate_mask(shape: Sequence[int], candidates: pd.DataFrame,
                   voxel_size_mm: float | Sequence[float]) -> np.ndarray:
    """A label image of the candidates' spheres (uint16): each labelled by its ``candidate_id``.

    Where spheres overlap, the smaller ``candidate_id`` (the stronger blob) wins.
    """
    shape = tuple(int(n) for n in shape)
    labels = np.zeros(shape, dtype=np.uint16)
    if len(candidates) and int(candidates.index.max()) > np.iinfo(np.uint16).max:
        raise ValueError("more candidates than a uint16 label image holds")
    spheres = list(_sphere_points(candidates, voxel_size_mm, shape))
    for label, points in sorted(zip(candidates.index.tolist(), spheres, strict=True),
                                key=lambda pair: -pair[0]):
        labels[tuple(points.T)] = label
    return labels


def _control_arrays(control_scores: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """All control candidates' finite scores (descending) and the number of control subjects."""
    arrays = [np.asarray(s, dtype=np.float64).ravel() for s in control_scores]
    if not arrays:
        raise BadDataError("calibrating a microbleed threshold needs at least one control "
                           "subject")
    pooled = np.concatenate(arrays)
    pooled = pooled[~np.isnan(pooled)]
    return np.sort(pooled)[::-1], len(arrays)


def threshold_for_fp(control_scores: Sequence[np.ndarray], fp_per_subject: float) -> float:
    """The smallest threshold that keeps at most ``fp_per_subject`` false positives per control.

    Controls have no microbleeds, so each of their candidates is a false positive. A candidate
    is kept when its score is strictly above the threshold. With ``n`` control subjects at
    most ``K = floor(fp_per_subject * n)`` control candidates may be kept: the threshold is the
    ``(K + 1)``-th largest control score (ties may keep fewer than ``K``), and ``-inf`` (every
    candidate kept) when the controls have no more than ``K`` candidates in all, for instance
    when they have none. Scores that are nan are ignored.

    Parameters
    ----------
    control_scores : sequence of numpy.ndarray
        One array per control subject: the scores of its candidates (possibly empty).
    fp_per_subject : float
        Largest mean number of false positives per subject (non-negative).

    Returns
    -------
    float
        The threshold; ``-inf`` when every candidate is kept (write it as "n/a" in tables).

    Raises
    ------
    BadDataError
        No control subject.

    Examples
    --------
    Three controls with candidates scored [5, 1], [3] and none:

    >>> controls = [[5.0, 1.0], [3.0], []]
    >>> threshold_for_fp(controls, 1.0)  # 3 allowed in all, 3 there: all kept
    -inf
    >>> threshold_for_fp(controls, 0.5)  # floor(1.5) = 1 allowed: only 5 is above 3
    3.0
    >>> threshold_for_fp(controls, 0.0)  # none allowed: nothing is above 5
    5.0
    """
    if not fp_per_subject >= 0:
        raise ValueError(f"false positives per subject must be non-negative, not "
                         f"{fp_per_subject}")
    pooled, n_subjects = _control_arrays(control_scores)
    allowed = int(math.floor(fp_per_subject * n_subjects + 1e-9))
    if pooled.size <= allowed:
        return -math.inf
    return float(pooled[allowed])


def fp_curve(control_scores: Sequence[np.ndarray]) -> pd.DataFrame:
    """False positives per control subject against the threshold, for reports.

    Parameters
    ----------
    control_scores : sequence of numpy.ndarray
        One array per control subject: the scores of its candidates (possibly empty).

    Returns
    -------
    pandas.DataFrame
        Columns ``threshold`` (``-inf``, then each distinct control score, increasing) and
        ``fp_per_subject`` (mean number of control candidates scored strictly above it,
        decreasing to 0). :func:`threshold_for_fp` returns the first threshold whose
        ``fp_per_subject`` is within its limit.
    """
    pooled, n_subjects = _control_arrays(control_scores)
    thresholds = np.unique(pooled)
    above = pooled.size - np.searchsorted(pooled[::-1], thresholds, side="right")
    return pd.DataFrame({
        "threshold": np.concatenate([[-math.inf], thresholds]),
        "fp_per_subject": np.concatenate([[pooled.size], above]) / n_subjects,
    })


def detect_microbleeds(channel: np.ndarray, brain: np.ndarray, anomaly_map: np.ndarray,
                       affine: np.ndarray, regions_brain: np.ndarray | None = None,
                       threshold: float | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Microbleed candidates of one subject, scored by an anomaly map and thresholded.

    Parameters
    ----------
    channel : numpy.ndarray
        The susceptibility-weighted channel on the template grid (microbleeds dark).
    brain : numpy.ndarray
        The subject's brain mask on that grid.
    anomaly_map : numpy.ndarray
        A model's voxel-wise scores on that grid (:func:`score_candidates`).
    affine : numpy.ndarray
        The grid's voxel-to-template matrix (isotropic voxels).
    regions_brain : numpy.ndarray, optional
        The brain that defines the MARS regions (:func:`mars_regions`; the template's, so that
        regions do not depend on the subject's mask); default ``brain``.
    threshold : float or None
        Candidates scoring strictly above it are kept (:func:`threshold_for_fp`); None keeps
        every candidate.

    Returns
    -------
    table : pandas.DataFrame
        :func:`candidate_table` with a boolean ``kept`` column.
    labels : numpy.ndarray
        The kept candidates' spheres (:func:`candidate_mask`).
    """
    voxel_size = float(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)).mean())
    candidates = blob_candidates(channel, brain, voxel_size)
    scores = score_candidates(candidates, anomaly_map, voxel_size)
    regions = mars_regions(brain if regions_brain is None else regions_brain, affine)
    table = candidate_table(candidates, scores, affine, regions)
    limit = -np.inf if threshold is None else threshold
    table["kept"] = table["score"].to_numpy(dtype=np.float64) > limit
    kept = candidates.loc[table.loc[table["kept"], "candidate_id"].to_numpy(dtype=np.int64)]
    return table, candidate_mask(channel.shape, kept, voxel_size)


def calibrate_microbleeds(model, controls, channel: str, fp_per_subject: float) -> dict:
    """The candidate score threshold of a model for ``fp_per_subject`` per healthy control.

    Every candidate found on the held-out controls is a false positive; the threshold keeps
    at most ``fp_per_subject`` of them per control on average (:func:`threshold_for_fp`).

    Parameters
    ----------
    model : AnomalyModel
        The fitted model (its ``score`` gives the map the candidates are scored by).
    controls : TrainingData
        Held-out healthy subjects (the model's calibration subjects).
    channel : str
        The susceptibility-weighted channel (one of ``controls.channels``).
    fp_per_subject : float
        The false positives allowed per control.

    Returns
    -------
    dict
        ``channel``, ``fp_per_subject``, ``threshold`` (None: every candidate is kept, the
        controls had fewer than allowed), ``controls`` (their number),
        ``candidates_per_control`` (before thresholding) and ``fp_curve`` (up to 50 points of
        :func:`fp_curve`), for the model card.
    """
    import torch

    from bids_anomaly.models.contract import scorer_for

    index = list(controls.channels).index(channel)
    affine = None
    scores = []
    for subject in controls.subjects:
        image, mask = subject.load("cpu")
        if affine is None:
            affine = nib.load(subject.mask).affine
        with torch.no_grad():
            anomaly_map = scorer_for(model, subject).score(image, mask).cpu().numpy()
        voxel_size = float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).mean())
        candidates = blob_candidates(image[index].numpy(), mask.numpy(), voxel_size)
        scores.append(score_candidates(candidates, anomaly_map, voxel_size).to_numpy())
    threshold = threshold_for_fp(scores, fp_per_subject)
    curve = fp_curve(scores)
    step = max(1, len(curve) // 50)
    return {"channel": channel, "fp_per_subject": fp_per_subject,
            "threshold": threshold if np.isfinite(threshold) else None,
            "controls": len(scores),
            "candidates_per_control": float(np.mean([len(s) for s in scores])),
            "fp_curve": curve.iloc[::step].replace({-np.inf: None}).to_dict("list")}
