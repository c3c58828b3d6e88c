"""The participant level: preprocess the selected subjects/sessions, score them with a model."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib

from bids_anomaly import bids
from bids_anomaly.config import Settings
from bids_anomaly.errors import BadDataError, MissingInputError, UsageError
from bids_anomaly.imaging.template import Template
from bids_anomaly.levels.steps import (
    collect_subjects,
    index_dataset,
    prepare,
    preprocess,
    validate_images,
)
from bids_anomaly.levels.weak import apply_tuned_postprocessing
from bids_anomaly.models.contract import AnomalyModel, needs_covariates
from bids_anomaly.models.store import ModelCard, check_weights, load_model, read_card

LOGGER = logging.getLogger(__name__)


def resolve_model(settings: Settings, template: Template | None = None
                  ) -> tuple[Path, ModelCard, AnomalyModel]:
    """Find ``--model`` as a directory or as a name under ``OUTPUT_DIR/models``, and check it.

    The whole model is loaded once here, before any work: a damaged or edited card, weights
    that do not match the card's checksum or channels, or weights fitted on another template
    grid stop the run with exit 65 even when every later step would come from the cache. A card
    made for another template, resolution or preprocessing than ``template`` and the settings'
    says so first. The loaded model is returned too (for the checks that need more than its
    card).
    """
    name = settings.model.model[0]
    candidate = Path(name)
    if not candidate.is_dir() and _names_a_folder(name):
        raise MissingInputError(f"--model {name}: no such model directory")
    if not candidate.is_dir():
        candidate = bids.model_dir(settings.output_dir, name)
    if not candidate.is_dir():
        available = bids.model_names(settings.output_dir)
        raise MissingInputError(
            f"--model {name}: no such model directory nor model name (models in "
            f"{bids.models_dir(settings.output_dir)}: {', '.join(available) or 'none'})"
        )
    if template is not None:
        read_card(candidate).check_space(template.name, template.resolution,
                                         settings.preprocessing.recorded())
    model, card = load_model(candidate)
    grid = None
    if template is not None and (card.template, card.resolution) == (template.name,
                                                                       template.resolution):
        grid = nib.load(template.brain_mask).shape
    check_weights(model, card, grid)
    return candidate.resolve(), card, model


def _names_a_folder(name: str) -> bool:
    """Whether ``--model`` is written as a path (``/models/x``, ``models/x``), not a name.

    A path that climbs (``../x``) is taken for a name, and refused as one: a name never leaves
    ``OUTPUT_DIR/models``.
    """
    path = Path(name)
    return (path.is_absolute() or len(path.parts) > 1) and ".." not in path.parts


def split_compatible(subjects: list[bids.AnatInputs], card: ModelCard, strict: bool = False
                     ) -> tuple[list[bids.AnatInputs], list[tuple[bids.AnatInputs, str]]]:
    """The subjects that have a model's channels, and the others with the reason.

    Raises
    ------
    BadDataError
        No subject can be scored, or one cannot and ``strict`` (``--stop-on-first-crash``).
    """
    compatible, skipped = [], []
    for inputs in subjects:
        try:
            card.check_channels(inputs.channels)
        except BadDataError as error:
            if strict:
                raise BadDataError(f"{inputs.name}: {error}") from error
            skipped.append((inputs, str(error)))
        else:
            compatible.append(inputs)
    if not compatible:
        reasons = "; ".join(f"{inputs.name}: {reason}" for inputs, reason in skipped[:3])
        raise BadDataError(f"no selected subject can be scored by model {card.name!r}: "
                           f"{reasons}")
    for inputs, reason in skipped:
        LOGGER.warning("%s: not scored: %s", inputs.name, reason)
    return compatible, skipped


def participant_covariates(settings: Settings, model: AnomalyModel, card: ModelCard,
                           subjects: list[bids.AnatInputs]) -> dict[str, dict[str, str]] | None:
    """Each scored participant's covariates, for a model whose norms depend on them.

    Every participant is checked before any work: a missing row or value, an impossible
    value, an unknown site, or an age outside the training range (unless ``--extrapolate``)
    stops the run (exit 65) naming the participant and the column.

    Returns
    -------
    dict or None
        The values of the columns the model needs (and ``participant_id``) by participant
        label; None for a model without covariates.
    """
    import pandas as pd

    from bids_anomaly.models.normative.covariates import CovariateError

    if not needs_covariates(model):
        return None
    needed = model.norms.encoder.needed
    rows = bids.participant_rows(settings.bids_dir)
    values = {}
    for label in sorted({inputs.subject for inputs in subjects}):
        row = rows.get(label)
        if row is None:
            raise CovariateError(f"sub-{label}: model {card.name!r} scores against norms of "
                                 f"{', '.join(needed)}, but participants.tsv has no row for it")
        row = {**row, "participant_id": f"sub-{label}"}
        model.norms.design(pd.DataFrame([row]), settings.model.extrapolate)
        values[label] = {column: row[column] for column in ["participant_id", *needed]}
    return values


def models_to_apply(settings: Settings) -> list[str]:
    """``--model`` as the models to apply: each name, or every split of a ``train --splits`` run.

    ``--model NAME`` names the models ``NAME-split01``, ``NAME-split02``, ... when no model
    ``NAME`` exists and those do (see :func:`~bids_anomaly.levels.train.train_splits`). A name
    given twice is applied once.
    """
    names: list[str] = []
    for name in settings.model.model:
        try:
            if Path(name).is_dir() or bids.model_dir(settings.output_dir, name).is_dir():
                found = [name]
            else:
                found = bids.split_models(settings.output_dir, name) or [name]
        except UsageError:  # not a model name: resolve_model says so
            found = [name]
        names += [n for n in found if n not in names]
    return names


def run_participant(settings: Settings
                    ) -> tuple[list[bids.AnatInputs], list[tuple[bids.AnatInputs, str]]]:
    """The participant level: preprocess the selected participants and score them with a model.

    Subjects that the model cannot score (a missing channel) are preprocessed, not scored, and
    returned with the reason; with ``--stop-on-first-crash`` they stop the run before any work.
    Several models (``--model A B``, or the models of a ``train --splits`` run) are all applied
    in one workflow.

    Returns
    -------
    subjects : list of AnatInputs
        The subject/sessions processed.
    skipped : list of (AnatInputs, str)
        Those the model did not score, and why.
    """
    import copy

    from bids_anomaly.workflows.base import AppliedModel

    layout = index_dataset(settings)
    labels = bids.select_participants(layout, settings.inputs.participant_label,
                                      settings.bids_dir)
    subjects = collect_subjects(settings, layout, labels)
    validate_images(subjects, bids.validated_inputs_path(settings.work_dir))
    layout, template = prepare(settings, layout)
    names = models_to_apply(settings)
    applied, skipped = [], []
    for name in names:  # every model is checked before any work
        model_settings = copy.deepcopy(settings)
        model_settings.model.model = [name]
        directory, card, model = resolve_model(model_settings, template)
        apply_tuned_postprocessing(model_settings, card)
        scored, left_out = split_compatible(subjects, card,
                                            settings.execution.stop_on_first_crash)
        skipped += [(inputs, f"model {name}: {reason}" if len(names) > 1 else reason)
                    for inputs, reason in left_out]
        applied.append(AppliedModel(directory, card, model_settings,
                                    frozenset(s.name for s in scored),
                                    participant_covariates(settings, model, card, scored)))
    if len(names) > 1:
        LOGGER.info("--model %s: applying %d models in one run",
                    " ".join(settings.model.model), len(names))
    # one model: its settings are the run's (its tuned post-processing included)
    preprocess(applied[0].settings if len(applied) == 1 else settings, subjects, template,
               applied)
    if settings.model.longitudinal:
        measure_change(settings, subjects, template)
    return subjects, skipped


def measure_change(settings: Settings, subjects: list[bids.AnatInputs], template: Template
                   ) -> list[str]:
    """``--longitudinal``: the lesion change of every subject with two sessions or more.

    One Nipype workflow (cached in the work directory: a killed run resumes) for all of them;
    their pages are written again with the change sections. A subject with one session gets a
    one-line note (its sessions were scored cross-sectionally).

    Returns
    -------
    list of str
        The subjects whose change was measured.
    """
    from nipype.pipeline import engine as pe

    from bids_anomaly.levels.steps import configure_nipype, run_workflow
    from bids_anomaly.reports.subject import write_subject_reports
    from bids_anomaly.workflows.base import workflow_name
    from bids_anomaly.workflows.longitudinal import init_longitudinal_wf, subject_sessions

    chosen, notes = subject_sessions(subjects)
    for note in notes:
        LOGGER.warning("--longitudinal: %s", note)
    if not chosen:
        return []
    configure_nipype(settings)
    workflow = pe.Workflow(name=f"{workflow_name()}_longitudinal",
                           base_dir=str(settings.work_dir))
    workflow.add_nodes([init_longitudinal_wf(settings, subject, sessions, template)
                        for subject, sessions in chosen.items()])
    LOGGER.info("lesion change of %d subject(s): %s", len(chosen),
                ", ".join(f"sub-{s}" for s in chosen))
    run_workflow(workflow, settings)
    write_subject_reports(settings.output_dir,
                          [i for i in subjects if i.subject in chosen], template.name,
                          settings.postprocessing.report_modality)
    return list(chosen)
