"""The group and participant reports: self-contained HTML, rendered by headless Chromium."""

import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_anomaly.evaluation.group import ModelResults
from bids_anomaly.reports.figures import peak_coordinates, plot_anomaly_overlay
from bids_anomaly.reports.group import write_group_report

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
AFFINE[:3, 3] = -40


def _images(tmp_path, index):
    """A generated head-like volume, an anomaly map with a bright blob, and its mask."""
    grid = np.indices((20, 20, 20)).astype(float)
    radius = np.sqrt(((grid - 9.5) ** 2).sum(0))
    anatomy = np.where(radius < 8, 100 + 20 * np.cos(radius), 0).astype(np.float32)
    scores = np.where(radius < 8, np.random.default_rng(index).normal(1, 0.2, radius.shape), 0)
    blob = np.sqrt(((grid - np.array([6, 12, 10 + index])[:, None, None, None]) ** 2).sum(0))
    scores = (scores + 8 * (blob < 2)).astype(np.float32)
    paths = {}
    for name, data in (("anat", anatomy), ("map", scores),
                       ("mask", (scores > 4).astype(np.uint8))):
        paths[name] = tmp_path / f"sub-{index}_{name}.nii.gz"
        nib.Nifti1Image(data, AFFINE).to_filename(paths[name])
    return paths


def _results(tmp_path) -> ModelResults:
    overlays, burden, evaluation, curves = {}, [], [], {}
    for index in range(3):
        paths = _images(tmp_path, index)
        name = f"sub-{index:02d}"
        overlays[name, "n/a"] = plot_anomaly_overlay(paths["anat"], paths["map"], paths["mask"],
                                              tmp_path / f"{name}.png", title=name,
                                              threshold=4.0)
        burden.append({"participant_id": name, "session_id": "n/a",
                       "group": "healthy" if index < 2 else "MS", "model_role": "test",
                       "abnormal_ml": 1.0 + index, "n_clusters": 1 + index,
                       "mean_score": 1.0 + 0.1 * index, "p99_score": 5.0 + index})
        curves[name] = {"fpr": np.linspace(0, 1, 10), "tpr": np.linspace(0, 1, 10) ** 0.3,
                        "recall": np.linspace(1, 0, 10), "precision": np.linspace(0.2, 1, 10),
                        "auroc": 0.9, "auprc": 0.6}
        evaluation.append({"participant_id": name, "group": "MS", "dice": 0.5, "auroc": 0.9})
    summary = pd.DataFrame([{"group": "all", "metric": "dice", "n": 3, "mean": 0.5, "sd": 0.0,
                             "ci_low": 0.5, "ci_high": 0.5}])
    statistics = pd.DataFrame([{
        "patients": "MS", "controls": "healthy", "region": "global", "measure": "abnormal_ml",
        "n_patients": 1, "n_controls": 2, "patients_mean": 3.0, "controls_mean": 1.5,
        "auroc": 1.0, "auroc_ci_low": float("nan"), "auroc_ci_high": float("nan"),
        "hedges_g": float("nan"), "p_value": 0.67, "p_fdr": 0.67}])
    regions = pd.DataFrame([{"participant_id": "sub-00", "group": "healthy", "region": "WM",
                             "source": "tissue", "mean_score": 1.0, "abnormal_percent": 0.5}])
    return ModelResults("test", pd.DataFrame(burden), regions, pd.DataFrame(evaluation),
                        curves=curves, overlays=overlays, summary=summary,
                        statistics=statistics, control="healthy")


def test_overlay_cuts_through_the_peak(tmp_path):
    paths = _images(tmp_path, 1)
    x, y, z = peak_coordinates(paths["map"], paths["mask"])
    assert (x, y, z) == pytest.approx((6 * 4 - 40, 12 * 4 - 40, 11 * 4 - 40), abs=8)


def test_group_report_is_self_contained(tmp_path):
    page = write_group_report(tmp_path / "group" / "report.html", [_results(tmp_path)])
    text = page.read_text()
    for section in ("Evaluation against the ground truth", "Patients vs controls",
                    "Regional burden", "Anomaly maps"):
        assert section in text
    assert text.count("<img src=\"data:image/png;base64,") == 3  # one overlay per subject
    assert text.count("<img src=\"data:image/svg+xml;base64,") == 3  # curves, boxes, ROC
    # nothing loads from elsewhere: no external source, stylesheet or script
    assert not re.search(r"src=[\"'](?!data:)", text)
    # links lead only to the participant pages beside the group folder
    assert set(re.findall(r"href=\"([^\"]*)\"", text)) == {"../sub-00.html", "../sub-01.html",
                                                          "../sub-02.html"}
    assert "<script src" not in text and "<link" not in text and text.count("<script>") == 1


def _chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser",
                                                 "google-chrome") if shutil.which(name)), None)


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (Debian: apt install chromium)")
def test_group_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    page = write_group_report(tmp_path / "group" / "report.html", [_results(tmp_path)])
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--disable-dev-shm-usage", "--no-first-run", f"--screenshot={shot}",
         "--window-size=1200,3000", page.as_uri()],
        capture_output=True, timeout=120, check=True)
    image = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert image.shape == (3000, 1200)
    # the page is not blank: text and tables near the top, dark overlays further down
    top, rest = image[:600], image[600:]
    assert (top < 128).mean() > 0.005
    dark = (image < 40).mean(axis=1)  # rows mostly black: the overlays' black background
    assert (dark > 0.3).sum() > 100
    assert rest.std() > 30


def test_large_cohorts_show_the_largest_abnormal_volumes(tmp_path, monkeypatch):
    from bids_anomaly.reports import group

    monkeypatch.setattr(group, "MAX_OVERLAYS", 2)
    results = _results(tmp_path)  # abnormal_ml 1, 2, 3 for sub-00, 01, 02
    text = write_group_report(tmp_path / "report.html", [results]).read_text()
    assert text.count("data:image/png") == 2
    assert "sub-02.png" in text and "sub-01.png" in text and "sub-00.png" not in text
    assert "the other 1 are in their own pages" in text


def test_group_report_shows_the_lesion_change(tmp_path):
    import pandas as pd

    changes = {"changes": pd.DataFrame([{"participant_id": "sub-01", "earlier": "1",
                                         "later": "2", "new_count": 3, "new_ml": 0.4}]),
               "changeevaluation": pd.DataFrame([{"participant_id": "sub-01", "auprc": 0.61}])}
    text = write_group_report(tmp_path / "group" / "report.html", [_results(tmp_path)],
                              changes=changes).read_text()
    assert "Lesion change between sessions" in text and "0.61" in text
    bare = write_group_report(tmp_path / "other" / "report.html", [_results(tmp_path)])
    assert "Lesion change" not in bare.read_text()
