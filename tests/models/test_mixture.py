"""The mixture anomaly models: options, scores, streaming, single-subject mode, save/load."""

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from bids_anomaly.models import REGISTRY, SubjectImages, TrainingData, load_model, save_model
from bids_anomaly.models.data import valid_voxels
from bids_anomaly.models.mixture.mixture import stream_batches
from bids_anomaly.models.store import ModelCard
from bids_anomaly.postprocessing.thresholds import calibrate_threshold

SHAPE = (20, 20, 20)
LESION = (slice(8, 12), slice(8, 12), slice(8, 12))


def _regions() -> np.ndarray:
    """Two 'tissues': label 1 in the lower half of x, label 2 in the upper half."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:10, 2:-2, 2:-2] = 1
    labels[10:-2, 2:-2, 2:-2] = 2
    return labels


def _subject(folder, index: int, lesion: bool = False) -> SubjectImages:
    """Two channels whose mean depends on the tissue; a lesion is bright in channel 0 and
    normal-looking in channel 1 (only the joint distribution tells)."""
    rng = np.random.default_rng(index)
    labels = _regions()
    mask = (labels > 0).astype(np.uint8)
    tissue_mean = np.where(labels == 1, 1.0, -1.0)
    channels = []
    for c in range(2):
        data = (1 + c) * tissue_mean + rng.normal(0, 0.25, SHAPE)
        if lesion and c == 0:
            data[LESION] -= 2.0 * tissue_mean[LESION]
        path = folder / f"s{index}_c{c}.nii.gz"
        nib.Nifti1Image((data * mask).astype(np.float32), np.eye(4)).to_filename(path)
        channels.append(path)
    mask_path = folder / f"s{index}_mask.nii.gz"
    nib.Nifti1Image(mask, np.eye(4)).to_filename(mask_path)
    return SubjectImages(f"sub-{index}", channels, mask_path)


@pytest.fixture
def cohort(tmp_path):
    regions = tmp_path / "dseg.nii.gz"
    nib.Nifti1Image(_regions(), np.eye(4)).to_filename(regions)
    subjects = [_subject(tmp_path, i) for i in range(6)]
    return TrainingData(subjects, ["T1w", "FLAIR"], regions=regions)


@pytest.mark.parametrize("model_type, options", [
    ("gmm", {"n_components": "auto", "max_components": 4}),
    ("tmm", {"online": True, "batch_size": 2_000, "n_components": 2}),
    ("mmst", {"per_tissue": True, "n_components": 1, "trim": 0.01}),
    ("mmst", {"n_components": 2, "score": "outlyingness"}),
    ("gmm", {"n_components": 2, "normative": True}),
])
def test_lesion_found_and_round_trip(model_type, options, cohort, tmp_path):
    model = REGISTRY[model_type](**options)
    fit, held_out = cohort.split(0.34, seed=0)
    model.fit(fit)
    threshold, _ = calibrate_threshold(model, held_out, fpr=0.01)
    image, mask = _subject(tmp_path, 50, lesion=True).load()
    score = model.score(image, mask)
    lesion = torch.zeros_like(mask)
    lesion[LESION] = True
    assert (score[~mask] == 0).all()
    assert ((score > threshold) & lesion).sum() / lesion.sum() > 0.9
    assert ((score > threshold) & mask & ~lesion).sum() / (mask & ~lesion).sum() < 0.03
    card = ModelCard(name="m", model_type=model_type, channels=cohort.channels, template="t",
                     resolution=2, preprocessing={}, hyperparameters=model.hyperparameters,
                     training_participants=fit.names, calibration_participants=[],
                     threshold=threshold, fpr=0.01, calibration_voxels=1)
    loaded, _ = load_model(save_model(model, card, tmp_path / "model"))
    assert torch.equal(loaded.score(image, mask), score)


def test_auto_components_records_the_bic(cohort):
    model = REGISTRY["gmm"](n_components="auto", max_components=4)
    model.fit(cohort)
    report = model.fit_report["0"]
    assert report["components"] == 2
    assert set(report["bic"]) == {"1", "2", "3", "4"}


def test_uncovered_voxels_are_neither_fitted_nor_scored():
    image = torch.randn(2, 4, 4, 4)
    image[1, 0] = 0.0
    mask = torch.ones(4, 4, 4, dtype=torch.bool)
    valid = valid_voxels(image, mask)
    assert not valid[0].any() and valid[1:].all()


def test_streaming_visits_every_valid_voxel_once_per_epoch(cohort):
    epoch = stream_batches(cohort, batch_size=1_000, seed=0, pool=2)
    batches = list(epoch())
    expected = sum(int(valid_voxels(*subject.load()).sum()) for subject in cohort.subjects)
    assert sum(len(batch) for batch in batches) == expected
    assert max(len(batch) for batch in batches) == 1_000


SUBJECT_FIT = {"n_components": 1, "per_tissue": True, "trim": 0.02}


def test_single_subject_mode_finds_the_lesion(tmp_path):
    from bids_anomaly.interfaces.anomaly import FitSubjectModel

    subject = _subject(tmp_path, 7, lesion=True)
    regions = tmp_path / "dseg.nii.gz"
    nib.Nifti1Image(_regions(), np.eye(4)).to_filename(regions)
    node = FitSubjectModel(channel_files=[str(p) for p in subject.channels],
                             mask_file=str(subject.mask), model_type="mmst",
                             hyperparameters=SUBJECT_FIT,
                             regions_file=str(regions), tissue_file=str(regions), fpr=0.001)
    result = node.run(cwd=str(tmp_path))
    flagged = np.asarray(nib.load(result.outputs.anomaly_mask).dataobj) > 0
    lesion = np.zeros(SHAPE, bool)
    lesion[LESION] = True
    assert flagged[lesion].mean() > 0.9
    assert flagged[~lesion].mean() < 0.01
    assert np.isfinite(result.outputs.threshold)
    # the lesion is the largest cluster of the table
    import pandas as pd

    clusters = pd.read_csv(result.outputs.clusters, sep="\t")
    assert clusters.loc[0, "n_voxels"] >= 0.9 * lesion.sum()
    assert clusters["n_voxels"].sum() == flagged.sum()
    assert clusters.loc[0, "tissue"] in ("GM", "WM")  # it straddles the two generated regions
    # with a minimum size above every stray voxel, only the lesion's cluster is left
    big_only = FitSubjectModel(channel_files=[str(p) for p in subject.channels],
                                 mask_file=str(subject.mask), model_type="mmst",
                                 hyperparameters=SUBJECT_FIT,
                                 regions_file=str(regions), tissue_file=str(regions),
                                 fpr=0.001, min_cluster_mm3=20.0).run(cwd=str(tmp_path))
    assert len(pd.read_csv(big_only.outputs.clusters, sep="\t")) == 1
    kept = np.asarray(nib.load(big_only.outputs.anomaly_mask).dataobj) > 0
    assert kept[~lesion].sum() == 0 and kept[lesion].mean() > 0.9
    with_fdr = FitSubjectModel(channel_files=[str(p) for p in subject.channels],
                                 mask_file=str(subject.mask), model_type="mmst",
                                 hyperparameters=SUBJECT_FIT,
                                 regions_file=str(regions), fpr=0.001, fdr=0.05)
    flagged = np.asarray(nib.load(with_fdr.run(cwd=str(tmp_path)).outputs.anomaly_mask
                                  ).dataobj) > 0
    assert flagged[lesion].mean() > 0.9
    # white matter only (generated label 2, dilated by a voxel), with the regions as an atlas
    in_wm = FitSubjectModel(channel_files=[str(p) for p in subject.channels],
                              mask_file=str(subject.mask), model_type="mmst",
                              hyperparameters=SUBJECT_FIT,
                              regions_file=str(regions), tissue_file=str(regions), fpr=0.001,
                              restrict="wm", atlas_file=str(regions),
                              atlas_labels={"1": "region-a", "2": "region-b"}
                              ).run(cwd=str(tmp_path)).outputs
    flagged = np.asarray(nib.load(in_wm.anomaly_mask).dataobj) > 0
    white = ndimage.binary_dilation(_regions() == 2)
    assert flagged.any() and not flagged[~white].any()
    assert flagged[lesion & white].mean() > 0.9
    table = pd.read_csv(in_wm.clusters, sep="\t")
    assert set(table["atlas_label"]) <= {"region-a", "region-b"}
    regions_table = pd.read_csv(in_wm.regions, sep="\t").set_index("region")
    assert regions_table.loc["region-b", "abnormal_ml"] > 0
    assert regions_table.loc["brain", "abnormal_ml"] == pytest.approx(
        regions_table.loc[["region-a", "region-b"], "abnormal_ml"].sum())


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="outlyingness"):
        REGISTRY["gmm"](score="outlyingness")
    with pytest.raises(ValueError, match="n_components"):
        REGISTRY["tmm"](n_components=0)
    with pytest.raises(ValueError, match="trim"):
        REGISTRY["mmst"](trim=0.7)
