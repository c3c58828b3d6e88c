"""The subject-level protocol of train --splits on a generated Parkinson's-like cohort.

30 controls and 30 patients have FA and MD maps on a small template-like grid
(:func:`~bids_anomaly.simulation.synthetic.diffusion_cohort`): tissue values with inter-subject
variation (smooth random fields, 8 % of the value per voxel); the patients' FA is 5 % lower and MD 5
% higher in two small "deep grey nuclei" (an atlas region) - well below what one voxel shows at a
calibrated voxel threshold. The splits are trained by the train level's own code (channel scaling,
fit, calibration, cards), scored, and passed to the group protocol.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_anomaly import bids
from bids_anomaly.config import (
    ExecutionSettings,
    InputSettings,
    ModelSettings,
    Settings,
)
from bids_anomaly.evaluation.protocol import split_families, split_protocol
from bids_anomaly.imaging.template import Template
from bids_anomaly.levels.train import train_splits
from bids_anomaly.models.data import SubjectImages, TrainingData, scaling_for
from bids_anomaly.models.store import load_model
from bids_anomaly.simulation.synthetic import diffusion_cohort

SPACE, RES = "MNI152NLin2009aSym", 2
N_PATIENTS = 30


def _subject(root: Path, label: str) -> SubjectImages:
    return SubjectImages(
        f"sub-{label}",
        [bids.spec_path(root, label, None, bids.preproc_spec(SPACE, RES, c)) for c in ("FA", "MD")],
        bids.spec_path(root, label, None, bids.brain_mask_spec(SPACE, RES)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The cohort, 5 split models trained and every subject scored by each."""
    root = tmp_path_factory.mktemp("protocol")
    out, raw = root / "out", root / "bids"
    generated = diffusion_cohort(out, 30, N_PATIENTS)
    groups, tissue, nuclei = generated.groups, generated.tissue, generated.nuclei
    raw.mkdir()
    rng = np.random.default_rng(3)
    pd.DataFrame({"participant_id": [f"sub-{x}" for x in groups],
                  "group": list(groups.values()),
                  "age": rng.integers(55, 80, len(groups)).astype(str),
                  "sex": rng.choice(["M", "F"], len(groups))}).to_csv(
        raw / "participants.tsv", sep="\t", index=False)
    settings = Settings(
        inputs=InputSettings(bids_dir=raw, output_dir=out, analysis_level="train"),
        execution=ExecutionSettings(nprocs=1, omp_nthreads=1, device="cpu"),
        model=ModelSettings(model_type="normative", model_name="pd-norm", splits=5,
                            split_test_size=10))
    controls = [x for x, g in groups.items() if g == "control"]
    data = TrainingData([_subject(out, x) for x in controls], ["FA", "MD"])
    dseg = root / "dseg.nii.gz"
    nib.Nifti1Image(tissue, np.diag([RES] * 3 + [1.0])).to_filename(dseg)
    template = Template(SPACE, RES, dseg, dseg, {}, dseg, dseg)
    directories = train_splits(settings, data, template)
    for directory in directories:
        model, card = load_model(directory)
        desc = bids.model_desc(card.name)
        for label in groups:
            subject = _subject(out, label)
            subject.scaling = scaling_for(card.channels, card.extra["channel_scaling"])
            image, mask = subject.load()
            score = model.score(image, mask).numpy().astype(np.float32)
            path = bids.spec_path(out, label, None, bids.anomaly_map_spec(SPACE, RES, desc))
            nib.Nifti1Image(score, np.diag([RES] * 3 + [1.0])).to_filename(path)
    return out, groups, directories, tissue, nuclei


def test_split_cards_record_disjoint_balanced_splits(cohort):
    out, groups, directories, _, _ = cohort
    assert [d.name for d in directories] == [f"model-pd-norm-split{i:02d}" for i in range(1, 6)]
    families = split_families(out)
    assert list(families) == ["pd-norm"] and [m.index for m in families["pd-norm"]] == [1, 2, 3,
                                                                                        4, 5]
    tests = set()
    for model in families["pd-norm"]:
        assert len(model.test) == 10 and len(model.train) == 20
        assert not model.test & model.train
        assert all(groups[x.removeprefix("sub-")] == "control" for x in model.test | model.train)
        tests.add(model.test)
    assert len(tests) == 5  # the splits differ
    _, card = load_model(directories[0])
    assert card.extra["split"]["strata"]  # age and/or sex used
    assert set(card.extra["channel_scaling"]) == {"FA", "MD"}  # diffusion maps scaled (auto)
    assert set(card.training_participants + card.calibration_participants) == set(
        card.extra["split"]["train_controls"])


