"""Writing derivatives (computing happens elsewhere)."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_anomaly import bids
from bids_anomaly.interfaces.bids import DerivativesDataSink
from bids_anomaly.postprocessing.clusters import CLUSTER_COLUMNS
from bids_anomaly.postprocessing.regions import REGION_COLUMNS
from bids_anomaly.workflows.diffusion import DwiInputs


def _sink(name: str, output_dir: Path, subject: str, session: str | None, spec: dict,
          metadata: dict | None = None, sources: list[str] | None = None) -> pe.Node:
    spec = dict(spec)
    node = pe.Node(
        DerivativesDataSink(
            output_dir=str(output_dir), subject=subject, session=session,
            suffix=spec.pop("suffix"), extension=spec.pop("extension", ".nii.gz"),
            datatype=spec.pop("datatype", "anat"),
            entities=spec, metadata=metadata or {}, source_files=sources or [],
        ),
        name=name, run_without_submitting=True, mem_gb=0.1,
    )
    return node


def _connect_item(workflow: pe.Workflow, source: pe.Node, field: str, index: int,
                  sink: pe.Node) -> None:
    """Sink the ``index``-th file of the list ``source.field`` (Select takes a lone string too)."""
    select = pe.Node(niu.Select(index=index), name=f"select_{sink.name}",
                     run_without_submitting=True)
    workflow.connect([(source, select, [(field, "inlist")]), (select, sink, [("out", "in_file")])])


NATIVE_COLUMNS = {
    **{f"{axis}_native": {"Description": f"{axis} of the candidate's centre in the raw "
                                         "reference image's world coordinates (RAS)",
                          "Units": "mm"} for axis in "xyz"},
    "kept": {"Description": "score above the model's calibrated threshold (in the mask)"},
}
"""Sidecar entries of the microbleed table's native-space centre and ``kept`` column."""


