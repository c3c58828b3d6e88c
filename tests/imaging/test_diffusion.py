"""Diffusion tensor maps from dwi runs: gradients, checks, fit, mask and the DTIFit interface."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from bids_anomaly.errors import BadDataError, MissingInputError
from bids_anomaly.imaging.diffusion import (
    B0_THRESHOLD,
    brain_mask_from_b0,
    fit_tensor,
    load_dwi_runs,
    mean_b0,
    read_gradients,
)
from bids_anomaly.interfaces.dipy import DTIFit

SHAPE = (16, 16, 10)
AFFINE = np.array([[-2.0, 0, 0, 20], [0, 2.0, 0, -30], [0, 0, 2.5, -10], [0, 0, 0, 1]])
CSF = (3e-3, 3e-3, 3e-3)
WM = (1.7e-3, 0.3e-3, 0.3e-3)
GM = (0.9e-3, 0.8e-3, 0.7e-3)


def directions(count: int) -> np.ndarray:
    """Spread unit vectors over a hemisphere (Fibonacci lattice)."""
    index = np.arange(count) + 0.5
    z = index / count
    phi = np.pi * (1 + 5**0.5) * index
    r = np.sqrt(1 - z**2)
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def gradients(n_b0: int = 2, n_dirs: int = 24, bval: float = 1000.0,
              b0_value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    bvals = np.concatenate([np.full(n_b0, b0_value), np.full(n_dirs, bval)])
    bvecs = np.vstack([np.zeros((n_b0, 3)), directions(n_dirs)])
    return bvals, bvecs


def tissue_labels() -> np.ndarray:
    """0 background, 1 CSF, 2 white matter, 3 grey matter."""
    labels = np.zeros(SHAPE, dtype=int)
    labels[3:13, 3:13, 2:8] = 3
    labels[6:10, 3:7, 2:8] = 2
    labels[6:10, 9:13, 2:8] = 1
    return labels


def tensor(evals: tuple[float, float, float], axis: np.ndarray) -> np.ndarray:
    """Diffusion tensor with principal direction ``axis``."""
    first = axis / np.linalg.norm(axis)
    second = np.cross(first, [0.0, 0.0, 1.0] if abs(first[2]) < 0.9 else [1.0, 0.0, 0.0])
    second /= np.linalg.norm(second)
    rotation = np.column_stack([first, second, np.cross(first, second)])
    return rotation @ np.diag(evals) @ rotation.T


def simulate(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """Noise-free signal S0 exp(-b g'Dg) of the phantom."""
    labels = tissue_labels()
    tissues = {1: (2000.0, tensor(CSF, np.array([1.0, 0, 0]))),
               2: (800.0, tensor(WM, np.array([1.0, 1.0, 0.3]))),
               3: (1000.0, tensor(GM, np.array([0.0, 1.0, 0])))}
    data = np.zeros(SHAPE + (bvals.size,), dtype=np.float32)
    for label, (s0, d) in tissues.items():
        quadratic = np.einsum("ni,ij,nj->n", bvecs, d, bvecs)
        data[labels == label] = s0 * np.exp(-bvals * quadratic)
    return data


def write_run(folder: Path, name: str, data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray,
              affine: np.ndarray = AFFINE, rows: bool = False) -> tuple[Path, Path, Path]:
    """Write a dwi run with FSL gradients (``rows``: bvecs as N x 3)."""
    folder.mkdir(parents=True, exist_ok=True)
    dwi = folder / f"{name}_dwi.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(dwi)
    bval = folder / f"{name}_dwi.bval"
    bvec = folder / f"{name}_dwi.bvec"
    bval.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    table = bvecs if rows else bvecs.T
    bvec.write_text("\n".join(" ".join(f"{v:.8f}" for v in row) for row in table) + "\n")
    return dwi, bval, bvec


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path, Path]:
    bvals, bvecs = gradients()
    return write_run(tmp_path, "sub-01", simulate(bvals, bvecs), bvals, bvecs)


