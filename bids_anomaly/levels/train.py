"""The train level: preprocess the selected participants, fit, calibrate, save."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from bids_anomaly import __version__, bids
from bids_anomaly.config import CHANNELS, MIN_TRAINING_SUBJECTS, MODALITIES, Settings
from bids_anomaly.errors import BidsAnomalyError, MissingInputError, TrainingError, UsageError
from bids_anomaly.imaging.template import Template
from bids_anomaly.levels.annotations import annotations_in_template, check_annotations
from bids_anomaly.levels.steps import (
    collect_subjects,
    index_dataset,
    prepare,
    preprocess,
    validate_images,
)
from bids_anomaly.levels.weak import split_annotated, tune_on_annotations
from bids_anomaly.models import REGISTRY, build_model
from bids_anomaly.models.contract import needs_covariates
from bids_anomaly.models.data import SubjectImages, TrainingData, fit_channel_scaling
from bids_anomaly.models.deep import distributed
from bids_anomaly.models.store import (
    CARD_FILE,
    ModelCard,
    file_checksum,
    load_model,
    non_finite_tensors,
    save_model,
)
from bids_anomaly.postprocessing.microbleeds import calibrate_microbleeds
from bids_anomaly.postprocessing.thresholds import healthy_scores, tail_table, threshold_at_fpr
from bids_anomaly.runtime.device import resolve_device

LOGGER = logging.getLogger(__name__)


def choose_channels(subjects: list[bids.AnatInputs], requested: list[str]) -> list[str]:
    """The requested channels, or every modality all subjects have (in CHANNELS order).

    Diffusion maps are channels only when asked for: a T1w model stays a T1w model when some
    subjects have dwi runs.

    Raises
    ------
    MissingInputError
        A subject lacks a requested channel, or the subjects share no modality.
    """
    if requested:
        for inputs in subjects:
            missing = [c for c in requested if c not in inputs.channels]
            if missing:
                raise MissingInputError(f"{inputs.name} has no {', '.join(missing)} image; drop "
                                        "it from the selection or from --channels (diffusion "
                                        "maps need dwi runs, or --dwi-derivatives, and "
                                        "--dwi-maps naming them)")
        return [m for m in CHANNELS if m in requested]
    common = [m for m in MODALITIES if all(m in inputs.images for inputs in subjects)]
    if not common:
        raise MissingInputError("the training subjects share no modality; use --channels and "
                                "select subjects that have them")
    return common


def check_training_size(subjects: list[bids.AnatInputs]) -> None:
    """Refuse, before any work, a selection too small to fit a model and calibrate it.

    Raises
    ------
    UsageError
        Fewer than :data:`~bids_anomaly.config.MIN_TRAINING_SUBJECTS` subject/sessions.
    """
    if len(subjects) < MIN_TRAINING_SUBJECTS:
        raise UsageError(
            f"train needs at least {MIN_TRAINING_SUBJECTS} subject/sessions ("
            f"{MIN_TRAINING_SUBJECTS - 1} to fit the model, 1 to calibrate its threshold); the "
            f"selection has {len(subjects)} ({', '.join(s.name for s in subjects)}): select "
            "more with --participant-label or --train-filter")


def training_data(settings: Settings, subjects: list[bids.AnatInputs], channels: list[str],
                  template: Template, device: torch.device | None = None) -> TrainingData:
    """Preprocessed images of the subjects, named as the participant level wrote them.

    Each subject carries its participants.tsv row (``covariates``; None without a row or a
    participants.tsv), for the models whose norms depend on covariates.
    """
    rows = bids.participant_rows(settings.bids_dir)
    images = []
    for inputs in subjects:
        paths = [bids.spec_path(settings.output_dir, inputs.subject, inputs.session,
                                bids.preproc_spec(template.name, template.resolution, c))
                 for c in channels]
        mask = bids.spec_path(settings.output_dir, inputs.subject, inputs.session,
                              bids.brain_mask_spec(template.name, template.resolution))
        images.append(SubjectImages(inputs.name, paths, mask,
                                    covariates=rows.get(inputs.subject)))
    return TrainingData(images, channels, device or resolve_device(settings.execution.device),
                        template.dseg, [template.probseg[t] for t in ("GM", "WM", "CSF")])


def training_key(settings: Settings, data: TrainingData, template: Template,
                 preprocessing: dict, hyperparameters: dict,
                 annotations: dict[str, tuple[Path, Path]] | None = None,
                 extra: dict | None = None) -> str:
    """A digest of everything a trained model depends on: the data's bytes and the settings.

    A model directory whose card records the same key is up to date: training it again would
    give the same model, so the train level keeps it.
    """
    digest = hashlib.sha256()
    major_minor = ".".join(__version__.split(".")[:2])
    digest.update(json.dumps({
        "version": major_minor, "model_type": settings.model.model_type,
        "hyperparameters": hyperparameters, "channels": list(data.channels),
        "fpr": settings.model.fpr, "calibration_fraction": settings.model.calibration_fraction,
        "seed": settings.execution.random_seed,
        "template": [template.name, template.resolution],
        "preprocessing": preprocessing, "subjects": data.names,
        "annotated": sorted(annotations or {}), "tune_objective": settings.model.tune_objective,
        "channel_scaling": settings.model.channel_scaling, "extra": extra or {},
        "microbleeds": [settings.model.microbleeds, settings.model.fp_per_subject],
    }, sort_keys=True, default=str).encode())
    for name in sorted(annotations or {}):
        digest.update(file_checksum(annotations[name][0]).encode())
    for subject in data.subjects:
        for path in [*subject.channels, subject.mask]:
            digest.update(file_checksum(Path(path)).encode())
    return digest.hexdigest()


def up_to_date(directory: Path, key: str) -> bool:
    """Whether ``directory`` holds a sound model trained with this :func:`training_key`."""
    if not (directory / CARD_FILE).is_file():
        return False
    try:
        _, card = load_model(directory)
    except BidsAnomalyError as error:
        LOGGER.warning("%s cannot be reused (%s): training again", directory, error)
        return False
    return card.extra.get("training_key") == key


def check_fitted(model, calibration: np.ndarray, name: str) -> None:
    """Refuse to save a model whose fit diverged: NaN or infinite parameters or scores.

    Raises
    ------
    TrainingError
        Naming the model and what is not finite; nothing is written.
    """
    broken = non_finite_tensors(model.tensors())
    if broken:
        raise TrainingError(
            f"model {name}: training diverged, its fitted parameters hold NaN or infinite "
            f"values ({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}); nothing was "
            "saved: check the training images, or lower --learning-rate of a deep model")
    bad = int((~np.isfinite(calibration)).sum())
    if bad:
        raise TrainingError(
            f"model {name}: training diverged, it scores {bad} of the {calibration.size} "
            "healthy calibration voxels NaN or infinite; nothing was saved: check the training "
            "images, or lower --learning-rate of a deep model")


def fit_and_save(settings: Settings, data: TrainingData, template: Template,
                 preprocessing: dict,
                 annotations: dict[str, tuple[Path, Path]] | None = None,
                 extra: dict | None = None) -> Path:
    """Fit on part of ``data``, calibrate the threshold on the rest, write the model directory.

    A model already trained on the same data with the same settings is kept as it is. With
    ``annotations`` (lesion and healthy masks by subject name, see
    :func:`~bids_anomaly.levels.annotations.annotations_in_template`), the annotated subjects
    are not controls: see :func:`split_annotated`, and the post-processing is tuned on them
    (:func:`~bids_anomaly.levels.weak.tune_on_annotations`). ``extra`` is recorded in the
    card (``extra``) and in the training key.

    Returns
    -------
    Path
        The model directory.
    """
    name = settings.model.model_name or settings.model.model_type
    directory = bids.model_dir(settings.output_dir, name)
    model = build_model(settings)
    key = training_key(settings, data, template, preprocessing, model.hyperparameters,
                       annotations, extra)
    if up_to_date(directory, key):
        LOGGER.info("model %s is up to date (same data and settings): kept", directory)
        return directory
    seed = settings.execution.random_seed
    torch.manual_seed(seed)
    healthy_source = "controls"
    if annotations:
        fit_data, calibration_data, healthy_source = split_annotated(
            model, data, annotations, settings.model.calibration_fraction, seed)
    elif model.calibration_only:  # nothing is learnt from the data: calibrate on all of it
        fit_data = calibration_data = data
    else:
        fit_data, calibration_data = data.split(settings.model.calibration_fraction, seed)
    scaling = fit_channel_scaling(fit_data, settings.model.channel_scaling)
    if scaling:
        LOGGER.info("channels scaled by the 1st-99th percentiles of the fitted subjects: %s",
                    ", ".join(f"{c} [{lo:.4g}, {hi:.4g}]" for c, (lo, hi) in scaling.items()))
        fit_data, calibration_data, data = (d.scaled(scaling)
                                            for d in (fit_data, calibration_data, data))
    LOGGER.info("fitting %s on %d subjects, calibrating on %d held-out subjects",
                model.model_type, len(fit_data), len(calibration_data))
    model.fit(fit_data)
    if needs_covariates(model):  # the calibration controls' ages are the model's too
        model.accept(calibration_data)
    if not distributed.is_main():
        return directory  # rank 0 calibrates and writes the model
    calibration = (model.simulated_scores() if model.self_calibrated
                   else healthy_scores(model, calibration_data))
    check_fitted(model, calibration, name)
    threshold = threshold_at_fpr(calibration, settings.model.fpr)
    card = ModelCard(
        name=name,
        model_type=model.model_type,
        channels=list(data.channels),
        template=template.name,
        resolution=template.resolution,
        preprocessing=preprocessing,
        hyperparameters=model.hyperparameters,
        training_participants=fit_data.names,
        calibration_participants=[] if model.self_calibrated else calibration_data.names,
        threshold=threshold,
        fpr=settings.model.fpr,
        calibration_voxels=int(calibration.size),
        score_definition=model.score_definition,
        extra={"calibration_tail": tail_table(calibration), "fit": model.fit_report,
               "training_key": key, "channel_scaling": scaling, **(extra or {})},
    )
    if annotations:
        tune_on_annotations(card, model, fit_data, data, annotations, template, calibration,
                            settings, healthy_source)
    if settings.model.microbleeds:
        card.extra["microbleeds"] = calibrate_microbleeds(
            model, calibration_data, settings.model.microbleeds, settings.model.fp_per_subject)
        LOGGER.info("microbleeds on %s: candidate score threshold %s for %.2f false positives "
                    "per held-out control", settings.model.microbleeds,
                    card.extra["microbleeds"]["threshold"], settings.model.fp_per_subject)
    save_model(model, card, directory)
    LOGGER.info("model written to %s (threshold %.4g at FPR %.3g)", directory, card.threshold,
                card.fpr)
    return directory


def transfer_and_save(settings: Settings, data: TrainingData, template: Template,
                      source: tuple[Path, ModelCard]) -> Path:
    """Adapt a trained normative model to the new site(s) of ``data`` (``train --transfer``).

    The population norms stay as they are; each new site's random effects (location and
    scale) are estimated from its controls, shrunk as in the original fit. The threshold and
    calibration are the original model's (its z-scores keep their meaning at the new site, which
    is what the transfer is for). The new model is written under ``--model-name`` (default:
    ``<source>-transfer``), never over the source.

    Returns
    -------
    Path
        The model directory.
    """
    import dataclasses

    model_dir, card = source
    model, _ = load_model(model_dir)
    name = settings.model.model_name or f"{card.name}-transfer"
    if name == card.name:
        raise UsageError(f"--transfer {card.name}: give the adapted model another --model-name "
                         "than the model it comes from")
    directory = bids.model_dir(settings.output_dir, name)
    key = training_key(settings, data, template, settings.preprocessing.recorded(),
                       {"transfer": card.checksum})
    if up_to_date(directory, key):
        LOGGER.info("model %s is up to date (same data and settings): kept", directory)
        return directory
    added = model.transfer(data.scaled(card.extra.get("channel_scaling")))
    LOGGER.info("model %s adapted to site(s) %s from %d controls", card.name,
                ", ".join(added), len(data))
    adapted = dataclasses.replace(
        card, name=name, hyperparameters=model.hyperparameters,
        training_participants=[*card.training_participants, *data.names],
        extra={**card.extra, "fit": model.fit_report, "training_key": key,
               "transfer": {"from": card.name, "from_checksum": card.checksum,
                            "sites": added, "controls": data.names}})
    save_model(model, adapted, directory)
    LOGGER.info("model written to %s (threshold %.4g at FPR %.3g, from %s)", directory,
                adapted.threshold, adapted.fpr, card.name)
    return directory


def transfer_source(settings: Settings) -> tuple[Path, ModelCard]:
    """The model ``--transfer`` names, checked to be a normative model with sites.

    Raises
    ------
    UsageError
        It is not a normative model trained with ``--site-column``.
    """
    source = settings.model.transfer
    directory = Path(source) if Path(source).is_dir() else bids.model_dir(settings.output_dir,
                                                                        source)
    model, card = load_model(directory)
    if not getattr(model, "site_column", None):
        raise UsageError(f"--transfer {source}: only a normative model trained with "
                         f"--site-column can be adapted to a new site ({card.name} is a "
                         f"{card.model_type} model without sites)")
    return directory, card


def train_splits(settings: Settings, data: TrainingData, template: Template) -> list[Path]:
    """Train one model per split of the controls (``--splits N``), the rest held out.

    The participants of ``data`` (all controls) are split ``N`` times into training and test
    sets (:func:`~bids_anomaly.evaluation.splits.split_controls`: age/sex-balanced when
    participants.tsv has complete ``age`` and ``sex`` columns); model ``NAME-splitKK`` is
    fitted and calibrated on the training part only, and its card records the split
    (``extra.split``: family, index, training and test controls, strata, balance). The
    preprocessed images are read as they are: nothing is preprocessed again.

    Returns
    -------
    list of Path
        The model directories, in split order.
    """
    import dataclasses

    import pandas as pd

    from bids_anomaly.evaluation.splits import (
        describe_split,
        split_controls,
        split_strata,
    )

    name = settings.model.model_name or settings.model.model_type
    count, test_size = settings.model.splits, settings.model.split_test_size
    labels = sorted({bids.participant_of(s.name) for s in data.subjects})
    table = bids.participants_if_any(settings.bids_dir)
    table = (pd.DataFrame({"label": labels}) if table is None
             else table[table["label"].isin(labels)])
    seed = settings.execution.random_seed
    splits = split_controls(table, count, test_size, seed)
    strata = split_strata(table, None, test_size)
    directories = []
    for index, (train, test) in enumerate(splits, start=1):
        split_name = bids.check_model_name(f"{name}-split{index:02d}")
        LOGGER.info("split %d of %d: %d training controls, %d held out (%s)", index, count,
                    len(train), len(test), ", ".join(test))
        kept = [i for i, s in enumerate(data.subjects)
                if bids.participant_of(s.name) in train]
        split_settings = dataclasses.replace(
            settings, model=dataclasses.replace(settings.model, model_name=split_name))
        record = {"split": {"family": name, "index": index, "splits": count,
                            "train_controls": [f"sub-{x}" for x in train],
                            "test_controls": [f"sub-{x}" for x in test],
                            "strata": strata, "seed": seed,
                            "balance": {key: None if value != value else value  # NaN: none
                                        for key, value in describe_split(table, train,
                                                                         test).items()}}}
        directories.append(fit_and_save(split_settings, data.subset(kept), template,
                                        settings.preprocessing.recorded(), extra=record))
    return directories


def run_train(settings: Settings) -> list[Path]:
    """The train level: select, preprocess what is missing, fit, calibrate and save.

    Returns
    -------
    list of Path
        The model directory (one per split with ``--splits``).
    """
    device = distributed.setup(resolve_device(settings.execution.device))
    try:
        layout = index_dataset(settings)
        labels = bids.select_participants(layout, settings.inputs.participant_label,
                                          settings.bids_dir, settings.model.train_filter)
        model_class = REGISTRY[settings.model.model_type]
        annotations = settings.model.annotations
        if model_class.supervised and annotations is None:
            raise UsageError(f"--model-type {model_class.model_type} learns from annotated "
                             "lesions: give --annotations DERIV_DIR")
        if annotations is not None:
            annotated = check_annotations(annotations, sorted(layout.get_subjects()))
            if not settings.inputs.participant_label:  # annotated patients join the controls
                labels = list(dict.fromkeys([*labels, *annotated]))
        subjects = collect_subjects(settings, layout, labels)
        source = transfer_source(settings) if settings.model.transfer else None
        channels = choose_channels(subjects, source[1].channels if source
                                   else settings.model.channels)
        if source is None and annotations is None and not model_class.calibration_only:
            check_training_size(subjects)
        if settings.model.microbleeds and settings.model.microbleeds not in channels:
            raise MissingInputError(f"--microbleeds {settings.model.microbleeds}: not among the "
                                    f"model's channels ({', '.join(channels)}); add it to "
                                    "--channels, or select subjects that have it")
        model = build_model(settings) if source is None else None
        if needs_covariates(model):  # refused before any work
            rows = bids.participant_rows(settings.bids_dir)
            model.check_covariates([rows.get(s.subject) for s in subjects],
                                   [s.name for s in subjects])
        validate_images(subjects, bids.validated_inputs_path(settings.work_dir))
        layout, template = prepare(settings, layout)
        if distributed.is_main():
            preprocess(settings, subjects, template)
        distributed.barrier()  # the other ranks wait for the preprocessed images
        carried = (annotations_in_template(settings, subjects, template)
                   if annotations is not None else None)
        data = training_data(settings, subjects, channels, template, device)
        if source is not None:
            source[1].check_space(template.name, template.resolution,
                                  settings.preprocessing.recorded())
            return [transfer_and_save(settings, data, template, source)]
        if settings.model.splits:
            return train_splits(settings, data, template)
        return [fit_and_save(settings, data, template, settings.preprocessing.recorded(),
                             carried)]
    finally:
        distributed.teardown()
