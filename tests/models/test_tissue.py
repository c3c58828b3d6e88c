"""The tissue model: the subject's own tissues with template priors, lesions as outliers."""

from __future__ import annotations

import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from bids_anomaly.errors import BadDataError, MissingInputError
from bids_anomaly.models import REGISTRY, TissueModel, TrainingData, load_model, save_model
from bids_anomaly.models.data import valid_voxels
from bids_anomaly.models.store import ModelCard

SLAB = slice(30, 62)
"""Axial slices of the 2 mm template kept: the lateral ventricles and the centrum semiovale."""
MEANS = {"FLAIR": (1.0, 0.6, 0.15), "T1w": (0.55, 1.0, 0.2), "T2w": (0.9, 0.6, 1.6)}
"""Generated intensity of GM, WM and CSF per contrast."""
LESION = {"FLAIR": 1.5, "T1w": 0.45, "T2w": 1.25}


@functools.lru_cache(maxsize=1)
def _template_slab() -> tuple[np.ndarray, np.ndarray]:
    """The embedded template's GM/WM/CSF maps on a slab of the 2 mm grid, and its affine."""
    from bids_anomaly.imaging.template import template_images

    images = template_images(2)
    maps = np.stack([np.asarray(images[k].dataobj, np.float32)[:, :, SLAB]
                     for k in ("GM", "WM", "CSF")])
    return maps, images["GM"].affine


def _lesions(wm: np.ndarray, load: float, seed: int) -> np.ndarray:
    """Blobs in deep white matter until they cover ``load`` of the brain."""
    rng = np.random.default_rng(seed)
    brain = wm.sum() / 0.45
    deep = np.argwhere(ndimage.binary_erosion(wm > 0.9, iterations=1))
    lesion = np.zeros(wm.shape, bool)
    grid = np.indices(wm.shape)
    while lesion.sum() < load * brain:
        centre = deep[rng.integers(len(deep))]
        radius = rng.uniform(1.5, 3.5)
        distance = np.sqrt(sum((grid[i] - centre[i]) ** 2 for i in range(3)))
        lesion |= (distance <= radius) & (wm > 0.5)
    return lesion


