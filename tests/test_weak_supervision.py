"""train --annotations: bad inputs, the carried annotations, the tuned model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_anomaly import bids
from bids_anomaly.cli.run import main
from bids_anomaly.config import InputSettings, ModelSettings, Settings
from bids_anomaly.errors import BadDataError, MissingInputError
from bids_anomaly.imaging.template import get_template
from bids_anomaly.levels.annotations import annotations_in_template, check_annotations
from tests.conftest import tree_digest

COMMON = ["--nprocs", "1", "--omp-nthreads", "1", "--device", "cpu", "--sloppy"]


def _annotation(folder: Path, label: str, image: nib.Nifti1Image) -> Path:
    anat = folder / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    path = anat / f"sub-{label}_label-lesion_mask.nii.gz"
    image.to_filename(path)
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return get_template(2, tmp_path_factory.mktemp("templates"))


def test_annotation_errors_stop_training_before_any_work(tiny_bids, tmp_path, capsys):
    before = tree_digest(tiny_bids)
    out = tmp_path / "out"
    annotations = tmp_path / "annotations"
    mask = nib.Nifti1Image(np.ones((20, 20, 20), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    cases = [
        (["--annotations", str(tmp_path / "nowhere")], 66, "is not a folder"),
        (["--model-type", "stacked"], 2, "give --annotations"),
        (["--tune-objective", "lesion-f1"], 2, "--tune-objective needs --annotations"),
    ]
    for arguments, code, message in cases:
        assert main([str(tiny_bids), str(out), "train", *arguments, *COMMON]) == code
        assert message in capsys.readouterr().err
    annotations.mkdir()
    assert main([str(tiny_bids), str(out), "train", "--annotations", str(annotations),
                 *COMMON]) == 66
    assert "holds no lesion mask" in capsys.readouterr().err
    _annotation(annotations, "01", mask)
    _annotation(annotations, "07", mask)
    assert main([str(tiny_bids), str(out), "train", "--annotations", str(annotations),
                 *COMMON]) == 65
    error = capsys.readouterr().err
    assert "sub-07 is not in the dataset" in error and "Traceback" not in error
    assert not out.exists()  # refused before anything was written
    assert tree_digest(tiny_bids) == before


def test_annotated_participants_are_checked_against_the_dataset(tmp_path):
    mask = nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4))
    _annotation(tmp_path, "01", mask)
    (tmp_path / "sub-02" / "anat").mkdir(parents=True)
    nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)).to_filename(
        tmp_path / "sub-02" / "anat" / "sub-02_dseg.nii.gz")
    assert check_annotations(tmp_path, ["01", "02", "03"]) == ["01", "02"]
    with pytest.raises(BadDataError, match="sub-01, sub-02 are not in the dataset"):
        check_annotations(tmp_path, ["03"])


def _preprocessed(out: Path, label: str, template) -> Path:
    """A subject's template-space brain mask where the participant level writes it."""
    path = bids.spec_path(out, label, None, bids.brain_mask_spec(template.name,
                                                                 template.resolution))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.load(template.brain_mask).to_filename(path)
    return path


def _settings(tmp_path, annotations: Path) -> Settings:
    return Settings(inputs=InputSettings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                                         analysis_level="train"),
                    model=ModelSettings(annotations=annotations))


def test_annotations_are_carried_to_the_template_or_refused_with_a_reason(tmp_path, template):
    annotations = tmp_path / "annotations"
    settings = _settings(tmp_path, annotations)
    brain = nib.load(template.brain_mask)
    inside = np.zeros(brain.shape, np.uint8)
    inside[40:44, 50:54, 40:44] = 1
    raw = tmp_path / "raw_T1w.nii.gz"
    nib.Nifti1Image(np.ones((30, 30, 30), np.float32), np.eye(4)).to_filename(raw)
    subject = bids.AnatInputs("01", None, {"T1w": raw})
    # on the template grid: used as it is, with its healthy mask beside it
    _annotation(annotations, "01", nib.Nifti1Image(inside, brain.affine))
    _preprocessed(settings.output_dir, "01", template)
    carried = annotations_in_template(settings, [subject], template)
    lesion, healthy = (np.asarray(nib.load(p).dataobj) for p in carried["sub-01"])
    assert lesion.sum() == 64 and not (healthy & lesion).any()
    assert healthy.sum() < (np.asarray(brain.dataobj) > 0).sum() - 64  # a voxel around too
    # a subject without an annotation is a control; none annotated at all is an error
    other = bids.AnatInputs("02", None, {"T1w": raw})
    assert list(annotations_in_template(settings, [subject, other], template)) == ["sub-01"]
    with pytest.raises(MissingInputError, match="none of the selected participants"):
        annotations_in_template(settings, [other], template)
    # empty inside the brain
    _annotation(annotations, "01", nib.Nifti1Image(np.zeros(brain.shape, np.uint8),
                                                   brain.affine))
    with pytest.raises(BadDataError, match="marks no lesion voxel"):
        annotations_in_template(settings, [subject], template)
    # on a grid that is neither the template's nor the raw image's
    _annotation(annotations, "01", nib.Nifti1Image(np.ones((7, 7, 7), np.uint8), np.eye(4)))
    with pytest.raises(BadDataError, match="neither the template's nor that of any raw image"):
        annotations_in_template(settings, [subject], template)
    # never preprocessed
    _annotation(annotations, "02", nib.Nifti1Image(inside, brain.affine))
    with pytest.raises(MissingInputError, match="sub-02 is annotated but was not preprocessed"):
        annotations_in_template(settings, [other], template)


