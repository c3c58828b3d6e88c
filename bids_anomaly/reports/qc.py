"""Quality control of preprocessing: figures, registration metrics and the per-subject page.

The figures are SVG files drawn with nilearn (brain-mask contours over an image, the edges of one
image over another). The metrics compare an image warped to the template with the template
itself: the Dice overlap of the two brain masks and Studholme's normalised mutual information of
the two images. :func:`flag_failures` turns metrics below :data:`QC_THRESHOLDS` into readable
reasons, and :func:`write_subject_report` gathers figures, tables and text into one
self-contained HTML page that opens offline.
"""

from __future__ import annotations

import base64
import html
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bids_anomaly import bids
from bids_anomaly.evaluation.metrics import dice
from bids_anomaly.images import same_grid

#: Minimum acceptable value of each registration metric (see :func:`flag_failures`).
#:
#: ``dice``: overlap of the brain mask warped to the template with the template's brain mask.
#: The pipeline's SyN registrations of 15 real scans (10 IXI T1w, 5 MSLUB T1w of which 4 clinical
#: thick-slice scans) gave 0.968-0.984; the template mask against itself shifted by 4 and 5 voxels
#: (8 and 10 mm) gives 0.91-0.92 and 0.89-0.90.
#:
#: ``nmi``: :func:`normalized_mutual_information` (64 bins) of the warped image and the template
#: image inside the template's brain mask. Values between two different brains are low even
#: when aligned; measured on the template grid (2 mm): the same 15 SyN registrations gave
#: 1.039-1.068 (warped brain) and 1.036-1.066 (normalised image), the clinical thick-slice scans
#: forming the lower end; the warped brains shifted by 2, 3, 5 and 10 voxels gave at most 1.042,
#: 1.031, 1.020 and 1.012, rotated by 10 and 20 degrees at most 1.026 and 1.014, and the native
#: brains left unregistered (identity transform) 1.006-1.018. The template against itself gives
#: 2.0, against itself shifted by 1, 3 and 10 voxels 1.137, 1.042 and 1.015. The threshold 1.03
#: passes every good registration measured, flags most shifts of 6 mm and every shift of 10 mm,
#: rotation of 10 degrees or unregistered image; smaller errors overlap with the spread between
#: subjects, and the Dice threshold is the more sensitive of the two.
QC_THRESHOLDS: dict[str, float] = {"dice": 0.9, "nmi": 1.03}

_DESCRIPTIONS = {
    "dice": ("Dice", "between the warped brain mask and the template mask"),
    "nmi": ("NMI", "between the warped image and the template image"),
}

_MIME_TYPES = {".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg",
               ".jpeg": "image/jpeg"}

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 90em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; background: #000; }
figcaption { font-size: 0.8em; color: #555; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; display: block;
        overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f0f0; }
.footer { font-size: 0.8em; color: #777; margin-top: 3em; }
"""


def _use_agg() -> None:
    """Select matplotlib's non-interactive Agg backend unless pyplot is already in use."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def save_figure(figure: Any, out_file: str | Path, **options: Any) -> Path:
    """Save a matplotlib figure or nilearn display so that the same figure gives the same bytes.

    SVG files otherwise carry the date and random element ids.
    """
    import matplotlib

    out_file = Path(out_file)
    metadata = {"Date": None} if out_file.suffix == ".svg" else {}
    with matplotlib.rc_context({"svg.hashsalt": "bids_anomaly"}):
        figure.savefig(str(out_file), metadata=metadata, **options)
    return out_file


def _load_3d(path: str | Path) -> nib.spatialimages.SpatialImage:
    """Load an image, dropping trailing singleton dimensions (a 3D volume stored as 4D)."""
    img = nib.load(str(path))
    if len(img.shape) > 3:
        if any(size != 1 for size in img.shape[3:]):
            raise ValueError(f"{path} is not a 3D image (shape {img.shape})")
        img = nib.Nifti1Image(np.asarray(img.dataobj).reshape(img.shape[:3]), img.affine,
                              img.header)
    return img


def _robust_window(img: nib.spatialimages.SpatialImage) -> tuple[float, float]:
    """Percentiles 1 and 99 of the finite nonzero voxels (the display's intensity window)."""
    data = np.asarray(img.dataobj, dtype=np.float64)
    values = data[np.isfinite(data) & (data != 0)]
    if values.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(values, [1, 99]))
    if vmax <= vmin:
        vmin, vmax = float(values.min()), float(values.max())
    if vmax <= vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def _cut_coords(img: nib.spatialimages.SpatialImage, foreground: np.ndarray,
                n_cuts: int = 6) -> dict[str, list[float]] | int:
    """World coordinates of evenly spaced cuts through the bulk of a foreground, per axis.

    The cuts span the 5th to 95th percentile of the foreground voxels' x, y and z coordinates,
    so that no slice falls outside the head or brain. Without foreground, ``n_cuts`` (nilearn
    then chooses).
    """
    index = np.argwhere(foreground)
    if len(index) == 0:
        return n_cuts
    index = index[:: max(1, len(index) // 200_000)]
    world = nib.affines.apply_affine(img.affine, index)
    low, high = np.percentile(world, [5, 95], axis=0)
    return {axis: np.linspace(low[i], high[i], n_cuts).round(1).tolist()
            for i, axis in enumerate("xyz")}


def _plot_background(image_file: str | Path, title: str,
                     focus: nib.spatialimages.SpatialImage | None = None) -> Any:
    """Draw ``image_file`` as a mosaic of axial, coronal and sagittal slices.

    Parameters
    ----------
    image_file : path
        Background image.
    title : str
        Figure title.
    focus : nibabel image, optional
        Binary image whose nonzero voxels the cuts go through (default: the voxels of the
        background image above a tenth of its intensity window).

    Returns
    -------
    nilearn.plotting.displays.MosaicSlicer
        The display, to overlay on, save and close.
    """
    _use_agg()
    from nilearn import plotting

    img = _load_3d(image_file)
    vmin, vmax = _robust_window(img)
    if focus is None:
        focus = img
        foreground = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32)) > (
            vmin + 0.1 * (vmax - vmin))
    else:
        foreground = np.asarray(focus.dataobj) > 0
    return plotting.plot_anat(img, display_mode="mosaic",
                              cut_coords=_cut_coords(focus, foreground), vmin=vmin, vmax=vmax,
                              title=title or None, black_bg=True, draw_cross=False,
                              annotate=True)


