"""A small synthetic BIDS dataset for the ``demo`` command, built without any download.

Every subject is a randomly deformed and rigidly moved copy of the tissue maps of the embedded
MNI template (:mod:`bids_anomaly.imaging.template`), given T1w, T2w, FLAIR and T2*-weighted
contrasts, a skull and a scalp, a bias field and Rician noise. The T2*-weighted image (``T2starw``,
a 3T gradient echo) also shows what susceptibility does: dark veins, iron-dark deep grey nuclei and,
on request, cerebral microbleeds, each a magnetised sphere whose dipole field darkens more than the
sphere ("blooming", :func:`~bids_anomaly.imaging.susceptibility.blooming_signal`). Patients also
get white-matter lesions, whose masks are written as ground truth in ``derivatives/lesion_masks``,
and microbleeds where asked, written to ``derivatives/microbleeds``. Images are stored in several
voxel orientations and some FLAIR images on thick-slice grids, so that readers must honour the
affine.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
from scipy.interpolate import CubicSpline
from scipy.spatial.transform import Rotation

import bids_anomaly
from bids_anomaly.imaging.susceptibility import (
    blooming_extent,
    blooming_signal,
    dephasing_for_bloom,
)
from bids_anomaly.imaging.template import template_images

if TYPE_CHECKING:
    import pandas as pd

MODALITIES = ("T1w", "T2w", "FLAIR", "T2starw")
"""Contrasts of every subject of :func:`synthetic_subject`."""
DEFAULT_MODALITIES = ("T1w", "T2w", "FLAIR")
"""Contrasts :func:`generate_demo_dataset` writes unless asked for others."""
MICROBLEED_REGIONS = ("lobar", "deep", "infratentorial")
"""Where microbleeds are placed: cortex and grey-white junction, basal ganglia and thalami,
brainstem and cerebellum."""
MICROBLEED_COLUMNS = {
    "x": "World x (mm, scanner RAS) of the centre, in the coordinates of the raw T1w image",
    "y": "World y (mm, scanner RAS) of the centre, in the coordinates of the raw T1w image",
    "z": "World z (mm, scanner RAS) of the centre, in the coordinates of the raw T1w image",
    "radius_mm": "Visible radius (mm) of the dark focus on the T2*-weighted image: the radius "
    "of a sphere with the volume that loses at least half its signal (blooming included)",
    "region": "lobar (cortex, grey-white junction), deep (basal ganglia, thalami) or "
    "infratentorial (brainstem, cerebellum)",
}
"""Columns of ``synthetic_subject(...)["microbleed_points"]`` and of the demo's points TSV."""
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
    # 3T gradient echo, TE about 20 ms: the longer T2* of CSF and GM keeps more signal.
    "T2starw": {"GM": 0.7, "WM": 0.55, "CSF": 1.0, "skull": 0.05, "scalp": 0.45},
}
_LESION_TO_WM = {"T1w": 0.7, "T2w": 1.5, "FLAIR": 1.6, "T2starw": 1.3}
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

