"""The participant-level workflow and running it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_anomaly import __version__, bids
from bids_anomaly.config import RESTRICTIONS, Settings
from bids_anomaly.imaging.template import Template
from bids_anomaly.interfaces.anomaly import FitSubjectModel, ScoreAnomaly
from bids_anomaly.interfaces.ants import ApplyTransforms
from bids_anomaly.interfaces.images import CombineEchoes
from bids_anomaly.models import REGISTRY, ChannelScorer, ModelCard, TissueSegmenter, build_model
from bids_anomaly.models.store import card_checksum
from bids_anomaly.postprocessing.regions import Atlas
from bids_anomaly.workflows.anatomical import init_anat_preproc_wf
from bids_anomaly.workflows.diffusion import dwi_inputs
from bids_anomaly.workflows.outputs import init_ds_anat_wf, init_ds_anomaly_wf

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedModel:
    """A trained model applied at the participant level.

    Attributes
    ----------
    directory : Path
        The model directory.
    card : ModelCard
        Its card.
    settings : Settings
        The run's settings with this model's post-processing (tuned on annotations, when it
        was; see :func:`~bids_anomaly.levels.weak.apply_tuned_postprocessing`).
    scored : frozenset of str, optional
        The subject/sessions it scores (those with its channels); None: all.
    covariates : dict, optional
        For a model whose norms depend on covariates: each participant's values of the
        participants.tsv columns it needs, by participant label.
    """

    directory: Path
    card: ModelCard
    settings: Settings
    scored: frozenset[str] | None = None
    covariates: dict[str, dict[str, str]] | None = None

    def applies_to(self, inputs: bids.AnatInputs) -> bool:
        """Whether the model scores this subject/session."""
        return self.scored is None or inputs.name in self.scored


def workflow_name() -> str:
    """Top workflow name; it carries major.minor so a new version never reuses a stale cache."""
    major, minor = __version__.split(".")[:2]
    return f"bids_anomaly_{major}_{minor}_wf"


def _digest(values: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def preprocessing_key(settings: Settings, inputs: bids.AnatInputs, template: Template,
                      use_gpu: bool) -> str:
    """A digest of everything one subject's preprocessing reads (its completion record's key).

    The package version, the raw images (names, sizes and times), the template and the
    preprocessing settings: when a finished run had the same key, preprocessing again would
    write the same derivatives.
    """
    import os

    raw = {}
    for path in inputs.raw_files:
        stat = os.stat(path) if os.path.exists(path) else None
        raw[str(path)] = [stat.st_size, stat.st_mtime_ns] if stat else None
    return _digest({
        "version": __version__, "subject": inputs.name, "raw": raw,
        "template": [template.name, template.resolution], "use_gpu": use_gpu,
        "output_dir": str(settings.output_dir), "bids_dir": str(settings.bids_dir),
        "preprocessing": {**settings.preprocessing.recorded(),
                          "skull_stripped": settings.preprocessing.skull_stripped,
                          "dwi_params": inputs.dwi_params,
                          "resolution": settings.preprocessing.resolution,
                          "random_seed": settings.execution.random_seed,
                          "omp_nthreads": settings.execution.threads},
    })


def _postprocessing_key(settings: Settings, atlas: Atlas | None) -> dict:
    from bids_anomaly.models.store import file_checksum

    return {"fdr": settings.postprocessing.fdr,
            "min_cluster_mm3": settings.postprocessing.min_cluster_mm3,
            "restrict": settings.postprocessing.restrict,
            "atlas": file_checksum(atlas.path) if atlas is not None else None}


def subject_run_key(settings: Settings, inputs: bids.AnatInputs, template: Template,
                    models: list[AppliedModel], atlas: Atlas | None, use_gpu: bool) -> str:
    """A digest of everything one subject's workflow reads (its completion record's key).

    Without a model or ``--single-subject`` it is the :func:`preprocessing_key`; otherwise
    that key with the models' cards and weights, the post-processing options and the atlas
    (and, for models with covariates, the participant's values and ``--extrapolate``).
    ``models`` are those that apply to this subject/session.
    """
    key = preprocessing_key(settings, inputs, template, use_gpu)
    single_subject = settings.model.single_subject
    if not models and not single_subject:
        return key
    values = {"preprocessing": key, "postprocessing": _postprocessing_key(settings, atlas)}
    if len(models) == 1:
        values["model"] = [models[0].card.checksum, card_checksum(models[0].directory)]
    elif models:
        values["models"] = [[m.card.checksum, card_checksum(m.directory),
                             _postprocessing_key(m.settings, atlas)] for m in models]
    covariates = [(m.covariates or {}).get(inputs.subject) for m in models]
    if any(covariates):  # norms that depend on the participant's covariates
        values["covariates"] = [covariates, settings.model.extrapolate]
    if single_subject:
        values["single_subject"] = [single_subject, settings.model.fpr, build_model(
            settings, single_subject=True).hyperparameters,
            single_subject_channels(settings, inputs)]
    return _digest(values)


def init_participant_wf(
    settings: Settings,
    subjects: list[bids.AnatInputs],
    template: Template,
    models: list[AppliedModel] | None = None,
    atlas: Atlas | None = None,
    preprocessed: set[str] | None = None,
) -> pe.Workflow:
    """Build the participant-level workflow for every subject/session.

    Parameters
    ----------
    settings : Settings
        The run's settings.
    subjects : list of AnatInputs
        One entry per subject/session, each with at least one image.
    template : Template
        Template files.
    models : list of AppliedModel, optional
        Trained models to apply after preprocessing (each to the subjects it scores).
    atlas : Atlas, optional
        User atlas on the template grid, for the clusters and regional tables.
    preprocessed : set of str, optional
        Names of the subject/sessions whose preprocessing finished (their derivatives feed the
        model stage directly).

    Returns
    -------
    nipype.pipeline.engine.Workflow
    """
    from bids_anomaly.runtime.device import resolve_device

    workflow = pe.Workflow(name=workflow_name(), base_dir=str(settings.work_dir))
    use_gpu = resolve_device(settings.execution.device).type == "cuda"
    for inputs in subjects:
        workflow.add_nodes([init_single_subject_wf(
            settings, inputs, template, [m for m in models or [] if m.applies_to(inputs)],
            use_gpu, atlas, preprocessed=inputs.name in (preprocessed or ()))])
    return workflow


def subject_workflow_name(inputs: bids.AnatInputs) -> str:
    """Name of a subject/session's workflow (``sub_01_ses_a_wf``), unique within a run."""
    return inputs.name.replace("-", "_") + "_wf"


def init_single_subject_wf(
    settings: Settings,
    inputs: bids.AnatInputs,
    template: Template,
    models: list[AppliedModel] | None = None,
    use_gpu: bool = False,
    atlas: Atlas | None = None,
    preprocessed: bool = False,
) -> pe.Workflow:
    """Preprocess one subject/session, write its derivatives, and apply the models given.

    With ``preprocessed`` (its preprocessing finished in an earlier run), the model stage reads
    the preprocessed derivatives instead: the preprocessing steps are not even checked against
    their cache.

    Parameters
    ----------
    settings : Settings
        The run's settings.
    inputs : AnatInputs
        The subject/session's raw images.
    template : Template
        Template files.
    models : list of AppliedModel, optional
        Trained models to apply; with several, each one's nodes are named after it
        (``score_anomaly_<desc>``, ...).
    use_gpu : bool
        Run the networks (deepbet, the model) on CUDA.
    atlas : Atlas, optional
        User atlas for the clusters and regional tables.
    preprocessed : bool
        Read the preprocessed derivatives instead of preprocessing.
    """
    workflow = pe.Workflow(name=subject_workflow_name(inputs))
    if preprocessed:
        source = _preprocessed_derivatives(settings, inputs, template)
        prefix = ""
    else:
        source = _preprocess(workflow, settings, inputs, template, use_gpu)
        prefix = "outputnode."
    for model in models or []:
        suffix = f"_{bids.model_desc(model.card.name)}" if len(models) > 1 else ""
        covariates = (model.covariates or {}).get(inputs.subject)
        _connect_trained_model(workflow, source, prefix, model.settings, inputs, template,
                               (model.directory, model.card), use_gpu, atlas, suffix,
                               covariates)
    channels = single_subject_channels(settings, inputs)
    if settings.model.single_subject and channels:
        _connect_single_subject(workflow, source, prefix, settings, inputs, template, channels,
                                use_gpu, atlas)
    elif settings.model.single_subject:
        LOGGER.warning("%s lacks %s: not scored by --single-subject %s", inputs.name,
                       ", ".join(c for c in settings.model.channels if c not in inputs.modalities),
                       settings.model.single_subject)
    return workflow


def single_subject_channels(settings: Settings, inputs: bids.AnatInputs) -> list[str] | None:
    """The channels ``--single-subject`` fits on for this subject (None: it lacks one).

    Every anatomical modality of the subject, or those of ``--channels`` (in the subject's
    order), which it must all have.
    """
    requested = settings.model.channels
    if not requested:
        return list(inputs.modalities)
    if not set(requested) <= set(inputs.modalities):
        return None
    return [m for m in inputs.modalities if m in requested]


def _preprocessed_derivatives(settings: Settings, inputs: bids.AnatInputs,
                              template: Template) -> pe.Node:
    """A node holding the preprocessed derivatives the model stage reads."""
    modalities = inputs.channels
    fields = [f"preproc_{m}" for m in modalities] + ["std_mask", "template_to_ref",
                                                     "ref_to_template"]
    node = pe.Node(niu.IdentityInterface(fields=fields), name="preprocessed")

    def path(spec: dict) -> str:
        return str(bids.spec_path(settings.output_dir, inputs.subject, inputs.session, spec))

    for modality in modalities:
        setattr(node.inputs, f"preproc_{modality}",
                path(bids.preproc_spec(template.name, template.resolution, modality)))
    node.inputs.std_mask = path(bids.brain_mask_spec(template.name, template.resolution))
    node.inputs.template_to_ref = path(bids.transform_spec(template.name, inputs.reference))
    node.inputs.ref_to_template = path(bids.transform_spec(inputs.reference, template.name))
    return node


def _preprocess(workflow: pe.Workflow, settings: Settings, inputs: bids.AnatInputs,
                template: Template, use_gpu: bool) -> pe.Workflow:
    """Add preprocessing and its derivatives to ``workflow``; return the preprocessing."""
    modalities = inputs.modalities
    dwi = dwi_inputs(inputs, str(template.t1w))
    inputnode = pe.Node(
        niu.IdentityInterface(fields=[f"in_{m}" for m in modalities]
                              + ["template_t1w", "template_mask", "template_registration"]),
        name="inputnode",
    )
    combined = {}
    for modality in modalities:
        echoes = inputs.echoes.get(modality, [])
        if len(echoes) > 1:  # a multi-echo image: its echoes combined first
            combined[modality] = pe.Node(
                CombineEchoes(in_files=[str(p) for p in echoes],
                              method=settings.preprocessing.echo_combination),
                name=f"combine_{modality}_echoes", mem_gb=0.5)
        else:
            setattr(inputnode.inputs, f"in_{modality}", str(inputs.images[modality]))
    inputnode.inputs.template_t1w = str(template.t1w)
    inputnode.inputs.template_mask = str(template.brain_mask)
    inputnode.inputs.template_registration = str(template.registration_target)

    anat_preproc_wf = init_anat_preproc_wf(
        modalities, resolution=template.resolution,
        registration=settings.preprocessing.registration,
        normalization=settings.preprocessing.normalization,
        skull_stripped=settings.preprocessing.skull_stripped,
        omp_nthreads=settings.execution.threads, use_gpu=use_gpu,
        random_seed=settings.execution.random_seed,
        subject_name=inputs.name,
        dwi=dwi, dwi_registration=settings.preprocessing.dwi_registration,
        sloppy=settings.preprocessing.sloppy,
    )
    ds_anat_wf = init_ds_anat_wf(
        inputs, settings.output_dir, settings.bids_dir, template.name, template.resolution,
        settings.preprocessing.recorded(), dwi=dwi,
    )
    anat_outputs = (
        [f"preproc_{m}" for m in inputs.channels]
        + ["std_mask", "ref_to_template", "template_to_ref", "qc_tsv", "fig_brain_mask",
           "fig_registration", "fig_coregistration"]
        + [f"{m}_to_ref" for m in modalities[1:]]
        + (["dwiref", "dwi_to_ref"] if dwi is not None else [])
    )
    for modality, node in combined.items():
        workflow.connect(node, "out_file", inputnode, f"in_{modality}")
    workflow.connect([
        (inputnode, anat_preproc_wf, [(f"in_{m}", f"inputnode.in_{m}") for m in modalities]
         + [("template_t1w", "inputnode.template_t1w"),
            ("template_mask", "inputnode.template_mask"),
            ("template_registration", "inputnode.template_registration")]
        ),
        (anat_preproc_wf, ds_anat_wf, [(f"outputnode.{field}", f"inputnode.{field}")
                                       for field in anat_outputs]),
    ])
    return anat_preproc_wf


def _threshold_metadata(settings: Settings, fpr: float, card: ModelCard | None = None) -> dict:
    """How the anomaly mask was thresholded (sidecar fields)."""
    if settings.postprocessing.fdr:
        return {"ThresholdMethod": "Benjamini-Hochberg",
                "FalseDiscoveryRate": settings.postprocessing.fdr}
    tuned = card.extra.get("weak_supervision") if card is not None else None
    if tuned:
        return {"ThresholdMethod": "tuned on annotated subjects",
                "TuningObjective": tuned.get("objective"),
                "CrossValidatedObjective": tuned.get("cv_objective"),
                "AnnotatedParticipants": tuned.get("annotated_participants"),
                "FalsePositiveRate": fpr}
    return {"ThresholdMethod": "false-positive rate", "FalsePositiveRateTarget": fpr}


def _postprocessing_inputs(settings: Settings, template: Template,
                           atlas: Atlas | None) -> dict:
    """Inputs of the model stage's post-processing (:class:`_PostprocessingInputSpec`)."""
    options = {"tissue_file": str(template.dseg),
               "min_cluster_mm3": settings.postprocessing.min_cluster_mm3,
               "restrict": settings.postprocessing.restrict}
    if atlas is not None:
        options.update(atlas_file=str(atlas.path),
                       atlas_labels={str(k): v for k, v in atlas.labels.items()})
    return options


def _table_metadata(settings: Settings, atlas: Atlas | None) -> dict:
    """Sidecar fields of the clusters and regions tables: how the mask was post-processed."""
    return {
        "Restriction": RESTRICTIONS[settings.postprocessing.restrict],
        "MinimumClusterVolume": settings.postprocessing.min_cluster_mm3,
        "Atlas": str(atlas.source) if atlas is not None else None,
    }


def _connect_outputs(workflow: pe.Workflow, source, prefix: str, score: pe.Node,
                     ds_wf: pe.Workflow, inputs: bids.AnatInputs) -> None:
    """Sink the model stage's maps and tables, and their copies on the raw reference's grid."""
    reference = str(inputs.images[inputs.reference])
    native_map = pe.Node(ApplyTransforms(reference_file=reference, interpolation="linear"),
                         name=f"{score.name}_native_map", mem_gb=1.0)
    native_mask = pe.Node(ApplyTransforms(reference_file=reference,
                                          interpolation="genericLabel", binarize=True),
                          name=f"{score.name}_native_mask", mem_gb=1.0)
    workflow.connect([
        (source, native_map, [(f"{prefix}template_to_ref", "transforms")]),
        (source, native_mask, [(f"{prefix}template_to_ref", "transforms")]),
        (score, native_map, [("anomaly_map", "in_file")]),
        (score, native_mask, [("anomaly_mask", "in_file")]),
        (score, ds_wf, [("anomaly_map", "inputnode.anomaly_map"),
                        ("anomaly_mask", "inputnode.anomaly_mask"),
                        ("clusters", "inputnode.clusters"),
                        ("regions", "inputnode.regions")]),
        (native_map, ds_wf, [("out_file", "inputnode.native_map")]),
        (native_mask, ds_wf, [("out_file", "inputnode.native_mask")]),
    ])


def _connect_trained_model(workflow: pe.Workflow, source, prefix: str,
                           settings: Settings, inputs: bids.AnatInputs, template: Template,
                           model: tuple[Path, ModelCard], use_gpu: bool,
                           atlas: Atlas | None = None, suffix: str = "",
                           covariates: dict[str, str] | None = None) -> None:
    """Score the preprocessed channels with a trained model and write the maps.

    ``source`` gives the preprocessed images as fields ``<prefix>preproc_<modality>``,
    ``<prefix>std_mask`` and ``<prefix>template_to_ref``; ``suffix`` ends the names of this
    model's nodes. ``covariates``: the participant's values for a model whose norms depend on
    them; its z-score and centile maps per channel and its regional norms are written too.
    """
    model_dir, card = model
    channels = pe.Node(niu.Merge(len(card.channels)), name=f"model_channels{suffix}",
                       run_without_submitting=True)
    for index, channel in enumerate(card.channels, start=1):
        workflow.connect(source, f"{prefix}preproc_{channel}", channels, f"in{index}")
    score = pe.Node(
        ScoreAnomaly(model_dir=str(model_dir), model_checksum=card.checksum,
                     card_checksum=card_checksum(model_dir),
                     fdr=settings.postprocessing.fdr or 0.0,
                     device="cuda" if use_gpu else "cpu",
                     covariates=covariates or {}, extrapolate=settings.model.extrapolate,
                     **_postprocessing_inputs(settings, template, atlas)),
        name=f"score_anomaly{suffix}", mem_gb=2.0,
    )
    metadata = {
        "Model": card.name, "ModelType": card.model_type, "ModelChannels": card.channels,
        "ModelVersion": card.version, "ModelChecksum": card.checksum,
        "ScoreDefinition": card.score_definition,
        **_threshold_metadata(settings, card.fpr, card),
    }
    if not settings.postprocessing.fdr:
        metadata["Threshold"] = card.threshold
    per_channel = issubclass(REGISTRY[card.model_type], ChannelScorer)
    probsegs = _posterior_labels(card.model_type)
    microbleeds = card.extra.get("microbleeds")
    ds_anomaly_wf = init_ds_anomaly_wf(inputs, settings.output_dir, template.name,
                                       template.resolution, bids.model_desc(card.name), metadata,
                                       name=f"ds_anomaly_wf{suffix}",
                                       channels=card.channels if per_channel else None,
                                       table_metadata=_table_metadata(settings, atlas),
                                       microbleeds=microbleeds,
                                       norms=card.channels if covariates else None,
                                       probsegs=probsegs)
    workflow.connect([
        (channels, score, [("out", "channel_files")]),
        (source, score, [(f"{prefix}std_mask", "mask_file")]),
    ])
    _connect_outputs(workflow, source, prefix, score, ds_anomaly_wf, inputs)
    if per_channel:
        workflow.connect(score, "channel_maps", ds_anomaly_wf, "inputnode.channel_maps")
    if probsegs:
        workflow.connect(score, "probsegs", ds_anomaly_wf, "inputnode.probsegs")
    if covariates:
        workflow.connect([(score, ds_anomaly_wf, [("z_maps", "inputnode.z_maps"),
                                                  ("centile_maps", "inputnode.centile_maps"),
                                                  ("norms", "inputnode.norms")])])
    if microbleeds:
        _connect_microbleeds(workflow, source, prefix, score, ds_anomaly_wf, inputs, template,
                             microbleeds, suffix)


def _connect_microbleeds(workflow: pe.Workflow, source, prefix: str, score: pe.Node,
                         ds_wf: pe.Workflow, inputs: bids.AnatInputs, template: Template,
                         microbleeds: dict, suffix: str = "") -> None:
    """Microbleed candidates of a model trained with ``--microbleeds``, and their sinks."""
    from bids_anomaly.interfaces.microbleeds import DetectMicrobleeds

    detect = pe.Node(DetectMicrobleeds(threshold=microbleeds["threshold"],
                                       regions_brain=str(template.dseg)),
                     name=f"detect_microbleeds{suffix}", mem_gb=1.0)
    native = pe.Node(ApplyTransforms(reference_file=str(inputs.images[inputs.reference]),
                                     interpolation="genericLabel"),
                     name=f"detect_microbleeds{suffix}_native_mask", mem_gb=1.0)
    workflow.connect([
        (source, detect, [(f"{prefix}preproc_{microbleeds['channel']}", "channel_file"),
                          (f"{prefix}std_mask", "mask_file"),
                          (f"{prefix}ref_to_template", "ref_to_template")]),
        (score, detect, [("anomaly_map", "anomaly_map")]),
        (source, native, [(f"{prefix}template_to_ref", "transforms")]),
        (detect, native, [("candidate_mask", "in_file")]),
        (detect, ds_wf, [("candidates", "inputnode.microbleeds"),
                         ("candidate_mask", "inputnode.microbleed_mask")]),
        (native, ds_wf, [("out_file", "inputnode.native_microbleed_mask")]),
    ])


def _connect_single_subject(workflow: pe.Workflow, source, prefix: str,
                            settings: Settings, inputs: bids.AnatInputs, template: Template,
                            modalities: list[str], use_gpu: bool,
                            atlas: Atlas | None = None) -> None:
    """Fit a ``--single-subject`` model on the subject's own channels, score, write the maps.

    ``modalities``: the channels it fits on (:func:`single_subject_channels`).
    """
    model_type = settings.model.single_subject
    model = build_model(settings, single_subject=True)
    channels = pe.Node(niu.Merge(len(modalities)), name="subject_channels",
                       run_without_submitting=True)
    for index, channel in enumerate(modalities, start=1):
        workflow.connect(source, f"{prefix}preproc_{channel}", channels, f"in{index}")
    fit = pe.Node(
        FitSubjectModel(model_type=model_type, hyperparameters=model.hyperparameters,
                        regions_file=str(template.dseg),
                        tissue_files=[str(template.probseg[t]) for t in ("GM", "WM", "CSF")],
                        channel_names=list(modalities), fpr=settings.model.fpr,
                        fdr=settings.postprocessing.fdr or 0.0,
                        device="cuda" if use_gpu else "cpu",
                        **_postprocessing_inputs(settings, template, atlas)),
        name="fit_subject_model", mem_gb=2.0, n_procs=settings.execution.threads,
    )
    name = f"{model_type}-single"
    metadata = {
        "Model": name, "ModelType": model_type, "ModelChannels": modalities,
        "ScoreDefinition": model.score_definition
        + "; the model is fitted on this subject's own brain",
        "Calibration": "simulated: healthy scores drawn from the model fitted on this subject "
                       "(no healthy controls)",
        **_threshold_metadata(settings, settings.model.fpr),
    }
    probsegs = _posterior_labels(model_type)
    ds_single_wf = init_ds_anomaly_wf(inputs, settings.output_dir, template.name,
                                      template.resolution, bids.model_desc(name), metadata,
                                      name="ds_single_subject_wf",
                                      table_metadata=_table_metadata(settings, atlas),
                                      probsegs=probsegs)
    workflow.connect([
        (channels, fit, [("out", "channel_files")]),
        (source, fit, [(f"{prefix}std_mask", "mask_file")]),
    ])
    _connect_outputs(workflow, source, prefix, fit, ds_single_wf, inputs)
    if probsegs:
        workflow.connect(fit, "probsegs", ds_single_wf, "inputnode.probsegs")


def _posterior_labels(model_type: str) -> tuple[str, ...] | None:
    """The posterior maps a family writes (a tissue-segmenting model), else None."""
    family = REGISTRY[model_type]
    if issubclass(family, TissueSegmenter):
        return tuple(family.posterior_labels)
    return None
