"""Group evaluation of microbleed candidates against ground truth: per subject and FROC.

Each subject's candidates table (``*_desc-<model>_microbleeds.tsv``, written by the participant
level for models trained with ``--microbleeds``) lists every candidate with its score, its
centre in template and in native (raw reference image) millimetres, and whether it passed the
model's calibrated threshold (``kept``). The ground truth (:func:`~bids_anomaly.evaluation.
ground_truth.find_microbleed_truth`) is in the raw images' world millimetres, so candidates and
truth are matched in native space, with no transform of the truth. Only subjects with a truth
file are evaluated (a file with no microbleed is a subject annotated as free of them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_anomaly import bids
from bids_anomaly.evaluation.detection import (
    detection_metrics,
    froc,
    froc_summary,
    points_from_mask,
    read_points_tsv,
)
from bids_anomaly.evaluation.ground_truth import find_microbleed_truth, first_found

LOGGER = logging.getLogger(__name__)

NATIVE = ("x_native", "y_native", "z_native")
"""Columns of a candidate's centre in native (raw reference image) world millimetres."""


def read_truth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Microbleed centres and radii (world mm) from a points table or a mask."""
    if Path(path).name.endswith(".tsv"):
        return read_points_tsv(path)
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    return points_from_mask(np.rint(data).astype(np.int64), img.affine)


def evaluate_microbleeds(tables: list[Path], ground_truth: list[Path], tolerance_mm: float = 1.0
                         ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """Lesion-wise metrics per subject, the FROC curve and its summary.

    Parameters
    ----------
    tables : list of Path
        One model's candidates tables, one per subject/session.
    ground_truth : list of Path
        The ``--ground-truth`` folders.
    tolerance_mm : float
        Added to each microbleed's radius when matching (half a 2 mm voxel by default).

    Returns
    -------
    per_subject : pandas.DataFrame
        ``participant_id``, ``session_id``, ``ground_truth`` and the columns of
        :func:`~bids_anomaly.evaluation.detection.detection_metrics` at the calibrated threshold
        (the ``kept`` candidates).
    curve : pandas.DataFrame
        :func:`~bids_anomaly.evaluation.detection.froc` over every candidate of the evaluated
        subjects.
    summary : dict
        :func:`~bids_anomaly.evaluation.detection.froc_summary` (sensitivity at 0.5 to 8 false
        positives per subject, and their mean).
    """
    rows, subjects = [], []
    for path in tables:
        entities = bids.parse_name(path)
        subject, session = entities["sub"], entities.get("ses")
        truth_file = first_found(find_microbleed_truth, ground_truth, subject, session)
        if truth_file is None:
            continue
        truth, radii = read_truth(truth_file)
        candidates = pd.read_csv(path, sep="\t", na_values="n/a")
        points = candidates[list(NATIVE)].to_numpy(np.float64).reshape(-1, 3)
        scores = candidates["score"].to_numpy(np.float64)
        finite = np.isfinite(points).all(axis=1) & np.isfinite(scores)
        points, scores = points[finite], scores[finite]
        kept = candidates["kept"].astype(bool).to_numpy()[finite]
        threshold = float(scores[kept].min()) if kept.any() else float("inf")
        metrics = detection_metrics(points, scores, truth, radii, threshold, tolerance_mm)
        rows.append({"participant_id": f"sub-{subject}", "session_id": session or "n/a",
                     "ground_truth": truth_file.name, **metrics})
        subjects.append((points, scores, truth, radii))
    per_subject = pd.DataFrame(rows)
    if not subjects:
        return per_subject, pd.DataFrame(), {}
    curve = froc(subjects, tolerance_mm)
    return per_subject, curve, froc_summary(curve) if not curve.empty else {}
