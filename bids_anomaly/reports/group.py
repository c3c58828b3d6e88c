"""The group report: one self-contained HTML page with the group tables and figures."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from bids_anomaly import bids
from bids_anomaly.evaluation.group import per_subject
from bids_anomaly.reports.html import figure_html, table_html, write_page

_BURDEN_FIGURE_MEASURES = ("abnormal_ml", "n_clusters", "mean_score", "p99_score")

MAX_OVERLAYS = 60
"""Overlays per model in the group report (about 40 KB each); the subjects with the largest
abnormal volume are shown, every subject's overlay is in its own page."""


def _shown_overlays(result) -> tuple[list, int]:
    """The overlays to embed, and how many are left out.

    As ``((participant_id, session_id), figure)``, the largest abnormal volumes first when
    there are more than :data:`MAX_OVERLAYS`.
    """
    overlays = result.overlays
    if len(overlays) <= MAX_OVERLAYS:
        return list(overlays.items()), 0
    burden = result.burden.sort_values("abnormal_ml", ascending=False)
    keys = zip(burden["participant_id"], burden["session_id"], strict=True)
    chosen = [(key, overlays[key]) for key in keys if key in overlays][:MAX_OVERLAYS]
    return chosen, len(overlays) - len(chosen)


def model_comparison(results: list) -> pd.DataFrame:
    """One row per model, best first: what a reader compares models by.

    Columns: subjects scored, mean voxel AUROC / AUPRC / Dice and lesion sensitivity over the
    subjects with ground truth, microbleed sensitivity and false positives per subject, and the
    AUROC of the abnormal volume separating all patients from the controls. Models are ranked by
    mean AUPRC when there is ground truth, else by that patients-vs-controls AUROC.
    """
    rows = []
    for result in results:
        row = {"model": result.desc, "subjects": len(result.burden)}
        evaluation = result.evaluation
        for column in ("auroc", "auprc", "dice", "lesion_sensitivity"):
            if not evaluation.empty and column in evaluation:
                row[f"mean {column}"] = pd.to_numeric(evaluation[column],
                                                      errors="coerce").mean()
        if not result.microbleeds.empty:
            table = result.microbleeds
            row["microbleed sensitivity"] = table["tp"].sum() / max(1, table["n_true"].sum())
            row["microbleed FP/subject"] = table["fp"].mean()
        statistics = result.statistics
        if not statistics.empty:
            chosen = statistics[(statistics["region"] == "global")
                                & (statistics["measure"] == "abnormal_ml")]
            overall = chosen[chosen["patients"].astype(str) == "all patients"]
            pick = overall if len(overall) else chosen
            if len(pick):
                row["patients vs controls AUROC (abnormal ml)"] = float(pick["auroc"].iloc[0])
        rows.append(row)
    table = pd.DataFrame(rows)
    for key in ("mean auprc", "patients vs controls AUROC (abnormal ml)"):
        if key in table and table[key].notna().any():
            return table.sort_values(key, ascending=False, na_position="last",
                                     kind="stable").reset_index(drop=True)
    return table


def _overlay_caption(result, key: tuple[str, str]) -> str:
    """``sub-x [ses-y] (group): N ml abnormal`` for a group overlay."""
    subject, session = key[0], str(key[1])
    burden = result.burden
    row = burden[(burden["participant_id"] == subject)
                 & (burden["session_id"].astype(str) == session)]
    text = subject + (f" ses-{session}" if session != "n/a" else "")
    if len(row):
        if "group" in row:
            text += f" ({row['group'].iloc[0]})"
        text += f": {float(row['abnormal_ml'].iloc[0]):.2f} ml abnormal"
    return text


def _interval(table: pd.DataFrame, value: str, low: str, high: str) -> pd.Series:
    """``value [low, high]`` strings of three columns."""
    return table.apply(lambda r: f"{r[value]:.3f} [{r[low]:.3f}, {r[high]:.3f}]", axis=1)


def _evaluation_section(result, figures: Path) -> list[str]:
    from bids_anomaly.reports.figures import plot_curves

    parts = ["<h3>Evaluation against the ground truth</h3>",
             "<p>Voxel-wise AUROC and AUPRC of the anomaly map, the best Dice over all "
             "thresholds (oracle) and the Dice of the written anomaly mask; a lesion is "
             "detected when one of its voxels is flagged, a flagged cluster touching no lesion "
             "is a false positive. Means per group with 95% percentile-bootstrap intervals.</p>"]
    summary = result.summary.copy()
    summary["mean [95% CI]"] = _interval(summary, "mean", "ci_low", "ci_high")
    parts.append(table_html(summary[["group", "metric", "n", "mean [95% CI]", "sd"]]))
    if result.curves:
        path = plot_curves(result.curves, figures / f"desc-{result.desc}_curves.svg",
                           title=f"{result.desc}: voxel-wise ROC and precision-recall")
        parts.append(figure_html(path))
    parts.append(table_html(result.evaluation))
    return parts


