"""The train level: preprocess the selected participants, fit, calibrate, save."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bids_anomaly import bids
from bids_anomaly.config import MODALITIES, Settings
from bids_anomaly.device import resolve_device
from bids_anomaly.errors import MissingInputError
from bids_anomaly.models.base import REGISTRY, ModelCard, SubjectImages, TrainingData, save_model
from bids_anomaly.participant import collect_subjects, prepare, preprocess
from bids_anomaly.postprocessing.thresholds import calibrate_threshold
from bids_anomaly.template import Template

LOGGER = logging.getLogger(__name__)


def choose_channels(subjects: list[bids.AnatInputs], requested: list[str]) -> list[str]:
    """The requested channels, or every modality all subjects have (in MODALITIES order).

    Raises
    ------
    MissingInputError
        A subject lacks a requested channel, or the subjects share no modality.
    """
    if requested:
        for inputs in subjects:
            missing = [c for c in requested if c not in inputs.images]
            if missing:
                raise MissingInputError(f"{inputs.name} has no {', '.join(missing)} image; drop "
                                        "it from the selection or from --channels")
        return [m for m in MODALITIES if m in requested]
    common = [m for m in MODALITIES if all(m in inputs.images for inputs in subjects)]
    if not common:
        raise MissingInputError("the training subjects share no modality; use --channels and "
                                "select subjects that have them")
    return common


def training_data(settings: Settings, subjects: list[bids.AnatInputs], channels: list[str],
                  template: Template) -> TrainingData:
    """Preprocessed images of the subjects, named as the participant level wrote them."""
    images = []
    for inputs in subjects:
        paths = [bids.spec_path(settings.output_dir, inputs.subject, inputs.session,
                                bids.preproc_spec(template.name, template.resolution, c))
                 for c in channels]
        mask = bids.spec_path(settings.output_dir, inputs.subject, inputs.session,
                              bids.brain_mask_spec(template.name, template.resolution))
        images.append(SubjectImages(inputs.name, paths, mask))
    return TrainingData(images, channels, resolve_device(settings.device))


def build_model(settings: Settings):
    """A new, unfitted model of ``settings.model_type``."""
    cls = REGISTRY[settings.model_type]
    if settings.model_type == "gmm":
        return cls(n_components=settings.n_components, random_seed=settings.random_seed)
    return cls()


def fit_and_save(settings: Settings, data: TrainingData, template: Template,
                 preprocessing: dict) -> Path:
    """Fit on part of ``data``, calibrate the threshold on the rest, write the model directory.

    Returns
    -------
    Path
        The model directory.
    """
    torch.manual_seed(settings.random_seed)
    fit_data, calibration_data = data.split(settings.calibration_fraction, settings.random_seed)
    LOGGER.info("fitting %s on %d subjects, calibrating on %d held-out subjects",
                settings.model_type, len(fit_data), len(calibration_data))
    model = build_model(settings)
    model.fit(fit_data)
    threshold, n_voxels = calibrate_threshold(model, calibration_data, settings.fpr)
    name = settings.model_name or settings.model_type
    bids.model_desc(name)
    card = ModelCard(
        name=name,
        model_type=settings.model_type,
        channels=list(data.channels),
        template=template.name,
        resolution=template.resolution,
        preprocessing=preprocessing,
        hyperparameters=model.hyperparameters,
        training_participants=fit_data.names,
        calibration_participants=calibration_data.names,
        threshold=threshold,
        fpr=settings.fpr,
        calibration_voxels=n_voxels,
        score_definition=model.score_definition,
    )
    directory = settings.output_dir / "models" / f"model-{name}"
    save_model(model, card, directory)
    LOGGER.info("model written to %s (threshold %.4g at FPR %g)", directory, threshold,
                settings.fpr)
    return directory


def run_train(settings: Settings) -> Path:
    """The train level: select, preprocess what is missing, fit, calibrate and save.

    Returns
    -------
    Path
        The model directory.
    """
    from bids_anomaly.workflows.base import preprocessing_settings

    layout, template = prepare(settings)
    labels = bids.select_participants(layout, settings.participant_label, settings.bids_dir,
                                      settings.train_filter)
    subjects = collect_subjects(settings, layout, labels)
    channels = choose_channels(subjects, settings.channels)
    preprocess(settings, subjects, template)
    data = training_data(settings, subjects, channels, template)
    return fit_and_save(settings, data, template, preprocessing_settings(settings))