def _subject(channels: tuple[str, ...], load: float = 0.0, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A generated subject on the template slab: partial-volume tissues, noise, lesions.

    The subject's anatomy is the template's shifted by one voxel (registration is never
    exact); intensities are the tissue fractions' mixture of :data:`MEANS`, noise 4 %.
    """
    priors, _ = _template_slab()
    rng = np.random.default_rng(seed)
    tissues = np.roll(priors, 1, axis=1)
    brain = tissues.sum(0) > 0.3
    lesion = _lesions(tissues[1], load, seed + 1) if load else np.zeros(brain.shape, bool)
    image = []
    for channel in channels:
        values = np.tensordot(np.asarray(MEANS[channel]), tissues, axes=1)
        values = np.where(lesion, LESION[channel], values)
        values = values + rng.normal(0, 0.04, values.shape)
        image.append(np.where(brain, values, 0))
    return (torch.from_numpy(np.stack(image).astype(np.float32)), torch.from_numpy(brain),
            lesion)


def _prepared(channels: tuple[str, ...], tmp_path: Path, **options) -> TissueModel:
    """A tissue model set up with the slab's template maps."""
    priors, affine = _template_slab()
    paths = []
    for name, values in zip(("GM", "WM", "CSF"), priors, strict=True):
        path = tmp_path / f"{name}.nii.gz"
        nib.Nifti1Image(values, affine).to_filename(path)
        paths.append(path)
    model = TissueModel(**options)
    model.fit(TrainingData([], list(channels), tissues=paths))
    return model


@pytest.mark.parametrize("channels", [("FLAIR",), ("T1w", "FLAIR"), ("T1w", "FLAIR", "T2w"),
                                      ("T2w",)])
def test_lesions_in_white_matter_are_found(channels, tmp_path, one_torch_thread):
    model = _prepared(channels, tmp_path)
    image, mask, lesion = _subject(channels, load=0.02, seed=1)
    score, posteriors = model.score_with_posteriors(image, mask)
    valid = valid_voxels(image, mask).numpy()
    assert roc_auc_score(lesion[valid], score.numpy()[valid]) >= 0.95
    assert set(posteriors) == {"GM", "WM", "CSF", "lesion"}
    total = sum(p.numpy() for p in posteriors.values())
    np.testing.assert_allclose(total[valid], 1.0, atol=1e-4)
    assert posteriors["lesion"].numpy()[lesion].mean() > posteriors["lesion"].numpy()[
        valid & ~lesion].mean() * 20
    assert (score.numpy()[~valid] == 0).all()


def test_a_lesion_free_brain_is_flagged_near_the_target_rate(tmp_path, one_torch_thread):
    model = _prepared(("T1w", "FLAIR"), tmp_path)
    image, mask, _ = _subject(("T1w", "FLAIR"), seed=2)
    score = model.score(image, mask).numpy()
    valid = valid_voxels(image, mask).numpy()
    for fpr in (0.01, 0.001):
        threshold = np.quantile(model.simulated_scores(), 1 - fpr)
        assert threshold == pytest.approx(-np.log10(fpr), abs=0.1)
        flagged = (score[valid] > threshold).mean()
        assert 0.2 * fpr < flagged < 3 * fpr, (fpr, flagged)


def test_ten_percent_lesion_load_does_not_bend_white_matter(tmp_path, one_torch_thread):
    channels = ("T1w", "FLAIR")
    clean, mask, _ = _subject(channels, seed=3)
    lesioned, _, lesion = _subject(channels, load=0.10, seed=3)
    assert lesion.sum() >= 0.1 * mask.sum().item() * 0.9
    means, posteriors = {}, {}
    for name, image in (("clean", clean), ("lesioned", lesioned)):
        model = _prepared(channels, tmp_path)
        posteriors[name] = model.score_with_posteriors(image, mask)[1]
        means[name] = np.asarray(model.subject_report["class_means"]["WM"])
    assert (np.abs(means["lesioned"] - means["clean"]) / np.abs(means["clean"]) < 0.05).all()
    # the lesions were taken as lesions, not as white matter
    assert posteriors["lesioned"]["WM"].numpy()[lesion].mean() < 0.1
    assert posteriors["lesioned"]["lesion"].numpy()[lesion].mean() > 0.9


def test_save_load_round_trip_gives_the_same_map(tmp_path, one_torch_thread):
    model = _prepared(("T1w", "FLAIR"), tmp_path, growth=0.5)
    image, mask, _ = _subject(("T1w", "FLAIR"), load=0.01, seed=4)
    card = ModelCard(name="tissue", model_type="tissue", channels=["T1w", "FLAIR"],
                     template="MNI152NLin2009aSym", resolution=2, preprocessing={},
                     hyperparameters=model.hyperparameters, training_participants=[],
                     calibration_participants=[], threshold=3.0, fpr=0.001,
                     calibration_voxels=1000)
    save_model(model, card, tmp_path / "model-tissue")
    loaded, _ = load_model(tmp_path / "model-tissue")
    torch.testing.assert_close(loaded.score(image, mask), model.score(image, mask))
    assert loaded.growth == 0.5 and loaded.channels == ["T1w", "FLAIR"]


def test_same_seed_same_bytes_and_the_ablations_run(tmp_path, one_torch_thread):
    image, mask, lesion = _subject(("FLAIR",), load=0.02, seed=5)
    first = _prepared(("FLAIR",), tmp_path).score(image, mask)
    again = _prepared(("FLAIR",), tmp_path).score(image, mask)
    assert torch.equal(first, again)
    valid = valid_voxels(image, mask).numpy()
    for options in ({"outlier_distance": 0}, {"lesion_prior": "none"}, {"growth": 0},
                    {"mrf": 0.5}, {"components": [1, 1, 1]}):
        score = _prepared(("FLAIR",), tmp_path, **options).score(image, mask).numpy()
        assert roc_auc_score(lesion[valid], score[valid]) > 0.9, options


def test_bad_inputs_are_refused(tmp_path):
    model = _prepared(("FLAIR",), tmp_path)
    image, mask, _ = _subject(("FLAIR",))
    with pytest.raises(BadDataError, match="template grid"):
        model.score(image[:, :, :, :10], mask[:, :, :10])
    with pytest.raises(BadDataError, match="channel"):
        model.score(torch.cat([image, image]), mask)
    with pytest.raises(BadDataError, match="too few"):
        model.score(image, torch.zeros_like(mask))
    with pytest.raises(MissingInputError, match="probability maps"):
        TissueModel().fit(TrainingData([], ["FLAIR"]))
    wrong = tmp_path / "prior.nii.gz"
    nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)).to_filename(wrong)
    with pytest.raises(BadDataError, match="template's"):
        _prepared(("FLAIR",), tmp_path, lesion_prior=str(wrong))
    with pytest.raises(ValueError, match="components"):
        TissueModel(components=[2, 2])


