"""Reading volumes safely: every image the tool touches passes through :func:`load_volume`."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_anomaly.errors import BadDataError

LOGGER = logging.getLogger(__name__)


def load_volume(path: str | Path, *, dtype: type = np.float32) -> nib.Nifti1Image:
    """Read a 3D NIfTI image, checking everything that makes later steps fail obscurely.

    Truncated or corrupt files, 4D images (other than a single trailing volume), zero or
    negative voxel sizes and images without a usable affine are refused with a
    :class:`~bids_anomaly.errors.BadDataError` naming the file. NaN and infinite voxels are set
    to zero and reported in the log.

    Parameters
    ----------
    path : str or Path
        NIfTI file (``.nii`` or ``.nii.gz``).
    dtype : numpy dtype
        Data type of the returned image.

    Returns
    -------
    nibabel.Nifti1Image
        The image with its data in memory, 3D, finite.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError as error:
        raise BadDataError(f"{path}: file not found") from error
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError) as error:
        raise BadDataError(
            f"{path}: cannot read this NIfTI file ({error.__class__.__name__}: {error}); it is "
            "probably truncated or corrupt, replace it with a complete copy"
        ) from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
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
    affine = img.affine
    if (affine is None or not np.all(np.isfinite(affine))
            or abs(np.linalg.det(affine[:3, :3])) < 1e-6):
        raise BadDataError(f"{path}: the header has no usable orientation (affine)")
    data = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        LOGGER.warning("%s: %d NaN or infinite voxels set to 0", path, int((~finite).sum()))
        data = np.where(finite, data, 0.0)
    out = nib.Nifti1Image(data.astype(dtype), affine, img.header)
    out.header.set_data_dtype(dtype)
    out.header.set_slope_inter(1.0, 0.0)
    return out


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
