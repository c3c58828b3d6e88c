"""Diffusion-weighted images: reading runs and gradients, b=0 brain mask, tensor maps.

Everything here is plain numpy/nibabel/dipy; :class:`bids_anomaly.interfaces.dipy.DTIFit` wraps
it for the workflows. Gradients follow the FSL convention that BIDS uses: a ``.bval`` file with
one b-value per volume (s/mm^2) and a ``.bvec`` file with one unit direction per volume, in the
image's voxel axes (x flipped when the affine's determinant is positive).
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from bids_anomaly.config import DIFFUSION_MAPS
from bids_anomaly.errors import BadDataError, MissingInputError

LOGGER = logging.getLogger(__name__)

B0_THRESHOLD = 50
"""b-value (s/mm^2) at or below which a volume counts as b = 0."""

MIN_DIFFUSION_VOLUMES = 6
"""Diffusion-weighted volumes a tensor (6 unknowns besides S0) needs at the least."""

ZERO_NORM = 1e-2
"""A gradient direction shorter than this is "no direction"."""

GRID_ATOL = 1e-3
"""Runs whose affines agree within this (mm) share a grid."""


@dataclass
class DwiData:
    """The dwi runs of a session on one grid, with their gradients.

    Attributes
    ----------
    data : numpy.ndarray
        float32 array (x, y, z, volumes), finite.
    affine : numpy.ndarray
        4x4 voxel-to-world affine of the first run.
    header : nibabel.nifti1.Nifti1Header
        Header of the first run.
    bvals : numpy.ndarray
        b-values (s/mm^2), one per volume.
    bvecs : numpy.ndarray
        (volumes, 3) directions in the first run's voxel axes, unit length for the
        diffusion-weighted volumes.
    runs : int
        Number of runs concatenated.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    bvals: np.ndarray
    bvecs: np.ndarray
    runs: int

    @property
    def b0_mask(self) -> np.ndarray:
        """Boolean per volume: b-value at or below :data:`B0_THRESHOLD`."""
        return self.bvals <= B0_THRESHOLD


def read_gradients(dwi_file: str | Path, bval_file: str | Path, bvec_file: str | Path,
                   n_volumes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and check the FSL-style ``.bval`` and ``.bvec`` files of a dwi run.

    Parameters
    ----------
    dwi_file : str or Path
        The dwi image the gradients belong to (named in messages).
    bval_file : str or Path
        One row of b-values (s/mm^2), one per volume.
    bvec_file : str or Path
        Three rows of direction components, one column per volume (a file with one row per
        volume and three columns is accepted too).
    n_volumes : int
        Number of volumes of the image.

    Returns
    -------
    bvals : numpy.ndarray
        (n_volumes,) float b-values.
    bvecs : numpy.ndarray
        (n_volumes, 3) directions; those of diffusion-weighted volumes scaled to unit length.

    Raises
    ------
    MissingInputError
        A gradient file is absent.
    BadDataError
        A file is not a table of numbers, its count differs from the number of volumes, a
        b-value is negative, or a diffusion-weighted volume has no direction.
    """
    bvals = _bvals_row(_read_table(bval_file, "bval", dwi_file), bval_file)
    bvecs = _bvecs_columns(_read_table(bvec_file, "bvec", dwi_file), bvec_file)
    for kind, path, count in (("bval", bval_file, bvals.size), ("bvec", bvec_file, len(bvecs))):
        if count != n_volumes:
            raise BadDataError(
                f"{dwi_file} has {n_volumes} volumes but its .{kind} ({path}) lists {count} "
                f"{'values' if kind == 'bval' else 'directions'}; give one per volume"
            )
    if np.any(bvals < 0):
        raise BadDataError(f"{bval_file}: negative b-values ({bvals.min():g}); b-values are "
                           "in s/mm^2 and cannot be below 0")
    return bvals, _unit_directions(bvals, bvecs, bvec_file)


def _read_table(path: str | Path, kind: str, dwi_file: str | Path) -> np.ndarray:
    """Read a gradient file as a 2D float table, refusing missing, empty or non-numeric files."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: the .{kind} file of {dwi_file} is missing; put it next "
                                "to the dwi image (the BIDS sidecar with the same name)")
    try:
        text = path.read_text().replace(",", " ")
        table = np.loadtxt(io.StringIO(text), dtype=float, ndmin=2)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BadDataError(f"{path}: cannot read this .{kind} file as a table of numbers "
                           f"({error}); it should hold numbers separated by spaces") from error
    if table.size == 0:
        raise BadDataError(f"{path}: the .{kind} file is empty; it should list one value per "
                           "dwi volume")
    if not np.all(np.isfinite(table)):
        raise BadDataError(f"{path}: the .{kind} file holds NaN or infinite values")
    return table


