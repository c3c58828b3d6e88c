"""The embedded NiiVue viewer: self-contained HTML, rendered offline by headless Chromium."""

import base64
import gzip
import json
import re
import shutil
import subprocess
from importlib import resources

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_anomaly.reports.viewer import (
    MAP_LEVELS,
    Overlay,
    encode_volume,
    library_html,
    niivue_version,
    viewer_html,
)

SHAPE = (40, 48, 40)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-40, -56, -40]
BLOB = (26, 30, 22)  # voxel
OUTSIDE = re.compile(r"""(src|href)\s*=\s*["']?(?!data:|#)""", re.IGNORECASE)


def _volumes(tmp_path):
    """Two smooth random 'head' modalities, an anomaly map with a blob, and its mask."""
    rng = np.random.default_rng(0)
    grid = np.indices(SHAPE).astype(float)
    centre = (np.array(SHAPE)[:, None, None, None] - 1) / 2
    radii = np.array([17, 21, 17])[:, None, None, None]
    head = np.sqrt((((grid - centre) / radii) ** 2).sum(0)) < 1
    texture = ndimage.gaussian_filter(rng.normal(size=SHAPE), 2)
    t1w = np.where(head, 100 + 400 * texture, 0).astype(np.float32)
    flair = np.where(head, 60 - 300 * texture, 0).astype(np.float32)
    blob = np.sqrt(((grid - np.array(BLOB)[:, None, None, None]) ** 2).sum(0))
    scores = np.where(head, np.abs(rng.normal(0, 0.5, SHAPE)), 0) + 6 * np.exp(-blob ** 2 / 18)
    paths = {}
    for name, data in (("T1w", t1w), ("FLAIR", flair), ("map", scores.astype(np.float32)),
                       ("mask", (scores > 3).astype(np.uint8))):
        paths[name] = tmp_path / f"sub-01_{name}.nii.gz"
        nib.Nifti1Image(data, AFFINE).to_filename(paths[name])
    return paths


def _fragment(paths, element_id="viewer-1", threshold=2.0, **kwargs):
    return viewer_html({"T1w": paths["T1w"], "FLAIR": paths["FLAIR"]},
                       [Overlay(paths["map"], "anomaly score"),
                        Overlay(paths["mask"], "anomalies", kind="mask")],
                       threshold=threshold, title="sub-01 <anomalies>", element_id=element_id,
                       **kwargs)


def _page(path, body, head=""):
    path.write_text(f"<!DOCTYPE html><html><head><meta charset=utf-8>{head}</head>"
                    f"<body>{body}</body></html>", encoding="utf-8")
    return path


def _spec(fragment):
    match = re.search(r'<script type="application/json" class="ba-data">(.*?)</script>',
                      fragment, re.DOTALL)
    return json.loads(match.group(1))


def _decode(volume):
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(volume["data"])))


def test_fragment_embeds_the_volumes_and_references_nothing_outside(tmp_path):
    paths = _volumes(tmp_path)
    fragment = _fragment(paths)
    # the generated part: no outside source or link, no URL at all, no library
    assert not OUTSIDE.search(fragment)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", fragment, re.IGNORECASE)
    assert "<link" not in fragment and "@import" not in fragment and "url(" not in fragment
    assert "Niivue=" not in fragment  # the library is left to library_html
    assert "sub-01 &lt;anomalies&gt;" in fragment  # the title is escaped
    assert '<option value="1">FLAIR</option>' in fragment
    assert 'data-control="threshold"' in fragment and 'value="2"' in fragment

    spec = _spec(fragment)
    assert [b["name"] for b in spec["backgrounds"]] == ["T1w", "FLAIR"]
    assert [(o["kind"], o["colormap"]) for o in spec["overlays"]] == [("map", "warm"),
                                                                      ("mask", "green")]
    assert spec["overlays"][0]["cal_min"] == 2.0
    # the viewer opens on the anomaly's peak
    assert spec["focus"] == pytest.approx(nib.affines.apply_affine(AFFINE, BLOB), abs=2.1)

    original = {name: nib.load(path).get_fdata() for name, path in paths.items()}
    t1w = _decode(spec["backgrounds"][0])
    assert t1w.get_data_dtype() == np.uint8 and np.allclose(t1w.affine, AFFINE)
    grey_step = np.ptp(original["T1w"]) / 255
    inside = original["T1w"] < np.percentile(original["T1w"], 99.95)
    assert np.abs(t1w.get_fdata() - original["T1w"])[inside].max() <= grey_step
    scores = _decode(spec["overlays"][0])
    assert scores.get_data_dtype() == np.int16
    step = original["map"].max() / MAP_LEVELS
    assert np.abs(scores.get_fdata() - original["map"]).max() <= step / 2 + 1e-6
    mask = _decode(spec["overlays"][1])
    assert mask.header["intent_code"] == 1002  # a label volume: NiiVue draws its outline
    assert np.array_equal(mask.get_fdata(), original["mask"])


