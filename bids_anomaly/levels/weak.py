"""Weak supervision at the train level: who is healthy, and the post-processing tuned on labels.

With ``--annotations``, the selected participants without an annotation are the controls. A
label-free family is fitted and calibrated on them as usual; with fewer than three controls,
the annotated subjects outside their lesions (their healthy masks) stand in for them, which the
model card says (``weak_supervision.healthy_voxels``). A supervised family (``stacked``), or
one that learns from annotations when given (``segment``: the annotated lesions join the
synthetic anomalies), is fitted on the controls and the annotated subjects together. Then the
threshold, minimum cluster size and restriction are tuned on the annotated subjects' maps
(out-of-fold maps for a supervised family, which saw those subjects; not at all for a network
that learnt from every annotated subject), with a leave-one-subject-out estimate
(:mod:`bids_anomaly.postprocessing.tuning`), and stored in the card: the participant level
applies them unless ``--min-cluster-size`` or ``--restrict`` are given.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bids_anomaly.config import Settings
from bids_anomaly.imaging.template import Template
from bids_anomaly.models.contract import BaseModel, scorer_for
from bids_anomaly.models.data import TrainingData
from bids_anomaly.models.store import ModelCard
from bids_anomaly.postprocessing.tuning import tune_postprocessing

LOGGER = logging.getLogger(__name__)

MIN_CONTROLS = 3
"""Fewer controls than this: the annotated subjects outside their lesions are healthy too."""

SUPERVISED_THRESHOLD = 0.5
"""Threshold of a supervised family's lesion probability when nothing can be tuned (k = 1)."""


def split_annotated(model: BaseModel, data: TrainingData,
                    annotations: dict[str, tuple[Path, Path]], fraction: float, seed: int
                    ) -> tuple[TrainingData, TrainingData, str]:
    """Fitting and calibration data when some subjects are annotated.

    Returns
    -------
    fit, calibration : TrainingData
    healthy_source : str
        Where the healthy voxels came from, for the model card.
    """
    controls = [i for i, s in enumerate(data.subjects) if s.name not in annotations]
    annotated = [i for i, s in enumerate(data.subjects) if s.name in annotations]
    lesions = [dataclasses.replace(data.subjects[i], lesion=annotations[data.subjects[i].name][0])
               for i in annotated]
    healthy_masks = [dataclasses.replace(data.subjects[i],
                                         mask=annotations[data.subjects[i].name][1])
                     for i in annotated]
    if len(controls) >= MIN_CONTROLS:
        healthy = data.subset(controls)
        source = f"{len(controls)} controls (the participants without an annotation)"
    else:
        healthy = dataclasses.replace(data, subjects=[data.subjects[i] for i in controls]
                                      + healthy_masks)
        source = (f"the {len(annotated)} annotated subjects outside their lesions (one voxel "
                  f"around them left out)"
                  + (f" and {len(controls)} control(s)" if controls else "")
                  + f": fewer than {MIN_CONTROLS} controls were selected")
    if model.calibration_only:
        fit = calibration = healthy
    elif model.supervised or model.learns_from_annotations:
        if len(controls) >= MIN_CONTROLS:
            fit_controls, calibration = healthy.split(fraction, seed)
        else:
            fit_controls, calibration = data.subset(controls), healthy
        fit = dataclasses.replace(data, subjects=fit_controls.subjects + lesions)
    else:
        fit, calibration = healthy.split(fraction, seed)
    return fit, calibration, source


def _fpr_at(calibration: np.ndarray, threshold: float) -> float:
    """The healthy voxels' false-positive rate at ``threshold``, kept inside (0, 1)."""
    n = calibration.size
    rate = float((calibration > threshold).mean())
    return min(max(rate, 1.0 / (n + 1)), n / (n + 1))


