"""Intensity normalisation inside the brain (pure array functions).

Three methods are offered (see :data:`METHODS`):

``robust-zscore``
    Centre on the brain's median, scale by its inter-quartile range (:func:`robust_zscore`).
``whitestripe``
    WhiteStripe (Shinohara et al. 2014, NeuroImage: Clinical 6:9-19): centre and scale by the
    mean and standard deviation of the normal-appearing white matter "stripe"
    (:func:`whitestripe`).
``percentile``
    Map the brain's 1st..99th percentiles linearly to 0..1 (:func:`percentile_scale`).

Every function returns float32 with 0 outside the mask, refuses an empty mask with
:class:`ValueError`, and uses a scale of 1 where the brain has no spread (constant image), so that
no NaN or inf is produced from finite input.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import find_peaks

from bids_anomaly.config import NORMALIZATIONS

LOGGER = logging.getLogger(__name__)

METHODS = NORMALIZATIONS  # declared with the settings (--normalization)
#: Contrasts understood by :func:`whitestripe` (BIDS suffixes).
WHITESTRIPE_MODALITIES = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "swi", "MEGRE")

_N_BINS = 1024  # histogram bins across the brain's 0.5..99.5 percentile range
_PROMINENCE = 0.05  # a peak must stand out by 5 % of the tallest density to count
_RARE_PROP = 0.2  # T1w: ignore peaks lower than 1/5 of the tallest (as R's WhiteStripe)


IQR_TO_SD = 1.349
"""Interquartile range of a standard normal: a robust standard deviation is IQR / 1.349."""


def _brain_values(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the boolean mask and the brain's intensities as float64; refuse an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    values = np.asarray(image, dtype=np.float64)[mask]
    if values.size == 0:
        raise ValueError("empty brain mask: cannot normalise intensities")
    return mask, values


def _apply(image: np.ndarray, mask: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """``(image - offset) / scale`` inside the mask, 0 outside, float32; scale 1 if degenerate."""
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    out = (np.asarray(image, dtype=np.float64) - offset) / scale
    return np.where(mask, out, 0.0).astype(np.float32)


def robust_zscore(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Centre on the brain's median and scale by its inter-quartile range.

    The IQR is divided by 1.349 so that a Gaussian brain would get unit variance; voxels outside
    the mask are set to 0.

    Parameters
    ----------
    image : numpy.ndarray
        Intensities.
    mask : numpy.ndarray
        Brain mask (boolean or 0/1), same shape.

    Returns
    -------
    numpy.ndarray
        float32 array of robust z-scores.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(100.0).reshape(10, 10)
    >>> z = robust_zscore(x, np.ones_like(x, bool))
    >>> round(float(np.median(z)), 6), round(float(np.subtract(*np.percentile(z, [75, 25]))), 3)
    (0.0, 1.349)
    """
    mask = np.asarray(mask, dtype=bool)
    values = image[mask]
    if values.size == 0:
        raise ValueError("empty brain mask: cannot normalise intensities")
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    scale = (q75 - q25) / IQR_TO_SD
    if scale <= 0:
        scale = values.std() or 1.0
    return np.where(mask, (image - median) / scale, 0).astype(np.float32)