def test_library_is_vendored_and_inlined_once_per_page(tmp_path):
    assets = resources.files("bids_anomaly.reports").joinpath("assets")
    bundle = gzip.decompress(assets.joinpath("niivue.js.gz").read_bytes()).decode("utf-8")
    assert re.fullmatch(r"\d+\.\d+\.\d+", niivue_version())
    assert "BSD 2-Clause" in assets.joinpath("NIIVUE_LICENSE").read_text("utf-8")
    assert "Niivue" in bundle and "import(" not in bundle

    paths = _volumes(tmp_path)
    library = library_html()
    page = library + _fragment(paths, "viewer-1") + _fragment(paths, "viewer-2")
    assert page.count(bundle[:500]) == 1
    assert page.count("bidsAnomalyViewers || []).push(") == 2
    # what this package writes around the bundle references nothing outside either
    wrapper = library.replace(bundle, "")
    assert "BSD 2-Clause" in wrapper  # the licence notice goes along, in a comment
    wrapper = re.sub(r"<!--.*?-->", "", wrapper, flags=re.DOTALL)
    assert not OUTSIDE.search(wrapper)
    assert not re.search(r"https?://", wrapper)
    single = _fragment(paths, include_library=True)
    assert single.count(bundle[:500]) == 1


def test_downsampling_keeps_the_anomalies_and_the_space(tmp_path):
    paths = _volumes(tmp_path)
    data, stats = encode_volume(paths["map"], "map", downsample=2)
    small = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(data)))
    assert small.shape == (20, 24, 20)
    # block maxima: the peak is kept; voxel 0 is centred between the old voxels 0 and 1
    assert small.get_fdata().max() == pytest.approx(stats["max"], rel=1e-3)
    assert np.allclose(small.affine[:3, 3], AFFINE[:3, 3] + 1.0)
    assert np.allclose(np.diag(small.affine)[:3], 4.0)
    full, _ = encode_volume(paths["T1w"], "anatomy")
    half, _ = encode_volume(paths["T1w"], "anatomy", downsample=2)
    assert len(half) < len(full) / 3


def test_bad_arguments_are_refused(tmp_path):
    paths = _volumes(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        Overlay(paths["map"], "scores", kind="heatmap")
    with pytest.raises(ValueError, match="element_id"):
        viewer_html(paths["T1w"], [], None, "t", element_id='x" onload="alert(1)')
    nifti_4d = tmp_path / "sub-01_bold.nii.gz"
    nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), AFFINE).to_filename(nifti_4d)
    with pytest.raises(ValueError, match="3D"):
        viewer_html(nifti_4d, [], None, "t")


def test_defaults_without_threshold_or_other_modalities(tmp_path):
    paths = _volumes(tmp_path)
    fragment = viewer_html(paths["T1w"], [Overlay(paths["map"], "score")], None, "t")
    spec = _spec(fragment)
    assert [b["name"] for b in spec["backgrounds"]] == ["T1w"]  # the BIDS suffix
    scores = nib.load(paths["map"]).get_fdata()
    assert spec["overlays"][0]["cal_min"] == pytest.approx(np.percentile(scores[scores > 0], 95))
    assert 'data-control="background"' not in fragment


