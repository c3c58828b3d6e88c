"""Lesion annotations for weak supervision (``train --annotations DERIV_DIR``).

Annotations are named as for ``group --ground-truth`` (``*_label-<x>_mask.nii[.gz]`` or
``*_dseg.nii[.gz]`` under ``sub-<label>/``), on the grid of one of the subject's raw images or on
the template grid; they are carried to the template grid with the transforms the participant
level stored (nearest neighbour, binarised) and cached in the work folder with, beside each, the
subject's healthy mask (the brain without the lesions and one voxel around them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_anomaly import bids
from bids_anomaly.errors import BadDataError, MissingInputError
from bids_anomaly.evaluation.ground_truth import (
    find_ground_truth,
    is_lesion_mask,
    transforms_to_template,
    truth_in_template,
)
from bids_anomaly.imaging.template import Template

LOGGER = logging.getLogger(__name__)


def annotated_participants(folder: Path) -> list[str]:
    """Labels of the participants with at least one annotation file in ``folder``.

    Raises
    ------
    MissingInputError
        ``folder`` is not a folder.
    """
    if not Path(folder).is_dir():
        raise MissingInputError(f"--annotations {folder} is not a folder")
    entities = (bids.parse_name(path) for path in Path(folder).glob("sub-*/**/sub-*.nii*"))
    return sorted({e["sub"] for e in entities if is_lesion_mask(e)})


def check_annotations(folder: Path, dataset: list[str]) -> list[str]:
    """The annotated participants, all of them in the dataset.

    Raises
    ------
    MissingInputError
        No annotation file in ``folder``.
    BadDataError
        An annotation for a participant the dataset does not have.
    """
    labels = annotated_participants(folder)
    if not labels:
        raise MissingInputError(f"--annotations {folder} holds no lesion mask (expected "
                                "sub-<label>/[ses-<label>/]anat/sub-<label>_*_label-<x>_mask"
                                ".nii.gz or *_dseg.nii.gz)")
    unknown = sorted(set(labels) - set(dataset))
    if unknown:
        raise BadDataError(f"--annotations {folder}: sub-{', sub-'.join(unknown)} "
                           f"{'is' if len(unknown) == 1 else 'are'} not in the dataset; "
                           "check the labels or remove those annotations")
    return labels


def annotations_in_template(settings, subjects: list[bids.AnatInputs], template: Template
                            ) -> dict[str, tuple[Path, Path]]:
    """The selected subjects' annotations on the template grid, with their healthy masks.

    Returns
    -------
    dict
        By subject/session name, the (lesion mask, healthy mask) files in the work folder;
        subjects without an annotation are left out.

    Raises
    ------
    MissingInputError
        No selected subject has an annotation, or an annotated subject has no preprocessed
        brain mask (it was never preprocessed, or its preprocessing failed).
    BadDataError
        An annotation on a grid that is neither the template's nor any of the subject's raw
        images', or one with no lesion voxel inside the brain.
    """
    folder = settings.model.annotations
    out = {}
    for inputs in subjects:
        source = find_ground_truth(folder, inputs.subject, inputs.session)
        if source is None:
            continue
        brain_path = bids.spec_path(settings.output_dir, inputs.subject, inputs.session,
                                    bids.brain_mask_spec(template.name, template.resolution))
        if not brain_path.is_file():
            raise MissingInputError(
                f"{inputs.name} is annotated but was not preprocessed ({brain_path.name} is "
                "missing): run the participant level on it, or see its crash file in "
                f"{bids.log_dir(settings.output_dir)}")
        chains = transforms_to_template(brain_path.parent, inputs.name, template.name)
        truth = truth_in_template(source, brain_path, inputs.images, chains)
        reference = nib.load(brain_path)
        brain = np.asarray(reference.dataobj) > 0
        lesion = truth & brain
        if not lesion.any():
            raise BadDataError(
                f"{source} marks no lesion voxel inside the brain of {inputs.name}: an empty "
                "annotation teaches nothing; remove it (participants without an annotation "
                "count as controls)")
        lesion_path, healthy_path = bids.annotation_paths(
            settings.work_dir, inputs.name, template.name, template.resolution)
        lesion_path.parent.mkdir(parents=True, exist_ok=True)
        healthy = brain & ~ndimage.binary_dilation(lesion, iterations=1)
        for path, data in ((lesion_path, lesion), (healthy_path, healthy)):
            image = nib.Nifti1Image(data.astype(np.uint8), reference.affine, reference.header)
            image.set_data_dtype(np.uint8)
            image.to_filename(path)
        LOGGER.info("%s: annotation %s, %d lesion voxels in template space", inputs.name,
                    source.name, int(lesion.sum()))
        out[inputs.name] = (lesion_path, healthy_path)
    if not out:
        raise MissingInputError(f"none of the selected participants has an annotation in "
                                f"{folder}")
    return out
