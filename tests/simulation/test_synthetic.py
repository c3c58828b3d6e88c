from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to
from scipy import ndimage

from bids_anomaly.imaging.template import template_images
from bids_anomaly.simulation.synthetic import (
    DEFAULT_MODALITIES,
    MODALITIES,
    generate_demo_dataset,
    synthetic_subject,
)

N_HEALTHY = 3
N_PATIENTS = 2
# SHA-256 of the arrays of synthetic_subject(3, lesions=...) computed before T2starw, veins and
# microbleeds were added: those additions draw from new random streams only.
DIGESTS_BEFORE_T2STARW = {
    False: {
        "T1w": "ec66111311e3d2e315d1f79ce980a6a192d437d39bff9ce48f6012716a4fabbc",
        "T2w": "fc8298546096c3f5f3fceb3f99ae33ab46ac6107fe4d87a0362619d91294da63",
        "FLAIR": "91d4bad304cc0d4dadc26177d803925c08e878fcac66b21e00273192b47937d0",
        "lesion_mask": "4471da4ac39510f5f7d9b9522231b6c39ef17deec7be59fd9fffb20b1e5c60cc",
        "brain_mask": "354bae11a0422fe178f1064bcd01ad7cd0a5b66f69cbd36e8e925cdf599459a7",
    },
    True: {
        "T1w": "e3b18944bc1b2bdb2796d6db486bb77cc388de8ae447d91ea10210d5ea2a8fdb",
        "T2w": "9f49fe86dace0096b9405dc22a8b504135706ecf815f6144d235dc29bb529c04",
        "FLAIR": "c98d50f81a08f7c8da0ebdb75d758a537ec193e141cadf7f0b96fa74b631f823",
        "lesion_mask": "28cf53eef29ced7a6a02817d67bdb6920f6b0935853f7cdca441f84d72af9ac2",
        "brain_mask": "354bae11a0422fe178f1064bcd01ad7cd0a5b66f69cbd36e8e925cdf599459a7",
    },
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bids_dir = tmp_path_factory.mktemp("demo") / "bids"
    assert generate_demo_dataset(bids_dir, N_HEALTHY, N_PATIENTS, seed=0) == bids_dir
    return bids_dir


@pytest.fixture(scope="module")
def template() -> dict[str, nib.Nifti1Image]:
    return template_images(2)


@pytest.fixture(scope="module")
def subject() -> dict[str, nib.Nifti1Image]:
    """Seed 3 without lesions, stored in RAS."""
    return synthetic_subject(3)


def _labels() -> list[str]:
    return [f"healthy{n:02d}" for n in range(1, N_HEALTHY + 1)] + [
        f"patient{n:02d}" for n in range(1, N_PATIENTS + 1)
    ]


def _data(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj)


def _lesion_path(bids_dir: Path, label: str) -> Path:
    return (
        bids_dir
        / "derivatives"
        / "lesion_masks"
        / f"sub-{label}"
        / "anat"
        / f"sub-{label}_label-lesion_mask.nii.gz"
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_dataset_files_and_descriptions(dataset: Path) -> None:
    description = json.loads((dataset / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.9.0"
    assert description["DatasetType"] == "raw"
    assert description["License"] == "CC0"
    assert description["GeneratedBy"][0]["Name"] == "bids_anomaly demo"
    assert "Version" in description["GeneratedBy"][0]
    assert (dataset / "README").read_text().strip()
    participants_json = json.loads((dataset / "participants.json").read_text())
    assert {"participant_id", "group", "age", "sex"} <= participants_json.keys()
    derivative = json.loads(
        (dataset / "derivatives" / "lesion_masks" / "dataset_description.json").read_text()
    )
    assert derivative["DatasetType"] == "derivative"
    assert derivative["GeneratedBy"][0]["Name"] == "bids_anomaly demo"

    subjects = sorted(path.name for path in dataset.glob("sub-*"))
    assert subjects == sorted(f"sub-{label}" for label in _labels())
    for label in _labels():
        anat = dataset / f"sub-{label}" / "anat"
        for modality in DEFAULT_MODALITIES:
            assert (anat / f"sub-{label}_{modality}.nii.gz").is_file()
            sidecar = json.loads((anat / f"sub-{label}_{modality}.json").read_text())
            assert isinstance(sidecar, dict) and sidecar
        # T2starw and microbleeds only when asked for.
        assert not (anat / f"sub-{label}_T2starw.nii.gz").exists()
    assert not (dataset / "derivatives" / "microbleeds").exists()


def test_participants_tsv(dataset: Path) -> None:
    with open(dataset / "participants.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [row["participant_id"] for row in rows] == [f"sub-{label}" for label in _labels()]
    assert [row["group"] for row in rows] == ["healthy"] * N_HEALTHY + ["patient"] * N_PATIENTS
    assert all(18 <= int(row["age"]) <= 90 for row in rows)
    assert all(row["sex"] in {"F", "M"} for row in rows)


def test_images_are_3d_unscaled_int16(dataset: Path) -> None:
    orientations = set()
    flair_zooms = set()
    for path in sorted(dataset.rglob("*.nii.gz")):
        img = nib.load(path)
        assert img.ndim == 3, path
        assert img.dataobj.slope == 1 and img.dataobj.inter == 0, path
        data = _data(img)
        if "_mask" in path.name:
            assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
            continue
        assert data.dtype == np.int16
        assert data.min() >= 0 and 500 < data.max() < 2000
        orientations.add(nib.aff2axcodes(img.affine))
        if path.name.endswith("_FLAIR.nii.gz"):
            flair_zooms.add(tuple(float(zoom) for zoom in img.header.get_zooms()))
    # Readers must cope with non-RAS storage and with thick FLAIR slices.
    assert len(orientations) >= 3
    assert (2.0, 2.0, 4.0) in {tuple(sorted(zooms)) for zooms in flair_zooms}


def test_lesion_masks_match_t1w_grid(dataset: Path) -> None:
    for label in _labels():
        mask_path = _lesion_path(dataset, label)
        if label.startswith("healthy"):
            assert not mask_path.exists()
            continue
        t1w = nib.load(dataset / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz")
        mask = nib.load(mask_path)
        assert mask.shape == t1w.shape
        np.testing.assert_allclose(mask.affine, t1w.affine)
        volume_mm3 = _data(mask).sum() * np.prod(mask.header.get_zooms())
        assert volume_mm3 >= 2000
    assert not list((dataset / "derivatives" / "lesion_masks").glob("sub-healthy*"))


def test_flair_lesions_are_hyperintense(dataset: Path) -> None:
    for n in range(1, N_PATIENTS + 1):
        label = f"patient{n:02d}"
        anat = dataset / f"sub-{label}" / "anat"
        t1w = nib.load(anat / f"sub-{label}_T1w.nii.gz")
        # FLAIR may sit on a thick-slice grid; bring it onto the T1w grid of the mask.
        flair = _data(resample_from_to(nib.load(anat / f"sub-{label}_FLAIR.nii.gz"), t1w, order=1))
        lesion = _data(nib.load(_lesion_path(dataset, label))).astype(bool)
        # White matter around the lesions: bright on T1w, a few voxels away from them.
        t1 = _data(t1w).astype(float)
        near = ndimage.binary_dilation(lesion, iterations=6) & ~ndimage.binary_dilation(
            lesion, iterations=2
        )
        white = near & (t1 > 0.9 * np.percentile(t1[near], 90))
        assert white.sum() > 50
        assert np.median(flair[lesion]) > 1.3 * np.median(flair[white])
        assert np.median(t1[lesion]) < 0.9 * np.median(t1[white])


def test_same_seed_gives_identical_images() -> None:
    first = synthetic_subject(3, lesions=True)
    second = synthetic_subject(3, lesions=True)
    other = synthetic_subject(4, lesions=True)
    assert set(MODALITIES) <= first.keys()
    for key in first:
        if key == "microbleed_points":
            assert first[key].equals(second[key])
            continue
        np.testing.assert_array_equal(_data(first[key]), _data(second[key]))
        np.testing.assert_array_equal(first[key].affine, second[key].affine)
    assert not np.array_equal(_data(first["T1w"]), _data(other["T1w"]))


@pytest.mark.parametrize("lesions", [False, True])
def test_t2starw_leaves_the_other_contrasts_as_they_were(
    lesions: bool, subject: dict[str, nib.Nifti1Image]
) -> None:
    images = subject if not lesions else synthetic_subject(3, lesions=True)
    for key, digest in DIGESTS_BEFORE_T2STARW[lesions].items():
        assert hashlib.sha256(_data(images[key]).tobytes()).hexdigest() == digest, key


def _tissues(images: dict[str, nib.Nifti1Image]) -> dict[str, np.ndarray]:
    """CSF, GM and WM classified on T1w alone, inside the brain away from its border."""
    brain = ndimage.binary_erosion(_data(images["brain_mask"]) > 0, iterations=1)
    t1 = _data(images["T1w"]).astype(float)
    reference = np.percentile(t1[brain], 90)
    return {
        "brain": brain,
        "CSF": brain & (t1 < 0.3 * reference),
        "GM": brain & (t1 > 0.55 * reference) & (t1 < 0.72 * reference),
        "WM": brain & (t1 > 0.85 * reference),
        # Deep grey nuclei are partly white on the template's maps: greyish on T1w.
        "greyish": brain & (t1 > 0.45 * reference) & (t1 < 0.8 * reference),
    }


def test_t2starw_is_brightest_in_csf_then_grey_then_white_matter(
    subject: dict[str, nib.Nifti1Image],
) -> None:
    tissues = _tissues(subject)
    t2star = _data(subject["T2starw"]).astype(float)
    csf, gm, wm = (np.median(t2star[tissues[name]]) for name in ("CSF", "GM", "WM"))
    assert csf > 1.2 * gm and gm > 1.1 * wm


def _elongated_dark_components(image: np.ndarray, tissues: dict[str, np.ndarray]) -> int:
    """Connected groups of voxels under 60 % of white matter, three times longer than wide."""
    dark = tissues["brain"] & (image < 0.6 * np.median(image[tissues["WM"]]))
    labels, _ = ndimage.label(dark, structure=np.ones((3, 3, 3)))
    count = 0
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        points = np.argwhere(labels[box] == index)
        if len(points) >= 4:
            spread = np.sort(np.linalg.eigvalsh(np.cov(points.T)))
            count += spread[-1] > 9 * max(spread[-2], 0.05)
    return count


def test_t2starw_has_dark_elongated_veins_that_t2w_lacks(
    subject: dict[str, nib.Nifti1Image],
) -> None:
    tissues = _tissues(subject)
    assert _elongated_dark_components(_data(subject["T2starw"]).astype(float), tissues) >= 5
    assert _elongated_dark_components(_data(subject["T2w"]).astype(float), tissues) == 0


def test_t2starw_deep_grey_nuclei_are_iron_dark(subject: dict[str, nib.Nifti1Image]) -> None:
    # The subject is the template moved by a few mm: the basal ganglia lie in a central box
    # (mm from the centre of the brain mask) deep under the surface.
    tissues = _tissues(subject)
    affine = subject["T1w"].affine
    brain = _data(subject["brain_mask"]) > 0
    voxels = np.argwhere(brain)
    centre = nib.affines.apply_affine(affine, (voxels.min(0) + voxels.max(0)) / 2)
    offset = nib.affines.apply_affine(affine, np.moveaxis(np.indices(brain.shape), 0, -1)) - centre
    depth = ndimage.distance_transform_edt(brain, sampling=2.0)
    deep = (
        tissues["greyish"] & (depth >= 22) & (np.abs(offset[..., 0]) >= 8)
        & (np.abs(offset[..., 0]) <= 26) & (offset[..., 1] >= -10) & (offset[..., 1] <= 30)
        & (offset[..., 2] >= -6) & (offset[..., 2] <= 10)
    )
    cortex = tissues["GM"] & (depth <= 6)
    assert deep.sum() > 100 and cortex.sum() > 1000

    def deep_to_cortex(modality: str) -> float:
        image = _data(subject[modality]).astype(float)
        return np.median(image[deep]) / np.median(image[cortex])

    # T2w has the same tissue contrast without iron: the nuclei are far darker on T2starw only.
    assert deep_to_cortex("T2starw") < 0.8 * deep_to_cortex("T2w")


def test_lesions_change_nothing_but_the_lesions() -> None:
    healthy = synthetic_subject(5)
    patient = synthetic_subject(5, lesions=True)
    assert not _data(healthy["lesion_mask"]).any()
    lesion = _data(patient["lesion_mask"]).astype(bool)
    assert lesion.sum() * 8 >= 2000
    # The soft lesion edge reaches a little beyond the mask, never far from it.
    distance = ndimage.distance_transform_edt(~lesion)
    for modality in MODALITIES:
        changed = _data(healthy[modality]) != _data(patient[modality])
        assert changed.any()
        assert distance[changed].max() <= 6


def test_dataset_is_deterministic(tmp_path: Path, dataset: Path) -> None:
    again = generate_demo_dataset(tmp_path / "again", 0, 1, seed=0)
    label = "patient01"
    for relative in (
        Path(f"sub-{label}") / "anat" / f"sub-{label}_FLAIR.nii.gz",
        _lesion_path(Path(), label),
    ):
        np.testing.assert_array_equal(
            _data(nib.load(dataset / relative)), _data(nib.load(again / relative))
        )
    assert (dataset / "participants.tsv").read_text().splitlines()[-N_PATIENTS] == (
        again / "participants.tsv"
    ).read_text().splitlines()[1]


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PSR"])
def test_world_space_alignment_with_template(
    template: dict[str, nib.Nifti1Image], orientation: str
) -> None:
    images = synthetic_subject(7, orientation=orientation)
    assert nib.aff2axcodes(images["T1w"].affine) == tuple(orientation)
    reference = template["mask"]
    brain = resample_from_to(nib.as_closest_canonical(images["brain_mask"]), reference, order=0)
    assert _dice(_data(brain) > 0, _data(reference) > 0) > 0.8


def test_orientations_store_the_same_world_image() -> None:
    ras = synthetic_subject(7, lesions=True)
    for orientation in ("LPS", "PSR"):
        other = synthetic_subject(7, lesions=True, orientation=orientation)
        assert nib.aff2axcodes(other["T1w"].affine) == tuple(orientation)
        for key in ("T1w", "lesion_mask"):
            # Nearest-neighbour resampling between grids that coincide in world space is exact.
            moved = resample_from_to(other[key], ras[key], order=0)
            np.testing.assert_array_equal(_data(moved), _data(ras[key]))


def test_thick_flair_overlays_the_thin_one() -> None:
    thin = synthetic_subject(7, lesions=True, orientation="RAS")["FLAIR"]
    thick = synthetic_subject(7, lesions=True, orientation="LPS", thick_flair=True)["FLAIR"]
    assert sorted(float(zoom) for zoom in thick.header.get_zooms()) == [2.0, 2.0, 4.0]
    assert thick.header.get_zooms()[2] == 4.0  # axial slices: S is the third axis in LPS
    resampled = _data(resample_from_to(thick, thin, order=1)).astype(float)
    thin_data = _data(thin).astype(float)
    head = thin_data > 100

    def correlation(shift: int, axis: int) -> float:
        return np.corrcoef(resampled[head], np.roll(thin_data, shift, axis=axis)[head])[0, 1]

    aligned = correlation(0, 0)
    assert aligned > 0.9
    # Any one-voxel misregistration, half-voxel slice offset included, would do clearly worse.
    for axis in range(3):
        for shift in (-1, 1):
            assert correlation(shift, axis) < aligned - 0.05


def test_refuses_non_empty_target(tmp_path: Path) -> None:
    (tmp_path / "something.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_demo_dataset(tmp_path, 1, 0)
    assert (tmp_path / "something.txt").read_text() == "keep me"
    assert not (tmp_path / "dataset_description.json").exists()
