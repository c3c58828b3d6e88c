"""A small synthetic BIDS dataset for the ``demo`` command, built without any download.

Every subject is a randomly deformed and rigidly moved copy of the tissue maps of the embedded
MNI template (:mod:`bids_anomaly.template`), given T1w, T2w and FLAIR contrasts, a skull and a
scalp, a bias field and Rician noise. Patients also get white-matter lesions, whose masks are
written as ground truth in ``derivatives/lesion_masks``. Images are stored in several voxel
orientations and some FLAIR images on thick-slice grids, so that readers must honour the affine.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from scipy import ndimage
from scipy.spatial.transform import Rotation

import bids_anomaly
from bids_anomaly.template import template_images

MODALITIES = ("T1w", "T2w", "FLAIR")
BIDS_VERSION = "1.9.0"
GENERATED_BY = "bids_anomaly demo"

_VOXEL_MM = 2.0
# Native field of view (2 mm voxels): the template brain plus the head shells, with room for the
# random rotation, translation and deformation.
_NATIVE_SHAPE = (104, 124, 108)
_MAX_ROTATION_DEG = 8.0
_MAX_TRANSLATION_MM = 6.0
_MAX_DISPLACEMENT_MM = (3.0, 4.0)
_BIAS_AMPLITUDE = 0.15
_NOISE_FRACTION_OF_WM = (0.02, 0.03)
_INTENSITY_SCALE = 800.0
# Orientations cycled through the subjects of a group; all but RAS make readers reorient.
_ORIENTATIONS = ("RAS", "LPS", "PSR")

# Mean intensity of each tissue and head layer; lesions are given relative to white matter.
_TISSUE_MEANS = {
    "T1w": {"GM": 0.65, "WM": 1.0, "CSF": 0.2, "skull": 0.1, "scalp": 0.9},
    "T2w": {"GM": 0.6, "WM": 0.45, "CSF": 1.0, "skull": 0.1, "scalp": 0.5},
    "FLAIR": {"GM": 0.7, "WM": 0.5, "CSF": 0.1, "skull": 0.1, "scalp": 0.5},
}
_LESION_TO_WM = {"T1w": 0.7, "T2w": 1.5, "FLAIR": 1.6}
_TISSUE_JITTER = 0.05

# Outer radius (mm from the smoothed brain surface) of each layer outside the brain.
_EXTRACEREBRAL_CSF_MM = 2.0
_SKULL_MM = 6.0
_SCALP_MM = 10.0

_LESION_COUNT = (3, 6)
_MAX_LESIONS = 12
_LESION_RADIUS_MM = (3.0, 8.0)
_MIN_LESION_VOLUME_MM3 = 2000.0
_MIN_LESION_DEPTH_MM = 4.0


@dataclass(frozen=True)
class _TemplateMaps:
    """Template arrays the generator samples from (2 mm grid)."""

    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    brain_center_mm: np.ndarray


@functools.lru_cache(maxsize=1)
def _template_maps() -> _TemplateMaps:
    """Load the 2 mm template once per process: nilearn takes seconds to read it."""
    images = template_images(2)
    arrays = {
        key: np.asarray(images[key].dataobj, dtype=np.float32) for key in ("GM", "WM", "mask")
    }
    for array in arrays.values():
        array.flags.writeable = False
    affine = images["mask"].affine
    corners = np.argwhere(arrays["mask"] > 0)
    center_voxel = (corners.min(axis=0) + corners.max(axis=0)) / 2.0
    return _TemplateMaps(
        gm=arrays["GM"],
        wm=arrays["WM"],
        mask=arrays["mask"],
        affine=affine,
        brain_center_mm=nib.affines.apply_affine(affine, center_voxel),
    )


def synthetic_subject(
    seed: int = 0, lesions: bool = False, *, orientation: str = "RAS", thick_flair: bool = False
) -> dict[str, nib.Nifti1Image]:
    """Synthesise the images of one subject in memory.

    The anatomy depends only on ``seed``: the same seed with and without lesions gives the same
    brain, head, bias fields and noise, so the two differ by the lesions alone.

    Parameters
    ----------
    seed : int
        Seed of the random generator.
    lesions : bool
        Add 3 to 6 white-matter lesions, or more where needed to reach 2 ml in all.
    orientation : str
        Voxel axis codes of the stored arrays, such as ``"RAS"``, ``"LPS"`` or ``"PSR"``; the
        affine always gives the true world position.
    thick_flair : bool
        Store FLAIR on a 2 x 2 x 4 mm grid (axial slices), averaged from the 2 mm grid.

    Returns
    -------
    dict of str to nibabel.Nifti1Image
        ``T1w``, ``T2w`` and ``FLAIR`` (int16, unscaled, 0 to about 1000), and on the T1w grid
        the ground-truth ``lesion_mask`` (uint8, empty without lesions) and ``brain_mask``
        (uint8).

    """
    anatomy_rng, contrast_rng, lesion_rng, noise_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(4)
    )
    tpl = _template_maps()
    affine = _native_affine(tpl.brain_center_mm)
    gm, wm, brain = _warped_tissue(tpl, affine, anatomy_rng)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    layers = _head_layers(brain)
    lesion_weight = (
        _lesion_weight(wm, csf, lesion_rng) if lesions else np.zeros_like(wm, dtype=np.float32)
    )
    tissues = {"GM": gm, "WM": wm, "CSF": csf, **layers}

    images = {}
    for modality in MODALITIES:
        means = {
            name: value * contrast_rng.uniform(1 - _TISSUE_JITTER, 1 + _TISSUE_JITTER)
            for name, value in _TISSUE_MEANS[modality].items()
        }
        clean = _contrast(tissues, means)
        lesion_value = _LESION_TO_WM[modality] * means["WM"]
        clean += lesion_weight * (lesion_value - clean)
        clean *= np.exp(_BIAS_AMPLITUDE * _smooth_field(contrast_rng, clean.shape, order=3))
        grid_affine = affine
        if modality == "FLAIR" and thick_flair:
            clean, grid_affine = _thick_slices(clean, affine)
        noise_sigma = means["WM"] * noise_rng.uniform(*_NOISE_FRACTION_OF_WM)
        noisy = _rician(clean, noise_sigma, noise_rng)
        scaled = np.clip(np.rint(noisy * _INTENSITY_SCALE), 0, np.iinfo(np.int16).max)
        images[modality] = _nifti(scaled.astype(np.int16), grid_affine, orientation)
    images["lesion_mask"] = _nifti((lesion_weight > 0.5).astype(np.uint8), affine, orientation)
    images["brain_mask"] = _nifti((brain > 0.5).astype(np.uint8), affine, orientation)
    return images


def generate_demo_dataset(
    bids_dir: Path, n_healthy: int = 8, n_patients: int = 3, seed: int = 0,
    modalities: tuple[str, ...] = MODALITIES,
) -> Path:
    """Write a synthetic BIDS dataset of healthy subjects and patients with lesions.

    Subjects ``sub-healthyNN`` and ``sub-patientNN`` each get T1w, T2w and FLAIR images with
    JSON sidecars. Lesion masks of the patients are written on their T1w grid to
    ``derivatives/lesion_masks``. Each subject depends only on ``seed``, its group and its
    number, so changing the size of one group leaves the other subjects unchanged.

    Parameters
    ----------
    bids_dir : Path
        Target folder; it must be empty or not exist.
    n_healthy : int
        Number of healthy subjects.
    n_patients : int
        Number of patients.
    seed : int
        Seed of the whole dataset.
    modalities : tuple of str
        Contrasts to write (among T1w, T2w and FLAIR); the anatomy does not depend on them.

    Returns
    -------
    Path
        ``bids_dir``.

    Raises
    ------
    FileExistsError
        If ``bids_dir`` is a file or a folder that is not empty.

    """
    bids_dir = Path(bids_dir)
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown or not modalities:
        raise ValueError(f"modalities {modalities}: choose among {', '.join(MODALITIES)}")
    if bids_dir.exists() and (not bids_dir.is_dir() or any(bids_dir.iterdir())):
        raise FileExistsError(f"{bids_dir}: the demo dataset needs an empty or new folder")
    derivatives = bids_dir / "derivatives" / "lesion_masks"
    derivatives.mkdir(parents=True, exist_ok=True)
    _write_dataset_files(bids_dir)
    _write_json(
        derivatives / "dataset_description.json",
        {
            "Name": "Ground-truth lesion masks of the bids_anomaly demo dataset",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": _generated_by(),
        },
    )

    rows = []
    for group, count in (("healthy", n_healthy), ("patient", n_patients)):
        for number in range(1, count + 1):
            label = f"{group}{number:02d}"
            sequence = np.random.SeedSequence([seed, group == "patient", number])
            subject_seed = int(sequence.generate_state(1)[0])
            demographics = np.random.default_rng(sequence.spawn(1)[0])
            images = synthetic_subject(
                subject_seed,
                lesions=group == "patient",
                orientation=_ORIENTATIONS[(number - 1) % len(_ORIENTATIONS)],
                thick_flair=number % 2 == 0,
            )
            _write_subject(bids_dir, label, {m: images[m] for m in modalities})
            if group == "patient":
                anat = derivatives / f"sub-{label}" / "anat"
                anat.mkdir(parents=True, exist_ok=True)
                images["lesion_mask"].to_filename(anat / f"sub-{label}_label-lesion_mask.nii.gz")
            rows.append(
                f"sub-{label}\t{group}\t{int(demographics.integers(22, 76))}"
                f"\t{demographics.choice(['F', 'M'])}"
            )
    (bids_dir / "participants.tsv").write_text(
        "participant_id\tgroup\tage\tsex\n" + "\n".join(rows) + "\n"
    )
    return bids_dir


def _native_affine(center_mm: np.ndarray) -> np.ndarray:
    """RAS affine of the native 2 mm grid, centred on the template brain."""
    affine = np.diag([_VOXEL_MM, _VOXEL_MM, _VOXEL_MM, 1.0])
    affine[:3, 3] = center_mm - _VOXEL_MM * (np.asarray(_NATIVE_SHAPE) - 1) / 2.0
    return affine


def _warped_tissue(
    tpl: _TemplateMaps, affine: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample GM, WM and brain mask of the template through a random rigid + smooth warp.

    The subject's world position x comes from the template's y as x = R (y - c) + c + t with a
    displacement on top, so each native voxel reads the template at
    y = R^T (x - c - t) + c + u(x).
    """
    rotation = Rotation.from_euler(
        "xyz", rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG, 3), degrees=True
    ).as_matrix()
    translation = rng.uniform(-_MAX_TRANSLATION_MM, _MAX_TRANSLATION_MM, 3)
    center = tpl.brain_center_mm
    subject_to_template = np.eye(4)
    subject_to_template[:3, :3] = rotation.T
    subject_to_template[:3, 3] = center - rotation.T @ (center + translation)
    native_to_template_voxels = np.linalg.inv(tpl.affine) @ subject_to_template @ affine

    # Order 5: wavelengths of about 80 mm and more, like the smooth field in the brief.
    displacement_mm = np.stack([_smooth_field(rng, _NATIVE_SHAPE, order=5) for _ in range(3)])
    displacement_mm *= rng.uniform(*_MAX_DISPLACEMENT_MM) / np.linalg.norm(
        displacement_mm, axis=0
    ).max()
    voxels = np.indices(_NATIVE_SHAPE, dtype=np.float32).reshape(3, -1)
    coordinates = (
        native_to_template_voxels[:3, :3].astype(np.float32) @ voxels
        + native_to_template_voxels[:3, 3:].astype(np.float32)
        + np.linalg.inv(tpl.affine)[:3, :3].astype(np.float32)
        @ displacement_mm.reshape(3, -1).astype(np.float32)
    )

    def sample(volume: np.ndarray) -> np.ndarray:
        values = ndimage.map_coordinates(volume, coordinates, order=1, mode="constant", cval=0.0)
        return values.reshape(_NATIVE_SHAPE)

    brain = sample(tpl.mask)
    # The template's GM map has values outside its brain mask; they would float in the skull.
    # Template GM + WM never exceed one, so here they never exceed the brain fraction.
    gm = sample(tpl.gm) * brain
    wm = sample(tpl.wm) * brain
    return gm, wm, brain


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Random field in [-1, 1] made of low-frequency cosines, like SPM's bias-field model.

    A sum of separable cosine products is smooth by construction and far cheaper than smoothing
    white noise over a whole volume. The constant term is left out: it would only shift or scale.
    """
    bases = [
        np.cos(np.pi * np.outer(np.arange(order), (np.arange(size) + 0.5) / size))
        for size in shape
    ]
    frequency = np.add.outer(np.add.outer(np.arange(order), np.arange(order)), np.arange(order))
    coefficients = rng.standard_normal((order,) * 3) / (1.0 + frequency)
    coefficients[0, 0, 0] = 0.0
    field = np.einsum("abc,ai,bj,ck->ijk", coefficients, *bases, optimize=True)
    return (field / np.abs(field).max()).astype(np.float32)


def _head_layers(brain: np.ndarray) -> dict[str, np.ndarray]:
    """Partial-volume fractions of extracerebral CSF, skull and scalp outside the brain.

    The shells are distances from a smoothed brain, so that the head is a closed, smooth shape
    without the folds of the cortex.
    """
    hull = ndimage.gaussian_filter(brain, sigma=2.0) > 0.3
    distance = ndimage.distance_transform_edt(~hull, sampling=_VOXEL_MM).astype(np.float32)

    def inside(radius: float) -> np.ndarray:
        # A one-voxel ramp instead of a hard edge avoids staircase borders.
        return np.clip((radius - distance) / _VOXEL_MM + 0.5, 0.0, 1.0)

    csf_shell, skull_shell, head = (
        inside(radius) for radius in (_EXTRACEREBRAL_CSF_MM, _SKULL_MM, _SCALP_MM)
    )
    outside = 1.0 - brain
    return {
        "outer_CSF": outside * csf_shell,
        "skull": outside * (skull_shell - csf_shell),
        "scalp": outside * (head - skull_shell),
    }


def _contrast(tissues: dict[str, np.ndarray], means: dict[str, float]) -> np.ndarray:
    """Noise-free image: tissue fractions, which sum to at most one, times their intensities."""
    image = (
        tissues["GM"] * means["GM"]
        + tissues["WM"] * means["WM"]
        + (tissues["CSF"] + tissues["outer_CSF"]) * means["CSF"]
        + tissues["skull"] * means["skull"]
        + tissues["scalp"] * means["scalp"]
    )
    return image.astype(np.float32)


def _lesion_weight(wm: np.ndarray, csf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soft lesion map in [0, 1]: irregular blobs centred in deep white matter.

    A random number of 3 to 6 lesions is placed, then more while they total under 2 ml
    above weight 0.5 (at most 12).
    """
    deep = wm > 0.9
    depth = ndimage.distance_transform_edt(deep, sampling=_VOXEL_MM)
    candidates = np.argwhere(depth >= _MIN_LESION_DEPTH_MM)
    if len(candidates) == 0:
        candidates = np.argwhere(deep)
    weight = np.zeros(wm.shape, dtype=np.float32)
    target = int(rng.integers(_LESION_COUNT[0], _LESION_COUNT[1] + 1))
    voxel_volume = _VOXEL_MM**3
    # Lesions replace parenchyma, not ventricles or sulci.
    parenchyma = np.clip(1.0 - csf, 0.0, 1.0)
    for count in range(1, _MAX_LESIONS + 1):
        center = candidates[rng.integers(len(candidates))]
        _add_blob(weight, center, rng)
        lesion = weight * parenchyma
        if count >= target and (lesion > 0.5).sum() * voxel_volume >= _MIN_LESION_VOLUME_MM3:
            break
    return lesion


