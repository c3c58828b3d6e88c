"""The group level: burden tables for every model, evaluation against ground truth, report."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from bids_anomaly import bids
from bids_anomaly.config import Settings
from bids_anomaly.errors import EmptySelectionError, MissingInputError
from bids_anomaly.evaluation.ground_truth import find_ground_truth, truth_in_template
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
    """Anomaly maps in the derivative dataset, grouped by model ``desc``."""
    maps: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(output_dir.glob("sub-*/**/anat/*_stat-anomaly_statmap.nii.gz")):
        maps[bids.parse_name(path)["desc"]].append(path)
    return dict(maps)


def _transforms_to_template(anat_dir: Path, prefix: str, space: str) -> dict[str, list[Path]]:
    """For each modality with stored transforms, the chain from its raw grid to the template."""
    to_template = list(anat_dir.glob(f"{prefix}_from-*_to-{space}_mode-image_xfm.h5"))
    if not to_template:
        return {}
    reference = bids.parse_name(to_template[0])["from"]
    chains = {reference: [to_template[0]]}
    for path in anat_dir.glob(f"{prefix}_from-*_to-{reference}_mode-image_xfm.mat"):
        chains[bids.parse_name(path)["from"]] = [to_template[0], path]
    return chains


def evaluate_model(settings: Settings, desc: str, maps: list[Path], layout,
                   participants: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Burden and (with ground truth) evaluation rows for one model's anomaly maps."""
    burden_rows, evaluation_rows = [], []
    for map_path in maps:
        entities = bids.parse_name(map_path)
        subject, session = entities["sub"], entities.get("ses")
        space, res = entities["space"], int(entities["res"])
        mask_path = bids.spec_path(settings.output_dir, subject, session,
                                   bids.anomaly_mask_spec(space, res, desc))
        brain_path = bids.spec_path(settings.output_dir, subject, session,
                                    bids.brain_mask_spec(space, res))
        if not (mask_path.is_file() and brain_path.is_file()):
            LOGGER.warning("%s: anomaly mask or brain mask missing; skipped", map_path.name)
            continue
        map_img = nib.load(map_path)
        anomaly_map = map_img.get_fdata(dtype=np.float32)
        brain = np.asarray(nib.load(brain_path).dataobj) > 0
        sidecar = json.loads(map_path.with_name(map_path.name.replace(".nii.gz", ".json"))
                             .read_text())
        row = {"participant_id": f"sub-{subject}", "session_id": session or "n/a"}
        if participants is not None and "group" in participants.columns:
            match = participants.loc[participants["label"] == subject, "group"]
            row["group"] = match.iloc[0] if len(match) else "n/a"
        voxel_volume = float(np.prod(map_img.header.get_zooms()[:3]))
        burden_rows.append({**row, **anomaly_burden(
            anomaly_map, np.asarray(nib.load(mask_path).dataobj), brain, voxel_volume)})
        if settings.ground_truth is None:
            continue
        truth_file = find_ground_truth(settings.ground_truth, subject, session)
        if truth_file is None:
            continue
        raw = bids.collect_anat(layout, subject, [session] if session else None)
        raw_images = raw[0].images if raw else {}
        chains = _transforms_to_template(map_path.parent, map_path.name.split("_space-")[0],
                                         space)
        truth = truth_in_template(truth_file, brain_path, raw_images, chains)
        if truth is None:
            continue
        region = brain | truth
        metrics = voxel_metrics(anomaly_map[region], truth[region], sidecar["Threshold"])
        metrics["truth_ml"] = metrics["truth_voxels"] * voxel_volume / 1000
        evaluation_rows.append({**row, "ground_truth": truth_file.name, **metrics})
    return pd.DataFrame(burden_rows), pd.DataFrame(evaluation_rows)


def run_group(settings: Settings) -> list[Path]:
    """The group level: one burden table per model, evaluation tables, an HTML summary.

    Returns
    -------
    list of Path
        The tables and report written.
    """
    from bids_anomaly.participant import prepare
    from bids_anomaly.reports.group import write_group_report

    if settings.ground_truth is not None and not settings.ground_truth.is_dir():
        raise MissingInputError(f"--ground-truth {settings.ground_truth} is not a folder")
    layout, _ = prepare(settings)
    maps = find_anomaly_maps(settings.output_dir)
    if settings.participant_label:
        wanted = {f"sub-{label}_" for label in settings.participant_label}
        maps = {desc: [p for p in paths if any(p.name.startswith(w) for w in wanted)]
                for desc, paths in maps.items()}
        maps = {desc: paths for desc, paths in maps.items() if paths}
    if not maps:
        raise EmptySelectionError(
            f"no anomaly maps in {settings.output_dir}: run the participant level with --model "
            "first"
        )
    try:
        participants = bids.read_participants(settings.bids_dir)
    except MissingInputError:
        participants = None
    group_dir = settings.output_dir / "group"
    group_dir.mkdir(exist_ok=True)
    written, tables = [], {}
    for desc, paths in sorted(maps.items()):
        burden, evaluation = evaluate_model(settings, desc, paths, layout, participants)
        tables[desc] = (burden, evaluation)
        path = group_dir / f"desc-{desc}_subjects.tsv"
        burden.to_csv(path, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
        written.append(path)
        if not evaluation.empty:
            path = group_dir / f"desc-{desc}_evaluation.tsv"
            evaluation.to_csv(path, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
            written.append(path)
            LOGGER.info("%s: mean AUPRC %.3f, mean Dice %.3f over %d subjects", desc,
                        evaluation["auprc"].mean(), evaluation["dice"].mean(), len(evaluation))
    written.append(write_group_report(group_dir / "report.html", tables))
    return written
