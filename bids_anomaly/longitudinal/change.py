"""Lesion change between two sessions of one subject on a common grid, without labels.

Two pieces of evidence, both as ``-log10 p``:

1. the difference of the sessions' tissue-model scores (:mod:`bids_anomaly.models.tissue`,
   both sessions fitted with one shared set of tissue parameters): where a lesion appeared,
   grew or shrank, one session's voxel is far more lesion-like than the other's;
2. a statistical test of the intensity difference: the later session's lesion contrast is
   matched to the earlier one on normal-appearing white matter (median and robust sd), the
   difference is divided by the noise of normal-appearing tissue of the voxel's own class
   (grey matter, white matter, CSF: partial volume and residual misalignment make CSF borders
   noisier than white matter), smoothed by a 3-voxel median, and turned into a two-sided
   p-value (Schmidt et al. 2019; Ganiler et al. 2014).

The change score is their mean, signed by the intensity difference (brighter later: new or
enlarging, darker later: shrinking); the weights (equal) were fixed before any label was seen.
The threshold is label-free: the ``1 - fpr`` quantile of ``|score|`` over the voxels that are
lesion-free in both sessions (the null; lesions, new or old, are not in it, so lesion load does
not inflate it). Changed voxels form clusters classed new, enlarging or shrinking.

Pure array code: every function takes and returns numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.special import ndtr

TISSUES = ("GM", "WM", "CSF")
LESION_FREE = 0.1
"""A voxel whose lesion posterior stays below this in both sessions is normal-appearing."""
SURE = 0.9
"""A tissue posterior above this in both sessions makes a voxel a sample of that class."""
CLASSES = {1: "new", 2: "enlarging", 3: "shrinking"}
"""Labels of the lesion-wise change classes (``*_dseg`` and the table)."""


@dataclass
class ChangeMaps:
    """The change of one session pair on the common grid.

    Attributes
    ----------
    score : numpy.ndarray
        Signed change score (``-log10 p`` units; positive brighter later), 0 outside the brain.
    tissue_difference : numpy.ndarray
        Later minus earlier tissue-model score.
    difference_z : numpy.ndarray
        The harmonised, noise-scaled, median-filtered intensity difference.
    null : numpy.ndarray
        Boolean: the normal-appearing voxels of both sessions (the null of the threshold).
    noise_sd : dict
        Noise sd of the difference per tissue class.
    """

    score: np.ndarray
    tissue_difference: np.ndarray
    difference_z: np.ndarray
    null: np.ndarray
    noise_sd: dict[str, float]


def normal_appearing(earlier: dict[str, np.ndarray], later: dict[str, np.ndarray],
                     brain: np.ndarray) -> np.ndarray:
    """Brain voxels lesion-free in both sessions (posterior maps by class, lesion included)."""
    return brain & (earlier["lesion"] < LESION_FREE) & (later["lesion"] < LESION_FREE)


def robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 MAD (1 where the values have no spread).

    >>> robust_location_scale(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    (3.0, 1.4826)
    """
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    return median, spread if spread > 0 else 1.0


