"""Anatomical preprocessing: from raw images to normalised template-space channels."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_anomaly.interfaces.ants import ApplyTransforms, N4BiasFieldCorrection, Registration
from bids_anomaly.interfaces.deepbet import BrainExtraction
from bids_anomaly.interfaces.images import ApplyMask, ConformImage
from bids_anomaly.interfaces.normalization import NormalizeIntensity


def init_anat_preproc_wf(
    modalities: list[str],
    registration: str = "SyN",
    normalization: str = "robust-zscore",
    shrink_factor: int = 4,
    omp_nthreads: int = 1,
    use_gpu: bool = False,
    random_seed: int = 0,
    name: str = "anat_preproc_wf",
) -> pe.Workflow:
    """Preprocess the anatomical images of one subject/session.

    The first modality is the reference: it is reoriented, brain-extracted (deepbet),
    bias-corrected (N4 inside the brain) and registered to the template. Every other modality is
    reoriented, rigidly registered to the reference, bias-corrected inside the reference's brain
    mask carried to its grid, and resampled to the template through both transforms at once.
    Every modality is then normalised inside the template-space brain mask.

    Parameters
    ----------
    modalities : list of str
        Suffixes of the available images, reference first.
    registration : str
        antspyx ``type_of_transform`` of the reference-to-template registration.
    normalization : str
        Intensity normalisation (see :mod:`bids_anomaly.normalization`).
    shrink_factor : int
        N4 shrink factor.
    omp_nthreads : int
        Threads of the multi-threaded nodes.
    use_gpu : bool
        Run deepbet on CUDA.
    random_seed : int
        Seed of the registrations' metric sampling.
    name : str
        Workflow name.

    Inputs
    ------
    in_<modality>
        Raw image of each modality.
    template_t1w, template_mask
        Template image and its brain mask.

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
    """
    reference, others = modalities[0], modalities[1:]
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=[f"in_{m}" for m in modalities]
                              + ["template_t1w", "template_mask"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=[f"preproc_{m}" for m in modalities]
            + ["std_mask", "ref_brain_mask", "ref_to_template", "template_to_ref"]
            + [f"{m}_to_ref" for m in others]
        ),
        name="outputnode",
    )

    conform_ref = pe.Node(ConformImage(), name=f"conform_{reference}", mem_gb=0.5)
    brain_extraction = pe.Node(
        BrainExtraction(use_gpu=use_gpu, num_threads=omp_nthreads), name="brain_extraction",
        n_procs=omp_nthreads, mem_gb=2.0,
    )
    n4_ref = pe.Node(N4BiasFieldCorrection(shrink_factor=shrink_factor),
                     name=f"n4_{reference}", n_procs=omp_nthreads, mem_gb=1.0)
    ref_brain = pe.Node(ApplyMask(), name="ref_brain", mem_gb=0.5)
    register_ref = pe.Node(
        Registration(transform_type=registration, random_seed=random_seed),
        name="register_to_template", n_procs=omp_nthreads, mem_gb=2.0,
    )
    std_mask = pe.Node(ApplyTransforms(interpolation="genericLabel"), name="std_mask", mem_gb=0.5)
    workflow.connect([
        (inputnode, conform_ref, [(f"in_{reference}", "in_file")]),
        (conform_ref, brain_extraction, [("out_file", "in_file")]),
        (conform_ref, n4_ref, [("out_file", "in_file")]),
        (brain_extraction, n4_ref, [("out_mask", "mask_file")]),
        (n4_ref, ref_brain, [("out_file", "in_file")]),
        (brain_extraction, ref_brain, [("out_mask", "mask_file")]),
        (ref_brain, register_ref, [("out_file", "moving_image")]),
        (inputnode, register_ref, [("template_t1w", "fixed_image")]),
        (brain_extraction, std_mask, [("out_mask", "in_file")]),
        (inputnode, std_mask, [("template_t1w", "reference_file")]),
        (register_ref, std_mask, [("forward_transform", "transforms")]),
        (brain_extraction, outputnode, [("out_mask", "ref_brain_mask")]),
        (register_ref, outputnode, [("forward_transform", "ref_to_template"),
                                    ("inverse_transform", "template_to_ref")]),
        (std_mask, outputnode, [("out_file", "std_mask")]),
    ])

    for modality in modalities:
        to_template = pe.Node(ApplyTransforms(interpolation="linear"),
                              name=f"{modality}_to_template", mem_gb=1.0)
        normalize = pe.Node(NormalizeIntensity(method=normalization),
                            name=f"normalize_{modality}", mem_gb=0.5)
        workflow.connect([
            (inputnode, to_template, [("template_t1w", "reference_file")]),
            (to_template, normalize, [("out_file", "in_file")]),
            (std_mask, normalize, [("out_file", "mask_file")]),
            (normalize, outputnode, [("out_file", f"preproc_{modality}")]),
        ])
        if modality == reference:
            workflow.connect([
                (n4_ref, to_template, [("out_file", "in_file")]),
                (register_ref, to_template, [("forward_transform", "transforms")]),
            ])
            continue
        conform = pe.Node(ConformImage(), name=f"conform_{modality}", mem_gb=0.5)
        coregister = pe.Node(
            Registration(transform_type="Rigid", composite=False, random_seed=random_seed),
            name=f"coregister_{modality}", n_procs=omp_nthreads, mem_gb=1.0,
        )
        mask_to_native = pe.Node(ApplyTransforms(interpolation="genericLabel", invert=[True]),
                                 name=f"mask_to_{modality}", mem_gb=0.5)
        n4 = pe.Node(N4BiasFieldCorrection(shrink_factor=shrink_factor), name=f"n4_{modality}",
                     n_procs=omp_nthreads, mem_gb=1.0)
        chain = pe.Node(niu.Merge(2), name=f"{modality}_transforms", run_without_submitting=True)
        workflow.connect([
            (inputnode, conform, [(f"in_{modality}", "in_file")]),
            (conform, coregister, [("out_file", "moving_image")]),
            (ref_brain, coregister, [("out_file", "fixed_image")]),
            (brain_extraction, coregister, [("out_mask", "fixed_mask")]),
            (brain_extraction, mask_to_native, [("out_mask", "in_file")]),
            (conform, mask_to_native, [("out_file", "reference_file")]),
            (coregister, mask_to_native, [("forward_transform", "transforms")]),
            (conform, n4, [("out_file", "in_file")]),
            (mask_to_native, n4, [("out_file", "mask_file")]),
            (register_ref, chain, [("forward_transform", "in1")]),
            (coregister, chain, [("forward_transform", "in2")]),
            (n4, to_template, [("out_file", "in_file")]),
            (chain, to_template, [("out", "transforms")]),
            (coregister, outputnode, [("forward_transform", f"{modality}_to_ref")]),
        ])
    return workflow
