"""The embedded default template: nilearn's MNI152 2009a symmetric T1w and tissue maps.

Nothing is downloaded: the images ship inside nilearn. The brain mask and a CSF map are derived
from the grey- and white-matter probability maps, so that every file of the template comes from
one source and one resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_anomaly.config import RESOLUTIONS

TEMPLATE_NAME = "MNI152NLin2009aSym"
CROP_MARGIN_MM = 8
TISSUE_LABELS = {1: "GM", 2: "WM", 3: "CSF"}
"""Labels of the template's hard tissue segmentation (``*_dseg``), as in fMRIPrep."""


@dataclass(frozen=True)
class Template:
    """Files of one template at one resolution.

    Attributes
    ----------
    name : str
        TemplateFlow-style identifier, used as the ``space-`` entity.
    resolution : int
        Voxel size in mm, used as the ``res-`` entity.
    t1w : Path
        Skull-stripped T1-weighted template image.
    brain_mask : Path
        Binary brain mask.
    probseg : dict of str to Path
        Tissue probability maps keyed by ``GM``, ``WM`` and ``CSF``.
    registration_target : Path
        The T1w image cropped to the brain plus a margin of :data:`CROP_MARGIN_MM`: the fixed
        image of registrations. Registration time grows with the fixed image's field of view;
        the crop (81 x 99 x 82 instead of 99 x 117 x 95 voxels at 2 mm) made SyN 1.1 to 1.6x
        faster at the same Dice. Results are always resampled onto the full grid.
    dseg : Path
        Hard tissue segmentation (:data:`TISSUE_LABELS`), for tissue-wise models and tables.
    """

    name: str
    resolution: int
    t1w: Path
    brain_mask: Path
    probseg: dict[str, Path]
    registration_target: Path
    dseg: Path


