"""Diffusion preprocessing: from dwi runs (or another pipeline's maps) to template-space maps."""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_anomaly import bids
from bids_anomaly.interfaces.ants import ApplyTransforms, Registration
from bids_anomaly.interfaces.dipy import DTIFit, PrecomputedMaps
from bids_anomaly.interfaces.images import ApplyMask, MeanImages

DWI_SOURCES = ("runs", "native", "template")
"""Where a subject's diffusion maps come from: its dwi runs (fitted here), another pipeline's
maps in a native space (registered here), or maps already on the template grid."""


@dataclass(frozen=True)
class DwiInputs:
    """The diffusion inputs of one subject/session, as the workflow takes them.

    Attributes
    ----------
    params : tuple of str
        Maps to compute, among :data:`~bids_anomaly.config.DIFFUSION_MAPS`.
    source : str
        One of :data:`DWI_SOURCES`.
    groups : dict
        ``source`` ``runs``: by phase-encoding label, the ``(dwi, bval, bvec)`` file lists of
        the runs fitted together. ``native`` / ``template``: one group, ``(maps, [dwiref], [])``
        with the maps in ``params`` order and the maps' reference image (or none).
    """

    params: tuple[str, ...]
    source: str
    groups: dict[str, tuple[list[str], list[str], list[str]]] = field(default_factory=dict)


def dwi_inputs(inputs: bids.AnatInputs, template_file: str) -> DwiInputs | None:
    """The diffusion inputs of a subject/session (None: no diffusion channel).

    Runs are grouped by phase-encoding direction (``PhaseEncodingDirection`` of their
    sidecars; runs without it form one group): runs of one direction share their distortions
    and are fitted together; each group is registered on its own and the maps of the groups are
    averaged on the template grid (fitting opposite directions together, without distortion
    correction, mixes misaligned signals: on bids_dwi it lowered the 90th percentile of FA in
    the brain from 0.48 to 0.41). Maps of another pipeline on the grid of ``template_file``
    (same shape and affine) are used as they are; in any other space they are registered.
    """
    if not inputs.dwi_params:
        return None
    params = inputs.dwi_params
    if inputs.dwi_maps:
        maps = [str(inputs.dwi_maps[p]) for p in params]
        dwiref = [str(inputs.dwi_maps["dwiref"])] if "dwiref" in inputs.dwi_maps else []
        grid, first = nib.load(template_file), nib.load(maps[0])
        same = (first.shape[:3] == grid.shape[:3]
                and np.allclose(first.affine, grid.affine, atol=1e-3))
        return DwiInputs(params, "template" if same else "native",
                         {"maps": (maps, dwiref, [])})
    groups: dict[str, tuple[list[str], list[str], list[str]]] = {}
    for number, runs in enumerate(bids.group_dwi_runs(inputs.dwi), start=1):
        # the runs' dir- label names the group (the transform's derivative name) when it has one
        label = bids.parse_name(runs[0].image).get("dir") or f"pe{number}"
        label = f"{label}{number}" if label in groups else label
        groups[label] = ([str(r.image) for r in runs], [str(r.bval) for r in runs],
                         [str(r.bvec) for r in runs])
    return DwiInputs(params, "runs", groups)


def init_dwi_wf(
    dwi: DwiInputs,
    registration: str = "Rigid",
    random_seed: int = 0,
    omp_nthreads: int = 1,
    name: str = "dwi_wf",
) -> pe.Workflow:
    """Diffusion-tensor maps of one subject/session on the template grid.

    From the dwi runs, per phase-encoding group (:func:`dwi_inputs`): the runs are checked and
    fitted together (dipy, weighted least squares,
    :class:`~bids_anomaly.interfaces.dipy.DTIFit`) inside a brain mask of their mean b = 0
    image; the masked b = 0 image is registered (``registration``: rigid or affine, antspyx,
    mutual information) to the reference's brain at the template resolution, and each map goes
    to the template grid through that transform and the reference's transform to the template,
    in one linear interpolation. The groups' maps are then averaged. Maps of another pipeline
    (``native``) are registered the same way through their ``dwiref`` image (else MD, else the
    first map); maps already on the template grid (``template``) are only masked. No
    susceptibility-distortion correction is done.

    Parameters
    ----------
    dwi : DwiInputs
        What to process.
    registration : str
        ``Rigid`` or ``Affine``.
    random_seed : int
        Seed of the registration's metric sampling.
    omp_nthreads : int
        Threads of the registration.
    name : str
        Workflow name.

    Inputs
    ------
    ref_brain_lowres
        The reference's brain at the template resolution (the registration's target).
    ref_to_template
        The reference's transform to the template.
    template_t1w, std_mask
        The template grid and the subject's brain mask on it.

    Outputs
    -------
    preproc_<param>
        Each map on the template grid, 0 outside the brain.
    dwiref
        The b = 0 image (or the maps' reference) on the template grid, for QC.
    covered_mask
        The brain inside the diffusion field of view, on the template grid.
    dwi_to_ref
        The b = 0-to-reference transform of each group (ITK .mat; none for template-grid maps).
    """
    if dwi.source not in DWI_SOURCES:
        raise ValueError(f"unknown diffusion source {dwi.source!r}")
    params = dwi.params
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["ref_brain_lowres", "ref_to_template", "template_t1w", "std_mask"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=[f"preproc_{p}" for p in params] + ["dwiref", "covered_mask", "dwi_to_ref"]),
        name="outputnode")
    n_groups = len(dwi.groups)
    merged = {key: pe.Node(niu.Merge(n_groups), name=f"{key}_groups",
                           run_without_submitting=True)
              for key in ("dwiref", "field_of_view", "dwi_to_ref", *params)}
    means = {key: pe.Node(MeanImages(), name=f"mean_{key}", mem_gb=0.5)
             for key in ("dwiref", *params)}
    covered = pe.Node(ApplyMask(), name="dwi_covered_mask", mem_gb=0.3)
    union = pe.Node(MeanImages(), name="union_field_of_view", mem_gb=0.3)
    for key, node in means.items():
        workflow.connect(merged[key], "out", node, "in_files")
    workflow.connect([
        (means["dwiref"], outputnode, [("out_file", "dwiref")]),
        (merged["field_of_view"], union, [("out", "in_files")]),
        (inputnode, covered, [("std_mask", "in_file")]),
        (union, covered, [("out_file", "mask_file")]),
        (covered, outputnode, [("out_file", "covered_mask")]),
        (merged["dwi_to_ref"], outputnode, [("out", "dwi_to_ref")]),
    ])
    for param in params:
        masked = pe.Node(ApplyMask(), name=f"mask_{param}", mem_gb=0.3)
        workflow.connect([
            (means[param], masked, [("out_file", "in_file")]),
            (inputnode, masked, [("std_mask", "mask_file")]),
            (masked, outputnode, [("out_file", f"preproc_{param}")]),
        ])
    for index, (label, files) in enumerate(sorted(dwi.groups.items()), start=1):
        _add_group(workflow, dwi, label, files, index, inputnode, merged, registration,
                   random_seed, omp_nthreads)
    return workflow


