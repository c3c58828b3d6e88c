"""An interactive NIfTI viewer for the self-contained HTML reports, built on NiiVue.

The report pages are single HTML files opened from disk, with no server and no network.
:func:`viewer_html` returns an HTML fragment (a ``<div>`` with a ``<canvas>``, controls and
inline scripts) in which the volumes are embedded as base64 gzipped NIfTI; the NiiVue
library (vendored in ``bids_anomaly/reports/assets`` by ``scripts/vendor_niivue.py``,
BSD-2-Clause) is inlined by :func:`library_html`, once per page, however many viewers the
page holds. Nothing is loaded from anywhere else: no ``src=`` or ``href=`` outside the page,
no web fonts (NiiVue draws text with its built-in bitmap font), no fetched colormaps.

Example
-------
>>> from bids_anomaly.reports.viewer import Overlay, library_html, viewer_html
>>> fragment = viewer_html(
...     {"T1w": t1w, "FLAIR": flair},
...     [Overlay(score_map, "anomaly score"), Overlay(mask, "anomalies", kind="mask")],
...     threshold=3.0, title="sub-01 anomaly map", element_id="viewer-sub-01",
... )  # doctest: +SKIP
>>> page = f"<!DOCTYPE html><html><body>{library_html()}{fragment}</body></html>"
... # doctest: +SKIP
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine

OverlayKind = Literal["map", "mask"]

#: NiiVue colormap and opacity of each overlay kind, unless the :class:`Overlay` sets its own.
DEFAULT_STYLE: dict[str, tuple[str, float]] = {"map": ("warm", 1.0), "mask": ("green", 1.0)}

#: Levels of the int16 encoding of continuous maps (the step is ``max(|map|) / MAP_LEVELS``).
MAP_LEVELS = 4000

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SUFFIX = re.compile(r"_([A-Za-z0-9]+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class Overlay:
    """A volume drawn over the background in :func:`viewer_html`.

    Parameters
    ----------
    path : Path or str
        NIfTI file on the background's grid or any other grid (NiiVue resamples overlays
        to the background through their affines).
    name : str
        Label shown next to its controls.
    kind : {"map", "mask"}
        ``"map"``: a continuous anomaly map, shown above the viewer's threshold, which the
        threshold slider moves, with a colour bar. ``"mask"``: a binary (or label) mask, its
        non-zero voxels outlined (or filled) in one colour. Each has a checkbox to hide it.
    colormap : str, optional
        A NiiVue colormap name (e.g. ``"warm"``, ``"hot"``, ``"red"``, ``"green"``); ``"warm"``
        for maps and ``"green"`` for masks by default.
    opacity : float, optional
        Between 0 and 1; 1 by default.
    outline : bool, optional
        Masks only: draw the outline of their non-zero voxels in the colormap's brightest
        colour (by default, so that the map stays visible inside), or else fill them with
        the colormap.
    """

    path: Path | str
    name: str
    kind: OverlayKind = "map"
    colormap: str | None = None
    opacity: float | None = None
    outline: bool = True

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_STYLE:
            raise ValueError(f"Overlay kind must be 'map' or 'mask', not {self.kind!r}")
        if self.opacity is not None and not 0 <= self.opacity <= 1:
            raise ValueError(f"Overlay opacity must be within [0, 1], not {self.opacity}")

    @property
    def style(self) -> tuple[str, float]:
        """The colormap and opacity, defaults filled in."""
        colormap, opacity = DEFAULT_STYLE[self.kind]
        return (self.colormap or colormap,
                opacity if self.opacity is None else float(self.opacity))


@cache
def niivue_version() -> str:
    """The version of the vendored NiiVue library.

    Returns
    -------
    str
        E.g. ``"0.69.0"``.
    """
    return _asset("NIIVUE_VERSION").strip()


@cache
def _asset(name: str) -> str:
    """A vendored asset's text (``.gz`` files are decompressed: the bundle is kept gzipped)."""
    data = resources.files("bids_anomaly.reports").joinpath("assets", name).read_bytes()
    return (gzip.decompress(data) if name.endswith(".gz") else data).decode("utf-8")


def _script(code: str) -> str:
    """Inline JavaScript in a ``<script>`` element, after checking its text cannot end it."""
    if re.search(r"</script|<!--", code, flags=re.IGNORECASE):
        raise ValueError("this JavaScript cannot be inlined as is: it holds </script or <!--")
    return f"<script>{code}</script>"


