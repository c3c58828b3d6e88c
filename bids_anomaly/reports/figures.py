"""Figures of the anomaly reports: map overlays, ROC/PR curves, burden per group."""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_anomaly.imaging.images import load_3d
from bids_anomaly.reports.qc import _use_agg, foreground_box, on_grid, save_figure

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")


def peak_coordinates(map_file, mask_file=None) -> list[float]:
    """World coordinates of the highest score inside the mask (or anywhere without one).

    ``map_file`` and ``mask_file`` are paths or images.
    """
    from nilearn.image import load_img

    img = load_img(map_file)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if mask_file is not None:
        mask = np.asarray(load_img(mask_file).dataobj) > 0
        if mask.any():
            data = np.where(mask, data, -np.inf)
    index = np.unravel_index(int(np.argmax(data)), data.shape)
    return [float(v) for v in nib.affines.apply_affine(img.affine, index)]


def _drawable(threshold: float) -> float:
    """A threshold the plotting library can use: within float32's range (the maps' type)."""
    limit = float(np.finfo(np.float32).max) / 4
    return float(np.clip(threshold, -limit, limit))


def _finite_map(map_file: str | Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """An anomaly map to draw (NaN and infinite scores at 0) and its scores in float64.

    In float64 any threshold compares exactly (a float32 cast of a huge one overflows).
    """
    img = nib.load(str(map_file))
    scores = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float64), nan=0.0, posinf=0.0,
                           neginf=0.0)
    return nib.Nifti1Image(scores.astype(np.float32), img.affine, img.header), scores


def plot_anomaly_overlay(background_file: str | Path, map_file: str | Path,
                         mask_file: str | Path | None, out_file: str | Path,
                         title: str = "", threshold: float | None = None,
                         cut_coords: Sequence[float] | None = None,
                         score_name: str = "anomaly score") -> Path:
    """Anomaly map over an anatomical image in three planes through its strongest abnormality.

    Parameters
    ----------
    background_file : path
        Anatomical image on the map's grid (the preprocessed reference in template space).
    map_file : path
        Anomaly map; shown above ``threshold`` (default: its 95th percentile inside the brain).
    mask_file : path, optional
        Anomaly mask; its outline is drawn in green and the cuts go through its highest score.
    out_file : path
        PNG or SVG file; its folder is created.
    title : str
        Drawn on the figure.
    cut_coords : sequence of float, optional
        Where to cut (template millimetres), e.g. the peak of the largest cluster; default the
        highest score inside the mask.
    score_name : str
        The colour bar's label (with the threshold).

    Returns
    -------
    Path
        ``out_file``.
    """
    _use_agg()
    from nilearn import plotting

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    map_img, scores = _finite_map(map_file)
    mask_img = nib.load(str(mask_file)) if mask_file is not None else None
    inside = scores[scores != 0]
    if threshold is None:
        threshold = float(np.percentile(inside, 95)) if inside.size else 0.0
    threshold = _drawable(threshold)
    vmax = float(np.percentile(inside, 99.9)) if inside.size else 1.0
    if not (scores > threshold).any():
        title = f"{title}: nothing above the threshold".strip(": ")
    with warnings.catch_warnings():
        # nilearn warns "empty mask" when nothing is above the threshold: said in the title
        warnings.filterwarnings("ignore", message="empty mask")
        display = plotting.plot_stat_map(
            map_img, bg_img=str(background_file), display_mode="ortho",
            cut_coords=cut_coords or peak_coordinates(map_img, mask_img), threshold=threshold,
            vmax=max(vmax, threshold * 1.01, 1e-6), cmap="hot", title=title or None,
            black_bg=True, draw_cross=True, annotate=True, colorbar=True)
        label_colorbar(display, f"{score_name} (shown above {threshold:.3g})")
        if mask_img is not None and np.asarray(mask_img.dataobj).any():
            display.add_contours(mask_img, levels=[0.5], colors="lime", linewidths=0.8)
        try:
            save_figure(display, out_file, dpi=90)
        finally:
            display.close()
    return out_file


