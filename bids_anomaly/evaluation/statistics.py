"""Group statistics: bootstrap confidence intervals and patients-vs-controls comparisons."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

CONTROL_LABELS = ("healthy", "control", "controls", "hc", "cn")
"""``group`` values taken for the controls when ``--control-label`` is not given (any case)."""


def _percentile_interval(samples: tuple[np.ndarray, ...], statistic: Callable, n_boot: int,
                         level: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap (scipy) of a vectorised statistic, each sample resampled alone."""
    from scipy.stats import bootstrap

    result = bootstrap(samples, statistic, n_resamples=n_boot, confidence_level=level,
                       method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def bootstrap_ci(values: Sequence[float], statistic: Callable = np.mean, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a statistic of one sample.

    Parameters
    ----------
    values : sequence of float
        The sample; NaNs are left out.
    statistic : callable
        ``statistic(samples, axis)``, vectorised like ``numpy.mean``.
    n_boot : int
        Number of resamples.
    level : float
        Coverage of the interval.
    seed : int
        Seed of the resampling (results are reproducible).

    Returns
    -------
    (float, float)
        Lower and upper bounds; NaN for fewer than two values.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return float("nan"), float("nan")
    return _percentile_interval((values,), statistic, n_boot, level, seed)


def summarize_by_group(table: pd.DataFrame, metrics: Sequence[str], n_boot: int = 2000,
                       seed: int = 0) -> pd.DataFrame:
    """Mean of each metric per group (and over everyone) with a bootstrap confidence interval.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per subject; a ``group`` column is optional.
    metrics : sequence of str
        Numeric columns to summarise.

    Returns
    -------
    pandas.DataFrame
        Columns ``group``, ``metric``, ``n``, ``mean``, ``sd``, ``ci_low``, ``ci_high``.
    """
    groups = [("all", table)]
    if "group" in table.columns and table["group"].nunique() > 1:
        groups += [(str(name), rows) for name, rows in table.groupby("group", sort=True)]
    rows = []
    for name, rows_of_group in groups:
        for metric in metrics:
            values = pd.to_numeric(rows_of_group[metric], errors="coerce").dropna().to_numpy()
            low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            rows.append({"group": name, "metric": metric, "n": int(values.size),
                         "mean": float(values.mean()) if values.size else float("nan"),
                         "sd": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                         "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def hedges_g(patients: Sequence[float], controls: Sequence[float]) -> float:
    """Standardised mean difference with the small-sample correction (Hedges' g).

    Positive when the patients' mean is higher. NaN with fewer than two values in a group or
    no spread.
    """
    a, b = np.asarray(patients, np.float64), np.asarray(controls, np.float64)
    if a.size < 2 or b.size < 2:
        return float("nan")
    pooled = np.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1))
                     / (a.size + b.size - 2))
    if pooled == 0:
        return float("nan")
    correction = 1 - 3 / (4 * (a.size + b.size) - 9)
    return float((a.mean() - b.mean()) / pooled * correction)


def auroc(patients: Sequence[float], controls: Sequence[float]) -> float:
    """Area under the ROC curve of a measure separating patients (positive) from controls.

    The probability that a random patient scores higher than a random control (ties count
    half), computed with scikit-learn.
    """
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(patients, np.float64), np.asarray(controls, np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    truth = np.r_[np.ones(a.size), np.zeros(b.size)]
    return float(roc_auc_score(truth, np.r_[a, b]))


def finite_values(values: Sequence[float]) -> np.ndarray:
    """The values as a float array with NaNs (and infinities) left out."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[~np.isnan(values)]


def best_gmean(patients: Sequence[float], controls: Sequence[float]) -> dict:
    """Best g-mean ``sqrt(sensitivity x specificity)`` over cut-offs of a score, and the AUROC.

    Subjects whose score is ``>= cutoff`` are called patients. Every distinct observed score is
    tried as the cut-off, the lowest one calling everybody a patient (g-mean 0). Ties of the
    g-mean (compared exactly, as integer products of counts) go to the higher specificity, then
    to the lower cut-off.

    Parameters
    ----------
    patients, controls : sequence of float
        Scores of each group (higher is more abnormal); NaNs are left out.

    Returns
    -------
    dict
        ``auroc``, ``gmean``, ``sensitivity``, ``specificity`` and ``cutoff``; all NaN when a
        group has no score.

    Examples
    --------
    >>> result = best_gmean([1, 2, 3, 4], [0, 1, 2, 2.5])
    >>> result["cutoff"], result["sensitivity"], result["specificity"]
    (3.0, 0.5, 1.0)
    """
    a, b = finite_values(patients), finite_values(controls)
    if a.size == 0 or b.size == 0:
        return dict.fromkeys(("auroc", "gmean", "sensitivity", "specificity", "cutoff"),
                             float("nan"))
    cutoffs = np.unique(np.r_[a, b])  # ascending
    true_positives = a.size - np.searchsorted(np.sort(a), cutoffs, side="left")
    true_negatives = np.searchsorted(np.sort(b), cutoffs, side="left")
    product = true_positives.astype(np.int64) * true_negatives.astype(np.int64)
    # lexsort: last key is primary; the lowest cut-off wins the remaining ties (stable, ascending)
    best = np.lexsort((np.arange(cutoffs.size), -true_negatives, -product))[0]
    sensitivity = float(true_positives[best] / a.size)
    specificity = float(true_negatives[best] / b.size)
    return {"auroc": auroc(a, b), "gmean": math.sqrt(sensitivity * specificity),
            "sensitivity": sensitivity, "specificity": specificity,
            "cutoff": float(cutoffs[best])}


def _auroc_of_resamples(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC of each pair of resamples along ``axis``: Mann-Whitney U over n_a n_b (scipy)."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(a, b, axis=axis, method="asymptotic").statistic
    return u / (a.shape[axis] * b.shape[axis])


def auroc_ci(patients: Sequence[float], controls: Sequence[float], n_boot: int = 2000,
             level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Stratified percentile bootstrap interval of :func:`auroc` (each group resampled).

    NaN with fewer than two values in a group.
    """
    a, b = np.asarray(patients, np.float64), np.asarray(controls, np.float64)
    if a.size < 2 or b.size < 2:
        return float("nan"), float("nan")
    return _percentile_interval((a, b), _auroc_of_resamples, n_boot, level, seed)


def resolve_control_label(groups: Sequence[str], requested: str | None = None) -> str | None:
    """The ``group`` value of the controls: ``requested`` if present, else a usual name."""
    present = {str(g) for g in groups}
    if requested is not None:
        return requested if requested in present else None
    by_lower = {g.lower(): g for g in present}
    return next((by_lower[name] for name in CONTROL_LABELS if name in by_lower), None)


def compare_groups(table: pd.DataFrame, measures: Sequence[str], control: str,
                   n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """How well each burden measure separates patients from controls.

    Every patient group is compared with the controls, and all patients together when there
    are several groups.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per subject with a ``group`` column and the ``measures``.
    measures : sequence of str
        Numeric columns (higher is assumed more abnormal).
    control : str
        The controls' ``group`` value.

    Returns
    -------
    pandas.DataFrame
        Per comparison and measure: ``n_patients``, ``n_controls``, the two means, ``auroc``
        with its stratified bootstrap interval (``auroc_ci_low``, ``auroc_ci_high``), the best
        g-mean over cut-offs with its sensitivity, specificity and cut-off (``best_gmean``,
        ``best_sensitivity``, ``best_specificity``, ``gmean_cutoff``),
        ``hedges_g`` and the two-sided Mann-Whitney ``p_value``.
    """
    from scipy.stats import mannwhitneyu

    controls = table[table["group"] == control]
    patients = table[table["group"] != control]
    comparisons = [(str(name), rows) for name, rows in patients.groupby("group", sort=True)]
    if len(comparisons) > 1:
        comparisons.insert(0, ("all patients", patients))
    rows = []
    for name, group_rows in comparisons:
        for measure in measures:
            a = pd.to_numeric(group_rows[measure], errors="coerce").dropna().to_numpy(np.float64)
            b = pd.to_numeric(controls[measure], errors="coerce").dropna().to_numpy(np.float64)
            low, high = auroc_ci(a, b, n_boot, seed=seed)
            p_value = (float(mannwhitneyu(a, b, alternative="two-sided").pvalue)
                       if a.size and b.size and np.ptp(np.r_[a, b]) > 0 else float("nan"))
            rows.append({
                "patients": name, "controls": control, "measure": measure,
                "n_patients": int(a.size), "n_controls": int(b.size),
                "patients_mean": float(a.mean()) if a.size else float("nan"),
                "controls_mean": float(b.mean()) if b.size else float("nan"),
                "auroc": auroc(a, b), "auroc_ci_low": low, "auroc_ci_high": high,
                **{f"best_{k}" if k != "cutoff" else "gmean_cutoff": v
                   for k, v in best_gmean(a, b).items() if k != "auroc"},
                "hedges_g": hedges_g(a, b), "p_value": p_value,
            })
    return pd.DataFrame(rows)
