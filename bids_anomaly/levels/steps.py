"""The steps the levels share: indexing, outputs, preprocessing workflows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bids_anomaly import bids
from bids_anomaly.config import Settings
from bids_anomaly.errors import EmptySelectionError, MissingInputError, OutputError
from bids_anomaly.imaging.images import check_anatomical, check_same_grid, load_volume
from bids_anomaly.imaging.template import Template, get_template

if TYPE_CHECKING:
    from bids_anomaly.workflows.base import AppliedModel

LOGGER = logging.getLogger(__name__)


def index_dataset(settings: Settings):
    """Check the input dataset and index it with pybids (nothing is written yet).

    Returns
    -------
    bids.layout.BIDSLayout
    """
    bids.check_bids_dir(settings.bids_dir, settings.inputs.skip_bids_validation)
    return bids.load_layout(settings.bids_dir, bids.layout_index_dir(settings.work_dir),
                            validate=not settings.inputs.skip_bids_validation)


def create_outputs(settings: Settings, layout=None) -> Path:
    """Create the output and work folders, describe the derivatives, record the run's settings.

    Called once the selection is known to be valid: a run that stops earlier (nobody
    selected, a usage error) leaves nothing behind.

    Returns
    -------
    Path
        The run's settings (``OUTPUT_DIR/logs/<time>_<level>/bids_anomaly.toml``), which
        ``--config-file`` reads back.
    """
    try:
        for folder in (settings.output_dir, settings.work_dir, bids.log_dir(settings.output_dir)):
            folder.mkdir(parents=True, exist_ok=True)
        bids.write_dataset_description(settings.output_dir, settings.bids_dir)
        record = settings.write(bids.run_config_path(settings.output_dir, settings.level))
        if layout is not None:
            bids.save_layout(layout, settings.bids_dir, bids.layout_index_dir(settings.work_dir),
                             validate=not settings.inputs.skip_bids_validation)
    except OSError as error:
        raise OutputError(f"cannot write the output or work folder: {error}") from error
    return record


def prepare(settings: Settings, layout=None):
    """Create the outputs (see :func:`create_outputs`) and the template in the work folder.

    Returns
    -------
    layout : bids.layout.BIDSLayout
    template : Template
    """
    layout = layout if layout is not None else index_dataset(settings)
    create_outputs(settings, layout)
    template = get_template(settings.preprocessing.resolution,
                            bids.template_cache_dir(settings.work_dir))
    return layout, template


def collect_subjects(settings: Settings, layout, labels: list[str]) -> list[bids.AnatInputs]:
    """Anatomical inputs of the selected participants; sessions without images are skipped.

    Raises
    ------
    EmptySelectionError
        A ``--session-label`` that none of the selected participants has, or a
        ``--bids-filter-file`` filter that matches none of their images.
    MissingInputError
        No selected subject/session has a usable anatomical image.
    """
    deriv = settings.preprocessing.dwi_derivatives
    if deriv is not None and not deriv.is_dir():
        raise MissingInputError(f"--dwi-derivatives {deriv}: no such folder")
    sessions = settings.inputs.session_label
    if sessions:
        known = sorted(layout.get_sessions(subject=labels))
        unknown = [s for s in sessions if s not in known]
        if unknown:
            raise EmptySelectionError(
                f"--session-label: unknown session label(s) {', '.join(unknown)}; the selected "
                f"participants have {', '.join(known) if known else 'no sessions'}")
    collected = [inputs for label in labels
                 for inputs in bids.collect_anat(layout, label, sessions,
                                                 settings.inputs.bids_filters,
                                                 settings.preprocessing.dwi_params,
                                                 settings.preprocessing.dwi_derivatives)]
    check_filters_matched(settings, collected)
    subjects = []
    for inputs in collected:
        if not inputs.images:
            LOGGER.warning("%s: no anatomical image (T1w, FLAIR, T2w or PDw); skipped",
                           inputs.name)
            continue
        subjects.append(inputs)
    if not subjects:
        raise MissingInputError("none of the selected participants has a usable anatomical image")
    return subjects


def check_filters_matched(settings: Settings, collected: list[bids.AnatInputs]) -> None:
    """Refuse a ``--bids-filter-file`` filter that selected no image of any subject/session.

    Raises
    ------
    EmptySelectionError
        A filter (naming it) matched nothing: a typo in a value would otherwise drop that
        modality, or every subject, without a word.
    """
    fitted_dwi = (settings.preprocessing.dwi_params
                  and settings.preprocessing.dwi_derivatives is None)
    for key, query in settings.inputs.bids_filters.items():
        if key == "dwi":
            matched = not fitted_dwi or any(inputs.dwi for inputs in collected)
        else:
            matched = any(m.lower() == key for inputs in collected for m in inputs.images)
        if not matched:
            entities = ", ".join(f"{k}={v}" for k, v in query.items()) or "no entity"
            raise EmptySelectionError(
                f"--bids-filter-file: the {key} filter ({entities}) matches no image of the "
                "selected participants")


def validate_images(subjects: list[bids.AnatInputs], record: Path) -> None:
    """Read every input image once (corrupt, 4D, bad headers fail here, naming the file).

    Diffusion runs are read with their gradients, as they will be fitted: a missing or
    inconsistent bval/bvec, a 3D dwi, no b = 0 or only b = 0 volumes stop the run here, before
    any work (:func:`~bids_anomaly.imaging.diffusion.load_dwi_runs`).

    Files already checked with the same size and modification time are not read again
    (``record`` lists them; it is written once every file passed, so a refused run writes
    nothing). A file that cannot be opened (missing, a broken or looping symbolic link,
    permission denied) is refused too.
    """
    from bids_anomaly.imaging.diffusion import check_maps, load_dwi_runs

    seen = json.loads(record.read_text()) if record.is_file() else {}

    def signature(paths: list[Path]) -> tuple[str, list]:
        stats = [os.stat(p) if os.path.exists(p) else None for p in paths]
        return "|".join(map(str, paths)), [[s.st_size, s.st_mtime_ns] if s else None
                                           for s in stats]

    for inputs in subjects:
        echoes = [p for paths in inputs.echoes.values() for p in paths[1:]]
        for path in [*inputs.images.values(), *echoes]:
            key, stamp = signature([path])
            if stamp[0] is None or seen.get(key) != stamp[0]:
                check_anatomical(load_volume(path), path)
                seen[key] = stamp[0]
        for paths in inputs.echoes.values():
            check_same_grid(paths, "the echoes of one MEGRE")
        if inputs.dwi_maps:
            maps = {p: inputs.dwi_maps[p] for p in inputs.dwi_params}
            key, stamp = signature(list(inputs.dwi_maps.values()))
            if seen.get(key) != stamp:
                check_maps(maps)
                if "dwiref" in inputs.dwi_maps:
                    load_volume(inputs.dwi_maps["dwiref"])
                seen[key] = stamp
        for runs in bids.group_dwi_runs(inputs.dwi):  # the runs fitted together, with gradients
            key, stamp = signature([f for run in runs for f in (run.image, run.bval, run.bvec)])
            if seen.get(key) != stamp:
                load_dwi_runs([r.image for r in runs], [r.bval for r in runs],
                              [r.bvec for r in runs])
                seen[key] = stamp
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(seen, indent=1))
    except OSError as error:
        raise OutputError(f"cannot write the work folder: {error}") from error


def configure_nipype(settings: Settings) -> None:
    """Set Nipype's execution and logging options; workflows copy them when built.

    The options are also written to ``WORK/nipype/nipype.cfg`` and ``NIPYPE_CONFIG_DIR`` points
    there: the MultiProc workers are fresh processes that read their configuration (log levels
    included) from that file, not from this process.
    """
    import configparser

    from nipype import config
    from nipype import logging as nipype_logging

    log_dir = bids.log_dir(settings.output_dir)
    # pypeline.log keeps which steps ran and which came from the cache; the console shows them
    # only with -v
    level = "DEBUG" if settings.execution.verbose > 1 else "INFO"
    options = {
        "execution": {
            "crashdump_dir": str(log_dir),
            "crashfile_format": "txt",
            "hash_method": "timestamp",
            "stop_on_first_crash": str(settings.execution.stop_on_first_crash),
            "remove_unnecessary_outputs": "false",
            "check_version": "false",
            # the default of 2 s per scheduling loop dominates runs whose steps are cached
            "poll_sleep_duration": "0.01",
        },
        "logging": {"log_directory": str(log_dir), "log_to_file": "true",
                    "workflow_level": level, "interface_level": level, "utils_level": level},
    }
    config_dir = settings.work_dir / "nipype"
    config_dir.mkdir(parents=True, exist_ok=True)
    parser = configparser.ConfigParser()
    parser.read_dict(options)
    with open(config_dir / "nipype.cfg", "w") as handle:
        parser.write(handle)
    os.environ["NIPYPE_CONFIG_DIR"] = str(config_dir)
    config.update_config(options)
    nipype_logging.update_logging(config)


def nipype_console_level(settings: Settings) -> str:
    """The lowest level of Nipype's messages shown on the console (``-v``: INFO)."""
    verbose = settings.execution.verbose
    return "DEBUG" if verbose > 1 else "INFO" if verbose else "WARNING"


