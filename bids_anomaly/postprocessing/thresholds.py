"""Thresholds from healthy data: a voxel false-positive rate, or p-values and FDR control."""

from __future__ import annotations

import numpy as np
import torch

from bids_anomaly.models.calibration import TAIL_POINTS, tail_table
from bids_anomaly.models.contract import AnomalyModel, scorer_for
from bids_anomaly.models.data import TrainingData, valid_voxels

__all__ = ["TAIL_POINTS", "tail_table"]

def healthy_scores(model: AnomalyModel, data: TrainingData) -> np.ndarray:
    """Scores of the valid brain voxels of held-out healthy subjects (1D float64)."""
    scores = []
    with torch.no_grad():
        for subject in data.subjects:
            image, mask = subject.load(data.device)
            valid = valid_voxels(image, mask)
            scorer = scorer_for(model, subject)
            scores.append(scorer.score(image, mask)[valid].double().cpu().numpy())
    return np.concatenate(scores)


def threshold_at_fpr(values: np.ndarray, fpr: float) -> float:
    """The ``1 - fpr`` quantile of healthy scores: scores strictly above it are abnormal."""
    if not 0 < fpr < 1:
        raise ValueError(f"the false-positive rate must be in (0, 1), not {fpr}")
    return float(np.quantile(values, 1.0 - fpr))


def calibrate_threshold(model: AnomalyModel, data: TrainingData, fpr: float) -> tuple[float, int]:
    """Score held-out healthy subjects and return the (1 - fpr) quantile of brain-voxel scores.

    Parameters
    ----------
    model : AnomalyModel
        A fitted model.
    data : TrainingData
        Healthy subjects the model was not fitted on.
    fpr : float
        Target voxel-wise false-positive rate, in (0, 1).

    Returns
    -------
    threshold : float
        Scores strictly above it are abnormal.
    n_voxels : int
        Number of healthy voxels the quantile was taken over.
    """
    values = healthy_scores(model, data)
    return threshold_at_fpr(values, fpr), int(values.size)


def p_values(scores: np.ndarray, tail: dict) -> np.ndarray:
    """Empirical p-values of scores against a healthy tail (:func:`tail_table`).

    Log-linear interpolation between the stored quantiles; scores beyond the largest healthy
    score get ``1 / (n + 1)``, the smallest p-value ``n`` healthy voxels can support.

    >>> tail = tail_table(np.arange(1000.0))
    >>> p_values(np.array([-1.0, 989.5, 5000.0]), tail).round(4).tolist()
    [1.0, 0.0095, 0.001]
    """
    levels = np.asarray(tail["score"])[::-1]
    log_p = np.log(np.asarray(tail["p"]))[::-1]
    levels, unique = np.unique(levels, return_index=True)
    log_p = log_p[unique]
    p = np.exp(np.interp(scores, levels, log_p, left=0.0, right=np.log(1.0 / (tail["n"] + 1))))
    return np.clip(p, 1.0 / (tail["n"] + 1), 1.0)


def benjamini_hochberg(p: np.ndarray, q: float) -> np.ndarray:
    """Benjamini-Hochberg: which p-values are discoveries at false-discovery rate ``q``.

    >>> benjamini_hochberg(np.array([0.001, 0.008, 0.039, 0.041, 0.6]), 0.05).tolist()
    [True, True, False, False, False]
    """
    if not 0 < q < 1:
        raise ValueError(f"the false-discovery rate must be in (0, 1), not {q}")
    p = np.asarray(p, dtype=np.float64).ravel()
    order = np.argsort(p)
    ranked = p[order] <= q * np.arange(1, p.size + 1) / p.size
    rejected = np.zeros(p.size, dtype=bool)
    if ranked.any():
        rejected[order[:np.flatnonzero(ranked).max() + 1]] = True
    return rejected


def apply_threshold(anomaly_map: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """Binary (uint8) anomaly mask: brain voxels whose score exceeds ``threshold``."""
    return ((anomaly_map > np.float64(threshold)) & (mask > 0)).astype(np.uint8)


def fdr_mask(anomaly_map: np.ndarray, mask: np.ndarray, tail: dict,
             q: float) -> tuple[np.ndarray, float]:
    """Binary mask of the brain voxels discovered at FDR ``q``, and the score cut it implies.

    Returns
    -------
    mask : numpy.ndarray
        uint8.
    threshold : float
        The smallest discovered score (inf when nothing is discovered).
    """
    brain = mask > 0
    scores = anomaly_map[brain]
    discovered = benjamini_hochberg(p_values(scores, tail), q)
    out = np.zeros(anomaly_map.shape, dtype=np.uint8)
    out[brain] = discovered
    threshold = float(scores[discovered].min()) if discovered.any() else float("inf")
    return out, threshold
