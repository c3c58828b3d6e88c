"""The group report: one self-contained HTML page of the group tables."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from bids_anomaly import __version__

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f0f0; }
"""


def write_group_report(path: Path, tables: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> Path:
    """Write ``report.html`` with, per model, the evaluation summary and the per-subject tables.

    Parameters
    ----------
    path : Path
        Output file.
    tables : dict
        Model ``desc`` to (burden table, evaluation table).

    Returns
    -------
    Path
        ``path``.
    """
    sections = []
    for desc, (burden, evaluation) in tables.items():
        sections.append(f"<h2>Model {html.escape(desc)}</h2>")
        if not evaluation.empty:
            columns = ["auroc", "auprc", "oracle_dice", "dice"]
            summary = evaluation[columns].agg(["mean", "std"]).T
            sections.append("<h3>Evaluation against ground truth (mean, sd)</h3>")
            sections.append(summary.to_html(float_format="%.3f"))
            sections.append(evaluation.to_html(index=False, float_format="%.3f", na_rep="n/a"))
        sections.append("<h3>Anomaly burden per subject</h3>")
        sections.append(burden.to_html(index=False, float_format="%.3f", na_rep="n/a"))
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>bids_anomaly group report</title><style>{_STYLE}</style></head><body>"
        f"<h1>bids_anomaly group report</h1><p>bids_anomaly {__version__}</p>"
        + "".join(sections) + "</body></html>"
    )
    path.write_text(page)
    return path
