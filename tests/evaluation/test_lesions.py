"""Synthetic lesions: shapes on the template grid, contrast of the inserted lesions."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_anomaly.errors import BadDataError, MissingInputError
from bids_anomaly.evaluation.lesions import (
    LESION_CONTRAST,
    insert_lesions,
    lesion_shape_paths,
    tissue_means,
)
from bids_anomaly.imaging.images import load_lesion_shape, partial_volume

LESION_SHAPES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lesion_shapes"
SHAPE = (32, 32, 32)


@pytest.fixture
def phantom() -> dict[str, np.ndarray]:
    """A ball brain: grey-matter shell around white matter, noisy T1w (WM bright), FLAIR (GM)."""
    rng = np.random.default_rng(0)
    radius = np.linalg.norm(np.indices(SHAPE) - 15.5, axis=0)
    brain = radius < 13
    wm = np.clip(9.5 - radius, 0, 1) * brain
    gm = (1 - wm) * brain
    t1w = (0.6 * gm + 1.0 * wm) * brain + rng.normal(0, 0.03, SHAPE)
    flair = (1.0 * gm + 0.7 * wm) * brain + rng.normal(0, 0.03, SHAPE)
    lesion = np.zeros(SHAPE, np.float32)
    lesion[12:18, 12:18, 12:18] = 1.0
    lesion[11, 12:18, 12:18] = 0.4
    return {"brain": brain, "gm": gm, "wm": wm, "T1w": t1w.astype(np.float32),
            "FLAIR": flair.astype(np.float32), "lesion": lesion}


def _insert(phantom, shapes, kind="ms", seed=0, **kwargs):
    channels = {name: phantom[name] for name in ("T1w", "FLAIR")}
    return insert_lesions(channels, phantom["brain"], phantom["gm"], phantom["wm"], shapes, kind,
                          np.random.default_rng(seed), **kwargs)


def test_tissue_means_are_medians_of_pure_tissue(phantom):
    grey, white = tissue_means(phantom["T1w"], phantom["brain"], phantom["gm"], phantom["wm"])
    assert grey == pytest.approx(0.6, abs=0.01)
    assert white == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="GM probability"):
        tissue_means(phantom["T1w"], phantom["brain"], 0 * phantom["gm"], phantom["wm"])


@pytest.mark.parametrize("kind", ["ms", "stroke"])
def test_lesions_are_bright_on_flair_dark_on_t1w_and_truth_is_binary_in_brain(phantom, kind):
    outside = np.zeros(SHAPE, np.float32)
    outside[0:3, 0:3, 0:3] = 1.0
    lesioned, truth = _insert(phantom, [phantom["lesion"], outside], kind)
    assert truth.dtype == bool
    assert not (truth & ~phantom["brain"]).any()
    assert truth.sum() == 6**3
    pure_wm = phantom["brain"] & (phantom["wm"] > 0.7) & ~truth
    for name, sign in (("FLAIR", 1), ("T1w", -1)):
        lesion = np.median(lesioned[name][truth])
        white = np.median(lesioned[name][pure_wm])
        assert sign * (lesion - white) > 0.25
        assert lesioned[name].dtype == np.float32
        # the input is untouched, nothing changes outside the brain or the lesions
        assert not np.shares_memory(lesioned[name], phantom[name])
        unchanged = ~phantom["brain"] | (phantom["lesion"] == 0)
        assert np.array_equal(lesioned[name][unchanged], phantom[name][unchanged])


def test_without_jitter_the_shift_is_the_tabulated_contrast(phantom):
    lesioned, truth = _insert(phantom, [phantom["lesion"]], jitter=0.0)
    for name in ("T1w", "FLAIR"):
        grey, white = tissue_means(phantom[name], phantom["brain"], phantom["gm"], phantom["wm"])
        shift = lesioned[name] - phantom[name]
        expected = LESION_CONTRAST["ms"][name] * abs(grey - white)
        assert np.allclose(shift[truth], expected, atol=1e-5)
        # a partial-volume edge voxel gets its fraction of the shift, but is not in the truth
        assert np.allclose(shift[11, 12:18, 12:18], 0.4 * expected, atol=1e-5)
    assert not truth[11].any()


def test_contrast_factor_is_shared_by_channels_and_overlaps_take_the_maximum(phantom):
    lesioned, _ = _insert(phantom, [phantom["lesion"]], seed=5)
    ratios = {}
    for name in ("T1w", "FLAIR"):
        grey, white = tissue_means(phantom[name], phantom["brain"], phantom["gm"], phantom["wm"])
        shift = (lesioned[name] - phantom[name])[14, 14, 14]
        ratios[name] = shift / (LESION_CONTRAST["ms"][name] * abs(grey - white))
    assert ratios["T1w"] == pytest.approx(ratios["FLAIR"], rel=1e-4)
    assert 0.75 <= ratios["T1w"] <= 1.25 and ratios["T1w"] != pytest.approx(1.0, abs=1e-3)
    once, _ = _insert(phantom, [phantom["lesion"]], jitter=0.0)
    twice, _ = _insert(phantom, [phantom["lesion"], 0.5 * phantom["lesion"]], jitter=0.0)
    assert np.array_equal(once["FLAIR"], twice["FLAIR"])


def test_same_seed_same_lesions(phantom):
    first, _ = _insert(phantom, [phantom["lesion"]], seed=3)
    second, _ = _insert(phantom, [phantom["lesion"]], seed=3)
    assert np.array_equal(first["FLAIR"], second["FLAIR"])


@pytest.mark.parametrize(("change", "message"), [
    ({"kind": "tumour"}, "lesion kind"),
    ({"jitter": 1.0}, "jitter"),
    ({"channels": {"DWI": np.zeros(SHAPE)}}, "no ms lesion contrast for DWI"),
    ({"shapes": [np.zeros((4, 4, 4))]}, "grid"),
])
def test_invalid_requests_raise(phantom, change, message):
    arguments = {"channels": {"FLAIR": phantom["FLAIR"]}, "brain": phantom["brain"],
                 "gm": phantom["gm"], "wm": phantom["wm"], "shapes": [phantom["lesion"]],
                 "kind": "ms", "rng": np.random.default_rng(0)}
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        insert_lesions(**arguments)


def test_partial_volume_preserves_volume_of_an_unaligned_cube():
    cube = np.zeros((40, 40, 40), np.float32)
    cube[11:20, 13:20, 9:20] = 1.0
    target_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fraction = partial_volume(cube, np.eye(4), (20, 20, 20), target_affine)
    assert fraction.dtype == np.float32
    assert 0 <= fraction.min() and fraction.max() <= 1
    assert len(np.unique(fraction)) > 2
    assert fraction.sum() * 8 == pytest.approx(cube.sum(), rel=1e-4)


def test_load_lesion_shape_in_a_flipped_frame(tmp_path):
    """A 1 mm mask stored left-right flipped (LAS, like the SOOP files) lands at the same place."""
    ras = np.zeros((30, 30, 30), np.uint8)
    ras[4:10, 14:20, 10:16] = 1
    las_affine = np.array([[-1.0, 0, 0, 29], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    path = tmp_path / "lesion.nii.gz"
    nib.Nifti1Image(ras[::-1].copy(), las_affine).to_filename(path)
    target = nib.Nifti1Image(np.zeros((15, 15, 15), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    fraction = load_lesion_shape(path, target)
    assert fraction.sum() * 8 == pytest.approx(ras.sum(), rel=1e-4)
    assert fraction[3:5, 8:10, 6:8].min() > 0.99
    assert fraction[8:].max() == 0


def test_load_lesion_shape_refuses_an_unreadable_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti file")
    target = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(BadDataError, match="broken.nii.gz"):
        load_lesion_shape(path, target)
    with pytest.raises(BadDataError, match="missing.nii.gz"):
        load_lesion_shape(tmp_path / "missing.nii.gz", target)


def test_lesion_shape_paths_by_kind(tmp_path):
    (tmp_path / "soop").mkdir()
    (tmp_path / "mslub").mkdir()
    for name in ("bwsrsub-20_lesion.nii.gz", "bwsrsub-1000_lesion.nii.gz", "LICENSE"):
        (tmp_path / "soop" / name).touch()
    (tmp_path / "mslub" / "patient01_label-lesion_mask.nii.gz").touch()
    assert [p.name for p in lesion_shape_paths(tmp_path, "stroke")] == [
        "bwsrsub-1000_lesion.nii.gz", "bwsrsub-20_lesion.nii.gz"]
    assert len(lesion_shape_paths(tmp_path, "ms")) == 1
    with pytest.raises(ValueError, match="lesion kind"):
        lesion_shape_paths(tmp_path, "tumour")
    with pytest.raises(MissingInputError, match="no ms lesion masks"):
        lesion_shape_paths(tmp_path / "elsewhere", "ms")


@pytest.fixture(scope="module")
def template_2mm() -> dict[str, nib.Nifti1Image]:
    from bids_anomaly.imaging.template import template_images

    return template_images(2)


@pytest.mark.parametrize("kind", ["ms", "stroke"])
def test_real_shape_on_the_template_grid_keeps_its_volume_inside_the_brain(kind, template_2mm):
    if not LESION_SHAPES.is_dir():
        pytest.skip("../shared/data/lesion_shapes is not available")
    path = lesion_shape_paths(LESION_SHAPES, kind)[1]
    source = nib.load(path)
    source_ml = (np.asarray(source.dataobj) > 0).sum() * np.prod(source.header.get_zooms()) / 1000
    mask = template_2mm["mask"]
    fraction = load_lesion_shape(path, mask)
    assert fraction.shape == mask.shape and fraction.dtype == np.float32
    voxel_ml = np.prod(mask.header.get_zooms()[:3]) / 1000
    assert fraction.sum() * voxel_ml == pytest.approx(source_ml, rel=0.15)
    brain = np.asarray(mask.dataobj) > 0
    assert fraction[brain].sum() / fraction.sum() > 0.8


def test_real_ms_lesions_in_the_template_are_bright_on_flair_and_dark_on_t1w(template_2mm):
    if not LESION_SHAPES.is_dir():
        pytest.skip("../shared/data/lesion_shapes is not available")
    mask = template_2mm["mask"]
    shapes = [load_lesion_shape(path, mask) for path in lesion_shape_paths(LESION_SHAPES, "ms")[:3]]
    brain = np.asarray(mask.dataobj) > 0
    gm, wm, csf = (template_2mm[name].get_fdata(dtype=np.float32) for name in ("GM", "WM", "CSF"))
    t1w = template_2mm["T1w"].get_fdata(dtype=np.float32)
    flair = 0.8 * gm + 0.6 * wm + 0.1 * csf
    lesioned, truth = insert_lesions({"T1w": t1w, "FLAIR": flair}, brain, gm, wm, shapes, "ms",
                                     np.random.default_rng(0))
    assert truth.any() and not (truth & ~brain).any()
    _, white_t1w = tissue_means(t1w, brain, gm, wm)
    _, white_flair = tissue_means(flair, brain, gm, wm)
    assert np.median(lesioned["FLAIR"][truth]) > white_flair
    assert np.median(lesioned["T1w"][truth]) < white_t1w
