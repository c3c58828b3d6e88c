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


def test_written_mask_is_used_instead_of_a_threshold():
    scores = np.array([0.1, 0.9, 0.8, 0.2])
    truth = np.array([0, 1, 1, 0], bool)
    predicted = np.array([0, 1, 0, 0], bool)  # e.g. a small cluster removed
    metrics = voxel_metrics(scores, truth, predicted=predicted)
    assert metrics["dice"] == pytest.approx(f1_score(truth, predicted))
    with pytest.raises(ValueError):
        voxel_metrics(scores, truth)


def test_lesion_wise_detection_counts_components():
    from bids_anomaly.evaluation.metrics import lesion_metrics

    truth = np.zeros((12, 12, 12), bool)
    truth[1:3, 1:3, 1:3] = True  # lesion A: detected by one voxel
    truth[6:8, 6:8, 6:8] = True  # lesion B: missed
    truth[10, 10, 10] = truth[11, 11, 11] = True  # lesion C: corner-connected, one lesion
    predicted = np.zeros_like(truth)
    predicted[2, 2, 2] = True  # hits A
    predicted[11, 11, 11] = True  # hits C
    predicted[4:6, 0, 0] = True  # false positive cluster
    predicted[0, 9:11, 0] = True  # another one
    metrics = lesion_metrics(predicted, truth)
    assert metrics["n_lesions"] == 3 and metrics["lesions_detected"] == 2
    assert metrics["lesion_sensitivity"] == pytest.approx(2 / 3)
    assert metrics["n_clusters"] == 4 and metrics["false_positive_clusters"] == 2
    assert metrics["cluster_precision"] == pytest.approx(0.5)
    empty = lesion_metrics(np.zeros_like(truth), np.zeros_like(truth))
    assert np.isnan(empty["lesion_sensitivity"]) and np.isnan(empty["cluster_precision"])
