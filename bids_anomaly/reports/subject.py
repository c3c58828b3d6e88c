"""The per-participant page ``sub-<label>.html``, assembled from the derivatives on disk."""

from __future__ import annotations

import html
import logging
import os
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
                         sections: Sequence[Mapping[str, Any]], *,
                         library: Path | None = None, embed: bool = True) -> Path:
    """Write one subject's page: an HTML file that opens offline.

    By default it is self-contained (figures and viewer library embedded). With
    ``embed=False`` the figures are referenced relative to the page, and with ``library``
    (the file written by :func:`~bids_anomaly.reports.viewer.write_library`) the viewer
    library too: the page then opens offline with the folder it is in.

    Parameters
    ----------
    out_file : path
        Output HTML file; its folder is created.
    title : str
        Page title and first heading.
    sections : list of dict
        In order, each with ``heading`` (str) and optionally ``text`` (str; blank lines separate
        paragraphs), ``table`` (pandas.DataFrame or list of dicts), ``figures`` (paths to SVG,
        PNG or JPEG files), ``html`` (a fragment built by the package, not user text) and
        ``viewer`` (True when that fragment is a viewer: the library is then included once).
    library : Path, optional
        The shared viewer library, referenced instead of inlined.
    embed : bool, optional
        Embed the figures (True) or reference them relative to the page.

    Returns
    -------
    Path
        ``out_file``.
    """
    parts = []
    if any(section.get("viewer") for section in sections):
        from bids_anomaly.reports.viewer import library_html

        out_dir = Path(out_file).parent
        parts.append(library_html(None if library is None else
                                  Path(os.path.relpath(library, out_dir)).as_posix()))
    page_dir = None if embed else Path(out_file).parent
    for section in sections:
        parts.append(f"<section><h2>{html.escape(str(section['heading']))}</h2>")
        text = section.get("text")
        if text:
            for paragraph in str(text).split("\n\n"):
                if paragraph.strip():
                    parts.append(f"<p>{html.escape(paragraph.strip())}</p>")
        for figure in section.get("figures") or []:
            parts.append(figure_html(figure, page_dir=page_dir))
        if section.get("html"):  # a fragment built here (the viewer), not user text
            parts.append(section["html"])
        table = section.get("table")
        if table is not None:
            parts.append(table_html(table))
        parts.append("</section>")
    return write_page(out_file, title, parts)


LESION_MODALITIES = ("FLAIR", "T2w", "T2starw", "swi", "MEGRE")
"""Where lesions show, in order of preference, for the result figures (then the reference)."""


def result_background(output_dir: Path, subject: str, session: str | None, space: str,
                      res: int, preferred: str | None = None) -> Path | None:
    """The preprocessed image the result figures are drawn on.

    ``preferred`` (``--report-modality``) when the subject has it, else FLAIR (or another
    lesion-showing contrast), else the first modality it has (its reference).
    """
    order = [*([preferred] if preferred else []), *LESION_MODALITIES, *MODALITIES]
    for modality in dict.fromkeys(order):
        path = bids.spec_path(output_dir, subject, session, bids.preproc_spec(space, res,
                                                                               modality))
        if path.is_file():
            return path
    return None


def _largest_cluster_peak(output_dir: Path, subject: str, session: str | None, space: str,
                          res: int, desc: str) -> list[float] | None:
    """Template coordinates of the largest cluster's peak (None: no cluster table or cluster)."""
    path = bids.spec_path(output_dir, subject, session, bids.clusters_spec(space, res, desc))
    if not path.is_file():
        return None
    table = pd.read_csv(path, sep="\t", na_values="n/a")
    if table.empty:
        return None
    first = table.sort_values("cluster_id").iloc[0]
    return [float(first[f"peak_{axis}"]) for axis in "xyz"]


