"""Lesion change of one subject's sessions as a Nipype interface (cached, resumable)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _ChangeInputSpec(BaseInterfaceInputSpec):
    labels = traits.List(traits.Str, mandatory=True, desc="session labels, in time order")
    images = InputMultiObject(File(exists=True), mandatory=True,
                              desc="each session's raw lesion contrast")
    template_masks = InputMultiObject(File(exists=True), mandatory=True,
                                      desc="each session's brain mask in template space")
    reference_to_template = InputMultiObject(
        File(exists=True), mandatory=True,
        desc="each session's from-<reference>_to-<template> transform")
    template_to_reference = InputMultiObject(
        File(exists=True), mandatory=True,
        desc="each session's from-<template>_to-<reference> transform")
    to_reference = traits.List(traits.Str, mandatory=True,
                               desc="each session's from-<contrast>_to-<reference> transform "
                                    "('' when the contrast is the reference)")
    template_tissues = InputMultiObject(File(exists=True), mandatory=True,
                                        desc="the template's GM, WM, CSF probability maps")
    template_grid = File(exists=True, mandatory=True,
                         desc="an image of the template grid (the outputs' template space)")
    random_seed = traits.Int(0, usedefault=True)
    fpr = traits.Float(0.001, usedefault=True,
                       desc="target rate of changed voxels among the normal-appearing ones")
    min_cluster_mm3 = traits.Float(0.0, usedefault=True, desc="smallest changed lesion kept")
    num_threads = traits.Int(1, usedefault=True)


class _ChangeOutputSpec(TraitedSpec):
    native_maps = OutputMultiObject(File(exists=True),
                                    desc="per later session, its change map on its raw grid")
    native_masks = OutputMultiObject(File(exists=True), desc="changed voxels, raw grid")
    native_dsegs = OutputMultiObject(File(exists=True), desc="change classes, raw grid")
    template_maps = OutputMultiObject(File(exists=True), desc="change maps, template space")
    template_masks = OutputMultiObject(File(exists=True), desc="changed voxels, template")
    template_dsegs = OutputMultiObject(File(exists=True), desc="change classes, template")
    clusters = OutputMultiObject(File(exists=True),
                                 desc="per later session, its changed lesions (TSV)")
    figures = OutputMultiObject(File(exists=True), desc="before / after / change lightboxes")
    summary = File(exists=True, desc="counts and volumes per session pair (TSV)")
    thresholds = traits.List(traits.Float, desc="the label-free threshold of each pair")


class LesionChange(SimpleInterface):
    """New, enlarging and shrinking lesions between consecutive sessions of a subject.

    See :mod:`bids_anomaly.longitudinal.subject`. Every map is written on the later session's
    raw lesion-contrast grid and in template space.
    """

    input_spec = _ChangeInputSpec
    output_spec = _ChangeOutputSpec

    def _run_interface(self, runtime):
        import torch

        from bids_anomaly.longitudinal.midpoint import SessionImages
        from bids_anomaly.longitudinal.subject import (
            TISSUES,
            subject_change,
            summary_table,
            to_native,
            to_template,
            world_centres,
            write_on_grid,
        )
        from bids_anomaly.reports.figures import plot_change_lightbox

        inputs = self.inputs
        torch.set_num_threads(max(1, inputs.num_threads))
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, inputs.num_threads))
        count = len(inputs.labels)
        lists = (inputs.images, inputs.template_masks, inputs.reference_to_template,
                 inputs.template_to_reference, inputs.to_reference)
        if count < 2 or any(len(values) != count for values in lists):
            raise ValueError("the sessions' images and transforms do not match their labels")
        sessions = [SessionImages(label, image, mask, forward, inverse, moved or None)
                    for label, image, mask, forward, inverse, moved in
                    zip(inputs.labels, *lists, strict=True)]
        work = os.path.join(runtime.cwd, "midpoint")
        os.makedirs(work, exist_ok=True)
        result = subject_change(sessions, dict(zip(TISSUES, inputs.template_tissues,
                                                   strict=True)),
                                work, inputs.random_seed, inputs.fpr, inputs.min_cluster_mm3)
        outputs = {name: [] for name in ("native_maps", "native_masks", "native_dsegs",
                                         "template_maps", "template_masks", "template_dsegs",
                                         "clusters", "figures")}
        grid = nib.load(result.grid)
        for index, pair in enumerate(result.pairs, start=1):
            later, transform = sessions[index], result.transforms[index]
            stem = os.path.join(runtime.cwd, f"ses-{pair.later}_since-{pair.earlier}")
            score = write_on_grid(pair.maps.score, result.grid, f"{stem}_score.nii.gz")
            classes = write_on_grid(pair.classes.astype(np.int32), result.grid,
                                    f"{stem}_classes.nii.gz")
            changed = write_on_grid((pair.classes > 0).astype(np.int32), result.grid,
                                    f"{stem}_changed.nii.gz")
            for space in ("native", "template"):
                def carry(image, out, labels, space=space, later=later, transform=transform):
                    if space == "native":
                        return to_native(image, later, transform, out, labels)
                    return to_template(image, later, transform, inputs.template_grid, out,
                                       labels)

                outputs[f"{space}_maps"].append(str(carry(score, f"{stem}_{space}_map.nii.gz",
                                                          False)))
                outputs[f"{space}_masks"].append(_as_uint8(carry(
                    changed, f"{stem}_{space}_mask.nii.gz", True)))
                outputs[f"{space}_dsegs"].append(_as_uint8(carry(
                    classes, f"{stem}_{space}_dseg.nii.gz", True)))
            table = world_centres(pair.table, result.grid, transform)
            outputs["clusters"].append(f"{stem}_clusters.tsv")
            table.to_csv(outputs["clusters"][-1], sep="\t", index=False, float_format="%.4g",
                         na_rep="n/a")
            images = [nib.Nifti1Image(values.astype(np.float32), grid.affine)
                      for values in (result.images[index - 1], result.images[index],
                                     pair.maps.score, pair.numbers)]
            outputs["figures"].append(str(plot_change_lightbox(
                *images, pair.threshold, f"{stem}_lightbox.png",
                title=f"session {pair.earlier} -> {pair.later}: {len(table)} changed lesions "
                      "(red: brighter later, blue: darker later)")))
        self._results.update(outputs)
        summary = os.path.join(runtime.cwd, "change_summary.tsv")
        summary_table(result).to_csv(summary, sep="\t", index=False, float_format="%.6g")
        self._results["summary"] = summary
        self._results["thresholds"] = [float(pair.threshold) for pair in result.pairs]
        return runtime


def _as_uint8(path) -> str:
    """Rewrite a label image as uint8 (ANTs writes what it resampled in floating point)."""
    image = nib.load(path)
    data = np.rint(np.asarray(image.dataobj)).astype(np.uint8)
    out = nib.Nifti1Image(data, image.affine, image.header)
    out.set_data_dtype(np.uint8)
    out.to_filename(path)
    return str(path)