_STYLE = """
.ba-viewer{font:14px/1.4 sans-serif;margin:1em 0;max-width:1200px}
.ba-viewer .ba-title{font-weight:bold;margin-bottom:.3em}
.ba-viewer .ba-controls{display:flex;flex-wrap:wrap;gap:.4em 1.4em;align-items:center;
  margin-bottom:.4em}
.ba-viewer .ba-controls label{white-space:nowrap}
.ba-viewer .ba-controls input[type=range]{vertical-align:middle;width:14em}
.ba-viewer output{font-family:monospace;display:inline-block;min-width:4.5em}
.ba-viewer .ba-canvas{width:100%;height:400px;background:#000;position:relative}
.ba-viewer .ba-status{font-family:monospace;font-size:12px;min-height:1.4em;color:#444}
.ba-viewer.ba-failed .ba-status{color:#b00}
"""

# The controller: builds one NiiVue instance per viewer <div> from its JSON spec.
_CONTROLLER = """
(function () {
  "use strict";
  if (window.bidsAnomalyViewer) return;
  const instances = {};  // the Niivue object of each viewer, by id
  function load(volume) {
    // inline ("data") or from a <script src> file that defined it ("ref")
    const data = volume.data || (window.bidsAnomalyVolumes || {})[volume.ref];
    if (!data) throw new Error("missing volume file " + volume.ref);
    return niivue.NVImage.loadFromBase64({
      base64: data, name: volume.file, colormap: volume.colormap,
      opacity: volume.opacity, cal_min: volume.cal_min, cal_max: volume.cal_max,
      trustCalMinMax: false, colorbarVisible: volume.colorbar});
  }
  async function start(id) {
    const root = document.getElementById(id);
    if (!root || root.dataset.started) return;
    root.dataset.started = "true";
    const status = root.querySelector(".ba-status");
    const control = (name) => root.querySelector("[data-control=" + name + "]");
    try {
      if (typeof niivue === "undefined") throw new Error("the NiiVue library is not on the page");
      const spec = JSON.parse(root.querySelector("script.ba-data").textContent);
      const nv = new niivue.Niivue({
        backColor: [0, 0, 0, 1], isColorbar: true, dragAndDropEnabled: false,
        isOrientationTextVisible: true, logLevel: "error", loadingText: "loading...",
        multiplanarShowRender: niivue.SHOW_RENDER.NEVER,
        crosshairColor: [0.3, 0.7, 1, 0.8], crosshairWidthUnit: "percent",
        crosshairWidth: 0.5});
      await nv.attachToCanvas(root.querySelector("canvas"));
      const backgrounds = await Promise.all(spec.backgrounds.map(load));
      const overlays = await Promise.all(spec.overlays.map(load));
      overlays.forEach((image, i) => {
        const layer = spec.overlays[i];
        if (layer.kind !== "mask" || !layer.outline) return;
        // a label LUT of one colour (the top of the colormap), transparent: NiiVue draws
        // the outline of label volumes (intent "label") at the atlasOutline alpha
        const lut = niivue.cmapper.colormap(layer.colormap);
        const [r, g, b] = lut.slice(255 * 4, 255 * 4 + 3);
        const n = Math.max(1, Math.round(layer.cal_max)) + 1;
        image.setColormapLabel({R: Array(n).fill(r), G: Array(n).fill(g), B: Array(n).fill(b),
          A: Array(n).fill(0), I: [...Array(n).keys()]});
        nv.opts.atlasOutline = 1;
      });
      nv.addVolume(backgrounds[0]);
      overlays.forEach((image) => nv.addVolume(image));
      nv.setSliceType(niivue.SLICE_TYPE.MULTIPLANAR);
      if (spec.focus) {  // start at the anomaly map's peak
        nv.scene.crosshairPos = nv.mm2frac(spec.focus);
        nv.drawScene();
      }
      let current = backgrounds[0];
      const background = control("background");
      if (background) background.addEventListener("change", () => {
        const next = backgrounds[Number(background.value)];
        if (next === current) return;
        nv.addVolume(next);
        nv.setVolume(next, 0);
        nv.removeVolume(current);
        current = next;
      });
      const view = control("view");
      view.addEventListener("change", () => {
        const [type, render] = view.value.split(":").map(Number);
        nv.opts.multiplanarShowRender = render;
        nv.setSliceType(type);
      });
      const threshold = control("threshold");
      if (threshold) {
        const value = root.querySelector("output[data-control=threshold-value]");
        const apply = () => {
          const level = Number(threshold.value);
          value.textContent = Number(level.toPrecision(3)).toString();
          overlays.forEach((image, i) => {
            if (spec.overlays[i].kind !== "map") return;
            image.cal_min = level;
            image.cal_max = Math.max(spec.overlays[i].cal_max, level + 1e-6);
          });
          nv.updateGLVolume();
        };
        threshold.addEventListener("input", apply);
        apply();  // NiiVue sets its own display range on loading: start at the threshold
      }
      root.querySelectorAll("input[data-overlay]").forEach((box) => box.addEventListener(
        "change", () => {
          const index = Number(box.dataset.overlay);
          const image = overlays[index];
          nv.setOpacity(nv.volumes.indexOf(image), box.checked ? spec.overlays[index].opacity : 0);
        }));
      nv.onLocationChange = (location) => { status.textContent = location.string || ""; };
      status.textContent = "Click: move the crosshair. Wheel: scroll through the slices."
        + " Right drag: grey-level contrast.";
      instances[id] = nv;
      root.dataset.ready = "true";
    } catch (error) {
      root.classList.add("ba-failed");
      status.textContent = "The viewer could not start (WebGL2 needed): " + error;
      root.dataset.ready = "failed";
    }
  }
  // the viewers' <div>s queue their ids in window.bidsAnomalyViewers, before or after
  // this script: start them once the document is parsed, and any added later at once
  const queue = window.bidsAnomalyViewers = window.bidsAnomalyViewers || [];
  const run = () => {
    queue.forEach(start);
    queue.push = (...ids) => { ids.forEach(start); return Array.prototype.push.apply(queue, ids); };
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", run);
  else run();
  window.bidsAnomalyViewer = {start, instances};
})();
"""


