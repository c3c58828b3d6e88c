"""Preprocessing of the hard cases of ../shared/data/bids_real (skipped when it is absent)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bids_anomaly import bids
from bids_anomaly.cli.run import main
from bids_anomaly.evaluation.ground_truth import truth_in_template
from bids_anomaly.imaging.images import load_volume
from bids_anomaly.imaging.skullstrip import check_background, mask_from_background
from bids_anomaly.postprocessing.native import to_native_space
from tests.conftest import tree_digest

SPACE = "MNI152NLin2009aSym"


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.slow
def test_stripped_multimodal_and_t2w_only_subjects(real_data, tmp_path):
    before = tree_digest(real_data)
    out, work = tmp_path / "out", tmp_path / "work"
    args = [str(real_data), str(out), "participant", "--participant-label", "mslub26",
            "stroke01", "-w", str(work), "--nprocs", "2", "--omp-nthreads", "1"]
    assert main(args) == 0

    qc26 = pd.read_csv(out / "sub-mslub26/anat/sub-mslub26_desc-registration_qc.tsv", sep="\t")
    row = qc26.iloc[0]
    assert row["reference"] == "T1w" and row["skull_stripping"] == "detected"
    assert row["dice"] >= 0.95 and bool(row["qc_pass"])
    assert 900 < row["brain_volume_ml"] < 1600
    assert {"nmi_FLAIR", "nmi_T2w", "coverage_FLAIR", "coverage_T2w"} <= set(qc26.columns)
    assert row["nmi_FLAIR"] >= 1.03 and row["nmi_T2w"] >= 1.03 and row["coverage_T2w"] > 0.95
    # the non-enhanced T1w was chosen over the ce-gadolinium one
    sidecar = json.loads((out / f"sub-mslub26/anat/sub-mslub26_space-{SPACE}_res-2_"
                          "desc-preproc_T1w.json").read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-mslub26/anat/sub-mslub26_T1w.nii.gz"]

    qc_stroke = pd.read_csv(out / "sub-stroke01/anat/sub-stroke01_desc-registration_qc.tsv",
                            sep="\t").iloc[0]
    assert qc_stroke["reference"] == "T2w" and qc_stroke["skull_stripping"] == "deepbet"
    assert qc_stroke["dice"] >= 0.95 and bool(qc_stroke["qc_pass"])
    assert 1000 < qc_stroke["brain_volume_ml"] < 2000

    for subject, figures in (("mslub26", ["desc-brainmask_T1w", f"space-{SPACE}_desc-registration"
                                          "_T1w", f"space-{SPACE}_desc-coregistration_FLAIR",
                                          f"space-{SPACE}_desc-coregistration_T2w"]),
                             ("stroke01", ["desc-brainmask_T2w"])):
        for figure in figures:
            assert (out / f"sub-{subject}/figures/sub-{subject}_{figure}.svg").stat().st_size > 5e3
        page = (out / f"sub-{subject}.html").read_text()
        assert "registration quality" in page
        # the figures are referenced beside the page (issue 35: pages <= 2 MB), not embedded
        assert f'<img src="sub-{subject}/figures/sub-{subject}_{figures[0]}.svg"' in page

    # the template-space brain mask carried back onto the raw T1w grid matches the raw brain
    layout = bids.load_layout(real_data, work / "bids_db", validate=False)
    inputs = bids.collect_anat(layout, "mslub26")[0]
    std_mask = bids.spec_path(out, "mslub26", None, bids.brain_mask_spec(SPACE, 2))
    native = to_native_space(std_mask, inputs, out, SPACE, tmp_path / "native.nii.gz",
                             interpolation="genericLabel")
    raw = load_volume(inputs.images["T1w"])
    native_img = nib.load(native)
    assert native_img.shape == raw.shape and np.allclose(native_img.affine, raw.affine)
    truth = mask_from_background(raw, check_background(raw).background)
    assert _dice(np.asarray(native_img.dataobj) > 0, truth) > 0.95

    # a rerun finds every step cached: the registration's result file is not rewritten
    result = next(work.rglob("sub_mslub26_wf/anat_preproc_wf/register_to_template/result_*"))
    stamp = result.stat().st_mtime_ns
    assert main(args) == 0
    assert result.stat().st_mtime_ns == stamp

    # the tissue model on sub-mslub26's own T1w, FLAIR and T2w, with no label and no other
    # subject (measured: AUPRC 0.71 in template space at 2 mm; the FLAIR's robust z 0.34)
    assert main([*args[:4], "mslub26", *args[6:], "--single-subject", "tissue"]) == 0
    anat = out / "sub-mslub26" / "anat"
    prefix = f"sub-mslub26_space-{SPACE}_res-2_"
    score = nib.load(anat / f"{prefix}desc-tissuesingle_stat-anomaly_statmap.nii.gz").get_fdata()
    truth = truth_in_template(
        real_data / "derivatives/lesion_masks/sub-mslub26/anat/"
        "sub-mslub26_space-MNI152NLin6Asym_label-lesion_mask.nii.gz",
        anat / f"{prefix}desc-brain_mask.nii.gz", {"T1w": real_data / "sub-mslub26/anat/"
                                                   "sub-mslub26_T1w.nii.gz"},
        {"T1w": [anat / f"sub-mslub26_from-T1w_to-{SPACE}_mode-image_xfm.h5"]})
    brain = score != 0
    from sklearn.metrics import average_precision_score

    assert average_precision_score(truth[brain] > 0.5, score[brain]) > 0.6
    flagged = np.asarray(nib.load(anat / f"{prefix}label-anomaly_desc-tissuesingle_mask.nii.gz"
                                  ).dataobj) > 0
    assert _dice(flagged, truth > 0.5) > 0.5
    posteriors = [nib.load(anat / f"{prefix}label-{c}_desc-tissuesingle_probseg.nii.gz"
                           ).get_fdata() for c in ("GM", "WM", "CSF", "lesion")]
    assert np.allclose(sum(posteriors)[brain], 1, atol=1e-3)

    # single-subject mode on the stroke: a mixture fitted on its own T2w finds the lesion
    assert main([*args[:4], "stroke01", *args[6:], "--single-subject", "mmst",
                 "--per-tissue"]) == 0
    anat = out / "sub-stroke01" / "anat"
    statmap = anat / f"sub-stroke01_space-{SPACE}_res-2_desc-mmstsingle_stat-anomaly_statmap.nii.gz"
    flagged = np.asarray(nib.load(str(statmap).replace(
        "desc-mmstsingle_stat-anomaly_statmap", "label-anomaly_desc-mmstsingle_mask")).dataobj)
    sidecar = json.loads(Path(str(statmap).replace(".nii.gz", ".json")).read_text())
    assert sidecar["Calibration"].startswith("simulated") and sidecar["ModelChannels"] == ["T2w"]
    raw_t2w = real_data / "sub-stroke01/anat/sub-stroke01_T2w.nii.gz"
    truth = truth_in_template(
        real_data / "derivatives/lesion_masks/sub-stroke01/anat/"
        "sub-stroke01_label-lesion_mask.nii.gz",
        anat / f"sub-stroke01_space-{SPACE}_res-2_desc-brain_mask.nii.gz", {"T2w": raw_t2w},
        {"T2w": [anat / f"sub-stroke01_from-T2w_to-{SPACE}_mode-image_xfm.h5"]})
    brain = np.asarray(nib.load(anat / f"sub-stroke01_space-{SPACE}_res-2_desc-brain_mask"
                                       ".nii.gz").dataobj) > 0
    score = nib.load(statmap).get_fdata()
    # measured: AUROC 0.81 (a T2w-only mixture sees the CSF-like infarct as partly normal);
    # trimming makes the simulated threshold flag about 1 % of the brain instead of 0.1 %
    assert roc_auc_score(truth[brain], score[brain]) > 0.75
    assert set(np.unique(flagged)) <= {0, 1} and flagged[brain].mean() < 0.03
    assert (flagged[~brain] == 0).all()
    # the native-space copy lies on the raw T2w grid and ranks the hand-drawn (native) lesion
    # above the rest of the brain as the template-space map does: it is aligned
    native = nib.load(anat / "sub-stroke01_space-T2w_desc-mmstsingle_stat-anomaly_statmap.nii.gz")
    raw_img = nib.load(raw_t2w)
    assert native.shape == raw_img.shape and np.allclose(native.affine, raw_img.affine,
                                                         atol=1e-3)
    native_truth = np.asarray(nib.load(
        real_data / "derivatives/lesion_masks/sub-stroke01/anat/"
        "sub-stroke01_label-lesion_mask.nii.gz").dataobj) > 0
    native_score = native.get_fdata()
    region = (native_score != 0) | native_truth
    assert roc_auc_score(native_truth[region], native_score[region]) > 0.7
    regions = pd.read_csv(anat / f"sub-stroke01_space-{SPACE}_res-2_desc-mmstsingle_regions.tsv",
                          sep="\t")
    assert regions["region"].tolist()[:4] == ["brain", "GM", "WM", "CSF"]
    assert tree_digest(real_data) == before


def test_filter_file_picks_the_contrast_enhanced_t1w(real_data, tmp_path):
    layout = bids.load_layout(real_data, tmp_path / "db", validate=False)
    default = bids.collect_anat(layout, "mslub26")[0]
    assert default.images["T1w"].name == "sub-mslub26_T1w.nii.gz"
    chosen = bids.collect_anat(layout, "mslub26",
                               bids_filters={"t1w": {"ceagent": "gadolinium"}})[0]
    assert chosen.images["T1w"].name == "sub-mslub26_ce-gadolinium_T1w.nii.gz"
    assert chosen.reference == "T1w"