# Susceptibility (T2starw). Boxes are MNI mm of the template, ((x0, x1), (y0, y1), (z0, z1)).
_NUCLEI_BOX_MM = ((-33.0, 33.0), (-36.0, 26.0), (-6.0, 22.0))  # basal ganglia and thalami
_NUCLEI_MIN_DEPTH_MM = 20.0
_NUCLEI_MIN_GM = 0.45
# In front of the thalami, grey matter this close to the midline is cingulate cortex.
_NUCLEI_MIDLINE_MM = 6.0
_IRON_DARKENING = (0.3, 0.4)
_BRAINSTEM_BOX_MM = ((-12.0, 12.0), (-42.0, -12.0), (-50.0, -14.0))
_CEREBELLUM_BOX_MM = ((-45.0, 45.0), (-85.0, -45.0), (-55.0, -22.0))
# Lobar sites stay out of the posterior fossa (where the boxes above are its core only) and
# this far from the deep nuclei.
_POSTERIOR_FOSSA_MM = {"y_below": -30.0, "z_below": -8.0}
_NUCLEI_MARGIN_MM = 4.0
# Deoxygenated venous blood keeps about a tenth of the tissue's signal at TE 20 ms.
_VENOUS_SIGNAL = 0.1
_SURFACE_VEINS = (8, 12)
_SURFACE_VEIN_DEPTH_MM = 2.0
_MEDULLARY_VEINS = (4, 8)
_MEDULLARY_LENGTH_MM = (12.0, 25.0)
# Medullary veins start in deep white matter of the centrum semiovale, off the corpus callosum.
_MEDULLARY_START = {"min_wm": 0.95, "min_depth_mm": 15.0, "min_z_mm": 5.0, "min_abs_x_mm": 10.0}
_VEIN_DIAMETER_MM = (1.2, 2.0)
# Deoxygenated blood dephases the tissue around a vein as well: the dark tube is wider than the
# lumen by this factor (blooming, as for microbleeds).
_VEIN_BLOOM = 1.7
# Internal cerebral vein: from the foramen of Monro over the thalami, under the splenium.
_INTERNAL_CEREBRAL_VEIN_MM = (
    (0.0, -4.0, 15.0), (0.0, -14.0, 17.0), (0.0, -24.0, 16.0), (0.0, -32.0, 12.0),
    (0.0, -40.0, 5.0),
)
_INTERNAL_CEREBRAL_VEIN_DIAMETER_MM = 2.0
_VEIN_STEP_MM = 0.5

_MICROBLEED_RADIUS_MM = (1.0, 5.0)
# Visible over true radius: the true source is a third to a half of the dark focus.
_MICROBLEED_BLOOM = (2.0, 3.0)
_MICROBLEED_REGION_CHANCE = {"lobar": 0.6, "deep": 0.3, "infratentorial": 0.1}
_MICROBLEED_ATTEMPTS = 2000
_MICROBLEED_GAP_MM = 2.0
# Haemosiderin shortens T2 a little as well: a microbleed is a few per cent darker on T2w.
_MICROBLEED_T2W_LOSS = 0.05
_DEMO_MICROBLEEDS = (1, 20)
# Signal fraction at which the dark focus is "visible"; the dipole field is computed this far
# (in visible radii along B0), where it darkens the signal by under 2 %.
_VISIBLE_SIGNAL = 0.5
_BLOOMING_REACH = 3.5


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


@dataclass(frozen=True)
class _TemplateRegions:
    """Where the template has iron and where microbleeds go (2 mm template grid).

    Attributes
    ----------
    nuclei : numpy.ndarray
        Deep grey nuclei (basal ganglia, thalami), 0 to 1 with a soft border.
    sites : numpy.ndarray
        Microbleed sites: 1 + the index in :data:`MICROBLEED_REGIONS`, 0 for none.
    medullary_starts : numpy.ndarray
        ``(n, 3)`` MNI mm of deep white matter where medullary veins begin.
    """

    nuclei: np.ndarray
    sites: np.ndarray
    medullary_starts: np.ndarray


@functools.lru_cache(maxsize=1)
def _template_regions() -> _TemplateRegions:
    """Regions of the template, from its tissue maps and boxes in MNI coordinates."""
    tpl = _template_maps()
    world = nib.affines.apply_affine(tpl.affine, np.moveaxis(np.indices(tpl.mask.shape), 0, -1))
    brain = tpl.mask > 0.5
    depth = ndimage.distance_transform_edt(brain, sampling=_VOXEL_MM)

    def in_box(box: tuple[tuple[float, float], ...]) -> np.ndarray:
        inside = brain.copy()
        for axis, (low, high) in enumerate(box):
            inside &= (world[..., axis] >= low) & (world[..., axis] <= high)
        return inside

    # The smoothed GM map also takes the pallidum, whose GM probability is low but which is
    # enclosed by putamen.
    nuclei = (
        in_box(_NUCLEI_BOX_MM)
        & (depth >= _NUCLEI_MIN_DEPTH_MM)
        & (ndimage.gaussian_filter(tpl.gm, sigma=1.0) > _NUCLEI_MIN_GM)
        & ~((np.abs(world[..., 0]) < _NUCLEI_MIDLINE_MM) & (world[..., 1] > 0.0))
    )
    infratentorial = in_box(_BRAINSTEM_BOX_MM) | in_box(_CEREBELLUM_BOX_MM)
    posterior_fossa = (world[..., 1] < _POSTERIOR_FOSSA_MM["y_below"]) & (
        world[..., 2] < _POSTERIOR_FOSSA_MM["z_below"]
    )
    near_nuclei = ndimage.distance_transform_edt(~nuclei, sampling=_VOXEL_MM) <= (
        _NUCLEI_MARGIN_MM
    )
    lobar = brain & ~near_nuclei & ~posterior_fossa & ~infratentorial
    sites = np.zeros(tpl.mask.shape, dtype=np.uint8)
    for index, region in enumerate((lobar, nuclei, infratentorial), start=1):
        sites[region] = index
    deep_white = (
        (tpl.wm > _MEDULLARY_START["min_wm"])
        & (depth >= _MEDULLARY_START["min_depth_mm"])
        & (world[..., 2] >= _MEDULLARY_START["min_z_mm"])
        & (np.abs(world[..., 0]) >= _MEDULLARY_START["min_abs_x_mm"])
    )
    soft_nuclei = ndimage.gaussian_filter(nuclei.astype(np.float32), sigma=0.7)
    for array in (soft_nuclei, sites):
        array.flags.writeable = False
    return _TemplateRegions(
        nuclei=soft_nuclei, sites=sites, medullary_starts=world[deep_white].astype(np.float64)
    )


