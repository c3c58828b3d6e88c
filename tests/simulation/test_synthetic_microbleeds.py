"""Synthetic cerebral microbleeds: dipole physics, ground truth of subjects, demo files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bids_anomaly.imaging.susceptibility import (
    blooming_extent,
    blooming_signal,
    dephasing_for_bloom,
)
from bids_anomaly.simulation.synthetic import (
    MICROBLEED_COLUMNS,
    MICROBLEED_REGIONS,
    generate_demo_dataset,
    synthetic_subject,
)

N_MICROBLEEDS = 15


@pytest.fixture(scope="module")
def plain() -> dict:
    return synthetic_subject(3, lesions=True)


@pytest.fixture(scope="module")
def bleeding() -> dict:
    return synthetic_subject(3, lesions=True, microbleeds=N_MICROBLEEDS)


def _data(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj)


def _point_voxels(images: dict) -> np.ndarray:
    """Voxel (of the T1w grid) holding each microbleed centre, in label order."""
    points = images["microbleed_points"][["x", "y", "z"]].to_numpy(dtype=float)
    to_voxels = np.linalg.inv(images["T1w"].affine)
    return np.rint(nib.affines.apply_affine(to_voxels, points)).astype(int)


@pytest.mark.parametrize("bloom", [2.0, 3.0])
def test_blooming_focus_has_the_asked_volume_and_is_longest_along_b0(bloom: float) -> None:
    source, step = 1.0, 0.1
    dephasing = dephasing_for_bloom(bloom)
    half = int(np.ceil(1.2 * blooming_extent(source, dephasing) / step))
    signal = blooming_signal((2 * half + 1,) * 3, np.full(3, half), source, dephasing,
                             (step,) * 3, supersampling=2)
    dark = signal <= 0.5
    assert dark.sum() * step**3 == pytest.approx(4 / 3 * np.pi * bloom**3, rel=0.05)
    assert signal[half, half, half] == 0.0  # no signal inside the sphere
    extents = [np.ptp(np.nonzero(dark)[axis]) for axis in range(3)]
    assert extents[0] == extents[1] < extents[2]  # round across B0, longer along it
    assert extents[2] * step / 2 == pytest.approx(blooming_extent(source, dephasing), abs=step)


def test_microbleed_labels_and_points(bleeding: dict) -> None:
    labels = _data(bleeding["microbleed_mask"])
    points = bleeding["microbleed_points"]
    assert labels.dtype == np.uint8 and labels.shape == bleeding["T1w"].shape
    np.testing.assert_array_equal(bleeding["microbleed_mask"].affine, bleeding["T1w"].affine)
    assert isinstance(points, pd.DataFrame) and list(points.columns) == list(MICROBLEED_COLUMNS)
    assert len(points) == N_MICROBLEEDS
    assert sorted(np.unique(labels[labels > 0])) == list(range(1, N_MICROBLEEDS + 1))
    for label, voxel in enumerate(_point_voxels(bleeding), start=1):
        assert labels[tuple(voxel)] == label
    assert points["radius_mm"].between(1.0, 5.0).all()  # 2 to 10 mm across
    assert set(points["region"]) <= set(MICROBLEED_REGIONS)
    assert {"lobar", "deep"} <= set(points["region"])


def test_microbleed_points_are_world_positions_whatever_the_storage(bleeding: dict) -> None:
    # The placement is sequential: three microbleeds are the first three of fifteen.
    stored = synthetic_subject(3, lesions=True, microbleeds=3, orientation="PSR")
    assert nib.aff2axcodes(stored["microbleed_mask"].affine) == ("P", "S", "R")
    pd.testing.assert_frame_equal(stored["microbleed_points"],
                                  bleeding["microbleed_points"].iloc[:3])
    labels = _data(stored["microbleed_mask"])
    for label, voxel in enumerate(_point_voxels(stored), start=1):
        assert labels[tuple(voxel)] == label


def test_microbleeds_are_dark_blooming_foci_along_b0(bleeding: dict) -> None:
    labels = _data(bleeding["microbleed_mask"])
    t2star = _data(bleeding["T2starw"]).astype(float)
    extents = []
    for label in range(1, N_MICROBLEEDS + 1):
        focus = labels == label
        shell = (ndimage.binary_dilation(focus, iterations=3)
                 & ~ndimage.binary_dilation(focus, iterations=1) & (labels == 0))
        assert t2star[focus].mean() <= 0.6 * np.median(t2star[shell]), label
        voxels = np.argwhere(focus)
        extents.append(voxels.max(0) - voxels.min(0) + 1)
    # The subject is stored in RAS: the third axis is z, along B0.
    mean_x, mean_y, mean_z = np.mean(extents, axis=0)
    assert mean_z > mean_x and mean_z > mean_y
    # Bigger microbleeds have bigger foci.
    sizes = [(labels == label).sum() for label in range(1, N_MICROBLEEDS + 1)]
    radii = bleeding["microbleed_points"]["radius_mm"].to_numpy()
    assert np.corrcoef(sizes, radii**3)[0, 1] > 0.9


def test_microbleeds_sit_in_parenchyma_away_from_lesions(bleeding: dict) -> None:
    labels = _data(bleeding["microbleed_mask"])
    brain = _data(bleeding["brain_mask"]) > 0
    t1 = _data(bleeding["T1w"]).astype(float)
    # CSF is dark on T1w (a fifth of white matter), parenchyma at least about two thirds.
    reference = np.percentile(t1[brain], 90)
    for voxel in _point_voxels(bleeding):
        assert brain[tuple(voxel)] and t1[tuple(voxel)] > 0.45 * reference
    assert not (labels > 0)[_data(bleeding["lesion_mask"]) > 0].any()
    # Distinct foci: the labels do not touch one another.
    touching, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
    assert count == N_MICROBLEEDS


def test_microbleeds_show_on_t2starw_only(plain: dict, bleeding: dict) -> None:
    for modality in ("T1w", "FLAIR"):
        np.testing.assert_array_equal(_data(plain[modality]), _data(bleeding[modality]))
    labels = _data(bleeding["microbleed_mask"])
    # Each microbleed's dipole field is computed up to 12 voxels from its centre.
    near = ndimage.maximum_filter(labels > 0, size=2 * 14 + 1)
    t2 = _data(plain["T2w"]).astype(float), _data(bleeding["T2w"]).astype(float)
    assert not (t2[0] != t2[1])[~near].any()
    assert np.all(t2[1][labels > 0] >= 0.94 * t2[0][labels > 0] - 1)  # a few per cent at most
    t2star = _data(plain["T2starw"]).astype(float), _data(bleeding["T2starw"]).astype(float)
    assert not (t2star[0] != t2star[1])[~near].any()
    assert np.median(t2star[1][labels > 0] / np.maximum(t2star[0][labels > 0], 1)) < 0.5
    assert not _data(plain["microbleed_mask"]).any() and plain["microbleed_points"].empty


def test_demo_writes_microbleed_ground_truth(tmp_path: Path) -> None:
    bids_dir = generate_demo_dataset(tmp_path / "bids", 0, 1, seed=0,
                                     modalities=("T1w", "T2starw"), microbleeds=(4, 6))
    label = "patient01"
    anat = bids_dir / f"sub-{label}" / "anat"
    assert sorted(path.name for path in anat.glob("*.nii.gz")) == [
        f"sub-{label}_T1w.nii.gz", f"sub-{label}_T2starw.nii.gz"]
    folder = bids_dir / "derivatives" / "microbleeds"
    description = json.loads((folder / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids_anomaly demo"
    truth = folder / f"sub-{label}" / "anat"
    mask = nib.load(truth / f"sub-{label}_label-microbleed_mask.nii.gz")
    with open(truth / f"sub-{label}_label-microbleed_points.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    sidecar = json.loads((truth / f"sub-{label}_label-microbleed_points.json").read_text())
    assert list(rows[0]) == ["x", "y", "z", "radius_mm", "region"]
    assert set(sidecar) == set(rows[0]) and sidecar["x"]["Units"] == "mm"
    assert 4 <= len(rows) <= 6
    t1w = nib.load(anat / f"sub-{label}_T1w.nii.gz")
    assert mask.shape == t1w.shape and np.allclose(mask.affine, t1w.affine)
    labels = _data(mask)
    assert sorted(np.unique(labels[labels > 0])) == list(range(1, len(rows) + 1))
    to_voxels = np.linalg.inv(t1w.affine)
    for number, row in enumerate(rows, start=1):
        world = [float(row[axis]) for axis in "xyz"]
        voxel = np.rint(nib.affines.apply_affine(to_voxels, world)).astype(int)
        assert labels[tuple(voxel)] == number
        assert row["region"] in MICROBLEED_REGIONS
    assert "microbleeds" in (bids_dir / "README").read_text()


def test_demo_refuses_a_bad_microbleed_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="microbleeds"):
        generate_demo_dataset(tmp_path / "bids", 0, 1, microbleeds=(5, 2))
