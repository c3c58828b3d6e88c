"""The whole path on real scans from ../shared/data (skipped when it is absent)."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_anomaly.cli.run import main
from bids_anomaly.imaging.template import template_images
from tests.conftest import tree_digest

pytestmark = pytest.mark.slow
SPACE = "MNI152NLin2009aSym"


def test_ixi_participant_train_score_group(real_data, tmp_path):
    before = tree_digest(real_data)
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["-w", str(work), "--nprocs", "2"]
    train_labels = ["IXI012", "IXI013", "IXI014"]

    assert main([str(real_data), str(out), "participant", "--participant-label", "IXI012",
                 *common]) == 0
    anat = out / "sub-IXI012" / "anat"
    preproc = nib.load(anat / f"sub-IXI012_space-{SPACE}_res-2_desc-preproc_T1w.nii.gz")
    mask = nib.load(anat / f"sub-IXI012_space-{SPACE}_res-2_desc-brain_mask.nii.gz")
    template = template_images(2)
    assert preproc.shape == template["mask"].shape
    assert np.allclose(preproc.affine, template["mask"].affine)
    mask_data = np.asarray(mask.dataobj)
    assert set(np.unique(mask_data)) == {0, 1}
    reference = np.asarray(template["mask"].dataobj) > 0
    overlap = 2 * (reference & (mask_data > 0)).sum() / (reference.sum() + (mask_data > 0).sum())
    assert overlap > 0.95
    inside = preproc.get_fdata()[mask_data > 0]
    assert abs(np.median(inside)) < 0.05
    sidecar = json.loads((anat / f"sub-IXI012_space-{SPACE}_res-2_desc-preproc_T1w.json")
                         .read_text())
    assert sidecar["SkullStripped"] is True
    assert sidecar["Sources"] == ["bids:raw:sub-IXI012/anat/sub-IXI012_T1w.nii.gz"]
    assert (anat / f"sub-IXI012_from-T1w_to-{SPACE}_mode-image_xfm.h5").is_file()
    assert (anat / f"sub-IXI012_from-{SPACE}_to-T1w_mode-image_xfm.h5").is_file()
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"

    assert main([str(real_data), str(out), "train", "--model-type", "normative",
                 "--model-name", "ixi", "--participant-label", *train_labels,
                 "--train-filter", "group=healthy", *common]) == 0
    card = json.loads((out / "models" / "model-ixi" / "model.json").read_text())
    assert card["channels"] == ["T1w"] and card["template"] == SPACE
    assert sorted(card["training_participants"] + card["calibration_participants"]) == [
        f"sub-{label}" for label in train_labels]

    assert main([str(real_data), str(out), "participant", "--participant-label", "IXI015",
                 "--model", "ixi", *common]) == 0
    anat = out / "sub-IXI015" / "anat"
    statmap = nib.load(
        anat / f"sub-IXI015_space-{SPACE}_res-2_desc-ixi_stat-anomaly_statmap.nii.gz")
    flagged = np.asarray(nib.load(
        anat / f"sub-IXI015_space-{SPACE}_res-2_label-anomaly_desc-ixi_mask.nii.gz").dataobj)
    assert statmap.shape == template["mask"].shape
    assert set(np.unique(flagged)) <= {0, 1}
    assert flagged.sum() < 0.05 * reference.sum()  # a healthy brain is mostly normal

    assert main([str(real_data), str(out), "group", *common]) == 0
    table = pd.read_csv(out / "group" / "desc-ixi_subjects.tsv", sep="\t")
    assert table["participant_id"].tolist() == ["sub-IXI015"]
    assert table.loc[0, "group"] == "healthy"
    assert (out / "group" / "report.html").is_file()
    assert tree_digest(real_data) == before
