"""Anatomical preprocessing: from raw images to normalised template-space channels."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_anomaly.interfaces.ants import (
    ApplyTransforms,
    N4BiasFieldCorrection,
    Registration,
    ResampleToVoxelSize,
)
from bids_anomaly.interfaces.deepbet import BrainExtraction
from bids_anomaly.interfaces.images import ApplyMask, ConformImage
from bids_anomaly.interfaces.normalization import NormalizeIntensity
from bids_anomaly.interfaces.qc import QCFigures, RegistrationQC
from bids_anomaly.workflows.diffusion import DwiInputs, init_dwi_wf

N4_FIT_SPACING_MM = 8
"""Voxel size (mm) of N4's fit: the shrink factor is this over the template resolution.

Measured on sub-IXI012 at 2 mm: a shrink factor of 4 took 1.0 s against 6.3 s for 2, and its bias
field differs from the one fitted at 2 by 2.3 % (SD of the ratio inside the brain).
"""


def init_anat_preproc_wf(
    modalities: list[str],
    resolution: int = 2,
    registration: str = "SyN",
    normalization: str = "robust-zscore",
    skull_stripped: str = "auto",
    omp_nthreads: int = 1,
    use_gpu: bool = False,
    random_seed: int = 0,
    subject_name: str = "",
    dwi: DwiInputs | None = None,
    dwi_registration: str = "Rigid",
    sloppy: bool = False,
    name: str = "anat_preproc_wf",
) -> pe.Workflow:
    """Preprocess the images of one subject/session: anatomical, and diffusion when given.

    The first modality is the reference. It is reoriented to RAS+ and brain-extracted (deepbet,
    or its own background when it is already skull-stripped). Its brain, resampled to the
    template resolution and bias-corrected (N4), is registered to the template (cropped to the
    brain), and every other
    modality is registered rigidly to the reference head at that resolution. Each image then goes
    to the template grid in one interpolation (through its rigid transform and the reference's
    transform), is bias-corrected there by N4 inside the warped brain mask, and normalised
    inside it. For the other modalities, the mask is the part of the brain inside that image's
    field of view (thick clinical stacks may miss the top of the brain); outside it they are 0.

    With ``dwi``, the diffusion maps are computed and carried to the template grid by
    :func:`~bids_anomaly.workflows.diffusion.init_dwi_wf` (a sub-workflow), registered to the
    reference's brain; their b = 0 image is checked like a coregistered modality (``b0`` in
    the QC table and figures).

    Registration, coregistration and N4 all run at the template resolution: the transforms are
    in world coordinates, and the outputs are at that resolution anyway. Measured by
    ``benchmarks/bench_preproc.py`` on ``bids_real``, this makes the whole pipeline about as fast
    as a single plain antspyx SyN of the raw reference to the template, at the same accuracy.

    Parameters
    ----------
    modalities : list of str
        Suffixes of the available images, reference first.
    resolution : int
        Template voxel size (mm).
    registration : str
        Reference-to-template registration: ``Rigid``, ``Affine`` or ``SyN``.
    normalization : str
        Intensity normalisation (see :mod:`bids_anomaly.imaging.normalization`).
    skull_stripped : str
        ``auto``, ``yes`` or ``no`` (see :class:`~bids_anomaly.interfaces.deepbet.BrainExtraction`).
    omp_nthreads : int
        Threads of the multi-threaded nodes.
    use_gpu : bool
        Run deepbet on CUDA.
    random_seed : int
        Seed of the registrations' metric sampling.
    subject_name : str
        ``sub-<label>[_ses-<label>]``, for log messages.
    dwi : DwiInputs, optional
        The diffusion inputs (none: no diffusion branch).
    dwi_registration : str
        How the b = 0 image is registered (see
        :func:`~bids_anomaly.workflows.diffusion.init_dwi_wf`).
    sloppy : bool
        Registrations and N4 with few iterations (``--sloppy``: tests and the demo).
    name : str
        Workflow name.

    Inputs
    ------
    in_<modality>
        Raw image of each modality.
    template_t1w, template_mask, template_registration
        Template image, its brain mask and the cropped registration target.

    Outputs
    -------
    preproc_<modality>
        Normalised image of each modality in template space.
    std_mask
        Brain mask in template space.
    ref_brain_mask
        Brain mask on the (RAS-reoriented) reference grid.
    ref_to_template, template_to_ref
        ITK composite transforms between the reference image and the template.
    <modality>_to_ref
        Rigid transform of each non-reference modality to the reference (ITK .mat).
    preproc_<param>, dwiref, dwi_to_ref
        Diffusion maps and b = 0 image in template space, b = 0-to-reference transforms (with
        ``dwi``).
    qc_tsv
        One row of registration QC metrics.
    fig_brain_mask, fig_registration, fig_coregistration
        QC figures (SVG); the last is a list, one per non-reference modality.
    """
    reference, others = modalities[0], modalities[1:]
    dwi_params = dwi.params if dwi is not None else ()
    checked = others + (["b0"] if dwi_params else [])  # coregistration QC
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=[f"in_{m}" for m in modalities]
                              + ["template_t1w", "template_mask", "template_registration"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=[f"preproc_{m}" for m in (*modalities, *dwi_params)]
            + ["std_mask", "ref_brain_mask", "ref_to_template", "template_to_ref", "qc_tsv",
               "fig_brain_mask", "fig_registration", "fig_coregistration"]
            + [f"{m}_to_ref" for m in others]
            + (["dwiref", "dwi_to_ref"] if dwi_params else [])
        ),
        name="outputnode",
    )
    threaded = {"n_procs": omp_nthreads}
    conform_ref = pe.Node(ConformImage(), name=f"conform_{reference}", mem_gb=0.5)
    brain_extraction = pe.Node(
        BrainExtraction(skull_stripped=skull_stripped, modality=reference, use_gpu=use_gpu,
                        num_threads=omp_nthreads),
        name="brain_extraction", mem_gb=2.0, **threaded,
    )
    ref_brain_lowres = pe.Node(ResampleToVoxelSize(voxel_size=resolution),
                               name="ref_brain_lowres", mem_gb=0.5)
    # the reference is registered to the template bias-corrected: a head coil's bias field
    # (x 0.56 to x 1.66 inside the brain of bids_dwi's MPRAGE) drew SyN off the anatomy there:
    # brain-mask Dice with the template 0.961 (with N4 first 0.980), FA in the template's
    # white matter (probability > 0.9) 0.325 (0.367); on 4 IXI T1w of bids_real the Dice
    # rose by 0.000-0.005, on sub-mslub26 (bias-corrected upstream) it stayed
    ref_mask_lowres = pe.Node(
        ResampleToVoxelSize(voxel_size=resolution, interpolation="nearestNeighbor"),
        name="ref_mask_lowres", mem_gb=0.5)
    shrink = max(1, N4_FIT_SPACING_MM // resolution)
    n4_ref_lowres = pe.Node(N4BiasFieldCorrection(shrink_factor=shrink, sloppy=sloppy),
                            name=f"n4_{reference}_lowres", mem_gb=0.5, **threaded)
    # coregistration target: the reference head, not its brain. Measured on the 8 clinical
    # T2w/FLAIR of sub-mslubL01/L12: head to head, every rigid transform stayed within 3 mm of
    # the scanner's alignment (NMI with the reference 1.050-1.088); to the masked brain, 5 of 8
    # ended 15-37 mm off (NMI 1.004-1.020)
    ref_head_lowres = pe.Node(ResampleToVoxelSize(voxel_size=resolution),
                              name="ref_head_lowres", mem_gb=0.5)
    register_ref = pe.Node(
        Registration(transform_type=registration, random_seed=random_seed, sloppy=sloppy),
        name="register_to_template", mem_gb=1.0, **threaded,
    )
    std_mask = pe.Node(ApplyTransforms(interpolation="genericLabel"), name="std_mask",
                       mem_gb=0.5)
    workflow.connect([
        (inputnode, conform_ref, [(f"in_{reference}", "in_file")]),
        (conform_ref, brain_extraction, [("out_file", "in_file")]),
        (brain_extraction, ref_brain_lowres, [("out_file", "in_file")]),
        (brain_extraction, ref_mask_lowres, [("out_mask", "in_file")]),
        (ref_brain_lowres, n4_ref_lowres, [("out_file", "in_file")]),
        (ref_mask_lowres, n4_ref_lowres, [("out_file", "mask_file")]),
        (conform_ref, ref_head_lowres, [("out_file", "in_file")]),
        (n4_ref_lowres, register_ref, [("out_file", "moving_image")]),
        (inputnode, register_ref, [("template_registration", "fixed_image")]),
        (brain_extraction, std_mask, [("out_mask", "in_file")]),
        (inputnode, std_mask, [("template_t1w", "reference_file")]),
        (register_ref, std_mask, [("forward_transform", "transforms")]),
        (brain_extraction, outputnode, [("out_mask", "ref_brain_mask")]),
        (register_ref, outputnode, [("forward_transform", "ref_to_template"),
                                    ("inverse_transform", "template_to_ref")]),
        (std_mask, outputnode, [("out_file", "std_mask")]),
    ])

    qc = pe.Node(RegistrationQC(subject_name=subject_name, reference=reference,
                                modalities=checked), name="registration_qc", mem_gb=0.5)
    figures = pe.Node(QCFigures(reference=reference, modalities=checked), name="qc_figures",
                      mem_gb=1.0)
    std_others = pe.Node(niu.Merge(max(1, len(checked))), name="std_others",
                         run_without_submitting=True)
    coverage = pe.Node(niu.Merge(max(1, len(checked))), name="covered_masks",
                       run_without_submitting=True)
    notes = pe.Node(niu.Merge(len(modalities)), name="intensity_notes",
                    run_without_submitting=True)
    workflow.connect([
        (brain_extraction, qc, [("out_mask", "native_mask"), ("method", "skull_stripping")]),
        (std_mask, qc, [("out_file", "std_mask")]),
        (conform_ref, notes, [("note", "in1")]),
        (notes, qc, [("out", "notes")]),
        (inputnode, qc, [("template_mask", "template_mask"), ("template_t1w", "template_t1w")]),
        (conform_ref, figures, [("out_file", "native_reference")]),
        (brain_extraction, figures, [("out_mask", "native_mask")]),
        (inputnode, figures, [("template_t1w", "template_t1w")]),
        (qc, outputnode, [("out_tsv", "qc_tsv")]),
        (figures, outputnode, [("brain_mask", "fig_brain_mask"),
                               ("registration", "fig_registration"),
                               ("coregistration", "fig_coregistration")]),
    ])
    if checked:
        workflow.connect([(std_others, qc, [("out", "std_images")]),
                          (coverage, qc, [("out", "covered_masks")]),
                          (std_others, figures, [("out", "std_images")])])

    for index, modality in enumerate(modalities):
        to_template = pe.Node(ApplyTransforms(interpolation="linear"),
                              name=f"{modality}_to_template", mem_gb=1.0)
        n4 = pe.Node(N4BiasFieldCorrection(shrink_factor=shrink, sloppy=sloppy),
                     name=f"n4_{modality}", mem_gb=0.5, **threaded)
        normalize = pe.Node(NormalizeIntensity(method=normalization, modality=modality),
                            name=f"normalize_{modality}", mem_gb=0.5)
        workflow.connect([
            (inputnode, to_template, [("template_t1w", "reference_file")]),
            (to_template, n4, [("out_file", "in_file")]),
            (n4, normalize, [("out_file", "in_file")]),
            (normalize, outputnode, [("out_file", f"preproc_{modality}")]),
        ])
        if modality == reference:
            workflow.connect([
                (std_mask, n4, [("out_file", "mask_file")]),
                (std_mask, normalize, [("out_file", "mask_file")]),
                (conform_ref, to_template, [("out_file", "in_file")]),
                (register_ref, to_template, [("forward_transform", "transforms")]),
                (n4, qc, [("out_file", "std_reference")]),
                (n4, figures, [("out_file", "std_reference")]),
            ])
            continue
        conform = pe.Node(ConformImage(), name=f"conform_{modality}", mem_gb=0.5)
        coregister = pe.Node(
            Registration(transform_type="Rigid", composite=False, random_seed=random_seed,
                         sloppy=sloppy),
            name=f"coregister_{modality}", mem_gb=1.0, **threaded,
        )
        chain = pe.Node(niu.Merge(2), name=f"{modality}_transforms", run_without_submitting=True)
        # clinical 2D stacks often miss the top or bottom of the brain: N4 and normalisation
        # use the part of the brain inside this image's field of view, and the rest stays 0
        fov = pe.Node(ApplyTransforms(interpolation="linear", field_of_view=True),
                      name=f"{modality}_field_of_view", mem_gb=0.5)
        covered = pe.Node(ApplyMask(), name=f"{modality}_covered_mask", mem_gb=0.3)
        workflow.connect([
            (conform, fov, [("out_file", "in_file")]),
            (inputnode, fov, [("template_t1w", "reference_file")]),
            (chain, fov, [("out", "transforms")]),
            (std_mask, covered, [("out_file", "in_file")]),
            (fov, covered, [("out_file", "mask_file")]),
            (covered, n4, [("out_file", "mask_file")]),
            (covered, normalize, [("out_file", "mask_file")]),
            (covered, coverage, [("out_file", f"in{index}")]),
        ])
        workflow.connect([
            (inputnode, conform, [(f"in_{modality}", "in_file")]),
            (conform, coregister, [("out_file", "moving_image")]),
            (ref_head_lowres, coregister, [("out_file", "fixed_image")]),
            (register_ref, chain, [("forward_transform", "in1")]),
            (coregister, chain, [("forward_transform", "in2")]),
            (conform, to_template, [("out_file", "in_file")]),
            (conform, notes, [("note", f"in{index + 1}")]),
            (chain, to_template, [("out", "transforms")]),
            (n4, std_others, [("out_file", f"in{index}")]),
            (coregister, outputnode, [("forward_transform", f"{modality}_to_ref")]),
        ])
    if dwi is not None:
        dwi_wf = init_dwi_wf(dwi, dwi_registration, random_seed, omp_nthreads)
        index = len(checked)
        workflow.connect([
            (inputnode, dwi_wf, [("template_t1w", "inputnode.template_t1w")]),
            (ref_brain_lowres, dwi_wf, [("out_file", "inputnode.ref_brain_lowres")]),
            (register_ref, dwi_wf, [("forward_transform", "inputnode.ref_to_template")]),
            (std_mask, dwi_wf, [("out_file", "inputnode.std_mask")]),
            (dwi_wf, outputnode, [(f"outputnode.preproc_{p}", f"preproc_{p}")
                                  for p in dwi_params]
             + [("outputnode.dwiref", "dwiref"), ("outputnode.dwi_to_ref", "dwi_to_ref")]),
            (dwi_wf, std_others, [("outputnode.dwiref", f"in{index}")]),
            (dwi_wf, coverage, [("outputnode.covered_mask", f"in{index}")]),
        ])
    return workflow
