"""The per-participant page ``sub-<label>.html``, assembled from the derivatives on disk."""

from __future__ import annotations

import html
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bids_anomaly import bids
from bids_anomaly.config import MODALITIES
from bids_anomaly.evaluation.registration import QC_THRESHOLDS
from bids_anomaly.reports.html import figure_html, table_html, write_page

LOGGER = logging.getLogger(__name__)

MAX_CLUSTER_ROWS = 25
"""Clusters listed in a participant's page (the TSV has them all)."""

_QC_TEXT = (
    "dice: overlap of the brain mask warped to the template with the template's brain mask "
    f"(flagged below {QC_THRESHOLDS['dice']}). nmi: normalised mutual information of the warped "
    f"reference and the template (flagged below {QC_THRESHOLDS['nmi']} for T1w references). "
    "nmi_<modality>: each coregistered modality against the reference, for information."
)


def write_subject_report(out_file: str | Path, title: str,
                         sections: Sequence[Mapping[str, Any]]) -> Path:
    """Write one subject's page: a self-contained HTML file that opens offline.

    Parameters
    ----------
    out_file : path
        Output HTML file; its folder is created.
    title : str
        Page title and first heading.
    sections : list of dict
        In order, each with ``heading`` (str) and optionally ``text`` (str; blank lines separate
        paragraphs), ``table`` (pandas.DataFrame or list of dicts) and ``figures`` (paths to SVG,
        PNG or JPEG files).

    Returns
    -------
    Path
        ``out_file``.
    """
    parts = []
    for section in sections:
        parts.append(f"<section><h2>{html.escape(str(section['heading']))}</h2>")
        text = section.get("text")
        if text:
            for paragraph in str(text).split("\n\n"):
                if paragraph.strip():
                    parts.append(f"<p>{html.escape(paragraph.strip())}</p>")
        table = section.get("table")
        if table is not None:
            parts.append(table_html(table))
        for figure in section.get("figures") or []:
            parts.append(figure_html(figure))
        parts.append("</section>")
    return write_page(out_file, title, parts)


def anomaly_overlay(output_dir: Path, map_path: Path) -> Path | None:
    """The three-plane overlay figure of an anomaly map, drawn when missing or out of date.

    The background is the subject's preprocessed reference image in template space, the cuts
    go through the highest score inside the anomaly mask, and scores are shown from the
    model's calibrated threshold up (from the 95th percentile without one, as with FDR).
    """
    from bids_anomaly.reports.figures import plot_anomaly_overlay

    entities = bids.parse_name(map_path)
    subject, session = entities["sub"], entities.get("ses")
    space, res, desc = entities["space"], int(entities["res"]), entities["desc"]
    out_file = bids.spec_path(output_dir, subject, session,
                              bids.anomaly_figure_spec(space, res, desc))
    if out_file.is_file() and out_file.stat().st_mtime >= map_path.stat().st_mtime:
        return out_file
    backgrounds = [bids.spec_path(output_dir, subject, session, bids.preproc_spec(space, res, m))
                   for m in MODALITIES]
    background = next((path for path in backgrounds if path.is_file()), None)
    if background is None:
        return None
    mask = bids.spec_path(output_dir, subject, session, bids.anomaly_mask_spec(space, res, desc))
    name = f"sub-{subject}" + (f" ses-{session}" if session else "")
    modality = bids.parse_name(background)["suffix"]
    threshold = bids.read_sidecar(map_path).get("Threshold")
    return plot_anomaly_overlay(background, map_path, mask if mask.is_file() else None,
                                out_file, title=f"{name}: {desc} on {modality}",
                                threshold=threshold)