def run_workflow(workflow, settings: Settings, progress=None) -> None:
    """Run a Nipype workflow with the settings' resources, caching in the work directory.

    ``progress`` (a :class:`~bids_anomaly.runtime.progress.WorkflowProgress`) receives every node's
    status. See :func:`bids_anomaly.runtime.execution.run_workflow`.
    """
    from bids_anomaly.runtime.execution import run_workflow as execute

    try:
        execute(workflow, settings.execution.nprocs, bids.log_dir(settings.output_dir),
                settings.execution.mem_gb, progress, nipype_console_level(settings))
    finally:
        if progress is not None:
            progress.close()


def prepare_atlas(settings: Settings, template: Template):
    """The user's ``--atlas`` checked and resampled onto the template grid (or None)."""
    from bids_anomaly.postprocessing.regions import load_atlas

    source = settings.postprocessing.atlas
    if source is None:
        return None
    out_file = bids.atlas_cache_path(settings.work_dir, template.name, template.resolution)
    atlas = load_atlas(source, template.brain_mask, out_file)
    LOGGER.info("atlas %s: %d regions", source.name, len(atlas.labels))
    return atlas


def preprocess(settings: Settings, subjects: list[bids.AnatInputs], template: Template,
               models: list[AppliedModel] | None = None) -> None:
    """Build and run the participant workflow (preprocessing, then the models if given).

    Every model is applied to the subject/sessions it scores
    (:class:`~bids_anomaly.workflows.base.AppliedModel`), all in one workflow. Subjects that
    finished the same run before, with their derivatives untouched, are skipped
    (:mod:`bids_anomaly.bids.completion`).
    """
    from bids_anomaly.bids.completion import is_complete, mark_complete
    from bids_anomaly.reports.subject import write_subject_reports
    from bids_anomaly.runtime.device import resolve_device
    from bids_anomaly.runtime.progress import WorkflowProgress
    from bids_anomaly.workflows.base import (
        init_participant_wf,
        preprocessing_key,
        subject_run_key,
        subject_workflow_name,
    )

    models = models or []
    atlas = (prepare_atlas(settings, template)
             if (models or settings.model.single_subject) else None)
    use_gpu = resolve_device(settings.execution.device).type == "cuda"
    keys = {inputs.name: subject_run_key(
        settings, inputs, template, [m for m in models if m.applies_to(inputs)], atlas,
        use_gpu) for inputs in subjects}
    pending = [s for s in subjects if not is_complete(settings.work_dir, s, keys[s.name])]
    done = len(subjects) - len(pending)
    if done:
        LOGGER.info("%d of %d subject/session(s) up to date (same inputs and settings, "
                    "derivatives untouched): skipped", done, len(subjects))
    # subjects whose preprocessing finished go straight to the model stage
    preprocessed = {s.name for s in pending
                    if is_complete(settings.work_dir, s,
                                   preprocessing_key(settings, s, template, use_gpu))}
    if pending:
        configure_nipype(settings)
        workflow = init_participant_wf(settings, pending, template, models, atlas,
                                       preprocessed)
        LOGGER.info("processing %d subject/session(s): %s", len(pending),
                    ", ".join(s.name for s in pending))
        progress = WorkflowProgress(workflow,
                                    {subject_workflow_name(s): s.name for s in pending})
        run_workflow(workflow, settings, progress)
    missing_pages = [s for s in subjects
                     if not bids.subject_report_path(settings.output_dir, s.subject).is_file()]
    write_subject_reports(settings.output_dir, pending + [s for s in missing_pages
                                                          if s not in pending], template.name,
                          settings.postprocessing.report_modality,
                          nprocs=settings.execution.nprocs)
    for inputs in pending:
        mark_complete(settings.work_dir, inputs, keys[inputs.name], settings.output_dir)


