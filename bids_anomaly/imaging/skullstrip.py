"""Recognising images that are already skull-stripped, and their brain masks.

A skull-stripped image is a brain surrounded by one constant value: zero for most tools, but any
value once the image has been rescaled or z-scored. Raw head images have a constant background
too when the scanner or the converter zeroes the air, so the background alone does not decide:
it must surround the image (cover most of its faces) and what is not background must be no
bigger than a brain. Measured on the scans of
``bids_real``: raw heads (IXI, clinical MSLUB scans, a cropped stroke T2w) have 2,577 to 6,994 ml
of non-background voxels, skull-stripped MNI-space images 1,123 ml; adult intracranial volumes
stay below about 2,000 ml.

Skull-stripped images distributed z-scored (brain-tumour challenge data) have intensities below
0 around their constant background: :func:`raise_above_background` sets the background to 0
and raises the brain above it, as every later step (centre of mass, N4, zero as "no data")
expects of MR intensities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_anomaly.config import SKULL_STRIPPED

LOGGER = logging.getLogger(__name__)

MAX_BRAIN_ML = 2300.0
"""Largest non-background volume (ml) an image may have to count as skull-stripped."""

MIN_BACKGROUND_FRACTION = 0.1
"""Smallest share of voxels at the background value for an image to count as skull-stripped."""

MIN_BORDER_FRACTION = 0.5
"""Smallest share of the volume's faces at the background value (the background surrounds)."""

MODES = SKULL_STRIPPED  # declared with the settings (--skull-stripped)


@dataclass(frozen=True)
class BackgroundCheck:
    """What :func:`check_background` found.

    Attributes
    ----------
    stripped : bool
        Whether the image looks skull-stripped.
    background : float
        The most frequent value, taken as the background.
    background_fraction : float
        Share of voxels at exactly that value.
    foreground_ml : float
        Volume of the other voxels, in ml.
    border_fraction : float
        Share of the voxels on the volume's six faces at the background value.
    """

    stripped: bool
    background: float
    background_fraction: float
    foreground_ml: float
    border_fraction: float


def check_background(img: nib.spatialimages.SpatialImage) -> BackgroundCheck:
    """Decide whether an image is already skull-stripped from its background.

    Parameters
    ----------
    img : nibabel image
        3D image.

    Returns
    -------
    BackgroundCheck

    Examples
    --------
    >>> import nibabel as nib, numpy as np
    >>> data = np.full((100, 100, 100), -0.7, np.float32)
    >>> data[30:70, 30:70, 30:70] = 1.5
    >>> check = check_background(nib.Nifti1Image(data, np.eye(4) * [2, 2, 2, 1]))
    >>> check.stripped, check.background, round(check.foreground_ml)
    (True, -0.7, 512)
    """
    data = np.asanyarray(img.dataobj)
    values, counts = np.unique(data, return_counts=True)
    index = int(counts.argmax())
    background = float(values[index])
    fraction = float(counts[index]) / data.size
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    foreground_ml = (data.size - int(counts[index])) * voxel_ml
    faces = np.concatenate([face.ravel() for axis in range(3)
                            for face in (np.take(data, 0, axis), np.take(data, -1, axis))])
    border = float(np.mean(faces == values[index]))
    stripped = (fraction >= MIN_BACKGROUND_FRACTION and border >= MIN_BORDER_FRACTION
                and foreground_ml <= MAX_BRAIN_ML)
    return BackgroundCheck(stripped, round(background, 6), fraction, foreground_ml, border)


def mask_from_background(img: nib.spatialimages.SpatialImage, background: float) -> np.ndarray:
    """Brain mask of a skull-stripped image: its largest non-background component, filled.

    Holes are filled slice-free in 3D (ventricles or lesions set to the background value by the
    stripping tool stay inside the brain).

    Parameters
    ----------
    img : nibabel image
        Skull-stripped 3D image.
    background : float
        The background value (see :func:`check_background`).

    Returns
    -------
    numpy.ndarray
        Boolean mask.
    """
    data = np.asanyarray(img.dataobj)
    foreground = ~np.isclose(data, background, rtol=0, atol=1e-6 * max(1.0, abs(background)))
    labels, count = ndimage.label(foreground)
    if count == 0:
        raise ValueError("the image has no voxel other than its background")
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(sizes.argmax()) + 1)
    closed = ndimage.binary_closing(largest, structure=np.ones((3, 3, 3)), iterations=1)
    return ndimage.binary_fill_holes(closed | largest)


def raise_above_background(data: np.ndarray, background: float) -> tuple[np.ndarray, float]:
    """A skull-stripped image's background set to 0 and its other voxels raised above 0.

    The lowest non-background value lands at 1 % of the non-background range (a voxel at
    exactly 0 would be taken for "no data"); intensities keep their differences, so that a
    normalisation inside the brain gives what it gave before.

    Returns
    -------
    data : numpy.ndarray
        float32.
    shift : float
        What was added to the non-background voxels.

    Examples
    --------
    >>> data, shift = raise_above_background(np.array([-0.5, -0.5, -2.0, 0.0, 2.0]), -0.5)
    >>> [round(float(value), 2) for value in data], shift
    ([0.0, 0.0, 0.04, 2.04, 4.04], 2.04)
    """
    data = np.asarray(data, dtype=np.float32)
    foreground = ~np.isclose(data, background, rtol=0, atol=1e-6 * max(1.0, abs(background)))
    if not foreground.any():
        return np.zeros_like(data), 0.0
    low, high = float(data[foreground].min()), float(data[foreground].max())
    shift = -low + (0.01 * (high - low) if high > low else 1.0)
    return np.where(foreground, data + shift, 0).astype(np.float32), round(shift, 6)
