"""Per-lesion detection of microbleeds: matching, metrics, FROC and ground-truth readers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bids_anomaly.errors import BadDataError, MissingInputError
from bids_anomaly.evaluation.detection import (
    DEFAULT_RADIUS_MM,
    detection_metrics,
    froc,
    froc_summary,
    match_detections,
    points_from_mask,
    read_points_tsv,
    sensitivity_at,
)

TRUTH = np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0], [0.0, 30.0, 0.0]])
RADII = np.array([2.0, 3.0, 1.0])


def test_exact_hits_are_all_true_positives():
    scores = np.array([0.5, 0.7, 0.9])
    result = match_detections(TRUTH, scores, TRUTH, RADII)
    assert result["true_positive"].all() and result["detected"].all()
    assert result["matched"].tolist() == [0, 1, 2]
    metrics = detection_metrics(TRUTH, scores, TRUTH, RADII)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (3, 0, 0)
    assert metrics["sensitivity"] == metrics["precision"] == metrics["f1"] == 1.0
    assert metrics["count_difference"] == metrics["abs_count_difference"] == 0


def test_reach_is_radius_plus_tolerance_inclusive():
    truth, radii = np.array([[0.0, 0.0, 0.0]]), np.array([2.0])
    on_edge = match_detections([[0.0, 0.0, 3.0]], [1.0], truth, radii, tolerance_mm=1.0)
    assert on_edge["true_positive"].tolist() == [True]
    outside = match_detections([[0.0, 0.0, 3.01]], [1.0], truth, radii, tolerance_mm=1.0)
    assert outside["true_positive"].tolist() == [False]
    assert outside["detected"].tolist() == [False] and outside["matched"].tolist() == [-1]
    no_tolerance = match_detections([[0.0, 2.5, 0.0]], [1.0], truth, radii, tolerance_mm=0.0)
    assert not no_tolerance["true_positive"].any()
    metrics = detection_metrics([[0.0, 0.0, 3.01]], [1.0], truth, radii, tolerance_mm=1.0)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (0, 1, 1)
    assert metrics["sensitivity"] == 0.0 and metrics["f1"] == 0.0


def test_two_detections_on_one_microbleed_give_one_true_and_one_false_positive():
    detections = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    result = match_detections(detections, [0.3, 0.8], TRUTH[:1], RADII[:1])
    # the higher score (second detection) takes the microbleed
    assert result["true_positive"].tolist() == [False, True]
    assert result["matched"].tolist() == [-1, 0]
    metrics = detection_metrics(detections, [0.3, 0.8], TRUTH[:1], RADII[:1])
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (1, 1, 0)
    assert metrics["precision"] == 0.5 and metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["count_difference"] == 1 and metrics["abs_count_difference"] == 1


def test_detection_between_two_microbleeds_goes_to_the_nearest():
    truth = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    radii = np.array([3.0, 3.0])
    result = match_detections([[1.5, 0.0, 0.0]], [1.0], truth, radii)
    assert result["matched"].tolist() == [0]
    assert result["detected"].tolist() == [True, False]
    result = match_detections([[2.5, 0.0, 0.0]], [1.0], truth, radii)
    assert result["matched"].tolist() == [1]
    # the nearest is taken by a better detection: the next one within reach is used
    result = match_detections([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]], [0.9, 0.5], truth, radii)
    assert result["matched"].tolist() == [0, 1]


def test_greedy_follows_the_score_not_the_distance():
    truth, radii = np.array([[0.0, 0.0, 0.0]]), np.array([2.0])
    detections = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 1.5]])  # the first is nearer
    result = match_detections(detections, [0.4, 0.9], truth, radii, tolerance_mm=0.0)
    assert result["true_positive"].tolist() == [False, True]
    result = match_detections(detections, [0.9, 0.4], truth, radii, tolerance_mm=0.0)
    assert result["true_positive"].tolist() == [True, False]
    # equal scores: input order
    result = match_detections(detections, [0.5, 0.5], truth, radii, tolerance_mm=0.0)
    assert result["true_positive"].tolist() == [True, False]


def test_threshold_and_subjects_without_microbleeds():
    detections = np.array([[0.0, 0.0, 0.0], [9.0, 9.0, 9.0], [50.0, 0.0, 0.0]])
    scores = np.array([0.9, 0.2, 0.6])
    metrics = detection_metrics(detections, scores, TRUTH[:1], RADII[:1], threshold=0.5)
    assert (metrics["n_detected"], metrics["tp"], metrics["fp"]) == (2, 1, 1)
    none = detection_metrics(detections, scores, np.zeros((0, 3)), np.zeros(0))
    assert (none["n_true"], none["tp"], none["fp"], none["fn"]) == (0, 0, 3, 0)
    assert np.isnan(none["sensitivity"]) and none["precision"] == 0.0 and none["f1"] == 0.0
    assert none["count_difference"] == 3
    empty = detection_metrics(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), np.zeros(0))
    assert np.isnan(empty["precision"]) and np.isnan(empty["f1"])
    assert empty["abs_count_difference"] == 0
    missed = detection_metrics(np.zeros((0, 3)), [], TRUTH, RADII)
    assert missed["fn"] == 3 and missed["sensitivity"] == 0.0 and np.isnan(missed["precision"])
    assert missed["count_difference"] == -3 and missed["abs_count_difference"] == 3


def hand_worked_subjects() -> list[tuple]:
    """Two subjects; tolerance 1 mm, so the reach is radius + 1.

    Subject A: microbleeds T1 at (0, 0, 0) and T2 at (20, 0, 0), radius 2 mm (reach 3 mm).
      d1 (0, 0, 1)     score 0.9 -> T1, TP
      d2 (0, 1, 0)     score 0.8 -> T1 already taken, FP
      d3 (20, 0, 2.5)  score 0.6 -> T2 (2.5 <= 3), TP
    Subject B: no microbleed.
      e1 score 0.7 FP, e2 score 0.6 FP (tied with d3), e3 score 0.3 FP

    Two true microbleeds, two subjects; thresholds (score >= t), descending:
      t=0.9: TP 1, FP 0 -> sensitivity 0.5, FP/subject 0.0
      t=0.8: TP 1, FP 1 -> 0.5, 0.5
      t=0.7: TP 1, FP 2 -> 0.5, 1.0
      t=0.6: TP 2, FP 3 -> 1.0, 1.5
      t=0.3: TP 2, FP 4 -> 1.0, 2.0
    """
    subject_a = (np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [20.0, 0.0, 2.5]]),
                 np.array([0.9, 0.8, 0.6]),
                 np.array([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]]), np.array([2.0, 2.0]))
    subject_b = (np.array([[5.0, 5.0, 5.0], [-5.0, 5.0, 5.0], [5.0, -5.0, 5.0]]),
                 np.array([0.7, 0.6, 0.3]), np.zeros((0, 3)), np.zeros(0))
    return [subject_a, subject_b]


def test_froc_on_a_hand_worked_case():
    table = froc(hand_worked_subjects(), tolerance_mm=1.0)
    assert list(table.columns) == ["threshold", "sensitivity", "fp_per_subject", "tp", "fp"]
    assert table["threshold"].tolist() == [0.9, 0.8, 0.7, 0.6, 0.3]
    assert table["sensitivity"].tolist() == [0.5, 0.5, 0.5, 1.0, 1.0]
    assert table["fp_per_subject"].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert table["tp"].tolist() == [1, 1, 1, 2, 2]
    assert table["fp"].tolist() == [0, 1, 2, 3, 4]


def test_sensitivity_at_and_froc_summary():
    table = froc(hand_worked_subjects(), tolerance_mm=1.0)
    assert sensitivity_at(table, 0) == 0.5
    assert sensitivity_at(table, 1.49) == 0.5
    assert sensitivity_at(table, 1.5) == 1.0
    assert sensitivity_at(table, -1) == 0.0  # no row qualifies
    summary = froc_summary(table)
    assert summary == pytest.approx({
        "sensitivity_at_0.5": 0.5, "sensitivity_at_1": 0.5, "sensitivity_at_2": 1.0,
        "sensitivity_at_3": 1.0, "sensitivity_at_4": 1.0, "sensitivity_at_8": 1.0,
        "cpm": 5 / 6,
    })
    # a first detection that is a false positive: nothing at 0 FP/subject
    late = froc([(np.array([[9.0, 9.0, 9.0], [0.0, 0.0, 0.0]]), np.array([0.9, 0.1]),
                  np.zeros((1, 3)), np.array([2.0]))])
    assert late["fp_per_subject"].tolist() == [1.0, 1.0]
    assert sensitivity_at(late, 0.5) == 0.0 and sensitivity_at(late, 1) == 1.0


def test_froc_edge_cases():
    empty = froc([(np.zeros((0, 3)), np.zeros(0), TRUTH, RADII)])
    assert empty.empty and list(empty.columns)[:3] == ["threshold", "sensitivity",
                                                        "fp_per_subject"]
    assert sensitivity_at(empty, 8) == 0.0 and froc_summary(empty)["cpm"] == 0.0
    no_truth = froc([(TRUTH, np.array([0.3, 0.2, 0.1]), np.zeros((0, 3)), np.zeros(0))])
    assert no_truth["sensitivity"].isna().all() and no_truth["fp"].tolist() == [1, 2, 3]
    assert np.isnan(sensitivity_at(no_truth, 8))
    with pytest.raises(ValueError):
        froc([])


def test_froc_agrees_with_rematching_at_every_threshold():
    rng = np.random.default_rng(3)
    subjects = []
    for n_true in (0, 3, 6, 10):
        truth = rng.uniform(0, 40, (n_true, 3))
        radii = rng.uniform(1, 4, n_true)
        near = truth[rng.integers(0, n_true, 2 * n_true)] + rng.normal(0, 2, (2 * n_true, 3)) \
            if n_true else np.zeros((0, 3))
        detections = np.vstack([near, rng.uniform(0, 40, (8, 3))])
        scores = np.round(rng.random(len(detections)), 1)  # many ties
        subjects.append((detections, scores, truth, radii))
    table = froc(subjects, tolerance_mm=0.5)
    for row in table.itertuples():
        per_subject = [detection_metrics(*subject, threshold=row.threshold, tolerance_mm=0.5)
                       for subject in subjects]
        assert row.tp == sum(metrics["tp"] for metrics in per_subject)
        assert row.fp == sum(metrics["fp"] for metrics in per_subject)
    assert table["threshold"].is_monotonic_decreasing
    assert table["sensitivity"].is_monotonic_increasing


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="scores"):
        match_detections(TRUTH, [0.1, 0.2], TRUTH, RADII)
    with pytest.raises(ValueError, match="detections"):
        match_detections(np.zeros((2, 2)), [0.1, 0.2], TRUTH, RADII)
    with pytest.raises(ValueError, match="radii"):
        match_detections(TRUTH, None, TRUTH, -RADII)


def world_grid(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of every voxel centre, shape + (3,)."""
    index = np.moveaxis(np.indices(shape, dtype=np.float64), 0, -1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def test_points_from_a_labelled_mask():
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    mask = np.zeros((20, 20, 20), np.int16)
    mask[2:6, 2:6, 2:6] = 3  # two touching cubes: one component, but two labels
    mask[6:8, 2:6, 2:6] = 7
    centres, radii = points_from_mask(mask, affine)
    assert centres == pytest.approx(np.array([[-10 + 3.5 * 0.5, 5 + 1.75, 2 + 1.75],
                                              [-10 + 6.5 * 0.5, 5 + 1.75, 2 + 1.75]]))
    volumes = np.array([64, 32]) * 0.125
    assert radii == pytest.approx(np.cbrt(3 * volumes / (4 * np.pi)))
    # integer-valued floats and a trailing singleton axis are accepted
    again, _ = points_from_mask(mask.astype(np.float32)[..., None], affine)
    assert again == pytest.approx(centres)


def test_points_from_a_binary_mask_with_two_spheres():
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # anisotropic voxels
    affine[:3, 3] = [-20.0, -20.0, -20.0]
    shape = (40, 40, 20)
    world = world_grid(shape, affine)
    spheres = [(np.array([-8.3, -5.2, -6.1]), 5.0), (np.array([7.6, 9.1, 8.4]), 4.0)]
    mask = np.zeros(shape, bool)
    for centre, radius in spheres:
        mask |= np.linalg.norm(world - centre, axis=-1) <= radius
    centres, radii = points_from_mask(mask, affine)
    assert len(centres) == 2
    for (centre, radius), found, found_radius in zip(spheres, centres, radii, strict=True):
        assert np.linalg.norm(found - centre) < 0.5
        assert found_radius == pytest.approx(radius, rel=0.2)


def test_binary_components_are_26_connected_and_bad_masks_refused():
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[1, 1, 1] = mask[2, 2, 2] = 1  # touching by a corner: one microbleed
    mask[4, 4, 4] = 1
    centres, radii = points_from_mask(mask, np.eye(4))
    assert centres.tolist() == [[1.5, 1.5, 1.5], [4.0, 4.0, 4.0]]
    assert radii[0] > radii[1]
    none, none_radii = points_from_mask(np.zeros((4, 4, 4)), np.eye(4))
    assert none.shape == (0, 3) and none_radii.shape == (0,)
    with pytest.raises(BadDataError, match="non-integer"):
        points_from_mask(np.full((4, 4, 4), 0.4), np.eye(4))
    with pytest.raises(BadDataError, match="3D"):
        points_from_mask(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(BadDataError, match="negative"):
        points_from_mask(-np.ones((4, 4, 4), int), np.eye(4))


def test_read_points_tsv(tmp_path):
    path = tmp_path / "sub-01_microbleeds.tsv"
    path.write_text("x\ty\tz\tradius_mm\tnote\n1.5\t-2\t3\t1.2\ta\n-4\t5\t6e1\tn/a\tb\n")
    centres, radii = read_points_tsv(path)
    assert centres.tolist() == [[1.5, -2.0, 3.0], [-4.0, 5.0, 60.0]]
    assert radii.tolist() == [1.2, DEFAULT_RADIUS_MM]
    no_radius = tmp_path / "no_radius.tsv"
    no_radius.write_text("z\ty\tx\n3\t2\t1\n")
    centres, radii = read_points_tsv(no_radius)
    assert centres.tolist() == [[1.0, 2.0, 3.0]] and radii.tolist() == [2.5]
    header_only = tmp_path / "none.tsv"
    header_only.write_text("x\ty\tz\n")
    centres, radii = read_points_tsv(header_only)
    assert centres.shape == (0, 3) and radii.shape == (0,)


@pytest.mark.parametrize(("text", "column"), [
    ("x\ty\n1\t2\n", "z"),
    ("x\ty\tz\n1\tabc\t3\n", "'y'"),
    ("x\ty\tz\n1\tn/a\t3\n", "'y'"),
    ("x\ty\tz\tradius_mm\n1\t2\t3\tbig\n", "'radius_mm'"),
    ("x\ty\tz\tradius_mm\n1\t2\t3\t-1\n", "'radius_mm'"),
])
def test_read_points_tsv_refuses_bad_tables(tmp_path, text, column):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(BadDataError) as error:
        read_points_tsv(path)
    assert "bad.tsv" in str(error.value) and column in str(error.value)


def test_read_points_tsv_missing_file(tmp_path):
    with pytest.raises(MissingInputError):
        read_points_tsv(tmp_path / "absent.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(BadDataError, match="empty.tsv"):
        read_points_tsv(empty)


def test_results_are_plain_types():
    table = froc(hand_worked_subjects())
    assert isinstance(table, pd.DataFrame)
    assert table["tp"].dtype == np.int64 and table["fp"].dtype == np.int64
    metrics = detection_metrics(*hand_worked_subjects()[0])
    assert isinstance(metrics["tp"], int) and isinstance(metrics["sensitivity"], float)
