"""Intensity normalisation on generated three-tissue "brains" (no files, no GPU)."""

import logging

import numpy as np
import pytest
from scipy.stats import norm, truncnorm

from bids_anomaly.imaging.normalization import (
    METHODS,
    normalize,
    percentile_scale,
    robust_zscore,
    whitestripe,
)

SHAPE = (40, 40, 40)
CSF, GM, WM = 0, 1, 2
FRACTIONS = (0.15, 0.40, 0.45)  # CSF, GM, WM
SD = 5.0


def _phantom(means, fractions=FRACTIONS, seed=0, background=500.0):
    """Image, brain mask (a 36^3 block) and tissue labels (-1 outside) with Gaussian tissues."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    labels = np.full(SHAPE, -1)
    labels[mask] = rng.choice(3, size=int(mask.sum()), p=fractions)
    image = np.full(SHAPE, background)
    image[mask] = np.asarray(means, float)[labels[mask]] + rng.normal(0, SD, int(mask.sum()))
    return image, mask, labels


def _t1(**kwargs):
    return _phantom((30.0, 60.0, 90.0), **kwargs)  # CSF < GM < WM


def _t2(**kwargs):
    return _phantom((90.0, 60.0, 30.0), **kwargs)  # WM < GM < CSF


def _stripe_sd_ratio(wm_fraction, width=0.05):
    """SD of a Gaussian WM class over the SD of its central +-width brain-quantile stripe."""
    z = norm.ppf(0.5 + width / wm_fraction)
    return 1.0 / truncnorm.std(-z, z)


# --------------------------------------------------------------------------------- whitestripe


def test_whitestripe_t1_centres_white_matter_and_scales_by_the_stripe():
    image, mask, labels = _t1()
    out = whitestripe(image, mask, "T1w")
    wm, gm, csf = (out[labels == k] for k in (WM, GM, CSF))
    assert abs(wm.mean()) < 0.5
    # the stripe is the central 10 % of the brain = 22 % of WM, so WM's spread is the stripe's
    # (unit) SD times the truncated-normal ratio (~6.2), and the WM-GM gap is 30 / stripe SD
    assert wm.std() == pytest.approx(_stripe_sd_ratio(FRACTIONS[WM]), rel=0.1)
    stripe_sd = SD / _stripe_sd_ratio(FRACTIONS[WM])
    assert gm.mean() == pytest.approx(-30 / stripe_sd, rel=0.1)
    assert csf.mean() < gm.mean() < 0
    # the offset and scale are those of the +-5 % brain-quantile stripe around the true WM mean
    slope, intercept = np.polyfit(image[mask], out[mask].astype(float), 1)
    values = image[mask]
    bounds = np.quantile(values, np.mean(values < 90.0) + np.array([-0.05, 0.05]))
    stripe = values[(values >= bounds[0]) & (values <= bounds[1])]
    assert 1 / slope == pytest.approx(stripe.std(), rel=0.05)
    assert -intercept / slope == pytest.approx(stripe.mean(), abs=0.3)


def test_whitestripe_t1_takes_the_brightest_peak_even_when_grey_matter_is_taller():
    image, mask, labels = _t1(fractions=(0.20, 0.55, 0.25), seed=1)
    out = whitestripe(image, mask, "T1w")
    assert abs(out[labels == WM].mean()) < 0.5
    assert out[labels == GM].mean() < -10


@pytest.mark.parametrize("modality", ["T2w", "PDw"])
def test_whitestripe_t2_centres_the_dark_white_matter(modality):
    image, mask, labels = _t2(seed=2)
    out = whitestripe(image, mask, modality)
    assert abs(out[labels == WM].mean()) < 0.5
    assert out[labels == WM].std() == pytest.approx(_stripe_sd_ratio(FRACTIONS[WM]), rel=0.1)
    assert 0 < out[labels == GM].mean() < out[labels == CSF].mean()


def test_whitestripe_t2_ignores_a_taller_csf_peak_above_the_median():
    image, mask, labels = _t2(fractions=(0.40, 0.28, 0.32), seed=3)
    out = whitestripe(image, mask, "T2w")
    assert abs(out[labels == WM].mean()) < 0.5
    assert out[labels == CSF].mean() > 10


def test_whitestripe_flair_white_matter_between_dark_csf_and_bright_grey_matter():
    image, mask, labels = _phantom((20.0, 70.0, 50.0), seed=4)
    out = whitestripe(image, mask, "FLAIR")
    assert abs(out[labels == WM].mean()) < 0.5
    assert out[labels == CSF].mean() < 0 < out[labels == GM].mean()


def test_whitestripe_modality_matters():
    image, mask, labels = _t2(seed=2)
    as_t1 = whitestripe(image, mask, "T1w")  # the last (brightest) peak of a T2w is CSF
    assert abs(as_t1[labels == CSF].mean()) < 0.5
    assert as_t1[labels == WM].mean() < -10


@pytest.mark.parametrize("make, modality", [(_t1, "T1w"), (_t2, "T2w")])
def test_whitestripe_is_invariant_to_affine_intensity_changes(make, modality):
    image, mask, _ = make(seed=5)
    reference = whitestripe(image, mask, modality)
    scaled = whitestripe(image * 1e4 + 1e6, mask, modality)
    assert np.isfinite(scaled).all()
    np.testing.assert_allclose(scaled, reference, atol=1e-3)
    shrunk = whitestripe(image * 1e-3 - 7.0, mask, modality)
    np.testing.assert_allclose(shrunk, reference, atol=1e-3)


def test_whitestripe_accepts_negative_zscored_input():
    image, mask, labels = _t1(seed=6)
    zscored = robust_zscore(image, mask)
    assert zscored[mask].min() < -2
    out = whitestripe(zscored, mask, "T1w")
    assert abs(out[labels == WM].mean()) < 0.5
    np.testing.assert_allclose(out, whitestripe(image, mask, "T1w"), atol=1e-3)


def test_whitestripe_ignores_voxels_outside_the_mask():
    image, mask, _ = _t1(seed=7)
    other = image.copy()
    other[~mask] = -1e6
    out = whitestripe(image, mask, "T1w")
    assert (out[~mask] == 0).all()
    np.testing.assert_array_equal(out, whitestripe(other, mask, "T1w"))


def test_whitestripe_falls_back_to_the_global_mode_with_a_warning(caplog):
    rng = np.random.default_rng(8)
    image = rng.exponential(10.0, size=SHAPE)  # decreasing density: no interior peak
    mask = np.ones(SHAPE, bool)
    with caplog.at_level(logging.WARNING, logger="bids_anomaly.imaging.normalization"):
        out = whitestripe(image, mask, "T1w")
    assert "no white-matter peak" in caplog.text
    assert np.isfinite(out).all()
    # the global mode is at the dark end: the stripe sits in the lowest 10 % of voxels
    assert np.mean(out[mask] < 0) < 0.10


def test_whitestripe_rejects_bad_arguments():
    image, mask, _ = _t1()
    with pytest.raises(ValueError, match="T1w.*T2w.*FLAIR.*PDw"):
        whitestripe(image, mask, "DWI")
    with pytest.raises(ValueError, match="width"):
        whitestripe(image, mask, "T1w", width=0.6)


# ---------------------------------------------------------------------------------- percentile


def test_percentile_maps_1st_and_99th_percentiles_to_0_and_1_without_clipping():
    image, mask, _ = _t1(seed=9)
    out = percentile_scale(image, mask)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.percentile(out[mask], [1, 99]), [0, 1], atol=1e-5)
    assert out[mask].min() < 0 and out[mask].max() > 1
    assert (out[~mask] == 0).all()
    custom = percentile_scale(image, mask, lower=5, upper=95)
    np.testing.assert_allclose(np.percentile(custom[mask], [5, 95]), [0, 1], atol=1e-5)


def test_percentile_accepts_negative_and_huge_inputs():
    image, mask, _ = _t1(seed=10)
    reference = percentile_scale(image, mask)
    np.testing.assert_allclose(percentile_scale(robust_zscore(image, mask), mask), reference,
                               atol=1e-4)
    np.testing.assert_allclose(percentile_scale(image * 1e4 + 1e6, mask), reference, atol=1e-4)


def test_percentile_rejects_bad_percentiles():
    image, mask, _ = _t1()
    with pytest.raises(ValueError, match="lower"):
        percentile_scale(image, mask, lower=99, upper=1)


# ------------------------------------------------------------------------------- all methods


@pytest.mark.parametrize("method", METHODS)
def test_every_method_zeroes_outside_the_mask_and_returns_float32(method):
    image, mask, _ = _t1(seed=11)
    out = normalize(image, mask, method)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert (out[~mask] == 0).all()
    assert np.isfinite(out).all()
    assert np.abs(out[mask]).max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_refuses_an_empty_mask(method):
    image, _, _ = _t1()
    with pytest.raises(ValueError, match="empty brain mask"):
        normalize(image, np.zeros(SHAPE, bool), method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [0.0, -3.5, 1e6])
def test_every_method_gives_zeros_for_a_constant_brain(method, value):
    image = np.full(SHAPE, value)
    mask = np.zeros(SHAPE, bool)
    mask[5:-5, 5:-5, 5:-5] = True
    out = normalize(image, mask, method)
    assert np.isfinite(out).all()
    assert (out == 0).all()


# -------------------------------------------------------------------------------- dispatch


def test_normalize_dispatches_to_each_method():
    image, mask, _ = _t2(seed=12)
    np.testing.assert_array_equal(normalize(image, mask), robust_zscore(image, mask))
    np.testing.assert_array_equal(normalize(image, mask, "robust-zscore"),
                                  robust_zscore(image, mask))
    np.testing.assert_array_equal(normalize(image, mask, "percentile"),
                                  percentile_scale(image, mask))
    np.testing.assert_array_equal(normalize(image, mask, "whitestripe"),
                                  whitestripe(image, mask, "T1w"))
    as_t2 = normalize(image, mask, "whitestripe", "T2w")
    np.testing.assert_array_equal(as_t2, whitestripe(image, mask, "T2w"))
    np.testing.assert_array_equal(normalize(image, mask, method="whitestripe", modality="T2w"),
                                  as_t2)
    assert not np.allclose(as_t2, normalize(image, mask, "whitestripe", "T1w"))


def test_normalize_rejects_an_unknown_method_naming_the_choices():
    image, mask, _ = _t1()
    with pytest.raises(ValueError, match="minmax") as err:
        normalize(image, mask, "minmax")
    for method in METHODS:
        assert method in str(err.value)