def _bvals_row(table: np.ndarray, path: str | Path) -> np.ndarray:
    """The b-values of a one-row (or one-column) table."""
    if min(table.shape) != 1:
        raise BadDataError(f"{path}: expected one row of b-values, found a {table.shape[0]} x "
                           f"{table.shape[1]} table")
    return table.ravel()


def _bvecs_columns(table: np.ndarray, path: str | Path) -> np.ndarray:
    """The (N, 3) directions of a 3 x N (or N x 3) table."""
    if table.shape[0] == 3:
        return table.T.copy()
    if table.shape[1] == 3:
        return table.copy()
    raise BadDataError(f"{path}: expected 3 rows of direction components, found a "
                       f"{table.shape[0]} x {table.shape[1]} table")


def _unit_directions(bvals: np.ndarray, bvecs: np.ndarray, path: str | Path) -> np.ndarray:
    """Scale the directions of diffusion-weighted volumes to unit length."""
    weighted = bvals > B0_THRESHOLD
    norms = np.linalg.norm(bvecs, axis=1)
    missing = weighted & (norms < ZERO_NORM)
    if missing.any():
        volumes = ", ".join(str(i) for i in np.flatnonzero(missing)[:5])
        raise BadDataError(f"{path}: volumes {volumes} have a b-value above {B0_THRESHOLD} but "
                           "a zero direction; fix the .bvec or .bval file")
    if np.any(np.abs(norms[weighted] - 1) > 0.01):
        LOGGER.warning("%s: directions not of unit length (norms %.3g to %.3g); normalised",
                       path, norms[weighted].min(), norms[weighted].max())
    out = bvecs.astype(float)
    out[weighted] /= norms[weighted, None]
    return out


def load_dwi_runs(dwi_files: Sequence[str | Path], bval_files: Sequence[str | Path],
                  bvec_files: Sequence[str | Path]) -> DwiData:
    """Read dwi runs with their gradients onto the first run's grid and check the set.

    Runs on the first run's grid are concatenated along volumes; a run on another grid is
    resampled onto it (trilinear, volume by volume) and its directions rotated into the first
    run's voxel axes.

    Parameters
    ----------
    dwi_files : sequence of str or Path
        4D dwi images, one per run.
    bval_files, bvec_files : sequence of str or Path
        Their gradient files, in the same order.

    Returns
    -------
    DwiData
        All volumes on one grid, NaN and infinite voxels set to 0.

    Raises
    ------
    MissingInputError
        A file is absent, or the lists differ in length.
    BadDataError
        An image is unreadable or not 4D, gradients do not match it (:func:`read_gradients`),
        or the set cannot give a tensor (:func:`check_gradients`).
    """
    if not dwi_files:
        raise MissingInputError("no dwi run given")
    if not len(dwi_files) == len(bval_files) == len(bvec_files):
        raise MissingInputError(f"{len(dwi_files)} dwi runs but {len(bval_files)} .bval and "
                                f"{len(bvec_files)} .bvec files; every run needs both")
    first = None
    volumes, all_bvals, all_bvecs = [], [], []
    for dwi_file, bval_file, bvec_file in zip(dwi_files, bval_files, bvec_files, strict=True):
        img, data = _load_run(dwi_file)
        bvals, bvecs = read_gradients(dwi_file, bval_file, bvec_file, data.shape[3])
        if first is None:
            first = img
        elif not _same_grid(img, first):
            LOGGER.info("%s: grid %s differs from the first run's %s; resampled onto it",
                        dwi_file, data.shape[:3], first.shape[:3])
            data = _resample_run(data, img.affine, first)
            bvecs = _rotate_directions(bvecs, img.affine, first.affine)
        volumes.append(data)
        all_bvals.append(bvals)
        all_bvecs.append(bvecs)
    dwi = DwiData(
        data=volumes[0] if len(volumes) == 1 else np.concatenate(volumes, axis=3),
        affine=first.affine.copy(), header=first.header.copy(),
        bvals=np.concatenate(all_bvals), bvecs=np.concatenate(all_bvecs), runs=len(volumes),
    )
    check_gradients(dwi.bvals, dwi.bvecs, _describe(dwi_files))
    return dwi


def _describe(files: Sequence[str | Path]) -> str:
    """Name a set of runs in a message."""
    if len(files) == 1:
        return str(files[0])
    return f"{files[0]} (and {len(files) - 1} other dwi runs)"