def _svg_path(out_file: str | Path) -> Path:
    """``out_file`` as a Path, checked to be an SVG file name."""
    out_file = Path(out_file)
    if out_file.suffix != ".svg":
        raise ValueError(f"QC figures are written as SVG, not {out_file.name}")
    return out_file


def _save(display: Any, out_file: Path) -> Path:
    """Save a nilearn display as SVG and close its figure."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_figure(display, out_file)
    finally:
        display.close()
    return out_file


def plot_mask_contour(image_file: str | Path, mask_file: str | Path, out_file: str | Path,
                      title: str = "") -> Path:
    """Draw an image with the contour of a brain mask over it, in three planes.

    Parameters
    ----------
    image_file : path
        Background image (3D).
    mask_file : path
        Binary mask; its 0.5 level is drawn in red. It may be on another grid than the image.
    out_file : path
        Output SVG file; its folder is created.
    title : str
        Title drawn on the figure.

    Returns
    -------
    Path
        ``out_file``.

    Notes
    -----
    The intensity window is the 1st to 99th percentile of the image's nonzero voxels, so that
    scanner units (values near 1e6) and negative values display well.
    """
    out_file = _svg_path(out_file)
    mask = _load_3d(mask_file)
    mask = nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.float32), mask.affine)
    display = _plot_background(image_file, title, focus=mask)
    if np.asarray(mask.dataobj).any():
        display.add_contours(mask, levels=[0.5], colors="r", linewidths=1.0)
    return _save(display, out_file)


def _otsu_levels(values: np.ndarray, nbins: int = 128) -> list[float]:
    """Two thresholds that split ``values`` into three classes (multi-level Otsu).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> values = np.concatenate([rng.normal(mean, 0.5, 1000) for mean in (1, 5, 9)])
    >>> low, high = _otsu_levels(values)
    >>> bool(2 < low < 4 and 6 < high < 8)
    True
    """
    hist, edges = np.histogram(values, bins=nbins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist) / hist.sum()
    moment = np.cumsum(hist * centers) / hist.sum()
    # class 0: bins < i, class 1: i <= bins < j, class 2: bins >= j
    i, j = np.triu_indices(nbins, k=1)
    i, j = i[i > 0], j[i > 0]
    w0, w1, w2 = weight[i - 1], weight[j - 1] - weight[i - 1], 1 - weight[j - 1]
    m0, m1, m2 = moment[i - 1], moment[j - 1] - moment[i - 1], moment[-1] - moment[j - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((w0 > 0) & (w1 > 0) & (w2 > 1e-12),
                           m0**2 / w0 + m1**2 / w1 + m2**2 / w2, -np.inf)
    best = int(np.argmax(between))
    return [float(edges[i[best]]), float(edges[j[best]])]


def _edge_levels(data: np.ndarray) -> list[float]:
    """Intensity levels whose isocontours outline the structures of an image."""
    finite = data[np.isfinite(data)]
    values = finite[finite != 0]
    if values.size and np.any((values > values.min()) & (values < values.max())):
        return _otsu_levels(values)
    if finite.size and finite.max() > finite.min():
        return [float(finite.min() + finite.max()) / 2]
    return []


def plot_edges(image_file: str | Path, edges_file: str | Path, out_file: str | Path,
               title: str = "", method: str = "contours") -> Path:
    """Draw an image with the edges of another image over it, in three planes.

    Used for the template's edges over the image warped to it, and for each coregistered
    modality with the reference image's edges.

    Parameters
    ----------
    image_file : path
        Background image (3D).
    edges_file : path
        Image whose edges are drawn in red. It may be on another grid than the background:
        each is sliced in its own grid, in world coordinates.
    out_file : path
        Output SVG file; its folder is created.
    title : str
        Title drawn on the figure.
    method : {"contours", "canny"}
        ``contours`` (default) draws the isocontours of the edges image, smoothed by a Gaussian
        of one voxel, at the two thresholds that split its nonzero intensities into three
        classes (multi-level Otsu): for a T1w brain, the outer brain surface and ventricles, and
        the grey/white matter boundary. ``canny`` uses nilearn's ``add_edges``, a 2D Canny filter
        per slice, which marks streaks of spurious edges outside the brain in slices where the
        edges image is mostly zero.

    Returns
    -------
    Path
        ``out_file``.
    """
    if method not in ("contours", "canny"):
        raise ValueError(f"unknown edge method {method!r}: use 'contours' or 'canny'")
    out_file = _svg_path(out_file)
    from scipy import ndimage

    edges = _load_3d(edges_file)
    data = np.asarray(edges.dataobj, dtype=np.float32)
    display = _plot_background(image_file, title)
    if method == "canny":
        display.add_edges(nib.Nifti1Image(np.nan_to_num(data), edges.affine), color="r")
    else:
        levels = _edge_levels(data)
        smooth = ndimage.gaussian_filter(np.nan_to_num(data), sigma=1.0)
        if levels:
            display.add_contours(nib.Nifti1Image(smooth, edges.affine), levels=levels,
                                 colors="r", linewidths=0.6)
    return _save(display, out_file)


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a histogram."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_information(a: np.ndarray, b: np.ndarray,
                                  mask: np.ndarray | None = None, bins: int = 64) -> float:
    """Studholme's normalised mutual information of two images, (H(A) + H(B)) / H(A, B).

    Parameters
    ----------
    a, b : numpy.ndarray
        Intensities, same shape.
    mask : numpy.ndarray of bool, optional
        Voxels to compare (default: all). Voxels that are not finite in either image are left
        out.
    bins : int
        Number of histogram bins along each axis of the joint histogram.

    Returns
    -------
    float
        From 1.0 (independent images) to 2.0 (each image determines the other), 1.0 when both
        images are constant.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=10_000)
    >>> normalized_mutual_information(x, x)
    2.0
    >>> round(normalized_mutual_information(x, -3 * x + 1), 6)
    2.0
    >>> y = np.random.default_rng(1).normal(size=10_000)
    >>> 1.0 <= normalized_mutual_information(x, y) < 1.1
    True
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes: {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != a.shape:
            raise ValueError(f"mask of shape {mask.shape} for images of shape {a.shape}")
        keep &= mask
    if not keep.any():
        raise ValueError("no voxels to compare (empty mask)")
    joint, _, _ = np.histogram2d(a[keep], b[keep], bins=bins)
    joint_entropy = _entropy(joint)
    if joint_entropy == 0:
        return 1.0
    return float((_entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0))) / joint_entropy)