def tune_on_annotations(card: ModelCard, model: BaseModel, fit: TrainingData,
                        data: TrainingData, annotations: dict[str, tuple[Path, Path]],
                        template: Template, calibration: np.ndarray, settings: Settings,
                        healthy_source: str) -> None:
    """Tune the post-processing on the annotated subjects and write it into ``card``.

    ``card.threshold`` and ``card.fpr`` become the tuned threshold and its false-positive rate
    on the healthy calibration voxels; ``extra["postprocessing"]`` holds the minimum cluster
    size and restriction the participant level applies; ``extra["weak_supervision"]`` what was
    tuned, on whom, and the cross-validated estimate next to the label-free post-processing.
    """
    annotated = [s for s in data.subjects if s.name in annotations]
    objective = settings.model.tune_objective
    label_free = {"threshold": card.threshold, "fpr": card.fpr}
    report = {"annotations": str(settings.model.annotations),
              "annotated_participants": [s.name for s in annotated],
              "healthy_voxels": healthy_source, "objective": objective}
    maps = None
    if model.supervised and len(annotated) >= 2:
        maps = model.out_of_fold_scores(fit)
        report["tuned_on"] = ("out-of-fold maps: each annotated subject scored by the "
                              "classifier fitted without it")
    elif model.supervised:
        report["tuned_on"] = (f"nothing: one annotated subject, so no map the classifier did "
                              f"not learn from; threshold {SUPERVISED_THRESHOLD} on the lesion "
                              "probability, no minimum cluster size, the whole brain")
        card.threshold = SUPERVISED_THRESHOLD
    elif model.learns_from_annotations:
        report["tuned_on"] = ("nothing: the network learnt from every annotated subject, whose "
                              "maps would tune an optimistic threshold; the threshold is the "
                              "label-free one, calibrated on healthy voxels")
    else:
        maps = {}
        with torch.no_grad():
            for subject in annotated:
                image, mask = subject.load("cpu")
                maps[subject.name] = scorer_for(model, subject).score(image, mask).cpu().numpy()
        report["tuned_on"] = "the model's maps of the annotated subjects"
    postprocessing = {"min_cluster_mm3": 0.0, "restrict": "brain"}
    if maps is not None:
        tissue = np.asarray(nib.load(template.dseg).dataobj).astype(np.int64)
        first = nib.load(annotated[0].mask)
        voxel_volume = float(np.prod(first.header.get_zooms()[:3]))
        triples = {}
        for subject in annotated:
            lesion = np.asarray(nib.load(annotations[subject.name][0]).dataobj) > 0
            brain = np.asarray(nib.load(subject.mask).dataobj) > 0
            triples[subject.name] = (maps[subject.name], lesion, brain)
        result = tune_postprocessing(triples, tissue, voxel_volume, objective,
                                     label_free_threshold=card.threshold)
        card.threshold = result.threshold
        postprocessing = {"min_cluster_mm3": result.min_cluster_mm3,
                          "restrict": result.restrict}
        report.update(result.as_dict())
        estimate = ("n/a (one annotated subject)" if result.cv_objective is None
                    else f"{result.cv_objective:.3f}")
        LOGGER.info("post-processing tuned on %d annotated subject(s): threshold %.4g, minimum "
                    "cluster %g mm3, %s; %s %.3f on them, leave-one-out estimate %s "
                    "(label-free: %.3f)", len(annotated), result.threshold,
                    result.min_cluster_mm3, result.restrict, objective,
                    result.training_objective, estimate,
                    result.label_free.get(objective, float("nan")))
    card.fpr = _fpr_at(calibration, card.threshold)
    report["label_free"] = {**report.get("label_free", {}), **label_free}
    card.training_participants = list(dict.fromkeys(
        [*card.training_participants, *report["annotated_participants"]]))
    card.extra["postprocessing"] = postprocessing
    card.extra["weak_supervision"] = report


def apply_tuned_postprocessing(settings: Settings, card: ModelCard) -> None:
    """Use the model's tuned minimum cluster size and restriction unless the user gave theirs.

    Raises
    ------
    BadDataError
        The card's values are not a volume and a known restriction.
    """
    from bids_anomaly.config import RESTRICTIONS
    from bids_anomaly.errors import BadDataError

    tuned = card.extra.get("postprocessing")
    if not tuned:
        return
    volume, restrict = tuned.get("min_cluster_mm3"), tuned.get("restrict")
    if (not isinstance(volume, (int, float)) or isinstance(volume, bool)
            or not np.isfinite(volume) or volume < 0 or restrict not in RESTRICTIONS):
        raise BadDataError(f"model {card.name!r}: its tuned post-processing {tuned!r} is not a "
                           "minimum cluster volume and a restriction")
    given = settings.postprocessing.given()
    if "--min-cluster-size" not in given:
        settings.postprocessing.min_cluster_mm3 = float(volume)
    if "--restrict" not in given:
        settings.postprocessing.restrict = restrict
    LOGGER.info("model %s: post-processing tuned on annotations: minimum cluster %g mm3, %s%s",
                card.name, settings.postprocessing.min_cluster_mm3,
                settings.postprocessing.restrict,
                " (given on the command line)" if {"--min-cluster-size", "--restrict"} & set(
                    given) else "")