@dataclass(frozen=True)
class _Warp:
    """How one subject's native grid reads the template, and the way back for points.

    A native world position x reads the template at y = R^T (x - c - t) + c + u(x).

    Attributes
    ----------
    rotation, translation, center : numpy.ndarray
        R, t and c.
    displacement_mm : numpy.ndarray
        u on the native grid, ``(3, *native shape)``.
    template_voxels : numpy.ndarray
        ``(3, n)`` template voxel coordinates read by the native voxels, in C order.
    native_affine : numpy.ndarray
        Voxel-to-world affine of the native grid.
    """

    rotation: np.ndarray
    translation: np.ndarray
    center: np.ndarray
    displacement_mm: np.ndarray
    template_voxels: np.ndarray
    native_affine: np.ndarray

    def sample(self, volume: np.ndarray, order: int = 1) -> np.ndarray:
        """A template-grid volume on the native grid."""
        values = ndimage.map_coordinates(
            volume, self.template_voxels, order=order, mode="constant", cval=0.0
        )
        return values.reshape(_NATIVE_SHAPE)

    def to_native_mm(self, template_mm: np.ndarray) -> np.ndarray:
        """Native world positions of template points ``(n, 3)``: x = R (y - c - u(x)) + c + t.

        u depends on x, so the equation is solved by fixed-point iteration; u is smooth and a
        few millimetres at most, so three steps are plenty.
        """
        rigid = (template_mm - self.center) @ self.rotation.T + self.center + self.translation
        native = rigid
        to_voxels = np.linalg.inv(self.native_affine)
        for _ in range(3):
            voxels = nib.affines.apply_affine(to_voxels, native).T
            displacement = np.stack(
                [ndimage.map_coordinates(u, voxels, order=1, mode="nearest")
                 for u in self.displacement_mm],
                axis=-1,
            )
            native = rigid - displacement @ self.rotation.T
        return native


