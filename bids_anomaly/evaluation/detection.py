"""Per-lesion detection of small point-like lesions (cerebral microbleeds): matching and FROC.

Microbleeds are counted, not segmented, so a method is judged per lesion (VALDO 2021 task 2):
its output is a list of detections, points in world millimetres with a score each, and the
ground truth a list of microbleed centres with a radius each.

Matching rule
-------------
A detection *can hit* a true microbleed when its distance to the microbleed's centre is at most
the microbleed's radius plus a tolerance (``tolerance_mm``, e.g. half a voxel). Detections are
visited greedily by descending score (ties in input order), and each is matched to the nearest
still unmatched microbleed it can hit (distance ties to the lower truth index); so each
microbleed is matched at most once and each detection at most once. A matched detection is a
true positive, an unmatched one a false positive, an unmatched microbleed a false negative.

Thresholds
----------
A score threshold keeps the detections with ``score >= threshold``. Because the greedy visits
detections by descending score, the kept detections are always the first ones visited (tied
scores are kept or dropped together), and the matching of a detection depends only on the
detections visited before it, i.e. on higher-scoring (or tied, earlier) ones. Running the greedy
on the kept detections therefore repeats exactly the first steps of the greedy on all of them:
one matching of all detections gives, for every threshold at once, which detections are true
positives. In particular a microbleed matched by a higher-scoring detection stays matched by it
at every lower threshold. :func:`froc` relies on this.

Scores are pooled over subjects (one threshold for all), as in the FROC analysis of lung-nodule
and microbleed challenges; sensitivity is pooled over all true microbleeds, false positives are
averaged over all subjects, those without microbleeds included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bids_anomaly.errors import BadDataError, MissingInputError

DEFAULT_RADIUS_MM = 2.5
"""Radius given to points of a table without ``radius_mm``: microbleeds measure 2 to 10 mm
across, mostly under 5 mm (STRIVE, Wardlaw et al., Lancet Neurol 2013), so 5 mm across."""

FROC_LEVELS = (0.5, 1, 2, 3, 4, 8)
"""Mean false positives per subject at which :func:`froc_summary` reads the sensitivity."""

FROC_COLUMNS = ("threshold", "sensitivity", "fp_per_subject", "tp", "fp")
"""Columns of the table of :func:`froc`."""

MISSING = frozenset({"", "n/a", "na", "nan"})
"""Cell values (any case, stripped) read as missing in a points table."""

Subject = tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]
"""One subject for :func:`froc`: detections (N, 3), scores (N,), truth (M, 3), radii (M,)."""


def _points(points: np.ndarray, name: str) -> np.ndarray:
    """Points as a float (K, 3) array (an empty input of any shape gives (0, 3)), checked."""
    points = np.asarray(points, dtype=np.float64)
    if points.size == 0:
        return points.reshape(0, 3)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{name} must be an (n, 3) array of points in mm, not {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{name} has non-finite coordinates")
    return points


def _vector(values: np.ndarray | None, size: int, name: str, default: float) -> np.ndarray:
    """Per-point values as a finite float (size,) array; ``default`` everywhere when None."""
    if values is None:
        return np.full(size, default)
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size != size:
        raise ValueError(f"{name} has {values.size} values for {size} points")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} has non-finite values")
    return values


def _checked(detections: np.ndarray, scores: np.ndarray | None, truth: np.ndarray,
             radii: np.ndarray | None, tolerance_mm: float) -> tuple[np.ndarray, ...]:
    """The four inputs of a matching as float arrays of consistent sizes."""
    detections, truth = _points(detections, "detections"), _points(truth, "truth")
    scores = _vector(scores, len(detections), "scores", 0.0)
    radii = _vector(radii, len(truth), "radii", DEFAULT_RADIUS_MM)
    if (radii < 0).any():
        raise ValueError("radii must not be negative")
    if not tolerance_mm >= 0:
        raise ValueError(f"tolerance_mm must be >= 0, not {tolerance_mm}")
    return detections, scores, truth, radii


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices of the detections by descending score, ties in input order."""
    return np.argsort(-scores, kind="stable")