def library_html(src: str | None = None) -> str:
    """The NiiVue library and the viewers' script and style, to include once per page.

    Place it anywhere in the page (the viewers start once the document is parsed). Inline,
    it is about 2.3 MB of JavaScript, preceded by NiiVue's licence notices in a comment.

    Parameters
    ----------
    src : str, optional
        Relative address of the library written by :func:`write_library` (shared by the
        pages of one folder): the page loads it with ``<script src>``, which browsers allow
        from ``file://`` pages. None: the library is inlined.

    Returns
    -------
    str
        ``<style>`` and ``<script>`` elements.
    """
    if src is not None:
        return (f"<style>{_STYLE}</style>\n"
                f'<script src="{html.escape(src)}"></script>\n')
    notice = re.sub(r"-(?=-)", "- ", _asset("NIIVUE_LICENSE"))  # no "--" in an HTML comment
    return (f"<style>{_STYLE}</style>\n<!--\n{notice}\n-->\n"
            + _script(_asset("niivue.js.gz")) + "\n" + _script(_CONTROLLER) + "\n")


def write_library(path: Path | str) -> Path:
    """Write the NiiVue library and the viewers' script as one JavaScript file.

    NiiVue's licence notices head it in a comment. The file is rewritten only when its
    content changes. Pages load it with ``library_html(src=...)``.

    Returns
    -------
    Path
        ``path``.
    """
    from bids_anomaly.bids import update_text

    notice = _asset("NIIVUE_LICENSE").replace("*/", "* /")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return update_text(path, f"/*\nNiiVue {niivue_version()}\n{notice}\n*/\n"
                             f"{_asset('niivue.js.gz')}\n{_CONTROLLER}")


def write_volume_script(path: Path | str, key: str, data: str) -> Path:
    """Write a base64 volume as a script that defines ``window.bidsAnomalyVolumes[key]``."""
    from bids_anomaly.bids import update_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return update_text(path, "(window.bidsAnomalyVolumes = window.bidsAnomalyVolumes || {})"
                             f"[{json.dumps(key)}] = \"{data}\";\n")