def _add_blob(weight: np.ndarray, center: np.ndarray, rng: np.random.Generator) -> None:
    """Add one lesion, a union of 2 to 4 overlapping random ellipsoids with a soft edge."""
    half = int(np.ceil(3 * _LESION_RADIUS_MM[1] / _VOXEL_MM))
    low = np.maximum(center - half, 0)
    high = np.minimum(center + half + 1, weight.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    grid = np.moveaxis(np.indices(high - low), 0, -1) + low
    offsets_mm = (grid - center).astype(np.float32) * _VOXEL_MM
    blob = np.zeros(grid.shape[:3], dtype=bool)
    for _ in range(int(rng.integers(2, 5))):
        radii = rng.uniform(*_LESION_RADIUS_MM, 3)
        shift = rng.normal(0.0, _LESION_RADIUS_MM[0], 3)
        axes = Rotation.random(random_state=rng).as_matrix()
        local = (offsets_mm - shift) @ axes
        blob |= ((local / radii) ** 2).sum(axis=-1) <= 1.0
    soft = ndimage.gaussian_filter(blob.astype(np.float32), sigma=0.8)
    np.maximum(weight[box], soft, out=weight[box])


def _thick_slices(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average pairs of axial slices: a 4 mm slice covers two 2 mm ones.

    The new voxel k is centred between old voxels 2k and 2k + 1, hence the half-voxel shift.
    """
    pairs = image[:, :, : image.shape[2] // 2 * 2]
    thick = 0.5 * (pairs[:, :, 0::2] + pairs[:, :, 1::2])
    scaling = np.diag([1.0, 1.0, 2.0, 1.0])
    scaling[2, 3] = 0.5
    return thick, affine @ scaling


def _rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise, as a scanner reconstructs it."""
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real**2 + imaginary**2)


def _nifti(data: np.ndarray, ras_affine: np.ndarray, orientation: str) -> nib.Nifti1Image:
    """NIfTI image with its array stored in ``orientation`` and a matching affine."""
    transform = ornt_transform(io_orientation(ras_affine), axcodes2ornt(tuple(orientation)))
    stored = np.ascontiguousarray(apply_orientation(data, transform))
    affine = ras_affine @ inv_ornt_aff(transform, data.shape)
    img = nib.Nifti1Image(stored, affine)
    img.header.set_data_dtype(stored.dtype)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


def _write_subject(bids_dir: Path, label: str, images: dict[str, nib.Nifti1Image]) -> None:
    """Write the anatomical images of one subject and their sidecars."""
    anat = bids_dir / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    for modality in images:
        stem = anat / f"sub-{label}_{modality}"
        images[modality].to_filename(f"{stem}.nii.gz")
        zooms = [float(zoom) for zoom in images[modality].header.get_zooms()[:3]]
        _write_json(
            Path(f"{stem}.json"),
            {
                "Description": f"Synthetic {modality} image generated by {GENERATED_BY}",
                "SliceThickness": max(zooms),
            },
        )


def _write_dataset_files(bids_dir: Path) -> None:
    """Write the dataset description, README and participants sidecar."""
    _write_json(
        bids_dir / "dataset_description.json",
        {
            "Name": "bids_anomaly synthetic demo dataset",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "GeneratedBy": _generated_by(),
        },
    )
    (bids_dir / "README").write_text(
        "Synthetic brain MRI generated by the bids_anomaly demo command.\n\n"
        "Each subject is a randomly deformed and moved copy of the MNI152 2009a tissue maps\n"
        "that ship with nilearn, with T1w, T2w and FLAIR contrasts, a skull and scalp, a bias\n"
        "field and Rician noise. Patients have synthetic white-matter lesions (bright on\n"
        "FLAIR and T2w, dark on T1w); their masks, on the T1w grid, are in\n"
        "derivatives/lesion_masks. No image comes from a real person.\n"
    )
    _write_json(
        bids_dir / "participants.json",
        {
            "participant_id": {"Description": "Subject label"},
            "group": {
                "Description": "Whether the subject has synthetic lesions",
                "Levels": {"healthy": "no lesions", "patient": "white-matter lesions"},
            },
            "age": {"Description": "Age at scan (random)", "Units": "year"},
            "sex": {"Description": "Sex (random)", "Levels": {"F": "female", "M": "male"}},
        },
    )


def _generated_by() -> list[dict[str, str]]:
    """Return the ``GeneratedBy`` field of both dataset descriptions."""
    return [{"Name": GENERATED_BY, "Version": bids_anomaly.__version__}]


def _write_json(path: Path, content: dict) -> None:
    """Write indented JSON with a final newline."""
    path.write_text(json.dumps(content, indent=2) + "\n")


@dataclass(frozen=True)
class DiffusionCohort:
    """A generated cohort of template-space FA and MD maps (:func:`diffusion_cohort`).

    Attributes
    ----------
    groups : dict of str to str
        ``control`` or ``patient`` by participant label.
    brain, tissue, nuclei : numpy.ndarray
        The brain mask, the tissue labels (1 GM, 2 WM, 3 CSF) and the nuclei (label 1, an atlas).
    space : str
        The ``space-`` of the maps.
    resolution : int
        Their voxel size (mm).
    """

    groups: dict[str, str]
    brain: np.ndarray
    tissue: np.ndarray
    nuclei: np.ndarray
    space: str
    resolution: int


def diffusion_cohort(output_dir: Path, n_controls: int = 30, n_patients: int = 30,
                     effect: float = 0.05, variation: float = 0.08,
                     shape: tuple[int, int, int] = (22, 26, 22), seed: int = 20,
                     space: str = "MNI152NLin2009aSym", resolution: int = 2) -> DiffusionCohort:
    """Write FA and MD maps and brain masks of a Parkinson's-like cohort, as preprocessed.

    An ellipsoid brain holds CSF (centre), white matter and a grey-matter shell, and two small
    spheres of "deep grey nuclei" (about 60 voxels each). Every subject's maps are the tissue
    values times 1 + a smooth random field (standard deviation ``variation`` per voxel); the
    patients' FA is ``effect`` lower and MD ``effect`` higher inside the nuclei: a regional
    change far below what a voxel shows. The maps are written where the participant level writes
    diffusion maps (``sub-<label>/dwi/*_model-tensor_param-fa_dwimap.nii.gz``), with brain masks.

    Returns
    -------
    DiffusionCohort
    """
    from bids_anomaly import bids

    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    radius = np.sqrt((((grid.T - centre) / (centre - 1.5)) ** 2).T.sum(0))
    brain = radius < 1
    tissue = (np.where(radius < 0.3, 3, np.where(radius < 0.75, 2, 1)) * brain).astype(np.int16)
    nuclei = np.zeros(shape, np.int16)
    for side in (-1, 1):
        point = centre + np.array([side * 4.5, 1.0, 0.0])
        nuclei[((grid.T - point) ** 2).T.sum(0) <= 2.5 ** 2] = 1
    tissue[nuclei > 0] = 1
    fa_base = np.choose(tissue, [0.0, 0.2, 0.45, 0.05]).astype(np.float64)
    md_base = np.choose(tissue, [0.0, 0.85e-3, 0.75e-3, 3.0e-3])
    fa_base[nuclei > 0], md_base[nuclei > 0] = 0.3, 0.8e-3
    affine = np.diag([resolution] * 3 + [1.0])
    rng = np.random.default_rng(seed)
    groups = {}
    for index in range(n_controls + n_patients):
        patient = index >= n_controls
        label = f"{'pd' if patient else 'hc'}{index:02d}"
        groups[label] = "patient" if patient else "control"
        for name, base, sign in (("FA", fa_base, -1), ("MD", md_base, 1)):
            noise = ndimage.gaussian_filter(rng.normal(size=shape), 0.7)
            value = base * (1 + noise * variation / noise.std())
            if patient:
                value[nuclei > 0] *= 1 + sign * effect
            path = bids.spec_path(output_dir, label, None,
                                  bids.preproc_spec(space, resolution, name))
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.Nifti1Image(np.where(brain, value, 0).astype(np.float32), affine).to_filename(
                path)
        mask = bids.spec_path(output_dir, label, None, bids.brain_mask_spec(space, resolution))
        mask.parent.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(brain.astype(np.uint8), affine).to_filename(mask)
    return DiffusionCohort(groups, brain, tissue, nuclei, space, resolution)
