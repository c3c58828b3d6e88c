"""The lightbox of the participant pages: slices through every cluster, numbered as the table."""

import nibabel as nib
import numpy as np
import pandas as pd

from bids_anomaly.postprocessing.clusters import cluster_table, numbered_clusters
from bids_anomaly.reports.figures import lightbox_slices, plot_lightbox
from bids_anomaly.reports.subject import result_summary


def _clusters(shape=(30, 30, 40)):
    """Three clusters: 1 spans z 5-14, 3 (4 voxels) lies at z 12, 2 (27 voxels) at z 29-31."""
    mask = np.zeros(shape, bool)
    mask[5:12, 5:12, 5:15] = True
    mask[20:22, 20:22, 12:13] = True
    mask[15:18, 2:5, 29:32] = True
    scores = np.where(mask, 5.0, 0.5).astype(np.float32)
    scores[20, 20, 12] = 9.0
    return scores, mask


def test_numbered_clusters_match_the_table():
    scores, mask = _clusters()
    labels = numbered_clusters(scores, mask)
    table = cluster_table(scores, mask, np.eye(4))
    assert labels.max() == len(table) == 3
    for row in table.itertuples():
        voxel = np.round([row.peak_x, row.peak_y, row.peak_z]).astype(int)
        assert labels[tuple(voxel)] == row.cluster_id
    assert (labels == 1).sum() == table.loc[0, "n_voxels"] == 490  # the largest is 1


def test_slices_cut_every_cluster_with_as_few_as_possible():
    scores, mask = _clusters()
    labels = numbered_clusters(scores, mask)
    slices, missing = lightbox_slices(labels)
    assert missing == []
    assert len(slices) == 2  # one slice cuts the big cluster and the small one (z 12)
    for cluster_id in (1, 2, 3):
        assert any((labels[..., z] == cluster_id).any() for z in slices)
    # fewer panels than needed: the largest clusters' slices are kept, the others named
    slices, missing = lightbox_slices(labels, panels=1)
    assert len(slices) == 1 and missing == [2]
    # nothing flagged: slices spread over the brain
    brain = np.zeros_like(mask)
    brain[:, :, 10:30] = True
    slices, missing = lightbox_slices(np.zeros_like(labels), brain)
    assert missing == [] and len(slices) >= 4 and all(10 <= z < 30 for z in slices)


def test_lightbox_draws_and_the_summary_says_where(tmp_path):
    scores, mask = _clusters()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {}
    for name, data in (("map", scores), ("flair", np.where(mask, 1.0, 0.8) * 100)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.Nifti1Image(data.astype(np.float32), affine).to_filename(paths[name])
    labels = numbered_clusters(scores, mask)
    truth = np.zeros_like(mask)
    truth[6:10, 6:10, 8:12] = True
    out, missing = plot_lightbox(paths["flair"], paths["map"], labels, tmp_path / "lb.png",
                                 threshold=3.0, title="sub-01", score_name="z", truth=truth)
    assert out.is_file() and out.stat().st_size > 5000 and missing == []
    table = cluster_table(scores, mask, affine, tissue=np.full(mask.shape, 2))
    summary = result_summary(table)
    assert summary.startswith("4.17 ml abnormal in 3 clusters; the largest, cluster 1: 3.92 ml "
                              "in WM")
    assert result_summary(table.iloc[:0]) == "Nothing above the threshold: no abnormal voxel."
    assert result_summary(None) == "No clusters table."
    assert isinstance(table, pd.DataFrame)


def _head(shape=(40, 48, 36)):
    """An ellipsoid head at 2 mm (RAS+), a lesion in its left anterior quarter at z index 18."""
    i, j, k = np.indices(shape)
    centre = (np.asarray(shape) - 1) / 2
    head = (((i - centre[0]) / 17) ** 2 + ((j - centre[1]) / 21) ** 2
            + ((k - centre[2]) / 15) ** 2) <= 1
    lesion = np.zeros(shape, bool)
    lesion[8:13, 30:35, 16:21] = True  # low i: left; high j: anterior
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -centre * 2
    return head, lesion, affine


def _colours(png):
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    panels = np.zeros(r.shape, bool)
    panels[:, :int(0.75 * r.shape[1])] = True  # not the colour bar on the right
    return {"hot": panels & (r > 150) & (b < 100) & (r - b > 100),
            "lime": panels & (g > 180) & (r < 90) & (b < 90),
            "cyan": panels & (g > 180) & (b > 180) & (r < 90),
            "head": panels & (r > 40) & (abs(r - g) < 8) & (abs(g - b) < 8)}


def test_the_lightbox_shows_left_on_the_left_and_anterior_up_whatever_the_voxel_order(tmp_path):
    head, lesion, affine = _head()
    truth = np.roll(lesion, 2, axis=0)
    graded = 3.5 + np.arange(lesion.size).reshape(lesion.shape) % 5  # red to yellow
    scores = np.where(lesion, graded, 0.5).astype(np.float32)
    background = np.where(head, 100.0, 0.0).astype(np.float32)
    pictures = []
    for order in ("RAS", "LAS"):
        flip = order == "LAS"  # the same head stored with its x axis reversed
        arrays = [a[::-1] if flip else a for a in (scores, background, lesion, truth)]
        grid = affine @ np.diag([-1.0, 1, 1, 1]) if flip else affine.copy()
        if flip:
            grid[0, 3] = affine[0, 3] + affine[0, 0] * (head.shape[0] - 1)
        paths = {}
        for name, data in (("map", arrays[0]), ("bg", arrays[1])):
            paths[name] = tmp_path / f"{order}_{name}.nii.gz"
            nib.Nifti1Image(data, grid).to_filename(paths[name])
        labels = numbered_clusters(arrays[0], arrays[2])
        out, missing = plot_lightbox(paths["bg"], paths["map"], labels, tmp_path / f"{order}.png",
                                     threshold=3.0, title="sub-01", truth=arrays[3])
        assert missing == []
        pictures.append(np.asarray(__import__("PIL.Image").Image.open(out).convert("RGB")))
        colours = _colours(out)
        assert colours["hot"].sum() > 20 and colours["lime"].any() and colours["cyan"].any()
        rows, columns = np.nonzero(colours["head"])
        hot_rows, hot_columns = np.nonzero(colours["hot"])
        # left of and above the middle of the head (neurological view, anterior up)
        assert hot_columns.mean() < columns.mean() - 10
        assert hot_rows.mean() < rows.mean() - 10
    assert np.array_equal(pictures[0], pictures[1])


def test_a_background_on_another_grid_is_resampled_to_the_maps(tmp_path):
    head, lesion, affine = _head()
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine[:3, 3] = affine[:3, 3] - 0.5
    big = np.repeat(np.repeat(np.repeat(np.where(head, 100.0, 0.0), 2, 0), 2, 1), 2, 2)
    nib.Nifti1Image(big.astype(np.float32), fine).to_filename(tmp_path / "bg.nii.gz")
    scores = np.where(lesion, 3.5 + np.indices(lesion.shape)[0] % 5, 0.5).astype(np.float32)
    nib.Nifti1Image(scores, affine).to_filename(tmp_path / "map.nii.gz")
    out, _ = plot_lightbox(tmp_path / "bg.nii.gz", tmp_path / "map.nii.gz",
                           numbered_clusters(scores, lesion), tmp_path / "lb.png", threshold=3.0)
    colours = _colours(out)
    assert colours["head"].sum() > 1000 and colours["hot"].sum() > 20
