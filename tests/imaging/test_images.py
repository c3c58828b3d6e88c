import gzip

import nibabel as nib
import numpy as np
import pytest

from bids_anomaly.errors import BadDataError
from bids_anomaly.imaging.images import load_volume, reorient_to_ras


def _image(shape=(10, 12, 14), affine=None):
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0]) if affine is None else affine)


def test_truncated_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "sub-01_T1w.nii.gz"
    _image((40, 40, 40)).to_filename(path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(BadDataError, match="sub-01_T1w.nii.gz.*truncated or corrupt"):
        load_volume(path)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    with pytest.raises(BadDataError, match="bad.nii.gz"):
        load_volume(path)


def test_4d_is_refused_but_single_volume_4d_is_accepted(tmp_path):
    four_d = tmp_path / "fourd.nii.gz"
    nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)).to_filename(four_d)
    with pytest.raises(BadDataError, match="expected a 3D volume"):
        load_volume(four_d)
    single = tmp_path / "single.nii.gz"
    nib.Nifti1Image(np.ones((8, 8, 8, 1), np.float32), np.eye(4)).to_filename(single)
    assert load_volume(single).shape == (8, 8, 8)


def test_nan_and_inf_become_zero(tmp_path, caplog):
    data = np.ones((8, 8, 8), np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    path = tmp_path / "nan.nii.gz"
    nib.Nifti1Image(data, np.eye(4)).to_filename(path)
    img = load_volume(path)
    assert np.isfinite(img.get_fdata()).all()
    assert img.get_fdata()[0, 0, 0] == 0
    assert "2 NaN or infinite voxels" in caplog.text


def test_reorientation_keeps_world_coordinates():
    lps = np.diag([-1.0, -1.0, 3.0, 1.0])
    lps[:3, 3] = [10, 20, -30]
    img = _image(affine=lps)
    ras = reorient_to_ras(img)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    voxel = np.array([2, 3, 4])
    world = lps[:3, :3] @ voxel + lps[:3, 3]
    ras_voxel = np.linalg.solve(ras.affine[:3, :3], world - ras.affine[:3, 3]).round().astype(int)
    assert ras.get_fdata()[tuple(ras_voxel)] == img.get_fdata()[tuple(voxel)]
