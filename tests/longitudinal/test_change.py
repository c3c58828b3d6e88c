"""Change scores, thresholds and classes of a session pair (generated arrays)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from bids_anomaly.longitudinal.change import (
    change_maps,
    change_summary,
    classify_changes,
    null_threshold,
)

SHAPE = (40, 40, 30)


def _pair(seed: int = 0, scale: float = 1.0, offset: float = 0.0):
    """Two sessions of a blocky brain: WM core, GM shell, a ventricle; one lesion appears,
    one grows, one disappears; the later session on another intensity scale."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE)
    radius = np.sqrt(((grid[0] - 20) / 18) ** 2 + ((grid[1] - 20) / 18) ** 2
                     + ((grid[2] - 15) / 13) ** 2)
    brain = radius < 1
    wm = radius < 0.75
    csf = np.sqrt(((grid[0] - 20) / 4) ** 2 + ((grid[1] - 20) / 4) ** 2
                  + ((grid[2] - 15) / 4) ** 2) < 1
    wm &= ~csf
    gm = brain & ~wm & ~csf
    image = np.where(wm, 1.0, np.where(gm, 1.5, np.where(csf, 0.3, 0.0)))

    def ball(centre, r):
        return np.sqrt(sum((grid[i] - centre[i]) ** 2 for i in range(3))) <= r

    new, old_small, old_big = ball((10, 20, 15), 2.5), ball((30, 20, 15), 1.5), ball(
        (30, 20, 15), 3.0)
    gone = ball((20, 10, 15), 2.5)
    earlier_lesions = old_small | gone
    later_lesions = new | old_big
    earlier = np.where(earlier_lesions, 2.5, image) + rng.normal(0, 0.05, SHAPE)
    later = (np.where(later_lesions, 2.5, image) + rng.normal(0, 0.05, SHAPE)) * scale + offset

    def posteriors(lesions):
        return {"GM": (gm & ~lesions).astype(float), "WM": (wm & ~lesions).astype(float),
                "CSF": (csf & ~lesions).astype(float), "lesion": lesions.astype(float)}

    truth = (new | (old_big & ~old_small) | gone)
    return (earlier * brain, later * brain, posteriors(earlier_lesions),
            posteriors(later_lesions), brain, earlier_lesions, later_lesions, truth,
            {"new": new, "enlarging": old_big & ~old_small, "shrinking": gone})


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (3.0, 100.0)])
def test_changed_lesions_are_found_on_any_intensity_scale(scale, offset):
    earlier, later, p1, p2, brain, les1, les2, truth, parts = _pair(scale=scale, offset=offset)
    # the tissue scores: high inside each session's lesions
    s1, s2 = 6.0 * les1, 6.0 * les2
    maps = change_maps(s1, s2, earlier, later, p1, p2, brain)
    assert average_precision_score(truth[brain], np.abs(maps.score)[brain]) > 0.9
    assert maps.score[parts["new"]].mean() > 0 > maps.score[parts["shrinking"]].mean()
    assert maps.noise_sd["WM"] == pytest.approx(0.05 * np.sqrt(2), rel=0.25)
    threshold = null_threshold(maps, 0.001)
    flagged = (np.abs(maps.score) > threshold)
    assert flagged[maps.null].mean() <= 0.0015
    labels, numbers, table = classify_changes(maps.score, threshold, les1, 8.0)
    assert set(table["change"]) == {"new", "enlarging", "shrinking"}
    for name, value in (("new", 1), ("enlarging", 2), ("shrinking", 3)):
        assert (labels[parts[name]] == value).mean() > 0.5, name
    summary = change_summary(table, "1", "2")
    assert summary["new_count"] >= 1 and summary["shrinking_ml"] > 0


def test_a_pair_without_change_is_flagged_near_the_target_rate():
    earlier, _, p1, _, brain, les1, _, _, _ = _pair(seed=1)
    rng = np.random.default_rng(5)
    later = np.where(brain, earlier + rng.normal(0, 0.05, SHAPE), 0)  # the same brain, rescanned
    s = 6.0 * les1
    maps = change_maps(s, s, earlier, later, p1, p1, brain)
    threshold = null_threshold(maps, 0.01)
    flagged = np.abs(maps.score[brain]) > threshold
    assert 0.002 < flagged.mean() < 0.03


def test_refusals():
    earlier, later, p1, p2, brain, *_ = _pair()
    no_white = {**p1, "WM": np.zeros(SHAPE)}
    with pytest.raises(ValueError, match="white matter"):
        change_maps(earlier, later, earlier, later, no_white, p2, brain)
    maps = change_maps(np.zeros(SHAPE), np.zeros(SHAPE), earlier, later, p1, p2, brain)
    with pytest.raises(ValueError, match="false-positive"):
        null_threshold(maps, 1.5)


def test_change_masks_are_change_truth_not_lesion_truth(tmp_path):
    from bids_anomaly.evaluation.change import find_change_truth
    from bids_anomaly.evaluation.ground_truth import find_ground_truth

    anat = tmp_path / "sub-01" / "ses-2" / "anat"
    anat.mkdir(parents=True)
    change = anat / "sub-01_ses-2_label-change_mask.nii.gz"
    change.write_bytes(b"")
    assert find_ground_truth(tmp_path, "01", "2") is None
    assert find_change_truth(tmp_path, "01", "2") == change
    assert find_change_truth(tmp_path, "01", "1") is None
    lesions = anat / "sub-01_ses-2_label-lesion_mask.nii.gz"
    lesions.write_bytes(b"")
    assert find_ground_truth(tmp_path, "01", "2") == lesions
