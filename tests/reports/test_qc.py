import base64
import re
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bids_anomaly.evaluation.registration import (
    QC_THRESHOLDS,
    brain_volume_ml,
    flag_failures,
    normalized_mutual_information,
    registration_qc,
)
from bids_anomaly.reports.qc import _robust_window, plot_edges, plot_mask_contour
from bids_anomaly.reports.subject import write_subject_report

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = -32.0
RED = "#ff0000"


def ellipsoid(shape=(32, 32, 32), radii=(12, 14, 11), center=None) -> np.ndarray:
    center = np.array(center if center is not None else [(s - 1) / 2 for s in shape])
    grid = np.indices(shape).astype(float)
    distance = sum(((grid[i] - center[i]) / radii[i]) ** 2 for i in range(3))
    return distance <= 1


def brain(shift=(0, 0, 0), scale=1.0, offset=0.0, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 'brain': bright core ('white matter') in a darker shell, zero outside."""
    center = np.array([15.5, 15.5, 15.5]) + np.array(shift)
    mask = ellipsoid(center=center)
    core = ellipsoid(radii=(7, 9, 6), center=center)
    rng = np.random.default_rng(seed)
    data = np.where(core, 100.0, 60.0) + rng.normal(0, 3, mask.shape)
    data = ndimage.gaussian_filter(data, 1.0) * mask
    return (data * scale + offset * mask).astype(np.float32), mask


def save(data: np.ndarray, path, affine=AFFINE, zooms=None):
    img = nib.Nifti1Image(data, affine)
    if zooms is not None:
        img.header.set_zooms(zooms)
    img.to_filename(path)
    return path


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc")
    image, mask = brain()
    shifted_image, shifted_mask = brain(shift=(4, 0, 0))
    return {
        "image": save(image, root / "image.nii.gz"),
        "mask": save(mask.astype(np.uint8), root / "mask.nii.gz"),
        "shifted_image": save(shifted_image, root / "shifted_image.nii.gz"),
        "shifted_mask": save(shifted_mask.astype(np.uint8), root / "shifted_mask.nii.gz"),
        "root": root,
    }


@pytest.fixture(scope="module")
def contour_svg(volumes):
    return plot_mask_contour(volumes["image"], volumes["mask"],
                             volumes["root"] / "figures" / "mask.svg", title="sub-01 brain mask")


def assert_valid_svg(path):
    assert path.exists() and path.suffix == ".svg"
    assert path.stat().st_size > 5_000
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")


def test_plot_mask_contour_writes_svg_with_red_contour(volumes, contour_svg, tmp_path):
    assert contour_svg == volumes["root"] / "figures" / "mask.svg"
    assert_valid_svg(contour_svg)
    assert RED in contour_svg.read_text()
    # an empty mask draws no contour: the red colour comes from the mask, not the layout
    empty = save(np.zeros((32, 32, 32), np.uint8), tmp_path / "empty.nii.gz")
    no_contour = plot_mask_contour(volumes["image"], empty, tmp_path / "empty.svg")
    assert_valid_svg(no_contour)
    assert RED not in no_contour.read_text()


def test_plot_mask_contour_handles_scanner_units_and_negative_values(tmp_path):
    data, mask = brain(scale=1e4, offset=-8e5)  # values from about -2e5 to 2e5
    image = save(data, tmp_path / "image.nii.gz")
    mask_file = save(mask.astype(np.uint8), tmp_path / "mask.nii.gz")
    out = plot_mask_contour(image, mask_file, tmp_path / "big.svg")
    assert_valid_svg(out)
    vmin, vmax = _robust_window(nib.load(image))
    values = data[data != 0]
    assert vmin == pytest.approx(np.percentile(values, 1), rel=1e-4)
    assert vmax == pytest.approx(np.percentile(values, 99), rel=1e-4)
    assert vmin < 0 < vmax and vmax - vmin > 1e5


def test_plot_edges_on_another_grid(volumes, tmp_path):
    # the edges image on a 3 mm grid with another origin: nilearn slices it in world coordinates
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -30.0
    data, _ = brain()
    coarse = ndimage.zoom(data, 2 / 3, order=1)
    edges = save(coarse, tmp_path / "coarse.nii.gz", affine=affine)
    out = plot_edges(volumes["image"], edges, tmp_path / "sub" / "edges.svg", title="edges")
    assert_valid_svg(out)
    assert RED in out.read_text()
    canny = plot_edges(volumes["image"], edges, tmp_path / "canny.svg", method="canny")
    assert_valid_svg(canny)
    # a constant edges image has no edges to draw
    flat = save(np.zeros((32, 32, 32), np.float32), tmp_path / "flat.nii.gz")
    assert RED not in plot_edges(volumes["image"], flat, tmp_path / "flat.svg").read_text()


def test_figures_refuse_bad_arguments(volumes, tmp_path):
    with pytest.raises(ValueError, match="SVG"):
        plot_mask_contour(volumes["image"], volumes["mask"], tmp_path / "mask.png")
    with pytest.raises(ValueError, match="edge method"):
        plot_edges(volumes["image"], volumes["image"], tmp_path / "e.svg", method="sobel")
    assert not (tmp_path / "mask.png").exists()


def test_nmi_is_two_for_identical_and_one_to_one_images():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 20, 20))
    assert normalized_mutual_information(a, a) == pytest.approx(2.0, abs=1e-12)
    # a linear map of the intensities keeps the bins' one-to-one correspondence
    assert normalized_mutual_information(a, -5 * a + 100) == pytest.approx(2.0, abs=1e-12)
    image, _ = brain()
    assert normalized_mutual_information(image, image, bins=32) == pytest.approx(2.0, abs=1e-12)


def test_nmi_is_near_one_for_independent_images():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=200_000), rng.uniform(size=200_000)
    nmi = normalized_mutual_information(a, b)
    assert 1.0 <= nmi < 1.01
    # a constant image carries no information about the other
    assert normalized_mutual_information(a, np.ones_like(a)) == pytest.approx(1.0)
    assert normalized_mutual_information(np.ones(10), np.ones(10)) == 1.0


def test_nmi_decreases_with_misalignment():
    image, mask = brain()
    values = [normalized_mutual_information(ndimage.shift(image, (s, 0, 0), order=1), image,
                                            mask=mask)
              for s in (0, 1, 2, 4, 8)]
    assert values[0] == pytest.approx(2.0)
    assert all(later < earlier for earlier, later in zip(values, values[1:], strict=False))
    assert values[-1] < 1.2


def test_nmi_mask_and_non_finite_voxels():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 10, 10))
    b = rng.normal(size=(10, 10, 10))
    mask = np.zeros(a.shape, bool)
    mask[:5] = True
    b_masked = np.where(mask, a, b)  # identical inside the mask only
    assert normalized_mutual_information(a, b_masked, mask=mask) == pytest.approx(2.0)
    assert normalized_mutual_information(a, b_masked) < 1.9
    with_nan = a.copy()
    with_nan[~mask] = np.nan
    assert normalized_mutual_information(with_nan, b_masked) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="shape"):
        normalized_mutual_information(a, b[:5])
    with pytest.raises(ValueError, match="mask"):
        normalized_mutual_information(a, b, mask=mask[:5])
    with pytest.raises(ValueError, match="empty"):
        normalized_mutual_information(a, b, mask=np.zeros(a.shape, bool))


def test_registration_qc_identical_and_shifted(volumes):
    same = registration_qc(volumes["mask"], volumes["mask"], volumes["image"], volumes["image"])
    assert same == {"dice": 1.0, "nmi": pytest.approx(2.0)}
    assert flag_failures(same) == []

    shifted = registration_qc(volumes["shifted_mask"], volumes["mask"],
                              volumes["shifted_image"], volumes["image"])
    assert shifted["dice"] < 0.9
    assert shifted["nmi"] < same["nmi"]
    reasons = flag_failures(shifted)
    assert any(reason.startswith(f"Dice {shifted['dice']:.2f} < 0.90") for reason in reasons)
    assert "between the warped brain mask and the template mask" in reasons[0]


def test_registration_qc_measures_nmi_inside_the_template_mask(volumes, tmp_path):
    # the warped image equals the template inside the template mask and is noise outside it,
    # where the larger warped mask also reaches: only voxels of the template brain count
    template = nib.load(volumes["image"]).get_fdata()
    template_mask = nib.load(volumes["mask"]).get_fdata() > 0
    noise = np.random.default_rng(3).uniform(1, 120, template.shape)
    warped = save(np.where(template_mask, template, noise).astype(np.float32),
                  tmp_path / "warped.nii.gz")
    bigger = ndimage.binary_dilation(template_mask, iterations=3)
    warped_mask = save(bigger.astype(np.uint8), tmp_path / "warped_mask.nii.gz")
    qc = registration_qc(warped_mask, volumes["mask"], warped, volumes["image"])
    assert qc["nmi"] == pytest.approx(2.0)
    assert qc["dice"] < 1.0
    in_union = normalized_mutual_information(nib.load(warped).get_fdata(), template,
                                             mask=bigger)
    assert in_union < 1.9


def test_registration_qc_refuses_images_on_different_grids(volumes, tmp_path):
    other = AFFINE.copy()
    other[0, 3] += 2.0
    moved = save(nib.load(volumes["image"]).get_fdata().astype(np.float32),
                 tmp_path / "moved.nii.gz", affine=other)
    with pytest.raises(ValueError, match="same grid"):
        registration_qc(volumes["mask"], volumes["mask"], moved, volumes["image"])
    cropped = save(np.zeros((32, 32, 30), np.uint8), tmp_path / "cropped.nii.gz")
    with pytest.raises(ValueError, match="same grid"):
        registration_qc(cropped, volumes["mask"], volumes["image"], volumes["image"])


def test_brain_volume_ml_uses_anisotropic_voxel_size(tmp_path):
    data = np.zeros((30, 30, 10), np.int16)
    data[:10, :20, :5] = 1  # 1000 voxels
    data[20, 20, 5] = 2  # any positive value is brain
    data[25, 25, 5] = -1  # negative values are not
    affine = np.diag([1.0, 1.5, 3.0, 1.0])
    mask = save(data, tmp_path / "mask.nii.gz", affine=affine, zooms=(1.0, 1.5, 3.0))
    assert brain_volume_ml(mask) == pytest.approx(1001 * 4.5 / 1000)
    mask_4d = save(data[..., None], tmp_path / "mask4d.nii.gz", affine=affine)
    assert brain_volume_ml(mask_4d) == pytest.approx(1001 * 4.5 / 1000)


def test_flag_failures_messages_and_thresholds():
    assert set(QC_THRESHOLDS) == {"dice", "nmi"}
    assert 1.0 < QC_THRESHOLDS["nmi"] < 1.1
    assert flag_failures({"dice": 0.72, "nmi": 2.0}) == [
        "Dice 0.72 < 0.90 between the warped brain mask and the template mask"]
    assert flag_failures({"dice": 0.95, "nmi": 1.01}) == [
        f"NMI 1.01 < {QC_THRESHOLDS['nmi']:.2f} between the warped image and the template image"]
    assert len(flag_failures({"dice": float("nan"), "nmi": 1.0})) == 2
    assert flag_failures({"dice": QC_THRESHOLDS["dice"], "nmi": QC_THRESHOLDS["nmi"]}) == []
    assert flag_failures({"brain_volume_ml": 0.1}) == []
    assert flag_failures({"dice": 0.95}, thresholds={"dice": 0.97}) == [
        "Dice 0.95 < 0.97 between the warped brain mask and the template mask"]


def test_write_subject_report_is_self_contained(contour_svg, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = tmp_path / "plot.png"
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(png)
    plt.close(fig)
    metrics = pd.DataFrame([{"metric": "dice", "value": 0.97213}, {"metric": "nmi",
                                                                    "value": 1.0567}])
    sections = [
        {"heading": "Brain mask", "figures": [contour_svg],
         "text": "Contour of <deepbet>'s mask.\n\nSecond paragraph & more."},
        {"heading": "Registration to MNI152NLin2009aSym", "table": metrics, "figures": [png]},
        {"heading": "Volumes", "table": [{"label": "<brain>", "volume_ml": 1234.5678}]},
    ]
    out = write_subject_report(tmp_path / "report" / "sub-01_qc.html", "sub-01 <QC>", sections)
    assert out == tmp_path / "report" / "sub-01_qc.html"
    page = out.read_text(encoding="utf-8")
    for heading in ("Brain mask", "Registration to MNI152NLin2009aSym", "Volumes"):
        assert f"<h2>{heading}</h2>" in page
    assert "<title>sub-01 &lt;QC&gt;</title>" in page
    assert "&lt;deepbet&gt;" in page and "<deepbet>" not in page
    assert page.count("<p>") >= 2 and "Second paragraph &amp; more." in page
    assert "0.972" in page and "1.057" in page and "1234.568" in page
    assert "&lt;brain&gt;" in page
    assert "http://" not in page and "https://" not in page
    # the only script is inline (table sorting): nothing is loaded from elsewhere
    assert "<link" not in page and "<script src" not in page and page.count("<script>") == 1
    # the embedded SVG decodes back to the figure file
    match = re.search(r'data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', page)
    assert match is not None
    assert base64.b64decode(match.group(1)) == contour_svg.read_bytes()
    assert "data:image/png;base64," in page


def test_write_subject_report_refuses_unknown_figure_types(tmp_path):
    gif = tmp_path / "figure.gif"
    gif.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="SVG, PNG or JPEG"):
        write_subject_report(tmp_path / "r.html", "t", [{"heading": "h", "figures": [gif]}])


def test_the_mosaic_shows_left_on_the_left_anterior_right_and_superior_up(tmp_path):
    """A mask in the left anterior superior part of a head, whatever the voxel order."""
    from PIL import Image

    from bids_anomaly.reports.qc import _Mosaic

    shape = (32, 36, 30)
    head = ellipsoid(shape, radii=(13, 15, 12)).astype(np.float32) * 100
    marker = np.zeros(shape, np.float32)
    marker[6:12, 24:30, 19:25] = 1  # low x: left; high y: anterior; high z: superior
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.asarray(shape) + 1
    cuts = {"x": [-15.0], "y": [16.0], "z": [14.0]}  # through the marker
    pictures = []
    for order in ("RAS", "LAS"):
        grid = affine.copy()
        data, mask = head, marker
        if order == "LAS":
            data, mask = head[::-1], marker[::-1]
            grid = affine @ np.diag([-1.0, 1, 1, 1])
            grid[0, 3] = affine[0, 3] + 2.0 * (shape[0] - 1)
        mosaic = _Mosaic(nib.Nifti1Image(data, grid), cuts, 0.0, 100.0, "")
        mosaic.add_contours(nib.Nifti1Image(mask, grid), levels=[0.5], colors="r",
                            linewidths=1.0)
        out = tmp_path / f"{order}.png"
        mosaic.savefig(str(out), dpi=40)
        boxes = {name: axis.get_position() for name, axis in mosaic.axes.items()}
        mosaic.close()
        pictures.append(np.asarray(Image.open(out).convert("RGB"), dtype=int))
    assert np.array_equal(pictures[0], pictures[1])
    rgb = pictures[0]
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    grey = (rgb[..., 0] > 60) & (abs(rgb[..., 0] - rgb[..., 1]) < 5)
    height = rgb.shape[0]
    for name, box in boxes.items():  # x: sagittal, y: coronal, z: axial
        rows = slice(int(round((1 - box.y1) * height)), int(round((1 - box.y0) * height)))
        r_rows, r_columns = np.nonzero(red[rows])
        g_rows, g_columns = np.nonzero(grey[rows])
        assert r_rows.size and g_rows.size, name
        assert r_rows.mean() < g_rows.mean(), name  # superior (or anterior) up
        if name == "x":  # anterior on the right
            assert r_columns.mean() > g_columns.mean()
        else:  # the subject's left on the left
            assert r_columns.mean() < g_columns.mean(), name
