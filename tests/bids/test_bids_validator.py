"""The official BIDS validator runs before any work: errors exit 16, warnings are logged.

Tests that run ``bids-validator-deno`` skip when it is not installed; those of the fallback and
of the message run everywhere. Every test caches validation results in its own folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_anomaly import bids
from bids_anomaly.bids import validation
from bids_anomaly.cli.run import main
from bids_anomaly.errors import BIDSValidationError
from tests.conftest import tree_digest, write_minimal_bids

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"

needs_validator = pytest.mark.skipif(validation.find_validator() is None,
                                     reason="bids-validator-deno is not installed")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Validation results of this test only (nothing written to ~/.cache)."""
    folder = tmp_path / "validation-cache"
    monkeypatch.setenv(validation.CACHE_ENV, str(folder))
    return folder


def _report(*issues: tuple[str, str, str]) -> dict:
    """A validator report of (code, severity, location) issues."""
    return {"issues": {"issues": [{"code": code, "severity": severity, "location": location}
                                  for code, severity, location in issues],
                       "codeMessages": {}}, "summary": {}}


def _fake_validator(monkeypatch, report: dict) -> list[Path]:
    """Replace the validator by one answering ``report``; returns the datasets it saw."""
    calls: list[Path] = []

    def run(bids_dir, command=None, timeout=None):
        calls.append(Path(bids_dir))
        return report

    monkeypatch.setattr(validation, "run_validator", run)
    return calls


# ------------------------------------------------------------------------ the real validator

@needs_validator
@pytest.mark.parametrize("bad", ["sub-01/anat/sub-01_T1weighted.nii.gz",
                                 "sub-01/anat/sub01_T1w.nii.gz"])
def test_invalid_file_name_exits_16_naming_file_and_code(bad, tiny_bids, tmp_path, capsys):
    (tiny_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").rename(tiny_bids / bad)
    before = tree_digest(tiny_bids)
    out = tmp_path / "out"
    assert main([str(tiny_bids), str(out), "participant"]) == 16
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert bad in err and "BIDS validator found" in err
    assert any(code in err for code in ("NOT_INCLUDED", "ENTITY_WITH_NO_LABEL",
                                        "FILENAME_MISMATCH", "INVALID_LOCATION")), err
    assert "use --skip-bids-validation to go on anyway" in err
    report = Path(err.split("(full report: ")[1].split(")")[0])
    assert json.loads(report.read_text())["issues"]["issues"]
    assert tiny_bids not in report.parents
    assert tree_digest(tiny_bids) == before and not out.exists()
    # past the validation, the run goes on (here to the unknown label: 18)
    code = main([str(tiny_bids), str(out), "participant", "--skip-bids-validation",
                 "--participant-label", "zz"])
    assert code != 16 and code == 18
    assert tree_digest(tiny_bids) == before


@needs_validator
def test_invalid_participants_tsv_and_dwi_without_bval_exit_16(tiny_bids, tmp_path, capsys):
    (tiny_bids / "participants.tsv").write_bytes(b"")
    dwi = tiny_bids / "sub-01" / "dwi"
    dwi.mkdir()
    nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)).to_filename(
        dwi / "sub-01_dwi.nii.gz")
    (dwi / "sub-01_dwi.bvec").write_text("0 1 0\n0 0 1\n0 0 0\n")
    assert main([str(tiny_bids), str(tmp_path / "out"), "participant"]) == 16
    err = capsys.readouterr().err
    assert "EMPTY_FILE (participants.tsv)" in err
    assert "DWI_MISSING_BVAL (sub-01/dwi/sub-01_dwi.nii.gz)" in err


@needs_validator
@pytest.mark.parametrize("name", ["bids_real", "bids_dwi"])
def test_shared_datasets_validate_clean(name, cache_dir, caplog):
    dataset = SHARED / name
    if not dataset.is_dir():
        pytest.skip(f"../shared/data/{name} is not available")
    caplog.set_level("INFO", logger="bids_anomaly")
    result = validation.validate_dataset(dataset, bids.dataset_signature(dataset),
                                         exempt=bids.UNRELEASED_SUFFIXES, cache_dir=cache_dir)
    assert result is not None and not result.cached and result.errors == []
    caplog.clear()
    bids.check_bids_dir(dataset, cache_dir=cache_dir)  # the cached result: no second run
    assert "cached result" in caplog.text and "not run" not in caplog.text


@needs_validator
def test_generated_datasets_are_valid_bids(tiny_bids, tmp_path, monkeypatch):
    from bids_anomaly.simulation import synthetic

    def small_subject(seed, lesions=False, *, orientation="RAS", thick_flair=False,
                      microbleeds=0):  # the layout and metadata are validated, not the images
        image = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4))
        points = pd.DataFrame([{"x": 1.0, "y": 2.0, "z": 3.0, "radius_mm": 1.5,
                                "region": "deep"}] * microbleeds,
                              columns=list(synthetic.MICROBLEED_COLUMNS))
        return {**dict.fromkeys(synthetic.MODALITIES, image), "lesion_mask": image,
                "brain_mask": image, "microbleed_mask": image, "microbleed_points": points}

    monkeypatch.setattr(synthetic, "synthetic_subject", small_subject)
    demo = synthetic.generate_demo_dataset(tmp_path / "demo", n_healthy=1, n_patients=1,
                                           modalities=synthetic.MODALITIES, microbleeds=True)
    for dataset in (tiny_bids, demo):
        result = validation.validate_dataset(dataset, exempt=bids.UNRELEASED_SUFFIXES)
        assert result is not None and result.errors == [], (dataset, result)


