"""Group statistics from burden and regional tables: sessions averaged, p-values adjusted."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control, mannwhitneyu

from bids_anomaly.evaluation.group import GLOBAL_MEASURES, ModelResults, group_statistics


def _results() -> ModelResults:
    rng = np.random.default_rng(0)
    burden, regions = [], []
    people = ([(f"sub-c{i}", "healthy", 1.0) for i in range(8)]
              + [(f"sub-p{i}", "MS", 3.0) for i in range(5)]
              + [(f"sub-s{i}", "stroke", 1.3) for i in range(4)])
    for participant, group, level in people:
        sessions = ["1", "2"] if participant == "sub-p0" else ["n/a"]
        for session in sessions:
            row = {"participant_id": participant, "session_id": session, "group": group,
                   "model_role": "test"}
            burden.append({**row, **{m: level + rng.normal(0, 0.3) for m in GLOBAL_MEASURES}})
            for region, source in (("brain", "brain"), ("WM", "tissue"), ("left", "atlas")):
                regions.append({**row, "region": region, "source": source,
                                "mean_score": level + rng.normal(0, 0.3),
                                "abnormal_percent": rng.random()})
    return ModelResults("m", pd.DataFrame(burden), pd.DataFrame(regions), pd.DataFrame())


def test_statistics_average_sessions_and_adjust_p_values():
    results = _results()
    table = group_statistics(results, "healthy", n_boot=200, seed=0)
    comparisons = {"MS": 5, "stroke": 4, "all patients": 9}
    assert set(table["patients"]) == set(comparisons)
    assert set(table["region"]) == {"global", "tissue:WM", "atlas:left"}  # brain is global
    for patients, count in comparisons.items():
        rows = table[table["patients"] == patients]
        assert len(rows) == len(GLOBAL_MEASURES) + 2 * 2
        assert (rows["n_patients"] == count).all() and (rows["n_controls"] == 8).all()
        # Benjamini-Hochberg within each comparison, not over the whole table
        assert np.allclose(rows["p_fdr"], false_discovery_control(rows["p_value"], method="bh"))
    pooled = false_discovery_control(table["p_value"], method="bh")
    assert not np.allclose(table["p_fdr"], pooled)
    assert (table["p_fdr"] >= table["p_value"] - 1e-12).all()
    # sub-p0's two sessions count once, as their mean
    burden = results.burden
    patients = burden[burden.group == "MS"].groupby("participant_id")["mean_score"].mean()
    controls = burden[burden.group == "healthy"]["mean_score"]
    row = table[(table.patients == "MS") & (table.region == "global")
                & (table.measure == "mean_score")].iloc[0]
    assert row["p_value"] == pytest.approx(mannwhitneyu(patients, controls).pvalue)


def test_no_statistics_without_both_groups():
    results = _results()
    assert group_statistics(results, None, 100, 0).empty
    results.burden = results.burden[results.burden.group != "healthy"]
    assert group_statistics(results, "healthy", 100, 0).empty
