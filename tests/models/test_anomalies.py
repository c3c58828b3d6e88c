"""The synthetic anomaly generator: shapes, textures, contrast, determinism, placement."""

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_anomaly.models.selfsupervised.anomalies import (
    MICROBLEED_TAIL,
    AnomalyGenerator,
    GeneratorOptions,
    LesionShapes,
    blob,
    ellipsoid,
    microbleed_loss,
    poisson_blend,
)


def _image(shape=(32, 36, 28), channels=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn((channels, *shape), generator=generator) * 0.1
    brain = torch.zeros(shape, dtype=torch.bool)
    brain[4:-4, 4:-4, 4:-4] = True
    return torch.where(brain, image + 1.0, 0.0), brain


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(40, 40), (24, 28, 20)])
def test_ellipsoid_has_its_volume_and_a_soft_border(shape):
    center = torch.tensor([s / 2 for s in shape])
    radii = torch.full((len(shape),), 6.0)
    alpha = ellipsoid(shape, center, radii, _generator(0), border=2.0)
    expected = np.pi * 36 if len(shape) == 2 else 4 / 3 * np.pi * 216
    assert float(alpha.sum()) == pytest.approx(expected, rel=0.15)
    assert ((alpha > 0.05) & (alpha < 0.95)).any()  # partial volume at the rim
    assert float(alpha.max()) == 1.0 and float(alpha.min()) == 0.0


def test_blob_is_irregular_and_bounded():
    shape = (40, 40, 40)
    alpha = blob(shape, torch.tensor([20.0, 20.0, 20.0]), 8.0, _generator(1))
    assert 0 <= float(alpha.min()) and float(alpha.max()) <= 1
    assert float(alpha.sum()) > 20
    far = torch.ones(shape, dtype=torch.bool)
    far[20 - 12:20 + 12, 20 - 12:20 + 12, 20 - 12:20 + 12] = False
    assert float(alpha[far].sum()) == 0  # nothing beyond the envelope


@pytest.mark.parametrize("texture", ["shift", "noise", "foreign", "poisson"])
def test_generator_changes_only_the_mask_inside_the_brain_with_the_contrast_signs(texture):
    image, brain = _image()
    options = GeneratorOptions(textures=(texture,), probability=1.0, count=(2, 2),
                               radius=(3.0, 5.0), strength=(2.0, 2.0))
    generator = AnomalyGenerator(options, ["FLAIR", "T1w"])
    result = generator(image, brain, _generator(5))
    changed = (result.image - image).abs().amax(0) > 1e-6
    assert changed.any()
    assert not changed[~brain].any()  # nothing outside the brain
    assert not changed[result.mask == 0].any()  # nothing outside the mask
    assert result.mask.shape == brain.shape and float(result.mask.max()) <= 1.0
    core = result.mask > 0.99
    difference = (result.image - image)[:, core].mean(1)
    if texture in ("shift", "noise"):
        # MS-like: FLAIR up, T1w down, by 2 in-brain standard deviations (0.1 here)
        assert difference[0] > 0.15 and difference[1] < -0.15
    assert all(signs == [1.0, -1.0] for signs in result.signs)
    torch.testing.assert_close(result.strength, result.mask)


def test_same_seed_same_anomaly_and_other_seed_another():
    image, brain = _image()
    generator = AnomalyGenerator(GeneratorOptions(probability=1.0), ["T1w", "FLAIR"])
    first = generator(image, brain, _generator(11))
    again = generator(image, brain, _generator(11))
    other = generator(image, brain, _generator(12))
    assert torch.equal(first.image, again.image) and torch.equal(first.mask, again.mask)
    assert not torch.equal(first.mask, other.mask)


def test_severity_scales_the_change_and_is_the_strength():
    image, brain = _image()
    options = GeneratorOptions(textures=("shift",), probability=1.0, count=(1, 1),
                               radius=(4.0, 4.0), strength=(2.0, 2.0))
    generator = AnomalyGenerator(options, ["FLAIR", "T2w"])
    full = generator(image, brain, _generator(3), severity=1.0)
    half = generator(image, brain, _generator(3), severity=0.5)
    torch.testing.assert_close(half.image - image, (full.image - image) * 0.5)
    torch.testing.assert_close(half.mask, full.mask)  # same place and shape
    torch.testing.assert_close(half.strength, full.mask * 0.5)


