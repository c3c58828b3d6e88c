"""Weak supervision: the stored classifiers, the stacked family, the tuned post-processing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.metrics import average_precision_score

from bids_anomaly.models import NormativeModel, StackedModel, SubjectImages, TrainingData
from bids_anomaly.models.stacking.classifiers import (
    CLASSIFIERS,
    export_classifier,
    fit_classifier,
    predict_probability,
)
from bids_anomaly.models.weights import read_weights
from bids_anomaly.postprocessing.thresholds import healthy_scores, tail_table
from bids_anomaly.postprocessing.tuning import tune_postprocessing

SHAPE = (24, 28, 20)
FIRST = (slice(6, 10), slice(6, 10), slice(6, 10))  # bright on FLAIR only
SECOND = (slice(14, 18), slice(16, 20), slice(10, 14))  # dark on T1w only

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_an_exported_classifier_predicts_as_scikit_learn_does_from_arrays_alone(kind, tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3000, 5))
    labels = features[:, 0] + features[:, 1] * features[:, 2] > 1
    if kind == "hgb":
        features[::37, 3] = np.nan  # missing values take their stored side
    fitted = fit_classifier(kind, features, labels)
    exported = export_classifier(kind, fitted)
    from safetensors.torch import save_file

    save_file(exported, str(tmp_path / "c.safetensors"))
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as stream:
        loaded = {key: stream.get_tensor(key) for key in stream.keys()}
    assert all(t.dtype in (torch.float64, torch.int64) for t in loaded.values())
    new = rng.normal(size=(2000, 5))
    assert np.array_equal(predict_probability(kind, loaded, new),
                          fitted.predict_proba(new)[:, 1])


def _tissues(folder) -> list:
    """GM outside, WM inside, a CSF core: probability maps on the test grid."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    radius = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    csf = (radius < 0.2).astype(np.float32)
    wm = ((radius >= 0.2) & (radius < 0.6)).astype(np.float32)
    gm = ((radius >= 0.6) & (radius < 0.95)).astype(np.float32)
    paths = []
    for name, data in (("GM", gm), ("WM", wm), ("CSF", csf)):
        paths.append(folder / f"tpl_{name}.nii.gz")
        nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(paths[-1])
    return paths


def _subject(folder, index: int, lesions: tuple = ()) -> SubjectImages:
    """Healthy T1w and FLAIR patterns; FIRST bright on FLAIR, SECOND dark on T1w."""
    rng = np.random.default_rng(index)
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:-3, 3:-3, 3:-3] = 1
    x = np.arange(SHAPE[0])[:, None, None]
    paths = []
    for name in ("T1w", "FLAIR"):
        data = np.sin(x / 3.0) + 2 + rng.normal(0, 0.3, SHAPE)
        if FIRST in lesions and name == "FLAIR":
            data[FIRST] += 1.5
        if SECOND in lesions and name == "T1w":
            data[SECOND] -= 1.5
        paths.append(folder / f"s{index}_{name}.nii.gz")
        nib.Nifti1Image((data * mask).astype(np.float32), np.eye(4)).to_filename(paths[-1])
    nib.Nifti1Image(mask, np.eye(4)).to_filename(folder / f"s{index}_mask.nii.gz")
    lesion = None
    if lesions:
        truth = np.zeros(SHAPE, np.uint8)
        for block in lesions:
            truth[block] = 1
        lesion = folder / f"s{index}_lesion.nii.gz"
        nib.Nifti1Image(truth, np.eye(4)).to_filename(lesion)
    return SubjectImages(f"sub-{index}", paths, folder / f"s{index}_mask.nii.gz", lesion)


def _data(tmp_path, subjects) -> TrainingData:
    return TrainingData(subjects, ["T1w", "FLAIR"], tissues=_tissues(tmp_path))


