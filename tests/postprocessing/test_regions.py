"""Restriction of the mask, user atlases and the regional burden table."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_anomaly.errors import BadDataError, MissingInputError
from bids_anomaly.postprocessing.clusters import cluster_table
from bids_anomaly.postprocessing.regions import (
    REGION_COLUMNS,
    load_atlas,
    regional_table,
    restriction_mask,
)

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _volumes():
    """A 10x10x10 brain (the inner 8 cube) with GM/WM/CSF slabs and a score ramp."""
    brain = np.zeros((10, 10, 10), bool)
    brain[1:9, 1:9, 1:9] = True
    tissue = np.zeros((10, 10, 10), np.int64)
    tissue[1:9, 1:9, 1:4], tissue[1:9, 1:9, 4:7], tissue[1:9, 1:9, 7:9] = 1, 2, 3
    scores = np.broadcast_to(np.arange(10.0), (10, 10, 10)).copy()  # increases along z
    mask = brain & (scores >= 7)  # the CSF slab (z 7, 8)
    return scores, mask, brain, tissue


def test_regional_table_against_a_hand_count():
    scores, mask, brain, tissue = _volumes()
    atlas = np.zeros_like(tissue)
    atlas[1:5, 1:9, 1:9], atlas[5:9, 1:9, 1:9] = 1, 2  # left and right halves
    table = regional_table(scores, mask, brain, 8.0, tissue, atlas, {1: "left", 2: "right",
                                                                      3: "empty"})
    assert list(table.columns) == list(REGION_COLUMNS)
    rows = table.set_index("region")
    assert rows.loc["brain", "n_voxels"] == 512
    assert rows.loc["brain", "volume_ml"] == pytest.approx(512 * 8 / 1000)
    assert rows.loc["WM", "n_voxels"] == 8 * 8 * 3
    assert rows.loc["WM", "mean_score"] == pytest.approx(5.0)  # z 4, 5, 6
    assert rows.loc["WM", "abnormal_percent"] == 0
    assert rows.loc["CSF", "abnormal_percent"] == pytest.approx(100)
    assert rows.loc["CSF", "abnormal_ml"] == pytest.approx(128 * 8 / 1000)
    assert rows.loc["brain", "abnormal_percent"] == pytest.approx(100 * 128 / 512)
    assert rows.loc["left", "n_voxels"] == 256 and rows.loc["left", "source"] == "atlas"
    assert rows.loc["left", "abnormal_percent"] == pytest.approx(100 * 64 / 256)
    assert rows.loc["right", "p95_score"] == pytest.approx(np.percentile(scores[5:9, 1:9, 1:9],
                                                                         95))
    assert rows.loc["empty", "n_voxels"] == 0 and np.isnan(rows.loc["empty", "mean_score"])


def test_white_matter_restriction_is_dilated_wm_inside_the_brain():
    _, _, brain, tissue = _volumes()
    wm = restriction_mask("wm", brain, tissue)
    assert wm[1:9, 1:9, 3:8].all()  # WM z 4..6 grown by one voxel into GM and CSF
    assert not wm[:, :, :3].any() and not wm[:, :, 8:].any()
    assert not wm[0].any()  # never outside the brain
    assert np.array_equal(restriction_mask("brain", brain, tissue), brain)
    with pytest.raises(ValueError):
        restriction_mask("cortex", brain, tissue)


def test_clusters_name_their_atlas_region():
    scores, _, brain, tissue = _volumes()
    mask = np.zeros_like(brain)
    mask[2:4, 2:4, 2:4] = True  # in the left half
    mask[5:8, 6:8, 6:8] = True  # one slice in the left half, two in the right
    atlas = np.zeros_like(tissue)
    atlas[1:6, 1:9, 1:9], atlas[6:9, 1:9, 1:9] = 1, 2
    table = cluster_table(scores, mask, AFFINE, tissue, atlas, {1: "left", 2: "right"})
    assert table["atlas_label"].tolist() == ["right", "left"]
    assert "atlas_label" not in cluster_table(scores, mask, AFFINE, tissue).columns


def _template(tmp_path):
    brain = np.zeros((20, 20, 20), np.uint8)
    brain[4:16, 4:16, 4:16] = 1
    path = tmp_path / "template_mask.nii.gz"
    nib.Nifti1Image(brain, AFFINE).to_filename(path)
    return path


def _atlas(tmp_path, data, affine=AFFINE, names="index\tname\n1\tputamen\n2\tthalamus\n",
           name="atlas_dseg"):
    path = tmp_path / f"{name}.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(path)
    if names is not None:
        (tmp_path / f"{name}.tsv").write_text(names)
    return path


def test_atlas_on_a_finer_grid_is_resampled_to_the_template(tmp_path):
    template = _template(tmp_path)
    fine = np.zeros((40, 40, 40), np.int16)  # 1 mm voxels, same field of view
    fine[10:20, 10:30, 10:30], fine[20:30, 10:30, 10:30] = 1, 2
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = 0.5  # 1 mm voxel centres of the same extent as the 2 mm grid
    atlas = load_atlas(_atlas(tmp_path, fine, affine), template, tmp_path / "out.nii.gz")
    grid = np.asarray(nib.load(atlas.path).dataobj)
    assert grid.shape == (20, 20, 20)
    assert atlas.labels == {1: "putamen", 2: "thalamus"}
    assert (grid[5:10, 5:15, 5:15] == 1).all() and (grid[10:15, 5:15, 5:15] == 2).all()
    assert grid.sum() == 500 * 1 + 500 * 2
    again = load_atlas(_atlas(tmp_path, fine, affine), template, tmp_path / "out.nii.gz")
    assert again.path.stat().st_mtime_ns == atlas.path.stat().st_mtime_ns  # not rewritten


@pytest.mark.parametrize("case, error, message", [
    ("no table", MissingInputError, "label table"),
    ("fractional", BadDataError, "fractional"),
    ("unnamed", BadDataError, "no name"),
    ("elsewhere", BadDataError, "template's space"),
    ("4d", BadDataError, "3D"),
    ("bad table", BadDataError, "'index' and 'name'"),
])
def test_atlas_errors_are_clear(tmp_path, case, error, message):
    template = _template(tmp_path)
    data = np.zeros((20, 20, 20), np.float32)
    data[6:10, 6:10, 6:10] = 1
    kwargs = {}
    if case == "no table":
        kwargs["names"] = None
    elif case == "fractional":
        data[6:10, 6:10, 6:10] = 0.4
    elif case == "unnamed":
        data[10:12, 6:10, 6:10] = 7
    elif case == "elsewhere":
        data[:] = 0
        data[0:4, 0:20, 0:20] = 1  # a slab outside the template's brain
    elif case == "4d":
        data = np.stack([data, data], axis=-1)
    elif case == "bad table":
        kwargs["names"] = "label\tregion\n1\tputamen\n"
    with pytest.raises(error, match=message):
        load_atlas(_atlas(tmp_path, data, **kwargs), template, tmp_path / "out.nii.gz")


def test_regions_table_round_trips_through_tsv(tmp_path):
    scores, mask, brain, tissue = _volumes()
    table = regional_table(scores, mask, brain, 8.0, tissue)
    path = tmp_path / "regions.tsv"
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    assert pd.read_csv(path, sep="\t")["region"].tolist() == ["brain", "GM", "WM", "CSF"]
