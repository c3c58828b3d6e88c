"""The microbleed stage around the detector: calibration, detection with native centres."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from bids_anomaly.imaging.spatial import map_points
from bids_anomaly.models.data import SubjectImages, TrainingData
from bids_anomaly.postprocessing.microbleeds import calibrate_microbleeds, detect_microbleeds

SHAPE = (40, 44, 40)
AFFINE = np.array([[2.0, 0, 0, -40], [0, 2, 0, -50], [0, 0, 2, -30], [0, 0, 0, 1]])


def _volume(seed: int, bleeds: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.0)
    image /= image.std() * 4
    grid = np.indices(SHAPE)
    for centre in bleeds:
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        image -= 4 * np.clip(2.5 - distance, 0, 1)
    brain = np.zeros(SHAPE, bool)
    brain[3:-3, 3:-3, 3:-3] = True
    return image.astype(np.float32), brain


class _DarkIsAbnormal:
    """A stand-in model: the score is how dark the channel is."""

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, -image[0], 0.0)


def _subject(folder: Path, name: str, image: np.ndarray, brain: np.ndarray) -> SubjectImages:
    nib.Nifti1Image(image, AFFINE).to_filename(folder / f"{name}.nii.gz")
    nib.Nifti1Image(brain.astype(np.uint8), AFFINE).to_filename(folder / f"{name}_mask.nii.gz")
    return SubjectImages(name, [folder / f"{name}.nii.gz"], folder / f"{name}_mask.nii.gz")


def test_calibration_keeps_the_asked_false_positives_and_detection_finds_the_bleeds(tmp_path):
    controls = TrainingData([_subject(tmp_path, f"c{i}", *_volume(i, [])) for i in range(3)],
                            ["T2starw"])
    calibration = calibrate_microbleeds(_DarkIsAbnormal(), controls, "T2starw", 1.0)
    assert calibration["controls"] == 3 and calibration["channel"] == "T2starw"
    bleeds = [(12, 12, 12), (25, 30, 20), (30, 15, 28)]
    image, brain = _volume(10, bleeds)
    table, labels = detect_microbleeds(image, brain, -image, AFFINE, brain,
                                       calibration["threshold"])
    kept = table[table["kept"]]
    voxels = np.rint((np.linalg.inv(AFFINE) @ np.c_[kept[["x", "y", "z"]].to_numpy(),
                                                       np.ones(len(kept))].T)[:3].T)
    for bleed in bleeds:
        assert np.min(np.abs(voxels - bleed).sum(axis=1)) <= 2
    assert len(kept) <= len(bleeds) + 2
    assert set(np.unique(labels)) - {0} == set(kept["candidate_id"])
    if calibration["threshold"] is not None:
        assert (table.loc[~table["kept"], "score"] <= calibration["threshold"]).all()


def test_template_points_map_to_native_through_the_registration(tmp_path):
    import ants

    from bids_anomaly.imaging.spatial import apply_transforms

    native = np.zeros((30, 30, 30), np.float32)
    native[10, 12, 20] = 1000
    native_affine = np.array([[2.0, 0, 0, -30], [0, 2, 0, -25], [0, 0, 2, -20], [0, 0, 0, 1]])
    nib.Nifti1Image(native, native_affine).to_filename(tmp_path / "native.nii.gz")
    nib.Nifti1Image(np.zeros((40, 40, 40), np.float32), np.diag([2.0, 2, 2, 1]) + np.array(
        [[0, 0, 0, -40], [0, 0, 0, -40], [0, 0, 0, -40], [0, 0, 0, 0]])).to_filename(
        tmp_path / "template.nii.gz")
    shift = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                       translation=(4.0, -2.0, 6.0))
    ants.write_transform(shift, str(tmp_path / "to_template.mat"))
    apply_transforms(tmp_path / "native.nii.gz", tmp_path / "template.nii.gz",
                     [tmp_path / "to_template.mat"], tmp_path / "warped.nii.gz",
                     interpolation="linear")
    warped = nib.load(tmp_path / "warped.nii.gz")
    data = warped.get_fdata()
    peak = np.array(ndimage.center_of_mass(data))
    in_template = nib.affines.apply_affine(warped.affine, peak)
    back = map_points(in_template[None], [tmp_path / "to_template.mat"])[0]
    assert np.allclose(back, nib.affines.apply_affine(native_affine, (10, 12, 20)), atol=0.2)
    assert map_points(np.zeros((0, 3)), [tmp_path / "to_template.mat"]).shape == (0, 3)
