"""The midpoint space of a subject's sessions (generated volumes, antspyx)."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from bids_anomaly.longitudinal.midpoint import (
    midpoint_grid,
    midpoint_maps,
    read_rigid,
    register_rigid,
    write_affine,
)


def _head(shift_mm: float, voxel: tuple[float, float, float]) -> nib.Nifti1Image:
    """A textured ellipsoid on a grid of ``voxel`` mm, moved ``shift_mm`` along x (RAS)."""
    shape = tuple(int(80 / v) for v in voxel)
    axes = [(np.arange(n) - n / 2 + 0.5) * v for n, v in zip(shape, voxel, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    x = x - shift_mm
    inside = (x / 30) ** 2 + (y / 25) ** 2 + (z / 20) ** 2 < 1
    texture = 1 + 0.5 * np.sin(x / 4) * np.cos(y / 5) + 0.3 * np.cos(z / 3)
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = [-(n / 2 - 0.5) * v for n, v in zip(shape, voxel, strict=True)]
    return nib.Nifti1Image((inside * texture).astype(np.float32), affine)


def test_two_sessions_meet_half_way(tmp_path):
    images, masks = [], []
    for index, (shift, voxel) in enumerate(((0.0, (1.0, 1.0, 1.0)),
                                            (4.0, (0.8, 0.8, 3.0)))):  # another protocol
        image = _head(shift, voxel)
        images.append(tmp_path / f"s{index}.nii.gz")
        masks.append(tmp_path / f"m{index}.nii.gz")
        image.to_filename(images[-1])
        nib.Nifti1Image((image.get_fdata() > 0).astype(np.float32),
                        image.affine).to_filename(masks[-1])
    pose = register_rigid(images[0], images[1], masks[0], masks[1], tmp_path)
    # ITK points are LPS: a move of +4 mm along R is -4 mm along L
    assert abs(pose[0, 3] + 4.0) < 0.6 and np.abs(pose[1:3, 3]).max() < 0.6
    first, second = midpoint_maps([np.eye(4), pose])
    np.testing.assert_allclose(first[0, 3], -second[0, 3], atol=0.05)
    written = write_affine(second, tmp_path / "to_second.mat")
    np.testing.assert_allclose(read_rigid(written), second, atol=1e-6)
    grid = nib.load(midpoint_grid(images[0], tmp_path / "grid.nii.gz"))
    assert np.allclose(grid.header.get_zooms()[:3], 1.0) and grid.shape[0] == 80 + 20
