"""The self-supervised families (segment, restore) and directional scores, tiny and on CPU."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bids_anomaly.errors import UsageError
from bids_anomaly.models import (
    REGISTRY,
    ChannelScorer,
    NormativeModel,
    SubjectImages,
    TrainingData,
)
from bids_anomaly.models.deep.engine import EngineOptions
from bids_anomaly.models.deep.networks import Architecture
from bids_anomaly.models.directions import directed, parse_directions

SHAPE = (24, 28, 20)
LESION = (slice(10, 15), slice(12, 17), slice(8, 12))
SCALE = {"T1w": 1.0, "FLAIR": 2.0, "T2w": 3.0}


def _subject(folder, index: int, lesion: bool = False, channels=("T1w", "FLAIR")
             ) -> SubjectImages:
    """A smooth healthy pattern per channel; a lesion is bright on FLAIR, dark on T1w."""
    rng = np.random.default_rng(index)
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:-3, 3:-3, 3:-3] = 1
    x = np.arange(SHAPE[0])[:, None, None]
    paths = []
    for name in channels:  # each modality its own contrast, whatever the other channels
        data = np.sin(x / 3.0) * SCALE[name] + rng.normal(0, 0.1, SHAPE)
        if lesion:
            data[LESION] += 3.0 if name == "FLAIR" else -3.0
        path = folder / f"s{index}{'l' if lesion else ''}_{name}.nii.gz"
        nib.Nifti1Image((data * mask).astype(np.float32), np.eye(4)).to_filename(path)
        paths.append(path)
    mask_path = folder / f"s{index}_mask.nii.gz"
    nib.Nifti1Image(mask, np.eye(4)).to_filename(mask_path)
    return SubjectImages(f"sub-{index}", paths, mask_path)


def _model(model_type: str, mode: str, tmp_path, epochs: int = 1, **kw):
    training = EngineOptions(epochs=epochs, batch_size=8, num_workers=0, seed=3,
                             learning_rate=kw.pop("learning_rate", 1e-3), patience=0)
    return REGISTRY[model_type](**{"mode": mode, "width": 8, "patch_size": 16,
                                   "patches_per_volume": 2, "training": training,
                                   "cache_dir": tmp_path / "cache", **kw})


@pytest.mark.parametrize("model_type, mode", [
    ("segment", "2d"), ("segment", "2.5d"), ("segment", "3d"), ("restore", "2d"),
    ("restore", "2.5d"), ("restore", "3d"),
])
@pytest.mark.parametrize("channels", [("FLAIR",), ("T1w", "FLAIR")])
def test_one_epoch_scores_every_brain_voxel_and_round_trips(model_type, mode, channels,
                                                            tmp_path):
    data = TrainingData([_subject(tmp_path, i, channels=channels) for i in range(3)],
                        list(channels))
    model = _model(model_type, mode, tmp_path)
    model.fit(data)
    assert math.isfinite(model.fit_report["history"][0]["train_loss"])
    image, mask = data.subjects[0].load()
    score = model.score(image, mask)
    assert score.shape == SHAPE and torch.isfinite(score).all()
    assert (score[~mask] == 0).all() and (score[mask] >= 0).all() and score[mask].sum() > 0
    assert isinstance(model, ChannelScorer) == (model_type == "restore")
    (tmp_path / "model").mkdir()
    model.save(tmp_path / "model")
    loaded = type(model).load(tmp_path / "model")
    torch.testing.assert_close(loaded.score(image, mask), score)
    assert loaded.hyperparameters["anomaly_textures"] == ["shift", "noise", "foreign",
                                                          "poisson"]


@pytest.mark.parametrize("model_type", ["segment", "restore"])
def test_learns_from_synthetic_anomalies_to_find_a_real_looking_lesion(model_type, tmp_path):
    # trained on a cohort in which one subject has a lesion: no label is used
    subjects = [_subject(tmp_path, i) for i in range(5)] + [_subject(tmp_path, 20, lesion=True)]
    data = TrainingData(subjects, ["T1w", "FLAIR"])
    model = _model(model_type, "2d", tmp_path, epochs=15, learning_rate=3e-3,
                   direction=["FLAIR:+", "T1w:-"], anomaly_textures=["shift", "noise"],
                   anomaly_probability=1.0, anomaly_radius=(2.0, 4.0))
    model.fit(data)
    losses = [row["train_loss"] for row in model.fit_report["history"]]
    assert losses[-1] < losses[0]
    image, mask = _subject(tmp_path, 10, lesion=True).load()
    score = model.score(image, mask)
    inside = torch.zeros(SHAPE, dtype=torch.bool)
    inside[LESION] = True
    assert score[inside].mean() > 3 * score[mask & ~inside].mean()


def test_same_seed_same_weights(tmp_path):
    data = TrainingData([_subject(tmp_path, i) for i in range(3)], ["T1w", "FLAIR"])
    first, second = (_model("segment", "2d", tmp_path / name, epochs=2) for name in "ab")
    first.fit(data)
    second.fit(data)
    for key, value in first.network.state_dict().items():
        assert torch.equal(value, second.network.state_dict()[key]), key


def test_negative_trim_leaves_the_worst_normal_voxels_out(tmp_path):
    from bids_anomaly.models.selfsupervised.selfsupervised import trimmed_negatives

    loss = torch.tensor([[0.1, 5.0, 0.2, 9.0], [0.3, 0.4, 7.0, 0.5]])
    negatives = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert trimmed_negatives(loss, negatives, 0.3).nonzero().tolist() == [[0, 1], [1, 2]]
    assert not trimmed_negatives(loss, negatives, 0.0).any()
    data = TrainingData([_subject(tmp_path, i) for i in range(2)], ["T1w", "FLAIR"])
    model = _model("segment", "2d", tmp_path, negative_trim=0.01)
    model.fit(data)
    assert model.hyperparameters["negative_trim"] == 0.01
    with pytest.raises(UsageError, match="negative-trim"):
        _model("segment", "2d", tmp_path, negative_trim=0.5)


def test_restore_steps_and_options_are_checked(tmp_path):
    with pytest.raises(UsageError, match="restore-steps"):
        _model("restore", "2d", tmp_path, restore_steps=0)
    with pytest.raises(UsageError, match="lesion-shapes"):
        _model("segment", "2d", tmp_path, anomaly_shapes=["lesion"])
    with pytest.raises(UsageError, match="not a folder"):
        REGISTRY["segment"].check_options({"lesion_shapes": str(tmp_path / "none")})
    with pytest.raises(UsageError, match="CHANNEL:SIGN"):
        REGISTRY["restore"].check_options({"direction": ["FLAIR"]})
    data = TrainingData([_subject(tmp_path, i) for i in range(2)], ["T1w", "FLAIR"])
    with pytest.raises(UsageError, match="T2w"):
        _model("restore", "2d", tmp_path, direction=["T2w:+"]).fit(data)


def test_parse_directions_and_directed_signs():
    assert parse_directions(["FLAIR:+", "T1w:-", "T2w:both"]) == {
        "FLAIR": "+", "T1w": "-", "T2w": "+-"}
    assert parse_directions(None) == {} and parse_directions({"FLAIR": "+"}) == {"FLAIR": "+"}
    for bad in (["FLAIR"], ["FLAIR:up"], ["FLAIR:+", "FLAIR:-"], [":+"]):
        with pytest.raises(ValueError):
            parse_directions(bad)
    deviation = torch.tensor([[2.0, -2.0], [2.0, -2.0], [2.0, -2.0]])
    out = directed(deviation, ["FLAIR", "T1w", "T2w"], {"FLAIR": "+", "T1w": "-"})
    assert out.tolist() == [[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]
    assert directed(deviation[:1], None, {"FLAIR": "+"}, "+").tolist() == [[2.0, 0.0]]


def test_normative_direction_ignores_the_other_sign_and_is_stored(tmp_path):
    data = TrainingData([_subject(tmp_path, i) for i in range(5)], ["T1w", "FLAIR"])
    image, mask = _subject(tmp_path, 10, lesion=True).load()
    inside = torch.zeros(SHAPE, dtype=torch.bool)
    inside[LESION] = True
    both, bright_t1 = NormativeModel(), NormativeModel(direction=["T1w:+", "FLAIR:-"])
    both.fit(data)
    bright_t1.fit(data)
    assert both.score(image, mask)[inside].mean() > 10  # the lesion: FLAIR up, T1w down
    assert bright_t1.score(image, mask)[inside].mean() < 3  # neither sign counts here
    (tmp_path / "n").mkdir()
    bright_t1.save(tmp_path / "n")
    assert NormativeModel.load(tmp_path / "n").direction == {"T1w": "+", "FLAIR": "-"}
    assert "T1w +" in bright_t1.score_definition


def _annotated(tmp_path, index: int) -> SubjectImages:
    """A subject with the FLAIR-bright, T1w-dark lesion and its annotation."""
    subject = _subject(tmp_path, index, lesion=True)
    truth = np.zeros(SHAPE, np.uint8)
    truth[LESION] = 1
    subject.lesion = tmp_path / f"s{index}_lesion.nii.gz"
    nib.Nifti1Image(truth, np.eye(4)).to_filename(subject.lesion)
    return subject


def test_segment_learns_annotated_lesions_with_the_synthetic_ones(tmp_path):
    from bids_anomaly.models.deep.datasets import VolumeCache

    controls = [_subject(tmp_path, i) for i in range(4)]
    annotated = _annotated(tmp_path, 9)
    volume = VolumeCache(tmp_path / "cache").get(annotated)
    assert (volume[-1][LESION] == 2).all() and set(np.unique(volume[-1])) == {0.0, 1.0, 2.0}
    data = TrainingData([*controls, annotated], ["T1w", "FLAIR"])
    model = _model("segment", "2d", tmp_path, anomaly_probability=0.0)
    fit, validation, repeats = model._with_annotated(data, [0, 1, 2, 4], [3])
    assert 4 in fit and 4 not in validation and repeats == {4: 3}
    fit, validation, _ = model._with_annotated(data, [0, 1, 2, 3], [4])
    assert 4 in fit and validation and 4 not in validation  # never only validating
    with pytest.raises(UsageError, match="does not learn from annotated"):
        REGISTRY["ae"](mode="2d")._with_annotated(data, [0, 4], [1])
    # the annotated lesion is a target: without synthetic anomalies the loss differs only by it
    model.anomalies = model._generator_for(data)
    image = torch.from_numpy(np.array(volume[:-1, :, :, 10]))[None]
    label = torch.from_numpy(np.array(volume[-1:, :, :, 10]))[None]
    network = model._new_network(Architecture(
        model_type="segment", spatial_dims=2, in_channels=2, out_channels=1,
        input_shape=(24, 32), width=8))
    pad = (0, 32 - SHAPE[1])
    batch = [F.pad(image, pad), None, F.pad(label, pad)]
    with_lesion = model._batch_loss(network, tuple(batch), torch.Generator().manual_seed(0))
    batch[2] = (batch[2] > 0).float()
    without = model._batch_loss(network, tuple(batch), torch.Generator().manual_seed(0))
    assert with_lesion != without


def test_segment_finetunes_a_trained_model_and_refuses_another_network(tmp_path):
    from bids_anomaly.models.store import ModelCard, save_model

    data = TrainingData([_subject(tmp_path, i) for i in range(3)], ["T1w", "FLAIR"])
    trained = _model("segment", "2d", tmp_path)
    trained.fit(data)
    card = ModelCard(name="seg", model_type="segment", channels=["T1w", "FLAIR"],
                     template="MNI152NLin2009aSym", resolution=2, preprocessing={},
                     hyperparameters=trained.hyperparameters, training_participants=[],
                     calibration_participants=[], threshold=1.0, fpr=0.01,
                     calibration_voxels=1)
    save_model(trained, card, tmp_path / "model-seg")
    tuned = _model("segment", "2d", tmp_path, finetune="seg")
    tuned.finetune_dir = tmp_path / "model-seg"
    tuned.image_shape = trained.image_shape
    state = tuned.initial_state(None, TrainingData([_annotated(tmp_path, 9)],
                                                   ["T1w", "FLAIR"]))
    for key, value in trained.network.state_dict().items():
        torch.testing.assert_close(state[key], value)
    assert tuned.hyperparameters["finetune"] == "seg"
    wider = _model("segment", "2d", tmp_path, finetune="seg", width=16)
    wider.finetune_dir, wider.image_shape = tmp_path / "model-seg", trained.image_shape
    with pytest.raises(UsageError, match="width"):
        wider.initial_state(None, data)
    with pytest.raises(UsageError, match="trained on T1w, FLAIR"):
        tuned.initial_state(None, TrainingData([], ["FLAIR"]))
