"""Quality-control figures of preprocessing, drawn with matplotlib as SVG files.

Brain-mask contours over an image (:func:`plot_mask_contour`) and the edges of one image over
another (:func:`plot_edges`), on rows of sagittal, coronal and axial slices (:class:`_Mosaic`;
nilearn's mosaic display for the ``canny`` edges only). The metrics are in
:mod:`bids_anomaly.evaluation.registration`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bids_anomaly.imaging.images import load_3d, same_grid


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


def on_grid(img: nib.spatialimages.SpatialImage, reference: nib.spatialimages.SpatialImage
            ) -> nib.spatialimages.SpatialImage:
    """``img`` resampled (linearly) onto the grid of ``reference``, unless already on it."""
    if same_grid(img, reference):
        return img
    from nilearn.image import resample_to_img

    return resample_to_img(img, reference, interpolation="continuous", force_resample=True,
                           copy_header=True)


def foreground_box(data: np.ndarray, margin: int = 0) -> list[tuple[int, int]]:
    """``(start, stop)`` per axis of the box around the nonzero voxels, ``margin`` wider.

    The whole array when nothing is nonzero (the figures then show it all).
    """
    from scipy import ndimage

    found = ndimage.find_objects((data != 0).astype(np.uint8))
    if not found:
        return [(0, n) for n in data.shape]
    return [(max(0, s.start - margin), min(n, s.stop + margin))
            for s, n in zip(found[0], data.shape, strict=True)]


class _Mosaic:
    """Rows of sagittal, coronal and axial slices of one image, drawn with matplotlib alone.

    The subset of a nilearn mosaic display the QC figures use (:meth:`add_contours`,
    :meth:`savefig`, :meth:`close`), with one image per row instead of one axes per slice: a
    demo subject's 4 figures take 1.1 s instead of 2.4 s (14 of the demo's 120 node-seconds of
    preprocessing with nilearn). Slices are shown in the neurological convention:
    the subject's left on the left (coronal, axial), anterior on the right (sagittal), superior
    and anterior up.
    """

    GAP = 2
    """Voxels of black between two slices."""

    def __init__(self, img: nib.spatialimages.SpatialImage, cuts: dict[str, list[float]] | int,
                 vmin: float, vmax: float, title: str) -> None:
        import matplotlib.pyplot as plt

        canonical = nib.as_closest_canonical(img)
        self.grid = canonical
        data = np.nan_to_num(np.asarray(canonical.dataobj, dtype=np.float32))
        self.index = {}
        inverse = np.linalg.inv(canonical.affine)
        for axis, name in enumerate("xyz"):
            size = data.shape[axis]
            if isinstance(cuts, int):
                chosen = np.linspace(0, size - 1, cuts + 2)[1:-1]
            else:
                world = np.zeros((len(cuts[name]), 3))
                world[:, axis] = cuts[name]
                # the voxel index along this axis of each cut (the axes are RAS+ now)
                chosen = (nib.affines.apply_affine(inverse, world)[:, axis]
                          if canonical.affine[axis, axis] else np.full(len(world), size / 2))
            self.index[name] = [int(np.clip(round(float(v)), 0, size - 1)) for v in chosen]
        self.box = foreground_box(data)
        zooms = np.sqrt((canonical.affine[:3, :3] ** 2).sum(axis=0))
        rows = [self._row(data, name) for name in "xyz"]
        # each row as wide as the figure, its height from its slices' proportions in mm
        width = 12.0
        heights = []
        for name, row in zip("xyz", rows, strict=True):
            across, up = self._axes_of(name)
            mm_wide = row.shape[1] * zooms[across]
            heights.append(width * row.shape[0] * zooms[up] / mm_wide)
        top = 0.35 if title else 0.05
        self.figure = plt.figure(figsize=(width, sum(heights) + top + 0.05), facecolor="k")
        total = self.figure.get_size_inches()[1]
        self.axes = {}
        bottom = 0.05
        for name, row, height in reversed(list(zip("xyz", rows, heights, strict=True))):
            axis = self.figure.add_axes((0, bottom / total, 1, height / total))
            axis.set_axis_off()
            across, up = self._axes_of(name)
            axis.imshow(np.ma.masked_equal(row, 0),
                        cmap=plt.get_cmap("gray").with_extremes(bad="k"), vmin=vmin,
                        vmax=vmax, aspect=float(zooms[up] / zooms[across]),
                        interpolation="nearest")
            self._annotate(axis, name, row.shape)
            self.axes[name] = axis
            bottom += height
        if title:
            self.figure.text(0.005, 1 - 0.05 / total, title, color="w", fontsize=11, va="top")

    @staticmethod
    def _axes_of(name: str) -> tuple[int, int]:
        """The array axes across and up a slice cut along ``name``."""
        return {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[name]

    def _panel(self, data: np.ndarray, name: str, index: int) -> np.ndarray:
        view = [slice(*self.box[0]), slice(*self.box[1]), slice(*self.box[2])]
        view["xyz".index(name)] = index
        return data[tuple(view)].T[::-1]  # rows: top (superior or anterior) first

    def _row(self, data: np.ndarray, name: str) -> np.ndarray:
        panels = [self._panel(data, name, k) for k in self.index[name]]
        gap = np.zeros((panels[0].shape[0], self.GAP), dtype=np.float32)
        return np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)

    def _annotate(self, axis: Any, name: str, shape: tuple[int, int]) -> None:
        """The world coordinate of each slice, and which side is left."""
        across, up = self._axes_of(name)
        width = self.box[across][1] - self.box[across][0]
        axis_number = "xyz".index(name)
        for count, k in enumerate(self.index[name]):
            voxel = np.zeros(3)
            voxel[axis_number] = k
            world = nib.affines.apply_affine(self.grid.affine, voxel)[axis_number]
            axis.text(count * (width + self.GAP) + 1, shape[0] - 2, f"{name}={world:.0f}",
                      color="w", fontsize=8)
        if name != "x":
            axis.text(1, 1, "L", color="w", fontsize=9, va="top")
            axis.text(width - 2, 1, "R", color="w", fontsize=9, va="top", ha="right")

    def add_contours(self, img: nib.spatialimages.SpatialImage, levels: list[float],
                     colors: str, linewidths: float) -> None:
        """Isolines of ``img`` (any grid: resampled to the background's) at ``levels``."""
        img = on_grid(nib.as_closest_canonical(img), self.grid)
        data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32))
        for name, axis in self.axes.items():
            row = self._row(data, name)
            crossed = [v for v in levels if row.min() < v < row.max()]
            if crossed:  # (matplotlib warns about levels outside the data)
                axis.contour(row, levels=crossed, colors=colors, linewidths=linewidths)

    def savefig(self, out_file: str, **options: Any) -> None:
        self.figure.savefig(out_file, facecolor="k", **options)

    def close(self) -> None:
        import matplotlib.pyplot as plt

        plt.close(self.figure)


