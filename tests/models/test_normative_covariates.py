"""The covariate- and site-aware normative model on generated cohorts with known effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from bids_anomaly.models import NormativeModel, load_model, save_model
from bids_anomaly.models.contract import needs_covariates
from bids_anomaly.models.data import valid_voxels
from bids_anomaly.models.normative.covariates import CovariateEncoder, CovariateError
from bids_anomaly.models.normative.location_scale import fit_location_scale, leverage, predict
from bids_anomaly.models.store import ModelCard
from bids_anomaly.postprocessing.thresholds import healthy_scores, threshold_at_fpr
from bids_anomaly.simulation.cohorts import generate_cohort, participants

EFFECTS = {"site_offset": {"A": (0.0, 0.0), "B": (0.3, -0.2)}, "site_scale": {"B": 1.5},
           "noise_sd": 0.15, "noise_sd_slope": 0.0015}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A two-site cohort aged 20-80 (training) and held-out controls of both sites."""
    root = tmp_path_factory.mktemp("cohort")
    train, truth = generate_cohort(root / "train", participants(80, seed=1, sites=("A", "B")),
                                   **EFFECTS)
    test_rows = participants(40, seed=2, sites=("A", "B"))
    lesioned = test_rows[0]["participant_id"]
    test, test_truth = generate_cohort(root / "test", test_rows, seed=5,
                                       lesions={lesioned: 1.5}, **EFFECTS)
    truth.lesions = test_truth.lesions
    model = NormativeModel(covariates=["age", "sex"], site_column="site")
    model.fit(train)
    return train, test, truth, model, lesioned


def _predicted(model, age, sex="F", site="A"):
    location, sd, _, _ = model.norms.predict({"age": str(age), "sex": sex, "site": site})
    return location, sd


def test_the_fit_recovers_age_slope_sex_and_site_effects(cohort):
    _, _, truth, model, _ = cohort
    old, young = _predicted(model, 70)[0], _predicted(model, 30)[0]
    slope = ((old - young) / 40).median(dim=1).values
    assert torch.allclose(slope, torch.tensor(truth.slope), atol=0.001)
    sex = (_predicted(model, 50, "M")[0] - _predicted(model, 50, "F")[0]).median(dim=1).values
    assert torch.allclose(sex, torch.tensor(truth.sex_offset), atol=0.01)
    site_b, sd_b = _predicted(model, 50, site="B")
    site_a, sd_a = _predicted(model, 50, site="A")
    offset = (site_b - site_a).median(dim=1).values
    # a random intercept: 40 controls per site keep 40/41 of the raw offset
    assert torch.allclose(offset, torch.tensor(truth.site_offset["B"]), atol=0.03)
    assert 1.3 < float((sd_b / sd_a).median()) < 1.6  # the site's scale (1.5)
    report = model.fit_report
    assert report["sites"] == {"A": 40, "B": 40} and "sex[M]" in report["design"]


def test_held_out_controls_have_standard_normal_z_across_ages_and_sites(cohort):
    _, test, _, model, lesioned = cohort
    by_group: dict[tuple, list[torch.Tensor]] = {}
    for subject in test.subjects:
        if subject.name == lesioned:
            continue
        image, mask = subject.load()
        z, table, _ = model.normative_outputs(image, mask, subject.covariates)
        age = float(subject.covariates["age"])
        key = ("old" if age > 50 else "young", subject.covariates["site"])
        by_group.setdefault(key, []).append(z[:, model.norms.support & mask].reshape(-1))
        assert set(table["region"]) == {"brain", "GM", "WM", "CSF"}
    assert len(by_group) == 4
    for key, values in by_group.items():
        z = torch.cat(values)
        assert abs(float(z.mean())) < 0.08, key
        assert 0.92 < float(z.std()) < 1.1, key


def test_a_lesion_is_found_and_old_controls_are_false_positives_without_covariates(cohort):
    train, test, truth, model, lesioned = cohort
    plain = NormativeModel()
    plain.fit(train)
    healthy = test.subset([i for i, s in enumerate(test.subjects) if s.name != lesioned])
    rates = {}
    for name, fitted in (("covariates", model), ("none", plain)):
        threshold = threshold_at_fpr(healthy_scores(fitted, healthy), 0.01)
        old = [s for s in healthy.subjects if float(s.covariates["age"]) > 65]
        flagged = total = 0
        for subject in old:
            image, mask = subject.load()
            scorer = fitted.given(subject.covariates) if needs_covariates(fitted) else fitted
            valid = valid_voxels(image, mask)
            flagged += int((scorer.score(image, mask)[valid] > threshold).sum())
            total += int(valid.sum())
        rates[name] = flagged / total
        if name == "covariates":
            subject = next(s for s in test.subjects if s.name == lesioned)
            image, mask = subject.load()
            score = model.given(subject.covariates).score(image, mask)
            lesion = torch.from_numpy(truth.lesions[lesioned])
            assert float((score[lesion] > threshold).float().mean()) > 0.8
    assert rates["covariates"] < 0.025
    assert rates["none"] > 2 * rates["covariates"]