def template_images(resolution: int = 2) -> dict[str, nib.Nifti1Image]:
    """Build the template images in memory.

    Parameters
    ----------
    resolution : int
        1 or 2 (mm).

    Returns
    -------
    dict of str to nibabel.Nifti1Image
        ``T1w`` (float32, zero outside the brain), ``mask`` (uint8) and the probability maps
        ``GM``, ``WM`` and ``CSF`` (float32), all on the same grid; ``dseg`` (tissue labels)
        and ``registration`` (the T1w cropped to the brain and a margin). New images on each
        call, over arrays of their own.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"template resolution must be one of {RESOLUTIONS} mm, not {resolution}")
    affine, arrays, crop = _template_arrays(resolution)

    def image(data: np.ndarray) -> nib.Nifti1Image:
        img = nib.Nifti1Image(data.copy(), affine.copy())
        img.header.set_xyzt_units("mm")
        img.header.set_qform(affine, code=4)
        img.header.set_sform(affine, code=4)
        return img

    images = {name: image(data) for name, data in arrays.items()}
    images["registration"] = images["T1w"].slicer[crop]
    return images


@lru_cache(maxsize=len(RESOLUTIONS))
def _template_arrays(resolution: int) -> tuple[np.ndarray, dict[str, np.ndarray], tuple]:
    """The template's affine, arrays and crop, computed once per process and resolution.

    Loading and resampling nilearn's MNI maps takes 1.7 s at 2 mm; a run or a test session
    asks for them many times. The arrays are read-only: :func:`template_images` copies them.
    """
    from nilearn import datasets

    t1w = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    gm_data = np.clip(np.asarray(gm.dataobj, dtype=np.float32), 0, 1)
    wm_data = np.clip(np.asarray(wm.dataobj, dtype=np.float32), 0, 1)
    brain = derive_brain_mask(gm_data, wm_data)
    csf_data = np.where(brain, np.clip(1.0 - gm_data - wm_data, 0, 1), 0).astype(np.float32)
    t1w_data = np.where(brain, np.asarray(t1w.dataobj, dtype=np.float32), 0).astype(np.float32)
    margin = ndimage.binary_dilation(brain, iterations=max(1, CROP_MARGIN_MM // resolution))
    corners = np.argwhere(margin)
    low, high = corners.min(axis=0), corners.max(axis=0) + 1
    arrays = {"T1w": t1w_data, "mask": brain.astype(np.uint8), "GM": gm_data, "WM": wm_data,
              "CSF": csf_data, "dseg": tissue_labels(gm_data, wm_data, csf_data, brain)}
    for data in arrays.values():
        data.flags.writeable = False
    affine = np.array(t1w.affine)
    affine.flags.writeable = False
    return affine, arrays, tuple(slice(a, b) for a, b in zip(low, high, strict=True))


def tissue_labels(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray,
                  brain: np.ndarray) -> np.ndarray:
    """Hard tissue segmentation (uint8, :data:`TISSUE_LABELS`): most probable class in the brain.

    >>> import numpy as np
    >>> labels = tissue_labels(np.array([0.6, 0.1, 0.2]), np.array([0.3, 0.8, 0.1]),
    ...                        np.array([0.1, 0.1, 0.7]), np.array([True, True, False]))
    >>> labels.tolist()
    [1, 2, 0]
    """
    most_probable = np.argmax(np.stack([gm, wm, csf]), axis=0).astype(np.uint8) + 1
    return np.where(brain, most_probable, 0).astype(np.uint8)


def derive_brain_mask(gm: np.ndarray, wm: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Brain mask from tissue probabilities: GM + WM above a threshold, closed, holes filled.

    Filling the holes adds the ventricles, which are brain for anomaly detection purposes.

    Parameters
    ----------
    gm, wm : numpy.ndarray
        Grey- and white-matter probability maps.
    threshold : float
        Minimum summed probability.

    Returns
    -------
    numpy.ndarray
        Boolean mask.

    Examples
    --------
    >>> import numpy as np
    >>> gm = np.zeros((9, 9, 9)); gm[2:7, 2:7, 2:7] = 1; gm[4, 4, 4] = 0
    >>> int(derive_brain_mask(gm, np.zeros_like(gm)).sum())
    125
    """
    tissue = (gm + wm) > threshold
    tissue = ndimage.binary_closing(tissue, structure=np.ones((3, 3, 3)), iterations=2)
    return ndimage.binary_fill_holes(tissue)


def get_template(resolution: int, cache_dir: Path) -> Template:
    """Write the template files once into ``cache_dir`` and return their paths.

    Parameters
    ----------
    resolution : int
        1 or 2 (mm).
    cache_dir : Path
        Folder for the files (the work directory's ``templates/``).

    Returns
    -------
    Template
    """
    folder = Path(cache_dir) / f"tpl-{TEMPLATE_NAME}" / f"res-{resolution}"
    prefix = f"tpl-{TEMPLATE_NAME}_res-{resolution}"
    paths = {
        "T1w": folder / f"{prefix}_T1w.nii.gz",
        "mask": folder / f"{prefix}_desc-brain_mask.nii.gz",
        "GM": folder / f"{prefix}_label-GM_probseg.nii.gz",
        "WM": folder / f"{prefix}_label-WM_probseg.nii.gz",
        "CSF": folder / f"{prefix}_label-CSF_probseg.nii.gz",
        "dseg": folder / f"{prefix}_dseg.nii.gz",
        "registration": folder / f"{prefix}_desc-cropped_T1w.nii.gz",
    }
    if not all(path.exists() for path in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        for key, img in template_images(resolution).items():
            partial = paths[key].with_name(".partial-" + paths[key].name)
            img.to_filename(partial)
            partial.replace(paths[key])
    return Template(
        name=TEMPLATE_NAME,
        resolution=resolution,
        t1w=paths["T1w"],
        brain_mask=paths["mask"],
        probseg={key: paths[key] for key in ("GM", "WM", "CSF")},
        dseg=paths["dseg"],
        registration_target=paths["registration"],
    )