def init_ds_anat_wf(
    inputs: bids.AnatInputs,
    output_dir: Path,
    bids_dir: Path,
    space: str,
    resolution: int,
    settings: dict,
    name: str = "ds_anat_wf",
    dwi: DwiInputs | None = None,
) -> pe.Workflow:
    """Write the preprocessing derivatives of one subject/session.

    Diffusion maps (with ``dwi``) are written under ``dwi/`` with BEP016 names
    (``*_model-tensor_param-fa_dwimap``), with the b = 0 image (``*_dwiref``) and the
    b = 0-to-reference transform of each phase-encoding group (``*_dir-<label>_from-dwi_...``).

    Parameters
    ----------
    inputs : AnatInputs
        The subject's raw images (for names and ``Sources``).
    output_dir : Path
        Root of the derivative dataset.
    bids_dir : Path
        Root of the raw dataset.
    space, resolution
        Template name and voxel size.
    settings : dict
        Preprocessing settings recorded in the sidecars.
    name : str
        Workflow name.
    dwi : DwiInputs, optional
        The diffusion inputs (:func:`~bids_anomaly.workflows.diffusion.dwi_inputs`).

    Inputs
    ------
    preproc_<modality>, std_mask, ref_to_template, template_to_ref, <modality>_to_ref, qc_tsv,
    fig_brain_mask, fig_registration, fig_coregistration
        As produced by :func:`~bids_anomaly.workflows.anatomical.init_anat_preproc_wf`.
    """
    modalities = inputs.modalities
    reference = modalities[0]
    others = modalities[1:]
    params = dwi.params if dwi is not None else ()
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=[f"preproc_{m}" for m in inputs.channels]
            + ["std_mask", "ref_to_template", "template_to_ref", "qc_tsv", "fig_brain_mask",
               "fig_registration", "fig_coregistration", "dwiref", "dwi_to_ref"]
            + [f"{m}_to_ref" for m in others]
        ),
        name="inputnode",
    )
    sources = {m: bids.bids_uri(bids_dir, inputs.images[m]) for m in modalities}
    sub, ses = inputs.subject, inputs.session
    for modality in modalities:
        metadata = {
            "SkullStripped": True,
            "Resolution": f"{resolution} mm isotropic, template {space}",
            "IntensityNormalization": settings.get("normalization"),
            "Description": f"{modality} bias-corrected, registered to {space} through the "
                           f"{reference}, normalised inside the brain",
        }
        if len(inputs.echoes.get(modality, [])) > 1:
            metadata["EchoCombination"] = settings.get("echo_combination")
        srcs = ([sources[modality]]
                + [bids.bids_uri(bids_dir, p) for p in inputs.echoes.get(modality, [])[1:]]
                + ([sources[reference]] if modality != reference else []))
        node = _sink(f"ds_preproc_{modality}", output_dir, sub, ses,
                     bids.preproc_spec(space, resolution, modality), metadata, srcs)
        workflow.connect(inputnode, f"preproc_{modality}", node, "in_file")
    ds_mask = _sink("ds_std_mask", output_dir, sub, ses, bids.brain_mask_spec(space, resolution),
                    {"Type": "Brain"},
                    [sources[reference]])
    ds_forward = _sink("ds_ref_to_template", output_dir, sub, ses,
                       bids.transform_spec(reference, space),
                       {"Registration": settings.get("registration"), "Software": "antspyx"})
    ds_inverse = _sink("ds_template_to_ref", output_dir, sub, ses,
                       bids.transform_spec(space, reference),
                       {"Registration": settings.get("registration"), "Software": "antspyx"})
    workflow.connect([
        (inputnode, ds_mask, [("std_mask", "in_file")]),
        (inputnode, ds_forward, [("ref_to_template", "in_file")]),
        (inputnode, ds_inverse, [("template_to_ref", "in_file")]),
    ])
    for modality in others:
        node = _sink(f"ds_{modality}_to_ref", output_dir, sub, ses,
                     bids.transform_spec(modality, reference, ".mat"),
                     {"Registration": "Rigid", "Software": "antspyx"})
        workflow.connect(inputnode, f"{modality}_to_ref", node, "in_file")

    ds_qc = _sink("ds_qc", output_dir, sub, ses, bids.qc_spec())
    ds_fig_mask = _sink("ds_fig_brain_mask", output_dir, sub, ses,
                        bids.figure_spec("brainmask", reference))
    ds_fig_reg = _sink("ds_fig_registration", output_dir, sub, ses,
                       bids.figure_spec("registration", reference, space))
    workflow.connect([
        (inputnode, ds_qc, [("qc_tsv", "in_file")]),
        (inputnode, ds_fig_mask, [("fig_brain_mask", "in_file")]),
        (inputnode, ds_fig_reg, [("fig_registration", "in_file")]),
    ])
    if dwi is not None:
        _connect_ds_dwi(workflow, inputnode, inputs, dwi, output_dir, bids_dir, space,
                        resolution, settings, sources[reference])
    # Nipype hands a one-element list on as a plain string: Select takes both
    for index, modality in enumerate([*others, *(["b0"] if params else [])]):
        pick = pe.Node(niu.Select(index=index), name=f"select_coregistration_{modality}",
                       run_without_submitting=True)
        node = _sink(f"ds_fig_coregistration_{modality}", output_dir, sub, ses,
                     bids.figure_spec("coregistration", modality, space))
        workflow.connect([(inputnode, pick, [("fig_coregistration", "inlist")]),
                          (pick, node, [("out", "in_file")])])
    return workflow