def _microbleed_section(result, figures: Path) -> list[str]:
    """Lesion-wise microbleed detection: the FROC curve, its summary, the per-subject table."""
    from bids_anomaly.reports.figures import plot_froc

    table = result.microbleeds
    sensitivity = table["tp"].sum() / max(1, table["n_true"].sum())
    parts = ["<h3>Microbleeds: lesion-wise detection</h3>",
             f"<p>{len(table)} subject/session(s) with microbleed ground truth, "
             f"{int(table['n_true'].sum())} microbleeds. At the calibrated threshold: "
             f"sensitivity {sensitivity:.2f}, {table['fp'].mean():.2f} false positives per "
             f"subject, F1 {table['f1'].mean():.2f} (mean over subjects), mean |count "
             f"difference| {table['abs_count_difference'].mean():.2f}. A candidate detects a "
             "microbleed when its centre lies within the microbleed's radius (+1 mm).</p>"]
    if not result.froc.empty:
        summary = ", ".join(f"{key.removeprefix('sensitivity_at_')} FP: {value:.2f}"
                            for key, value in result.froc_summary.items() if key != "cpm")
        parts.append(f"<p>FROC sensitivity at {summary}; mean (CPM) "
                     f"{result.froc_summary.get('cpm', float('nan')):.2f}.</p>")
        path = plot_froc(result.froc, figures / f"desc-{result.desc}_froc.svg",
                         title=f"{result.desc}: microbleed FROC",
                         operating_point=(float(table["fp"].mean()), float(sensitivity)))
        parts.append(figure_html(path))
    parts.append(table_html(table))
    return parts


def _statistics_section(result, figures: Path) -> list[str]:
    from bids_anomaly.reports.figures import plot_burden_by_group, plot_subject_roc

    statistics, burden = result.statistics, result.burden
    parts = [f"<h3>Patients vs controls ({html.escape(str(result.control))})</h3>",
             "<p>Each burden measure as a test separating patients from controls: AUROC with a "
             "stratified 95% bootstrap interval, Hedges' g, the two-sided Mann-Whitney p and "
             "p_fdr, adjusted by Benjamini-Hochberg over all measures and regions of the "
             "comparison. Sessions of one participant are averaged first.</p>"]
    seen = burden[(burden["group"] == result.control) & (burden["model_role"] != "test")]
    if len(seen):
        parts.append(
            f"<p class='note'>{seen['participant_id'].nunique()} of the controls were used to "
            "train or calibrate this model: their burden is biased low, so these figures are "
            "optimistic. Compare held-out controls (model_role 'test') for an unbiased "
            "estimate.</p>")
    table = statistics.copy()
    table["auroc [95% CI]"] = _interval(table, "auroc", "auroc_ci_low", "auroc_ci_high")
    columns = ["patients", "region", "measure", "n_patients", "n_controls", "patients_mean",
               "controls_mean", "auroc [95% CI]", "hedges_g", "p_value", "p_fdr"]
    global_rows = table["region"] == "global"
    parts.append(table_html(table.loc[global_rows, columns]))
    subjects = per_subject(burden)
    measures = [m for m in _BURDEN_FIGURE_MEASURES if m in subjects.columns]
    parts.append(figure_html(plot_burden_by_group(
        subjects, measures, figures / f"desc-{result.desc}_burden.svg",
        title=f"{result.desc}: anomaly burden per group")))
    parts.append(figure_html(plot_subject_roc(
        subjects, measures, result.control, figures / f"desc-{result.desc}_subjectroc.svg",
        title=f"{result.desc}: all patients vs {result.control}")))
    if (~global_rows).any():
        parts.append("<h3>Regional burden: patients vs controls</h3>")
        parts.append(table_html(table.loc[~global_rows, columns]))
    return parts


def _norms_section(result, figures: Path) -> list[str]:
    """Regional norms: the centile curves with the participants, the most unusual regions."""
    from bids_anomaly.reports.figures import plot_centiles

    norms = result.norms
    parts = ["<h3>Regional norms</h3>",
             "<p>Each region's mean value against the healthy norms for the participant's own "
             "covariates and site: z-score and centile (per subject in "
             f"desc-{html.escape(result.desc)}_norms.tsv).</p>"]
    column = result.centile_column
    if column and not result.centiles.empty and column in norms.columns:
        path = plot_centiles(result.centiles, norms, column,
                             figures / f"desc-{result.desc}_centiles.svg",
                             title=f"{result.desc}: regional means against {column}, with the "
                                   "fitted centiles (population, no site effect)",
                             control=result.control)
        parts.append(figure_html(path))
    shown = norms.reindex(norms["z"].abs().sort_values(ascending=False).index).head(20)
    columns = [c for c in ("participant_id", "session_id", "group", column, "region",
                           "channel", "value", "expected", "z", "centile")
               if c and c in shown.columns]
    parts.append("<p>The 20 most unusual regional values (largest |z|):</p>")
    parts.append(table_html(shown[columns]))
    return parts


def _regions_section(result) -> list[str]:
    regions = result.regions
    keys = ["source", "region"] + (["group"] if "group" in regions.columns else [])
    table = (regions.groupby(keys, sort=False)[["mean_score", "abnormal_percent"]]
             .mean().reset_index())
    return ["<h3>Regional burden (mean over subjects)</h3>",
            "<p>Mean anomaly score and percentage of flagged voxels per tissue class of the "
            "template and per atlas region (per-subject values in "
            f"desc-{html.escape(result.desc)}_regions.tsv).</p>", table_html(table)]