def _same_grid(images: Mapping[str, nib.spatialimages.SpatialImage]) -> None:
    """Raise ValueError unless all images share shape and affine."""
    (first_name, first), *others = images.items()
    for name, img in others:
        if not same_grid(img, first):
            raise ValueError(
                f"{name} and {first_name} are not on the same grid "
                f"(shapes {img.shape[:3]} and {first.shape[:3]}, affines\n{img.affine}\nand\n"
                f"{first.affine})")


def registration_qc(warped_mask_file: str | Path, template_mask_file: str | Path,
                    warped_image_file: str | Path,
                    template_image_file: str | Path) -> dict[str, float]:
    """Measure how well an image was registered to the template.

    Parameters
    ----------
    warped_mask_file : path
        The subject's brain mask resampled to the template grid.
    template_mask_file : path
        The template's brain mask.
    warped_image_file : path
        The subject's image resampled to the template grid.
    template_image_file : path
        The template image.

    Returns
    -------
    dict
        ``dice`` of the two masks and ``nmi``, the :func:`normalized_mutual_information` of the
        two images inside the template mask (NaN when it is empty); compare them with
        :data:`QC_THRESHOLDS`.

    Raises
    ------
    ValueError
        If the four images are not on the same grid.

    Notes
    -----
    The NMI is measured inside the template mask, not inside the union of both masks: in the
    union, the zeros outside each brain make two non-overlapping masks look informative about
    each other (unregistered native brains scored 1.03-1.12 there, above good registrations).
    Voxels of the template brain that the warped image leaves empty still count against it.
    """
    images = {
        "the warped mask": _load_3d(warped_mask_file),
        "the template mask": _load_3d(template_mask_file),
        "the warped image": _load_3d(warped_image_file),
        "the template image": _load_3d(template_image_file),
    }
    _same_grid(images)
    data = {name: np.asarray(img.dataobj, dtype=np.float64) for name, img in images.items()}
    warped_mask = data["the warped mask"] > 0
    template_mask = data["the template mask"] > 0
    nmi = (normalized_mutual_information(data["the warped image"], data["the template image"],
                                         mask=template_mask)
           if template_mask.any() else float("nan"))
    return {"dice": dice(warped_mask, template_mask), "nmi": nmi}