# --- headless Chromium: the viewer renders with all network blocked, and requests nothing

def _chromium():
    return next((shutil.which(name) for name in ("chromium", "chromium-browser",
                                                 "google-chrome") if shutil.which(name)), None)


needs_chromium = pytest.mark.skipif(_chromium() is None,
                                    reason="needs Chromium (Debian: apt install chromium)")

# Everything but inline code, inline style and data: images is refused, and reported
# into the DOM: NiiVue's font atlas is a data: image; fetch/XHR, fonts, workers, frames,
# outside scripts or images would each be a violation.
CSP = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
       "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">")
PROBE = """<script>
document.addEventListener("securitypolicyviolation", (e) => {
  const data = document.documentElement.dataset;
  data.violations = (data.violations || "") + e.violatedDirective + " " + e.blockedURI + ";";
});
function whenReady(id, then) {
  const timer = setInterval(() => {
    const root = document.getElementById(id);
    if (!root.dataset.ready) return;
    clearInterval(timer);
    const r = root.querySelector("canvas").getBoundingClientRect();
    document.documentElement.dataset.canvas = JSON.stringify([r.left, r.top, r.right, r.bottom]);
    if (then) then(root, bidsAnomalyViewer.instances[id]);
  }, 50);
}
</script>"""

FLAGS = [
    "--headless", "--no-sandbox", "--hide-scrollbars", "--disable-dev-shm-usage",
    "--no-first-run", "--force-device-scale-factor=1",
    # WebGL2 without a GPU: ANGLE on SwiftShader (software), which Chromium only allows
    # when asked to explicitly
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
    # no network: every host unresolvable, every proxied request to a closed port
    "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
    "--disable-background-networking",
]


def _run_chromium(page, tmp_path, size=(1000, 600)):
    """Screenshot (RGB array), DOM after 5 s of virtual time, and the page's own requests."""
    shot, netlog = tmp_path / f"{page.stem}.png", tmp_path / f"{page.stem}.netlog.json"
    result = subprocess.run(
        [_chromium(), *FLAGS, f"--window-size={size[0]},{size[1]}", f"--screenshot={shot}",
         f"--log-net-log={netlog}", "--dump-dom", "--virtual-time-budget=5000", page.as_uri()],
        capture_output=True, text=True, timeout=60, check=True)
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    # The network log holds Chromium's own background requests too ("initiator": "not an
    # origin"); those of the page come from its (opaque, file://) origin: "null".
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = [event["params"]["url"] for event in log["events"]
                if event["type"] == start and "url" in event.get("params", {})
                and event["params"].get("initiator") != "not an origin"]
    return image, result.stdout, requests


def _dataset(dom, name):
    match = re.search(rf'<html[^>]* data-{name}="([^"]*)"', dom)
    return match.group(1).replace("&quot;", '"') if match else None


def _canvas(image, dom):
    left, top, right, bottom = (round(v) for v in json.loads(_dataset(dom, "canvas")))
    return image[top:bottom, left:right]


def _colours(canvas):
    """Pixels of the map's and of the mask's colours in the slices (above the colour bar)."""
    slices = canvas[: int(0.85 * canvas.shape[0])]
    red, green, blue = slices[..., 0], slices[..., 1], slices[..., 2]
    warm = (red > 200) & (green > 90) & (blue < 90)  # the "warm" map: orange to yellow
    mask = (green > 200) & (red < 90) & (blue < 90)  # the green outline
    return int(warm.sum()), int(mask.sum())


