"""Cluster tables: components, sizes, positions in millimetres, tissue, small-cluster removal."""

import numpy as np
from scipy import ndimage

from bids_anomaly.postprocessing.clusters import (
    CLUSTER_COLUMNS,
    cluster_table,
    remove_small_clusters,
)


def _case():
    shape = (20, 20, 20)
    mask = np.zeros(shape, bool)
    mask[2:6, 2:6, 2:6] = True  # 64 voxels
    mask[12:14, 12:14, 12:13] = True  # 4 voxels
    mask[14, 14, 13] = True  # touches the second block by a corner: same cluster (26-conn.)
    scores = np.zeros(shape)
    scores[mask] = 1.0
    scores[3, 4, 5] = 7.0
    tissue = np.full(shape, 2)
    tissue[10:, 10:, 10:] = 3
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, -20, -30]
    return scores, mask, affine, tissue


def test_table_describes_each_cluster_in_millimetres():
    scores, mask, affine, tissue = _case()
    table = cluster_table(scores, mask, affine, tissue)
    assert list(table.columns) == [c for c in CLUSTER_COLUMNS if c != "atlas_label"]
    assert table["cluster_id"].tolist() == [1, 2]
    assert table["n_voxels"].tolist() == [64, 5]
    assert np.allclose(table["volume_mm3"], [512.0, 40.0])
    big = table.iloc[0]
    assert big["peak_score"] == 7.0 and np.isclose(big["mean_score"], (63 + 7) / 64)
    assert (big["peak_x"], big["peak_y"], big["peak_z"]) == (-4.0, -12.0, -20.0)
    # centre of voxels 2..5 is 3.5 -> 2 * 3.5 + offset
    assert (big["centroid_x"], big["centroid_y"], big["centroid_z"]) == (-3.0, -13.0, -23.0)
    assert table["tissue"].tolist() == ["WM", "CSF"]
    assert table["n_voxels"].sum() == mask.sum()
    assert len(table) == ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]


def test_small_clusters_are_removed_and_empty_masks_give_empty_tables():
    scores, mask, affine, _ = _case()
    kept = remove_small_clusters(mask, 6)
    assert kept.sum() == 64 and kept[2:6, 2:6, 2:6].all()
    assert remove_small_clusters(mask, 0).sum() == mask.sum()
    empty = cluster_table(scores, np.zeros_like(mask), affine)
    assert len(empty) == 0 and "tissue" not in empty.columns


def test_rank_by_size_and_mean_score():
    shape = (30, 10, 10)
    mask = np.zeros(shape, bool)
    scores = np.zeros(shape)
    mask[0:10, 1:4, 1:4] = True  # 90 voxels, mean 1: largest, weakest
    scores[0:10, 1:4, 1:4] = 1.0
    mask[12:17, 1:4, 1:4] = True  # 45 voxels, mean 5: second by size, first by score
    scores[12:17, 1:4, 1:4] = 5.0
    mask[20:21, 1:3, 1:2] = True  # 2 voxels, mean 3: smallest, middle score
    scores[20:21, 1:3, 1:2] = 3.0
    table = cluster_table(scores, mask, np.eye(4))
    assert table["cluster_id"].tolist() == [1, 2, 3]
    # ranks (volume, mean): (1, 3) -> 4, (2, 1) -> 3, (3, 2) -> 5
    assert table["rank_size_score"].tolist() == [2, 1, 3]