def harmonise(later: np.ndarray, earlier: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The later image on the earlier one's intensity scale, matched on ``reference`` voxels.

    A linear map that gives the later session's normal-appearing white matter the median and
    robust sd of the earlier's (sessions may come from other scanners and protocols).

    >>> earlier = np.array([1.0, 2.0, 3.0, 4.0])
    >>> harmonise(2 * earlier + 5, earlier, np.ones(4, bool)).tolist()
    [1.0, 2.0, 3.0, 4.0]
    """
    later_centre, later_spread = robust_location_scale(later[reference])
    earlier_centre, earlier_spread = robust_location_scale(earlier[reference])
    return (later - later_centre) * (earlier_spread / later_spread) + earlier_centre


def difference_test(earlier: np.ndarray, later: np.ndarray, earlier_posteriors: dict,
                    later_posteriors: dict, brain: np.ndarray
                    ) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
    """Signed z of the later-minus-earlier intensity against the noise of each tissue class.

    Parameters
    ----------
    earlier, later : numpy.ndarray
        The lesion contrast of the two sessions on the common grid.
    earlier_posteriors, later_posteriors : dict
        ``GM``, ``WM``, ``CSF`` and ``lesion`` posterior maps of each session.
    brain : numpy.ndarray
        Boolean brain of both sessions.

    Returns
    -------
    z : numpy.ndarray
        Median-filtered (3 voxels) signed z, 0 outside the brain.
    noise_sd : dict
        The difference's robust sd in each class's normal-appearing voxels.
    null : numpy.ndarray
        The normal-appearing voxels of both sessions.

    Raises
    ------
    ValueError
        No normal-appearing white matter to harmonise on.
    """
    null = normal_appearing(earlier_posteriors, later_posteriors, brain)
    white = null & (earlier_posteriors["WM"] > SURE) & (later_posteriors["WM"] > SURE)
    if white.sum() < 100:
        raise ValueError("fewer than 100 voxels of normal-appearing white matter in both "
                         "sessions: cannot harmonise their intensities")
    difference = harmonise(later, earlier, white) - earlier
    centre, _ = robust_location_scale(difference[white])
    variance = np.zeros(difference.shape)
    weight = np.zeros(difference.shape)
    noise_sd = {}
    for tissue in TISSUES:
        sure = null & (earlier_posteriors[tissue] > SURE) & (later_posteriors[tissue] > SURE)
        if sure.sum() < 100:  # a class this brain barely has: the white matter's noise
            sure = white
        noise_sd[tissue] = robust_location_scale(difference[sure])[1]
        share = 0.5 * (earlier_posteriors[tissue] + later_posteriors[tissue])
        variance += share * noise_sd[tissue] ** 2
        weight += share
    sigma = np.sqrt(np.where(weight > 0, variance / np.maximum(weight, 1e-12),
                             noise_sd["WM"] ** 2))
    z = np.where(brain, (difference - centre) / sigma, 0.0)
    return np.where(brain, ndimage.median_filter(z, size=3), 0.0), noise_sd, null


def two_sided_evidence(z: np.ndarray) -> np.ndarray:
    """``-log10`` of the two-sided normal p-value of ``z``.

    >>> two_sided_evidence(np.array([0.0, 1.959964])).round(3).tolist()
    [0.0, 1.301]
    """
    p = 2.0 * ndtr(-np.abs(z))
    return np.maximum(-np.log10(np.clip(p, 1e-300, 1.0)), 0.0)


def change_maps(earlier_score: np.ndarray, later_score: np.ndarray, earlier: np.ndarray,
                later: np.ndarray, earlier_posteriors: dict, later_posteriors: dict,
                brain: np.ndarray) -> ChangeMaps:
    """The signed change score of a session pair (see the module's description)."""
    z, noise_sd, null = difference_test(earlier, later, earlier_posteriors, later_posteriors,
                                        brain)
    tissue_difference = np.where(brain, later_score - earlier_score, 0.0)
    evidence = 0.5 * (np.abs(tissue_difference) + two_sided_evidence(z))
    sign = np.where(z != 0, np.sign(z), np.sign(tissue_difference))
    score = np.where(brain, sign * evidence, 0.0)
    return ChangeMaps(score, tissue_difference, z, null, noise_sd)


def null_threshold(maps: ChangeMaps, fpr: float) -> float:
    """The ``1 - fpr`` quantile of ``|score|`` over the normal-appearing voxels.

    Raises
    ------
    ValueError
        An FPR outside (0, 1), or no normal-appearing voxel.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"the false-positive rate must be in (0, 1), not {fpr}")
    values = np.abs(maps.score[maps.null])
    if values.size == 0:
        raise ValueError("no normal-appearing voxel to calibrate the change threshold on")
    return float(np.quantile(values, 1.0 - fpr))


def classify_changes(score: np.ndarray, threshold: float, earlier_lesions: np.ndarray,
                     voxel_volume_mm3: float, min_voxels: int = 1
                     ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Clusters of changed voxels, each classed new, enlarging or shrinking.

    A cluster (26-connected voxels of one sign with ``|score|`` above ``threshold``) that got
    brighter is *enlarging* when it touches a lesion of the earlier session, else *new*; one
    that got darker is *shrinking*.

    Parameters
    ----------
    score : numpy.ndarray
        Signed change score.
    threshold : float
        Its label-free threshold.
    earlier_lesions : numpy.ndarray
        Boolean lesions of the earlier session.
    voxel_volume_mm3 : float
        Volume of a voxel.
    min_voxels : int
        Clusters smaller than this are dropped.

    Returns
    -------
    labels : numpy.ndarray
        uint8 map of :data:`CLASSES` (0: no change).
    numbers : numpy.ndarray
        int32 map of the clusters, numbered as in the table (largest first; 0: no change).
    table : pandas.DataFrame
        One row per cluster: ``cluster``, ``change`` (class), ``voxels``, ``volume_ml``,
        ``peak_score`` and the centre's voxel indices ``i``, ``j``, ``k``.

    Examples
    --------
    >>> score = np.zeros((9, 9, 9)); earlier = np.zeros((9, 9, 9), bool)
    >>> score[1:3, 1:3, 1:3] = 5; score[5:7, 5:7, 5:7] = 5; earlier[6, 6, 6] = True
    >>> score[1:3, 6:8, 1:3] = -5
    >>> labels, numbers, table = classify_changes(score, 3.0, earlier, 1.0)
    >>> sorted(table["change"])
    ['enlarging', 'new', 'shrinking']
    """
    structure = np.ones((3, 3, 3), bool)
    labels = np.zeros(score.shape, np.uint8)
    order = np.zeros(score.shape, np.int32)
    rows = []
    dilated = ndimage.binary_dilation(earlier_lesions, structure)
    for sign in (1, -1):
        clusters, count = ndimage.label(sign * score > threshold, structure)
        for index, region in enumerate(ndimage.find_objects(clusters), start=1):
            inside = clusters[region] == index
            voxels = int(inside.sum())
            if voxels < min_voxels:
                continue
            if sign < 0:
                label = 3
            else:
                label = 2 if dilated[region][inside].any() else 1
            labels[region][inside] = label
            order[region][inside] = len(rows) + 1
            centre = [int(round(c)) + s.start for c, s in
                      zip(ndimage.center_of_mass(inside), region, strict=True)]
            rows.append({"change": CLASSES[label], "voxels": voxels,
                         "volume_ml": voxels * voxel_volume_mm3 / 1000.0,
                         "peak_score": float(np.abs(score[region][inside]).max()),
                         "i": centre[0], "j": centre[1], "k": centre[2]})
    table = pd.DataFrame(rows, columns=["change", "voxels", "volume_ml", "peak_score", "i", "j",
                                        "k"])
    table.insert(0, "found", np.arange(1, len(table) + 1))
    table = table.sort_values(["voxels", "found"], ascending=[False, True], ignore_index=True)
    renumber = np.zeros(len(table) + 1, np.int32)
    renumber[table["found"].to_numpy()] = np.arange(1, len(table) + 1)
    table = table.drop(columns="found")
    table.insert(0, "cluster", np.arange(1, len(table) + 1))
    return labels, renumber[order], table


def change_summary(table: pd.DataFrame, earlier: str, later: str) -> dict:
    """Counts and volumes per class of one session pair (a row of the subject's table)."""
    row: dict = {"earlier": earlier, "later": later}
    for name in CLASSES.values():
        chosen = table[table["change"] == name]
        row[f"{name}_count"] = len(chosen)
        row[f"{name}_ml"] = float(chosen["volume_ml"].sum())
    return row