@needs_chromium
def test_network_requests_would_be_seen(tmp_path):
    """A positive control: a page that does reach out is caught by both checks."""
    page = _page(tmp_path / "leaky.html",
                 '<img src="http://example.invalid/x.png"><script>'
                 'fetch("https://example.org/data.json").catch(() => {});</script>')
    _, _, requests = _run_chromium(page, tmp_path, size=(200, 200))
    assert "http://example.invalid/x.png" in requests
    assert "https://example.org/data.json" in requests
    page = _page(tmp_path / "leaky_csp.html", '<img src="http://example.invalid/x.png">',
                 head=CSP + PROBE)
    _, dom, requests = _run_chromium(page, tmp_path, size=(200, 200))
    assert "http://example.invalid/x.png" in (_dataset(dom, "violations") or "")
    assert requests == []  # blocked by the policy before any request


@needs_chromium
def test_viewer_renders_offline(tmp_path):
    paths = _volumes(tmp_path)
    ready = ('<script>whenReady("viewer-1", (root, nv) => {'
             "document.documentElement.dataset.calmin = nv.volumes[1].cal_min; });</script>")
    page = _page(tmp_path / "viewer.html", library_html() + _fragment(paths) + ready,
                 head=CSP + PROBE)
    image, dom, requests = _run_chromium(page, tmp_path)
    assert re.search(r'id="viewer-1"[^>]*data-ready="true"', dom), "the viewer did not start"
    # the map starts at the threshold (NiiVue would set its own display range on loading)
    assert float(_dataset(dom, "calmin")) == pytest.approx(2.0, abs=1e-3)
    assert _dataset(dom, "violations") is None  # nothing was refused by the policy...
    assert requests == []  # ...and the page requested nothing
    canvas = _canvas(image, dom)
    assert canvas.shape[0] >= 350 and canvas.shape[1] >= 900
    assert canvas.std() > 30  # not blank: slices of the head over a black background
    assert (canvas.sum(axis=2) < 30).mean() > 0.2
    warm, mask = _colours(canvas)
    assert warm > 200 and mask > 50  # the map above threshold, outlined by the mask


@needs_chromium
def test_viewer_starts_at_a_high_threshold(tmp_path):
    """A threshold above most of a map with negative scores too: only the blob shows.

    NiiVue sets its own display range (robust percentiles) on loading; the viewer must start
    from the threshold instead.
    """
    paths = _volumes(tmp_path)
    shifted = nib.load(paths["map"])  # negative scores too, as log-likelihood scores have
    nib.Nifti1Image(shifted.get_fdata(dtype=np.float32) - 1, AFFINE).to_filename(paths["map"])
    page = _page(tmp_path / "high.html", library_html() + _fragment(paths, threshold=3.5)
                 + '<script>whenReady("viewer-1");</script>', head=CSP + PROBE)
    image, dom, _ = _run_chromium(page, tmp_path)
    warm, _ = _colours(_canvas(image, dom))
    assert 50 < warm < 3000


@needs_chromium
def test_viewer_controls(tmp_path):
    """Threshold above the map's maximum, mask unticked, FLAIR as background."""
    paths = _volumes(tmp_path)
    actions = """<script>whenReady("viewer-1", (root, nv) => {
      const threshold = root.querySelector("[data-control=threshold]");
      threshold.value = threshold.max;
      threshold.dispatchEvent(new Event("input"));
      const mask = root.querySelector("input[data-overlay='1']");
      mask.checked = false;
      mask.dispatchEvent(new Event("change"));
      const background = root.querySelector("[data-control=background]");
      background.value = "1";
      background.dispatchEvent(new Event("change"));
      document.documentElement.dataset.volumes = nv.volumes.map((v) => v.name).join(",");
    });</script>"""
    page = _page(tmp_path / "controls.html", library_html() + _fragment(paths) + actions,
                 head=CSP + PROBE)
    image, dom, requests = _run_chromium(page, tmp_path)
    assert requests == [] and _dataset(dom, "violations") is None
    assert _dataset(dom, "volumes") == "background1.nii.gz,overlay0.nii.gz,overlay1.nii.gz"
    value = re.search(r'<output data-control="threshold-value">([^<]*)</output>', dom)
    assert float(value.group(1)) == pytest.approx(nib.load(paths["map"]).get_fdata().max(),
                                                  rel=0.01)
    canvas = _canvas(image, dom)
    assert canvas.std() > 30
    warm, mask = _colours(canvas)
    assert warm < 20 and mask < 5