def _load_run(path: str | Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Read one dwi run: a 4D image with a usable affine, as finite float32."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except FileNotFoundError as error:
        raise MissingInputError(f"{path}: file not found") from error
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
            ImageFileError) as error:
        raise BadDataError(
            f"{path}: cannot read this NIfTI file ({error.__class__.__name__}: {error}); it is "
            "probably truncated or corrupt, replace it with a complete copy"
        ) from error
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3:
        raise BadDataError(f"{path} is 3D: a dwi run needs one volume per gradient direction "
                           "(a 4D image); give the whole series")
    if data.ndim != 4:
        raise BadDataError(f"{path}: expected a 4D dwi series, got shape {data.shape}")
    affine = img.affine
    if (affine is None or not np.all(np.isfinite(affine))
            or abs(np.linalg.det(affine[:3, :3])) < 1e-6):
        raise BadDataError(f"{path}: the header has no usable orientation (affine)")
    finite = np.isfinite(data)
    if not finite.all():
        LOGGER.warning("%s: %d NaN or infinite voxels set to 0", path, int((~finite).sum()))
        data[~finite] = 0
    return img, data


def _same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage) -> bool:
    """Whether two images share their first three dimensions and affine."""
    return (a.shape[:3] == b.shape[:3]
            and np.allclose(a.affine, b.affine, atol=GRID_ATOL))


