"""One page shell and style for every HTML report, and the helpers that fill it.

Pages are self-contained: the style and the one script (sortable tables) are inline and figures
are embedded as base64 data URIs, so a page references no other file and opens offline; or,
for the participant pages, figures are referenced by relative addresses inside the derivatives
folder (which then opens offline as a whole, copied anywhere).
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bids_anomaly import __version__, bids

MIME_TYPES = {".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg",
              ".jpeg": "image/jpeg"}
"""Figure formats a page can embed."""

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h2 { border-bottom: 2px solid #444; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0 2em; font-size: 0.85em; display: block;
        overflow: auto; max-width: 100%; max-height: 36em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; position: sticky; top: 0; cursor: pointer; user-select: none; }
th:hover { background: #e0e8f0; }
.summary { font-size: 1.1em; font-weight: bold; }
a figure img { outline: 1px solid #ccc; }
figure { margin: 0.5em; display: inline-block; vertical-align: top; }
figure img { max-width: 100%; height: auto; background: #000; }
figcaption { font-size: 0.75em; color: #555; }
.overlays figure { width: 32%; }
.note { background: #fff6d5; border-left: 4px solid #e0b000; padding: 0.5em 1em; }
.footer { font-size: 0.8em; color: #777; margin-top: 3em; }
"""
"""The one style of every page."""

SORT_SCRIPT = """
document.querySelectorAll("table").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (header, column) {
    header.title = "click to sort";
    header.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var up = header.dataset.order !== "up";
      var value = function (row) {
        var text = row.cells[column] ? row.cells[column].textContent.trim() : "";
        var number = parseFloat(text);
        return isNaN(number) || !/^[-+.\\d]/.test(text) ? text.toLowerCase() : number;
      };
      rows.sort(function (a, b) {
        var x = value(a), y = value(b);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
      table.querySelectorAll("thead th").forEach(function (h) { delete h.dataset.order; });
      header.dataset.order = up ? "up" : "down";
    });
  });
});
"""
"""Inline script of every page: a click on a column header sorts the table by it."""


def figure_html(path: str | Path, link: str | None = None, caption: str | None = None,
                page_dir: str | Path | None = None) -> str:
    """A ``<figure>`` with the image embedded as a base64 data URI, or referenced.

    ``link``: a relative address the figure leads to (another page of the derivatives);
    ``caption``: shown under it (default: the file name); ``page_dir``: the page's folder,
    to reference the image by its address relative to the page instead of embedding it
    (it must then travel with the page, as the derivatives' ``figures/`` do).
    """
    path = Path(path)
    mime = MIME_TYPES.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {path.name}: figures must be SVG, PNG or JPEG")
    if page_dir is None:
        src = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
    else:
        src = html.escape(Path(os.path.relpath(path, Path(page_dir))).as_posix())
    name = html.escape(path.name)
    figure = (f"<figure><img src=\"{src}\" alt=\"{name}\">"
              f"<figcaption>{html.escape(caption) if caption else name}</figcaption></figure>")
    return f"<a href=\"{html.escape(link)}\">{figure}</a>" if link else figure


def table_html(table: Any) -> str:
    """An HTML table from a DataFrame or a list of dicts (cells escaped)."""
    import pandas as pd

    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    return frame.to_html(index=False, float_format="%.3f", na_rep="n/a", escape=True,
                         border=0)


def write_page(path: str | Path, title: str, parts: Iterable[str]) -> Path:
    """Write a page: the title as first heading, the HTML ``parts``, the version at the foot.

    Returns
    -------
    Path
        ``path`` (rewritten only when its content changes).
    """
    escaped = html.escape(title)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escaped}</title><style>{STYLE}</style></head><body>"
        f"<h1>{escaped}</h1>" + "\n".join(parts)
        + f"<p class=\"footer\">bids_anomaly {html.escape(__version__)}</p>"
        f"<script>{SORT_SCRIPT}</script></body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bids.update_text(path, page)
    return path
