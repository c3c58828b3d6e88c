"""Per-subject g-mean protocol and repeated, age/sex-balanced splits of the controls."""

import logging
import math

import numpy as np
import pandas as pd
import pytest

from bids_anomaly.errors import BadDataError, UsageError
from bids_anomaly.evaluation.splits import (
    describe_split,
    split_controls,
    split_strata,
    summarize_splits,
)
from bids_anomaly.evaluation.statistics import auroc, best_gmean


def controls(n=30, ages=True, sex=True, seed=0):
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"label": [f"{i:02d}" for i in range(n)]})
    if ages:
        table["age"] = [str(a) for a in rng.integers(50, 80, n)]
    if sex:  # 12 F, 18 M for n=30, in assorted spellings
        table["sex"] = [("F", "female", "f")[i % 3] if i < 12 else ("M", "male", "m")[i % 3]
                        for i in range(n)]
    return table


# --- best_gmean ---------------------------------------------------------------------------

def test_perfect_separation():
    result = best_gmean([5, 6, 7], [1, 2, 3])
    assert result == {"auroc": 1.0, "gmean": 1.0, "sensitivity": 1.0, "specificity": 1.0,
                      "cutoff": 5.0}


def test_hand_computed_case():
    # called patient when score >= cutoff; patients [1,2,3,4], controls [0,1,2,2.5]:
    # cutoff 0: sens 4/4 spec 0/4 -> 0        cutoff 2.5: sens 2/4 spec 3/4 -> sqrt(.375)
    # cutoff 1: sens 4/4 spec 1/4 -> .5       cutoff 3:   sens 2/4 spec 4/4 -> sqrt(.5) best
    # cutoff 2: sens 3/4 spec 2/4 -> sqrt(.375)  cutoff 4: sens 1/4 spec 4/4 -> .5
    patients, controls_ = [1, 2, 3, 4], [0, 1, 2, 2.5]
    result = best_gmean(patients, controls_)
    assert result["cutoff"] == 3.0
    assert (result["sensitivity"], result["specificity"]) == (0.5, 1.0)
    assert result["gmean"] == pytest.approx(math.sqrt(0.5))
    # AUROC: pairs patient > control 11, ties 2 (1=1, 2=2) -> (11 + 1) / 16
    assert result["auroc"] == pytest.approx(12 / 16) == auroc(patients, controls_)


def test_tie_goes_to_higher_specificity():
    # cutoff 2: sens 1, spec 1/2; cutoff 3: sens 1/2, spec 1 -> both sqrt(.5): take cutoff 3
    result = best_gmean([2, 3], [1, 2])
    assert result["cutoff"] == 3.0 and result["specificity"] == 1.0
    assert result["gmean"] == pytest.approx(math.sqrt(0.5))


def test_all_equal_scores_and_nans_and_empty_groups():
    result = best_gmean([1, 1], [1, 1, 1])
    assert result["gmean"] == 0.0 and result["cutoff"] == 1.0
    assert (result["sensitivity"], result["specificity"]) == (1.0, 0.0)
    assert result["auroc"] == 0.5
    assert best_gmean([5, np.nan, 6], [1, np.nan]) == best_gmean([5, 6], [1])
    for patients, controls_ in (([], [1, 2]), ([1, 2], []), ([np.nan], [1.0])):
        assert all(np.isnan(v) for v in best_gmean(patients, controls_).values())
    assert set(best_gmean([], [])) == {"auroc", "gmean", "sensitivity", "specificity",
                                       "cutoff"}


def test_best_gmean_matches_brute_force():
    rng = np.random.default_rng(3)
    patients, controls_ = rng.integers(0, 8, 15) / 2, rng.integers(0, 6, 11) / 2
    best = max(math.sqrt(np.mean(patients >= c) * np.mean(controls_ < c))
               for c in np.unique(np.r_[patients, controls_]))
    assert best_gmean(patients, controls_)["gmean"] == pytest.approx(best)


# --- split_controls -----------------------------------------------------------------------

@pytest.mark.parametrize("test_size, n_test", [(10, 10), (0.25, 8), (1, 1)])
def test_splits_are_disjoint_complete_and_sized(test_size, n_test):
    table = controls()
    splits = split_controls(table, n_splits=5, test_size=test_size, seed=1)
    assert len(splits) == 5
    for train, test in splits:
        assert len(test) == n_test and train == sorted(train) and test == sorted(test)
        assert not set(train) & set(test)
        assert set(train) | set(test) == set(table["label"])


def test_splits_are_reproducible_and_balanced_on_sex():
    table = controls()
    first = split_controls(table, 10, 10, seed=7)
    assert first == split_controls(table, 10, 10, seed=7)
    assert first == split_controls(table.iloc[::-1], 10, 10, seed=7)  # row order irrelevant
    assert first != split_controls(table, 10, 10, seed=8)
    assert len({tuple(test) for _, test in first}) > 1
    assert split_strata(table, test_size=10) == {"age": 3, "sex": 2}
    women = set(table.loc[table["sex"].str.lower().str.startswith("f"), "label"])
    for _, test in first:  # 12 of 30 women overall -> 4 of 10 expected
        assert abs(len(women & set(test)) - 10 * 12 / 30) <= 1


def test_missing_ages_are_not_used_and_logged(caplog):
    table = controls()
    table.loc[[3, 17], "age"] = ["n/a", ""]
    with caplog.at_level(logging.INFO, logger="bids_anomaly.evaluation.splits"):
        splits = split_controls(table, 3, 10, seed=0)
    assert "not stratified by age" in caplog.text and "sex (2 levels)" in caplog.text
    assert split_strata(table, test_size=10) == {"sex": 2}
    assert len(splits) == 3
    table["age"] = np.nan
    assert split_strata(table) == {"sex": 2}


