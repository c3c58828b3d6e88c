"""The embedded default, end to end, through the console script as a user runs it."""

import json
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.reports.test_viewer import FLAGS, _chromium

pytestmark = pytest.mark.slow


def _pages_in_a_browser(results, tmp_path):
    """The patient's page and the group page in headless Chromium, the network blocked.

    The patient's viewers all start (WebGL on SwiftShader), the page requests nothing, and
    the screenshots are kept beside the test's output (``demo/*.png``) for a look.
    """
    if _chromium() is None:
        return
    from PIL import Image

    for page, height in ((results / "sub-patient01.html", 3000),
                         (results / "group" / "report.html", 2400)):
        shot = tmp_path / f"{page.stem}.png"
        netlog = tmp_path / f"{page.stem}.netlog.json"
        dom = subprocess.run(
            [_chromium(), *FLAGS, f"--window-size=1300,{height}", f"--screenshot={shot}",
             f"--log-net-log={netlog}", "--dump-dom", "--virtual-time-budget=5000",
             page.as_uri()], capture_output=True, text=True, timeout=300, check=True).stdout
        log = json.loads(netlog.read_text())
        start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        assert not [e for e in log["events"] if e["type"] == start
                    and e.get("params", {}).get("initiator") not in (None, "not an origin")]
        image = np.asarray(Image.open(shot).convert("L"), dtype=float)
        assert image.std() > 30  # text, tables, the lightbox and the viewers
        if page.name == "report.html":
            assert "Models compared" in dom and 'href="../sub-patient01.html"' in dom
        else:
            assert dom.count('data-ready="true"') == 3  # one viewer per model, all started
            assert (image[:1500] < 40).mean() > 0.1  # the lightbox's black background on top


