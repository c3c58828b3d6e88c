"""Reading volumes safely: every image the tool touches passes through :func:`load_volume`."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from bids_anomaly.errors import BadDataError, file_problem

LOGGER = logging.getLogger(__name__)


def load_volume(path: str | Path, *, dtype: type = np.float32,
                finite: bool = False) -> nib.Nifti1Image:
    """Read a 3D NIfTI image, checking everything that makes later steps fail obscurely.

    Files that cannot be opened, truncated or corrupt files, complex-valued images, 4D images
    (other than a single trailing volume), voxel sizes that are zero in a header without an
    orientation (nibabel would take them for 1 mm) or that no MR image has (outside
    :data:`VOXEL_SIZE_MM`), and images without a usable affine are refused with a
    :class:`~bids_anomaly.errors.BadDataError` naming the file and the reason. NaN and infinite
    voxels are set to zero and reported in the log.

    Parameters
    ----------
    path : str or Path
        NIfTI file (``.nii`` or ``.nii.gz``).
    dtype : numpy dtype
        Data type of the returned image.
    finite : bool
        Refuse NaN or infinite voxels instead of setting them to 0 (a mask).

    Returns
    -------
    nibabel.Nifti1Image
        The image with its data in memory, 3D, finite.
    """
    path = Path(path)
    try:
        with open(path, "rb"):  # nibabel says "cannot work out the file type" for a file it
            pass                # may not open: ask the system first
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except OSError as error:
        problem = file_problem(path, error)
        if problem is None:
            raise _corrupt(path, error) from error
        raise BadDataError(problem) from error
    except (EOFError, ValueError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError) as error:
        raise _corrupt(path, error) from error
    if data.dtype.kind == "c":
        raise BadDataError(f"{path}: a complex-valued image ({data.dtype}); give its magnitude "
                           "(the part-mag image) instead")
    if data.dtype.kind not in "biuf":
        raise BadDataError(f"{path}: not an image of numbers (data type {data.dtype})")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim < 3:
        raise BadDataError(f"{path}: expected a 3D volume, got a {data.ndim}D image of shape "
                           f"{data.shape} (a single slice?); give the whole volume")
    if data.ndim != 3:
        raise BadDataError(
            f"{path}: expected a 3D volume, got shape {data.shape}; split 4D series and give one "
            "volume per file"
        )
    if min(data.shape) < 2:
        raise BadDataError(f"{path}: volume of shape {data.shape} is too small to be a brain image")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise BadDataError(f"{path}: invalid voxel sizes {tuple(zooms)}")
    _check_stored_voxel_sizes(path, img)
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise BadDataError(f"{path}: the header has no usable orientation (affine)")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    low, high = VOXEL_SIZE_MM
    if not (sizes >= low).all() or not (sizes <= high).all():
        shown = " x ".join(f"{size:.3g}" for size in sizes)
        raise BadDataError(f"{path}: voxels of {shown} mm: no MR image of a head has voxels "
                           f"outside {low:g}-{high:g} mm; fix the voxel sizes in the header")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(sizes)):
        raise BadDataError(f"{path}: the header has no usable orientation (affine)")
    shear = affine_shear(affine)
    if shear > MAX_SHEAR:
        raise BadDataError(
            f"{path}: the affine is sheared (its axes are {np.degrees(shear):.2f} degrees from "
            "perpendicular); ITK/ANTs only take rotations and voxel sizes: reslice the image "
            "onto an unsheared grid first"
        )
    data = np.asarray(data, dtype=np.float64)
    valid = np.isfinite(data)
    if not valid.all():
        if finite:
            raise BadDataError(f"{path}: {int((~valid).sum())} of its {data.size} voxels are "
                               "NaN or infinite; a mask holds 0 outside and 1 (or a label) "
                               "inside")
        LOGGER.warning("%s: %d NaN or infinite voxels set to 0", path, int((~valid).sum()))
        data = np.where(valid, data, 0.0)
    out = nib.Nifti1Image(data.astype(dtype), affine, img.header)
    out.header.set_data_dtype(dtype)
    out.header.set_slope_inter(1.0, 0.0)
    return out


def _corrupt(path: Path, error: BaseException) -> BadDataError:
    """The error for a file that opens but cannot be read as NIfTI."""
    return BadDataError(f"{path}: cannot read this NIfTI file ({error.__class__.__name__}: "
                        f"{error}); it is probably truncated or corrupt, replace it with a "
                        "complete copy")


def _check_stored_voxel_sizes(path: Path, img: nib.spatialimages.SpatialImage) -> None:
    """Refuse voxel sizes of 0 in a header that gives no orientation.

    nibabel replaces them by 1 mm when it reads the header: the image would be processed at a
    size nobody gave. With a qform or sform, the voxel sizes come from it.
    """
    header = img.header
    if not isinstance(header, nib.Nifti1Header):
        return
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as stream:
            stored = type(header).from_fileobj(stream, check=False)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise _corrupt(path, error) from error
    pixdim = np.asarray(stored["pixdim"][1:4], dtype=float)
    if (int(stored["qform_code"]) == 0 and int(stored["sform_code"]) == 0
            and not (np.isfinite(pixdim) & (pixdim > 0)).all()):
        raise BadDataError(f"{path}: the header gives voxel sizes {tuple(pixdim.tolist())} and "
                           "no orientation (qform and sform codes 0): the size of the image in "
                           "millimetres is unknown; fix the header")


VOXEL_SIZE_MM = (0.05, 15.0)
"""Smallest and largest voxel side (mm) of an MR image of a head: ex vivo scans reach 0.1 mm,
clinical 2D stacks slices of 5-10 mm; a voxel of 0.002 or 100 mm is a wrong header."""

MIN_HEAD_VOXELS = 10
"""Fewest voxels along any axis of an anatomical image: a head needs more."""

MIN_HEAD_EXTENT_MM = 30.0
"""Smallest field of view (mm) along any axis of an anatomical image: a head is about 120 to
200 mm in each direction, a thinner slab cannot be registered to a whole-brain template."""

MAX_SHEAR = 1e-3
"""Largest angle (radians) by which voxel axes may deviate from perpendicular.

