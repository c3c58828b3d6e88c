"""The self-supervised families (segment, restore) and directional scores, tiny and on CPU."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_anomaly.errors import UsageError
from bids_anomaly.models import (
    REGISTRY,
    ChannelScorer,
    NormativeModel,
    SubjectImages,
    TrainingData,
)
from bids_anomaly.models.deep.engine import EngineOptions
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
    return REGISTRY[model_type](mode=mode, width=8, patch_size=16, patches_per_volume=2,
                                training=training, cache_dir=tmp_path / "cache", **kw)


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
    from bids_anomaly.models.selfsupervised import trimmed_negatives

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