def label_colorbar(display, label: str) -> None:
    """Name a nilearn display's colour bar (nothing when it has none)."""
    colorbar = getattr(display, "_cbar", None)
    if colorbar is not None:
        colorbar.set_label(label, color="w", fontsize=8)


LIGHTBOX_COLUMNS = 6
"""Axial slices per row of the lightbox."""

LIGHTBOX_PANELS = 48
"""Most slices of a lightbox; clusters beyond them are named in its caption."""


def lightbox_slices(clusters: np.ndarray, brain: np.ndarray | None = None,
                    panels: int = LIGHTBOX_PANELS) -> tuple[list[int], list[int]]:
    """Axial slice indices that cut through every cluster (as few as possible, largest first).

    Parameters
    ----------
    clusters : numpy.ndarray
        Labels by cluster id (:func:`~bids_anomaly.postprocessing.clusters.numbered_clusters`).
    brain : numpy.ndarray, optional
        Brain mask: without clusters, six slices evenly spread over it.
    panels : int
        Most slices.

    Returns
    -------
    slices : list of int
        Increasing slice indices (last axis).
    missing : list of int
        Cluster ids that no chosen slice cuts (only when there are more than ``panels``).
    """
    count = int(clusters.max())
    if count == 0:
        extent = np.flatnonzero((brain if brain is not None else np.ones_like(clusters))
                                .any(axis=(0, 1)))
        if extent.size == 0:
            return [clusters.shape[2] // 2], []
        return sorted({int(v) for v in np.linspace(extent[0], extent[-1], 8)[1:-1].round()}), []
    from scipy import ndimage

    spans = [(s[2].start, s[2].stop - 1) for s in ndimage.find_objects(clusters)]
    centres = [c[2] for c in ndimage.center_of_mass(np.ones(clusters.shape), clusters,
                                                    np.arange(1, count + 1))]
    # fewest slices cutting every cluster: stab the z-intervals at their ends (optimal), then
    # move each slice, within the clusters it cuts, to the centre of the largest of them
    groups: list[list[int]] = []
    point = None
    for k in sorted(range(count), key=lambda k: spans[k][1]):
        if point is None or spans[k][0] > point:
            point = spans[k][1]
            groups.append([])
        groups[-1].append(k)
    groups.sort(key=min)  # the slices of the largest clusters first
    chosen, missing = [], []
    for group in groups:
        if len(chosen) >= panels:
            missing.extend(k + 1 for k in group)
            continue
        low = max(spans[k][0] for k in group)
        high = min(spans[k][1] for k in group)
        chosen.append(int(np.clip(round(centres[min(group)]), low, high)))
    return sorted(chosen), sorted(missing)


def _canonical(arrays: Sequence[np.ndarray | None], affine: np.ndarray
               ) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Arrays of one grid reordered to the closest RAS+ axes, and that grid's affine.

    As :func:`nibabel.as_closest_canonical` for several arrays at once: the third axis is then
    inferior to superior, the first left to right.
    """
    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return list(arrays), affine
    shape = next(a for a in arrays if a is not None).shape
    canonical = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return [None if a is None else nib.orientations.apply_orientation(a, ornt)
            for a in arrays], canonical


def plot_lightbox(background_file: str | Path, map_file: str | Path, clusters: np.ndarray,
                  out_file: str | Path, threshold: float, title: str = "",
                  score_name: str = "anomaly score", truth: np.ndarray | None = None,
                  brain: np.ndarray | None = None) -> tuple[Path, list[int]]:
    """Axial lightbox through every cluster: map above the threshold, mask and truth outlined.

    Slices are chosen by :func:`lightbox_slices`; each cluster is numbered (its ``cluster_id``)
    on the slice that cuts it, next to its voxels nearest its centre. Drawn with matplotlib
    alone, in the neurological convention (the subject's left on the left, anterior up, the
    slice's height in template millimetres under it), as one mosaic image: a demo patient's
    20 slices and 50 clusters take 0.5 s (with one nilearn display per row, as before, 1.2 s;
    a run scoring 6 subjects with 3 models draws 18).

    Parameters
    ----------
    background_file : path
        Anatomical image, normally on the map's grid (FLAIR when there is one); another grid
        is resampled to the map's.
    map_file : path
        Anomaly map.
    clusters : numpy.ndarray
        The mask's clusters labelled by cluster id on the map's grid (outlined in green).
    out_file : path
        PNG file.
    threshold : float
        Scores above it are coloured; the colour bar says so.
    truth : numpy.ndarray, optional
        Ground-truth lesions on the same grid, outlined in cyan.
    brain : numpy.ndarray, optional
        Brain mask, for the slices when nothing is flagged.

    Returns
    -------
    out_file : Path
    missing : list of int
        Clusters not shown (more than :data:`LIGHTBOX_PANELS` slices would be needed).
    """
    _use_agg()
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    map_img, scores = _finite_map(map_file)
    background = np.nan_to_num(np.asarray(on_grid(load_3d(background_file), map_img).dataobj,
                                          dtype=np.float32))
    (scores, background, clusters, truth, brain), affine = _canonical(
        [scores, background, np.asarray(clusters), truth, brain], map_img.affine)
    threshold = _drawable(threshold)
    inside = scores[scores > threshold]
    vmax = float(np.percentile(inside, 99)) if inside.size else threshold * 1.5 + 1e-6
    vmax = max(vmax, threshold * 1.01, threshold + 1e-6)
    slices, missing = lightbox_slices(clusters, brain)
    columns = min(len(slices), LIGHTBOX_COLUMNS)
    n_rows = -(-len(slices) // LIGHTBOX_COLUMNS)
    # one mosaic image: panels of the head's x-y extent (a margin around it), black between
    (x0, x1), (y0, y1), _ = foreground_box(background, margin=2)
    width, height, gap = x1 - x0, y1 - y0, 3
    pitch_x, pitch_y = width + gap, height + gap + 4  # room for the slice's height under it

    def panel(volume: np.ndarray, k: int) -> np.ndarray:
        return volume[x0:x1, y0:y1, slices[k]].T[::-1]  # rows top to bottom: anterior first

    def mosaic(volume: np.ndarray, fill: float = 0.0) -> np.ndarray:
        out = np.full((n_rows * pitch_y, columns * pitch_x), fill, dtype=volume.dtype)
        for k in range(len(slices)):
            row, column = divmod(k, LIGHTBOX_COLUMNS)
            out[row * pitch_y:row * pitch_y + height,
                column * pitch_x:column * pitch_x + width] = panel(volume, k)
        return out

    known = background != 0
    low, high = (np.percentile(background[known], [1, 99.5]) if known.any() else (0.0, 1.0))
    if high - low <= 1e-6 * max(abs(high), 1.0):  # a constant image: mid-grey
        low, high = low - 1.0, high + 1.0
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    aspect = float(zooms[1] / zooms[0])
    inch = 2.1 / width  # a panel 2.1 inches wide
    legend = (f"colour: {score_name} above the threshold {threshold:.3g}; green: anomaly mask "
              "(clusters numbered as in the table)")
    if truth is not None and truth.any():
        legend += "; cyan: ground truth"
    if missing:
        legend += f"; clusters {', '.join(map(str, missing[:10]))} not shown"
    legend = textwrap.fill(legend, width=int((inch * columns * pitch_x + 0.9) * 17))
    foot = 0.2 + 0.13 * legend.count("\n")  # inches under the panels for the legend
    figure = plt.figure(figsize=(inch * columns * pitch_x + 0.9,
                                 inch * aspect * n_rows * pitch_y + 0.5 + foot), facecolor="k")
    fig_w, fig_h = figure.get_size_inches()
    axis = figure.add_axes((0.05 / fig_w, foot / fig_h, inch * columns * pitch_x / fig_w,
                            inch * aspect * n_rows * pitch_y / fig_h))
    axis.set_axis_off()
    # voxels at 0 (outside the brain of a normalised image) black, the brain a little dimmed
    # for the colours above it
    axis.imshow(np.ma.masked_equal(mosaic(background), 0),
                cmap=plt.get_cmap("gray").with_extremes(bad="k"), vmin=low,
                vmax=low + (high - low) / 0.8, aspect=aspect, interpolation="nearest")
    hot = plt.get_cmap("hot")
    norm = colors.Normalize(threshold, vmax)
    axis.imshow(np.ma.masked_less_equal(mosaic(scores, fill=threshold), threshold), cmap=hot,
                norm=norm, aspect=aspect, interpolation="nearest")
    for outline, colour in ((clusters > 0, "lime"), (truth, "cyan")):
        if outline is not None and outline.any():
            axis.contour(mosaic(np.asarray(outline, dtype=np.uint8)), levels=[0.5],
                         colors=colour, linewidths=0.7)
    count = int(clusters.max())
    centres = {}
    if count:
        from scipy import ndimage

        index = np.arange(1, count + 1)
        centres = dict(zip(index, ndimage.center_of_mass(np.ones(clusters.shape), clusters,
                                                          index), strict=True))
    for k, z in enumerate(slices):
        row, column = divmod(k, LIGHTBOX_COLUMNS)
        left, top = column * pitch_x, row * pitch_y
        z_mm = float(nib.affines.apply_affine(affine, (0, 0, z))[2])
        axis.text(left, top + height + 0.5, f"z={z_mm:.0f}", color="w", fontsize=9, va="top")
        if column == 0:
            axis.text(left + 1, top + 1, "L", color="w", fontsize=9, va="top")
            axis.text(left + width - 1, top + 1, "R", color="w", fontsize=9, va="top",
                      ha="right")
        for cluster_id in np.unique(clusters[..., z]):
            if cluster_id == 0:
                continue
            points = np.argwhere(clusters[..., z] == cluster_id)
            centre = np.asarray(centres[cluster_id][:2])
            x, y = points[np.argmin(((points - centre) ** 2).sum(axis=1))]
            axis.text(left + x - x0 + 2, top + height - 1 - (y - y0) - 2, str(cluster_id),
                      color="w", fontsize=7, fontweight="bold",
                      bbox={"boxstyle": "round,pad=0.1", "fc": "#0a0", "ec": "none",
                            "alpha": 0.8})
    if count == 0:
        title = f"{title}: nothing above the threshold".strip(": ")
    figure.suptitle(title, color="w", fontsize=10, y=1 - 0.05 / fig_h, va="top")
    bar_axis = figure.add_axes(((inch * columns * pitch_x + 0.25) / fig_w, (foot + 0.05) / fig_h,
                                0.12 / fig_w, min(1.8, fig_h - 0.8) / fig_h))
    bar = figure.colorbar(cm.ScalarMappable(norm, hot), cax=bar_axis)
    bar.ax.tick_params(colors="w", labelsize=7)
    bar.outline.set_edgecolor("w")
    figure.text(0.01, 0.06 / fig_h, legend, color="w", fontsize=7, va="bottom")
    try:
        save_figure(figure, out_file, dpi=80, facecolor="k")
    finally:
        plt.close(figure)
    return out_file, missing


def _save(figure, out_file: Path) -> Path:
    import matplotlib.pyplot as plt

    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_figure(figure, out_file, bbox_inches="tight")
    finally:
        plt.close(figure)
    return out_file


def plot_curves(curves: Mapping[str, Mapping[str, np.ndarray]], out_file: str | Path,
                title: str = "") -> Path:
    """Voxel-wise ROC and precision-recall curves, one line per subject.

    Parameters
    ----------
    curves : dict
        Subject name to ``fpr``, ``tpr``, ``recall``, ``precision``, ``auroc`` and ``auprc``.
    out_file : path
        SVG or PNG file.
    """
    _use_agg()
    import matplotlib.pyplot as plt

    figure, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.2))
    for index, (name, curve) in enumerate(curves.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        roc.plot(curve["fpr"], curve["tpr"], color=colour, lw=1.2,
                 label=f"{name} ({curve['auroc']:.3f})")
        pr.plot(curve["recall"], curve["precision"], color=colour, lw=1.2,
                label=f"{name} ({curve['auprc']:.3f})")
    roc.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (AUROC)",
            xlim=(0, 1), ylim=(0, 1.01))
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall (AUPRC)",
           xlim=(0, 1), ylim=(0, 1.01))
    for axis in (roc, pr):
        axis.legend(fontsize=7, loc="lower right" if axis is roc else "upper right")
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return _save(figure, Path(out_file))


MEASURE_UNITS = {
    "abnormal_ml": "abnormal volume (ml)",
    "abnormal_fraction": "abnormal fraction of the brain",
    "n_clusters": "clusters (count)",
    "mean_score": "mean anomaly score (model units)",
    "p99_score": "99th percentile of the score (model units)",
    "abnormal_percent": "abnormal share of the region (%)",
}
"""Axis labels, with units, of the burden measures."""


def plot_burden_by_group(table: pd.DataFrame, measures: Sequence[str], out_file: str | Path,
                         title: str = "") -> Path:
    """Box plots of burden measures per participants.tsv group, every subject drawn as a dot."""
    _use_agg()
    import matplotlib.pyplot as plt

    groups = sorted(table["group"].astype(str).unique()) if "group" in table else ["all"]
    figure, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures), 3.6),
                                squeeze=False)
    rng = np.random.default_rng(0)
    for axis, measure in zip(axes[0], measures, strict=True):
        values = [pd.to_numeric(table.loc[table["group"].astype(str) == g, measure]
                                if "group" in table else table[measure],
                                errors="coerce").dropna().to_numpy() for g in groups]
        axis.boxplot(values, showfliers=False)
        axis.set_xticks(range(1, len(groups) + 1), groups, rotation=30, ha="right")
        for position, points in enumerate(values, start=1):
            axis.scatter(position + rng.uniform(-0.12, 0.12, len(points)), points, s=14,
                         color=_COLOURS[(position - 1) % len(_COLOURS)], zorder=3)
        axis.set_title(measure, fontsize=10)
        axis.set_ylabel(MEASURE_UNITS.get(measure, measure), fontsize=8)
        axis.set_xlabel("participants.tsv group", fontsize=8)
        axis.grid(alpha=0.3, axis="y")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, Path(out_file))


def plot_subject_roc(table: pd.DataFrame, measures: Sequence[str], control: str,
                     out_file: str | Path, title: str = "") -> Path:
    """ROC curves of burden measures separating all patients from the controls."""
    _use_agg()
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    truth = (table["group"].astype(str) != control).to_numpy()
    figure, axis = plt.subplots(figsize=(4.6, 4.2))
    for index, measure in enumerate(measures):
        values = pd.to_numeric(table[measure], errors="coerce").to_numpy()
        keep = np.isfinite(values)
        if len(set(truth[keep])) < 2:
            continue
        fpr, tpr, _ = roc_curve(truth[keep], values[keep])
        axis.plot(fpr, tpr, color=_COLOURS[index % len(_COLOURS)], lw=1.5,
                  label=f"{measure} ({roc_auc_score(truth[keep], values[keep]):.2f})")
    axis.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    axis.set(xlabel=f"false-positive rate ({control})", ylabel="true-positive rate (patients)",
             title=title or "patients vs controls", xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(fontsize=7, loc="lower right")
    axis.grid(alpha=0.3)
    return _save(figure, Path(out_file))


def plot_froc(curve: pd.DataFrame, out_file: str | Path, title: str = "",
              operating_point: tuple[float, float] | None = None) -> Path:
    """FROC curve: lesion-wise sensitivity against false positives per subject.

    Parameters
    ----------
    curve : pandas.DataFrame
        ``fp_per_subject`` and ``sensitivity`` (:func:`~bids_anomaly.evaluation.detection.froc`).
    out_file : path
        SVG or PNG file.
    operating_point : (float, float), optional
        False positives per subject and sensitivity at the calibrated threshold, marked.
    """
    _use_agg()
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    axis.step(curve["fp_per_subject"], curve["sensitivity"], where="post", color=_COLOURS[0],
              lw=1.5, label="FROC")
    if operating_point is not None:
        axis.plot(*operating_point, "o", color=_COLOURS[1],
                  label=f"calibrated threshold ({operating_point[0]:.1f} FP, "
                        f"{operating_point[1]:.2f})")
    for level in (1, 3):
        axis.axvline(level, color="#999", lw=0.8, ls="--")
    axis.set(xlabel="false positives per subject", ylabel="lesion-wise sensitivity",
             ylim=(0, 1.02), xlim=(0, 8.0))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    if title:
        axis.set_title(title)
    return _save(figure, Path(out_file))


def plot_centiles(curves: pd.DataFrame, points: pd.DataFrame, column: str,
                  out_file: str | Path, title: str = "", control: str | None = None) -> Path:
    """Regional measures against a covariate: fitted centile curves, participants on top.

    One panel per channel (rows) and region (columns).

    Parameters
    ----------
    curves : pandas.DataFrame
        ``region``, ``channel``, ``level`` (categorical covariates' levels, or "all"),
        ``column`` and ``p5``, ``p25``, ``p50``, ``p75``, ``p95``
        (:func:`~bids_anomaly.evaluation.norms.centile_curves`).
    points : pandas.DataFrame
        The participants' ``region``, ``channel``, ``z``, ``column``, ``level`` (as in
        ``curves``) and optionally ``group``; each is drawn at ``p50 + z * sd`` of the curves
        at its covariate value, i.e. at its own centile (its site effect removed)
        (:func:`~bids_anomaly.evaluation.norms.gather_norms`).
    column : str
        The covariate on the x axis (e.g. age).
    control : str, optional
        The controls' group: drawn as circles, every other group as crosses.
    """
    _use_agg()
    import matplotlib.pyplot as plt

    channels = list(dict.fromkeys(curves["channel"]))
    regions = list(dict.fromkeys(curves["region"]))
    levels = list(dict.fromkeys(curves["level"]))
    figure, axes = plt.subplots(len(channels), len(regions), squeeze=False,
                                figsize=(2.9 * len(regions), 2.5 * len(channels) + 0.6))
    points = points.assign(**{column: pd.to_numeric(points[column], errors="coerce")})
    for i, channel in enumerate(channels):
        for j, region in enumerate(regions):
            axis = axes[i][j]
            for k, level in enumerate(levels):
                colour = _COLOURS[k % len(_COLOURS)]
                part = curves[(curves["channel"] == channel) & (curves["region"] == region)
                              & (curves["level"] == level)]
                x = part[column].to_numpy()
                axis.fill_between(x, part["p5"], part["p95"], color=colour, alpha=0.12, lw=0)
                axis.fill_between(x, part["p25"], part["p75"], color=colour, alpha=0.2, lw=0)
                axis.plot(x, part["p50"], color=colour, lw=1.3,
                          label=f"{level}: median, 25-75, 5-95th centiles"
                          if i == 0 and j == 0 else None)
            shown = points[(points["channel"] == channel) & (points["region"] == region)]
            for k, level in enumerate(levels):
                colour = _COLOURS[k % len(_COLOURS)]
                subset = shown[shown["level"].astype(str) == level] if "level" in shown else shown
                subset = _on_curves(subset, curves[
                    (curves["channel"] == channel) & (curves["region"] == region)
                    & (curves["level"] == level)], column)
                is_control = (subset["group"].astype(str) == control
                              if control and "group" in subset.columns
                              else pd.Series(True, index=subset.index))
                axis.scatter(subset.loc[is_control, column], subset.loc[is_control, "shown"],
                             s=14, color=colour, edgecolor="white", lw=0.4, zorder=3)
                axis.scatter(subset.loc[~is_control, column], subset.loc[~is_control, "shown"],
                             s=22, color=colour, marker="x", lw=1.2, zorder=3)
            axis.set_title(f"{channel}, {region}", fontsize=9)
            axis.set_xlabel(column, fontsize=8)
            axis.set_ylabel(f"mean {channel} (normalised)", fontsize=8)
            axis.tick_params(labelsize=7)
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    note = ("each participant at its own z-score against its norms (site-adjusted); "
            + ("dots: controls, crosses: other groups" if control else "dots: participants"))
    figure.legend(handles, labels, loc="lower center", ncol=max(1, len(levels)), fontsize=7,
                  title=note, title_fontsize=7, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.08, 1, 0.97))
    return _save(figure, Path(out_file))



def _on_curves(points: pd.DataFrame, curve: pd.DataFrame, column: str) -> pd.DataFrame:
    """``points`` with ``shown``: the curve's median plus ``z`` of its spread at their value."""
    if curve.empty or points.empty:
        return points.assign(shown=np.nan)
    x = curve[column].to_numpy()
    median = np.interp(points[column], x, curve["p50"])
    spread = np.interp(points[column], x, (curve["p95"] - curve["p5"]) / (2 * 1.6448536))
    return points.assign(shown=median + pd.to_numeric(points["z"], errors="coerce") * spread)


CHANGE_SLICES = 6
"""Axial slices of a change lightbox at most (through the largest changed clusters)."""


def plot_change_lightbox(earlier: nib.Nifti1Image, later: nib.Nifti1Image,
                         score: nib.Nifti1Image, numbers: nib.Nifti1Image, threshold: float,
                         out_file: str | Path, title: str = "") -> Path:
    """Before, after and change of a session pair, on axial slices through the changes.

    Rows: the earlier session, the later one (both on the same grid), and the later one with
    the changed clusters over it (red: brighter later, new or enlarging; blue: darker later,
    shrinking), each cluster numbered as in its table. Columns: axial slices through the
    largest clusters (:data:`CHANGE_SLICES` at most), or through the brain's middle when
    nothing changed.
    """
    import matplotlib.pyplot as plt

    _use_agg()
    images = [nib.as_closest_canonical(i) for i in (earlier, later, score, numbers)]
    before, after, change, clusters = (np.asarray(i.dataobj) for i in images)
    clusters = clusters.astype(np.int32)
    count = int(clusters.max())
    slices: list[int] = []
    for number in range(1, count + 1):
        where = np.nonzero(clusters == number)
        if where[0].size == 0:
            continue
        k = int(np.round(np.median(where[2])))
        if all(abs(k - s) > 2 for s in slices):
            slices.append(k)
        if len(slices) == CHANGE_SLICES:
            break
    if not slices:
        inside = np.nonzero(after.any(axis=(0, 1)))[0]
        middle = int(inside.mean()) if inside.size else after.shape[2] // 2
        slices = [middle - 10, middle, middle + 10]
    slices = sorted(min(max(s, 0), after.shape[2] - 1) for s in slices)
    limits = [np.percentile(v[v != 0], [1, 99]) if np.any(v != 0) else (0.0, 1.0)
              for v in (before, after)]
    figure, axes = plt.subplots(3, len(slices), figsize=(2.4 * len(slices), 7.4),
                                squeeze=False, facecolor="black")
    grey = plt.get_cmap("gray").with_extremes(bad="black")  # outside the brain
    for column, k in enumerate(slices):
        for row, (volume, (low, high)) in enumerate(((before, limits[0]), (after, limits[1]),
                                                     (after, limits[1]))):
            axis = axes[row][column]
            axis.imshow(np.ma.masked_equal(volume[:, :, k].T, 0), origin="lower", cmap=grey,
                        vmin=low, vmax=high)
            axis.set_axis_off()
        axis = axes[2][column]
        flagged = np.abs(change[:, :, k]) > threshold
        overlay = np.zeros((*flagged.shape, 4))
        overlay[flagged & (change[:, :, k] > 0)] = (1.0, 0.15, 0.1, 0.8)
        overlay[flagged & (change[:, :, k] < 0)] = (0.2, 0.5, 1.0, 0.8)
        axis.imshow(overlay.transpose(1, 0, 2), origin="lower")
        for number in np.unique(clusters[:, :, k]):
            if number == 0:
                continue
            i, j = np.nonzero(clusters[:, :, k] == number)
            axis.text(i.mean() + 4, j.mean() + 4, str(number), color="yellow", fontsize=8,
                      fontweight="bold")
        axes[0][column].set_title(f"slice {k}", color="white", fontsize=8)
    for row, name in enumerate(("before", "after", "change")):
        axes[row][0].text(-0.05, 0.5, name, color="white", rotation=90, va="center",
                          ha="right", transform=axes[row][0].transAxes, fontsize=9)
    if title:
        figure.suptitle(title, color="white", fontsize=10)
    return _save(figure, Path(out_file))