def anomaly_overlay(output_dir: Path, map_path: Path) -> Path | None:
    """The three-plane overlay figure of an anomaly map, drawn when missing or out of date.

    The background is the subject's preprocessed image where lesions show (FLAIR when there is
    one), the cuts go through the peak of the largest cluster (the highest score inside the mask
    without a clusters table), and scores are shown from the model's calibrated threshold up
    (from the 95th percentile without one, as with FDR). None when there is no background, or
    when the model's outputs cannot be drawn (damaged: a warning says so).
    """
    from bids_anomaly.reports.figures import plot_anomaly_overlay

    entities = bids.parse_name(map_path)
    subject, session = entities["sub"], entities.get("ses")
    space, res, desc = entities["space"], int(entities["res"]), entities["desc"]
    out_file = bids.spec_path(output_dir, subject, session,
                              bids.anomaly_figure_spec(space, res, desc))
    if out_file.is_file() and out_file.stat().st_mtime >= map_path.stat().st_mtime:
        return out_file
    background = result_background(output_dir, subject, session, space, res)
    if background is None:
        return None
    mask = bids.spec_path(output_dir, subject, session, bids.anomaly_mask_spec(space, res, desc))
    name = f"sub-{subject}" + (f" ses-{session}" if session else "")
    modality = bids.parse_name(background)["suffix"]
    try:
        sidecar = bids.read_sidecar(map_path)
        return plot_anomaly_overlay(background, map_path, mask if mask.is_file() else None,
                                    out_file, title=f"{name}: {desc} on {modality}",
                                    threshold=sidecar.get("Threshold"),
                                    cut_coords=_largest_cluster_peak(output_dir, subject,
                                                                     session, space, res, desc),
                                    score_name=_score_name(sidecar))
    except Exception as error:  # noqa: BLE001  (a damaged map never stops the group report)
        LOGGER.warning("%s: no overlay of model %s: its outputs cannot be drawn (%s: %s)", name,
                       desc, error.__class__.__name__, " ".join(str(error).split())[:200])
        return None


def _score_name(sidecar: dict) -> str:
    """A short name of a model's score for colour bars."""
    definition = str(sidecar.get("ScoreDefinition") or "anomaly score")
    return definition if len(definition) <= 60 else definition[:57] + "..."


def anomaly_lightbox(output_dir: Path, map_path: Path, preferred: str | None = None,
                     truth: Path | None = None) -> tuple[Path | None, list[int]]:
    """The lightbox of an anomaly map through every cluster, drawn when missing or out of date.

    A figure newer than the map, the mask and the background image is kept: a participant run
    applying another model rewrites the page, not the figures of the models already done (they
    are recorded as finished derivatives). The ground-truth variant is always drawn (a file of
    its own).

    Parameters
    ----------
    preferred : str, optional
        The modality to draw on (``--report-modality``; default FLAIR, else the reference).
    truth : Path, optional
        Ground-truth lesions on the template grid (group ``--ground-truth``), outlined.

    Returns
    -------
    figure : Path or None
        None when the subject has no preprocessed image or no anomaly mask.
    missing : list of int
        Clusters the figure could not show.
    """
    from bids_anomaly.postprocessing.clusters import numbered_clusters
    from bids_anomaly.reports.figures import plot_lightbox

    out_file, mask_path, background = _lightbox_files(output_dir, map_path, preferred,
                                                      truth is not None)
    if background is None or not mask_path.is_file():
        return None, []
    if truth is None and _up_to_date(out_file, (map_path, mask_path, background)):
        return out_file, []
    entities = bids.parse_name(map_path)
    subject, session = entities["sub"], entities.get("ses")
    space, res, desc = entities["space"], int(entities["res"]), entities["desc"]
    import nibabel as nib
    import numpy as np

    scores = nib.load(map_path).get_fdata(dtype=np.float32)
    clusters = numbered_clusters(scores, np.asarray(nib.load(mask_path).dataobj) > 0)
    brain_path = bids.spec_path(output_dir, subject, session, bids.brain_mask_spec(space, res))
    brain = np.asarray(nib.load(brain_path).dataobj) > 0 if brain_path.is_file() else None
    truth_data = np.asarray(nib.load(truth).dataobj) > 0 if truth is not None else None
    sidecar = bids.read_sidecar(map_path)
    threshold = sidecar.get("Threshold")
    if threshold is None:  # FDR: the smallest flagged score
        flagged = scores[clusters > 0]
        threshold = float(flagged.min()) if flagged.size else float(np.percentile(scores, 99))
    elif not abs(float(threshold)) <= float(np.finfo(np.float32).max):  # NaN too
        raise ValueError(f"threshold {threshold} beyond the range of the maps' scores")
    name = f"sub-{subject}" + (f" ses-{session}" if session else "")
    modality = bids.parse_name(background)["suffix"]
    return plot_lightbox(background, map_path, clusters, out_file, float(threshold),
                         title=f"{name}: model {desc} on {modality}",
                         score_name=_score_name(sidecar), truth=truth_data, brain=brain)


