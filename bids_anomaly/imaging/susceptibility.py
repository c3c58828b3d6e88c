"""The susceptibility of a magnetised sphere: how a gradient echo darkens around a microbleed.

The physics shared by the demo's synthetic microbleeds (:mod:`bids_anomaly.simulation.synthetic`)
and the microbleeds that self-supervised models insert while they train
(:mod:`bids_anomaly.models.selfsupervised.anomalies`): a sphere's dipole field
(:func:`dipole_signal`) darkens more than the sphere itself ("blooming"), longest along B0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq


def dipole_signal(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, source_radius: float, dephasing: float
) -> np.ndarray:
    """Signal fraction a gradient echo keeps near a magnetised sphere, such as a microbleed.

    Outside a sphere of radius a whose susceptibility differs from the tissue's (haemosiderin),
    the field changes by dB ~ (a / r)^3 (3 cos^2(theta) - 1), theta the angle to B0; the spins
    of a voxel dephase and the signal falls to exp(-k |(a / r)^3 (3 cos^2(theta) - 1)|). Inside
    the sphere no signal is left. The dark region is larger than the sphere ("blooming") and
    longer along B0, where the field is twice as strong as across it.

    Parameters
    ----------
    x, y, z : numpy.ndarray
        Positions relative to the centre, broadcastable to one another, in the unit of
        ``source_radius``; ``z`` is along B0.
    source_radius : float
        Radius a of the sphere.
    dephasing : float
        k, which grows with the susceptibility, the field strength and the echo time: the
        signal left on the sphere's equator is exp(-k).

    Returns
    -------
    numpy.ndarray
        0 (no signal) to 1 (none lost), of the broadcast shape.

    Examples
    --------
    >>> float(dipole_signal(np.array(0.0), np.array(0.0), np.array(0.5), 1.0, 5.0))
    0.0
    >>> along, across = dipole_signal(np.array([0.0, 2.0]), 0.0, np.array([2.0, 0.0]), 1.0, 5.0)
    >>> bool(along < across < 1.0)
    True
    """
    r2 = x**2 + y**2 + z**2
    # Only points inside the sphere, whose signal is 0 anyway, are moved off the centre.
    safe = np.maximum(r2, 0.25 * source_radius**2)
    field = (source_radius**2 / safe) ** 1.5 * np.abs(3.0 * z**2 / safe - 1.0)
    return np.where(r2 <= source_radius**2, 0.0, np.exp(-dephasing * field))


def dephasing_for_bloom(bloom: float) -> float:
    """Dephasing k (:func:`dipole_signal`) that makes a sphere's dark focus ``bloom`` times wider.

    In the direction theta, the signal is at most half from the centre out to
    a (k |3 cos^2(theta) - 1| / ln 2)^(1/3) (and within the sphere); k is chosen so that this
    region has the volume of a sphere of radius ``bloom`` a, that is
    bloom^3 = int_0^1 max(1, k |3 c^2 - 1| / ln 2) dc.

    Parameters
    ----------
    bloom : float
        Visible over true radius, at least 1.

    Returns
    -------
    float
        k.

    Examples
    --------
    >>> dephasing_for_bloom(1.0)
    0.0
    >>> round(dephasing_for_bloom(2.5), 1)
    14.1
    """
    if bloom < 1.0:
        raise ValueError(f"bloom {bloom}: a focus is never smaller than its source")
    cosines = (np.arange(4000) + 0.5) / 4000  # midpoints: the mean is the integral over [0, 1]
    angular = np.abs(3.0 * cosines**2 - 1.0)

    def excess(strength: float) -> float:
        return float(np.mean(np.maximum(1.0, strength * angular))) - bloom**3

    if excess(0.0) >= 0.0:
        return 0.0
    return math.log(2.0) * brentq(excess, 0.0, 4.0 * bloom**3)


def blooming_extent(source_radius: float, dephasing: float) -> float:
    """Longest radius of the focus that keeps at most half the signal: the one along B0.

    Parameters
    ----------
    source_radius : float
        Radius of the sphere.
    dephasing : float
        k of :func:`dipole_signal`.

    Returns
    -------
    float
        The radius, in the unit of ``source_radius``.
    """
    return source_radius * max(1.0, (2.0 * dephasing / math.log(2.0)) ** (1.0 / 3.0))


def blooming_signal(
    shape: tuple[int, int, int],
    center: np.ndarray,
    source_radius: float,
    dephasing: float,
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0),
    supersampling: int | None = None,
) -> np.ndarray:
    """Mean signal fraction in each voxel of a grid around a microbleed (with partial volume).

    :func:`dipole_signal` is evaluated at ``supersampling``^3 points evenly spread in each
    voxel and averaged, as the voxel's magnitude averages its spins.

    Parameters
    ----------
    shape : tuple of int
        Voxels of the grid along its three axes; the third is along B0.
    center : numpy.ndarray
        The sphere's centre in voxel coordinates of the grid (voxel i spans i - 0.5 to i + 0.5).
    source_radius : float
        Radius of the sphere, in the unit of ``voxel_size``.
    dephasing : float
        k of :func:`dipole_signal`.
    voxel_size : tuple of float
        Voxel size along each axis (mm, or 1 to work in voxels).
    supersampling : int, optional
        Points per voxel and axis; by default enough to resolve the sphere (2 to 8).

    Returns
    -------
    numpy.ndarray
        ``shape``, float32, 0 (no signal) to 1 (none lost).
    """
    if supersampling is None:
        supersampling = int(np.clip(math.ceil(3.0 * max(voxel_size) / source_radius), 2, 8))
    offsets = (np.arange(supersampling) + 0.5) / supersampling - 0.5
    axes = [
        ((np.arange(size)[:, None] + offsets) - float(middle)).ravel() * length
        for size, middle, length in zip(shape, center, voxel_size, strict=True)
    ]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    fine = dipole_signal(x, y, z, source_radius, dephasing)
    split = [value for size in shape for value in (size, supersampling)]
    return fine.reshape(split).mean(axis=(1, 3, 5)).astype(np.float32)
