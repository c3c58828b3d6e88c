"""Microbleed candidates: blobs found, vessels and large dark regions rejected, MARS, thresholds."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bids_anomaly.errors import BadDataError
from bids_anomaly.postprocessing.microbleeds import (
    CANDIDATE_COLUMNS,
    DIAMETERS_MM,
    MARS_REGIONS,
    MAX_ELONGATION,
    RADII_MM,
    SIGMAS_MM,
    blob_candidates,
    candidate_mask,
    candidate_score,
    candidate_table,
    fp_curve,
    mars_regions,
    score_candidates,
    threshold_for_fp,
)

CONTRAST = 8.0
"""Planted microbleeds are 8 robust SD darker than the brain (SWI: far darker than tissue)."""


def _noise(shape, seed, voxel_mm, smooth_mm=2.0):
    """Smooth Gaussian noise, z-scored: the background tissue texture."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape),
                                    smooth_mm / voxel_mm)
    return (noise - noise.mean()) / noise.std()


def _render(distance_mm, radius_mm, voxel_mm, blur_mm=0.5):
    """A solid of the given radius around a distance map: partial volume, blurred edges."""
    solid = np.clip((radius_mm - distance_mm) / voxel_mm + 0.5, 0.0, 1.0)
    return ndimage.gaussian_filter(solid, blur_mm / voxel_mm)


def _distance(shape, centre, voxel_mm):
    grid = np.indices(shape, dtype=np.float64)
    return np.sqrt(sum((grid[a] - centre[a]) ** 2 for a in range(3))) * voxel_mm


def _inner_mask(shape, margin=2):
    mask = np.zeros(shape, bool)
    mask[margin:-margin, margin:-margin, margin:-margin] = True
    return mask


def _nearest(candidates, centre):
    voxels = candidates[["i", "j", "k"]].to_numpy()
    distances = np.sqrt(((voxels - np.asarray(centre)) ** 2).sum(axis=1))
    n = int(distances.argmin())
    return distances[n], candidates.iloc[n]


SPHERES_1MM = {2: (10, 10, 24), 4: (24, 10, 24), 6: (38, 12, 24), 8: (12, 33, 24),
               10: (33, 33, 24)}
SPHERES_2MM = {4: (8, 8, 16), 6: (22, 8, 16), 8: (8, 22, 16), 10: (22, 22, 16)}


def _spheres(shape, spheres, voxel_mm, seed, sign=-1.0):
    image = _noise(shape, seed, voxel_mm)
    for diameter, centre in spheres.items():
        image += sign * CONTRAST * _render(_distance(shape, centre, voxel_mm), diameter / 2,
                                           voxel_mm)
    return image


def test_scales_span_the_diameters():
    assert DIAMETERS_MM == (2.0, 10.0)
    assert len(RADII_MM) >= 4
    assert RADII_MM[0] == pytest.approx(1.0) and RADII_MM[-1] == pytest.approx(5.0)
    assert np.allclose(np.array(SIGMAS_MM) * math.sqrt(3), RADII_MM)
    assert np.all(np.diff(RADII_MM) > 0)