# --- the participant pages' layout: library once per dataset, volumes as scripts beside it

def _shared_page(tmp_path, body_extra=""):
    """A page at a dataset's root, its library in viewer/, its volumes in sub-01/figures/."""
    from bids_anomaly import bids
    from bids_anomaly.reports.viewer import write_library

    root = tmp_path / "derivatives"
    paths = _volumes(tmp_path)
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for name, path in list(paths.items()):
        paths[name] = anat / path.name
        shutil.copy(path, paths[name])
    library = write_library(bids.viewer_library_path(root))
    on_page = set()
    fragments = [_fragment(paths, element_id, volume_files=bids.viewer_volume_path,
                           page_dir=root, on_page=on_page)
                 for element_id in ("viewer-1", "viewer-2")]
    head = CSP.replace("script-src 'unsafe-inline'", "script-src 'self' 'unsafe-inline'") + PROBE
    page = _page(root / "sub-01.html", library_html(src="viewer/niivue.js") + "".join(fragments)
                 + body_extra, head=head)
    return page, library, fragments


def test_volumes_and_library_can_be_shared_files(tmp_path):
    page, library, (first, second) = _shared_page(tmp_path)
    root = page.parent
    assert library == root / "viewer" / "niivue.js" and "BSD 2-Clause" in library.read_text()
    text = page.read_text()
    assert "Niivue=" not in text and len(text) < 50_000
    sources = re.findall(r'src="([^"]+)"', text)
    assert sources[0] == "viewer/niivue.js"
    # every volume once per page, each a script beside the page that defines its data
    assert len(sources) == len(set(sources)) == 5
    assert all((root / src).is_file() and src.startswith("sub-01/figures/") for src in sources[1:])
    assert "<script src" not in second  # the second viewer reuses the first one's volumes
    spec = _spec(first)
    assert all("data" not in v and v["ref"] in sources
               for v in spec["backgrounds"] + spec["overlays"])
    script = (root / spec["overlays"][1]["ref"]).read_text()
    data = re.search(r'= "([A-Za-z0-9+/=]+)";', script).group(1)
    assert np.array_equal(_decode({"data": data}).get_fdata(),
                          nib.load(tmp_path / "sub-01_mask.nii.gz").get_fdata())


def test_viewer_library_and_volume_names_come_from_bids(tmp_path):
    from bids_anomaly import bids

    assert bids.viewer_library_path(tmp_path) == tmp_path / "viewer" / "niivue.js"
    volume = tmp_path / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-preproc_T1w.nii.gz"
    assert bids.viewer_volume_path(volume) == (tmp_path / "sub-01" / "ses-1" / "figures"
                                               / "sub-01_ses-1_desc-preproc_T1w.js")
    bids.write_dataset_description(tmp_path / "out", None)
    ignored = (tmp_path / "out" / ".bidsignore").read_text().split()
    assert {"viewer/", "figures/", "*.html"} <= set(ignored)


@needs_chromium
def test_shared_files_render_offline_from_a_copied_folder(tmp_path):
    page, _, _ = _shared_page(tmp_path, '<script>whenReady("viewer-1");</script>')
    copy = tmp_path / "copied"
    shutil.copytree(page.parent, copy)
    shutil.rmtree(page.parent)  # nothing may point back to where it was written
    image, dom, requests = _run_chromium(copy / page.name, tmp_path)
    assert dom.count('data-ready="true"') == 2, "the viewers did not start"
    assert _dataset(dom, "violations") is None and requests == []
    warm, mask = _colours(_canvas(image, dom))
    assert warm > 200 and mask > 50
