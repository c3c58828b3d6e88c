import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from bids_anomaly.evaluation.metrics import dice, voxel_metrics


def test_metrics_agree_with_scikit_learn_and_brute_force():
    rng = np.random.default_rng(0)
    truth = rng.random(2000) < 0.1
    scores = truth * 1.0 + rng.normal(0, 0.7, truth.size)
    metrics = voxel_metrics(scores, truth, threshold=0.8)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(truth, scores))
    assert metrics["auprc"] == pytest.approx(average_precision_score(truth, scores))
    assert metrics["dice"] == pytest.approx(f1_score(truth, scores > 0.8))
    brute = max(dice(scores >= t, truth) for t in np.unique(scores))
    assert metrics["oracle_dice"] == pytest.approx(brute)
    assert metrics["oracle_dice"] >= metrics["dice"]


def test_single_class_truth_gives_nan_not_error():
    metrics = voxel_metrics(np.arange(10.0), np.zeros(10, bool), threshold=5)
    assert np.isnan(metrics["auroc"]) and metrics["predicted_voxels"] == 4
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