@pytest.mark.parametrize("voxel_mm, shape, spheres", [
    (1.0, (48, 48, 48), SPHERES_1MM),
    # at 2 mm a 2 mm microbleed is sub-voxel: 4-10 mm only
    (2.0, (32, 32, 32), SPHERES_2MM),
], ids=["1mm", "2mm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dark_spheres_are_found_with_their_size(voxel_mm, shape, spheres, seed):
    image = _spheres(shape, spheres, voxel_mm, seed)
    candidates = blob_candidates(image, _inner_mask(shape), voxel_mm)
    assert list(candidates.columns) == ["i", "j", "k", "radius_mm", "blobness", "elongation",
                                        "contrast"]
    assert candidates.index.name == "candidate_id"
    assert candidates.index.tolist() == list(range(1, len(candidates) + 1))
    assert candidates["blobness"].is_monotonic_decreasing
    for diameter, centre in spheres.items():
        distance, row = _nearest(candidates, centre)
        assert distance <= 1.8, (diameter, distance)
        assert 1 / 1.5 <= row["radius_mm"] / (diameter / 2) <= 1.5, (diameter, row["radius_mm"])
        assert row["contrast"] < -1.0 and row["elongation"] <= MAX_ELONGATION
        assert row["blobness"] > 2.0
    # the planted spheres are the strongest candidates; the rest is noise
    strongest = candidates.head(len(spheres))
    for _, row in strongest.iterrows():
        assert min(np.linalg.norm(row[["i", "j", "k"]].to_numpy(float) - c)
                   for c in spheres.values()) <= 1.8


def test_bright_spheres_are_not_dark_blobs():
    shape = (48, 48, 48)
    image = _spheres(shape, SPHERES_1MM, 1.0, seed=0, sign=+1.0)
    dark = blob_candidates(image, _inner_mask(shape), 1.0)
    bright = blob_candidates(image, _inner_mask(shape), 1.0, dark=False)
    for centre in SPHERES_1MM.values():
        assert len(dark) == 0 or _nearest(dark, centre)[0] > 3
        assert _nearest(bright, centre)[0] <= 1.8
    assert (bright["contrast"].head(5) > 0).all()


def _vessels(shape):
    """Distance (mm, 1 mm grid) to a straight 30 mm vessel and to a curved one (rounded ends)."""
    grid = np.indices(shape, dtype=np.float64)
    across = np.sqrt((grid[1] - 16) ** 2 + (grid[2] - 24) ** 2)
    beyond = np.clip(np.maximum(9 - grid[0], grid[0] - 39), 0, None)  # x from 9 to 39
    straight = np.sqrt(across ** 2 + beyond ** 2)
    ring = np.sqrt((grid[0] - 24) ** 2 + (grid[1] - 34) ** 2)  # arc of radius 12 mm
    arc = np.where(grid[1] < 34, np.sqrt((ring - 12) ** 2 + (grid[2] - 12) ** 2), np.inf)
    ends = [np.sqrt((grid[0] - x) ** 2 + (grid[1] - 34) ** 2 + (grid[2] - 12) ** 2)
            for x in (12, 36)]
    return straight, np.minimum.reduce([arc, *ends])


@pytest.mark.parametrize("seed", [0, 1])
def test_vessels_give_no_candidate(seed):
    shape = (48, 48, 48)
    straight, curved = _vessels(shape)
    image = _noise(shape, seed, 1.0) - CONTRAST * (_render(straight, 1.0, 1.0)
                                                   + _render(curved, 1.0, 1.0))
    along = np.minimum(straight, curved)
    candidates = blob_candidates(image, _inner_mask(shape), 1.0)
    near = along[tuple(candidates[["i", "j", "k"]].to_numpy().T)] <= 3.0
    assert not near.any(), candidates[near]
    # without the shape tests the vessels do give candidates: the rejection does the work
    loose = blob_candidates(image, _inner_mask(shape), 1.0, max_elongation=math.inf,
                            min_isotropy=-math.inf)
    assert (along[tuple(loose[["i", "j", "k"]].to_numpy().T)] <= 3.0).sum() >= 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_large_dark_region_is_not_a_microbleed(seed):
    # iron-rich nuclei: a 25 x 20 x 16 mm ellipsoid, 2 robust SD darker, smooth borders, and
    # a 4 mm microbleed beside it
    shape = (48, 48, 48)
    grid = np.indices(shape, dtype=np.float64)
    region = (((grid[0] - 20) / 12.5) ** 2 + ((grid[1] - 24) / 10) ** 2
              + ((grid[2] - 24) / 8) ** 2) <= 1
    image = _noise(shape, seed, 1.0) - 2.0 * ndimage.gaussian_filter(region.astype(float), 2.0)
    image -= CONTRAST * _render(_distance(shape, (40, 24, 24), 1.0), 2.0, 1.0)
    candidates = blob_candidates(image, _inner_mask(shape), 1.0)
    assert _nearest(candidates.head(1), (40, 24, 24))[0] <= 1.8  # the microbleed comes first
    around = ndimage.binary_dilation(region, iterations=2)
    in_region = candidates[around[tuple(candidates[["i", "j", "k"]].to_numpy().T)]]
    # at most a noise blob on its border, far weaker than the microbleed
    assert len(in_region) <= 1
    assert (in_region["blobness"] < candidates["blobness"].iloc[0] / 2).all()


def test_candidates_lie_inside_the_eroded_mask():
    shape = (48, 48, 48)
    image = _spheres(shape, SPHERES_1MM, 1.0, seed=0)
    mask = np.zeros(shape, bool)
    mask[:, 20:, :] = True  # the 2, 4 and 6 mm spheres lie outside
    mask[:, 20:23, :] &= np.random.default_rng(0).random((48, 3, 48)) < 0.7  # a ragged edge
    candidates = blob_candidates(image, mask, 1.0)
    inner = ndimage.binary_erosion(mask)
    assert inner[tuple(candidates[["i", "j", "k"]].to_numpy().T)].all()
    for diameter in (2, 4, 6):
        assert _nearest(candidates, SPHERES_1MM[diameter])[0] > 3
    for diameter in (8, 10):
        assert _nearest(candidates, SPHERES_1MM[diameter])[0] <= 1.8
    # non-finite voxels are outside the brain too
    image[SPHERES_1MM[8]] = np.nan
    assert _nearest(blob_candidates(image, mask, 1.0), SPHERES_1MM[8])[0] > 0


def test_bad_inputs_and_empty_results():
    image = np.zeros((10, 10, 10))
    with pytest.raises(BadDataError, match="shape"):
        blob_candidates(image, np.ones((10, 10, 9)), 1.0)
    with pytest.raises(BadDataError, match="3D"):
        blob_candidates(np.zeros((10, 10)), np.ones((10, 10)), 1.0)
    with pytest.raises(BadDataError, match="isotropic"):
        blob_candidates(image, np.ones_like(image), (1.0, 1.0, 3.0))
    with pytest.raises(BadDataError, match="voxel size"):
        blob_candidates(image, np.ones_like(image), 0.0)
    empty = blob_candidates(image, np.ones_like(image), (2.0, 2.0, 2.0))
    assert len(empty) == 0 and empty.index.name == "candidate_id"
    assert len(blob_candidates(image, np.zeros_like(image), 1.0)) == 0
    table = candidate_table(empty, candidate_score(empty), np.eye(4), np.zeros((10, 10, 10)))
    assert list(table.columns) == list(CANDIDATE_COLUMNS) and len(table) == 0
    assert not candidate_mask((10, 10, 10), empty, 1.0).any()


def _hand_candidates():
    index = pd.RangeIndex(1, 4, name="candidate_id")
    return pd.DataFrame({"i": [5, 14, 5], "j": [5, 5, 14], "k": [5, 5, 5],
                         "radius_mm": [2.0, 4.0, 1.0], "blobness": [9.0, 5.0, 3.0],
                         "elongation": [1.1, 1.2, 1.3], "contrast": [-8.0, -4.0, -3.0]},
                        index=index)


def test_scores_are_the_map_maximum_in_each_sphere():
    candidates = _hand_candidates()
    anomaly = np.zeros((20, 20, 20))
    anomaly[5, 6, 6] = 3.0  # within 2 mm of candidate 1 (distance sqrt 2)
    anomaly[5, 5, 8] = 99.0  # 3 mm away: outside its sphere
    anomaly[14, 5, 8] = 4.0  # 3 mm from candidate 2: inside its 4 mm sphere
    anomaly[5, 14, 5] = np.nan  # candidate 3's sphere: its centre and 6 neighbours
    anomaly[5, 15, 5] = -1.0
    scores = score_candidates(candidates, anomaly, 1.0)
    assert scores.index.equals(candidates.index) and scores.name == "score"
    assert scores.tolist() == [3.0, 4.0, 0.0]
    # at 2 mm voxels the same radii reach fewer voxels: candidate 2 reaches 2 voxels away
    # and candidate 3 only its centre, which is nan: no score
    at_2mm = score_candidates(candidates, anomaly, 2.0)
    assert at_2mm.iloc[:2].tolist() == [0.0, 0.0] and np.isnan(at_2mm.iloc[2])
    assert candidate_score(candidates).tolist() == [9.0, 5.0, 3.0]
    assert candidate_score(candidates, anomaly, 1.0).equals(scores)
    with pytest.raises(ValueError, match="voxel size"):
        candidate_score(candidates, anomaly)


def test_candidate_table_in_millimetres_with_regions():
    candidates = _hand_candidates()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20, -30, -40]
    regions = np.zeros((20, 20, 20), np.uint8)
    regions[5, 5, 5], regions[14, 5, 5] = 2, 3  # candidate 3 outside the brain
    scores = pd.Series([1.0, 7.0, 4.0], index=candidates.index)
    table = candidate_table(candidates, scores, affine, regions)
    assert list(table.columns) == list(CANDIDATE_COLUMNS)
    assert table["candidate_id"].tolist() == [2, 3, 1]
    assert table["score"].tolist() == [7.0, 4.0, 1.0]
    first = table.iloc[0]
    assert (first["x"], first["y"], first["z"]) == (8.0, -20.0, -30.0)
    assert table["region"].tolist() == ["infratentorial", "outside", "deep"]
    assert table.loc[table["candidate_id"] == 1, "radius_mm"].item() == 2.0
    # scores as values in the rows' order
    same = candidate_table(candidates, scores.to_numpy(), affine, regions)
    pd.testing.assert_frame_equal(table, same)
    assert all("Description" in spec for spec in CANDIDATE_COLUMNS.values())
    assert set(CANDIDATE_COLUMNS["region"]["Levels"]) == {*MARS_REGIONS.values(), "outside"}


def test_candidate_mask_labels_each_sphere():
    candidates = _hand_candidates()
    candidates.loc[3, ["i", "j"]] = [6, 6]  # inside candidate 1's sphere
    labels = candidate_mask((20, 20, 20), candidates, 1.0)
    assert labels.dtype == np.uint16
    assert labels[5, 5, 5] == 1 and labels[6, 6, 5] == 1  # the stronger candidate wins
    assert labels[14, 5, 5] == 2 and labels[14, 5, 9] == 2 and labels[14, 5, 10] == 0
    assert (labels == 1).sum() == 33  # voxels within 2 mm
    # of candidate 3's 7 voxels only (7, 6, 5) and (6, 7, 5) lie beyond 2 mm of candidate 1
    assert labels[7, 6, 5] == 3 and labels[6, 7, 5] == 3 and (labels == 3).sum() == 2
    assert (labels == 2).sum() == (candidate_mask((40, 40, 40), candidates.iloc[[1]], 1.0)
                                   == 2).sum()
    grid = candidate_mask((20, 20, 20), candidates.iloc[[1]], 2.0)
    assert (grid == 2).sum() == 33  # a 4 mm radius at 2 mm voxels: within 2 voxels


def test_threshold_for_a_false_positive_rate():
    controls = [np.array([5.0, 1.0]), np.array([3.0]), np.array([])]
    # 3 controls, 3 candidates: one false positive per subject allows all three
    assert threshold_for_fp(controls, 1.0) == -math.inf
    # 1/3 per subject allows one candidate in all: keep scores above 3 (only the 5)
    assert threshold_for_fp(controls, 1 / 3) == 3.0
    assert threshold_for_fp(controls, 0.5) == 3.0  # floor(1.5) = 1
    assert threshold_for_fp(controls, 2 / 3) == 1.0  # two: 5 and 3
    assert threshold_for_fp(controls, 0.0) == 5.0  # nothing above 5
    assert threshold_for_fp([[], []], 0.0) == -math.inf  # no control candidate at all
    ties = [[2.0, 2.0, 2.0], [1.0]]
    assert threshold_for_fp(ties, 1.0) == 2.0  # two allowed, the tie keeps none above
    with pytest.raises(BadDataError):
        threshold_for_fp([], 1.0)
    with pytest.raises(ValueError):
        threshold_for_fp(controls, -1.0)


def test_fp_curve_agrees_with_the_threshold():
    controls = [np.array([5.0, 1.0, 1.0]), np.array([3.0]), np.array([np.nan]), np.array([])]
    curve = fp_curve(controls)
    assert list(curve.columns) == ["threshold", "fp_per_subject"]
    assert curve["threshold"].tolist() == [-math.inf, 1.0, 3.0, 5.0]
    assert curve["fp_per_subject"].tolist() == [1.0, 0.5, 0.25, 0.0]
    for fp in (0.0, 0.25, 0.3, 0.5, 0.9, 1.0, 2.0):
        allowed = curve[curve["fp_per_subject"] <= fp + 1e-12]
        assert threshold_for_fp(controls, fp) == allowed["threshold"].min()


@pytest.fixture(scope="module")
def template_regions():
    from bids_anomaly.imaging.template import template_images

    mask = template_images(2)["mask"]
    return mars_regions(np.asarray(mask.dataobj), mask.affine), mask.affine


def test_mars_regions_on_the_template(template_regions):
    regions, affine = template_regions
    assert regions.dtype == np.uint8
    sizes = {name: int((regions == label).sum()) for label, name in MARS_REGIONS.items()}
    assert all(size > 0 for size in sizes.values()), sizes
    assert sizes["lobar"] > sizes["infratentorial"] > 0 and sizes["lobar"] > sizes["deep"]

    def centre(label):
        voxels = np.argwhere(regions == label).mean(axis=0)
        return affine[:3, :3] @ voxels + affine[:3, 3]

    deep, infratentorial = centre(2), centre(3)
    assert infratentorial[2] < deep[2] - 20  # below
    assert infratentorial[1] < deep[1]  # and behind

    def label_at(x, y, z):
        i, j, k = np.round(np.linalg.solve(affine, [x, y, z, 1.0])[:3]).astype(int)
        return MARS_REGIONS.get(int(regions[i, j, k]), "outside")

    assert label_at(-24, 2, 2) == "deep"  # putamen
    assert label_at(10, -18, 8) == "deep"  # thalamus
    assert label_at(0, -28, -30) == "infratentorial"  # pons
    assert label_at(-24, -64, -34) == "infratentorial"  # cerebellar hemisphere
    assert label_at(40, -30, -24) == "lobar"  # inferior temporal gyrus, beside the cerebellum
    assert label_at(-40, -20, 50) == "lobar"  # precentral gyrus
    assert label_at(0, 0, 90) == "outside"
