"""Repeated random splits of the controls and the per-subject classification protocol.

The Parkinson's disease protocols (Muñoz-Ramírez et al., MLCN 2021; Pinon et al., ISBI 2023)
score each subject by the share of abnormal voxels in a region, separate patients from test
controls with the best g-mean ``sqrt(sensitivity x specificity)`` over cut-offs of that score
(plus the AUROC; :func:`~bids_anomaly.evaluation.statistics.best_gmean`), and repeat the whole over
random age/sex-balanced train/test splits of the controls, reporting the median and interquartile
range over splits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bids_anomaly.errors import BadDataError, UsageError
from bids_anomaly.evaluation.statistics import finite_values

LOGGER = logging.getLogger(__name__)

DEFAULT_STRATA = ("age", "sex")
"""Columns stratified on by default, when present and complete."""

MISSING = frozenset({"", "n/a", "na", "nan", "none"})
"""Values (any case, stripped) that count as missing in participants.tsv columns."""

SEX_NAMES = {"m": "M", "male": "M", "f": "F", "female": "F"}
"""Spellings of sex folded together (case-insensitive)."""

SUMMARY_ROWS = ("median", "q1", "q3", "iqr")
"""Rows of :func:`summarize_splits`, named in its ``split`` column."""


def _is_missing(value: object) -> bool:
    """Whether a participants.tsv cell is missing ('n/a', '', NaN, None)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().lower() in MISSING


def _parse_age(value: object, label: str) -> float:
    """An age as read from participants.tsv (``"63"``, ``"63.5"``, ``"89+"``) as a number."""
    text = str(value).strip()
    try:
        return float(text[:-1] if text.endswith("+") else text)
    except ValueError:
        raise BadDataError(f"age {text!r} of participant {label!r} is not a number") from None


def _labels(table: pd.DataFrame) -> list[str]:
    """The participant labels of the table, checked present and unique."""
    if "label" not in table.columns:
        raise BadDataError("the controls table has no 'label' column")
    labels = [str(label) for label in table["label"]]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise BadDataError(f"participant labels appear twice: {', '.join(duplicated)}")
    return labels


def _age_bins(ages: np.ndarray, n_bins: int) -> np.ndarray | None:
    """Quantile bins of the ages (equal ages share a bin), or None if a bin has < 2 subjects."""
    edges = np.quantile(ages, np.arange(1, n_bins) / n_bins)
    bins = np.searchsorted(edges, ages, side="right")
    counts = np.bincount(bins, minlength=n_bins)
    if np.count_nonzero(counts) < n_bins or counts.min() < 2:
        return None
    return bins


def _usable_columns(table: pd.DataFrame, strata: Sequence[str] | None) -> dict[str, list[str]]:
    """Values of each usable column, raw for age (binned later).

    Usable: present and complete; a column other than age also needs >= 2 values each held by
    >= 2 controls.

    Sex is folded to M/F, other columns to stripped lower case.
    """
    if strata is None:
        names = [name for name in DEFAULT_STRATA if name in table.columns]
    else:
        names = list(dict.fromkeys(strata))
        absent = [name for name in names if name not in table.columns]
        if absent:
            raise UsageError(f"stratum column(s) not in the participants table: "
                             f"{', '.join(absent)}")
    usable = {}
    for name in names:
        values = list(table[name])
        missing = sum(_is_missing(value) for value in values)
        if missing:
            LOGGER.warning("controls not stratified by %s: %d of %d values are missing",
                           name, missing, len(values))
            continue
        if name == "age":
            usable[name] = values
            continue
        usable[name] = [str(value).strip().lower() for value in values]
        if name == "sex":
            usable[name] = [SEX_NAMES.get(value, value) for value in usable[name]]
        counts = pd.Series(usable[name]).value_counts()
        if counts.size < 2 or counts.min() < 2:
            LOGGER.info("controls not stratified by %s: %s", name,
                        "a single value" if counts.size < 2
                        else f"{counts.idxmin()!r} has a single control")
            del usable[name]
    return usable


def _candidates(table: pd.DataFrame,
                usable: dict[str, list]) -> list[tuple[dict[str, int], np.ndarray]]:
    """Stratifications to try, finest first, as (levels per column, stratum of each subject).

    Order: the usable columns with age in terciles, in halves, then left out; then the same
    without the first column; and so on down to no stratification.
    """
    labels = [str(label) for label in table["label"]]
    columns = list(usable)
    ages = None
    if "age" in usable:
        ages = np.array([_parse_age(value, label)
                         for value, label in zip(usable["age"], labels, strict=True)])
    candidates, seen = [], set()
    for start in range(len(columns) + 1):
        kept = columns[start:]
        for n_bins in (3, 2, 0) if "age" in kept else (0,):
            parts, levels = [], {}
            for name in kept:
                if name != "age":
                    parts.append(usable[name])
                    levels[name] = len(set(usable[name]))
                elif n_bins:
                    bins = _age_bins(ages, n_bins)
                    if bins is None:
                        break
                    parts.append([str(b) for b in bins])
                    levels[name] = n_bins
            else:
                key = tuple(levels.items())
                if key not in seen:
                    seen.add(key)
                    strata = ["|".join(values) for values in zip(*parts, strict=True)]
                    candidates.append((levels, np.array(strata or [""] * len(table))))
    return candidates