def test_regional_burden_separates_what_voxels_do_not(cohort):
    out, groups, _, tissue, nuclei = cohort
    models = split_families(out)["pd-norm"]
    from bids_anomaly.evaluation.group import find_anomaly_maps

    maps = find_anomaly_maps(out)
    tables = split_protocol(out, models, maps, {f"sub-{x}": g for x, g in groups.items()},
                            "control", "percentile", 98.0, tissue, nuclei.astype(np.int64),
                            {1: "nuclei"})
    splits = tables["splits"]
    assert list(splits["split"]) == [1, 2, 3, 4, 5, "median", "q1", "q3", "iqr"]
    assert (splits.loc[:4, "n_test_controls"] == 10).all()
    assert (splits.loc[:4, "n_patients"] == N_PATIENTS).all()
    regions = tables["splitregions"].set_index(["split", "region"])
    nuclei_auroc = regions.loc[("median", "atlas:nuclei"), "auroc"]
    brain_auroc = regions.loc[("median", "brain"), "auroc"]
    assert nuclei_auroc > 0.8, regions
    assert brain_auroc < 0.7, regions  # the whole-brain burden dilutes the regional change
    assert regions.loc[("median", "atlas:nuclei"), "gmean"] > 0.7
    # the voxel maps alone: at the model's calibrated threshold (FPR 0.001), a patient's
    # nuclei voxels are hardly ever flagged
    flagged = []
    for model in models:
        desc = bids.model_desc(model.name)
        for path in maps[desc]:
            if groups[bids.parse_name(path)["sub"]] == "patient":
                score = nib.load(path).get_fdata()
                flagged.append((score[nuclei > 0] > model.threshold).mean())
    assert np.mean(flagged) < 0.05
    burden = tables["splitburden"]
    assert set(burden["role"]) == {"test", "patient"}
    assert set(burden["region"]) >= {"brain", "tissue:GM", "tissue:WM", "atlas:nuclei"}


def test_calibrated_threshold_mode(cohort):
    out, groups, _, tissue, nuclei = cohort
    from bids_anomaly.evaluation.group import find_anomaly_maps

    models = split_families(out)["pd-norm"]
    tables = split_protocol(out, models, find_anomaly_maps(out),
                            {f"sub-{x}": g for x, g in groups.items()}, "control",
                            "calibrated", 98.0, tissue)
    thresholds = tables["splits"].loc[:4, "threshold"].to_numpy(float)
    assert np.allclose(thresholds, [m.threshold for m in models])


@pytest.mark.slow
def test_splits_end_to_end_with_given_diffusion_maps(tmp_path):
    """train --splits on FA/MD maps of another pipeline, participant --model FAMILY, group.

    The T1w images are the template's brain with noise (skull-stripped, already aligned: the
    preprocessing is quick); the FA and MD maps are given on the template grid.
    """
    import json

    from bids_anomaly.cli.run import main
    from bids_anomaly.imaging.template import get_template
    from tests.conftest import write_minimal_bids

    template = get_template(2, tmp_path / "templates")
    t1w = nib.load(template.t1w)
    wm = nib.load(template.probseg["WM"]).get_fdata()
    csf = nib.load(template.probseg["CSF"]).get_fdata()
    brain = nib.load(template.brain_mask).get_fdata() > 0
    rng = np.random.default_rng(0)
    groups = {"hc1": "control", "hc2": "control", "hc3": "control", "hc4": "control",
              "pd1": "pd"}
    subjects = {}
    for label in groups:
        noisy = np.where(brain, t1w.get_fdata() * (1 + 0.02 * rng.normal(size=brain.shape)), 0)
        subjects[label] = {"T1w": nib.Nifti1Image(noisy.astype(np.float32), t1w.affine)}
        folder = tmp_path / "qsiprep" / f"sub-{label}" / "dwi"
        folder.mkdir(parents=True)
        noise = 1 + 0.05 * rng.normal(size=brain.shape)
        maps = {"fa": (0.1 + 0.4 * wm) * noise, "md": (0.7e-3 + 2.3e-3 * csf) * noise}
        for name, data in maps.items():
            nib.Nifti1Image(np.where(brain, data, 0).astype(np.float32), t1w.affine).to_filename(
                folder / f"sub-{label}_space-{template.name}_model-tensor_param-{name}"
                         "_dwimap.nii.gz")
    raw = write_minimal_bids(tmp_path / "raw", subjects, groups)
    common = ["--nprocs", "2", "--omp-nthreads", "1", "--device", "cpu", "--sloppy", "-w",
              str(tmp_path / "work")]
    given = ["--dwi-derivatives", str(tmp_path / "qsiprep"), "--skull-stripped", "yes",
             "--registration", "Rigid"]
    out = tmp_path / "out"
    assert main([str(raw), str(out), "train", "--model-type", "normative", "--channels", "FA",
                 "MD", "--train-filter", "group=control", "--splits", "2",
                 "--split-test-size", "1", "--model-name", "pd", *common, *given]) == 0
    assert bids.split_models(out, "pd") == ["pd-split01", "pd-split02"]
    card = json.loads((out / "models" / "model-pd-split01" / "model.json").read_text())
    assert card["channels"] == ["FA", "MD"] and set(card["extra"]["channel_scaling"]) == {
        "FA", "MD"}
    assert len(card["extra"]["split"]["test_controls"]) == 1
    assert main([str(raw), str(out), "participant", "--model", "pd", *common, *given]) == 0
    for name in ("pd-split01", "pd-split02"):
        desc = bids.model_desc(name)
        assert len(list(out.glob(f"sub-*/anat/*_res-2_desc-{desc}_stat-anomaly_statmap.nii.gz"))
                   ) == 5
    assert main([str(raw), str(out), "group", *common]) == 0
    splits = pd.read_csv(out / "group" / "desc-pd_splits.tsv", sep="\t")
    assert list(splits["split"].astype(str)) == ["1", "2", "median", "q1", "q3", "iqr"]
    assert (splits.loc[:1, "n_test_controls"] == 1).all() and (
        splits.loc[:1, "n_patients"] == 1).all()
    assert (out / "group" / "desc-pd_splitregions.tsv").is_file()
    assert "Subject-level protocol: pd (2 splits)" in (out / "group" / "report.html").read_text()