def synthetic_subject(
    seed: int = 0,
    lesions: bool = False,
    *,
    orientation: str = "RAS",
    thick_flair: bool = False,
    microbleeds: int = 0,
) -> dict[str, nib.Nifti1Image | pd.DataFrame]:
    """Synthesise the images of one subject in memory.

    The anatomy depends only on ``seed``: the same seed with and without lesions or microbleeds
    gives the same brain, head, veins, bias fields and noise, so the images differ by the lesions
    and microbleeds alone. T1w, T2w and FLAIR do not depend on the T2*-weighted image or the
    microbleeds' placement (each draws from its own random stream).

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
    microbleeds : int
        Number of cerebral microbleeds (visible diameter 2 to 10 mm) to place in the brain
        parenchyma, apart from one another and from the lesions; fewer only where no room is
        left. They darken T2starw with their blooming dipole pattern and T2w by a few per cent.

    Returns
    -------
    dict of str to nibabel.Nifti1Image or pandas.DataFrame
        ``T1w``, ``T2w``, ``FLAIR`` and ``T2starw`` (int16, unscaled, 0 to about 1000), and on
        the T1w grid the ground-truth ``lesion_mask`` (uint8, empty without lesions),
        ``brain_mask`` (uint8) and ``microbleed_mask`` (uint8, microbleed i labelled i: the
        voxels that keep at most half their T2starw signal, the voxel of its centre among
        them); ``microbleed_points`` is a table (:data:`MICROBLEED_COLUMNS`) with one row per
        microbleed, row i - 1 for label i, positions in the world coordinates of the T1w image.

    """
    anatomy_rng, contrast_rng, lesion_rng, noise_rng, vein_rng, t2star_rng, microbleed_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(7)
    )
    tpl = _template_maps()
    affine = _native_affine(tpl.brain_center_mm)
    gm, wm, brain, warp = _warped_tissue(tpl, affine, anatomy_rng)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    layers = _head_layers(brain)
    lesion_weight = (
        _lesion_weight(wm, csf, lesion_rng) if lesions else np.zeros_like(wm, dtype=np.float32)
    )
    tissues = {"GM": gm, "WM": wm, "CSF": csf, **layers}
    regions = _template_regions()
    nuclei = warp.sample(regions.nuclei)
    iron = vein_rng.uniform(*_IRON_DARKENING) * nuclei
    veins = 1.0 - (1.0 - _VENOUS_SIGNAL) * _vein_fraction(warp, vein_rng)
    bleed_signal, bleed_labels, bleed_points = _microbleeds(
        microbleeds, brain, gm, csf, warp.sample(regions.sites, order=0), lesion_weight, affine,
        microbleed_rng,
    )
    signal_left = {
        "T2starw": veins * bleed_signal,
        "T2w": 1.0 - _MICROBLEED_T2W_LOSS * (1.0 - bleed_signal) if microbleeds else None,
    }

    images = {}
    for modality in MODALITIES:
        # T1w, T2w and FLAIR share the original two streams, in their original order.
        jitter_rng, modality_noise_rng = (
            (t2star_rng, t2star_rng) if modality == "T2starw" else (contrast_rng, noise_rng)
        )
        means = {
            name: value * jitter_rng.uniform(1 - _TISSUE_JITTER, 1 + _TISSUE_JITTER)
            for name, value in _TISSUE_MEANS[modality].items()
        }
        clean = _contrast(tissues, means)
        if modality == "T2starw":
            # Ferritin iron shortens T2* in the parenchyma of the deep nuclei, not in CSF.
            clean -= iron * (gm * means["GM"] + wm * means["WM"])
        lesion_value = _LESION_TO_WM[modality] * means["WM"]
        clean += lesion_weight * (lesion_value - clean)
        if signal_left.get(modality) is not None:
            clean *= signal_left[modality]
        clean *= np.exp(_BIAS_AMPLITUDE * _smooth_field(jitter_rng, clean.shape, order=3))
        grid_affine = affine
        if modality == "FLAIR" and thick_flair:
            clean, grid_affine = _thick_slices(clean, affine)
        noise_sigma = means["WM"] * modality_noise_rng.uniform(*_NOISE_FRACTION_OF_WM)
        noisy = _rician(clean, noise_sigma, modality_noise_rng)
        scaled = np.clip(np.rint(noisy * _INTENSITY_SCALE), 0, np.iinfo(np.int16).max)
        images[modality] = _nifti(scaled.astype(np.int16), grid_affine, orientation)
    images["lesion_mask"] = _nifti((lesion_weight > 0.5).astype(np.uint8), affine, orientation)
    images["brain_mask"] = _nifti((brain > 0.5).astype(np.uint8), affine, orientation)
    images["microbleed_mask"] = _nifti(bleed_labels, affine, orientation)
    images["microbleed_points"] = bleed_points
    return images


