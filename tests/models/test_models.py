"""Both statistical models, through the AnomalyModel interface, on generated volumes."""

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_anomaly.errors import BadDataError
from bids_anomaly.models import (
    REGISTRY,
    AnomalyModel,
    ModelCard,
    SubjectImages,
    TrainingData,
    load_model,
    save_model,
)
from bids_anomaly.postprocessing.thresholds import calibrate_threshold

SHAPE = (16, 16, 16)


def _healthy_subject(tmp_path, index: int, lesion: bool = False) -> SubjectImages:
    """Two channels with a smooth spatial pattern, subject noise, and optionally a bright cube."""
    rng = np.random.default_rng(index)
    x = np.linspace(-1, 1, SHAPE[0])
    pattern = np.add.outer(np.add.outer(x, x), x).astype(np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:-2, 2:-2, 2:-2] = 1
    channels = []
    for c in range(2):
        data = (1 + c) * pattern + rng.normal(0, 0.2, SHAPE).astype(np.float32)
        if lesion:
            data[6:10, 6:10, 6:10] += 3.0
        path = tmp_path / f"s{index}_c{c}.nii.gz"
        nib.Nifti1Image(data * mask, np.eye(4)).to_filename(path)
        channels.append(path)
    mask_path = tmp_path / f"s{index}_mask.nii.gz"
    nib.Nifti1Image(mask, np.eye(4)).to_filename(mask_path)
    return SubjectImages(f"sub-{index}", channels, mask_path)


@pytest.fixture
def healthy(tmp_path):
    return TrainingData([_healthy_subject(tmp_path, i) for i in range(8)], ["T1w", "FLAIR"])


def _model(model_type):
    return REGISTRY[model_type](**({} if model_type == "normative" else {"n_components": 3}))


@pytest.mark.parametrize("model_type", ["normative", "gmm", "tmm", "mmst"])
def test_lesion_scores_above_healthy_threshold(model_type, healthy, tmp_path):
    model = _model(model_type)
    assert isinstance(model, AnomalyModel)
    fit, held_out = healthy.split(0.25, seed=1)
    model.fit(fit)
    threshold, n_voxels = calibrate_threshold(model, held_out, fpr=0.01)
    assert n_voxels == 2 * 12**3
    image, mask = _healthy_subject(tmp_path, 99, lesion=True).load()
    score = model.score(image, mask)
    assert score.shape == mask.shape
    assert (score[~mask] == 0).all()
    lesion = torch.zeros_like(mask)
    lesion[6:10, 6:10, 6:10] = True
    detected = (score > threshold) & lesion
    false_positives = (score > threshold) & mask & ~lesion
    assert detected.sum() / lesion.sum() > 0.9
    assert false_positives.sum() / (mask & ~lesion).sum() < 0.05


@pytest.mark.parametrize("model_type", ["normative", "gmm", "tmm", "mmst"])
def test_save_load_round_trip(model_type, healthy, tmp_path):
    model = _model(model_type)
    model.fit(healthy)
    card = ModelCard(name="m", model_type=model_type, channels=["T1w", "FLAIR"], template="MNI",
                     resolution=2, preprocessing={"registration": "SyN"},
                     hyperparameters=model.hyperparameters, training_participants=healthy.names,
                     calibration_participants=[], threshold=1.5, fpr=0.01, calibration_voxels=1)
    directory = save_model(model, card, tmp_path / "model-m")
    loaded, loaded_card = load_model(directory)
    image, mask = healthy.subjects[0].load()
    assert torch.allclose(loaded.score(image, mask), model.score(image, mask))
    assert loaded_card.threshold == 1.5 and loaded_card.checksum == card.checksum
    # a weights file changed behind the card's back is refused
    weights = directory / "weights.safetensors"
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF
    weights.write_bytes(bytes(content))
    with pytest.raises(BadDataError, match="checksum"):
        load_model(directory)


def test_card_refuses_other_channels_and_template():
    card = ModelCard(name="m", model_type="normative", channels=["T1w", "FLAIR"], template="MNI",
                     resolution=2, preprocessing={"registration": "SyN"}, hyperparameters={},
                     training_participants=[], calibration_participants=[], threshold=1.0,
                     fpr=0.01, calibration_voxels=1)
    card.check_compatible(["T1w", "FLAIR", "T2w"], "MNI", 2, {"registration": "SyN"})
    with pytest.raises(BadDataError, match="FLAIR is missing"):
        card.check_compatible(["T1w"], "MNI", 2, {})
    with pytest.raises(BadDataError, match="at 2 mm"):
        card.check_compatible(["T1w", "FLAIR"], "MNI", 1, {})
    with pytest.raises(BadDataError, match="registration"):
        card.check_compatible(["T1w", "FLAIR"], "MNI", 2, {"registration": "Affine"})


def test_split_needs_three_subjects(healthy):
    small = TrainingData(healthy.subjects[:2], healthy.channels)
    with pytest.raises(Exception, match="at least 3 subjects"):
        small.split(0.2)
    fit, held = healthy.split(0.2, seed=0)
    assert not set(fit.names) & set(held.names)
    assert len(fit) + len(held) == len(healthy)
