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