ITK refuses direction matrices that are not orthonormal (within about 1e-4 per element);
rounding in NIfTI headers written by common converters stays far below this.
"""

MIN_DISTINCT_INTENSITIES = 16
"""Fewer distinct values than this in the foreground: a mask or label image, not an MR image."""

PADDING_FRACTION = 0.05
"""Share of the voxels at the image's negative minimum above which that value is padding."""


def affine_shear(affine: np.ndarray) -> float:
    """Largest deviation from perpendicular (radians) between the affine's voxel axes.

    >>> affine_shear(np.diag([2.0, 2.0, 3.0, 1.0]))
    0.0
    """
    axes = np.asarray(affine, dtype=float)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    cosines = np.abs(axes.T @ axes - np.eye(3))
    return float(np.arcsin(np.clip(cosines.max(), 0.0, 1.0)))


def check_anatomical(img: nib.spatialimages.SpatialImage, path: str | Path) -> None:
    """Refuse an image that cannot be a structural MR image of a head.

    ``img`` is the image as :func:`load_volume` returns it.

    Raises
    ------
    BadDataError
        Fewer than :data:`MIN_HEAD_VOXELS` voxels or :data:`MIN_HEAD_EXTENT_MM` along an axis,
        every voxel 0 (or NaN), one constant value, or fewer than
        :data:`MIN_DISTINCT_INTENSITIES` distinct values in the non-zero voxels.
    """
    data = np.asarray(img.dataobj)
    extent = np.asarray(data.shape[:3]) * np.linalg.norm(img.affine[:3, :3], axis=0)
    if min(data.shape) < MIN_HEAD_VOXELS or extent.min() < MIN_HEAD_EXTENT_MM:
        shown = " x ".join(f"{size:.0f}" for size in extent)
        raise BadDataError(f"{path}: {' x '.join(map(str, data.shape))} voxels covering {shown} "
                           f"mm cannot hold a head (at least {MIN_HEAD_VOXELS} voxels and "
                           f"{MIN_HEAD_EXTENT_MM:g} mm along each axis); give the whole "
                           "volume")
    sample = np.asarray(data[::2, ::2, ::2] if min(data.shape) >= 8 else data)
    foreground = sample[sample != 0]
    if foreground.size == 0:
        raise BadDataError(f"{path}: the image is empty (every voxel is 0 or NaN)")
    values = np.unique(foreground)
    if values.size == 1 and foreground.size == sample.size:
        raise BadDataError(f"{path}: the image is constant ({values[0]:g} everywhere)")
    if values.size < MIN_DISTINCT_INTENSITIES:
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (" ..." if values.size > 5 else "")
        raise BadDataError(f"{path}: only {values.size} distinct intensities ({shown}): this "
                           "is a mask or label image, not an MR image")


def padding_to_zero(data: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Set a negative padding value (e.g. int16's -32768 around the head) to 0.

    MR magnitude images are not negative; a negative minimum held by more than
    :data:`PADDING_FRACTION` of the voxels is the converter's fill value for "no data". Left in
    place it would be mixed into the brain's edge by interpolation and read as real intensities.

    Returns
    -------
    data : ndarray
        The data with the padding at 0 (the input itself when there is none).
    value : float or None
        The padding value replaced, or None.
    """
    minimum = float(data.min())
    if minimum >= 0:
        return data, None
    padding = data == minimum
    if padding.mean() <= PADDING_FRACTION:
        return data, None
    return np.where(padding, 0, data).astype(data.dtype), minimum


def load_3d(path: str | Path) -> nib.spatialimages.SpatialImage:
    """Load an image, dropping trailing singleton dimensions (a 3D volume stored as 4D)."""
    img = nib.load(str(path))
    if len(img.shape) > 3:
        if any(size != 1 for size in img.shape[3:]):
            raise ValueError(f"{path} is not a 3D image (shape {img.shape})")
        img = nib.Nifti1Image(np.asarray(img.dataobj).reshape(img.shape[:3]), img.affine,
                              img.header)
    return img


def reorient_to_ras(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Return the image with its array axes permuted/flipped to RAS+.

    World coordinates are unchanged, so physical-space transforms estimated on the result apply
    to the original image too.
    """
    return nib.as_closest_canonical(img)


def same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage,
              atol: float = 1e-3) -> bool:
    """Whether two images share shape and affine (within ``atol`` mm)."""
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=atol)