def _lightbox_files(output_dir: Path, map_path: Path, preferred: str | None, truth: bool
                    ) -> tuple[Path, Path, Path | None]:
    """The lightbox of a map, the mask it outlines and the image it is drawn on."""
    entities = bids.parse_name(map_path)
    subject, session = entities["sub"], entities.get("ses")
    space, res, desc = entities["space"], int(entities["res"]), entities["desc"]
    out_file = bids.spec_path(output_dir, subject, session,
                              bids.lightbox_figure_spec(space, res, desc, truth))
    mask_path = bids.spec_path(output_dir, subject, session,
                               bids.anomaly_mask_spec(space, res, desc))
    return out_file, mask_path, result_background(output_dir, subject, session, space, res,
                                                  preferred)


def _up_to_date(out_file: Path, sources: Sequence[Path]) -> bool:
    """Whether ``out_file`` exists and is newer than every source."""
    return out_file.is_file() and all(out_file.stat().st_mtime_ns >= path.stat().st_mtime_ns
                                      for path in sources)


def _viewer(output_dir: Path, map_path: Path, preferred: str | None = None,
            on_page: set[str] | None = None) -> str | None:
    """The interactive viewer of a model's map and mask over the subject's images.

    Backgrounds: the image the results are drawn on and the reference (when another), to keep
    the page small (each 2 mm volume adds about 0.3 MB). The volumes are written beside the
    page (:func:`bids.viewer_volume_path`), each once, and loaded by ``<script src>``; those
    already on the page are in ``on_page``.
    """
    from bids_anomaly.reports.viewer import Overlay, viewer_html

    entities = bids.parse_name(map_path)
    subject, session = entities["sub"], entities.get("ses")
    space, res, desc = entities["space"], int(entities["res"]), entities["desc"]
    first = result_background(output_dir, subject, session, space, res, preferred)
    reference = result_background(output_dir, subject, session, space, res, "T1w")
    if first is None:
        return None
    backgrounds = {bids.parse_name(p)["suffix"]: p for p in (first, reference) if p is not None}
    overlays = [Overlay(map_path, f"{desc} score")]
    mask = bids.spec_path(output_dir, subject, session, bids.anomaly_mask_spec(space, res, desc))
    if mask.is_file():
        overlays.append(Overlay(mask, "anomaly mask", kind="mask"))
    threshold = bids.read_sidecar(map_path).get("Threshold")
    name = "-".join(filter(None, [subject, session, desc]))
    return viewer_html(backgrounds, overlays, threshold,
                       f"Interactive view: model {desc} (scroll through slices, move the "
                       "threshold; nothing is loaded from the network)",
                       element_id=f"viewer-{name}", volume_files=bids.viewer_volume_path,
                       page_dir=bids.subject_report_path(output_dir, subject).parent,
                       on_page=on_page)