def _feasible(strata: np.ndarray, n_test: int | None) -> bool:
    """Whether StratifiedShuffleSplit accepts these strata (>= 2 per stratum, room in each side)."""
    _, counts = np.unique(strata, return_counts=True)
    if counts.size <= 1:
        return True
    if counts.min() < 2:
        return False
    return n_test is None or (n_test >= counts.size and strata.size - n_test >= counts.size)


def _n_test(n: int, test_size: int | float) -> int:
    """The number of test controls: an int as given, a fraction of ``n`` rounded up."""
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float, np.integer,
                                                                 np.floating)):
        raise UsageError(f"test size must be a number of controls or a fraction, "
                         f"not {test_size!r}")
    if isinstance(test_size, (int, np.integer)):
        n_test = int(test_size)
    elif 0 < test_size < 1:
        n_test = math.ceil(float(test_size) * n)
    else:
        raise UsageError(f"a fractional test size must lie strictly between 0 and 1, "
                         f"not {test_size}")
    if n_test < 1:
        raise UsageError(f"the test set must hold at least one control (test size {test_size})")
    if n - n_test < 2:
        raise UsageError(f"a test set of {n_test} of {n} controls leaves fewer than 2 for "
                         f"training")
    return n_test


def _plan(table: pd.DataFrame, strata: Sequence[str] | None,
          n_test: int | None) -> tuple[dict[str, int], np.ndarray]:
    """The finest feasible stratification (see :func:`split_strata`)."""
    _labels(table)
    usable = _usable_columns(table, strata)
    for levels, stratum in _candidates(table, usable):
        if _feasible(stratum, n_test):
            return levels, stratum
    raise AssertionError("no stratification is always feasible")  # pragma: no cover


def split_strata(table: pd.DataFrame, strata: Sequence[str] | None = None,
                 test_size: int | float | None = None) -> dict[str, int]:
    """Which columns :func:`split_controls` stratifies on, with their number of levels.

    Columns: ``strata``, or by default each of ``age`` and ``sex`` present; a column with a
    missing value ('n/a', '', NaN) is not used (logged). Age falls in tercile bins, sex is
    taken as given (case-insensitive, M/male and F/female folded), other columns as strings.
    The combined strata are coarsened until scikit-learn's ``StratifiedShuffleSplit`` accepts
    them (every stratum >= 2 controls, the test and training sets each >= one per stratum):
    age in terciles, in halves, then left out; then the first column dropped and the same
    again; down to no stratification (by default: age and sex, sex only, none). A column other
    than age with a single value, or a value held by a single control, is not used (logged).

    Parameters
    ----------
    table : pandas.DataFrame
        One row per control: ``label`` and optional ``age``, ``sex`` (participants.tsv strings).
    strata : sequence of str, optional
        Columns to stratify on; ``[]`` for plain random splits.
    test_size : int or float, optional
        As for :func:`split_controls`; without it only the >= 2 per stratum rule applies.

    Returns
    -------
    dict
        Column -> number of levels (age bins or distinct values), in order; empty when the
        splits are not stratified.

    Examples
    --------
    >>> table = pd.DataFrame({"label": list("abcdef"), "sex": ["M", "f", "male", "F", "m", "F"],
    ...                       "age": ["60", "n/a", "70", "71", "64", "66"]})
    >>> split_strata(table, test_size=2)
    {'sex': 2}
    """
    n_test = None if test_size is None else _n_test(len(table), test_size)
    return _plan(table, strata, n_test)[0]


