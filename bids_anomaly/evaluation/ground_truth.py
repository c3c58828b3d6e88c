"""Finding ground-truth lesion masks and carrying them into template space."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_anomaly import bids
from bids_anomaly.errors import BadDataError
from bids_anomaly.imaging.images import load_volume, same_grid
from bids_anomaly.imaging.spatial import apply_transforms

LOGGER = logging.getLogger(__name__)


MICROBLEED_LABEL = "microbleed"
"""The ``label-`` of microbleed ground truth (``*_label-microbleed_mask.nii[.gz]`` or
``*_label-microbleed_points.tsv``); such masks are points to count, not lesions to segment."""


CHANGE_LABEL = "change"
"""The ``label-`` of lesion-change ground truth of a later session (``*_label-change_mask``):
where lesions changed since the earlier session, evaluated against the change maps of
``participant --longitudinal`` (:mod:`bids_anomaly.evaluation.change`), not as lesions."""


def is_lesion_mask(entities: dict) -> bool:
    """Whether a file's BIDS entities name a lesion mask (``*_label-<x>_mask`` or ``*_dseg``).

    Microbleed masks (:data:`MICROBLEED_LABEL`) are not: they are evaluated per lesion
    (:func:`find_microbleed_truth`); nor are change masks (:data:`CHANGE_LABEL`).
    """
    if entities.get("label") in (MICROBLEED_LABEL, CHANGE_LABEL):
        return False
    return entities.get("suffix") == "dseg" or (entities.get("suffix") == "mask"
                                                and "label" in entities)


def find_microbleed_truth(deriv_dir: Path, subject: str, session: str | None) -> Path | None:
    """The subject/session's microbleed ground truth in ``deriv_dir``, or None.

    A table of points (``*_label-microbleed_points.tsv``: columns ``x``, ``y``, ``z`` in the
    raw images' world millimetres, optional ``radius_mm``) is preferred to a mask
    (``*_label-microbleed_mask.nii[.gz]``, on one of the subject's raw grids: one microbleed
    per label, or per connected component of a binary mask). A file without ``ses-`` applies
    to every session.
    """
    found = []
    for path in sorted(Path(deriv_dir).glob(f"sub-{subject}/**/sub-{subject}_*")):
        entities = bids.parse_name(path)
        if (entities.get("ses") in (None, session)
                and entities.get("label") == MICROBLEED_LABEL
                and (entities["suffix"], entities["extension"]) in (
                    ("points", ".tsv"), ("mask", ".nii.gz"), ("mask", ".nii"))):
            found.append(path)
    found.sort(key=lambda p: bids.parse_name(p)["suffix"] != "points")
    return found[0] if found else None


def find_ground_truth(deriv_dir: Path, subject: str, session: str | None) -> Path | None:
    """The subject/session's lesion mask in ``deriv_dir``, or None.

    Accepts ``*_label-<x>_mask.nii[.gz]`` (any non-zero voxel is abnormal) and
    ``*_dseg.nii[.gz]`` (any label > 0 is abnormal). A file without ``ses-`` applies to every
    session.
    """
    candidates = []
    for path in sorted(Path(deriv_dir).glob(f"sub-{subject}/**/sub-{subject}_*.nii*")):
        entities = bids.parse_name(path)
        if entities.get("ses") not in (None, session):
            continue
        if is_lesion_mask(entities):
            candidates.append(path)
    if len(candidates) > 1:
        LOGGER.warning("sub-%s: several ground-truth files, using %s", subject, candidates[0].name)
    return candidates[0] if candidates else None


def first_found(finder, folders: list[Path], subject: str, session: str | None) -> Path | None:
    """The first of ``folders`` where ``finder(folder, subject, session)`` finds a file."""
    for folder in folders:
        found = finder(folder, subject, session)
        if found is not None:
            return found
    return None


def transforms_to_template(anat_dir: Path, prefix: str, space: str) -> dict[str, list[Path]]:
    """For each modality with stored transforms, the chain from its raw grid to the template."""
    to_template = bids.transforms_to(anat_dir, prefix, space)
    if not to_template:
        return {}
    reference = bids.parse_name(to_template[0])["from"]
    chains = {reference: [to_template[0]]}
    for path in bids.transforms_to(anat_dir, prefix, reference, ".mat"):
        chains[bids.parse_name(path)["from"]] = [to_template[0], path]
    return chains


def truth_in_template(truth_file: Path, template_grid: Path, raw_images: dict[str, Path],
                      transforms: dict[str, list[Path]]) -> np.ndarray | None:
    """Binary ground truth on the template grid.

    Parameters
    ----------
    truth_file : Path
        Lesion mask or segmentation, on the template grid or on the grid of one raw image.
    template_grid : Path
        Any image on the template grid (the subject's template-space brain mask).
    raw_images : dict of str to Path
        The subject's raw images by modality.
    transforms : dict of str to list of Path
        For each modality, the transforms from its raw grid to the template (ITK order).

    Returns
    -------
    numpy.ndarray
        Boolean array on the template grid.

    Raises
    ------
    BadDataError
        The file is not a readable 3D mask, holds NaN or infinite voxels, or its grid is
        neither the template's nor that of one of the subject's raw images.
    """
    truth = load_volume(truth_file, finite=True)
    reference = nib.load(template_grid)
    if same_grid(truth, reference):
        return np.asarray(truth.dataobj) > 0
    for modality, raw_path in raw_images.items():
        if modality in transforms and same_grid(truth, nib.load(raw_path)):
            with tempfile.TemporaryDirectory() as tmp:
                binary = Path(tmp) / "truth.nii.gz"
                data = (np.asarray(truth.dataobj) > 0).astype(np.float32)
                nib.Nifti1Image(data, truth.affine).to_filename(binary)
                out = apply_transforms(binary, template_grid, transforms[modality],
                                       Path(tmp) / "truth_std.nii.gz", binarize=True)
                return np.asarray(nib.load(out).dataobj) > 0
    grids = ", ".join(sorted(raw_images)) or "none"
    raise BadDataError(f"{truth_file}: its grid ({'x'.join(map(str, truth.shape[:3]))} voxels) "
                       f"is neither the template's nor that of any raw image of the subject "
                       f"({grids}); put the mask on the grid of the image it was drawn on")
