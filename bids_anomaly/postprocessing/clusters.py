"""Connected clusters of abnormal voxels: the table a researcher reads first.

Clusters are 26-connected components of the thresholded mask. Clusters smaller than a minimum
volume can be dropped (from the mask and the table). Each cluster is described by its volume,
its rank by size and mean score (the post-processing of Alaverdyan et al. 2020, who keep the top
clusters as detections), peak and mean score, peak and centroid positions in the template's
millimetre coordinates, and
the tissue class most of its voxels lie in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from bids_anomaly.imaging.template import TISSUE_LABELS

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity: voxels touching by a face, an edge or a corner belong together."""

CLUSTER_COLUMNS = {
    "cluster_id": {"Description": "1 for the largest cluster, then by decreasing volume"},
    "rank_size_score": {"Description": "rank by size and mean score (Alaverdyan et al. 2020): "
                                       "order of the sum of the cluster's rank by volume and "
                                       "its rank by mean score, ties to the larger cluster; the "
                                       "top clusters are the detections to read first"},
    "n_voxels": {"Description": "number of voxels in the cluster"},
    "volume_mm3": {"Description": "cluster volume", "Units": "mm^3"},
    "peak_score": {"Description": "highest anomaly score in the cluster"},
    "mean_score": {"Description": "mean anomaly score over the cluster"},
    "peak_x": {"Description": "x of the peak voxel, template world coordinates", "Units": "mm"},
    "peak_y": {"Description": "y of the peak voxel, template world coordinates", "Units": "mm"},
    "peak_z": {"Description": "z of the peak voxel, template world coordinates", "Units": "mm"},
    "centroid_x": {"Description": "x of the cluster's centre of mass", "Units": "mm"},
    "centroid_y": {"Description": "y of the cluster's centre of mass", "Units": "mm"},
    "centroid_z": {"Description": "z of the cluster's centre of mass", "Units": "mm"},
    "tissue": {"Description": "template tissue class of most of the cluster's voxels",
               "Levels": {**{name: f"template {name}" for name in TISSUE_LABELS.values()},
                          "none": "outside the template's tissue classes"}},
    "atlas_label": {"Description": "region of the user's atlas (--atlas) holding most of the "
                                   "cluster's voxels; 'none' when most lie outside its regions"},
}
"""Column definitions of ``*_clusters.tsv`` (written to its JSON sidecar)."""