def test_without_age_or_sex_plain_random_splits(caplog):
    table = controls(ages=False, sex=False)
    with caplog.at_level(logging.INFO, logger="bids_anomaly.evaluation.splits"):
        splits = split_controls(table, 4, 0.2, seed=2)
    assert "without stratification" in caplog.text
    assert split_strata(table) == {}
    assert [len(test) for _, test in splits] == [6] * 4
    assert split_controls(table, 1, 6, seed=2) == splits[:1]
    assert len(split_controls(table, 3, 6, seed=2, strata=[])) == 3


def test_rare_strata_are_coarsened():
    table = pd.DataFrame({"label": list("abcdefgh"), "sex": ["F"] * 4 + ["M"] * 4,
                          "age": ["60", "61", "70", "71", "62", "63", "72", "73"]})
    # terciles {60,61,62} {63,70} {71,72,73} x sex leave single controls: age halves x sex
    # gives 4 strata of 2, which fit 4 test places but not 2 -> sex only
    assert split_strata(table, test_size=4) == {"age": 2, "sex": 2}
    assert split_strata(table, test_size=2) == {"sex": 2}
    for _, test in split_controls(table, 5, 4, seed=0):  # one per age half and sex
        assert sorted(table.set_index("label").loc[test, "sex"]) == ["F", "F", "M", "M"]
    for _, test in split_controls(table, 5, 2, seed=0):
        assert sorted(table.set_index("label").loc[test, "sex"]) == ["F", "M"]
    table["sex"] = ["M"] * 7 + ["F"]  # a single woman: sex cannot stratify
    assert split_strata(table, test_size=2) == {"age": 2}
    assert split_strata(table, test_size=1) == {}
    table["sex"] = "M"  # a single value: not used, age still is
    assert split_strata(table, test_size=3) == {"age": 3}


def test_ages_in_bids_forms():
    table = controls(n=12)
    table["age"] = ["89+", "60", "61.5", "62", "70", "71", "72", "73", "80", "81", "82", "83"]
    assert split_strata(table, strata=["age"]) == {"age": 3}
    table.loc[0, "age"] = "old"
    with pytest.raises(BadDataError, match="not a number"):
        split_controls(table, 2, 3, seed=0)


@pytest.mark.parametrize("kwargs", [
    {"n_splits": 0}, {"n_splits": 2.5}, {"test_size": 0}, {"test_size": 29},
    {"test_size": 1.0}, {"test_size": 0.0}, {"test_size": -3}, {"test_size": 0.99},
    {"test_size": True}, {"test_size": "10"}, {"strata": ["site"]},
])
def test_bad_arguments(kwargs):
    arguments = {"n_splits": 3, "test_size": 10, "seed": 0, **kwargs}
    with pytest.raises(UsageError):
        split_controls(controls(), **arguments)


def test_bad_tables():
    with pytest.raises(BadDataError, match="label"):
        split_controls(pd.DataFrame({"age": ["60"] * 5}), 1, 1, seed=0)
    table = controls(n=6)
    table.loc[1, "label"] = "00"
    with pytest.raises(BadDataError, match="twice"):
        split_controls(table, 1, 1, seed=0)


# --- summaries ----------------------------------------------------------------------------

def test_summarize_splits_matches_numpy_and_ignores_nans():
    values = np.array([0.61, 0.72, 0.55, 0.9, 0.8, 0.67, 0.74])
    table = pd.DataFrame({"split": range(1, 9), "gmean": np.r_[values, np.nan],
                          "auroc": ["0.5", "0.6", "n/a", "0.7", "0.8", "0.9", "1.0", "0.75"],
                          "empty": np.nan})
    summary = summarize_splits(table, ["gmean", "auroc", "empty"])
    assert list(summary.columns) == ["split", "gmean", "auroc", "empty"]
    assert list(summary["split"]) == ["median", "q1", "q3", "iqr"]
    gmean = summary.set_index("split")["gmean"]
    assert gmean["median"] == pytest.approx(np.median(values))
    assert gmean["q1"] == pytest.approx(np.percentile(values, 25))
    assert gmean["q3"] == pytest.approx(np.percentile(values, 75))
    assert gmean["iqr"] == pytest.approx(np.subtract(*np.percentile(values, [75, 25])))
    aucs = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.75]
    assert summary.set_index("split").loc["median", "auroc"] == pytest.approx(np.median(aucs))
    assert summary["empty"].isna().all()
    with pytest.raises(UsageError):
        summarize_splits(table, ["dice"])


def test_describe_split():
    table = pd.DataFrame({"label": ["a", "b", "c", "d", "e"],
                          "age": ["60", "70", "n/a", "80", "50"],
                          "sex": ["M", "female", "f", "n/a", "male"]})
    info = describe_split(table, ["a", "b", "c"], ["d", "e"])
    assert info == {"n_train": 3, "n_test": 2, "age_mean_train": 65.0, "age_mean_test": 65.0,
                    "sex_train": {"F": 2, "M": 1}, "sex_test": {"M": 1, "n/a": 1}}
    info = describe_split(table[["label"]], ["a"], ["b"])
    assert np.isnan(info["age_mean_train"]) and np.isnan(info["age_mean_test"])
    assert info["sex_train"] is None and info["sex_test"] is None
    with pytest.raises(UsageError):
        describe_split(table, ["a"], ["z"])
