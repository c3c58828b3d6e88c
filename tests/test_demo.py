"""The embedded default, end to end, through the console script as a user runs it."""

import subprocess

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_and_finds_the_lesions(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        ["bids_anomaly", "demo", str(out), "--healthy", "4", "--patients", "1", "--nprocs", "2"],
        capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report" in result.stdout
    results = out / "derivatives" / "bids_anomaly"
    for model in ("normative", "gmm"):
        evaluation = pd.read_csv(results / "group" / f"desc-{model}_evaluation.tsv", sep="\t")
        assert evaluation["participant_id"].tolist() == ["sub-patient01"]
        # synthetic lesions are far brighter than healthy tissue in FLAIR: well above chance
        assert evaluation.loc[0, "auroc"] > 0.9
        subjects = pd.read_csv(results / "group" / f"desc-{model}_subjects.tsv", sep="\t")
        assert len(subjects) == 5
    normative = pd.read_csv(results / "group" / "desc-normative_evaluation.tsv", sep="\t")
    assert normative.loc[0, "dice"] > 0.3
    assert (results / "group" / "report.html").read_text().count("<table") >= 4
    # a second run with the same folder resumes: nothing is recomputed, same results
    again = subprocess.run(["bids_anomaly", "demo", str(out), "--healthy", "4", "--patients",
                            "1", "--nprocs", "2"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (pd.read_csv(results / "group" / "desc-normative_evaluation.tsv", sep="\t")
            .equals(normative))