def generate_demo_dataset(
    bids_dir: Path, n_healthy: int = 8, n_patients: int = 3, seed: int = 0,
    modalities: tuple[str, ...] = DEFAULT_MODALITIES,
    microbleeds: bool | tuple[int, int] = False,
) -> Path:
    """Write a synthetic BIDS dataset of healthy subjects and patients with lesions.

    Subjects ``sub-healthyNN`` and ``sub-patientNN`` each get T1w, T2w and FLAIR images (or
    the ``modalities`` asked for) with JSON sidecars. Lesion masks of the patients are written
    on their T1w grid to ``derivatives/lesion_masks``. With ``microbleeds``, each patient also
    gets microbleeds, and ``derivatives/microbleeds/sub-<label>/anat`` holds their labels
    (``sub-<label>_label-microbleed_mask.nii.gz``, on the T1w grid, microbleed i labelled i)
    and their table (``sub-<label>_label-microbleed_points.tsv`` with a JSON sidecar: columns
    ``x y z radius_mm region``, :data:`MICROBLEED_COLUMNS`, row i - 1 for label i, positions in
    world mm of the raw T1w image's scanner coordinates). Each subject depends only on
    ``seed``, its group and its number, so changing the size of one group leaves the other
    subjects unchanged; asking for microbleeds changes no image but the patients' T2starw and
    (by a few per cent) T2w.

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
        Contrasts to write (among :data:`MODALITIES`); the anatomy does not depend on them.
    microbleeds : bool or (int, int)
        Give each patient microbleeds: ``True`` for 1 to 20, or the fewest and most; the number
        is drawn uniformly for each patient. Healthy subjects get none.

    Returns
    -------
    Path
        ``bids_dir``.

    Raises
    ------
    FileExistsError
        If ``bids_dir`` is a file or a folder that is not empty.
    ValueError
        If a modality is unknown or the microbleed range is not 0 <= fewest <= most.

    """
    bids_dir = Path(bids_dir)
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown or not modalities:
        raise ValueError(f"modalities {modalities}: choose among {', '.join(MODALITIES)}")
    bleed_range = _DEMO_MICROBLEEDS if microbleeds is True else microbleeds or None
    if bleed_range is not None and not 0 <= bleed_range[0] <= bleed_range[1]:
        raise ValueError(f"microbleeds {microbleeds}: give (fewest, most) with 0 <= fewest <= most")
    if bids_dir.exists() and (not bids_dir.is_dir() or any(bids_dir.iterdir())):
        raise FileExistsError(f"{bids_dir}: the demo dataset needs an empty or new folder")
    derivatives = bids_dir / "derivatives" / "lesion_masks"
    bleed_derivatives = bids_dir / "derivatives" / "microbleeds"
    descriptions = {derivatives: "Ground-truth lesion masks of the bids_anomaly demo dataset"}
    if bleed_range is not None:
        descriptions[bleed_derivatives] = (
            "Ground-truth cerebral microbleeds of the bids_anomaly demo dataset"
        )
    for folder, name in descriptions.items():
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(
            folder / "dataset_description.json",
            {
                "Name": name,
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": _generated_by(),
            },
        )
    _write_dataset_files(bids_dir, microbleeds=bleed_range is not None)

    rows = []
    for group, count in (("healthy", n_healthy), ("patient", n_patients)):
        for number in range(1, count + 1):
            label = f"{group}{number:02d}"
            sequence = np.random.SeedSequence([seed, group == "patient", number])
            subject_seed = int(sequence.generate_state(1)[0])
            demographics = np.random.default_rng(sequence.spawn(1)[0])
            with_bleeds = group == "patient" and bleed_range is not None
            # A later child of the subject's sequence: the demographics stay as they were.
            n_bleeds = (
                int(np.random.default_rng(sequence.spawn(1)[0]).integers(
                    bleed_range[0], bleed_range[1] + 1))
                if with_bleeds else 0
            )
            images = synthetic_subject(
                subject_seed,
                lesions=group == "patient",
                orientation=_ORIENTATIONS[(number - 1) % len(_ORIENTATIONS)],
                thick_flair=number % 2 == 0,
                microbleeds=n_bleeds,
            )
            _write_subject(bids_dir, label, {m: images[m] for m in modalities})
            if group == "patient":
                anat = derivatives / f"sub-{label}" / "anat"
                anat.mkdir(parents=True, exist_ok=True)
                images["lesion_mask"].to_filename(anat / f"sub-{label}_label-lesion_mask.nii.gz")
            if with_bleeds:
                _write_microbleeds(bleed_derivatives, label, images)
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Warp]:
    """Sample GM, WM and brain mask of the template through a random rigid + smooth warp.

    The subject's world position x comes from the template's y as x = R (y - c) + c + t with a
    displacement on top, so each native voxel reads the template at
    y = R^T (x - c - t) + c + u(x). The warp is returned too, to carry other template maps and
    points.
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

    warp = _Warp(
        rotation=rotation,
        translation=translation,
        center=center,
        displacement_mm=displacement_mm,
        template_voxels=coordinates,
        native_affine=affine,
    )
    brain = warp.sample(tpl.mask)
    # The template's GM map has values outside its brain mask; they would float in the skull.
    # Template GM + WM never exceed one, so here they never exceed the brain fraction.
    gm = warp.sample(tpl.gm) * brain
    wm = warp.sample(tpl.wm) * brain
    return gm, wm, brain, warp


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


def _vein_fraction(warp: _Warp, rng: np.random.Generator) -> np.ndarray:
    """Fraction of each native voxel darkened by veins (0 to 1), blooming included.

    Cortical veins run just under the brain surface up toward the superior sagittal sinus,
    medullary veins run straight through deep white matter, and an internal cerebral vein runs
    in the midline over the thalami. Their centrelines are drawn in the template and carried
    to the subject with its warp.
    """
    tpl = _template_maps()
    regions = _template_regions()
    tubes = [
        (_surface_vein(tpl, rng), rng.uniform(*_VEIN_DIAMETER_MM))
        for _ in range(int(rng.integers(_SURFACE_VEINS[0], _SURFACE_VEINS[1] + 1)))
    ]
    tubes += [
        (_medullary_vein(regions.medullary_starts, rng), rng.uniform(*_VEIN_DIAMETER_MM))
        for _ in range(int(rng.integers(_MEDULLARY_VEINS[0], _MEDULLARY_VEINS[1] + 1)))
    ]
    control = np.asarray(_INTERNAL_CEREBRAL_VEIN_MM) + rng.normal(0.0, 1.0, (5, 3))
    spline = CubicSpline(np.arange(len(control)), control)
    tubes.append((spline(np.linspace(0, len(control) - 1, 120)),
                  _INTERNAL_CEREBRAL_VEIN_DIAMETER_MM))
    fraction = np.zeros(_NATIVE_SHAPE, dtype=np.float32)
    for centreline, diameter in tubes:
        _splat_tube(
            fraction, warp.to_native_mm(centreline), _VEIN_BLOOM * diameter, warp.native_affine
        )
    return np.minimum(fraction, 1.0)


def _surface_vein(tpl: _TemplateMaps, rng: np.random.Generator) -> np.ndarray:
    """Centreline (template mm) of a cortical vein, from the convexity up toward the midline.

    Its direction from the brain centre turns from a random start toward the vertex with a
    random meander; along each direction it keeps a fixed depth under the brain surface.
    """
    azimuth, elevation = rng.uniform(0.0, 2 * np.pi), rng.uniform(-0.2, 0.6)
    start = np.array([np.cos(elevation) * np.cos(azimuth),
                      np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    end = np.array([0.0, start[1], 1.0]) / np.hypot(start[1], 1.0)
    normal = np.cross(start, end)
    normal = normal / np.linalg.norm(normal) if np.linalg.norm(normal) > 1e-3 else np.array(
        [1.0, 0.0, 0.0])
    steps = np.linspace(0.0, rng.uniform(0.5, 1.0), 240)[:, None]
    meander = rng.uniform(0.03, 0.1) * np.sin(
        np.pi * rng.uniform(1.0, 3.0) * steps + rng.uniform(0.0, 2 * np.pi))
    directions = (1 - steps) * start + steps * end + meander * normal
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = np.arange(0.0, 120.0, 1.0)
    rays = tpl.brain_center_mm + directions[:, None, :] * radii[None, :, None]
    voxels = nib.affines.apply_affine(np.linalg.inv(tpl.affine), rays.reshape(-1, 3)).T
    inside = ndimage.map_coordinates(tpl.mask, voxels, order=1).reshape(rays.shape[:2]) > 0.5
    # The first sample outside, beyond the deep structures the centre may sit in.
    surface = radii[np.argmax(~inside & (radii > 20.0), axis=1)]
    surface = ndimage.gaussian_filter1d(surface, sigma=4.0, mode="nearest")
    return tpl.brain_center_mm + directions * (surface - _SURFACE_VEIN_DEPTH_MM)[:, None]


def _medullary_vein(starts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Centreline (template mm) of a deep medullary vein: a gently bent lateral line."""
    start = starts[rng.integers(len(starts))]
    direction = np.array([np.sign(start[0]), rng.normal(0.0, 0.3), rng.normal(0.0, 0.3)])
    direction /= np.linalg.norm(direction)
    bend_axis = np.cross(direction, rng.normal(size=3))
    bend_axis /= np.linalg.norm(bend_axis)
    length = rng.uniform(*_MEDULLARY_LENGTH_MM)
    steps = np.arange(0.0, length, _VEIN_STEP_MM)[:, None]
    bend = rng.uniform(0.0, 2.0) * np.sin(np.pi * steps / length)
    return start + steps * direction + bend * bend_axis