def split_controls(table: pd.DataFrame, n_splits: int, test_size: int | float, seed: int,
                   strata: Sequence[str] | None = None) -> list[tuple[list[str], list[str]]]:
    """Repeated random train/test splits of the controls, balanced on age and sex.

    Stratified with scikit-learn's ``StratifiedShuffleSplit`` on the combined strata chosen by
    :func:`split_strata` (logged; call it with the same arguments to record them). The rows
    are taken in label order, so the same controls and seed give the same splits.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per control: ``label`` and optional ``age``, ``sex`` (participants.tsv strings).
    n_splits : int
        Number of splits (>= 1).
    test_size : int or float
        Number of test controls, or their fraction in (0, 1) (rounded up); at least one test
        control and two training controls.
    seed : int
        Seed of the shuffling.
    strata : sequence of str, optional
        Columns to stratify on (default: ``age`` and ``sex`` when present); ``[]`` for none.

    Returns
    -------
    list of (list of str, list of str)
        Per split, the sorted training and test labels (disjoint, together all the labels).

    Raises
    ------
    UsageError
        ``n_splits`` < 1, or a test size of no control or leaving fewer than two for training.
    BadDataError
        No ``label`` column, a label twice, or an age that is not a number.
    """
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 1:
        raise UsageError(f"the number of splits must be a whole number >= 1, not {n_splits!r}")
    labels = _labels(table)
    order = np.argsort(np.array(labels, dtype=object), kind="stable")
    table = table.iloc[order].reset_index(drop=True)
    labels = [labels[i] for i in order]
    n_test = _n_test(len(table), test_size)
    levels, stratum = _plan(table, strata, n_test)
    if levels:
        LOGGER.info("splitting %d controls %d times (%d test) stratified by %s", len(labels),
                    n_splits, n_test,
                    ", ".join(f"{name} ({count} levels)" for name, count in levels.items()))
        splitter = StratifiedShuffleSplit(n_splits=int(n_splits), test_size=n_test,
                                          random_state=seed)
    else:
        LOGGER.info("splitting %d controls %d times (%d test) without stratification",
                    len(labels), n_splits, n_test)
        splitter = ShuffleSplit(n_splits=int(n_splits), test_size=n_test, random_state=seed)
    names = np.array(labels, dtype=object)
    return [(sorted(names[train].tolist()), sorted(names[test].tolist()))
            for train, test in splitter.split(np.zeros((len(labels), 1)), stratum)]


def summarize_splits(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Median and interquartile range of per-split results.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per split (its ``split`` column, if any, holding 1..N is ignored).
    columns : sequence of str
        Numeric columns to summarise; NaNs (and non-numbers) are ignored.

    Returns
    -------
    pandas.DataFrame
        A ``split`` column holding ``median``, ``q1``, ``q3``, ``iqr`` and one column per
        summarised column (NaN when it has no value); quartiles interpolate linearly as numpy.

    Examples
    --------
    >>> summary = summarize_splits(pd.DataFrame({"gmean": [0.5, 0.7, float("nan"), 0.9]}),
    ...                            ["gmean"])
    >>> summary.set_index("split")["gmean"].round(2).tolist()
    [0.7, 0.6, 0.8, 0.2]
    """
    absent = [column for column in columns if column not in table.columns]
    if absent:
        raise UsageError(f"column(s) not in the per-split table: {', '.join(absent)}")
    summary = {"split": list(SUMMARY_ROWS)}
    for column in columns:
        values = finite_values(pd.to_numeric(table[column], errors="coerce").to_numpy(np.float64))
        if values.size == 0:
            summary[column] = [float("nan")] * len(SUMMARY_ROWS)
            continue
        median, q1, q3 = np.percentile(values, [50, 25, 75])
        summary[column] = [float(median), float(q1), float(q3), float(q3 - q1)]
    return pd.DataFrame(summary)


def describe_split(table: pd.DataFrame, train: Sequence[str],
                   test: Sequence[str]) -> dict:
    """Size, mean age and sex counts of each side of a split, for a model card.

    Parameters
    ----------
    table : pandas.DataFrame
        The controls: ``label`` and optional ``age``, ``sex`` (participants.tsv strings).
    train, test : sequence of str
        Labels of each side.

    Returns
    -------
    dict
        ``n_train``, ``n_test``; ``age_mean_train``, ``age_mean_test`` over the known ages
        (NaN without any); ``sex_train``, ``sex_test``: counts per sex (M/F folded as in
        :func:`split_strata`, missing ones under ``"n/a"``), None without a ``sex`` column.
    """
    labels = _labels(table)
    unknown = sorted(set(map(str, train)).union(map(str, test)) - set(labels))
    if unknown:
        raise UsageError(f"split labels not in the controls table: {', '.join(unknown)}")
    rows = {label: row for label, (_, row) in zip(labels, table.iterrows(), strict=True)}
    result: dict = {"n_train": len(train), "n_test": len(test)}
    for side, members in (("train", train), ("test", test)):
        chosen = [rows[str(label)] for label in members]
        ages = [_parse_age(row["age"], str(row["label"])) for row in chosen
                if "age" in table.columns and not _is_missing(row["age"])]
        result[f"age_mean_{side}"] = float(np.mean(ages)) if ages else float("nan")
        if "sex" not in table.columns:
            result[f"sex_{side}"] = None
            continue
        counts: dict[str, int] = {}
        for row in chosen:
            value = row["sex"]
            key = ("n/a" if _is_missing(value)
                   else SEX_NAMES.get(str(value).strip().lower(), str(value).strip().lower()))
            counts[key] = counts.get(key, 0) + 1
        result[f"sex_{side}"] = dict(sorted(counts.items()))
    return result