def test_demo_runs_and_finds_the_lesions(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        ["bids_anomaly", "demo", str(out), "--healthy", "4", "--patients", "1", "--nprocs", "2"],
        # about 2 minutes on 2 idle cores
        capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report" in result.stdout
    results = out / "derivatives" / "bids_anomaly"
    for model in ("normative", "gmm"):
        evaluation = pd.read_csv(results / "group" / f"desc-{model}_evaluation.tsv", sep="\t")
        assert evaluation["participant_id"].tolist() == ["sub-patient01"]
        # synthetic lesions are far brighter than healthy tissue in FLAIR: well above chance
        # (the T1w + FLAIR Gaussian mixture of 3 controls: 0.88 here)
        assert evaluation.loc[0, "auroc"] > (0.95 if model == "normative" else 0.8)
        subjects = pd.read_csv(results / "group" / f"desc-{model}_subjects.tsv", sep="\t")
        assert len(subjects) == 5
    normative = pd.read_csv(results / "group" / "desc-normative_evaluation.tsv", sep="\t")
    assert normative.loc[0, "dice"] > 0.3
    report = (results / "group" / "report.html").read_text()
    assert report.count("<table") >= 4
    assert "Patients vs controls" in report and report.count("data:image/png") == 15  # 3 x 5
    page = (results / "sub-patient01.html").read_text()
    assert "model normative: result" in page and "clusters: all of them." in page
    _pages_in_a_browser(results, tmp_path)
    assert "lesion_sensitivity" in evaluation.columns
    statistics = pd.read_csv(results / "group" / "desc-normative_statistics.tsv", sep="\t")
    assert {"auroc", "hedges_g", "p_value"} <= set(statistics.columns)
    assert {"global", "tissue:WM"} <= set(statistics["region"])
    summary = pd.read_csv(results / "group" / "desc-normative_evaluationsummary.tsv", sep="\t")
    assert (summary["ci_low"].isna() | (summary["ci_low"] <= summary["mean"])).all()
    assert len(list(results.glob("sub-*/anat/*_desc-normative_regions.tsv"))) == 5
    # native-space copies on the raw T1w's grid
    raw = nib.load(out / "rawdata" / "sub-patient01" / "anat" / "sub-patient01_T1w.nii.gz")
    native = nib.load(results / "sub-patient01" / "anat"
                      / "sub-patient01_space-T1w_label-anomaly_desc-normative_mask.nii.gz")
    assert native.shape == raw.shape and np.allclose(native.affine, raw.affine, atol=1e-3)
    assert set(np.unique(np.asarray(native.dataobj))) == {0, 1}
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    assert "[Node] Finished" in (results / "logs" / "pypeline.log").read_text()
    # preprocessing, then the three models in one run
    assert len(list((results / "logs").glob("*_participant/bids_anomaly.toml"))) == 2
    # microbleeds on the T2*-weighted image: candidates per subject, evaluated per lesion
    bleeds = pd.read_csv(results / "group" / "desc-microbleeds_microbleeds.tsv", sep="\t")
    assert bleeds["participant_id"].tolist() == ["sub-patient01"]
    assert bleeds.loc[0, "sensitivity"] >= 0.6 and bleeds.loc[0, "fp"] <= 5
    assert "microbleed FROC" in report or "Microbleeds: lesion-wise detection" in report
    candidates = pd.read_csv(next(results.glob(
        "sub-patient01/anat/*_desc-microbleeds_microbleeds.tsv")), sep="\t")
    assert {"x", "x_native", "radius_mm", "score", "region", "kept"} <= set(candidates.columns)
    assert set(candidates["region"]) <= {"lobar", "deep", "infratentorial", "outside"}
    sidecar = json.loads(next(results.glob(
        "sub-patient01/anat/*_desc-microbleeds_microbleeds.json")).read_text())
    assert sidecar["Channel"] == "T2starw" and "Units" in sidecar["radius_mm"]
    assert "FalsePositivesPerControl" in sidecar and "kept" in sidecar

    # a second run with the same folder redoes nothing: no model refitted, no map rescored,
    # no derivative, table or report rewritten
    def times() -> dict:
        return {p: p.stat().st_mtime_ns for p in results.rglob("*")
                if p.is_file() and "logs" not in p.parts}

    before = times()
    again = subprocess.run(["bids_anomaly", "demo", str(out), "--healthy", "4", "--patients",
                            "1", "--nprocs", "2"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert times() == before
    # participant twice (preprocessing; the three models in one run), 3 x (train + check),
    # group
    assert again.stderr.count("up to date") == 9
    assert (pd.read_csv(results / "group" / "desc-normative_evaluation.tsv", sep="\t")
            .equals(normative))

    # a deep model through the same command line, scored by the participant level
    rawdata, work = out / "rawdata", out / "work"
    common = ["-w", str(work), "--nprocs", "2", "--device", "cpu", "--omp-nthreads", "1",
              "--sloppy"]  # as the demo preprocessed: nothing is preprocessed again
    trained = subprocess.run(
        ["bids_anomaly", str(rawdata), str(results), "train", "--model-type", "dae",
         "--train-filter", "group=healthy", "--epochs", "2", "--width", "8", *common],
        capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (work / "train" / "model-dae" / "losses.tsv").read_text().count("\n") == 3
    scored = subprocess.run(
        ["bids_anomaly", str(rawdata), str(results), "participant", "--model", "dae", *common],
        capture_output=True, text=True, timeout=900)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert len(list(results.glob("sub-*/anat/*_res-2_desc-dae_stat-anomaly_statmap.nii.gz"))) == 5
    for model in ("normative", "dae"):  # every scored subject has its clusters table
        tables = list(results.glob(f"sub-*/anat/*_desc-{model}_clusters.tsv"))
        assert len(tables) == 5
        patient = pd.read_csv(next(t for t in tables if "patient01" in t.name), sep="\t")
        assert {"volume_mm3", "peak_score", "centroid_x", "tissue"} <= set(patient.columns)
        assert "Description" in json.loads(tables[0].with_suffix(".json").read_text())[
            "volume_mm3"]
    card = json.loads((results / "models" / "model-dae" / "model.json").read_text())
    for channel in card["channels"]:  # each channel's residual, next to the combined map
        maps = list(results.glob(f"sub-*/anat/*_desc-dae{channel}_stat-residual_statmap.nii.gz"))
        assert len(maps) == 5
