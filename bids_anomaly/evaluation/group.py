"""Group tables of a model's maps: burden, regions, evaluation against truth, statistics."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from bids_anomaly import bids
from bids_anomaly.config import Settings
from bids_anomaly.errors import (
    BidsAnomalyError,
    UsageError,
)
from bids_anomaly.evaluation.ground_truth import (
    find_ground_truth,
    first_found,
    transforms_to_template,
    truth_in_template,
)
from bids_anomaly.evaluation.metrics import voxel_metrics
from bids_anomaly.postprocessing.clusters import CONNECTIVITY

LOGGER = logging.getLogger(__name__)


def anomaly_burden(anomaly_map: np.ndarray, anomaly_mask: np.ndarray, brain_mask: np.ndarray,
                   voxel_volume: float) -> dict[str, float]:
    """Summary of one subject's anomaly map inside its brain.

    Returns
    -------
    dict
        ``brain_ml``, ``abnormal_ml``, ``abnormal_fraction``, ``n_clusters`` (26-connected),
        ``mean_score`` and ``p99_score`` (over brain voxels).
    """
    brain = brain_mask > 0
    flagged = (anomaly_mask > 0) & brain
    _, n_clusters = ndimage.label(flagged, structure=CONNECTIVITY)
    scores = anomaly_map[brain]
    return {
        "brain_ml": brain.sum() * voxel_volume / 1000,
        "abnormal_ml": flagged.sum() * voxel_volume / 1000,
        "abnormal_fraction": flagged.sum() / max(1, brain.sum()),
        "n_clusters": int(n_clusters),
        "mean_score": float(scores.mean()) if scores.size else float("nan"),
        "p99_score": float(np.percentile(scores, 99)) if scores.size else float("nan"),
    }


def find_anomaly_maps(output_dir: Path) -> dict[str, list[Path]]:
    """Template-space anomaly maps in the derivative dataset, grouped by model ``desc``.

    The native-space copies (``space-<reference>``, no ``res-``) are left out: subjects are
    compared on the template grid.
    """
    maps: dict[str, list[Path]] = defaultdict(list)
    for path in bids.anomaly_maps(output_dir):
        entities = bids.parse_name(path)
        if "res" in entities:
            maps[entities["desc"]].append(path)
    return dict(maps)


@dataclass
class ModelResults:
    """Everything the group level found for one model (tables, curves, figures)."""

    desc: str
    burden: pd.DataFrame
    regions: pd.DataFrame
    evaluation: pd.DataFrame
    curves: dict[str, dict] = field(default_factory=dict)
    maps: dict[tuple[str, str], Path] = field(default_factory=dict)
    overlays: dict[tuple[str, str], Path] = field(default_factory=dict)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    statistics: pd.DataFrame = field(default_factory=pd.DataFrame)
    control: str | None = None
    microbleeds: pd.DataFrame = field(default_factory=pd.DataFrame)
    froc: pd.DataFrame = field(default_factory=pd.DataFrame)
    froc_summary: dict = field(default_factory=dict)
    truths: dict[tuple[str, str | None], Path] = field(default_factory=dict)
    norms: pd.DataFrame = field(default_factory=pd.DataFrame)
    centiles: pd.DataFrame = field(default_factory=pd.DataFrame)
    centile_column: str | None = None


GLOBAL_MEASURES = ("abnormal_ml", "abnormal_fraction", "n_clusters", "mean_score", "p99_score")
"""Burden measures compared between patients and controls (columns of the subjects table)."""

REGIONAL_MEASURES = ("mean_score", "abnormal_percent")
"""Per-region measures compared between patients and controls."""

EVALUATION_METRICS = ("auroc", "auprc", "oracle_dice", "dice", "lesion_sensitivity",
                      "false_positive_clusters")
"""Evaluation columns summarised per group with bootstrap intervals."""


def _model_roles(output_dir: Path, model_name: str | None) -> dict[str, str]:
    """``training`` or ``calibration`` per participant of a trained model (empty otherwise)."""
    from bids_anomaly.models.store import read_card

    if not model_name:
        return {}
    try:
        directory = bids.model_dir(output_dir, model_name)
    except UsageError:  # a single-subject fit's name, not a trained model
        return {}
    if not directory.is_dir():
        return {}
    try:
        card = read_card(directory)
    except BidsAnomalyError:
        return {}
    roles = {p: "calibration" for p in card.calibration_participants}
    roles.update({p: "training" for p in card.training_participants})
    return roles


def _thinned(*arrays: np.ndarray, points: int = 400) -> list[np.ndarray]:
    """At most ``points`` evenly spaced entries of each array (curves for plotting)."""
    index = np.unique(np.linspace(0, len(arrays[0]) - 1, min(points, len(arrays[0]))).astype(int))
    return [np.asarray(a)[index] for a in arrays]


def _curves(scores: np.ndarray, truth: np.ndarray) -> dict:
    """Thinned ROC and precision-recall curves of one subject's voxels."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(truth, scores)
    precision, recall, _ = precision_recall_curve(truth, scores)
    fpr, tpr = _thinned(fpr, tpr)
    precision, recall = _thinned(precision, recall)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