def _smoothed_histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binned Gaussian kernel density of ``values`` on a grid spanning their robust range.

    The grid covers the 0.5..99.5 percentiles (min..max if those coincide) in :data:`_N_BINS`
    bins, and the kernel width follows Silverman's rule, so everything is expressed relative to
    the data's own spread: the result is equivariant to affine intensity changes and insensitive
    to offsets near 1e6 or negative values. Using every voxel (no subsampling) keeps the result
    deterministic.
    """
    lo, hi = np.percentile(values, [0.5, 99.5])
    if not hi > lo:
        lo, hi = values.min(), values.max()
    counts, edges = np.histogram(values, bins=_N_BINS, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    q25, q75 = np.percentile(values, [25, 75])
    spread = min(values.std(), (q75 - q25) / IQR_TO_SD) or values.std()
    bandwidth = 0.9 * spread * values.size ** -0.2
    sigma_bins = max(bandwidth / (edges[1] - edges[0]), 1.0)
    density = gaussian_filter1d(counts.astype(np.float64), sigma_bins, mode="nearest")
    return centres, density


def _white_matter_mode(values: np.ndarray, modality: str) -> float:
    """Intensity of the normal-appearing white-matter peak of the brain histogram.

    T1w: the highest-intensity prominent peak at least 1/5 as tall as the tallest one (WM is the
    brightest tissue; as ``get.last.mode`` of the R WhiteStripe package, the top 0.5 % tail is
    outside the grid). T2w, FLAIR, PDw and the susceptibility-weighted contrasts (T2starw, swi,
    MEGRE: white matter darker than grey matter too): the tallest prominent peak below the brain
    median
    (WM is the most frequent tissue and is darker than GM there; the median bound keeps a large
    GM or, on T2w/PDw, CSF peak from winning), else the tallest prominent peak. Without any peak
    the global histogram mode is used and a warning is logged.
    """
    centres, density = _smoothed_histogram(values)
    top = density.max()
    peaks, _ = find_peaks(density, prominence=_PROMINENCE * top)
    if peaks.size == 0:
        LOGGER.warning("WhiteStripe: no white-matter peak found in the %s histogram; "
                       "using the global histogram mode", modality)
        return float(centres[np.argmax(density)])
    if modality == "T1w":
        tall = peaks[density[peaks] >= _RARE_PROP * top]
        return float(centres[tall.max()])
    below = peaks[centres[peaks] < np.median(values)]
    candidates = below if below.size else peaks
    return float(centres[candidates[np.argmax(density[candidates])]])


def whitestripe(image: np.ndarray, mask: np.ndarray, modality: str = "T1w",
                width: float = 0.05) -> np.ndarray:
    """WhiteStripe normalisation on the normal-appearing white matter.

    The white-matter (WM) intensity mode is found on a smoothed histogram of the brain voxels;
    the "white stripe" is the set of brain voxels whose intensity quantile lies within
    ``+-width`` of the mode's quantile, and the image is centred on the stripe's mean and divided
    by its standard deviation (Shinohara et al. 2014, NeuroImage: Clinical 6:9-19).

    WM peak rule: for ``T1w`` the highest-intensity prominent peak at least 1/5 as tall as the
    tallest (WM is the brightest brain tissue); for ``T2w``, ``FLAIR`` and ``PDw`` the tallest
    prominent peak below the brain median (WM is the most frequent tissue and darker than GM;
    the median bound keeps a large GM or CSF peak out), else the tallest prominent peak. If the
    histogram has no peak at all, the global histogram mode is used and a warning is logged.

    Everything (histogram range, kernel width, stripe) is defined through quantiles of the brain
    intensities, so the output is invariant to ``a * image + b`` with ``a > 0``.

    Note that the stripe is narrow: its standard deviation is a fraction of the whole WM
    class's, so normalised WM sits at 0 but with a spread larger than 1 (for a Gaussian WM class
    making up 45 % of the brain and ``width=0.05``, about 6).

    Parameters
    ----------
    image : numpy.ndarray
        Intensities (any offset or sign).
    mask : numpy.ndarray
        Brain mask (boolean or 0/1), same shape.
    modality : str
        Contrast, one of :data:`WHITESTRIPE_MODALITIES`.
    width : float
        Half-width of the stripe in quantiles of the brain intensities (0 < width < 0.5).

    Returns
    -------
    numpy.ndarray
        float32 array, 0 outside the mask.

    Raises
    ------
    ValueError
        Empty mask, unknown modality or width out of range.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> brain = np.concatenate([rng.normal(30, 5, 1500), rng.normal(60, 5, 4000),
    ...                         rng.normal(90, 5, 4500)])
    >>> z = whitestripe(brain, np.ones(brain.shape, bool), "T1w")
    >>> wm = z[-4500:]
    >>> bool(abs(np.median(wm)) < 0.5), bool(z[:1500].mean() < -20)
    (True, True)
    """
    if modality not in WHITESTRIPE_MODALITIES:
        raise ValueError(f"unknown modality {modality!r} for WhiteStripe; "
                         f"choose from {WHITESTRIPE_MODALITIES}")
    if not 0 < width < 0.5:
        raise ValueError(f"WhiteStripe width must be in (0, 0.5), got {width!r}")
    mask, values = _brain_values(image, mask)
    if values.max() == values.min():
        return _apply(image, mask, float(values[0]), 1.0)
    mode = _white_matter_mode(values, modality)
    mode_quantile = float(np.mean(values < mode))
    bounds = np.quantile(values, [max(mode_quantile - width, 0.0),
                                  min(mode_quantile + width, 1.0)])
    stripe = values[(values >= bounds[0]) & (values <= bounds[1])]
    if stripe.size == 0:  # only possible for a tiny width between two data points
        stripe = values[[np.argmin(np.abs(values - mode))]]
    return _apply(image, mask, float(stripe.mean()), float(stripe.std()))


def percentile_scale(image: np.ndarray, mask: np.ndarray, lower: float = 1.0,
                     upper: float = 99.0) -> np.ndarray:
    """Map the brain's ``lower``..``upper`` percentiles linearly to 0..1.

    Values beyond those percentiles are not clipped (they fall below 0 or above 1); voxels outside
    the mask are set to 0.

    Parameters
    ----------
    image : numpy.ndarray
        Intensities.
    mask : numpy.ndarray
        Brain mask (boolean or 0/1), same shape.
    lower, upper : float
        Percentiles (0 <= lower < upper <= 100) mapped to 0 and 1.

    Returns
    -------
    numpy.ndarray
        float32 array, 0 outside the mask.

    Raises
    ------
    ValueError
        Empty mask or percentiles out of order or range.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(101.0)
    >>> y = percentile_scale(x, np.ones(x.shape, bool))
    >>> [round(float(v), 4) for v in (y[1], y[50], y[99], y[100])]
    [0.0, 0.5, 1.0, 1.0102]
    """
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower!r}, upper={upper!r}")
    mask, values = _brain_values(image, mask)
    lo, hi = np.percentile(values, [lower, upper])
    return _apply(image, mask, float(lo), float(hi - lo))


def normalize(image: np.ndarray, mask: np.ndarray, method: str = "robust-zscore",
              modality: str = "T1w") -> np.ndarray:
    """Apply the named normalisation (see :data:`METHODS`).

    Parameters
    ----------
    image : numpy.ndarray
        Intensities.
    mask : numpy.ndarray
        Brain mask (boolean or 0/1), same shape.
    method : str
        One of :data:`METHODS`.
    modality : str
        Contrast of the image; only used by ``whitestripe`` (see :func:`whitestripe`).

    Returns
    -------
    numpy.ndarray
        float32 array, 0 outside the mask.

    Raises
    ------
    ValueError
        Unknown method (the message lists :data:`METHODS`), or as raised by the method.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(101.0)
    >>> float(normalize(x, np.ones(x.shape, bool), "percentile")[50])
    0.5
    >>> normalize(x, np.ones(x.shape, bool), "minmax")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown intensity normalisation 'minmax'; choose from ('robust-zscore', ...)
    """
    if method == "robust-zscore":
        return robust_zscore(image, mask)
    if method == "whitestripe":
        return whitestripe(image, mask, modality=modality)
    if method == "percentile":
        return percentile_scale(image, mask)
    raise ValueError(f"unknown intensity normalisation {method!r}; choose from {METHODS}")