def test_probability_zero_leaves_images_healthy_and_empty_brain_is_harmless():
    image, brain = _image()
    generator = AnomalyGenerator(GeneratorOptions(probability=0.0), ["T1w"] * 2)
    result = generator(image, brain, _generator(0))
    assert torch.equal(result.image, image) and float(result.mask.sum()) == 0
    nothing = torch.zeros_like(brain)
    result = AnomalyGenerator(GeneratorOptions(probability=1.0), ["T1w", "T1w"])(
        image, nothing, _generator(0))
    assert torch.equal(result.image, image)


@pytest.mark.parametrize("channels", [["T1w"], ["T1w", "FLAIR"], ["T1w", "FLAIR", "T2w", "PDw"]])
def test_any_number_of_channels_and_free_contrast(channels):
    image, brain = _image(channels=len(channels))
    options = GeneratorOptions(contrast="free", probability=1.0)
    result = AnomalyGenerator(options, channels)(image, brain, _generator(2))
    assert result.image.shape == image.shape
    assert all(len(signs) == len(channels) and set(signs) <= {-1.0, 1.0}
               for signs in result.signs)


def test_two_dimensional_slices_work():
    image, brain = _image()
    result = AnomalyGenerator(GeneratorOptions(probability=1.0), ["FLAIR", "T1w"])(
        image[:, :, :, 14], brain[:, :, 14], _generator(4))
    assert result.image.shape == image[:, :, :, 14].shape and result.mask.sum() > 0


def test_poisson_blend_keeps_the_border_and_takes_the_source_texture_not_its_level():
    target = torch.full((1, 30, 30), 2.0)
    grid = torch.stack(torch.meshgrid(torch.arange(30.0), torch.arange(30.0), indexing="ij"))
    bump = 3.0 * torch.exp(-((grid - 15.0) ** 2).sum(0) / (2 * 2.0 ** 2))
    source = (7.0 + bump)[None]  # another image: a different level, with a texture
    mask = torch.zeros(30, 30)
    mask[7:24, 7:24] = 1
    blended = poisson_blend(target, source, mask)
    assert torch.equal(blended[:, mask == 0], target[:, mask == 0])
    # the texture (the bump) arrives on the target's level, not on the source's
    torch.testing.assert_close(blended[0], 2.0 + bump, atol=0.05, rtol=0)


def test_lesion_shapes_from_a_folder_with_partial_volume_and_exclusion(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for name, box in (("patient01", (slice(5, 12),) * 3), ("patient26", (slice(2, 4),) * 3)):
        data = np.zeros((20, 20, 20), np.uint8)
        data[box] = 1
        nib.Nifti1Image(data, affine).to_filename(tmp_path / f"{name}_mask.nii.gz")
    target = nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.diag([2.0, 2, 2, 1]))
    shapes = LesionShapes(tmp_path, target, exclude=("patient26",))
    assert len(shapes) == 1
    piece = shapes.components[0]
    # 343 mm3 of lesion on a 2 mm grid: 43 voxels' worth, spread over more with partial volume
    assert float(piece.sum()) == pytest.approx(343 / 8, rel=0.25)
    assert ((piece > 0) & (piece < 1)).any()
    image, brain = _image(shape=(20, 20, 20), channels=1)
    options = GeneratorOptions(shapes=("lesion",), textures=("shift",), probability=1.0,
                               count=(1, 1))
    result = AnomalyGenerator(options, ["FLAIR"], shapes)(image, brain, _generator(0))
    assert float(result.mask.sum()) > 10
    with pytest.raises(ValueError, match="no lesion masks"):
        LesionShapes(tmp_path, target, exclude=("patient",))
    with pytest.raises(ValueError, match="lesion masks"):
        AnomalyGenerator(options, ["FLAIR"])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        GeneratorOptions(shapes=("cube",))
    with pytest.raises(ValueError, match="contrast"):
        GeneratorOptions(contrast="bright")


def test_existing_shapes_draw_what_they_drew_before_microbleeds():
    # mask volume and total change of two calls, computed before the microbleed shape existed
    before = {(40, 44): (118.3675, -41.6704), (24, 28, 20): (1251.1577, -2278.4658)}
    for shape, (volume, change) in before.items():
        image = torch.randn((2, *shape), generator=_generator(0)) * 0.1
        brain = torch.zeros(shape, dtype=torch.bool)
        brain[(slice(4, -4),) * len(shape)] = True
        image = torch.where(brain, image + 1.0, 0.0)
        result = AnomalyGenerator(GeneratorOptions(probability=1.0, count=(3, 3)),
                                  ["FLAIR", "T1w"])(image, brain, _generator(7))
        assert float(result.mask.sum()) == pytest.approx(volume, rel=1e-3)
        assert float((result.image - image).sum()) == pytest.approx(change, rel=1e-3)