def _plot_background(image_file: str | Path, title: str,
                     focus: nib.spatialimages.SpatialImage | None = None,
                     nilearn_display: bool = False) -> Any:
    """Draw ``image_file`` as a mosaic of sagittal, coronal and axial slices.

    Parameters
    ----------
    image_file : path
        Background image.
    title : str
        Figure title.
    focus : nibabel image, optional
        Binary image whose nonzero voxels the cuts go through (default: the voxels of the
        background image above a tenth of its intensity window).
    nilearn_display : bool
        A nilearn mosaic display (for its ``add_edges``) instead of :class:`_Mosaic`.

    Returns
    -------
    _Mosaic or nilearn.plotting.displays.MosaicSlicer
        The display, to overlay on, save and close.
    """
    _use_agg()
    img = load_3d(image_file)
    vmin, vmax = _robust_window(img)
    if focus is None:
        focus = img
        foreground = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32)) > (
            vmin + 0.1 * (vmax - vmin))
    else:
        foreground = np.asarray(focus.dataobj) > 0
    cuts = _cut_coords(focus, foreground)
    if not nilearn_display:
        return _Mosaic(img, cuts, vmin, vmax, title)
    from nilearn import plotting

    return plotting.plot_anat(img, display_mode="mosaic", cut_coords=cuts, vmin=vmin,
                              vmax=vmax, title=title or None, black_bg=True, draw_cross=False,
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
    mask = load_3d(mask_file)
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

    edges = load_3d(edges_file)
    data = np.asarray(edges.dataobj, dtype=np.float32)
    display = _plot_background(image_file, title, nilearn_display=method == "canny")
    if method == "canny":
        display.add_edges(nib.Nifti1Image(np.nan_to_num(data), edges.affine), color="r")
    else:
        levels = _edge_levels(data)
        smooth = ndimage.gaussian_filter(np.nan_to_num(data), sigma=1.0)
        if levels:
            display.add_contours(nib.Nifti1Image(smooth, edges.affine), levels=levels,
                                 colors="r", linewidths=0.6)
    return _save(display, out_file)