def model_sections(output_dir: Path, inputs: bids.AnatInputs, space: str) -> list[dict]:
    """Report sections of every model's anomaly map of one subject/session."""
    sub, ses = inputs.subject, inputs.session
    heading = f"Session {ses}: " if ses else ""
    sections = []
    for map_path in bids.subject_anomaly_maps(output_dir, sub, ses, space):
        entities = bids.parse_name(map_path)
        res, desc = int(entities["res"]), entities["desc"]
        sidecar = bids.read_sidecar(map_path)
        text = [f"Model {sidecar.get('Model', desc)} ({sidecar.get('ModelType', 'n/a')}): "
                f"{sidecar.get('ScoreDefinition', '')}"]
        if "Threshold" in sidecar:
            text.append(f"Mask: scores above {sidecar['Threshold']:.4g} "
                        f"({sidecar.get('ThresholdMethod', '')}).")
        figure = anomaly_overlay(output_dir, map_path)
        sections.append({"heading": f"{heading}model {desc}: anomaly map",
                         "text": "\n\n".join(text), "figures": [figure] if figure else []})
        for kind, spec, caption in (
                ("clusters", bids.clusters_spec(space, res, desc),
                 f"clusters (largest {MAX_CLUSTER_ROWS}; all in the TSV)"),
                ("regions", bids.regions_spec(space, res, desc), "burden per region")):
            path = bids.spec_path(output_dir, sub, ses, spec)
            if path.is_file():
                table = pd.read_csv(path, sep="\t", na_values="n/a")
                if kind == "clusters":
                    table = table.head(MAX_CLUSTER_ROWS)
                sections.append({"heading": f"{heading}model {desc}: {caption}",
                                 "text": "No cluster: no voxel above the threshold."
                                 if table.empty else None,
                                 "table": table})
    return sections


def session_sections(output_dir: Path, inputs: bids.AnatInputs, space: str) -> list[dict]:
    """Report sections of one subject/session: its QC table and figures, where they exist."""
    sub, ses = inputs.subject, inputs.session
    heading = f"Session {ses}: " if ses else ""
    qc_file = bids.spec_path(output_dir, sub, ses, bids.qc_spec())
    sections = []
    if qc_file.is_file():
        table = pd.read_csv(qc_file, sep="\t")
        sections.append({"heading": f"{heading}registration quality", "table": table,
                         "text": _QC_TEXT})
    reference, others = inputs.reference, inputs.modalities[1:]
    figures = [
        (f"brain mask on the {reference}", bids.figure_spec("brainmask", reference)),
        (f"{reference} in template space with the template's contours",
         bids.figure_spec("registration", reference, space)),
    ] + [(f"{m} in template space with the {reference}'s contours",
          bids.figure_spec("coregistration", m, space)) for m in others]
    if inputs.dwi_params:
        figures.append((f"diffusion b=0 image in template space with the {reference}'s contours",
                        bids.figure_spec("coregistration", "b0", space)))
    for caption, spec in figures:
        path = bids.spec_path(output_dir, sub, ses, spec)
        if path.is_file():
            sections.append({"heading": f"{heading}{caption}", "figures": [path]})
    return sections


def write_subject_reports(output_dir: Path, subjects: list[bids.AnatInputs],
                          space: str) -> list[Path]:
    """Write ``sub-<label>.html`` for every participant in ``subjects`` (all their sessions).

    Parameters
    ----------
    output_dir : Path
        Root of the derivatives.
    subjects : list of AnatInputs
        The subject/sessions processed.
    space : str
        Template name (the ``space-`` entity of the figures).

    Returns
    -------
    list of Path
        The pages written.
    """
    by_subject: dict[str, list[bids.AnatInputs]] = defaultdict(list)
    for inputs in subjects:
        by_subject[inputs.subject].append(inputs)
    pages = []
    for subject, sessions in sorted(by_subject.items()):
        sections = []
        for inputs in sorted(sessions, key=lambda i: i.session or ""):
            sections.extend(session_sections(output_dir, inputs, space))
            sections.extend(model_sections(output_dir, inputs, space))
        if not sections:
            continue
        images = sorted({f"{m}: {p.name}" for i in sessions for m, p in i.images.items()}
                        | {f"dwi: {r.image.name}" for i in sessions for r in i.dwi}
                        | {f"{m}: {p.name}" for i in sessions for m, p in i.dwi_maps.items()})
        sections.insert(0, {"heading": "Inputs", "text": "\n\n".join(images)})
        path = bids.subject_report_path(output_dir, subject)
        pages.append(write_subject_report(path, f"sub-{subject}", sections))
        LOGGER.info("report: %s", path)
    return pages