def evaluate_model(settings: Settings, desc: str, maps: list[Path], layout,
                   participants: pd.DataFrame | None) -> ModelResults:
    """Burden, regional and (with ground truth) evaluation tables of one model's maps."""
    from bids_anomaly.evaluation.metrics import lesion_metrics
    from bids_anomaly.runtime.progress import ItemProgress

    burden_rows, region_tables, evaluation_rows = [], [], []
    truths: dict[tuple[str, str | None], Path] = {}
    curves, map_paths = {}, {}
    roles: dict[str, dict[str, str]] = {}
    progress = ItemProgress(len(maps), f"group {desc}")
    for map_path in maps:
        entities = bids.parse_name(map_path)
        subject, session = entities["sub"], entities.get("ses")
        space, res = entities["space"], int(entities["res"])
        name = bids.AnatInputs(subject, session).name
        progress.advance(name)
        mask_path = bids.spec_path(settings.output_dir, subject, session,
                                   bids.anomaly_mask_spec(space, res, desc))
        brain_path = bids.spec_path(settings.output_dir, subject, session,
                                    bids.brain_mask_spec(space, res))
        if not (mask_path.is_file() and brain_path.is_file()):
            LOGGER.warning("%s: anomaly mask or brain mask missing; skipped", map_path.name)
            continue
        map_img = nib.load(map_path)
        anomaly_map = map_img.get_fdata(dtype=np.float32)
        anomaly_mask = np.asarray(nib.load(mask_path).dataobj) > 0
        brain = np.asarray(nib.load(brain_path).dataobj) > 0
        model_name = bids.read_sidecar(map_path).get("Model")
        if model_name not in roles:
            roles[model_name] = _model_roles(settings.output_dir, model_name)
        row = {"participant_id": f"sub-{subject}", "session_id": session or "n/a"}
        if participants is not None and "group" in participants.columns:
            match = participants.loc[participants["label"] == subject, "group"]
            row["group"] = str(match.iloc[0]) if len(match) else "n/a"
        row["model_role"] = roles[model_name].get(f"sub-{subject}", "test")
        voxel_volume = float(np.prod(map_img.header.get_zooms()[:3]))
        burden_rows.append({**row, **anomaly_burden(anomaly_map, anomaly_mask, brain,
                                                    voxel_volume)})
        regions_path = bids.spec_path(settings.output_dir, subject, session,
                                      bids.regions_spec(space, res, desc))
        if regions_path.is_file():
            table = pd.read_csv(regions_path, sep="\t", na_values="n/a")
            for column, value in reversed(list(row.items())):
                table.insert(0, column, value)
            region_tables.append(table)
        map_paths[row["participant_id"], row["session_id"]] = map_path
        if not settings.group.ground_truth:
            continue
        truth_file = first_found(find_ground_truth, settings.group.ground_truth, subject,
                                 session)
        if truth_file is None:
            continue
        raw = bids.collect_anat(layout, subject, [session] if session else None)
        raw_images = raw[0].images if raw else {}
        chains = transforms_to_template(map_path.parent, map_path.name.split("_space-")[0],
                                         space)
        truth = truth_in_template(truth_file, brain_path, raw_images, chains)
        truths[subject, session] = _keep_truth(settings, name, truth, map_img)
        region = brain | truth
        metrics = voxel_metrics(anomaly_map[region], truth[region],
                                predicted=anomaly_mask[region])
        metrics["truth_ml"] = metrics["truth_voxels"] * voxel_volume / 1000
        metrics.update(lesion_metrics(anomaly_mask & region, truth))
        evaluation_rows.append({**row, "ground_truth": truth_file.name, **metrics})
        if truth[region].any() and not truth[region].all():
            curves[name] = {**_curves(anomaly_map[region], truth[region]),
                            "auroc": metrics["auroc"], "auprc": metrics["auprc"]}
    progress.close()
    regions = pd.concat(region_tables, ignore_index=True) if region_tables else pd.DataFrame()
    result = ModelResults(desc, pd.DataFrame(burden_rows), regions,
                          pd.DataFrame(evaluation_rows), curves, map_paths)
    result.truths = truths
    return result