@needs_validator
def test_swi_is_read_although_the_schema_does_not_know_it(tmp_path, monkeypatch, caplog):
    image = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    write_minimal_bids(tmp_path / "bids", {"01": {"T1w": image, "part-mag_swi": image}})
    caplog.set_level("INFO", logger="bids_anomaly")
    monkeypatch.chdir(tmp_path)
    bids.check_bids_dir(Path("bids"))  # a relative path works too
    assert "sub-01_part-mag_swi.nii.gz: not in the released BIDS schema" in caplog.text


@needs_validator
@pytest.mark.skipif(shutil.which("unshare") is None
                    or subprocess.run(["unshare", "-rn", "true"], capture_output=True
                                      ).returncode != 0,
                    reason="cannot block the network here (unshare -rn)")
def test_validator_runs_without_network(tiny_bids):
    command = validation.find_validator()
    done = subprocess.run(["unshare", "-rn", *command, *validation.VALIDATOR_FLAGS,
                           str(tiny_bids)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["issues"]["issues"]


# ------------------------------------------------------------------------ fallback and cache

def test_missing_validator_warns_and_falls_back(tiny_bids, monkeypatch, caplog):
    import importlib.util

    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda *args, **kwargs: None)
    assert validation.find_validator() is None
    (tiny_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").rename(
        tiny_bids / "sub-01" / "anat" / "sub-01_T1weighted.nii.gz")  # only the validator sees
    bids.check_bids_dir(tiny_bids)
    assert "BIDS validator not run" in caplog.text and "not installed" in caplog.text
    # the hand-made checks still stand
    shutil.rmtree(tiny_bids / "sub-01")
    shutil.rmtree(tiny_bids / "sub-02")
    with pytest.raises(BIDSValidationError, match="no sub-\\* folder"):
        bids.check_bids_dir(tiny_bids)


@pytest.mark.parametrize("script, words", [
    ("import sys; print('boom', file=sys.stderr); sys.exit(3)", "exit code 3: boom"),
    ("import time; time.sleep(30)", "did not finish within 0.5 s"),
    ("print('not json')", "failed"),
])
def test_validator_that_fails_is_reported_and_skipped(script, words, tiny_bids, cache_dir,
                                                      monkeypatch, caplog):
    monkeypatch.setattr(validation, "find_validator", lambda: [sys.executable, "-c", script])
    assert bids.check_bids_dir(tiny_bids, timeout=0.5) is None
    assert "BIDS validator not run" in caplog.text and words in caplog.text
    assert not list(cache_dir.glob("*.json"))  # a failure is not cached


def test_result_is_cached_outside_the_dataset_until_it_changes(tiny_bids, cache_dir,
                                                               monkeypatch, caplog):
    caplog.set_level("INFO", logger="bids_anomaly")
    calls = _fake_validator(monkeypatch, _report(("README_FILE_MISSING", "warning", "/")))
    before = tree_digest(tiny_bids)
    bids.check_bids_dir(tiny_bids)
    bids.check_bids_dir(tiny_bids)
    assert len(calls) == 1 and len(list(cache_dir.glob("*.json"))) == 1
    assert caplog.text.count("1 warning: README_FILE_MISSING") == 2
    (tiny_bids / "README").write_text("changed\n")
    bids.check_bids_dir(tiny_bids)
    assert len(calls) == 2
    (tiny_bids / "README").unlink()
    assert tree_digest(tiny_bids) == before
    # a cache folder inside the dataset is never written
    inside = tiny_bids / "cache"
    bids.check_bids_dir(tiny_bids, cache_dir=inside)
    assert not inside.exists()


def test_errors_make_one_line_with_codes_files_and_report(tiny_bids, tmp_path, monkeypatch):
    issues = [("NOT_INCLUDED", "error", f"/sub-0{i}/anat/x{i}.nii.gz") for i in range(1, 5)]
    issues += [("PARTICIPANT_ID_MISMATCH", "error", "/participants.tsv"),
               ("EMPTY_FILE", "error", "/README"), ("TSV_COLUMN_MISSING", "error", "/a.tsv"),
               ("NOT_INCLUDED", "error", "/sub-01/anat/x1.nii.gz"),
               ("SIDECAR_KEY_RECOMMENDED", "warning", "/sub-01/anat/sub-01_T1w.nii.gz"),
               ("NOT_INCLUDED", "error", "/sub-01/anat/sub-01_part-mag_swi.nii.gz")]
    calls = _fake_validator(monkeypatch, _report(*issues))
    report = tmp_path / "logs" / "validation.json"
    with pytest.raises(BIDSValidationError) as refused:
        bids.check_bids_dir(tiny_bids, report_path=report)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{tiny_bids} is not valid BIDS")
    assert "found 8 errors in 7 files: NOT_INCLUDED (sub-01/anat/x1.nii.gz, " \
           "sub-02/anat/x2.nii.gz, ...); PARTICIPANT_ID_MISMATCH (participants.tsv); " \
           "EMPTY_FILE (README); and 1 more code" in message
    assert f"(full report: {report})" in message and "swi" not in message
    assert message.endswith("use --skip-bids-validation to go on anyway")
    assert json.loads(report.read_text()) == _report(*issues)
    # refused again from the cache, with the same message
    with pytest.raises(BIDSValidationError) as again:
        bids.check_bids_dir(tiny_bids)
    assert str(again.value) == message and len(calls) == 1


def test_skip_validation_runs_no_validator(tiny_bids, monkeypatch):
    calls = _fake_validator(monkeypatch, _report(("NOT_INCLUDED", "error", "/x")))
    bids.check_bids_dir(tiny_bids, skip_validation=True)
    assert calls == []
    with pytest.raises(BIDSValidationError, match="NOT_INCLUDED"):
        bids.check_bids_dir(tiny_bids)