def dipy_maps(dwi, mask: np.ndarray) -> dict[str, np.ndarray]:
    gtab = gradient_table(dwi.bvals, bvecs=dwi.bvecs, b0_threshold=B0_THRESHOLD)
    fit = TensorModel(gtab, fit_method="WLS").fit(dwi.data, mask=mask)
    return {"FA": fit.fa, "MD": fit.md, "AD": fit.ad, "RD": fit.rd}


# --- gradients and tensor fit ---------------------------------------------------------------


def test_read_gradients_normalises_and_accepts_rows(tmp_path: Path) -> None:
    bval = tmp_path / "a.bval"
    bvec = tmp_path / "a.bvec"
    bval.write_text("0 1000 1000\n")
    bvec.write_text("0 0 0\n0 2 0\n0 0 0.5\n")  # 3 x 3: rows are x, y, z
    bvals, bvecs = read_gradients("a.nii.gz", bval, bvec, 3)
    assert bvals.tolist() == [0, 1000, 1000]
    assert bvecs.shape == (3, 3)
    np.testing.assert_allclose(np.linalg.norm(bvecs[1:], axis=1), 1.0)


@pytest.mark.parametrize("bval", [1000.0, 2500.0])
def test_fit_tensor_matches_dipy_and_truth(tmp_path: Path, bval: float) -> None:
    bvals, bvecs = gradients(n_b0=1, n_dirs=24, bval=bval, b0_value=5.0)
    files = write_run(tmp_path, "sub-01", simulate(bvals, bvecs), bvals, bvecs)
    dwi = load_dwi_runs([files[0]], [files[1]], [files[2]])
    mask = tissue_labels() > 0
    maps = fit_tensor(dwi, mask, params=("FA", "MD", "AD", "RD"))
    reference = dipy_maps(dwi, mask)
    for name, values in maps.items():
        assert values.dtype == np.float32
        np.testing.assert_allclose(values, reference[name], rtol=1e-4, atol=1e-7, err_msg=name)
        assert np.all(values[~mask] == 0)
    labels = tissue_labels()
    for label, evals in ((1, CSF), (2, WM), (3, GM)):
        evals = np.array(evals)
        md = evals.mean()
        fa = np.sqrt(1.5 * ((evals - md) ** 2).sum() / (evals**2).sum())
        np.testing.assert_allclose(maps["MD"][labels == label], md, rtol=1e-3)
        np.testing.assert_allclose(maps["FA"][labels == label], fa, atol=1e-3)
        np.testing.assert_allclose(maps["AD"][labels == label], evals[0], rtol=1e-3)
    assert maps["FA"][labels == 2].mean() > 0.75


def test_unknown_param_is_refused(run) -> None:
    dwi = load_dwi_runs([run[0]], [run[1]], [run[2]])
    with pytest.raises(ValueError, match="XX"):
        fit_tensor(dwi, tissue_labels() > 0, params=("FA", "XX"))