def brain_volume_ml(mask_file: str | Path) -> float:
    """Volume of a brain mask in millilitres, measured in the space it is stored in.

    Compute it on the native-space mask: a mask warped to a template has the template's size.

    Parameters
    ----------
    mask_file : path
        Mask; voxels > 0 are brain.

    Returns
    -------
    float
        Number of brain voxels times the voxel volume (from the header's zooms, mm) / 1000.
    """
    img = _load_3d(mask_file)
    voxel_mm3 = float(np.prod(img.header.get_zooms()[:3]))
    return float(np.count_nonzero(np.asarray(img.dataobj) > 0) * voxel_mm3 / 1000.0)


def flag_failures(metrics: Mapping[str, float],
                  thresholds: Mapping[str, float] | None = None) -> list[str]:
    """Explain which QC metrics fall below their threshold.

    Parameters
    ----------
    metrics : dict
        Metric name to value, e.g. the output of :func:`registration_qc`; names without a
        threshold are ignored.
    thresholds : dict, optional
        Minimum acceptable values (default :data:`QC_THRESHOLDS`).

    Returns
    -------
    list of str
        One reason per failed metric (a NaN value fails), empty when everything passes.

    Examples
    --------
    >>> flag_failures({"dice": 0.72, "nmi": 1.3})
    ['Dice 0.72 < 0.90 between the warped brain mask and the template mask']
    >>> flag_failures({"dice": 0.97, "nmi": 1.3})
    []
    """
    thresholds = QC_THRESHOLDS if thresholds is None else thresholds
    reasons = []
    for name, threshold in thresholds.items():
        if name not in metrics:
            continue
        value = float(metrics[name])
        if np.isnan(value) or value < threshold:
            label, context = _DESCRIPTIONS.get(name, (name, ""))
            reasons.append(f"{label} {value:.2f} < {threshold:.2f} {context}".rstrip())
    return reasons


def _figure_html(path: str | Path) -> str:
    """An ``<figure>`` with the image embedded as a base64 data URI."""
    path = Path(path)
    mime = _MIME_TYPES.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {path.name}: figures must be SVG, PNG or JPEG")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return (f"<figure><img src=\"data:{mime};base64,{data}\" alt=\"{name}\">"
            f"<figcaption>{name}</figcaption></figure>")


def _table_html(table: Any) -> str:
    """An HTML table from a DataFrame or a list of dicts (cells escaped)."""
    import pandas as pd

    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
    return frame.to_html(index=False, float_format="%.3f", na_rep="n/a", escape=True,
                         border=0)


def write_subject_report(out_file: str | Path, title: str,
                         sections: Sequence[Mapping[str, Any]]) -> Path:
    """Write one subject's QC page: a self-contained HTML file that opens offline.

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

    Notes
    -----
    Figures are embedded as base64 data URIs and the style is inline, so the page references no
    other file and can be moved or sent on its own.
    """
    from bids_anomaly import __version__

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
            parts.append(_table_html(table))
        for figure in section.get("figures") or []:
            parts.append(_figure_html(figure))
        parts.append("</section>")
    escaped_title = html.escape(title)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escaped_title}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escaped_title}</h1>" + "\n".join(parts)
        + f"<p class=\"footer\">bids_anomaly {html.escape(__version__)}</p></body></html>\n"
    )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    bids.update_text(out_file, page)
    return out_file