def match_detections(detections: np.ndarray, scores: np.ndarray | None, truth: np.ndarray,
                     radii: np.ndarray | None, tolerance_mm: float = 1.0) -> dict[str, np.ndarray]:
    """Match detections to true lesions greedily by descending score (see the module notes).

    Parameters
    ----------
    detections : numpy.ndarray
        Detected points, (N, 3), world mm.
    scores : numpy.ndarray or None
        Their scores, (N,), higher is more confident; None visits them in input order.
    truth : numpy.ndarray
        Centres of the true lesions, (M, 3), world mm.
    radii : numpy.ndarray or None
        Their radii, (M,), mm; None gives each :data:`DEFAULT_RADIUS_MM`.
    tolerance_mm : float
        Added to each radius: a detection can hit a lesion when its distance to the centre is
        ``<= radius + tolerance_mm``.

    Returns
    -------
    dict
        ``true_positive`` (bool, N), ``detected`` (bool, M) and ``matched`` (int, N: the index
        of the lesion each detection hits, -1 for a false positive).

    Examples
    --------
    >>> result = match_detections([[0, 0, 0], [1, 0, 0]], [0.9, 0.8], [[0.5, 0, 0]], [1.0])
    >>> result["true_positive"].tolist(), result["detected"].tolist()
    ([True, False], [True])
    """
    from scipy.spatial import cKDTree

    detections, scores, truth, radii = _checked(detections, scores, truth, radii, tolerance_mm)
    reach = radii + tolerance_mm
    matched = np.full(len(detections), -1, dtype=np.int64)
    detected = np.zeros(len(truth), dtype=bool)
    if len(detections) and len(truth):
        # candidate lesions of every detection, within the largest reach (then checked exactly)
        candidates = cKDTree(truth).query_ball_point(detections, r=float(reach.max()))
        for index in _order(scores):
            near = np.asarray(candidates[index], dtype=np.int64)
            near = near[~detected[near]] if near.size else near
            if near.size == 0:
                continue
            distance = np.linalg.norm(truth[near] - detections[index], axis=1)
            inside = distance <= reach[near]
            if not inside.any():
                continue
            near, distance = near[inside], distance[inside]
            best = near[np.lexsort((near, distance))[0]]  # nearest, then lowest index
            matched[index] = best
            detected[best] = True
    return {"true_positive": matched >= 0, "detected": detected, "matched": matched}


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is 0."""
    return float(numerator / denominator) if denominator else float("nan")


def detection_metrics(detections: np.ndarray, scores: np.ndarray | None, truth: np.ndarray,
                      radii: np.ndarray | None, threshold: float | None = None,
                      tolerance_mm: float = 1.0) -> dict[str, float]:
    """Per-lesion metrics of one subject at one score threshold (VALDO 2021 task 2).

    Parameters
    ----------
    detections, scores, truth, radii, tolerance_mm
        As in :func:`match_detections`.
    threshold : float, optional
        Keep the detections with ``score >= threshold``; None keeps all.

    Returns
    -------
    dict
        ``n_true``, ``n_detected`` (kept detections), ``tp``, ``fp``, ``fn``, ``sensitivity``
        (NaN without true lesions), ``precision`` (NaN without detections), ``f1``
        (``2 tp / (2 tp + fp + fn)``, NaN with neither lesions nor detections),
        ``count_difference`` (``n_detected - n_true``) and ``abs_count_difference``.

    Examples
    --------
    >>> metrics = detection_metrics([[0, 0, 0], [9, 9, 9]], [0.9, 0.2], [[0, 0, 1]], [2.0],
    ...                             threshold=0.5)
    >>> metrics["tp"], metrics["fp"], metrics["f1"]
    (1, 0, 1.0)
    """
    detections, scores, truth, radii = _checked(detections, scores, truth, radii, tolerance_mm)
    if threshold is not None:
        kept = scores >= threshold
        detections, scores = detections[kept], scores[kept]
    match = match_detections(detections, scores, truth, radii, tolerance_mm)
    n_true, n_detected = len(truth), len(detections)
    tp = int(match["true_positive"].sum())
    fp, fn = n_detected - tp, n_true - tp
    return {
        "n_true": n_true,
        "n_detected": n_detected,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "sensitivity": _ratio(tp, n_true),
        "precision": _ratio(tp, n_detected),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "count_difference": n_detected - n_true,
        "abs_count_difference": abs(n_detected - n_true),
    }


def froc(subjects: Sequence[Subject], tolerance_mm: float = 1.0) -> pd.DataFrame:
    """Free-response ROC: pooled sensitivity against mean false positives per subject.

    Each subject is matched once (see the module notes for why one matching serves every
    threshold); the detections of all subjects are then thresholded together.

    Parameters
    ----------
    subjects : sequence of tuple
        Per subject ``(detections, scores, truth, radii)`` as in :func:`match_detections`;
        subjects without lesions or without detections count too.
    tolerance_mm : float
        As in :func:`match_detections`.

    Returns
    -------
    pandas.DataFrame
        One row per distinct score (descending), used as threshold ``score >= threshold``:
        ``threshold``, ``sensitivity`` (true positives over all true lesions of all subjects,
        NaN without any), ``fp_per_subject`` (false positives over the number of subjects),
        ``tp`` and ``fp``. Empty without any detection.

    Examples
    --------
    >>> one = ([[0, 0, 0], [20, 0, 0]], [0.9, 0.5], [[0, 0, 0]], [2.0])
    >>> two = ([[5, 5, 5]], [0.7], [[30, 0, 0]], [2.0])
    >>> froc([one, two])[["threshold", "sensitivity", "fp_per_subject"]].values.tolist()
    [[0.9, 0.5, 0.0], [0.7, 0.5, 0.5], [0.5, 0.5, 1.0]]
    """
    if len(subjects) == 0:
        raise ValueError("froc needs at least one subject")
    all_scores, all_hits, n_true = [], [], 0
    for detections, scores, truth, radii in subjects:
        detections, scores, truth, radii = _checked(detections, scores, truth, radii,
                                                    tolerance_mm)
        match = match_detections(detections, scores, truth, radii, tolerance_mm)
        all_scores.append(scores)
        all_hits.append(match["true_positive"])
        n_true += len(truth)
    scores, hits = np.concatenate(all_scores), np.concatenate(all_hits)
    if scores.size == 0:
        return pd.DataFrame({column: pd.Series(dtype=np.int64 if column in ("tp", "fp")
                                               else np.float64) for column in FROC_COLUMNS})
    order = _order(scores)
    scores, hits = scores[order], hits[order]
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    # the last detection of each run of equal scores closes that threshold's row
    last = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), scores.size - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = tp[last] / n_true if n_true else np.full(last.size, np.nan)
    return pd.DataFrame({
        "threshold": scores[last],
        "sensitivity": sensitivity.astype(np.float64),
        "fp_per_subject": fp[last] / len(subjects),
        "tp": tp[last].astype(np.int64),
        "fp": fp[last].astype(np.int64),
    })


def sensitivity_at(froc_table: pd.DataFrame, fp_per_subject: float) -> float:
    """The best sensitivity of a FROC table with at most ``fp_per_subject`` false positives.

    Parameters
    ----------
    froc_table : pandas.DataFrame
        As returned by :func:`froc`.
    fp_per_subject : float
        Mean false positives per subject allowed.

    Returns
    -------
    float
        The highest ``sensitivity`` over rows with ``fp_per_subject <=`` the value; 0 when no row
        qualifies, NaN when the table has no true lesion (all sensitivities NaN).

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"sensitivity": [0.2, 0.5, 0.8], "fp_per_subject": [0, 1, 3]})
    >>> sensitivity_at(table, 2), sensitivity_at(table, 8)
    (0.5, 0.8)
    """
    sensitivity = np.asarray(froc_table["sensitivity"], dtype=np.float64)
    if sensitivity.size and np.isnan(sensitivity).all():
        return float("nan")
    allowed = np.asarray(froc_table["fp_per_subject"], dtype=np.float64) <= fp_per_subject
    allowed &= ~np.isnan(sensitivity)
    return float(sensitivity[allowed].max()) if allowed.any() else 0.0


def froc_summary(froc_table: pd.DataFrame,
                 levels: Sequence[float] = FROC_LEVELS) -> dict[str, float]:
    """Sensitivities at given false-positive rates and their mean, the CPM.

    Parameters
    ----------
    froc_table : pandas.DataFrame
        As returned by :func:`froc`.
    levels : sequence of float
        Mean false positives per subject to read the sensitivity at.

    Returns
    -------
    dict
        ``sensitivity_at_<level>`` (level written with ``:g``, e.g. ``sensitivity_at_0.5``) for
        each level, from :func:`sensitivity_at`, and ``cpm`` (competition performance metric),
        their mean.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"sensitivity": [0.2, 0.5, 0.8], "fp_per_subject": [0, 1, 3]})
    >>> froc_summary(table, levels=(1, 3))
    {'sensitivity_at_1': 0.5, 'sensitivity_at_3': 0.8, 'cpm': 0.65}
    """
    if len(levels) == 0:
        raise ValueError("froc_summary needs at least one level")
    values = {f"sensitivity_at_{level:g}": sensitivity_at(froc_table, level) for level in levels}
    values["cpm"] = float(np.mean(list(values.values())))
    return values


def points_from_mask(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres and radii of the lesions of a mask, in world millimetres.

    A mask holding two or more distinct positive integer values is a label map: one lesion per
    value (its voxels need not touch). A mask with a single positive value is binary: one lesion
    per 26-connected component. The centre is the centroid of the lesion's voxel centres mapped
    through ``affine``; the radius that of the sphere of the same volume,
    ``r = (3 V / (4 pi)) ** (1 / 3)`` with ``V`` the voxel count times the voxel volume
    ``|det(affine[:3, :3])|``. Voxelised, this slightly overestimates small spheres (a sphere of
    3 voxels' radius has 123 voxels, ``r = 3.09``).

    Parameters
    ----------
    mask : numpy.ndarray
        3D integer (or integer-valued float) mask, 0 for background; a trailing axis of size 1
        is dropped.
    affine : numpy.ndarray
        4 x 4 voxel-to-world matrix.

    Returns
    -------
    centres : numpy.ndarray
        (M, 3) in mm, by ascending label (label maps) or component order (binary masks).
    radii : numpy.ndarray
        (M,) in mm.

    Raises
    ------
    BadDataError
        The mask is not 3D, or holds negative, non-finite or non-integer values.

    Examples
    --------
    >>> import numpy as np
    >>> mask = np.zeros((5, 5, 5), int)
    >>> mask[1, 1, 1] = mask[3, 3, 3] = 1
    >>> centres, radii = points_from_mask(mask, np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> centres.tolist(), radii.round(2).tolist()
    ([[2.0, 2.0, 2.0], [6.0, 6.0, 6.0]], [1.24, 1.24])
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[3] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise BadDataError(f"the lesion mask must be 3D, not of shape {mask.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"the affine must be 4 x 4, not {affine.shape}")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        if not np.isfinite(mask).all() or (mask != np.round(mask)).any():
            raise BadDataError("the lesion mask holds non-integer values (a probability map?)")
    if (mask < 0).any():
        raise BadDataError("the lesion mask holds negative values")
    values = np.unique(mask[mask > 0])
    if values.size >= 2:
        labels, count = np.searchsorted(values, mask) + 1, values.size
        labels[mask == 0] = 0
    else:
        labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return np.zeros((0, 3)), np.zeros(0)
    voxels = np.nonzero(labels)
    which = labels[voxels] - 1
    n_voxels = np.bincount(which, minlength=count).astype(np.float64)
    index_centres = np.stack([np.bincount(which, weights=axis.astype(np.float64), minlength=count)
                              for axis in voxels], axis=1) / n_voxels[:, None]
    centres = index_centres @ affine[:3, :3].T + affine[:3, 3]
    volumes = n_voxels * abs(np.linalg.det(affine[:3, :3]))
    radii = np.cbrt(3 * volumes / (4 * math.pi))
    return centres, radii


def _column(table: pd.DataFrame, column: str, path: Path,
            default: float | None = None) -> np.ndarray:
    """A numeric column of a points table; missing cells take ``default`` (refused if None)."""
    cells = table[column].astype(str).str.strip()
    missing = cells.str.lower().isin(MISSING)
    if missing.any() and default is None:
        raise BadDataError(f"{path}: column {column!r} has missing values")
    values = pd.to_numeric(cells.where(~missing), errors="coerce")
    bad = values.isna() & ~missing
    if bad.any():
        raise BadDataError(f"{path}: column {column!r} has non-numeric values, "
                           f"e.g. {cells[bad].iloc[0]!r}")
    if default is not None:
        values = values.fillna(default)
    values = values.to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise BadDataError(f"{path}: column {column!r} has non-finite values")
    return values


def read_points_tsv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    r"""Read lesion centres (and radii) from a tab-separated table.

    Parameters
    ----------
    path : str or pathlib.Path
        A TSV with columns ``x``, ``y``, ``z`` (world mm) and optionally ``radius_mm``; other
        columns are ignored. Without ``radius_mm``, or where it is ``n/a``, the radius is
        :data:`DEFAULT_RADIUS_MM` (2.5 mm, a typical microbleed of 5 mm across).

    Returns
    -------
    centres : numpy.ndarray
        (M, 3) in mm.
    radii : numpy.ndarray
        (M,) in mm.

    Raises
    ------
    MissingInputError
        The file does not exist.
    BadDataError
        The file is unreadable, lacks ``x``, ``y`` or ``z``, or holds missing or non-numeric
        coordinates, or non-numeric or negative radii (the message names file and column).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "points.tsv"
    >>> _ = path.write_text("x\ty\tz\n1\t2\t3\n")
    >>> read_points_tsv(path)
    (array([[1., 2., 3.]]), array([2.5]))
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"the points table {path} does not exist")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise BadDataError(f"{path}: not a readable tab-separated table ({error})") from None
    table.columns = [str(column).strip() for column in table.columns]
    absent = [column for column in ("x", "y", "z") if column not in table.columns]
    if absent:
        raise BadDataError(f"{path}: missing column(s) {', '.join(absent)}")
    centres = np.stack([_column(table, column, path) for column in ("x", "y", "z")], axis=1)
    centres = centres.reshape(-1, 3)
    if "radius_mm" in table.columns:
        radii = _column(table, "radius_mm", path, default=DEFAULT_RADIUS_MM)
        if (radii < 0).any():
            raise BadDataError(f"{path}: column 'radius_mm' has negative values")
    else:
        radii = np.full(len(table), DEFAULT_RADIUS_MM)
    return centres, radii