def _connect_ds_dwi(workflow: pe.Workflow, inputnode: pe.Node, inputs: bids.AnatInputs,
                    dwi: DwiInputs, output_dir: Path, bids_dir: Path, space: str,
                    resolution: int, settings: dict, reference_uri: str) -> None:
    """Sinks of the diffusion maps, their b = 0 image and transform."""
    import dipy

    sub, ses = inputs.subject, inputs.session
    if inputs.dwi:
        sources = [bids.bids_uri(bids_dir, run.image) for run in inputs.dwi]
        origin = (f"diffusion tensor fitted by weighted least squares (dipy {dipy.__version__}) "
                  f"to {len(inputs.dwi)} dwi run(s), runs of one phase-encoding direction "
                  f"together ({len(dwi.groups)} direction(s), maps averaged in template "
                  "space), without susceptibility-distortion correction")
    else:
        sources = [str(path) for key, path in inputs.dwi_maps.items() if key != "dwiref"]
        origin = "computed by another pipeline (--dwi-derivatives)"
    carried = ("already on the template grid: masked only" if dwi.source == "template" else
               f"b=0 image registered ({settings.get('dwi_registration')}, antspyx) to the "
               f"{inputs.reference}'s brain, then carried to {space} with the {inputs.reference}'s "
               "transform in one linear interpolation")
    units = {"FA": "arbitrary", "MD": "mm^2/s", "AD": "mm^2/s", "RD": "mm^2/s"}
    names = {"FA": "fractional anisotropy", "MD": "mean diffusivity", "AD": "axial diffusivity",
             "RD": "radial diffusivity"}
    for param in inputs.dwi_params:
        metadata = {
            "Model": {"Name": "tensor", "FitMethod": "WLS" if inputs.dwi else None},
            "Parameter": param, "Units": units[param],
            "Description": f"{names[param]}, {origin}; {carried}; 0 outside the brain",
            "Resolution": f"{resolution} mm isotropic, template {space}",
            "SkullStripped": True,
        }
        node = _sink(f"ds_{param}", output_dir, sub, ses,
                     bids.preproc_spec(space, resolution, param), metadata,
                     sources + [reference_uri])
        workflow.connect(inputnode, f"preproc_{param}", node, "in_file")
    ds_ref = _sink("ds_dwiref", output_dir, sub, ses, bids.dwiref_spec(space, resolution),
                   {"Description": "mean b=0 image (or the given maps' reference) on the "
                                   f"template grid; {carried}"}, sources)
    workflow.connect(inputnode, "dwiref", ds_ref, "in_file")
    if dwi.source == "template":
        return
    for index, label in enumerate(sorted(dwi.groups)):
        pick = pe.Node(niu.Select(index=index), name=f"select_dwi_to_ref_{label}",
                       run_without_submitting=True)
        ds_xfm = _sink(f"ds_dwi_to_ref_{label}", output_dir, sub, ses,
                       {**bids.transform_spec("dwi", inputs.reference, ".mat"),
                        "datatype": "dwi", "dir": label if dwi.source == "runs" else None},
                       {"Registration": settings.get("dwi_registration"),
                        "Software": "antspyx"})
        workflow.connect([(inputnode, pick, [("dwi_to_ref", "inlist")]),
                          (pick, ds_xfm, [("out", "in_file")])])