@pytest.mark.slow
def test_a_flair_threshold_tuned_on_annotated_patients_scores_a_new_one(tmp_path):
    """The simplest use: three T1w + FLAIR patients, two annotated on their raw T1w grid."""
    from bids_anomaly.simulation.synthetic import generate_demo_dataset

    rawdata = generate_demo_dataset(tmp_path / "raw", n_healthy=0, n_patients=3,
                                    modalities=("T1w", "FLAIR"))
    truth = rawdata / "derivatives" / "lesion_masks"
    before = tree_digest(rawdata)
    out = tmp_path / "out"
    assert main([str(rawdata), str(out), "train", "--model-type", "intensity", "--channels",
                 "FLAIR", "--participant-label", "patient01", "patient02", "--annotations",
                 str(truth), "--model-name", "flair", *COMMON]) == 0
    card = json.loads((out / "models" / "model-flair" / "model.json").read_text())
    tuned = card["extra"]["weak_supervision"]
    assert tuned["annotated_participants"] == ["sub-patient01", "sub-patient02"]
    assert "annotated subjects outside their lesions" in tuned["healthy_voxels"]
    assert card["threshold"] == tuned["threshold"] and 0 < card["fpr"] < 1
    assert [s["subject"] for s in tuned["cv_subjects"]] == tuned["annotated_participants"]
    assert tuned["training_objective"] >= tuned["label_free"]["dice"] - 0.01
    assert card["extra"]["postprocessing"]["restrict"] in ("brain", "wm")
    # a supervised stack on the same two annotated patients (out-of-fold tuning)
    assert main([str(rawdata), str(out), "train", "--model-type", "stacked", "--channels",
                 "T1w", "FLAIR", "--participant-label", "patient01", "patient02",
                 "--annotations", str(truth), "--healthy-voxels", "2000",
                 "--tune-objective", "lesion-f1", *COMMON]) == 0
    stacked = json.loads((out / "models" / "model-stacked" / "model.json").read_text())
    assert stacked["extra"]["weak_supervision"]["tuned_on"].startswith("out-of-fold")
    assert stacked["extra"]["weak_supervision"]["objective"] == "lesion-f1"
    # a self-supervised network learning the annotated lesions too, then fine-tuned from it
    deep = ["--channels", "T1w", "FLAIR", "--participant-label", "patient01", "patient02",
            "--annotations", str(truth), "--epochs", "1", "--width", "4", *COMMON]
    assert main([str(rawdata), str(out), "train", "--model-type", "segment", "--model-name",
                 "seg", *deep]) == 0
    seg = json.loads((out / "models" / "model-seg" / "model.json").read_text())
    assert seg["extra"]["weak_supervision"]["tuned_on"].startswith("nothing: the network")
    assert seg["extra"]["postprocessing"] == {"min_cluster_mm3": 0.0, "restrict": "brain"}
    assert main([str(rawdata), str(out), "train", "--model-type", "segment", "--model-name",
                 "seg2", "--finetune", "seg", *deep]) == 0
    seg2 = json.loads((out / "models" / "model-seg2" / "model.json").read_text())
    assert seg2["hyperparameters"]["finetune"] == "seg"
    # the new patient is scored with the tuned threshold and post-processing
    assert main([str(rawdata), str(out), "participant", "--model", "flair", *COMMON]) == 0
    sidecar = json.loads(next(out.glob(
        "sub-patient03/anat/*_res-2_desc-flair_clusters.json")).read_text())
    assert sidecar["MinimumClusterVolume"] == card["extra"]["postprocessing"]["min_cluster_mm3"]
    statmap = json.loads(next(out.glob(
        "sub-patient03/anat/*_res-2_desc-flair_stat-anomaly_statmap.json")).read_text())
    assert statmap["ThresholdMethod"] == "tuned on annotated subjects"
    assert main([str(rawdata), str(out), "group", "--ground-truth", str(truth), *COMMON]) == 0
    evaluation = pd.read_csv(out / "group" / "desc-flair_evaluation.tsv", sep="\t")
    roles = dict(zip(evaluation["participant_id"], evaluation["model_role"], strict=True))
    assert roles["sub-patient03"] == "test" and roles["sub-patient01"] == "training"
    assert evaluation.set_index("participant_id").loc["sub-patient03", "dice"] > 0.3
    assert tree_digest(rawdata) == before