def test_two_runs_equal_one(tmp_path: Path) -> None:
    bvals, bvecs = gradients(n_b0=1, n_dirs=24)
    data = simulate(bvals, bvecs)
    single = write_run(tmp_path / "one", "sub-01", data, bvals, bvecs)
    first = np.r_[0, 1:13]
    second = np.r_[0, 13:25]
    run1 = write_run(tmp_path / "two", "run-1", data[..., first], bvals[first], bvecs[first])
    run2 = write_run(tmp_path / "two", "run-2", data[..., second], bvals[second],
                     bvecs[second], rows=True)
    one = load_dwi_runs([single[0]], [single[1]], [single[2]])
    two = load_dwi_runs([run1[0], run2[0]], [run1[1], run2[1]], [run1[2], run2[2]])
    assert two.runs == 2 and two.data.shape == SHAPE + (26,)
    mask = tissue_labels() > 0
    maps_one = fit_tensor(one, mask, params=("FA", "MD", "AD", "RD"))
    maps_two = fit_tensor(two, mask, params=("FA", "MD", "AD", "RD"))
    for name in maps_one:
        np.testing.assert_allclose(maps_two[name], maps_one[name], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(mean_b0(two), mean_b0(one))


def test_run_on_another_grid_is_resampled(tmp_path: Path) -> None:
    bvals, bvecs = gradients(n_b0=1, n_dirs=12)
    data = simulate(bvals, bvecs)
    run1 = write_run(tmp_path, "run-1", data, bvals, bvecs)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [1.0, 0.5, 0.0]
    coarse = nib.processing.resample_to_output(nib.Nifti1Image(data[..., 0], shifted),
                                               voxel_sizes=(3.0, 3.0, 3.0)).affine
    small = data[:8, :8, :4]
    run2 = write_run(tmp_path, "run-2", small, bvals, bvecs, affine=coarse)
    dwi = load_dwi_runs([run1[0], run2[0]], [run1[1], run2[1]], [run1[2], run2[2]])
    assert dwi.data.shape == SHAPE + (26,)
    np.testing.assert_allclose(dwi.affine, AFFINE)
    assert np.all(np.isfinite(dwi.data))
    np.testing.assert_allclose(np.linalg.norm(dwi.bvecs[dwi.bvals > 50], axis=1), 1.0)
    maps = fit_tensor(dwi, tissue_labels() > 0)
    assert set(maps) == {"FA", "MD"}


# --- refused inputs -------------------------------------------------------------------------


def load(files) -> None:
    load_dwi_runs([files[0]], [files[1]], [files[2]])


def test_missing_bval(run) -> None:
    run[1].unlink()
    with pytest.raises(MissingInputError, match=r"sub-01_dwi\.bval.*missing"):
        load(run)


def test_missing_bvec(run) -> None:
    run[2].unlink()
    with pytest.raises(MissingInputError, match=r"sub-01_dwi\.bvec.*missing"):
        load(run)


def test_bval_count_differs(run) -> None:
    run[1].write_text(" ".join(["0"] * 2 + ["1000"] * 23))
    with pytest.raises(BadDataError, match=r"has 26 volumes but its \.bval .* lists 25 values"):
        load(run)


def test_bvec_count_differs(run) -> None:
    _, bvecs = gradients(n_dirs=23)
    run[2].write_text("\n".join(" ".join(f"{v:g}" for v in row) for row in bvecs.T))
    with pytest.raises(BadDataError, match=r"has 26 volumes but its \.bvec .* lists 25"):
        load(run)


def test_non_numeric_bval(run) -> None:
    run[1].write_text("0 0 " + " ".join(["1000"] * 23) + " abc\n")
    with pytest.raises(BadDataError, match=r"\.bval.*numbers"):
        load(run)


def test_negative_bval(run) -> None:
    run[1].write_text("0 -5 " + " ".join(["1000"] * 24) + "\n")
    with pytest.raises(BadDataError, match="negative"):
        load(run)


def test_zero_direction_with_bvalue(run) -> None:
    run[1].write_text(" ".join(["1000"] * 26) + "\n")
    with pytest.raises(BadDataError, match="zero direction"):
        load(run)


def test_3d_dwi(tmp_path: Path) -> None:
    bvals, bvecs = gradients()
    files = write_run(tmp_path, "sub-01", simulate(bvals, bvecs)[..., 0], bvals, bvecs)
    with pytest.raises(BadDataError, match="is 3D: a dwi run needs one volume per gradient"):
        load(files)


def test_no_b0(tmp_path: Path) -> None:
    bvals, bvecs = gradients(n_b0=0)
    files = write_run(tmp_path, "sub-01", simulate(bvals, bvecs), bvals, bvecs)
    with pytest.raises(BadDataError, match="no b=0 volume"):
        load(files)


def test_only_b0(tmp_path: Path) -> None:
    bvals, bvecs = gradients(n_b0=5, n_dirs=0)
    files = write_run(tmp_path, "sub-01", simulate(bvals, bvecs), bvals, bvecs)
    with pytest.raises(BadDataError, match="only b = 0 volumes"):
        load(files)


def test_too_few_directions(tmp_path: Path) -> None:
    bvals, bvecs = gradients(n_dirs=4)
    files = write_run(tmp_path, "sub-01", simulate(bvals, bvecs), bvals, bvecs)
    with pytest.raises(BadDataError, match="only 4 diffusion-weighted volumes"):
        load(files)


def test_collinear_directions(tmp_path: Path) -> None:
    bvals, bvecs = gradients(n_dirs=8)
    bvecs[2:] = [0.0, 0.0, 1.0]
    files = write_run(tmp_path, "sub-01", simulate(bvals, bvecs), bvals, bvecs)
    with pytest.raises(BadDataError, match="collinear"):
        load(files)


def test_corrupt_file(run) -> None:
    raw = run[0].read_bytes()
    assert len(gzip.decompress(raw)) > 1000
    run[0].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadDataError, match="truncated or corrupt"):
        load(run)


