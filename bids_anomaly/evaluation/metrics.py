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


def voxel_metrics(scores: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """Compare a continuous anomaly map with a binary ground truth, voxel by voxel.

    Parameters
    ----------
    scores : numpy.ndarray
        Anomaly scores of the evaluated voxels (1D or any shape).
    truth : numpy.ndarray
        Binary ground truth, same shape.
    threshold : float
        The model's calibrated threshold (scores above it are abnormal).

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
    predicted = scores > threshold
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
