"""The group level: tables for every model, evaluation against ground truth, the report."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_anomaly import __version__, bids
from bids_anomaly.config import Settings
from bids_anomaly.errors import EmptySelectionError, MissingInputError, UsageError
from bids_anomaly.evaluation.group import (
    EVALUATION_METRICS,
    evaluate_model,
    find_anomaly_maps,
    group_statistics,
)
from bids_anomaly.evaluation.statistics import resolve_control_label, summarize_by_group
from bids_anomaly.levels.steps import create_outputs, index_dataset
from bids_anomaly.models.store import file_checksum
from bids_anomaly.reports.group import write_group_report
from bids_anomaly.reports.subject import anomaly_overlay

LOGGER = logging.getLogger(__name__)


def run_group(settings: Settings) -> list[Path]:
    """The group level: burden, regional, evaluation and statistics tables, an HTML report.

    Returns
    -------
    list of Path
        The tables and report written.
    """
    for folder in settings.group.ground_truth:
        if not folder.is_dir():
            raise MissingInputError(f"--ground-truth {folder} is not a folder")
    layout = index_dataset(settings)
    maps = find_anomaly_maps(settings.output_dir)
    if settings.inputs.participant_label:
        wanted = {f"sub-{label}_" for label in settings.inputs.participant_label}
        maps = {desc: [p for p in paths if any(p.name.startswith(w) for w in wanted)]
                for desc, paths in maps.items()}
        maps = {desc: paths for desc, paths in maps.items() if paths}
    if not maps:
        raise EmptySelectionError(
            f"no anomaly maps in {settings.output_dir}: run the participant level with --model "
            "first"
        )
    create_outputs(settings, layout)
    key = group_inputs_key(settings, maps)
    record = bids.group_record_path(settings.work_dir)
    previous = json.loads(record.read_text()) if record.is_file() else {}
    if previous.get("key") == key and all(Path(p).is_file() for p in previous["written"]):
        LOGGER.info("group outputs are up to date (same maps, ground truth and settings): kept")
        return [Path(p) for p in previous["written"]]
    participants = bids.participants_if_any(settings.bids_dir)
    control = None
    if participants is not None and "group" in participants.columns:
        control = resolve_control_label(participants["group"].astype(str),
                                        settings.group.control_label)
        if control is None and settings.group.control_label is not None:
            raise UsageError(
                f"--control-label {settings.group.control_label}: no such group in "
                "participants.tsv (groups: "
                f"{', '.join(sorted(participants['group'].astype(str).unique()))})")
    elif settings.group.control_label is not None:
        raise MissingInputError("--control-label needs a 'group' column in participants.tsv")
    written, results = [], []
    for desc, paths in sorted(maps.items()):
        result = evaluate_model(settings, desc, paths, layout, participants)
        result.control = control
        for subject, map_path in result.maps.items():
            overlay = anomaly_overlay(settings.output_dir, map_path)
            if overlay is not None:
                result.overlays[subject] = overlay
        _write_table(result.burden, bids.group_table_path(settings.output_dir, desc, "subjects"),
                     written)
        if not result.regions.empty:
            _write_table(result.regions,
                         bids.group_table_path(settings.output_dir, desc, "regions"), written)
        if not result.evaluation.empty:
            _write_table(result.evaluation,
                         bids.group_table_path(settings.output_dir, desc, "evaluation"), written)
            result.summary = summarize_by_group(result.evaluation, EVALUATION_METRICS,
                                                settings.group.bootstrap,
                                                settings.execution.random_seed)
            _write_table(result.summary, bids.group_table_path(
                settings.output_dir, desc, "evaluationsummary"), written)
            LOGGER.info("%s: mean AUPRC %.3f, mean Dice %.3f over %d subjects", desc,
                        result.evaluation["auprc"].mean(), result.evaluation["dice"].mean(),
                        len(result.evaluation))
        if settings.group.ground_truth:
            _evaluate_microbleeds(settings, result, paths, written)
        _gather_norms(settings, result, paths, participants, written)
        result.statistics = group_statistics(result, control, settings.group.bootstrap,
                                             settings.execution.random_seed)
        if not result.statistics.empty:
            _write_table(result.statistics,
                         bids.group_table_path(settings.output_dir, desc, "statistics"), written)
        results.append(result)
    changes = _evaluate_changes(settings, layout, participants, written)
    _pages_with_truth(settings, layout, results, maps)
    protocols = _split_protocols(settings, maps, participants, control, written)
    written.append(write_group_report(bids.group_report_path(settings.output_dir), results,
                                      protocols, changes))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "written": [str(p) for p in written]}, indent=1))
    return written


def _evaluate_microbleeds(settings: Settings, result, maps: list[Path],
                          written: list[Path]) -> None:
    """Lesion-wise microbleed metrics and FROC of one model (tables written, kept in result)."""
    from bids_anomaly.evaluation.microbleeds import evaluate_microbleeds

    tables = []
    for path in maps:
        entities = bids.parse_name(path)
        table = bids.spec_path(settings.output_dir, entities["sub"], entities.get("ses"),
                               bids.microbleeds_spec(entities["space"], int(entities["res"]),
                                                     result.desc))
        if table.is_file():
            tables.append(table)
    if not tables:
        return
    per_subject, curve, summary = evaluate_microbleeds(tables, settings.group.ground_truth)
    if per_subject.empty:
        LOGGER.warning("%s: microbleed candidates but no microbleed ground truth "
                       "(*_label-microbleed_points.tsv or _mask) in %s", result.desc,
                       ", ".join(map(str, settings.group.ground_truth)))
        return
    result.microbleeds, result.froc, result.froc_summary = per_subject, curve, summary
    _write_table(per_subject, bids.group_table_path(settings.output_dir, result.desc,
                                                    "microbleeds"), written)
    if not curve.empty:
        _write_table(curve, bids.group_table_path(settings.output_dir, result.desc, "froc"),
                     written)
    LOGGER.info("%s: microbleeds: sensitivity %.2f at %.2f false positives per subject "
                "(calibrated threshold); FROC: %.2f at 3 FP/subject", result.desc,
                per_subject["tp"].sum() / max(1, per_subject["n_true"].sum()),
                per_subject["fp"].mean(), summary.get("sensitivity_at_3", float("nan")))


def _evaluate_changes(settings: Settings, layout, participants: pd.DataFrame | None,
                      written: list[Path]) -> dict[str, pd.DataFrame]:
    """Lesion change of ``participant --longitudinal``: counts, and metrics against truth.

    Returns the tables written (``changes``, ``changeevaluation``), for the report.
    """
    from bids_anomaly.evaluation.change import (
        CHANGE_METRICS,
        COUNT_COLUMNS,
        change_counts,
        evaluate_changes,
    )

    counts = change_counts(settings.output_dir, participants)
    if settings.inputs.participant_label and not counts.empty:
        wanted = {f"sub-{label}" for label in settings.inputs.participant_label}
        counts = counts[counts["participant_id"].isin(wanted)]
    if counts.empty:
        return {}
    tables = {"changes": counts}
    _write_table(counts, bids.group_table_path(settings.output_dir, "change", "changes"),
                 written)
    summary = summarize_by_group(counts, COUNT_COLUMNS, settings.group.bootstrap,
                                 settings.execution.random_seed)
    if settings.group.ground_truth:
        evaluation = evaluate_changes(settings.output_dir, settings.group.ground_truth, layout,
                                      counts)
        if evaluation.empty:
            LOGGER.warning("change maps but no change ground truth (*_label-change_mask) in %s",
                           ", ".join(map(str, settings.group.ground_truth)))
        else:
            tables["changeevaluation"] = evaluation
            _write_table(evaluation, bids.group_table_path(settings.output_dir, "change",
                                                           "changeevaluation"), written)
            summary = pd.concat([summary, summarize_by_group(
                evaluation, CHANGE_METRICS, settings.group.bootstrap,
                settings.execution.random_seed)], ignore_index=True)
            LOGGER.info("lesion change: mean AUPRC %.3f, mean Dice %.3f over %d session "
                        "pairs", evaluation["auprc"].mean(), evaluation["dice"].mean(),
                        len(evaluation))
    _write_table(summary, bids.group_table_path(settings.output_dir, "change",
                                                "changesummary"), written)
    return tables


def _pages_with_truth(settings: Settings, layout, results: list, maps: dict[str, list[Path]]
                      ) -> None:
    """Draw the participant pages again with the ground truth outlined (``--ground-truth``)."""
    from bids_anomaly.levels.steps import collect_subjects
    from bids_anomaly.reports.subject import write_subject_reports

    truths = {key: path for result in results for key, path in result.truths.items()}
    if not truths:
        return
    labels = sorted({subject for subject, _ in truths})
    subjects = [inputs for inputs in collect_subjects(settings, layout, labels)
                if (inputs.subject, inputs.session) in truths]
    space = bids.parse_name(next(p for paths in maps.values() for p in paths))["space"]
    write_subject_reports(settings.output_dir, subjects, space,
                          settings.postprocessing.report_modality, truths,
                          nprocs=settings.execution.nprocs)
    LOGGER.info("participant pages of %d subject/session(s) drawn with their ground truth",
                len(subjects))


def _gather_norms(settings: Settings, result, maps: list[Path],
                  participants: pd.DataFrame | None, written: list[Path]) -> None:
    """The regional norms of a model with covariates: the group table and centile curves."""
    from bids_anomaly.evaluation.norms import (
        centile_curves,
        curve_levels,
        gather_norms,
        model_name_of,
    )

    norms = gather_norms(settings.output_dir, result.desc, maps, participants)
    if norms.empty:
        return
    result.norms = norms
    _write_table(norms, bids.group_table_path(settings.output_dir, result.desc, "norms"),
                 written)
    column, curves, level_columns = centile_curves(settings.output_dir,
                                                   model_name_of(maps[0]))
    result.centile_column, result.centiles = column, curves
    result.norms = norms.assign(level=curve_levels(norms, level_columns))


def _split_protocols(settings: Settings, maps: dict[str, list[Path]],
                     participants: pd.DataFrame | None, control: str | None,
                     written: list[Path]) -> dict[str, dict[str, pd.DataFrame]]:
    """The subject-level protocol of every ``train --splits`` run (tables written)."""
    from bids_anomaly.evaluation.protocol import split_families, split_protocol
    from bids_anomaly.imaging.template import get_template
    from bids_anomaly.levels.steps import prepare_atlas

    families = split_families(settings.output_dir)
    if not families:
        return {}
    if control is None or participants is None:
        LOGGER.warning("models trained with --splits need patients and controls (a 'group' "
                       "column in participants.tsv) for the subject-level protocol: skipped")
        return {}
    groups = {f"sub-{label}": str(group) for label, group in
              zip(participants["label"], participants["group"], strict=True)}
    first = next(p for paths in maps.values() for p in paths)
    entities = bids.parse_name(first)
    template = get_template(int(entities["res"]), bids.template_cache_dir(settings.work_dir))
    tissue = atlas = labels = None
    if template.name == entities["space"]:
        tissue = np.asarray(nib.load(template.dseg).dataobj).astype(np.int64)
        loaded = prepare_atlas(settings, template)
        if loaded is not None:
            atlas = np.asarray(nib.load(loaded.path).dataobj).astype(np.int64)
            labels = loaded.labels
    protocols = {}
    for family, models in families.items():
        tables = split_protocol(settings.output_dir, models, maps, groups, control,
                                settings.group.burden_threshold,
                                settings.group.control_percentile, tissue, atlas, labels)
        if not tables:
            continue
        desc = bids.model_desc(family)
        for suffix, table in tables.items():
            _write_table(table, bids.group_table_path(settings.output_dir, desc, suffix),
                         written)
        summary = tables["splits"].set_index("split")
        LOGGER.info("%s: %d splits, whole-brain burden: median AUROC %.3f, median g-mean %.3f "
                    "(IQR %.3f)", family, len(models), summary.loc["median", "auroc"],
                    summary.loc["median", "gmean"], summary.loc["iqr", "gmean"])
        protocols[family] = tables
    return protocols


def group_inputs_key(settings: Settings, maps: dict[str, list[Path]]) -> str:
    """A digest of what the group outputs depend on: the name and content of every input.

    The maps and everything written beside them (masks, regional tables, sidecars), the model
    cards, the ground truth, participants.tsv, and the group settings.
    """
    files: list[Path] = []
    for paths in maps.values():
        for path in paths:
            prefix = path.name.split("_space-")[0]
            files.extend(path.parent.glob(f"{prefix}_*"))
    files.extend(bids.model_cards(settings.output_dir))
    files.extend(bids.change_maps(settings.output_dir))
    files.extend(Path(settings.output_dir).glob("sub-*/anat/*_desc-lesions_change.tsv"))
    ground_truth = settings.group.ground_truth
    for folder in ground_truth:
        files.extend(p for p in folder.rglob("*") if p.is_file())
    files.append(settings.bids_dir / "participants.tsv")
    digest = hashlib.sha256(json.dumps({
        "version": __version__, "ground_truth": [str(f) for f in ground_truth],
        "control_label": settings.group.control_label, "bootstrap": settings.group.bootstrap,
        "burden_threshold": settings.group.burden_threshold,
        "control_percentile": settings.group.control_percentile,
        "atlas": str(settings.postprocessing.atlas),
        "seed": settings.execution.random_seed,
        "participants": settings.inputs.participant_label,
    }, sort_keys=True).encode())
    for path in sorted(set(files)):
        if path.is_file():
            digest.update(f"{path}\0{file_checksum(path)}\n".encode())
    return digest.hexdigest()


def _write_table(table: pd.DataFrame, path: Path, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    written.append(path)