def test_stacking_beats_either_score_when_they_carry_complementary_information(tmp_path):
    controls = [_subject(tmp_path, i) for i in range(6)]
    held_out = _data(tmp_path, [_subject(tmp_path, i) for i in range(6, 8)])
    annotated = [_subject(tmp_path, 20 + i, (FIRST, SECOND)) for i in range(2)]
    test = _subject(tmp_path, 40, (FIRST, SECOND))
    members = {}
    for name, direction in (("flair", ["FLAIR:+", "T1w:+"]), ("t1w", ["T1w:-", "FLAIR:-"])):
        model = NormativeModel(direction=direction)
        model.fit(_data(tmp_path, controls))
        members[name] = (model, tail_table(healthy_scores(model, held_out)))
    stacked = StackedModel(healthy_voxels=2000)
    for name, (model, tail) in members.items():
        stacked.members.add(name, model, ["T1w", "FLAIR"], tail)
    stacked.fit(_data(tmp_path, controls + annotated))
    image, mask = test.load()
    truth = test.load_lesion().numpy()[mask.numpy()]
    precision = {name: average_precision_score(truth, model.score(image, mask)[mask].numpy())
                 for name, (model, _) in members.items()}
    score = stacked.score(image, mask)
    precision["stacked"] = average_precision_score(truth, score[mask].numpy())
    assert precision["stacked"] > max(precision["flair"], precision["t1w"]) + 0.2, precision
    assert 0 <= float(score.min()) and float(score.max()) <= 1
    assert stacked.feature_names[:2] == ["flair:-log10p", "t1w:-log10p"]
    # stored without pickle: the weights are tensors and JSON, and reload to the same map
    stacked.save(tmp_path)
    tensors, hyperparameters = read_weights(tmp_path)
    assert json.loads(json.dumps(hyperparameters)) == hyperparameters
    loaded = StackedModel.load(tmp_path)
    torch.testing.assert_close(loaded.score(image, mask), score, rtol=0, atol=0)
    # out-of-fold maps: each annotated subject scored by a classifier fitted without it
    folds = stacked.out_of_fold_scores(_data(tmp_path, controls + annotated))
    assert sorted(folds) == ["sub-20", "sub-21"]
    torch.testing.assert_close(stacked.score(image, mask), score, rtol=0, atol=0)


def test_stacking_without_controls_learns_healthy_tissue_outside_the_lesions(tmp_path):
    annotated = [_subject(tmp_path, 20 + i, (FIRST, SECOND)) for i in range(3)]
    stacked = StackedModel(classifier="logistic", healthy_voxels=2000,
                           neighbourhood_features=True)
    stacked.fit(_data(tmp_path, annotated))
    assert len(stacked.feature_names) == 4 + 5 + 4
    test = _subject(tmp_path, 40, (FIRST,))
    image, mask = test.load()
    score = stacked.score(image, mask)
    inside = torch.zeros(SHAPE, dtype=torch.bool)
    inside[FIRST] = True
    assert score[inside].mean() > 5 * score[mask & ~inside].mean()


def test_stacking_refuses_data_without_annotations(tmp_path):
    from bids_anomaly.errors import MissingInputError

    with pytest.raises(MissingInputError, match="annotated"):
        StackedModel().fit(_data(tmp_path, [_subject(tmp_path, i) for i in range(3)]))


def test_cross_validated_tuning_recovers_a_known_optimal_threshold():
    """Healthy scores below 1, lesions above 1.6 plus a few bright isolated healthy voxels."""
    rng = np.random.default_rng(0)
    maps = {}
    for index in range(4):
        truth = np.zeros((30, 30, 30), bool)
        start = 4 + 5 * index
        truth[start:start + 4, 10:14, 10:15] = True
        truth[20:23, 20:24, start // 2:start // 2 + 3] = True
        score = rng.uniform(0, 1, truth.shape)
        score[truth] = rng.uniform(1.6, 3.0, truth.sum())
        spots = rng.choice(truth.size, 6, replace=False)
        score.ravel()[spots] = np.where(truth.ravel()[spots], score.ravel()[spots], 5.0)
        maps[f"sub-{index}"] = (score, truth, np.ones_like(truth))
    result = tune_postprocessing(maps, None, 8.0, label_free_threshold=0.999)
    assert 1.0 <= result.threshold < 1.6  # between every healthy and every lesion score
    assert result.min_cluster_voxels >= 2  # the isolated bright voxels are dropped
    assert result.min_cluster_mm3 == 8.0 * result.min_cluster_voxels
    assert result.training_objective == 1.0 and result.cv_objective == 1.0
    assert [s["subject"] for s in result.cv_subjects] == list(maps)
    assert result.label_free["dice"] < 0.9  # the label-free threshold flags healthy voxels
    lesion_f1 = tune_postprocessing(maps, None, 8.0, objective="lesion-f1")
    assert lesion_f1.training_objective == 1.0 and lesion_f1.min_cluster_voxels >= 2


def test_tuning_picks_the_white_matter_restriction_when_false_positives_lie_outside_it():
    rng = np.random.default_rng(1)
    tissue = np.ones((20, 20, 20), np.int64)
    tissue[5:15, 5:15, 5:15] = 2  # white matter in the middle
    truth = np.zeros(tissue.shape, bool)
    truth[8:11, 8:11, 8:11] = True
    score = rng.uniform(0, 1, truth.shape)
    score[truth] = 2.0
    score[0:4, 0:4, 0:4] = 3.0  # a large bright cluster in grey matter
    result = tune_postprocessing({"s": (score, truth, np.ones_like(truth))}, tissue, 1.0)
    assert result.restrict == "wm" and result.training_objective == 1.0
    assert result.cv_objective is None  # one subject: nothing to cross-validate