# --- mask and interface ---------------------------------------------------------------------


def test_brain_mask_of_sphere() -> None:
    rng = np.random.default_rng(0)
    grid = np.indices((32, 32, 24)).astype(float)
    centre = np.array([16.0, 15.5, 12.0])[:, None, None, None]
    sphere = np.sqrt(((grid - centre) ** 2).sum(axis=0)) < 9
    b0 = np.where(sphere, 1000.0, 20.0) + rng.normal(0, 40, sphere.shape)
    mask = brain_mask_from_b0(np.abs(b0), (2.0, 2.0, 2.0))
    dice = 2 * (mask & sphere).sum() / (mask.sum() + sphere.sum())
    assert mask.dtype == bool and dice > 0.9


def test_dtifit_interface(tmp_path: Path) -> None:
    bvals, bvecs = gradients()
    files = write_run(tmp_path / "in", "sub-01", simulate(bvals, bvecs), bvals, bvecs)
    work = tmp_path / "work"
    work.mkdir()
    result = DTIFit(dwi_files=[str(files[0])], bval_files=[str(files[1])],
                    bvec_files=[str(files[2])], params=["FA", "MD", "AD", "RD"]).run(cwd=str(work))
    out = result.outputs
    assert [Path(f).name for f in out.maps] == ["FA.nii.gz", "MD.nii.gz", "AD.nii.gz", "RD.nii.gz"]
    assert out.summary == {"volumes": 26, "b0_volumes": 2, "runs": 1, "shells": [1000],
                           "directions": 24}
    for path in [out.b0_file, out.mask_file, out.b0_brain_file, *out.maps]:
        img = nib.load(path)
        assert Path(path).parent == work
        assert img.shape == SHAPE
        np.testing.assert_allclose(img.affine, AFFINE)
    mask = np.asarray(nib.load(out.mask_file).dataobj)
    assert mask.dtype == np.uint8
    tissue = tissue_labels() > 0
    assert (mask > 0).sum() >= 0.6 * tissue.sum() and np.all(tissue[mask > 0])
    fa = nib.load(out.maps[0]).get_fdata()
    assert fa.max() <= 1 and fa[(tissue_labels() == 2) & (mask > 0)].min() > 0.75
    assert np.all(fa[mask == 0] == 0)
    b0 = nib.load(out.b0_file).get_fdata()
    assert np.all(nib.load(out.b0_brain_file).get_fdata()[mask == 0] == 0)
    assert b0.max() == pytest.approx(2000, rel=1e-4)


def test_dtifit_default_params_and_missing_bval(tmp_path: Path, run) -> None:
    result = DTIFit(dwi_files=[run[0]], bval_files=[run[1]], bvec_files=[run[2]]).run(
        cwd=str(tmp_path))
    assert [Path(f).name for f in result.outputs.maps] == ["FA.nii.gz", "MD.nii.gz"]
    run[1].unlink()
    with pytest.raises(MissingInputError, match="missing"):
        DTIFit(dwi_files=[run[0]], bval_files=[run[1]], bvec_files=[run[2]]).run(
            cwd=str(tmp_path))