def result_summary(clusters: pd.DataFrame | None) -> str:
    """One line: abnormal volume, number of clusters, the largest and where it is."""
    if clusters is None:
        return "No clusters table."
    if clusters.empty:
        return "Nothing above the threshold: no abnormal voxel."
    total = clusters["volume_mm3"].sum() / 1000
    first = clusters.sort_values("cluster_id").iloc[0]
    where = next((str(first[c]) for c in ("atlas_label", "tissue")
                  if c in clusters.columns and str(first[c]) not in ("none", "nan")), None)
    return (f"{total:.2f} ml abnormal in {len(clusters)} cluster"
            f"{'s' if len(clusters) > 1 else ''}; the largest, cluster 1: "
            f"{first['volume_mm3'] / 1000:.2f} ml" + (f" in {where}" if where else "")
            + f", peak score {first['peak_score']:.3g} at ({first['peak_x']:.0f}, "
            f"{first['peak_y']:.0f}, {first['peak_z']:.0f}) mm.")


def model_sections(output_dir: Path, inputs: bids.AnatInputs, space: str,
                   preferred: str | None = None,
                   truth: Mapping[tuple[str, str | None], Path] | None = None,
                   on_page: set[str] | None = None,
                   lightboxes: Mapping[Path, Any] | None = None) -> list[dict]:
    """Report sections of every model's result for one subject/session, result first.

    Per model: a one-line summary (abnormal volume, clusters, the largest and where it is),
    the lightbox through every cluster with the clusters numbered, the clusters table (same
    numbers), then the regional burden. A model whose outputs cannot be read or drawn
    (damaged files, an impossible threshold) gets a section saying so: the page is written.
    ``truth`` maps ``(subject, session)`` to its ground truth on the template grid (group
    ``--ground-truth``). ``on_page``: the viewer volume scripts already on the page.
    ``lightboxes``: what :func:`anomaly_lightbox` gave (or raised) for a map, drawn before
    (:func:`draw_lightboxes`); the others are drawn here.
    """
    sub, ses = inputs.subject, inputs.session
    heading = f"Session {ses}: " if ses else ""
    sections = []
    truth_file = (truth or {}).get((sub, ses))
    for map_path in bids.subject_anomaly_maps(output_dir, sub, ses, space):
        desc = bids.parse_name(map_path).get("desc", map_path.name)
        try:
            sections += _model_result(output_dir, map_path, heading, space, preferred,
                                      truth_file, on_page, (lightboxes or {}).get(map_path))
        except Exception as error:  # noqa: BLE001  (one model's outputs never stop the page)
            problem = " ".join(f"{error.__class__.__name__}: {error}".split())[:300]
            LOGGER.warning("%s: the outputs of model %s cannot be shown (%s)", inputs.name,
                           desc, problem)
            sections.append({"heading": f"{heading}model {desc}: result", "text": (
                f"The outputs of model {desc} cannot be shown ({problem}). They are damaged, "
                "or were written by a model with an impossible threshold: run the participant "
                "level again with a sound model.")})
    return sections