def remove_small_clusters(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` without the clusters of fewer than ``min_voxels`` voxels (boolean)."""
    mask = np.asarray(mask) > 0
    if min_voxels <= 1:
        return mask
    labels, count = ndimage.label(mask, structure=CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def _majority(clusters: np.ndarray, count: int, segmentation: np.ndarray,
              names: dict[int, str]) -> list[str]:
    """Per cluster 1..count, the name of the segmentation label most of its voxels carry."""
    inside = clusters > 0
    pairs = np.stack([clusters[inside], np.asarray(segmentation)[inside].astype(np.int64)])
    values, counts = np.unique(pairs, axis=1, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for (cluster, label), n in zip(values.T.tolist(), counts.tolist(), strict=True):
        if n > best.get(cluster, (-1, 0))[0]:
            best[cluster] = (n, label)
    return [names.get(best[c][1], "none") for c in range(1, count + 1)]


def numbered_clusters(anomaly_map: np.ndarray, anomaly_mask: np.ndarray) -> np.ndarray:
    """The mask's 26-connected clusters labelled by their ``cluster_id``.

    1 is the largest, then by decreasing volume (ties: the higher peak score first), as in
    :func:`cluster_table`.

    Returns
    -------
    numpy.ndarray
        Integer labels on the mask's grid, 0 outside the clusters.
    """
    labels, count = ndimage.label(np.asarray(anomaly_mask) > 0, structure=CONNECTIVITY)
    if count == 0:
        return labels
    index = np.arange(1, count + 1)
    inside = labels > 0  # counted over the clusters' voxels only (ndimage sorts the volume)
    members = labels[inside]
    n_voxels = np.bincount(members, minlength=count + 1)[1:]
    peaks = np.full(count + 1, -np.inf)
    np.maximum.at(peaks, members, np.asarray(anomaly_map, dtype=np.float64)[inside])
    peaks = peaks[1:]
    order = sorted(range(count), key=lambda k: (-n_voxels[k], -peaks[k]))
    renumber = np.zeros(count + 1, dtype=labels.dtype)
    renumber[np.asarray(order) + 1] = index
    return renumber[labels]


def cluster_table(anomaly_map: np.ndarray, anomaly_mask: np.ndarray, affine: np.ndarray,
                  tissue: np.ndarray | None = None, atlas: np.ndarray | None = None,
                  atlas_labels: dict[int, str] | None = None) -> pd.DataFrame:
    """One row per cluster of ``anomaly_mask``, largest first.

    Parameters
    ----------
    anomaly_map : numpy.ndarray
        Voxel-wise anomaly score.
    anomaly_mask : numpy.ndarray
        Voxels judged abnormal (same grid).
    affine : numpy.ndarray
        Voxel-to-world matrix of the grid (positions are given in its millimetres).
    tissue : numpy.ndarray, optional
        Integer tissue labels on the same grid
        (:data:`~bids_anomaly.imaging.template.TISSUE_LABELS`).
    atlas : numpy.ndarray, optional
        Integer atlas labels on the same grid, named by ``atlas_labels``.

    Returns
    -------
    pandas.DataFrame
        The columns of :data:`CLUSTER_COLUMNS` (``tissue`` only with ``tissue``,
        ``atlas_label`` only with ``atlas``).
    """
    left_out = {name for name, given in (("tissue", tissue), ("atlas_label", atlas))
                if given is None}
    columns = [c for c in CLUSTER_COLUMNS if c not in left_out]
    labels = numbered_clusters(anomaly_map, anomaly_mask)
    count = int(labels.max())
    if count == 0:
        return pd.DataFrame(columns=columns)
    index = np.arange(1, count + 1)
    scores = np.asarray(anomaly_map, dtype=np.float64)
    n_voxels = ndimage.sum_labels(np.ones_like(scores), labels, index).astype(int)
    peaks = ndimage.maximum_position(scores, labels, index)
    centroids = ndimage.center_of_mass(np.ones_like(scores), labels, index)
    voxel_volume = abs(float(np.linalg.det(affine[:3, :3])))

    def world(points) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return points @ affine[:3, :3].T + affine[:3, 3]

    peak_mm, centroid_mm = world(peaks), world(centroids)
    table = pd.DataFrame({
        "n_voxels": n_voxels,
        "volume_mm3": n_voxels * voxel_volume,
        "peak_score": ndimage.maximum(scores, labels, index),
        "mean_score": ndimage.mean(scores, labels, index),
        **{f"peak_{axis}": peak_mm[:, i] for i, axis in enumerate("xyz")},
        **{f"centroid_{axis}": centroid_mm[:, i] for i, axis in enumerate("xyz")},
    })
    if tissue is not None:
        table["tissue"] = _majority(labels, count, tissue, TISSUE_LABELS)
    if atlas is not None:
        table["atlas_label"] = _majority(labels, count, atlas, atlas_labels or {})
    table.insert(0, "cluster_id", index)  # numbered_clusters: largest first
    by_mean = table["mean_score"].rank(ascending=False, method="first").to_numpy()
    combined = table["cluster_id"].to_numpy() + by_mean
    order = np.lexsort((table["cluster_id"].to_numpy(), combined))
    ranks = np.empty(count, dtype=int)
    ranks[order] = np.arange(1, count + 1)
    table.insert(1, "rank_size_score", ranks)
    return table[columns].reset_index(drop=True)