def load_lesion_shape(path: Path, target: nib.Nifti1Image) -> np.ndarray:
    """Read a lesion mask and return its partial-volume fraction on the grid of ``target``.

    Parameters
    ----------
    path : Path
        NIfTI lesion mask in MNI space (any value > 0 is lesion; fractional values are kept).
    target : nibabel.Nifti1Image
        Image whose grid (shape and affine) the fraction is computed on.

    Returns
    -------
    numpy.ndarray
        float32 fraction in [0, 1], shaped like ``target``'s first three dimensions.

    Raises
    ------
    BadDataError
        The file cannot be read or is not a 3D volume.
    """
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, ImageFileError) as error:
        raise BadDataError(f"cannot read the lesion mask {path}: {error}") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadDataError(f"the lesion mask {path} is not a 3D volume (shape {data.shape})")
    fraction = np.clip(np.nan_to_num(data), 0.0, 1.0)
    return partial_volume(fraction, img.affine, target.shape[:3], target.affine)


def partial_volume(fraction: np.ndarray, affine: np.ndarray, target_shape: tuple[int, ...],
                   target_affine: np.ndarray) -> np.ndarray:
    """Resample a lesion fraction onto a coarser (or finer) grid, preserving its volume.

    Linear interpolation alone only samples the source at the target voxel centres; when these
    fall on source voxel centres (1 mm shapes onto the 2 mm template grid) the result is binary
    and thin lesions are hit or missed by chance. Averaging the source over the extent of a
    target voxel first (a box filter) gives the fraction of each target voxel that is lesion.

    Parameters
    ----------
    fraction : numpy.ndarray
        Source fraction in [0, 1].
    affine : numpy.ndarray
        Source voxel-to-world affine.
    target_shape : tuple of int
        Target grid shape.
    target_affine : numpy.ndarray
        Target voxel-to-world affine.

    Returns
    -------
    numpy.ndarray
        float32 fraction in [0, 1] on the target grid.

    Examples
    --------
    >>> import numpy as np
    >>> cube = np.zeros((12, 12, 12)); cube[3:9, 3:9, 3:9] = 1
    >>> coarse = partial_volume(cube, np.eye(4), (6, 6, 6), np.diag([2.0, 2, 2, 1]))
    >>> float(coarse.sum() * 8), float(coarse.max())
    (216.0, 1.0)
    """
    from nibabel.processing import resample_from_to
    from scipy import ndimage

    source_axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    source_zooms = np.linalg.norm(affine[:3, :3], axis=0)
    target_extent = np.abs(source_axes.T @ target_affine[:3, :3]).sum(axis=1)
    smooth = np.asarray(fraction, dtype=np.float32)
    for axis, width in enumerate(target_extent / source_zooms):
        kernel = _box_kernel(width)
        if kernel.size > 1:
            smooth = ndimage.convolve1d(smooth, kernel, axis=axis, mode="constant")
    resampled = resample_from_to(nib.Nifti1Image(smooth, affine),
                                 (tuple(target_shape), target_affine), order=1)
    return np.clip(np.asarray(resampled.dataobj, dtype=np.float32), 0.0, 1.0)


def _box_kernel(width: float) -> np.ndarray:
    """Weights of unit voxels under a box of ``width`` voxels centred on a voxel (sum 1)."""
    if width <= 1.0:
        return np.ones(1, dtype=np.float32)
    half = width / 2
    radius = int(np.ceil(half - 0.5))
    centres = np.arange(-radius, radius + 1)
    overlap = np.clip(np.minimum(centres + 0.5, half) - np.maximum(centres - 0.5, -half), 0, 1)
    return (overlap / overlap.sum()).astype(np.float32)


def check_same_grid(paths: list[Path], what: str) -> None:
    """Refuse images that should share a grid but do not (headers only are read).

    Raises
    ------
    BadDataError
        Another shape or an affine more than 0.001 mm away from the first image's.
    """
    first = nib.load(str(paths[0]))
    for path in paths[1:]:
        img = nib.load(str(path))
        if img.shape != first.shape or not np.allclose(img.affine, first.affine, atol=1e-3):
            raise BadDataError(f"{path}: not on the grid of {paths[0]}; {what} must share a "
                               "grid")
