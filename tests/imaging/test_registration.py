"""The registration interface: the ``--sloppy`` preset against the default, on a moved head."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_anomaly.imaging.spatial import apply_transforms
from bids_anomaly.interfaces.ants import N4BiasFieldCorrection, Registration


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """The template's T1w at 4 mm, and a copy rotated by 6 degrees and moved by 6 mm."""
    from bids_anomaly.imaging.template import template_images

    folder = tmp_path_factory.mktemp("moved")
    template = template_images(2)["T1w"]
    data = ndimage.zoom(template.get_fdata(dtype=np.float32), 0.5, order=1)
    affine = template.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    fixed = folder / "fixed.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(fixed)
    turned = ndimage.rotate(data, 6, axes=(0, 1), reshape=False, order=1)
    shifted = ndimage.shift(turned, (1.5, -1.0, 0.5), order=1)
    moving = folder / "moving.nii.gz"
    nib.Nifti1Image(shifted.astype(np.float32), affine).to_filename(moving)
    return fixed, moving, data


def _correlation(a: np.ndarray, b: np.ndarray, inside: np.ndarray) -> float:
    return float(np.corrcoef(a[inside], b[inside])[0, 1])


@pytest.mark.parametrize("transform", ["Rigid", "SyN"])
def test_the_sloppy_preset_aligns_a_moved_head_as_the_default_does(moved, tmp_path, transform,
                                                                   monkeypatch):
    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    fixed, moving, target = moved
    inside = target > np.percentile(target, 60)
    before = _correlation(nib.load(moving).get_fdata(), target, inside)
    scores = {}
    for sloppy in (False, True):
        work = tmp_path / f"{transform}-{sloppy}"
        work.mkdir()
        monkeypatch.chdir(work)
        result = Registration(fixed_image=str(fixed), moving_image=str(moving),
                              transform_type=transform, sloppy=sloppy, random_seed=1).run()
        forward = result.outputs.forward_transform
        warped = apply_transforms(moving, fixed, [forward], work / "warped.nii.gz")
        scores[sloppy] = _correlation(nib.load(warped).get_fdata(), target, inside)
        if transform == "SyN":  # both composites hold the affine the sloppy SyN started from
            back = apply_transforms(warped, moving, [result.outputs.inverse_transform],
                                    work / "back.nii.gz")
            original = nib.load(moving).get_fdata()
            assert _correlation(nib.load(back).get_fdata(), original, original > 0) > 0.9
    assert before < 0.6 and scores[False] > 0.85, (before, scores)  # 0.52 -> 0.87 at 4 mm
    assert scores[True] > scores[False] - 0.01, scores


def test_sloppy_bias_correction_removes_most_of_a_smooth_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = np.indices((48, 48, 48)) - 24.0
    inside = (grid ** 2).sum(axis=0) < 20 ** 2
    field = np.exp(0.3 * grid[0] / 20)  # x 0.74 to x 1.35 across the ball
    rng = np.random.default_rng(0)
    tissue = np.where(rng.random(inside.shape) < 0.5, 100.0, 140.0)
    image = np.where(inside, tissue * field, 0).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.Nifti1Image(image, affine).to_filename(tmp_path / "biased.nii.gz")
    nib.Nifti1Image(inside.astype(np.uint8), affine).to_filename(tmp_path / "mask.nii.gz")
    spread = {}
    for sloppy in (False, True):
        result = N4BiasFieldCorrection(in_file=str(tmp_path / "biased.nii.gz"),
                                       mask_file=str(tmp_path / "mask.nii.gz"),
                                       sloppy=sloppy).run()
        corrected = nib.load(result.outputs.out_file).get_fdata()
        low = corrected[inside & (tissue == 100.0)]
        spread[sloppy] = low.std() / low.mean()
    biased = image[inside & (tissue == 100.0)]
    assert spread[True] < 0.5 * biased.std() / biased.mean(), spread