def _keep_truth(settings: Settings, name: str, truth: np.ndarray,
                reference: nib.Nifti1Image) -> Path:
    """Write a subject's ground truth on the template grid to the work folder (for its page)."""
    path = settings.work_dir / "group" / "truth" / f"{name}_truth.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(truth.astype(np.uint8), reference.affine)
    image.set_data_dtype(np.uint8)
    image.to_filename(path)
    return path


def per_subject(table: pd.DataFrame) -> pd.DataFrame:
    """One row per participant: the mean over their sessions (sessions are not independent)."""
    keys = [c for c in ("participant_id", "group") if c in table.columns]
    return table.groupby(keys, as_index=False, sort=True).mean(numeric_only=True)


def group_statistics(results: ModelResults, control: str | None, n_boot: int,
                     seed: int) -> pd.DataFrame:
    """Patients vs controls for the global and regional burden measures of one model.

    ``p_fdr`` is the Mann-Whitney p adjusted by Benjamini-Hochberg over every measure and region
    of one comparison (one patient group against the controls).
    """
    from scipy.stats import false_discovery_control

    from bids_anomaly.evaluation.statistics import compare_groups

    burden = results.burden
    if control is None or burden.empty or "group" not in burden.columns:
        return pd.DataFrame()
    if not ((burden["group"] == control).any() and (burden["group"] != control).any()):
        return pd.DataFrame()
    tables = [compare_groups(per_subject(burden), GLOBAL_MEASURES, control, n_boot, seed)
              .assign(region="global")]
    regions = results.regions
    if not regions.empty and "group" in regions.columns:
        for (region, source), rows in regions[regions["source"] != "brain"].groupby(
                ["region", "source"], sort=False):
            table = per_subject(rows[["participant_id", "group", *REGIONAL_MEASURES]])
            tables.append(compare_groups(table, REGIONAL_MEASURES, control, n_boot, seed)
                          .assign(region=f"{source}:{region}"))
    table = pd.concat(tables, ignore_index=True)
    table["p_fdr"] = np.nan
    for _, rows in table.groupby("patients", sort=False):
        tested = rows["p_value"].notna()
        if tested.any():
            table.loc[rows.index[tested], "p_fdr"] = false_discovery_control(
                rows.loc[tested, "p_value"].to_numpy(), method="bh")
    columns = ["patients", "controls", "region", "measure"]
    return table[columns + [c for c in table.columns if c not in columns]]
