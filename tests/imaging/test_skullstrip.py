"""Recognising skull-stripped images, and the interfaces that act on it."""

import nibabel as nib
import numpy as np
import pytest

from bids_anomaly.imaging.skullstrip import check_background, mask_from_background
from bids_anomaly.interfaces.ants import N4BiasFieldCorrection
from bids_anomaly.interfaces.deepbet import BrainExtraction


def _ball(shape=(60, 60, 60), radius=20, voxel=2.0):
    grid = np.indices(shape) - np.array(shape)[:, None, None, None] / 2
    inside = (grid ** 2).sum(axis=0) < radius ** 2
    return inside, np.diag([voxel, voxel, voxel, 1.0])


def test_zero_background_brain_is_stripped():
    inside, affine = _ball()
    data = np.where(inside, 100.0, 0.0).astype(np.float32)
    check = check_background(nib.Nifti1Image(data, affine))
    assert check.stripped and check.background == 0
    assert check.foreground_ml == pytest.approx(inside.sum() * 8 / 1000)


def test_constant_nonzero_background_counts_as_stripped():
    inside, affine = _ball()
    rng = np.random.default_rng(0)
    data = np.where(inside, rng.normal(0.5, 1.0, inside.shape), -1.25).astype(np.float32)
    check = check_background(nib.Nifti1Image(data, affine))
    assert check.stripped and check.background == -1.25


def test_head_sized_foreground_is_not_stripped():
    # a 2 mm "head" of 120^3 voxels around the ball: ~6,000 ml of tissue, zero air around it
    inside, affine = _ball((150, 150, 150), radius=65)
    data = np.where(inside, 100.0, 0.0).astype(np.float32)
    assert not check_background(nib.Nifti1Image(data, affine)).stripped


def test_noisy_background_is_not_stripped():
    inside, affine = _ball()
    rng = np.random.default_rng(1)
    data = np.where(inside, 100.0, rng.random(inside.shape)).astype(np.float32)
    assert not check_background(nib.Nifti1Image(data, affine)).stripped


def test_mask_from_background_fills_holes_and_drops_specks():
    inside, affine = _ball()
    data = np.where(inside, 100.0, 0.0).astype(np.float32)
    data[30, 30, 30] = 0  # a background-valued voxel inside the brain (a lesion, a ventricle)
    data[2, 2, 2] = 50  # an isolated speck outside
    mask = mask_from_background(nib.Nifti1Image(data, affine), 0.0)
    assert mask[30, 30, 30] and not mask[2, 2, 2]
    assert mask.sum() == inside.sum()


@pytest.mark.parametrize(("mode", "method"), [("auto", "detected"), ("yes", "declared")])
def test_brain_extraction_keeps_a_stripped_brain(tmp_path, monkeypatch, mode, method):
    monkeypatch.chdir(tmp_path)
    inside, affine = _ball()
    nib.Nifti1Image(np.where(inside, 80.0, 0.0).astype(np.float32), affine).to_filename(
        "brain.nii.gz")
    result = BrainExtraction(in_file="brain.nii.gz", skull_stripped=mode).run()
    assert result.outputs.method == method
    mask = np.asarray(nib.load(result.outputs.out_mask).dataobj)
    assert mask.dtype == np.uint8 and (mask > 0).sum() == inside.sum()
    assert result.outputs.volume_ml == pytest.approx(inside.sum() * 8 / 1000)


def test_n4_passes_normalised_data_unchanged_and_corrects_positive_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inside, affine = _ball()
    rng = np.random.default_rng(2)
    zscored = np.where(inside, rng.normal(0, 1, inside.shape), 0).astype(np.float32)
    nib.Nifti1Image(zscored, affine).to_filename("z.nii.gz")
    nib.Nifti1Image(inside.astype(np.uint8), affine).to_filename("mask.nii.gz")
    result = N4BiasFieldCorrection(in_file="z.nii.gz", mask_file="mask.nii.gz").run()
    assert result.outputs.corrected is False
    assert np.allclose(nib.load(result.outputs.out_file).get_fdata(), zscored)

    x = np.linspace(0.7, 1.3, inside.shape[0])[:, None, None]
    biased = np.where(inside, 100.0 * x, 0).astype(np.float32)
    nib.Nifti1Image(biased, affine).to_filename("b.nii.gz")
    result = N4BiasFieldCorrection(in_file="b.nii.gz", mask_file="mask.nii.gz").run()
    assert result.outputs.corrected is True
    corrected = nib.load(result.outputs.out_file).get_fdata()[inside]
    assert corrected.std() / corrected.mean() < 0.5 * biased[inside].std() / biased[inside].mean()


def test_real_scans_are_classified(real_data):
    from bids_anomaly.imaging.images import load_volume

    def stripped(path):
        return check_background(load_volume(real_data / path)).stripped

    assert stripped("sub-mslub26/anat/sub-mslub26_T1w.nii.gz")
    assert stripped("sub-mslub26/anat/sub-mslub26_FLAIR.nii.gz")
    assert not stripped("sub-IXI012/anat/sub-IXI012_T1w.nii.gz")
    assert not stripped("sub-mslubL01/ses-1/anat/sub-mslubL01_ses-1_T1w.nii.gz")
    # its README calls it brain-extracted, but the skull is there (cropped field of view)
    assert not stripped("sub-stroke01/anat/sub-stroke01_T2w.nii.gz")