def _model_result(output_dir: Path, map_path: Path, heading: str, space: str,
                  preferred: str | None, truth_file: Path | None,
                  on_page: set[str] | None = None, lightbox: Any = None) -> list[dict]:
    """The sections of one model's result (see :func:`model_sections`)."""
    sections = []
    entities = bids.parse_name(map_path)
    sub, ses = entities["sub"], entities.get("ses")
    res, desc = int(entities["res"]), entities["desc"]
    sidecar = bids.read_sidecar(map_path)
    path = bids.spec_path(output_dir, sub, ses, bids.clusters_spec(space, res, desc))
    clusters = pd.read_csv(path, sep="\t", na_values="n/a") if path.is_file() else None
    text = [result_summary(clusters),
            f"Model {sidecar.get('Model', desc)} ({sidecar.get('ModelType', 'n/a')}): "
            f"{sidecar.get('ScoreDefinition', '')}"]
    if "Threshold" in sidecar:
        text.append(f"Mask: scores above {sidecar['Threshold']:.4g} "
                    f"({sidecar.get('ThresholdMethod', '')}).")
    if isinstance(lightbox, BaseException):  # drawn by a worker, which failed
        raise lightbox
    figure, missing = lightbox or anomaly_lightbox(output_dir, map_path, preferred, truth_file)
    if figure is not None and clusters is not None and not clusters.empty:
        text.insert(1, f"The slices below cut through {len(clusters) - len(missing)} of "
                       f"the {len(clusters)} clusters" + (
                           f" (not shown: {', '.join(map(str, missing))})." if missing
                           else ": all of them."))
    viewer = _viewer(output_dir, map_path, preferred, on_page)
    sections.append({"heading": f"{heading}model {desc}: result",
                     "text": "\n\n".join(text), "figures": [figure] if figure else [],
                     "table": None if clusters is None or clusters.empty
                     else clusters.head(MAX_CLUSTER_ROWS),
                     "html": viewer, "viewer": viewer is not None})
    if clusters is not None and len(clusters) > MAX_CLUSTER_ROWS:
        sections[-1]["text"] += (f"\n\nThe table lists the largest {MAX_CLUSTER_ROWS} of "
                                 f"{len(clusters)} clusters; all are in {path.name}.")
    path = bids.spec_path(output_dir, sub, ses, bids.regions_spec(space, res, desc))
    if path.is_file():
        sections.append({"heading": f"{heading}model {desc}: burden per region",
                         "table": pd.read_csv(path, sep="\t", na_values="n/a")})
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


def change_sections(output_dir: Path, subject: str) -> list[dict]:
    """Report sections of a subject's lesion change (``participant --longitudinal``).

    Per session pair: the counts and volumes of new, enlarging and shrinking lesions, the
    before / after / change lightbox with the changed lesions numbered, and their table (same
    numbers). Empty when the change was not measured.
    """
    path = bids.spec_path(output_dir, subject, None, bids.change_summary_spec())
    if not path.is_file():
        return []
    summary = pd.read_csv(path, sep="\t", dtype={"earlier": str, "later": str})
    sections = []
    for row in summary.to_dict("records"):
        earlier, later = row["earlier"], row["later"]
        counts = ", ".join(f"{row[f'{name}_count']} {name} ({row[f'{name}_ml']:.2f} ml)"
                           for name in ("new", "enlarging", "shrinking"))
        figure = bids.spec_path(output_dir, subject, later, bids.change_figure_spec(earlier))
        table_path = bids.spec_path(output_dir, subject, later,
                                    bids.change_clusters_spec(earlier))
        table = (pd.read_csv(table_path, sep="\t", na_values="n/a") if table_path.is_file()
                 else None)
        text = (f"Lesions changed between sessions {earlier} and {later}: {counts}. Rows: "
                f"session {earlier}, session {later} (the same midpoint grid), and the changed "
                "voxels over the later session (red: brighter later, blue: darker later), "
                "numbered as in the table.")
        sections.append({"heading": f"Lesion change: session {earlier} to {later}",
                         "text": text, "figures": [figure] if figure.is_file() else [],
                         "table": None if table is None or table.empty
                         else table.head(MAX_CLUSTER_ROWS)})
    return sections


def _lightbox_job(job: tuple) -> Any:
    """:func:`anomaly_lightbox` in a worker: its result, or the exception it raised."""
    try:
        return anomaly_lightbox(*job)
    except Exception as error:  # noqa: BLE001  (the page says why, as when drawn in-process)
        return error