def _protocol_section(family: str, tables: dict[str, pd.DataFrame]) -> list[str]:
    """The subject-level protocol of a ``train --splits`` run: splits, then regions."""
    splits = tables["splits"]
    regions = tables["splitregions"]
    count = int(splits["split"].map(str).str.isdigit().sum())
    summary = regions[regions["split"].isin(["median", "iqr"])].pivot(
        index="region", columns="split", values="gmean").reset_index()
    summary.columns = ["region", "iqr g-mean", "median g-mean"]
    summary = summary.sort_values("median g-mean", ascending=False)
    return [
        f"<h2>Subject-level protocol: {html.escape(family)} ({count} splits)</h2>",
        "<p>Per split, the share of abnormal voxels of each subject separates the patients "
        "from that split's held-out controls: AUROC, and the best g-mean "
        "sqrt(sensitivity x specificity) over cut-offs with its sensitivity and specificity; "
        "then the median, quartiles and IQR over splits.</p>",
        table_html(splits),
        "<h3>Best g-mean per region (median and IQR over splits)</h3>",
        table_html(summary),
    ]


def write_group_report(path: Path, results: list,
                       protocols: dict[str, dict[str, pd.DataFrame]] | None = None,
                       changes: dict[str, pd.DataFrame] | None = None) -> Path:
    """Write ``report.html``: per model the evaluation, statistics, tables and overlays.

    Parameters
    ----------
    path : Path
        Output file; figures are written to ``figures/`` beside it and embedded in the page.
    results : list of ModelResults
        One per model (:class:`bids_anomaly.evaluation.group.ModelResults`).
    protocols : dict, optional
        The subject-level protocol tables of each ``train --splits`` run
        (:func:`~bids_anomaly.evaluation.protocol.split_protocol`), shown first.
    changes : dict, optional
        ``participant --longitudinal``: the lesion change per subject and session pair
        (``changes``) and, with change ground truth, its evaluation (``changeevaluation``).

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    Figures are embedded as data URIs and the style is inline: the page needs no network and no
    other file.
    """
    path = Path(path)
    figures = bids.group_figures_dir(path.parent.parent)
    sections = []
    comparison = model_comparison(results)
    if len(results) > 1:
        sections += ["<h2>Models compared</h2>",
                     "<p>Best first (by mean AUPRC against the ground truth when there is one, "
                     "else by how well the abnormal volume separates patients from controls); "
                     "each model's section follows in this order. Click a column to sort.</p>",
                     table_html(comparison)]
    for family, tables in (protocols or {}).items():
        sections.extend(_protocol_section(family, tables))
    if changes and not changes.get("changes", pd.DataFrame()).empty:
        sections += ["<h2>Lesion change between sessions</h2>",
                     "<p>New, enlarging and shrinking lesions between consecutive sessions of "
                     "each subject (<code>participant --longitudinal</code>); each pair is drawn "
                     "in its subject's page.</p>", table_html(changes["changes"])]
        evaluation = changes.get("changeevaluation", pd.DataFrame())
        if not evaluation.empty:
            sections += ["<h3>Change maps against the change ground truth</h3>",
                         table_html(evaluation)]
    order = {desc: rank for rank, desc in enumerate(comparison["model"])}
    for result in sorted(results, key=lambda r: order.get(r.desc, len(order))):
        sections.append(f"<h2>Model {html.escape(result.desc)}</h2>")
        sections.append(f"<p>{len(result.burden)} subject/session(s) scored.</p>")
        if not result.evaluation.empty:
            sections.extend(_evaluation_section(result, figures))
        if not result.microbleeds.empty:
            sections.extend(_microbleed_section(result, figures))
        if not result.statistics.empty:
            sections.extend(_statistics_section(result, figures))
        if not result.norms.empty:
            sections.extend(_norms_section(result, figures))
        if not result.regions.empty:
            sections.extend(_regions_section(result))
        sections.append("<h3>Anomaly burden per subject</h3>")
        sections.append(table_html(result.burden))
        if result.overlays:
            shown, hidden = _shown_overlays(result)
            more = (f" The {len(shown)} subjects with the largest abnormal volume are shown; "
                    f"the other {hidden} are in their own pages (sub-&lt;label&gt;.html)."
                    if hidden else "")
            sections.append("<h3>Anomaly maps</h3><p>Scores above the model's calibrated "
                            "threshold over the preprocessed FLAIR (else the reference image), "
                            "cut through the peak of the largest cluster; the anomaly mask is "
                            "outlined in green. Click a subject for its page (all its clusters, "
                            f"numbered, and its quality control).{more}</p>")
            sections.append("<div class='overlays'>" + "".join(
                figure_html(figure, link=f"../{key[0]}.html",
                            caption=_overlay_caption(result, key))
                for key, figure in shown) + "</div>")
    write_page(path, "bids_anomaly group report", sections)
    return path
