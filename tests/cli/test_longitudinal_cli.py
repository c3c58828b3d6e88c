"""``participant --longitudinal`` and the group's change evaluation, end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_anomaly.cli.run import main
from tests.conftest import tree_digest


def _write_sessions(root: Path, subjects: dict[str, dict[str, dict]]) -> Path:
    """A BIDS dataset with sessions: ``{subject: {session: {suffix: image}}}``."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "sessions", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    rows = ["participant_id\tgroup"]
    for subject, sessions in subjects.items():
        for session, images in sessions.items():
            anat = root / f"sub-{subject}" / f"ses-{session}" / "anat"
            anat.mkdir(parents=True)
            for suffix, image in images.items():
                image.to_filename(anat / f"sub-{subject}_ses-{session}_{suffix}.nii.gz")
        rows.append(f"sub-{subject}\tpatient")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_new_lesions_between_sessions_of_other_grids_and_the_group_evaluation(tmp_path):
    """Session 2 has every lesion new, its FLAIR on 2 x 2 x 4 mm axial slices stored LPS."""
    from bids_anomaly.simulation.synthetic import synthetic_subject

    before = synthetic_subject(31, lesions=False)
    after = synthetic_subject(31, lesions=True, thick_flair=True, orientation="LPS")
    bids_dir = _write_sessions(tmp_path / "bids", {
        "long": {"1": {m: before[m] for m in ("T1w", "FLAIR")},
                 "2": {m: after[m] for m in ("T1w", "FLAIR")}},
    })
    truth_dir = tmp_path / "truth"
    truth = truth_dir / "sub-long" / "ses-2" / "anat" / "sub-long_ses-2_label-change_mask.nii.gz"
    truth.parent.mkdir(parents=True)
    after["lesion_mask"].to_filename(truth)
    digest = tree_digest(bids_dir)
    out = tmp_path / "out"
    command = [str(bids_dir), str(out), "participant", "--longitudinal", "--nprocs", "2",
               "--omp-nthreads", "1", "--random-seed", "5", "--sloppy"]
    assert main(command) == 0
    anat = out / "sub-long" / "ses-2" / "anat"
    name = "sub-long_ses-2_space-FLAIR_desc-since1"
    native = nib.load(anat / f"{name}_stat-change_statmap.nii.gz")
    assert native.shape == after["FLAIR"].shape  # the later session's raw FLAIR grid
    classes = np.asarray(nib.load(anat / f"{name}_dseg.nii.gz").dataobj)
    assert set(np.unique(classes)) <= {0, 1, 2, 3}
    template = "sub-long_ses-2_space-MNI152NLin2009aSym_res-2_desc-since1"
    for suffix in ("stat-change_statmap.nii.gz", "dseg.nii.gz"):
        assert (anat / f"{template}_{suffix}").is_file()
    assert (anat / "sub-long_ses-2_space-MNI152NLin2009aSym_res-2_label-change_desc-"
                   "since1_mask.nii.gz").is_file()
    clusters = pd.read_csv(anat / "sub-long_ses-2_desc-since1_clusters.tsv", sep="\t")
    assert (clusters["change"] == "new").sum() >= 1
    summary = pd.read_csv(out / "sub-long" / "anat" / "sub-long_desc-lesions_change.tsv",
                          sep="\t", dtype={"earlier": str, "later": str})
    assert summary.loc[0, "new_ml"] > 0.5  # the generated lesions add up to 2 ml at least
    sidecar = json.loads((anat / f"{name}_stat-change_statmap.json").read_text())
    assert sidecar["EarlierSession"] == "1" and sidecar["Contrast"] == "FLAIR"
    assert (out / "sub-long" / "figures" / "sub-long_ses-2_desc-since1_stat-change_"
                                           "lightbox.png").is_file()
    assert "Lesion change: session 1 to 2" in (out / "sub-long.html").read_text()
    # every session is scored on its own too (the tissue model)
    assert list((out / "sub-long" / "ses-1" / "anat").glob("*tissuesingle_stat-anomaly*"))
    # a second run resumes from the cache: the same bytes
    first = _sha(anat / f"{name}_stat-change_statmap.nii.gz")
    assert main(command) == 0
    assert _sha(anat / f"{name}_stat-change_statmap.nii.gz") == first
    # the group level: change counts, and the change maps against the change mask
    assert main([str(bids_dir), str(out), "group", "--ground-truth", str(truth_dir)]) == 0
    evaluation = pd.read_csv(out / "group" / "desc-change_changeevaluation.tsv", sep="\t")
    assert evaluation.loc[0, "auprc"] > 0.5 and evaluation.loc[0, "grid"] == "template"
    assert evaluation.loc[0, "lesion_sensitivity"] > 0.5
    changes = pd.read_csv(out / "group" / "desc-change_changes.tsv", sep="\t")
    assert changes["participant_id"].tolist() == ["sub-long"]
    assert (out / "group" / "desc-change_changesummary.tsv").is_file()
    assert "Lesion change between sessions" in (out / "group" / "report.html").read_text()
    assert tree_digest(bids_dir) == digest
    from bids_anomaly.bids.validation import find_validator, run_validator

    if find_validator() is not None:  # the derivatives validate (the official validator)
        report = run_validator(out)
        errors = [issue for issue in report["issues"]["issues"]
                  if issue["severity"] == "error"]
        assert not errors, errors[:5]


def test_longitudinal_is_a_participant_option(tiny_bids, tmp_path, capsys):
    assert main([str(tiny_bids), str(tmp_path / "out"), "train", "--longitudinal"]) == 2
    assert "--longitudinal" in capsys.readouterr().err


def test_subjects_with_one_session_or_no_lesion_contrast_are_noted(tmp_path):
    from bids_anomaly import bids
    from bids_anomaly.workflows.longitudinal import subject_sessions

    def inputs(subject, session, *modalities):
        return bids.AnatInputs(subject, session, images={
            m: tmp_path / f"sub-{subject}_ses-{session}_{m}.nii.gz" for m in modalities})

    subjects = [inputs("one", "1", "T1w", "FLAIR"),
                inputs("t1only", "1", "T1w"), inputs("t1only", "2", "T1w"),
                inputs("three", "b", "T1w", "FLAIR"), inputs("three", "a", "T1w", "FLAIR"),
                inputs("three", "c", "T1w"), inputs("t2", "1", "T2w"), inputs("t2", "2", "T2w")]
    chosen, notes = subject_sessions(subjects)
    assert [i.session for i in chosen["three"]] == ["a", "b"]
    assert [i.session for i in chosen["t2"]] == ["1", "2"]
    assert set(chosen) == {"three", "t2"}
    assert "sub-one has one session" in " ".join(notes)
    assert any(n.startswith("sub-t1only: fewer than two sessions") for n in notes)
    assert any("sub-three: sessions without FLAIR" in n and n.endswith("c") for n in notes)