def _contrasted_image(shape, seed=0):
    """Two channels (T2starw, T1w) with a wide in-brain range, so that 'no signal' is far down."""
    generator = _generator(seed)
    brain = torch.zeros(shape, dtype=torch.bool)
    brain[(slice(4, -4),) * len(shape)] = True
    image = 1.0 + 0.3 * torch.rand((2, *shape), generator=generator)
    image[:, 4:6] = 0.1  # a dark slab: the darkest in-brain level, where no signal is left
    return torch.where(brain, image, 0.0), brain


@pytest.mark.parametrize("shape", [(48, 48), (32, 32, 32)])
def test_microbleed_darkens_a_small_round_spot_of_the_t2starw_channel_only(shape):
    image, brain = _contrasted_image(shape)
    options = GeneratorOptions(shapes=("microbleed",), probability=1.0, count=(1, 1),
                               microbleed_radius=(2.5, 2.5))
    result = AnomalyGenerator(options, ["T2starw", "T1w"])(image, brain, _generator(3))
    change = result.image - image
    assert torch.equal(result.image[1], image[1])  # T1w does not show microbleeds
    changed = change[0].abs() > 1e-6
    assert changed.any() and float(change[0].max()) <= 0  # darker, never brighter
    assert not changed[result.mask == 0].any() and not changed[~brain].any()
    assert result.signs == [[-1.0, 0.0]]
    # a compact spot: a few times the visible radius across at most
    spot = torch.nonzero(changed).float()
    assert float((spot.max(0).values - spot.min(0).values).max()) <= 4 * 2.5 * 1.26 * 2
    core = result.mask > 0.99  # where at least half the signal is lost
    # the visible volume of a sphere of radius 2.5 voxels, give or take partial volume
    volume = np.pi * 2.5**2 if len(shape) == 2 else 4 / 3 * np.pi * 2.5**3
    assert float(core.sum()) == pytest.approx(volume, rel=0.5)
    # taken halfway or more from the signal towards the darkest level (0.1)
    assert bool((image[0][core] - result.image[0][core] >= 0.5 * (image[0][core] - 0.1)).all())
    extents = torch.nonzero(core).max(0).values - torch.nonzero(core).min(0).values
    assert extents[0] == pytest.approx(float(extents[1]), abs=1)  # round across B0


def test_microbleed_blooms_along_the_last_axis():
    shape = (48, 48, 48)
    extents = torch.zeros(3)
    for seed in range(5):
        loss = microbleed_loss(shape, torch.tensor([24.0, 24.0, 24.0]), 4.0, _generator(seed))
        assert loss.shape == (1, *shape)
        focus = torch.nonzero(loss[0] >= 0.5)
        extents += focus.max(0).values - focus.min(0).values + 1
        assert float(loss[loss > 0].min()) >= MICROBLEED_TAIL
    assert extents[2] > extents[0] and extents[2] > extents[1]


def test_microbleed_in_a_2_5d_window_cuts_each_slice_apart():
    image, brain = _contrasted_image((48, 48))
    image = image.repeat_interleave(3, dim=0)  # T2starw x 3 slices, T1w x 3 slices
    options = GeneratorOptions(shapes=("microbleed",), probability=1.0, count=(1, 1),
                               microbleed_radius=(2.5, 2.5))
    channels = ["T2starw"] * 3 + ["T1w"] * 3
    result = AnomalyGenerator(options, channels, window=3)(image, brain, _generator(1))
    change = (result.image - image).abs()
    assert torch.equal(result.image[3:], image[3:])
    assert all(bool((change[c] > 1e-6).any()) for c in range(3))
    assert not torch.equal(change[0], change[1])  # the neighbouring slices cut elsewhere


def test_microbleed_needs_a_susceptibility_channel_and_a_fitting_window():
    options = GeneratorOptions(shapes=("microbleed",))
    with pytest.raises(ValueError, match="susceptibility"):
        AnomalyGenerator(options, ["T1w", "FLAIR"])
    with pytest.raises(ValueError, match="window"):
        AnomalyGenerator(options, ["T2starw", "T1w"], window=3)
