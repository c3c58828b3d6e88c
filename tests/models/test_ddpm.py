"""The denoising diffusion family (ddpm) and its variants, with tiny networks on CPU."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_anomaly.cli.parser import parse_arguments, settings_from_args
from bids_anomaly.cli.run import main
from bids_anomaly.errors import UsageError
from bids_anomaly.models import (
    REGISTRY,
    ChannelScorer,
    ModelCard,
    TrainingData,
    load_model,
    save_model,
)
from bids_anomaly.models.ddpm import Noising, gradient_noise, tiles
from bids_anomaly.models.deep.datasets import SliceDataset, VolumeCache
from bids_anomaly.models.deep.engine import CHECKPOINT_FILE, EngineOptions
from tests.conftest import write_minimal_bids
from tests.models.test_selfsupervised import LESION, SHAPE, _subject  # FLAIR +, T1w - lesion

VARIANTS = {
    "gaussian": {},
    "simplex (AnoDDPM)": {"noise": "simplex", "simplex_scale": 8},
    "patches (pDDPM)": {"noise_patch": 12},
    "conditioned (cDDPM)": {"condition_scale": 4},
    "mahalanobis (sMHD)": {"reconstructions": 3, "aggregation": "mahalanobis"},
    "3d": {"mode": "3d"},
    "3d patches, simplex": {"mode": "3d", "noise_patch": 8, "noise": "simplex", "ddim_steps": 1},
}


def _model(tmp_path, epochs: int = 1, checkpoints=None, learning_rate: float = 1e-3, **kw):
    training = EngineOptions(epochs=epochs, batch_size=8, num_workers=0, seed=3, patience=0,
                             learning_rate=learning_rate, checkpoint_dir=checkpoints)
    return REGISTRY["ddpm"](**{"width": 8, "patch_size": 16, "patches_per_volume": 2,
                               "ddim_steps": 3, "training": training,
                               "cache_dir": tmp_path / "cache", **kw})


@pytest.fixture
def cohort(tmp_path):
    return TrainingData([_subject(tmp_path, i) for i in range(3)], ["T1w", "FLAIR"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_one_epoch_scores_and_round_trips(variant, cohort, tmp_path,
                                                              one_torch_thread):
    model = _model(tmp_path, **VARIANTS[variant])
    model.fit(cohort)
    history = model.fit_report["history"]
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert math.isfinite(history[0]["validation_loss"])
    image, mask = cohort.subjects[0].load()
    assert isinstance(model, ChannelScorer)
    per_channel = model.channel_scores(image, mask)
    assert per_channel.shape == (2, *SHAPE) and (per_channel[:, mask] > 0).any(dim=1).all()
    score = model.score(image, mask)  # seeded: the same reconstructions every time
    torch.testing.assert_close(score, model.combine(per_channel))
    assert score.shape == SHAPE and torch.isfinite(score).all()
    assert (score[~mask] == 0).all() and (score[mask] >= 0).all() and score[mask].sum() > 0
    (tmp_path / "model").mkdir()
    model.save(tmp_path / "model")
    loaded = type(model).load(tmp_path / "model")
    assert loaded.hyperparameters == model.hyperparameters
    torch.testing.assert_close(loaded.score(image, mask), score)


def test_a_model_directory_round_trips_with_its_card(cohort, tmp_path, one_torch_thread):
    model = _model(tmp_path, condition_scale=4, noise_patch=12)
    model.fit(cohort)
    card = ModelCard(name="ddpm", model_type="ddpm", channels=["T1w", "FLAIR"],
                     template="MNI152NLin2009aSym", resolution=2, preprocessing={},
                     hyperparameters=model.hyperparameters, training_participants=cohort.names,
                     calibration_participants=[], threshold=1.0, fpr=0.01,
                     calibration_voxels=1, score_definition=model.score_definition)
    save_model(model, card, tmp_path / "model-ddpm")
    loaded, read = load_model(tmp_path / "model-ddpm")
    assert read.hyperparameters["condition_scale"] == 4 and loaded.n_channels == 2
    assert "pDDPM" in read.score_definition and "conditioned" in read.score_definition
    image, mask = cohort.subjects[1].load()
    torch.testing.assert_close(loaded.score(image, mask), model.score(image, mask))


def test_resume_after_a_kill_gives_identical_weights(cohort, tmp_path, one_torch_thread):
    options = {"noise": "simplex", "noise_patch": 12, "simplex_scale": 8}
    straight = _model(tmp_path, epochs=3, checkpoints=tmp_path / "a", **options)
    straight.fit(cohort)
    killed = _model(tmp_path, epochs=3, checkpoints=tmp_path / "b", **options)
    slices = len(SliceDataset([VolumeCache(tmp_path / "cache").get(s)
                               for s in cohort.subjects[:2]], (24, 32)))
    two_epochs = iter(range(2 * math.ceil(slices / 8)))  # training steps, batches of 8
    original = killed._batch_loss

    def dying_loss(module, batch, generator):
        if generator is None and next(two_epochs, None) is None:
            raise KeyboardInterrupt  # killed at the first step of the third epoch
        return original(module, batch, generator)

    killed._batch_loss = dying_loss
    with pytest.raises(KeyboardInterrupt):
        killed.fit(cohort)
    assert torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)["epoch"] == 2
    resumed = _model(tmp_path, epochs=3, checkpoints=tmp_path / "b", **options)
    resumed.fit(cohort)
    assert resumed.fit_report["resumed_from_epoch"] == 2
    for key, value in straight.network.state_dict().items():
        assert torch.equal(value, resumed.network.state_dict()[key]), key


@pytest.mark.parametrize("variant", ["gaussian", "simplex (AnoDDPM)", "patches (pDDPM)"])
def test_a_lesion_scores_above_healthy_tissue(variant, tmp_path, one_torch_thread):
    data = TrainingData([_subject(tmp_path, i) for i in range(5)], ["T1w", "FLAIR"])
    model = _model(tmp_path, epochs=12, learning_rate=3e-3, direction=["FLAIR:+", "T1w:-"],
                   **VARIANTS[variant])
    model.fit(data)
    losses = [row["train_loss"] for row in model.fit_report["history"]]
    assert losses[-1] < 0.5 * losses[0]
    image, mask = _subject(tmp_path, 10, lesion=True).load()
    inside = torch.zeros(SHAPE, dtype=torch.bool)
    inside[LESION] = True
    more_steps = model.with_inference(ddim_steps=5)  # the same weights, other DDIM steps
    assert more_steps.network.net is model.network.net
    assert (model.noising.ddim_steps, model.network.noising.ddim_steps) == (3, 3)
    assert more_steps.network.noising.ddim_steps == 5 and "5 DDIM steps" in (
        more_steps.score_definition)
    scores = {}
    scorers = {"3 steps": model, "mahalanobis": model.with_inference(3, "mahalanobis"),
               "5 steps": more_steps}
    for name, scorer in scorers.items():
        scores[name] = score = scorer.score(image, mask)
        assert score[inside].mean() > 3 * score[mask & ~inside].mean(), name
    assert not torch.equal(scores["3 steps"], scores["5 steps"])
    assert torch.equal(scores["3 steps"], model.score(image, mask))  # the original is unchanged
    # the same lesion with its signs swapped does not count in the directions asked for
    swapped, _ = _subject(tmp_path, 10).load()
    swapped = 2 * swapped - image
    assert model.score(swapped, mask)[inside].mean() < model.score(image, mask)[inside].mean() / 3


def test_simplex_noise_is_standardised_smooth_and_seeded():
    def draw(seed):
        return gradient_noise(torch.Size((2, 3, 40, 48)), 16, torch.device("cpu"),
                              torch.Generator().manual_seed(seed))

    noise = draw(0)
    assert torch.equal(noise, draw(0)) and not torch.equal(noise, draw(1))
    flat = noise.flatten(2)
    torch.testing.assert_close(flat.mean(dim=2), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(dim=2), torch.ones(2, 3), atol=1e-4, rtol=0)
    neighbours = torch.corrcoef(torch.stack([noise[..., 1:].flatten(),
                                             noise[..., :-1].flatten()]))[0, 1]
    assert neighbours > 0.7  # white noise: about 0
    volume = gradient_noise(torch.Size((1, 1, 16, 16, 16)), 8, torch.device("cpu"))
    assert volume.shape == (1, 1, 16, 16, 16) and torch.isfinite(volume).all()


def test_tiles_cover_the_grid_and_the_schedule_stays_below_the_noise_level():
    covered = torch.zeros(13, 9, dtype=torch.int64)
    for box in tiles((13, 9), 4):
        covered[box] += 1
    assert (covered >= 1).all() and tiles((3,), 8) == [(slice(0, 3),)]
    for level in (1, 7, 100, 250, 400, 999, 1000):
        for steps in range(1, min(level, 50) + 1):
            count, step = Noising(noise_level=level, ddim_steps=steps).schedule()
            assert count >= steps and 0 < count * step <= level and 1000 // (1000 // step) == step


@pytest.mark.parametrize("options, message", [
    ({"mode": "2.5d"}, "2d slices or 3d patches"),
    ({"aggregation": "mahalanobis"}, "--reconstructions 2 or more"),
    ({"noise_level": 1001}, "--noise-level 1001"),
    ({"noise_level": 5, "ddim_steps": 6}, "exceeds --noise-level"),
])
def test_options_that_make_no_diffusion_model_are_refused(options, message):
    with pytest.raises(UsageError, match=message):
        REGISTRY["ddpm"].check_options(options)


def test_the_command_line_takes_the_family_options_for_ddpm_only(tiny_bids, tmp_path):
    def settings(*args):
        return settings_from_args(parse_arguments([str(tiny_bids), str(tmp_path / "out"),
                                                   "train", *args])[0])

    options = settings("--model-type", "ddpm", "--noise", "simplex", "--noise-patch", "48",
                       "--reconstructions", "4", "--aggregation", "mahalanobis",
                       "--ddim-steps", "5", "--epochs", "2").model.options
    model = REGISTRY["ddpm"].from_settings(settings("--model-type", "ddpm", *[
        f"--{key.replace('_', '-')}={value}" for key, value in options.items()]))
    assert (model.noising.noise, model.noising.noise_patch, model.reconstructions,
            model.aggregation, model.noising.ddim_steps, model.training.epochs) == (
        "simplex", 48, 4, "mahalanobis", 5, 2)
    with pytest.raises(UsageError, match=r"--noise apply to training a diffusion model"):
        settings("--model-type", "ae", "--noise", "simplex")
    with pytest.raises(UsageError, match="--reconstructions 2 or more"):
        settings("--model-type", "ddpm", "--aggregation", "mahalanobis")


@pytest.mark.slow
def test_train_participant_and_group_with_a_ddpm(tmp_path):
    rng = np.random.default_rng(0)
    images = {label: {"T1w": nib.Nifti1Image(rng.random((20, 20, 20)).astype(np.float32),
                                             np.diag([2.0, 2.0, 2.0, 1.0]))}
              for label in ("01", "02", "03")}
    bids_dir = write_minimal_bids(tmp_path / "bids", images)
    out = tmp_path / "out"
    common = ["--nprocs", "1", "--omp-nthreads", "1", "--sloppy"]
    assert main([str(bids_dir), str(out), "train", "--model-type", "ddpm", "--epochs", "1",
                 "--width", "8", "--ddim-steps", "2", "--noise", "simplex",
                 "--direction", "T1w:-", *common]) == 0
    card = json.loads((out / "models" / "model-ddpm" / "model.json").read_text())
    assert card["model_type"] == "ddpm" and card["hyperparameters"]["noise"] == "simplex"
    assert "simplex noise" in card["score_definition"]
    assert main([str(bids_dir), str(out), "participant", "--model", "ddpm", *common]) == 0
    assert len(sorted(out.glob("sub-*/anat/*_res-2_desc-ddpm_stat-anomaly_statmap.nii.gz"))) == 3
    assert main([str(bids_dir), str(out), "group", *common]) == 0
