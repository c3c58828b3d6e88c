"""Voxel p-values from a healthy tail and Benjamini-Hochberg control."""

import numpy as np
import pytest

from bids_anomaly.postprocessing.thresholds import (
    benjamini_hochberg,
    fdr_mask,
    p_values,
    tail_table,
    threshold_at_fpr,
)


def test_p_values_match_the_empirical_exceedance():
    rng = np.random.default_rng(0)
    healthy = rng.normal(size=200_000)
    tail = tail_table(healthy)
    for score in (0.0, 1.0, 2.0, 3.0):
        empirical = (healthy > score).mean()
        assert p_values(np.array([score]), tail)[0] == pytest.approx(empirical, rel=0.03)
    assert p_values(np.array([100.0]), tail)[0] == pytest.approx(1 / 200_001)


def test_benjamini_hochberg_matches_its_definition():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.uniform(size=900), rng.uniform(0, 1e-3, size=100)])
    rejected = benjamini_hochberg(p, 0.05)
    ranked = np.sort(p)
    passing = np.flatnonzero(ranked <= 0.05 * np.arange(1, p.size + 1) / p.size)
    assert rejected.sum() == passing.max() + 1
    assert p[rejected].max() <= p[~rejected].min()
    assert not benjamini_hochberg(rng.uniform(0.5, 1, 100), 0.05).any()


def test_fdr_controls_false_discoveries_on_null_plus_signal():
    rng = np.random.default_rng(2)
    healthy = rng.normal(size=100_000)
    scores = rng.normal(size=(40, 40, 40))
    scores[:10, :10, :10] += 6.0
    brain = np.ones(scores.shape, np.uint8)
    mask, threshold = fdr_mask(scores, brain, tail_table(healthy), 0.05)
    truth = np.zeros(scores.shape, bool)
    truth[:10, :10, :10] = True
    assert mask[truth].mean() > 0.95
    false = (mask.astype(bool) & ~truth).sum() / max(mask.sum(), 1)
    assert false < 0.1
    assert threshold == pytest.approx(scores[mask.astype(bool)].min())


def test_threshold_at_fpr_refuses_impossible_rates():
    with pytest.raises(ValueError, match="false-positive rate"):
        threshold_at_fpr(np.arange(10.0), 1.5)