def init_ds_anomaly_wf(
    inputs: bids.AnatInputs,
    output_dir: Path,
    space: str,
    resolution: int,
    model_desc: str,
    card_metadata: dict,
    name: str = "ds_anomaly_wf",
    channels: list[str] | None = None,
    table_metadata: dict | None = None,
    microbleeds: dict | None = None,
    norms: list[str] | None = None,
    probsegs: tuple[str, ...] | list[str] | None = None,
) -> pe.Workflow:
    """Write a model's maps and tables for one subject/session.

    The anomaly map and mask are written in template space and, as ``space-<reference>``
    without ``res-``, on the grid of the subject's raw reference image. With ``channels``
    (models whose score combines per-channel maps), each channel's map is written too, as
    ``desc-<model><channel>_stat-residual_statmap``.

    Parameters
    ----------
    table_metadata : dict, optional
        Extra sidecar fields of the clusters and regions tables (restriction, atlas).
    microbleeds : dict, optional
        The model's microbleed calibration (card ``extra.microbleeds``): the candidates table
        (``desc-<model>_microbleeds.tsv``) and masks (``label-microbleed_desc-<model>_mask``,
        template and native) are written too.
    norms : list of str, optional
        The channels of a model whose norms depend on covariates: its z-score and centile maps
        per channel (``desc-<model><channel>_stat-z|centile_statmap``) and its regional norms
        (``desc-<model>_norms.tsv``) are written too.
    probsegs : list of str, optional
        The classes of a model that segments tissues: one posterior map per class
        (``label-<class>_desc-<model>_probseg``), in this order.

    Inputs
    ------
    anomaly_map, anomaly_mask, channel_maps, clusters, regions
        Outputs of :class:`~bids_anomaly.interfaces.anomaly.ScoreAnomaly`.
    native_map, native_mask
        The map and mask resampled onto the raw reference image.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["anomaly_map", "anomaly_mask",
                                                      "channel_maps", "clusters", "regions",
                                                      "native_map", "native_mask",
                                                      "microbleeds", "microbleed_mask",
                                                      "native_microbleed_mask", "z_maps",
                                                      "centile_maps", "norms", "probsegs"]),
                        name="inputnode")
    sub, ses = inputs.subject, inputs.session
    ds_map = _sink("ds_anomaly_map", output_dir, sub, ses,
                   bids.anomaly_map_spec(space, resolution, model_desc),
                   {**card_metadata, "Description": "voxel-wise anomaly score"})
    ds_mask = _sink("ds_anomaly_mask", output_dir, sub, ses,
                    bids.anomaly_mask_spec(space, resolution, model_desc),
                    {**card_metadata, "Description": "voxels scoring above the calibrated "
                     "threshold"})
    table_metadata = {"Model": card_metadata.get("Model"), **(table_metadata or {})}
    ds_clusters = _sink("ds_clusters", output_dir, sub, ses,
                        bids.clusters_spec(space, resolution, model_desc),
                        {**CLUSTER_COLUMNS, **table_metadata})
    ds_regions = _sink("ds_regions", output_dir, sub, ses,
                       bids.regions_spec(space, resolution, model_desc),
                       {**REGION_COLUMNS, **table_metadata})
    reference = inputs.reference
    native = {"Description": f"resampled onto the raw {reference} image's grid through the "
                             f"inverse of its registration to {space}"}
    ds_native_map = _sink("ds_native_map", output_dir, sub, ses,
                          bids.anomaly_map_spec(reference, None, model_desc),
                          {**card_metadata, **native})
    ds_native_mask = _sink("ds_native_mask", output_dir, sub, ses,
                           bids.anomaly_mask_spec(reference, None, model_desc),
                           {**card_metadata, **native})
    workflow.connect([
        (inputnode, ds_map, [("anomaly_map", "in_file")]),
        (inputnode, ds_mask, [("anomaly_mask", "in_file")]),
        (inputnode, ds_clusters, [("clusters", "in_file")]),
        (inputnode, ds_regions, [("regions", "in_file")]),
        (inputnode, ds_native_map, [("native_map", "in_file")]),
        (inputnode, ds_native_mask, [("native_mask", "in_file")]),
    ])
    if microbleeds:
        from bids_anomaly.postprocessing.microbleeds import CANDIDATE_COLUMNS

        about = {"Model": card_metadata.get("Model"), "Channel": microbleeds["channel"],
                 "ScoreThreshold": microbleeds["threshold"],
                 "FalsePositivesPerControl": microbleeds["fp_per_subject"]}
        sinks = (
            ("ds_microbleeds", bids.microbleeds_spec(space, resolution, model_desc),
             {**CANDIDATE_COLUMNS, **NATIVE_COLUMNS, **about}, "microbleeds"),
            ("ds_microbleed_mask", bids.microbleed_mask_spec(space, resolution, model_desc),
             {**about, "Description": "kept microbleed candidates, labelled by candidate_id"},
             "microbleed_mask"),
            ("ds_native_microbleed_mask", bids.microbleed_mask_spec(inputs.reference, None,
                                                                    model_desc),
             {**about, "Description": "kept microbleed candidates on the raw "
                                      f"{inputs.reference} image's grid"},
             "native_microbleed_mask"),
        )
        for name, spec, metadata, field in sinks:
            node = _sink(name, output_dir, sub, ses, spec, metadata)
            workflow.connect(inputnode, field, node, "in_file")
    if norms:
        from bids_anomaly.models.normative.norms import NORMS_COLUMNS

        ds_norms = _sink("ds_norms", output_dir, sub, ses,
                         bids.norms_spec(space, resolution, model_desc),
                         {**NORMS_COLUMNS, **table_metadata})
        workflow.connect(inputnode, "norms", ds_norms, "in_file")
        about = {"z": "z-score against the healthy norms of the participant's covariates and "
                      "site: (x - expected) / predictive sd",
                 "centile": "healthy centile of the value for the participant's covariates and "
                            "site, 100 * Phi(z) (0 outside the norms)"}
        for index, channel in enumerate(norms):
            for stat, description in about.items():
                ds_stat = _sink(f"ds_{channel}_{stat}", output_dir, sub, ses,
                                bids.normative_map_spec(space, resolution, model_desc, channel,
                                                        stat),
                                {**card_metadata, "Description": f"{channel}: {description}"})
                _connect_item(workflow, inputnode, f"{stat}_maps", index, ds_stat)
    for index, label in enumerate(probsegs or []):
        ds_probseg = _sink(f"ds_probseg_{label}", output_dir, sub, ses,
                           bids.probseg_spec(space, resolution, model_desc, label),
                           {**card_metadata, "Description": f"posterior probability of the "
                            f"class {label} under the model fitted on this subject"})
        _connect_item(workflow, inputnode, "probsegs", index, ds_probseg)
    for index, channel in enumerate(channels or []):
        ds_channel = _sink(f"ds_{channel}_map", output_dir, sub, ses,
                           bids.residual_map_spec(space, resolution, model_desc, channel),
                           {**card_metadata, "Description": f"the {channel} channel's part of "
                            "the anomaly score (smoothed reconstruction residual)"})
        _connect_item(workflow, inputnode, "channel_maps", index, ds_channel)
    return workflow
