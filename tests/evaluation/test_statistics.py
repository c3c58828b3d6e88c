"""Bootstrap intervals and patients-vs-controls statistics, checked against scikit-learn/scipy."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from bids_anomaly.evaluation.statistics import (
    _auroc_of_resamples,
    auroc,
    auroc_ci,
    bootstrap_ci,
    compare_groups,
    hedges_g,
    resolve_control_label,
    summarize_by_group,
)


def test_auroc_agrees_with_scikit_learn_and_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    patients = rng.integers(0, 6, 17).astype(float)  # integers: many ties
    controls = rng.integers(0, 5, 23).astype(float)
    truth = np.r_[np.ones(17), np.zeros(23)]
    expected = roc_auc_score(truth, np.r_[patients, controls])
    assert auroc(patients, controls) == pytest.approx(expected)
    u = mannwhitneyu(patients, controls).statistic
    assert auroc(patients, controls) == pytest.approx(u / (17 * 23))
    # the vectorised resampling formula gives the same per resample
    a = rng.normal(size=(5, 17)).round(1)
    b = rng.normal(size=(5, 23)).round(1)
    fast = _auroc_of_resamples(a, b)
    for row in range(5):
        assert fast[row] == pytest.approx(roc_auc_score(truth, np.r_[a[row], b[row]]))


def test_hedges_g_by_hand():
    a, b = np.array([4.0, 5.0, 6.0, 7.0]), np.array([1.0, 2.0, 3.0])
    pooled = np.sqrt((3 * a.var(ddof=1) + 2 * b.var(ddof=1)) / 5)
    assert hedges_g(a, b) == pytest.approx((a.mean() - b.mean()) / pooled * (1 - 3 / 19))
    assert hedges_g(b, a) < 0
    assert np.isnan(hedges_g([1.0], b)) and np.isnan(hedges_g([1.0, 1.0], [1.0, 1.0]))


def test_bootstrap_interval_covers_the_mean_and_is_reproducible():
    values = np.random.default_rng(2).normal(10, 2, 40)
    low, high = bootstrap_ci(values, n_boot=1000, seed=3)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * values.std(ddof=1) / np.sqrt(40), rel=0.25)
    assert bootstrap_ci(values, n_boot=1000, seed=3) == (low, high)
    assert all(np.isnan(bootstrap_ci([1.0], n_boot=10)))
    low, high = auroc_ci(values + 3, values, n_boot=500)
    assert low <= auroc(values + 3, values) <= high


def test_compare_groups_each_patient_group_and_all_patients():
    rng = np.random.default_rng(4)
    table = pd.DataFrame({
        "group": ["healthy"] * 10 + ["MS"] * 6 + ["stroke"] * 4,
        "burden": np.r_[rng.normal(1, 0.3, 10), rng.normal(3, 0.3, 6), rng.normal(1, 0.3, 4)],
    })
    result = compare_groups(table, ["burden"], "healthy", n_boot=300).set_index("patients")
    assert list(result.index) == ["all patients", "MS", "stroke"]
    assert result.loc["MS", "auroc"] == 1.0 and result.loc["MS", "n_patients"] == 6
    assert result.loc["stroke", "n_controls"] == 10
    healthy = table.loc[table.group == "healthy", "burden"]
    ms = table.loc[table.group == "MS", "burden"]
    assert result.loc["MS", "p_value"] == pytest.approx(mannwhitneyu(ms, healthy).pvalue)
    assert result.loc["MS", "hedges_g"] == pytest.approx(hedges_g(ms, healthy))
    assert result.loc["all patients", "n_patients"] == 10


def test_control_label_and_group_summary():
    assert resolve_control_label(["MS", "Healthy"]) == "Healthy"
    assert resolve_control_label(["MS", "stroke"]) is None
    assert resolve_control_label(["MS", "HC"], "HC") == "HC"
    assert resolve_control_label(["MS", "HC"], "controls") is None
    table = pd.DataFrame({"group": ["a", "a", "b"], "dice": [0.2, 0.4, 0.9]})
    summary = summarize_by_group(table, ["dice"], n_boot=200).set_index("group")
    assert summary.loc["all", "n"] == 3 and summary.loc["a", "mean"] == pytest.approx(0.3)
    assert np.isnan(summary.loc["b", "ci_low"])  # one value: no interval