def test_transfer_to_a_new_site_from_five_controls_is_calibrated(tmp_path):
    effects = {"site_offset": {"A": (0.0, 0.0), "C": (0.4, 0.3)}, "site_scale": {"C": 1.3},
               "noise_sd": 0.15, "noise_sd_slope": 0.0}
    train, _ = generate_cohort(tmp_path / "a", participants(40, seed=3, sites=("A",)),
                               **effects)
    model = NormativeModel(covariates=["age"], site_column="site")
    model.fit(train)
    new = participants(25, seed=4, sites=("C",), ages=(25.0, 75.0))
    data, _ = generate_cohort(tmp_path / "c", new, seed=9, **effects)
    controls, held_out = data.subset(list(range(5))), data.subset(list(range(5, 25)))
    with pytest.raises(CovariateError, match="--transfer"):
        model.given(held_out.subjects[0].covariates)
    assert model.transfer(controls) == ["C"]
    assert model.norms.site_counts == {"A": 40, "C": 5}
    z = []
    for subject in held_out.subjects:
        image, mask = subject.load()
        maps, _, _ = model.normative_outputs(image, mask, subject.covariates)
        z.append(maps[:, model.norms.support & mask].reshape(-1))
    z = torch.cat(z)
    # five controls: the site's offset is known to about sd/sqrt(5), which the z-scores absorb
    assert abs(float(z.mean())) < 0.35 and 0.85 < float(z.std()) < 1.35
    assert float((z.abs() > 3).float().mean()) < 0.02
    with pytest.raises(CovariateError, match="one it was trained on"):
        model.transfer(controls)


def test_save_load_keeps_the_norms_and_the_plain_model_keeps_its_card(cohort, tmp_path):
    train, test, _, model, _ = cohort
    card = ModelCard("norms", "normative", ["FLAIR", "T1w"], "MNI", 2, {},
                     model.hyperparameters, train.names, [], 3.0, 0.01, 1)
    save_model(model, card, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    subject = test.subjects[1]
    image, mask = subject.load()
    assert torch.equal(loaded.given(subject.covariates).score(image, mask),
                       model.given(subject.covariates).score(image, mask))
    assert loaded.norms.encoder == model.norms.encoder
    with pytest.raises(RuntimeError, match="given"):
        model.score(image, mask)
    assert NormativeModel().hyperparameters == {"min_fraction": 0.5, "min_spread": 0.1,
                                                "spread_sigma": 1.0}
    assert not needs_covariates(NormativeModel())


def test_ages_outside_the_training_range_are_refused_unless_extrapolating(cohort):
    _, _, _, model, _ = cohort
    with pytest.raises(CovariateError, match=r"age 95 is outside .*--extrapolate"):
        model.given({"participant_id": "sub-old", "age": "95", "sex": "F", "site": "A"})
    scorer = model.given({"age": "95", "sex": "F", "site": "A"}, extrapolate=True)
    assert torch.isfinite(scorer.location).all()


TABLE = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3", "sub-4"],
                      "age": ["20", "30.5", "41", "60"], "sex": ["F", "M", "M", "F"],
                      "site": ["x", "y", "x", "y"]})


@pytest.mark.parametrize("change, words", [
    ({"age": ["20", "n/a", "41", "60"]}, "'age': sub-2"),
    ({"age": ["20", "thirty", "41", "60"]}, "'age' mixes numbers and text"),
    ({"sex": ["F", "F", "F", "F"]}, "'sex' has one value"),
    ({"age": ["40", "40", "40", "40"]}, "'age' has the same value"),
])
def test_bad_covariate_values_are_refused_naming_the_column(change, words):
    with pytest.raises(CovariateError, match=words):
        CovariateEncoder.from_table(TABLE.assign(**change), ["age", "sex"], "site")


def test_the_encoder_builds_the_same_design_when_scoring():
    with pytest.raises(CovariateError, match="'weight' is not a column"):
        CovariateEncoder.from_table(TABLE, ["weight"])
    linear = CovariateEncoder.from_table(TABLE, ["age", "sex"], "site", df=1)
    assert linear.columns == ["intercept", "age", "sex[M]"] and linear.sites == ["x", "y"]
    spline = CovariateEncoder.from_table(TABLE, ["age"], df=4)
    assert spline.columns == ["intercept", *[f"age_bs{k}" for k in range(1, 5)]]
    again = CovariateEncoder.from_dict(spline.to_dict())
    assert np.allclose(again.design(TABLE), spline.design(TABLE))
    assert CovariateEncoder.from_table(TABLE, ["age"]).numeric["age"]["df"] == 1  # auto, n=4
    with pytest.raises(CovariateError, match="'sex' is 'X', a value the model was not"):
        linear.design(TABLE.assign(sex=["F", "X", "M", "F"]))
    with pytest.raises(CovariateError, match="site 'z'.*--transfer"):
        linear.site_index(TABLE.assign(site=["x", "z", "x", "y"]))
    assert list(linear.site_index(TABLE.assign(site=["x", "z", "x", "y"]), allow_new=True)) == [
        0, -1, 0, 1]


@pytest.mark.parametrize("n_subjects", [1, 2, 6])
def test_location_scale_engine_with_few_subjects_and_missing_values(n_subjects):
    generator = torch.Generator().manual_seed(0)
    values = 2.0 + 0.5 * torch.randn(n_subjects, 50, generator=generator)
    valid = torch.ones(n_subjects, 50, dtype=torch.bool)
    valid[0, :10] = False  # voxels a subject does not cover
    design = torch.ones(n_subjects, 1, dtype=torch.float64)
    fit = fit_location_scale(lambda: ((i, values[i], valid[i]) for i in range(n_subjects)),
                             design, torch.zeros(1), 50, min_variance=1e-4)
    assert torch.isfinite(fit.location).all() and torch.isfinite(fit.log_variance).all()
    assert fit.count[:10].tolist() == [n_subjects - 1] * 10
    location, sd = predict(fit.location, fit.log_variance, design[:1],
                           leverage(design, torch.zeros(1)))
    if n_subjects == 6:
        assert abs(float(location[0, 10:].mean()) - 2.0) < 0.3
        assert (sd > 0).all()