def _load_3d(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    if len(image.shape) == 4 and image.shape[3] == 1:
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise ValueError(f"{path}: the viewer shows 3D volumes, not shape {image.shape}")
    return image


def _quantized(data: np.ndarray, affine: np.ndarray, dtype: type, low: float,
               high: float, levels: int) -> nib.Nifti1Image:
    """``data`` clipped to ``[low, high]`` and stored as ``dtype`` codes with a slope."""
    slope = (high - low) / levels if high > low else 1.0
    codes = np.rint((np.clip(data, low, high) - low) / slope)
    image = nib.Nifti1Image(codes.astype(dtype), affine)
    image.header.set_slope_inter(slope, low)
    return image


def _downsample(data: np.ndarray, affine: np.ndarray, factor: int,
                reduce: Literal["mean", "max"]) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of ``factor**3`` voxels reduced to one (zero padding at the far edges)."""
    pad = [(0, -n % factor) for n in data.shape]
    data = np.pad(data, pad)
    blocks = data.reshape(data.shape[0] // factor, factor, data.shape[1] // factor, factor,
                          data.shape[2] // factor, factor)
    data = blocks.max(axis=(1, 3, 5)) if reduce == "max" else blocks.mean(axis=(1, 3, 5))
    # the new voxel i is centred on the old voxels factor * i + (factor - 1) / 2
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2
    return data.astype(np.float32), affine @ scale


def encode_volume(path: Path | str, kind: Literal["anatomy", "map", "mask"], *,
                  downsample: int = 1, outline: bool = True) -> tuple[str, dict]:
    """Compact a volume for embedding and return it as base64 gzipped NIfTI.

    Anatomical images become uint8 (256 grey levels between the 0.05th and 99.95th
    percentiles, with a slope and intercept, so that NiiVue shows the original units; images
    with integer values within [0, 255] are kept exact); continuous maps int16
    (``MAP_LEVELS`` levels of ``max(|map|)``, zero kept exact); masks uint8 labels (binarised
    unless they hold integer labels within [0, 255]). The result is gzipped.

    Parameters
    ----------
    path : Path or str
        A 3D NIfTI file.
    kind : {"anatomy", "map", "mask"}
        How to encode it.
    outline : bool, optional
        Masks only: mark them as label volumes (NIfTI intent ``"label"``), which NiiVue can
        outline. Leave it False for a mask filled with a colormap.
    downsample : int, optional
        Integer factor to shrink the grid by before encoding (blocks of ``downsample**3``
        voxels: their mean for anatomy, their maximum for maps and masks, so that small
        anomalies stay visible). 1: keep the grid.

    Returns
    -------
    str
        The base64 text of the ``.nii.gz``.
    dict
        ``min``, ``max`` and ``p95`` (95th percentile of the non-zero voxels) of the data,
        before encoding, and ``peak``: the world coordinates (mm) of the maximum of a map or
        of the centre of a mask's voxels, None if it has no positive voxel.
    """
    if kind not in ("anatomy", "map", "mask"):
        raise ValueError(f"unknown volume kind {kind!r}")
    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, not {downsample}")
    stat = os.stat(path)
    data, stats = _encoded(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, kind,
                           int(downsample), outline)
    return data, dict(stats)


@lru_cache(maxsize=64)
def _encoded(path: str, mtime_ns: int, size: int, kind: str, downsample: int,
             outline: bool) -> tuple[str, dict]:
    """:func:`encode_volume` of one version of a file (its time and size in the key).

    A page shows each background under every model of the subject: encoded once (gzip at
    level 9, again for every model, took 4.8 of the 22 s that the demo's pages took to
    write).
    """
    image = _load_3d(Path(path))
    data = np.nan_to_num(np.asarray(image.dataobj, dtype=np.float32), nan=0.0, posinf=0.0,
                         neginf=0.0)
    affine = image.affine
    nonzero = data[data != 0]
    stats = {"min": float(data.min()), "max": float(data.max()),
             "p95": float(np.percentile(nonzero, 95)) if nonzero.size else 0.0,
             "peak": _peak_mm(data, affine, kind)}
    if downsample > 1:
        data, affine = _downsample(data, affine, int(downsample),
                                   "mean" if kind == "anatomy" else "max")
    integers = bool(np.all(data >= 0) and np.all(data <= 255)
                    and np.array_equal(np.rint(data), data))
    if kind == "mask":
        labels = data if integers else data > 0
        encoded = nib.Nifti1Image(labels.astype(np.uint8), affine)
        if outline:
            encoded.header.set_intent("label")
    elif kind == "map":
        bound = float(np.abs(data).max())
        slope = bound / MAP_LEVELS if bound > 0 else 1.0  # zero stays exact: code 0
        encoded = nib.Nifti1Image(np.rint(data / slope).astype(np.int16), affine)
        encoded.header.set_slope_inter(slope, 0.0)
    elif integers:
        encoded = nib.Nifti1Image(data.astype(np.uint8), affine)
    else:
        low, high = (float(v) for v in np.percentile(data, [0.05, 99.95]))
        encoded = _quantized(data, affine, np.uint8, min(low, 0.0), high, 255)
    header = image.header
    for form in ("qform", "sform"):  # keep the space (e.g. MNI) that the input declares
        code = int(header[f"{form}_code"]) if f"{form}_code" in header else 0
        getattr(encoded.header, f"set_{form}")(affine, code=code or 1)
    # level 6: 0.4 % larger than level 9 on a demo map, and 2.5 times faster
    payload = gzip.compress(encoded.to_bytes(), compresslevel=6, mtime=0)
    return base64.b64encode(payload).decode("ascii"), stats


def _peak_mm(data: np.ndarray, affine: np.ndarray, kind: str) -> list[float] | None:
    if kind == "anatomy" or not np.any(data > 0):
        return None
    if kind == "map":
        voxel = np.array(np.unravel_index(np.argmax(data), data.shape), dtype=float)
    else:
        voxel = np.rint(np.argwhere(data > 0).mean(axis=0))
    return [round(float(v), 2) for v in apply_affine(affine, voxel)]


def _modality_name(path: Path) -> str:
    match = _SUFFIX.search(Path(path).name)
    return match.group(1) if match else Path(path).name.split(".")[0]


def _json_for_script(value: object) -> str:
    """JSON safe inside a ``<script>`` element."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def viewer_html(background: Path | str | Mapping[str, Path | str], overlays: Sequence[Overlay],
                threshold: float | None, title: str, element_id: str = "viewer", *,
                height: int = 400, downsample: int = 1,
                include_library: bool = False,
                volume_files: Callable[[Path], Path] | None = None,
                page_dir: Path | str | None = None,
                on_page: set[str] | None = None) -> str:
    """An interactive NiiVue viewer of a background volume and its overlays, as HTML.

    The fragment embeds the volumes (see :func:`encode_volume`) and needs the library of
    :func:`library_html` once on the page (or ``include_library=True`` for a page with a
    single viewer). It shows a multiplanar view (a view selector switches to single planes
    or a 3D render; the mouse wheel scrolls through slices, a click moves the crosshair),
    a background selector when several modalities are given, a threshold slider with its
    value for the ``"map"`` overlays (which are drawn from the threshold up, with a colour
    bar) and a checkbox per overlay to hide it.

    Parameters
    ----------
    background : Path, str or mapping of str to Path
        The background volume, shown in grey, or several modalities by name (e.g.
        ``{"T1w": ..., "FLAIR": ...}``), the first shown first. A single path is named
        after its BIDS suffix.
    overlays : sequence of Overlay
        Drawn in this order over the background: put masks after maps to see them on top.
    threshold : float or None
        Lower display bound of the ``"map"`` overlays, the slider's initial value. None:
        the 95th percentile of the first map's non-zero voxels.
    title : str
        Caption above the viewer (plain text, escaped).
    element_id : str, optional
        HTML id of the viewer's ``<div>``, unique within the page (letters, digits, ``-``,
        ``_``).
    height : int, optional
        Height of the canvas, in CSS pixels.
    downsample : int, optional
        Shrink every volume's grid by this integer factor before embedding (see
        :func:`encode_volume`); e.g. 2 for 1 mm images, an eighth of the size.
    include_library : bool, optional
        Prepend :func:`library_html`; only for a page holding one viewer.
    volume_files : callable, optional
        Store the volumes beside the page instead of inside it: maps each NIfTI file to the
        ``.js`` file its encoding is written to (see :func:`write_volume_script`), loaded by
        a ``<script src>`` relative to ``page_dir`` (each volume once per page: the
        addresses already loaded go in ``on_page``). None: the volumes are embedded.
    page_dir : Path or str, optional
        The page's folder, with ``volume_files``.
    on_page : set of str, optional
        With ``volume_files``: the volume scripts already on the page, updated.

    Returns
    -------
    str
        The HTML fragment.
    """
    if not _ID.match(element_id):
        raise ValueError(f"element_id must be a plain HTML id, not {element_id!r}")
    if not isinstance(background, Mapping):
        background = {_modality_name(Path(background)): Path(background)}
    if not background:
        raise ValueError("viewer_html needs a background volume")

    if volume_files is not None and page_dir is None:
        raise ValueError("volume_files needs the page's folder, page_dir")
    on_page = set() if on_page is None else on_page
    scripts = []

    def store(path: Path, data: str) -> dict:
        """The volume's data inline, or a reference to the script it is written to."""
        if volume_files is None:
            return {"data": data}
        target = Path(volume_files(Path(path)))
        src = Path(os.path.relpath(target, Path(page_dir))).as_posix()
        write_volume_script(target, src, data)
        if src not in on_page:
            on_page.add(src)
            scripts.append(f'<script src="{html.escape(src)}"></script>\n')
        return {"ref": src}

    backgrounds = []
    for index, (name, path) in enumerate(background.items()):
        data, _ = encode_volume(Path(path), "anatomy", downsample=downsample)
        backgrounds.append({"name": name, "file": f"background{index}.nii.gz",
                            **store(Path(path), data),
                            "colormap": "gray", "opacity": 1.0, "colorbar": False})
    layers, maps, mask_peaks = [], [], []
    for index, overlay in enumerate(overlays):
        data, stats = encode_volume(overlay.path, overlay.kind, downsample=downsample,
                                    outline=overlay.outline)
        colormap, opacity = overlay.style
        layer = {"name": overlay.name, "file": f"overlay{index}.nii.gz", "kind": overlay.kind,
                 **store(Path(overlay.path), data), "colormap": colormap, "opacity": opacity}
        if overlay.kind == "mask":
            layer.update(cal_min=0.5, cal_max=max(stats["max"], 1.0), colorbar=False,
                         outline=overlay.outline)
            mask_peaks.append(stats["peak"])
        else:
            maps.append((layer, stats))
        layers.append(layer)

    slider = ""
    if maps:
        top = max(stats["max"] for _, stats in maps)
        bottom = min(0.0, min(stats["min"] for _, stats in maps))
        threshold = float(maps[0][1]["p95"] if threshold is None else threshold)
        top = max(top, threshold)
        for layer, stats in maps:
            layer.update(cal_min=threshold, cal_max=max(stats["max"], threshold + 1e-6),
                         colorbar=True)
        slider = (
            f'<label>Threshold <input type="range" data-control="threshold" min="{bottom:.6g}"'
            f' max="{top:.6g}" step="any" value="{threshold:.6g}"'
            f' aria-label="anomaly map threshold"></label>'
            f' <output data-control="threshold-value">{threshold:.3g}</output>')

    controls = []
    if len(backgrounds) > 1:
        options = "".join(f'<option value="{i}">{html.escape(b["name"])}</option>'
                          for i, b in enumerate(backgrounds))
        controls.append(f'<label>Background <select data-control="background">{options}'
                        "</select></label>")
    else:
        controls.append(f"<span>Background: {html.escape(backgrounds[0]['name'])}</span>")
    views = (("Multiplanar", "3:0"), ("Multiplanar + 3D", "3:1"), ("Axial", "0:0"),
             ("Coronal", "1:0"), ("Sagittal", "2:0"), ("3D render", "4:0"))
    controls.append('<label>View <select data-control="view">' + "".join(
        f'<option value="{value}">{label}</option>' for label, value in views)
        + "</select></label>")
    if slider:
        controls.append(slider)
    for index, layer in enumerate(layers):
        controls.append(f'<label><input type="checkbox" data-overlay="{index}" checked> '
                        f'{html.escape(layer["name"])}</label>')

    peaks = [stats["peak"] for _, stats in maps] + mask_peaks
    spec = {"backgrounds": backgrounds, "overlays": layers,
            "focus": next((peak for peak in peaks if peak is not None), None)}
    fragment = (
        f'<div class="ba-viewer" id="{element_id}">\n'
        f'<div class="ba-title">{html.escape(title)}</div>\n'
        f'<div class="ba-controls">{"".join(controls)}</div>\n'
        f'<div class="ba-canvas" style="height:{int(height)}px"><canvas></canvas></div>\n'
        '<div class="ba-status">The interactive viewer needs JavaScript and WebGL2.</div>\n'
        + "".join(scripts) +
        f'<script type="application/json" class="ba-data">{_json_for_script(spec)}</script>\n'
        "<script>(window.bidsAnomalyViewers = window.bidsAnomalyViewers || [])"
        f'.push("{element_id}");</script>\n'
        "</div>\n")
    return (library_html() if include_library else "") + fragment