def draw_lightboxes(output_dir: Path, subjects: list[bids.AnatInputs], space: str,
                    preferred: str | None = None,
                    truth: Mapping[tuple[str, str | None], Path] | None = None,
                    nprocs: int = 1) -> dict[Path, Any]:
    """The lightbox of every anomaly map of ``subjects``, drawn by ``nprocs`` processes.

    Each figure took about 2 s with nilearn (a run scoring 6 subjects with 3 models spent 36 s
    drawing them one after the other), 0.5 s with matplotlib alone (``plot_lightbox``); the 18
    take 5 s in 2 processes instead of 9 s in one. Returns what
    :func:`anomaly_lightbox` gave for each map, or the exception it raised (for
    :func:`model_sections`). With one process (or one figure) nothing is drawn here.
    """
    jobs = {}
    for inputs in subjects:
        truth_file = (truth or {}).get((inputs.subject, inputs.session))
        for map_path in bids.subject_anomaly_maps(output_dir, inputs.subject, inputs.session,
                                                  space):
            try:
                out_file, mask, background = _lightbox_files(output_dir, map_path, preferred,
                                                             truth_file is not None)
                if background is None or not mask.is_file() or (
                        truth_file is None and _up_to_date(out_file, (map_path, mask,
                                                                      background))):
                    continue  # nothing to draw
            except Exception:  # noqa: BLE001,S112  (a damaged name: the page says so)
                continue
            jobs[map_path] = (output_dir, map_path, preferred, truth_file)
    if nprocs < 2 or len(jobs) < 2:
        return {}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # a clean server process starts the workers: this one may hold torch's threads
    with ProcessPoolExecutor(min(nprocs, len(jobs)),
                             mp_context=multiprocessing.get_context("forkserver")) as pool:
        return dict(zip(jobs, pool.map(_lightbox_job, jobs.values()), strict=True))


def write_subject_reports(output_dir: Path, subjects: list[bids.AnatInputs],
                          space: str, preferred: str | None = None,
                          truth: Mapping[tuple[str, str | None], Path] | None = None,
                          nprocs: int = 1) -> list[Path]:
    """Write ``sub-<label>.html`` for every participant in ``subjects`` (all their sessions).

    The models' results come first (summary, lightbox, clusters), then the inputs' quality
    control. The pages are small: they reference their figures (``sub-<label>/figures/``),
    the viewers' volumes (written there as ``.js`` files, :func:`bids.viewer_volume_path`)
    and the viewer library, written once per dataset (:func:`bids.viewer_library_path`), by
    relative addresses; the derivatives folder opens offline wherever it is copied.

    Parameters
    ----------
    output_dir : Path
        Root of the derivatives.
    subjects : list of AnatInputs
        The subject/sessions processed.
    space : str
        Template name (the ``space-`` entity of the figures).
    preferred : str, optional
        The modality the results are drawn on (``--report-modality``).
    truth : dict, optional
        Ground truth on the template grid by ``(subject, session)``, outlined in the lightboxes.
    nprocs : int
        Processes drawing the lightboxes (:func:`draw_lightboxes`).

    Returns
    -------
    list of Path
        The pages written.
    """
    lightboxes = draw_lightboxes(output_dir, subjects, space, preferred, truth, nprocs)
    by_subject: dict[str, list[bids.AnatInputs]] = defaultdict(list)
    for inputs in subjects:
        by_subject[inputs.subject].append(inputs)
    pages = []
    library = None
    for subject, sessions in sorted(by_subject.items()):
        sections: list[dict] = change_sections(output_dir, subject)
        on_page: set[str] = set()
        ordered = sorted(sessions, key=lambda i: i.session or "")
        for inputs in ordered:
            sections.extend(model_sections(output_dir, inputs, space, preferred, truth,
                                           on_page, lightboxes))
        quality = [s for inputs in ordered for s in session_sections(output_dir, inputs, space)]
        if not (sections or quality):
            continue
        images = sorted({f"{m}: {p.name}" for i in sessions for m, p in i.images.items()}
                        | {f"dwi: {r.image.name}" for i in sessions for r in i.dwi}
                        | {f"{m}: {p.name}" for i in sessions for m, p in i.dwi_maps.items()})
        sections += [{"heading": "Inputs", "text": "\n\n".join(images)}, *quality]
        path = bids.subject_report_path(output_dir, subject)
        if library is None and any(section.get("viewer") for section in sections):
            from bids_anomaly.reports.viewer import write_library

            library = write_library(bids.viewer_library_path(output_dir))  # once per dataset
        pages.append(write_subject_report(path, f"sub-{subject}", sections, library=library,
                                          embed=False))
        LOGGER.info("report: %s", path)
    return pages
