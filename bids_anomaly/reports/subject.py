"""The per-participant page ``sub-<label>.html``, assembled from the derivatives on disk."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import pandas as pd

from bids_anomaly import bids
from bids_anomaly.reports.qc import QC_THRESHOLDS, write_subject_report

LOGGER = logging.getLogger(__name__)

_QC_TEXT = (
    "dice: overlap of the brain mask warped to the template with the template's brain mask "
    f"(flagged below {QC_THRESHOLDS['dice']}). nmi: normalised mutual information of the warped "
    f"reference and the template (flagged below {QC_THRESHOLDS['nmi']} for T1w references). "
    "nmi_<modality>: each coregistered modality against the reference, for information."
)


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
        if not sections:
            continue
        images = sorted({f"{m}: {p.name}" for i in sessions for m, p in i.images.items()})
        sections.insert(0, {"heading": "Inputs", "text": "\n\n".join(images)})
        path = bids.subject_report_path(output_dir, subject)
        pages.append(write_subject_report(path, f"sub-{subject}", sections))
        LOGGER.info("report: %s", path)
    return pages
