"""The deep reconstruction models and their training engine, with tiny networks on CPU."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_anomaly.errors import BadDataError
from bids_anomaly.models import (
    REGISTRY,
    ModelCard,
    SubjectImages,
    TrainingData,
    load_model,
    save_model,
)
from bids_anomaly.models.deep.datasets import (
    PatchDataset,
    SliceDataset,
    VolumeCache,
    pad_to,
    stack_slices,
)
from bids_anomaly.models.deep.engine import CHECKPOINT_FILE, LOSSES_FILE, EngineOptions
from bids_anomaly.models.weights import WEIGHTS_FILE

SHAPE = (24, 28, 20)
LESION = (slice(10, 15), slice(12, 17), slice(8, 12))


def _subject(folder, index: int, lesion: bool = False) -> SubjectImages:
    """Two channels with a smooth healthy pattern; a lesion is bright in channel 0."""
    rng = np.random.default_rng(index)
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:-3, 3:-3, 3:-3] = 1
    x = np.arange(SHAPE[0])[:, None, None]
    channels = []
    for c in range(2):
        data = np.sin(x / 3.0) * (1 + c) + rng.normal(0, 0.1, SHAPE)
        if lesion and c == 0:
            data[LESION] += 4.0
        path = folder / f"s{index}{'l' if lesion else ''}_c{c}.nii.gz"
        nib.Nifti1Image((data * mask).astype(np.float32), np.eye(4)).to_filename(path)
        channels.append(path)
    mask_path = folder / f"s{index}_mask.nii.gz"
    nib.Nifti1Image(mask, np.eye(4)).to_filename(mask_path)
    return SubjectImages(f"sub-{index}", channels, mask_path)


@pytest.fixture
def cohort(tmp_path):
    return TrainingData([_subject(tmp_path, i) for i in range(4)], ["T1w", "FLAIR"])


def _model(model_type: str, mode: str, tmp_path, epochs: int = 1, checkpoints=None, **kw):
    training = EngineOptions(epochs=epochs, batch_size=8, num_workers=0, seed=3,
                             checkpoint_dir=checkpoints, **kw)
    return REGISTRY[model_type](
        mode=mode, width=4, latent=4, patch_size=32, vit_patch=16 if mode == "3d" else 4,
        patches_per_volume=2, training=training, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("model_type, mode", [
    ("ae", "2d"), ("ae", "2.5d"), ("ae", "3d"), ("vae", "2d"), ("vae", "3d"),
    ("vqvae", "2d"), ("vqvae", "3d"), ("vit-ae", "2d"), ("vit-ae", "2.5d"), ("dae", "2d"),
    ("dae", "3d"),
])
def test_one_epoch_then_whole_volume_scores(model_type, mode, cohort, tmp_path):
    model = _model(model_type, mode, tmp_path)
    model.fit(cohort)
    history = model.fit_report["history"]
    assert len(history) == 1
    assert math.isfinite(history[0]["train_loss"]) and math.isfinite(
        history[0]["validation_loss"])
    image, mask = cohort.subjects[0].load()
    score = model.score(image, mask)
    assert score.shape == SHAPE and torch.isfinite(score).all()
    assert (score[~mask] == 0).all() and score[mask].abs().sum() > 0
    per_channel = model.channel_scores(image, mask)  # absolute residuals, smoothed
    assert per_channel.shape == (2, *SHAPE)
    assert (per_channel >= 0).all() and (per_channel[:, ~mask] == 0).all()
    assert (per_channel[:, mask] > 0).any(dim=1).all()  # every channel contributes


def test_training_lowers_the_loss_and_finds_a_lesion(tmp_path):
    data = TrainingData([_subject(tmp_path, i) for i in range(6)], ["T1w", "FLAIR"])
    model = _model("dae", "2d", tmp_path, epochs=12, learning_rate=3e-3, patience=0)
    model.fit(data)
    losses = [row["train_loss"] for row in model.fit_report["history"]]
    assert losses[-1] < 0.5 * losses[0]
    image, mask = _subject(tmp_path, 10, lesion=True).load()
    score = model.score(image, mask)
    inside = torch.zeros(SHAPE, dtype=torch.bool)
    inside[LESION] = True
    assert score[inside].mean() > 3 * score[mask & ~inside].mean()


def test_resume_after_a_kill_reaches_the_same_state(cohort, tmp_path):
    straight = _model("vae", "2d", tmp_path, epochs=3, checkpoints=tmp_path / "a")
    straight.fit(cohort)

    killed = _model("vae", "2d", tmp_path, epochs=3, checkpoints=tmp_path / "b")
    calls = {"n": 0}
    original = killed._batch_loss
    steps_per_epoch = math.ceil(
        len(SliceDataset([VolumeCache(tmp_path / "cache").get(s) for s in
                          cohort.subjects[:3]], (32, 32))) / 8)

    def dying_loss(module, batch, generator):
        if generator is None:  # a training step
            calls["n"] += 1
            if calls["n"] > 2 * steps_per_epoch:
                raise KeyboardInterrupt  # killed during the third epoch
        return original(module, batch, generator)

    killed._batch_loss = dying_loss
    with pytest.raises(KeyboardInterrupt):
        killed.fit(cohort)
    saved = torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)
    assert saved["epoch"] == 2
    resumed = _model("vae", "2d", tmp_path, epochs=3, checkpoints=tmp_path / "b")
    resumed.fit(cohort)
    assert resumed.fit_report["resumed_from_epoch"] == 2
    for key, value in straight.network.state_dict().items():
        assert torch.equal(value, resumed.network.state_dict()[key]), key
    assert [row["train_loss"] for row in resumed.fit_report["history"]] == [
        row["train_loss"] for row in straight.fit_report["history"]]
    assert (tmp_path / "b" / LOSSES_FILE).read_text().count("\n") == 4


def test_early_stopping_keeps_the_best_epoch(cohort, tmp_path):
    model = _model("ae", "2d", tmp_path, epochs=6, learning_rate=0.0, patience=2,
                   warmup_epochs=0.0)
    model.fit(cohort)  # nothing can improve: it stops after 1 + patience epochs
    report = model.fit_report
    assert report["stopped_early"] and report["epochs_run"] == 3 and report["best_epoch"] == 1


def _card(model, name="deep", channels=("T1w", "FLAIR")) -> ModelCard:
    return ModelCard(name=name, model_type=model.model_type, channels=list(channels),
                     template="MNI152NLin2009aSym", resolution=2, preprocessing={},
                     hyperparameters=model.hyperparameters, training_participants=["sub-0"],
                     calibration_participants=[], threshold=1.0, fpr=0.001,
                     calibration_voxels=1)


@pytest.mark.parametrize("model_type, mode", [("vqvae", "2d"), ("dae", "3d")])
def test_save_load_round_trip(model_type, mode, cohort, tmp_path):
    model = _model(model_type, mode, tmp_path)
    model.fit(cohort)
    directory = save_model(model, _card(model), tmp_path / "model")
    loaded, card = load_model(directory)
    assert type(loaded) is type(model) and card.model_type == model_type
    image, mask = cohort.subjects[1].load()
    assert torch.equal(loaded.score(image, mask), model.score(image, mask))
    assert loaded.fit_report["epochs_run"] == 1


def test_mismatched_models_are_refused(cohort, tmp_path):
    model = _model("ae", "2d", tmp_path)
    model.fit(cohort)
    directory = save_model(model, _card(model), tmp_path / "model")
    loaded, card = load_model(directory)
    with pytest.raises(BadDataError, match="needs channels"):
        card.check_compatible(["T1w"], "MNI152NLin2009aSym", 2, {})
    with pytest.raises(BadDataError, match="trained in"):
        card.check_compatible(["T1w", "FLAIR"], "MNI152NLin6Asym", 2, {})
    image, mask = cohort.subjects[0].load()
    with pytest.raises(BadDataError, match="channel"):
        loaded.score(image[:1], mask)
    with pytest.raises(BadDataError, match="grid"):
        loaded.score(image[:, :-2], mask[:-2])
    # weights that do not fit the stored architecture: rewrite them with another width
    from bids_anomaly.models.store import file_checksum
    from bids_anomaly.models.weights import read_weights, write_weights

    tensors, hyperparameters = read_weights(directory)
    hyperparameters["architecture"]["width"] = 8
    write_weights(directory, tensors, hyperparameters)
    card_path = directory / "model.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()),
                                     "checksum": file_checksum(directory / WEIGHTS_FILE)}))
    with pytest.raises(BadDataError, match="do not match"):
        load_model(directory)


def test_stack_slices_and_padding():
    volume = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    stacks = stack_slices(volume, 1)
    assert stacks.shape == (5, 6, 3, 4)
    # slice 2's stack: channel c of slices 1, 2, 3
    assert torch.equal(stacks[2, 0], volume[0, ..., 1])
    assert torch.equal(stacks[2, 4], volume[1, ..., 2])
    assert (stacks[0, 0] == 0).all()  # beyond the volume
    assert torch.equal(stack_slices(volume, 0)[3], volume[..., 3])
    padded, crop = pad_to(volume, (8, 8, 8))
    assert padded.shape == (2, 8, 8, 8) and torch.equal(padded[(slice(None), *crop)], volume)


def test_slice_dataset_matches_inference_stacks(cohort, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    volume = cache.get(cohort.subjects[0])
    assert cache.get(cohort.subjects[0]).filename == volume.filename  # cached, not rewritten
    dataset = SliceDataset([volume], (32, 32), context=1)
    inputs, target, mask = dataset[3]
    number, z = dataset.index[3]
    expected = pad_to(stack_slices(torch.from_numpy(np.array(volume[:-1])), 1)[z],
                      (32, 32))[0]
    assert torch.equal(inputs, expected)
    assert target.shape == (2, 32, 32) and mask.shape == (1, 32, 32)


def test_patches_depend_on_seed_epoch_and_index_only(cohort, tmp_path):
    volumes = [VolumeCache(tmp_path / "cache").get(s) for s in cohort.subjects]
    dataset = PatchDataset(volumes, (16, 16, 16), per_volume=3, seed=1)
    n = len(dataset)
    assert n == 12
    first, again = dataset[5], PatchDataset(volumes, (16, 16, 16), 3, seed=1)[5]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    next_epoch = dataset[n + 5]
    assert not torch.equal(first[0], next_epoch[0])
    assert first[2].sum() > 0  # centred in the brain
