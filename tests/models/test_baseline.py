"""The intensity-thresholding baseline, through the AnomalyModel interface, on generated volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_anomaly.errors import BadDataError
from bids_anomaly.models import (
    REGISTRY,
    AnomalyModel,
    IntensityBaseline,
    ModelCard,
    TrainingData,
    load_model,
    save_model,
)

SHAPE = (24, 24, 24)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _brain_mask() -> torch.Tensor:
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[3:-3, 3:-3, 3:-3] = True
    return mask


def _image_with_blob(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two noisy channels; channel 1 has a bright blob; the background outside is very bright."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(10.0, 1.0, (2, *SHAPE)).astype(np.float32))
    blob = torch.zeros(SHAPE, dtype=torch.bool)
    blob[10:14, 10:14, 10:14] = True
    image[1][blob] += 6.0
    mask = _brain_mask()
    image[:, ~mask] = 500.0
    return image, mask, blob


def test_is_a_registered_anomaly_model():
    assert REGISTRY["intensity"] is IntensityBaseline
    assert isinstance(IntensityBaseline(), AnomalyModel)


@pytest.mark.parametrize("device", DEVICES)
def test_bright_blob_scores_highest_for_hyper_and_lowest_for_hypo(device):
    image, mask, blob = _image_with_blob()
    image, mask = image.to(device), mask.to(device)
    hyper = IntensityBaseline(channel=1, direction="hyper").score(image, mask)
    hypo = IntensityBaseline(channel=1, direction="hypo").score(image, mask)
    both = IntensityBaseline(channel=1, direction="both").score(image, mask)
    assert hyper.device.type == device and hyper.dtype == torch.float32
    assert hyper.shape == SHAPE
    blob = blob.to(device)
    healthy = mask & ~blob
    assert hyper[blob].min() > hyper[healthy].quantile(0.999)
    assert hypo[blob].max() < hypo[healthy].quantile(0.001)
    assert torch.equal(hypo, -hyper)
    assert torch.equal(both, hyper.abs())


def test_chooses_the_channel():
    image, mask, blob = _image_with_blob()
    other = IntensityBaseline(channel=0).score(image, mask)
    assert other[blob].mean() < 1.0


def test_noise_gives_standard_robust_z_inside_and_zero_outside_the_mask():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.normal(40.0, 7.0, (1, *SHAPE)).astype(np.float32))
    mask = _brain_mask()
    image[:, ~mask] = 1000.0
    score = IntensityBaseline().score(image, mask)
    z = score[mask]
    assert abs(z.median().item()) < 0.03
    robust_sd = 1.4826 * (z - z.median()).abs().median().item()
    assert robust_sd == pytest.approx(1.0, abs=0.03)
    assert (score[~mask] == 0).all()


def test_empty_mask_scores_zero_and_constant_brain_is_refused():
    image = torch.ones((1, *SHAPE))
    assert (IntensityBaseline().score(image, torch.zeros(SHAPE, dtype=torch.bool)) == 0).all()
    with pytest.raises(BadDataError, match="constant"):
        IntensityBaseline().score(image, _brain_mask())


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    image, mask, _ = _image_with_blob(seed=2)
    model = IntensityBaseline(channel=1, direction="both")
    model.save(tmp_path)
    loaded = IntensityBaseline.load(tmp_path)
    assert loaded.hyperparameters == {"channel": 1, "direction": "both"}
    assert torch.equal(loaded.score(image, mask), model.score(image, mask))


def test_round_trip_through_the_model_directory(tmp_path):
    model = IntensityBaseline(channel=1, direction="hypo")
    model.fit(TrainingData([], ["T1w", "FLAIR"]))
    card = ModelCard(name="flair", model_type="intensity", channels=["T1w", "FLAIR"],
                     template="MNI", resolution=2, preprocessing={},
                     hyperparameters=model.hyperparameters, training_participants=[],
                     calibration_participants=[], threshold=3.0, fpr=0.01, calibration_voxels=1,
                     score_definition=IntensityBaseline.score_definition)
    loaded, _ = load_model(save_model(model, card, tmp_path / "model-flair"))
    assert isinstance(loaded, IntensityBaseline)
    assert loaded.hyperparameters == model.hyperparameters


@pytest.mark.parametrize("settings", [{"direction": "bright"}, {"direction": "Hyper"},
                                      {"channel": -1}])
def test_invalid_settings_raise(settings):
    with pytest.raises(ValueError, match="direction|channel"):
        IntensityBaseline(**settings)


def test_fit_refuses_a_channel_the_data_do_not_have():
    with pytest.raises(ValueError, match="channel 2.*only 2 channels"):
        IntensityBaseline(channel=2).fit(TrainingData([], ["T1w", "FLAIR"]))
    with pytest.raises(BadDataError, match="channel 2"):
        IntensityBaseline(channel=2).score(torch.ones((2, *SHAPE)), _brain_mask())
