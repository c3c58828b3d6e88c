"""Threshold calibration on healthy held-out data."""

from __future__ import annotations

import numpy as np
import torch

from bids_anomaly.models.base import AnomalyModel, TrainingData


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
    if not 0 < fpr < 1:
        raise ValueError(f"the false-positive rate must be in (0, 1), not {fpr}")
    scores = []
    with torch.no_grad():
        for image, mask in data:
            scores.append(model.score(image, mask)[mask].cpu().numpy())
    values = np.concatenate(scores)
    return float(np.quantile(values, 1.0 - fpr)), int(values.size)


def apply_threshold(anomaly_map: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """Binary (uint8) anomaly mask: brain voxels whose score exceeds ``threshold``."""
    return ((anomaly_map > threshold) & (mask > 0)).astype(np.uint8)