def test_a_lesion_frequency_map_is_a_location_prior(tmp_path, one_torch_thread):
    priors, affine = _template_slab()
    image, mask, lesion = _subject(("FLAIR",), load=0.02, seed=6)
    frequency = tmp_path / "frequency.nii.gz"
    nib.Nifti1Image(ndimage.gaussian_filter(lesion.astype(np.float32), 2) * 0.3,
                    affine).to_filename(frequency)
    model = _prepared(("FLAIR",), tmp_path, lesion_prior=str(frequency))
    assert model.location.max() == 1 and float(model.location.min()) == pytest.approx(1e-3,
                                                                                         rel=0.01)
    valid = valid_voxels(image, mask).numpy()
    assert roc_auc_score(lesion[valid], model.score(image, mask).numpy()[valid]) > 0.95


def test_single_subject_interface_writes_map_mask_and_posteriors(tmp_path, one_torch_thread):
    from bids_anomaly.interfaces.anomaly import FitSubjectModel

    priors, affine = _template_slab()
    image, mask, lesion = _subject(("T1w", "FLAIR"), load=0.02, seed=7)
    files = []
    for name, values in zip(("T1w", "FLAIR"), image.numpy(), strict=True):
        files.append(str(tmp_path / f"{name}.nii.gz"))
        nib.Nifti1Image(values, affine).to_filename(files[-1])
    nib.Nifti1Image(mask.numpy().astype(np.uint8), affine).to_filename(tmp_path / "mask.nii.gz")
    tissues = []
    for name, values in zip(("GM", "WM", "CSF"), priors, strict=True):
        tissues.append(str(tmp_path / f"{name}_prior.nii.gz"))
        nib.Nifti1Image(values, affine).to_filename(tissues[-1])
    model = REGISTRY["tissue"]()
    result = FitSubjectModel(channel_files=files, mask_file=str(tmp_path / "mask.nii.gz"),
                             model_type="tissue", hyperparameters=model.hyperparameters,
                             tissue_files=tissues, channel_names=["T1w", "FLAIR"],
                             fpr=0.001).run(cwd=str(tmp_path)).outputs
    assert result.threshold == pytest.approx(3.0, abs=0.1)
    flagged = np.asarray(nib.load(result.anomaly_mask).dataobj) > 0
    assert flagged[lesion].mean() > 0.5 and flagged[~lesion & mask.numpy()].mean() < 0.005
    assert [Path(p).name for p in result.probsegs] == [
        f"probseg_{label}.nii.gz" for label in ("GM", "WM", "CSF", "lesion")]


def test_it_needs_no_training_and_calibrates_itself():
    assert not TissueModel.needs_training and TissueModel.self_calibrated
    assert TissueModel.untrained(["FLAIR"], random_seed=3).random_seed == 3
    scores = TissueModel().simulated_scores(10_000)
    assert np.quantile(scores, 0.999) == pytest.approx(3.0, abs=0.05)


def test_sessions_share_one_fit_and_differ_where_the_subject_changed(tmp_path,
                                                                    one_torch_thread):
    model = _prepared(("FLAIR",), tmp_path)
    before, mask, _ = _subject(("FLAIR",), seed=9)
    after, _, lesion = _subject(("FLAIR",), load=0.01, seed=9)
    (first, _), (second, posteriors) = model.score_sessions([before, after], mask)
    assert model.subject_report["sessions"] == 2
    valid = valid_voxels(before, mask).numpy()
    change = (second - first).numpy()
    assert roc_auc_score(lesion[valid], change[valid]) > 0.95
    assert posteriors["lesion"].numpy()[lesion].mean() > 0.5
    (same, _), (again, _) = model.score_sessions([before, before], mask)
    assert torch.equal(same, again)
