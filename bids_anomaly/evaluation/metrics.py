"""Voxel-wise detection metrics (scikit-learn where it has them)."""

from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary arrays (1.0 when both are empty).

    >>> import numpy as np
    >>> dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    0.6666666666666666
    """
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (prediction & truth).sum() / total)


def voxel_metrics(scores: np.ndarray, truth: np.ndarray, threshold: float | None = None,
                  predicted: np.ndarray | None = None) -> dict[str, float]:
    """Compare a continuous anomaly map with a binary ground truth, voxel by voxel.

    Parameters
    ----------
    scores : numpy.ndarray
        Anomaly scores of the evaluated voxels (1D or any shape).
    truth : numpy.ndarray
        Binary ground truth, same shape.
    threshold : float, optional
        The model's calibrated threshold (scores above it are abnormal).
    predicted : numpy.ndarray, optional
        The abnormal voxels as written (after FDR, restriction, cluster size), instead of
        ``threshold``; one of the two is needed.

    Returns
    -------
    dict
        ``auroc`` and ``auprc`` (average precision), ``oracle_dice`` (the best Dice over all
        thresholds) with its ``oracle_threshold``, ``dice`` at ``threshold``, and
        ``truth_voxels`` / ``predicted_voxels``. AUROC and AUPRC are NaN when the truth has a
        single class.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    if predicted is None:
        if threshold is None:
            raise ValueError("voxel_metrics needs a threshold or the predicted mask")
        predicted = scores > threshold
    predicted = np.asarray(predicted, dtype=bool).ravel()
    result = {
        "truth_voxels": int(truth.sum()),
        "predicted_voxels": int(predicted.sum()),
        "dice": dice(predicted, truth),
        "auroc": float("nan"),
        "auprc": float("nan"),
        "oracle_dice": float("nan"),
        "oracle_threshold": float("nan"),
    }
    if truth.all() or not truth.any():
        return result
    result["auroc"] = float(roc_auc_score(truth, scores))
    result["auprc"] = float(average_precision_score(truth, scores))
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
    best = int(np.argmax(f1[:-1]))
    result["oracle_dice"] = float(f1[best])
    result["oracle_threshold"] = float(thresholds[best])
    return result


def lesion_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Lesion-wise detection: connected components of the truth and of the prediction.

    A true lesion (26-connected component of ``truth``) is detected when at least one of its
    voxels is predicted; a predicted cluster is a false positive when none of its voxels is a
    lesion voxel.

    Parameters
    ----------
    predicted, truth : numpy.ndarray
        Binary masks on one grid (3D, so that components are spatial).

    Returns
    -------
    dict
        ``n_lesions``, ``lesions_detected``, ``lesion_sensitivity`` (NaN without lesions),
        ``n_clusters`` (predicted), ``false_positive_clusters`` and ``cluster_precision`` (NaN
        without predicted clusters).

    >>> import numpy as np
    >>> truth = np.zeros((1, 1, 9), bool); truth[..., [1, 2, 6]] = True
    >>> predicted = np.zeros((1, 1, 9), bool); predicted[..., [2, 3, 8]] = True
    >>> lesion_metrics(predicted, truth)["lesions_detected"]
    1
    """
    from scipy import ndimage

    from bids_anomaly.postprocessing.clusters import CONNECTIVITY

    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    lesions, n_lesions = ndimage.label(truth, structure=CONNECTIVITY)
    clusters, n_clusters = ndimage.label(predicted, structure=CONNECTIVITY)
    detected = len(np.setdiff1d(np.unique(lesions[predicted]), [0]))
    true_clusters = len(np.setdiff1d(np.unique(clusters[truth]), [0]))
    return {
        "n_lesions": int(n_lesions),
        "lesions_detected": int(detected),
        "lesion_sensitivity": detected / n_lesions if n_lesions else float("nan"),
        "n_clusters": int(n_clusters),
        "false_positive_clusters": int(n_clusters - true_clusters),
        "cluster_precision": true_clusters / n_clusters if n_clusters else float("nan"),
    }