def _splat_tube(
    fraction: np.ndarray, centreline_mm: np.ndarray, diameter: float, affine: np.ndarray
) -> None:
    """Add a tube's volume along a centreline (world mm) to the voxels, trilinearly.

    Each centreline point stands for the tube over half the segments on either side; its
    volume is spread over the eight voxels around it, so the volume is kept and a thin tube
    takes part of a voxel (partial volume).
    """
    segments = np.linalg.norm(np.diff(centreline_mm, axis=0), axis=1)
    lengths = (np.r_[segments, 0.0] + np.r_[0.0, segments]) / 2
    share = np.pi * (diameter / 2) ** 2 * lengths / _VOXEL_MM**3
    voxels = nib.affines.apply_affine(np.linalg.inv(affine), centreline_mm)
    base = np.floor(voxels).astype(int)
    offset = voxels - base
    for corner in np.ndindex(2, 2, 2):
        index = base + corner
        weight = np.prod(np.where(corner, offset, 1 - offset), axis=1) * share
        valid = np.all((index >= 0) & (index < fraction.shape), axis=1)
        np.add.at(fraction, tuple(index[valid].T), weight[valid])


def _microbleeds(
    count: int,
    brain: np.ndarray,
    gm: np.ndarray,
    csf: np.ndarray,
    sites: np.ndarray,
    lesion_weight: np.ndarray,
    affine: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Place microbleeds and compute the T2*-weighted signal they leave.

    Each is a sphere in parenchyma (its centre at least the sphere's radius plus a voxel from
    CSF), with a visible radius of 1 to 5 mm, apart from the others and from the lesions by
    their blooming along B0 plus a gap. Lobar ones sit in cortex or at the grey-white junction.
    The smallest show only when centred near a voxel's centre; elsewhere they are drawn again.

    Returns
    -------
    signal : numpy.ndarray
        Fraction of the T2*-weighted signal left (1 away from the microbleeds).
    labels : numpy.ndarray
        uint8, microbleed i labelled i where at most half the signal is left (its centre's
        voxel included: microbleeds that would leave it more are drawn again).
    points : pandas.DataFrame
        :data:`MICROBLEED_COLUMNS`, one row per microbleed in label order.
    """
    signal = np.ones(brain.shape, dtype=np.float32)
    labels = np.zeros(brain.shape, dtype=np.uint8)
    rows: list[dict[str, float | str]] = []
    if count > np.iinfo(np.uint8).max:
        raise ValueError(f"microbleeds {count}: at most 255 fit in the uint8 labels")
    if count <= 0:
        return signal, labels, _microbleed_table(rows)
    parenchyma = (brain > 0.9) & (csf < 0.1)
    candidates = {
        region: np.argwhere(parenchyma & (sites == index) & ((gm >= 0.3) | (region != "lobar")))
        for index, region in enumerate(MICROBLEED_REGIONS, start=1)
    }
    regions = [region for region in MICROBLEED_REGIONS if len(candidates[region])]
    chance = np.array([_MICROBLEED_REGION_CHANCE[region] for region in regions])
    csf_distance = ndimage.distance_transform_edt((csf < 0.5) & (brain > 0.5), sampling=_VOXEL_MM)
    lesion_distance = (
        ndimage.distance_transform_edt(lesion_weight < 0.05, sampling=_VOXEL_MM)
        if (lesion_weight >= 0.05).any() else np.full(brain.shape, np.inf)
    )
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(_MICROBLEED_ATTEMPTS * count if regions else 0):
        if len(placed) == count:
            break
        region = regions[rng.choice(len(regions), p=chance / chance.sum())]
        voxel = candidates[region][rng.integers(len(candidates[region]))]
        position = voxel + rng.uniform(-0.5, 0.5, 3)
        radius, bloom = rng.uniform(*_MICROBLEED_RADIUS_MM), rng.uniform(*_MICROBLEED_BLOOM)
        source = radius / bloom
        if csf_distance[tuple(voxel)] < source + _VOXEL_MM:
            continue
        dephasing = dephasing_for_bloom(bloom)
        reach = blooming_extent(source, dephasing)
        if lesion_distance[tuple(voxel)] < reach + _MICROBLEED_GAP_MM or any(
            np.linalg.norm((position - other) * _VOXEL_MM) < reach + other_reach
            + _MICROBLEED_GAP_MM
            for other, other_reach in placed
        ):
            continue
        centre = np.rint(position).astype(int)
        half = math.ceil(_BLOOMING_REACH * reach / _VOXEL_MM)
        low = np.maximum(centre - half, 0)
        high = np.minimum(centre + half + 1, brain.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
        local = blooming_signal(
            tuple(high - low), position - low, source, dephasing, (_VOXEL_MM,) * 3
        )
        if local[tuple(centre - low)] > _VISIBLE_SIGNAL:
            # Too small, or too far off the voxel's centre, to show on this grid: partial
            # volume keeps more than half the signal of every voxel.
            continue
        placed.append((position, reach))
        signal[box] *= local
        own = labels[box]
        own[(local <= _VISIBLE_SIGNAL) & (own == 0)] = len(placed)
        x, y, z = nib.affines.apply_affine(affine, position)
        rows.append({"x": x, "y": y, "z": z, "radius_mm": radius, "region": region})
    return signal, labels, _microbleed_table(rows)


def _microbleed_table(rows: list[dict[str, float | str]]) -> pd.DataFrame:
    """The microbleeds' rows as a table of :data:`MICROBLEED_COLUMNS`, empty or not."""
    import pandas as pd

    table = pd.DataFrame(rows, columns=list(MICROBLEED_COLUMNS))
    return table.astype({"x": float, "y": float, "z": float, "radius_mm": float, "region": str})


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


def _write_microbleeds(folder: Path, label: str, images: dict) -> None:
    """Write a patient's microbleed labels, and their table with its sidecar."""
    anat = folder / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    stem = anat / f"sub-{label}_label-microbleed"
    images["microbleed_mask"].to_filename(f"{stem}_mask.nii.gz")
    images["microbleed_points"].to_csv(
        f"{stem}_points.tsv", sep="\t", index=False, float_format="%.2f"
    )
    sidecar: dict[str, dict] = {
        column: {"Description": description} for column, description in MICROBLEED_COLUMNS.items()
    }
    for column in ("x", "y", "z", "radius_mm"):
        sidecar[column]["Units"] = "mm"
    sidecar["region"]["Levels"] = {
        "lobar": "cortex or grey-white junction",
        "deep": "basal ganglia or thalamus",
        "infratentorial": "brainstem or cerebellum",
    }
    _write_json(Path(f"{stem}_points.json"), sidecar)


def _write_dataset_files(bids_dir: Path, microbleeds: bool = False) -> None:
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
        + (
            "\nPatients also have cerebral microbleeds, dark blooming foci on T2starw; their\n"
            "labels (on the T1w grid) and centres (world mm of the raw T1w) are in\n"
            "derivatives/microbleeds.\n"
            if microbleeds else ""
        )
    )
    _write_json(
        bids_dir / "participants.json",
        {
            "participant_id": {"Description": "Subject label"},
            "group": {
                "Description": "Whether the subject has synthetic lesions",
                "Levels": {
                    "healthy": "no lesions",
                    "patient": "white-matter lesions"
                    + (" and cerebral microbleeds" if microbleeds else ""),
                },
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