def _resample_run(data: np.ndarray, affine: np.ndarray,
                  target: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Resample a 4D series onto ``target``'s grid, one volume at a time (trilinear)."""
    from nibabel.processing import resample_from_to

    grid = (tuple(target.shape[:3]), target.affine)
    out = np.empty(grid[0] + (data.shape[3],), dtype=np.float32)
    for index in range(data.shape[3]):
        volume = nib.Nifti1Image(data[..., index], affine)
        out[..., index] = np.asarray(resample_from_to(volume, grid, order=1).dataobj)
    return out


def _voxel_frame(affine: np.ndarray) -> np.ndarray:
    """Rotation from FSL's gradient frame of an image to world axes."""
    axes = np.asarray(affine, dtype=float)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    if np.linalg.det(axes) > 0:
        axes = axes @ np.diag([-1.0, 1.0, 1.0])
    return axes


def _rotate_directions(bvecs: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Express FSL directions of an image with affine ``source`` in the frame of ``target``."""
    rotation = np.linalg.inv(_voxel_frame(target)) @ _voxel_frame(source)
    rotated = bvecs @ rotation.T
    norms = np.linalg.norm(rotated, axis=1, keepdims=True)
    return np.where(norms > ZERO_NORM, rotated / np.where(norms > 0, norms, 1), rotated)


def check_gradients(bvals: np.ndarray, bvecs: np.ndarray, name: str = "dwi") -> None:
    """Refuse gradients from which no diffusion tensor can be estimated.

    Parameters
    ----------
    bvals : numpy.ndarray
        b-values (s/mm^2).
    bvecs : numpy.ndarray
        (N, 3) unit directions.
    name : str
        The runs, named in messages.

    Raises
    ------
    BadDataError
        No b = 0 volume, fewer than :data:`MIN_DIFFUSION_VOLUMES` diffusion-weighted volumes,
        or directions that do not determine the six tensor elements.
    """
    weighted = bvals > B0_THRESHOLD
    if weighted.all():
        raise BadDataError(f"{name}: no b=0 volume (every b-value is above {B0_THRESHOLD} "
                           "s/mm^2); the tensor fit needs one: check the .bval files")
    count = int(weighted.sum())
    if count == 0:
        raise BadDataError(f"{name}: only b = 0 volumes (no b-value above {B0_THRESHOLD} "
                           f"s/mm^2); the tensor fit needs at least {MIN_DIFFUSION_VOLUMES} "
                           "diffusion-weighted volumes: check the .bval files")
    if count < MIN_DIFFUSION_VOLUMES:
        raise BadDataError(f"{name}: only {count} diffusion-weighted volumes; the tensor fit "
                           f"needs at least {MIN_DIFFUSION_VOLUMES} in non-collinear directions")
    directions = bvecs[weighted]
    rank = np.linalg.matrix_rank(directions, tol=1e-3)
    if rank < 3:
        raise BadDataError(f"{name}: the diffusion directions are collinear or coplanar (rank "
                           f"{rank} of 3); the tensor fit needs directions spanning 3D space")
    x, y, z = directions.T
    design = np.column_stack([x * x, y * y, z * z, x * y, x * z, y * z])
    rank = np.linalg.matrix_rank(design, tol=1e-3)
    if rank < 6:
        raise BadDataError(f"{name}: the diffusion directions determine only {rank} of the 6 "
                           "tensor elements (repeated directions); the tensor fit needs at "
                           "least 6 distinct, non-coplanar directions")


def mean_b0(dwi: DwiData) -> np.ndarray:
    """Mean of the b = 0 volumes, float32 (x, y, z)."""
    return dwi.data[..., dwi.b0_mask].mean(axis=3, dtype=np.float64).astype(np.float32)


def brain_mask_from_b0(b0: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Brain mask of a b = 0 image: median filter and Otsu threshold, cleaned.

    dipy's :func:`~dipy.segment.mask.median_otsu` (median radius 2, one pass) is followed by
    keeping the largest connected component and filling its holes.

    Parameters
    ----------
    b0 : numpy.ndarray
        3D b = 0 image.
    voxel_size : sequence of float
        Voxel size (mm), for the volume reported in the log.

    Returns
    -------
    numpy.ndarray
        Boolean mask.

    Raises
    ------
    BadDataError
        The mask is empty (a blank b = 0 image).
    """
    from dipy.segment.mask import median_otsu
    from scipy import ndimage

    _, mask = median_otsu(np.asarray(b0, dtype=np.float32), median_radius=2, numpass=1)
    labels, count = ndimage.label(mask)
    if count == 0:
        raise BadDataError("the b=0 image gives an empty brain mask: it is blank or constant; "
                           "check the dwi data")
    sizes = np.bincount(labels.ravel())[1:]
    mask = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    volume_ml = mask.sum() * float(np.prod(voxel_size)) / 1000
    LOGGER.info("b=0 brain mask: %d voxels (%.0f ml)", int(mask.sum()), volume_ml)
    return mask


def fit_tensor(dwi: DwiData, mask: np.ndarray, params: Sequence[str] = ("FA", "MD"),
               fit_method: str = "WLS") -> dict[str, np.ndarray]:
    """Fit a diffusion tensor in every voxel of the mask and return the requested maps.

    Parameters
    ----------
    dwi : DwiData
        The dwi series and gradients.
    mask : numpy.ndarray
        3D boolean mask on the dwi grid; only its voxels are fitted.
    params : sequence of str
        Maps among :data:`~bids_anomaly.config.DIFFUSION_MAPS`: fractional anisotropy (FA),
        mean, axial and radial diffusivity (MD, AD, RD).
    fit_method : str
        dipy's tensor fit method ("WLS", "OLS", "NLLS", ...).

    Returns
    -------
    dict of str to numpy.ndarray
        float32 maps by name, in the order of ``params``: FA in [0, 1], diffusivities in mm^2/s;
        0 outside the mask and where the fit fails.

    Raises
    ------
    ValueError
        An unknown map name, or a mask not on the dwi grid.
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    unknown = [name for name in params if name not in DIFFUSION_MAPS]
    if unknown:
        raise ValueError(f"unknown diffusion map(s) {unknown}; choose among {DIFFUSION_MAPS}")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != dwi.data.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} differs from the dwi grid {dwi.data.shape[:3]}")
    maps = {name: np.zeros(mask.shape, dtype=np.float32) for name in params}
    if not mask.any():
        return maps
    gtab = gradient_table(dwi.bvals, bvecs=dwi.bvecs, b0_threshold=B0_THRESHOLD)
    fit = TensorModel(gtab, fit_method=fit_method).fit(dwi.data[mask])
    for name in params:
        values = np.nan_to_num(np.asarray(getattr(fit, name.lower()), dtype=np.float32),
                               nan=0.0, posinf=0.0, neginf=0.0)
        if name == "FA":
            values = np.clip(values, 0.0, 1.0)
        maps[name][mask] = values
    return maps


def check_maps(paths: dict[str, str | Path]) -> tuple[dict[str, np.ndarray], nib.Nifti1Image]:
    """Read another pipeline's diffusion maps of one subject, checked.

    Each map must be a readable 3D image (:func:`~bids_anomaly.imaging.images.load_volume`) on the
    grid of the first, not empty; FA outside [0, 1] or a negative median diffusivity means maps in
    other units or under another name, and is refused.

    Parameters
    ----------
    paths : dict
        Map name (``FA``, ``MD``, ``AD``, ``RD``) to file.

    Returns
    -------
    maps : dict of str to numpy.ndarray
        float32 arrays by name.
    first : nibabel.Nifti1Image
        The first map's image (its grid).

    Raises
    ------
    BadDataError
        Any of the above.
    """
    from bids_anomaly.imaging.images import check_same_grid, load_volume

    images = {name: load_volume(path) for name, path in paths.items()}
    check_same_grid(list(paths.values()), "the maps of one subject")
    names = list(images)
    first = images[names[0]]
    data = {name: np.asarray(img.dataobj, dtype=np.float32) for name, img in images.items()}
    support = np.any([d != 0 for d in data.values()], axis=0)
    if not support.any():
        raise BadDataError(f"{paths[names[0]]}: the maps are empty (all 0)")
    fa = data.get("FA")
    if fa is not None and (fa[support].min() < -1e-3 or fa[support].max() > 1.001):
        raise BadDataError(f"{paths['FA']}: FA outside [0, 1] (a map in other units, or "
                           "another parameter?)")
    for name in ("MD", "AD", "RD"):
        if name in data and np.median(data[name][support]) < 0:
            raise BadDataError(f"{paths[name]}: negative median {name}; is it a diffusivity "
                               "map?")
    return data, first