def _add_group(workflow: pe.Workflow, dwi: DwiInputs, label: str,
               files: tuple[list[str], list[str], list[str]], index: int,
               inputnode: pe.Node, merged: dict[str, pe.Node], registration: str,
               random_seed: int, omp_nthreads: int) -> None:
    """Maps of one group of runs (or of another pipeline) carried to the template grid."""
    suffix = f"_{label}" if dwi.source == "runs" else ""
    if dwi.source == "runs":
        maps = pe.Node(DTIFit(dwi_files=files[0], bval_files=files[1], bvec_files=files[2],
                              params=list(dwi.params)), name=f"dti_fit{suffix}", mem_gb=2.0)
    else:
        maps = pe.Node(PrecomputedMaps(map_files=files[0], reference_file="".join(files[1]),
                                       params=list(dwi.params)), name="precomputed_maps",
                       mem_gb=1.0)
    selects = {}
    for position, param in enumerate(dwi.params):
        selects[param] = pe.Node(niu.Select(index=position), name=f"select_{param}{suffix}",
                                 run_without_submitting=True)
        workflow.connect(maps, "maps", selects[param], "inlist")
    if dwi.source == "template":  # already on the grid
        workflow.connect([
            (maps, merged["dwiref"], [("b0_file", f"in{index}")]),
            (maps, merged["field_of_view"], [("mask_file", f"in{index}")]),
        ])
        for param, select in selects.items():
            workflow.connect(select, "out", merged[param], f"in{index}")
        return
    register = pe.Node(
        Registration(transform_type=registration, composite=False, random_seed=random_seed),
        name=f"register_b0{suffix}", mem_gb=1.0, n_procs=omp_nthreads)
    transforms = pe.Node(niu.Merge(2), name=f"dwi_to_template{suffix}",
                         run_without_submitting=True)
    workflow.connect([
        (maps, register, [("b0_brain_file", "moving_image")]),
        (inputnode, register, [("ref_brain_lowres", "fixed_image")]),
        (inputnode, transforms, [("ref_to_template", "in1")]),
        (register, transforms, [("forward_transform", "in2")]),
        (register, merged["dwi_to_ref"], [("forward_transform", f"in{index}")]),
    ])

    def to_template(name: str, **options) -> pe.Node:
        node = pe.Node(ApplyTransforms(**options), name=f"{name}{suffix}", mem_gb=0.5)
        workflow.connect([(inputnode, node, [("template_t1w", "reference_file")]),
                          (transforms, node, [("out", "transforms")])])
        return node

    std_dwiref = to_template("std_dwiref", interpolation="linear")
    field_of_view = to_template("dwi_field_of_view", interpolation="linear",
                                field_of_view=True)
    workflow.connect([
        (maps, std_dwiref, [("b0_file", "in_file")]),
        (maps, field_of_view, [("b0_file", "in_file")]),
        (std_dwiref, merged["dwiref"], [("out_file", f"in{index}")]),
        (field_of_view, merged["field_of_view"], [("out_file", f"in{index}")]),
    ])
    for param, select in selects.items():
        resampled = to_template(f"{param}_to_template", interpolation="linear")
        workflow.connect([(select, resampled, [("out", "in_file")]),
                          (resampled, merged[param], [("out_file", f"in{index}")])])
