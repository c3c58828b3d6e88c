"""Ensembles of calibrated models: -log10 p scale, combination, storage, the train level."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bids_anomaly.cli.run import main
from bids_anomaly.errors import BadDataError, UsageError
from bids_anomaly.models import (
    EnsembleModel,
    IntensityBaseline,
    NormativeModel,
    TrainingData,
    load_model,
    save_model,
)
from bids_anomaly.models.ensemble import log10_exceedance
from bids_anomaly.postprocessing.thresholds import healthy_scores, tail_table
from tests.conftest import saved_normative_model, tree_digest
from tests.models.test_selfsupervised import LESION, SHAPE, _subject


def test_log10_exceedance_matches_the_empirical_tail_and_extrapolates_in_order():
    healthy = np.random.default_rng(0).normal(size=100_000)
    tail = tail_table(healthy)
    scores = torch.tensor([-5.0, 0.0, 2.326, 3.09, 5.0, 6.0, 8.0])
    values = log10_exceedance(scores, tail)
    assert values[0] == 0 and values[1] == pytest.approx(np.log10(2), abs=0.02)
    assert values[2] == pytest.approx(2.0, abs=0.1) and values[3] == pytest.approx(3.0, abs=0.15)
    assert (values[4:].diff() > 0).all()  # beyond every healthy voxel: still ordered
    assert values[4] > 5.0


def _fitted(tmp_path):
    single = tmp_path / "single"  # FLAIR-only subjects (the same file names)
    single.mkdir()
    fit = TrainingData([_subject(tmp_path, i) for i in range(5)], ["T1w", "FLAIR"])
    held_out = TrainingData([_subject(tmp_path, i) for i in range(5, 7)], ["T1w", "FLAIR"])
    flair = TrainingData([_subject(single, i, channels=("FLAIR",)) for i in range(5)],
                         ["FLAIR"])
    flair_held_out = TrainingData([_subject(single, i, channels=("FLAIR",))
                                   for i in range(5, 7)], ["FLAIR"])
    both, bright = NormativeModel(), NormativeModel(direction=["FLAIR:+"])
    both.fit(fit)
    bright.fit(flair)
    ensemble = EnsembleModel(combine="mean")
    ensemble.add("both", both, ["T1w", "FLAIR"], tail_table(healthy_scores(both, held_out)))
    ensemble.add("bright", bright, ["FLAIR"],
                 tail_table(healthy_scores(bright, flair_held_out)))
    ensemble.fit(fit)
    return ensemble, held_out


def test_ensemble_combines_members_on_their_channels_and_round_trips(tmp_path):
    ensemble, _ = _fitted(tmp_path)
    image, mask = _subject(tmp_path, 10, lesion=True).load()
    maps = ensemble.member_maps(image, mask)
    assert maps.shape == (2, *SHAPE) and (maps >= 0).all()
    score = ensemble.score(image, mask)
    torch.testing.assert_close(score, maps.mean(0))
    inside = torch.zeros(SHAPE, dtype=torch.bool)
    inside[LESION] = True
    assert score[inside].mean() > 4 and score[mask & ~inside].mean() < 1
    assert (score[~mask] == 0).all()
    (tmp_path / "e").mkdir()
    ensemble.save(tmp_path / "e")
    loaded = EnsembleModel.load(tmp_path / "e")
    torch.testing.assert_close(loaded.score(image, mask), score)
    assert [m["name"] for m in loaded.members] == ["both", "bright"]
    ensemble.combine = "max"
    torch.testing.assert_close(ensemble.score(image, mask), maps.amax(0))
    # a member without a grid of its own (the intensity baseline) joins any ensemble
    baseline = IntensityBaseline(channel=0, direction="hyper")
    ensemble.add("baseline", baseline, ["FLAIR"], tail_table(np.linspace(0, 3, 1000)))
    ensemble.fit(TrainingData([_subject(tmp_path, 0)], ["T1w", "FLAIR"]))
    assert ensemble.member_maps(image, mask).shape == (3, *SHAPE)


def test_ensemble_refuses_what_it_cannot_combine(tmp_path):
    ensemble, _ = _fitted(tmp_path)
    with pytest.raises(BadDataError, match="T1w"):  # a member trained on other channels
        ensemble.fit(TrainingData([_subject(tmp_path / "single", 0, channels=("FLAIR",))],
                                  ["FLAIR"]))
    with pytest.raises(BadDataError, match="calibration tail"):
        EnsembleModel().add("x", NormativeModel(), ["T1w"], {})
    with pytest.raises(UsageError, match="two"):
        EnsembleModel.check_options({"members": ["a", "a"]})
    with pytest.raises(UsageError, match="two"):
        EnsembleModel().fit(TrainingData([], ["T1w"]))
    (tmp_path / "e").mkdir()
    ensemble.save(tmp_path / "e")
    from bids_anomaly.models.weights import read_weights, write_weights

    tensors, hyperparameters = read_weights(tmp_path / "e")
    write_weights(tmp_path / "e", {**tensors, "member7.location": torch.zeros(1)},
                  hyperparameters)
    with pytest.raises(BadDataError, match="no member"):
        EnsembleModel.load(tmp_path / "e")


@pytest.mark.slow
def test_train_levels_build_self_supervised_models_and_an_ensemble(preprocessed_cohort,
                                                                    capsys):
    tiny_bids, out = preprocessed_cohort.bids, preprocessed_cohort.out
    before = tree_digest(tiny_bids)
    common = list(preprocessed_cohort.options)
    assert main([str(tiny_bids), str(out), "train", "--model-type", "segment", "--epochs", "1",
                 "--width", "4", "--direction", "T1w:-", *common]) == 0
    card = json.loads((out / "models" / "model-segment" / "model.json").read_text())
    assert card["hyperparameters"]["direction"] == {"T1w": "-"}
    assert "segment" in card["score_definition"]
    assert main([str(tiny_bids), str(out), "train", "--model-type", "normative",
                 *common]) == 0
    assert main([str(tiny_bids), str(out), "train", "--model-type", "ensemble", "--members",
                 "normative", "segment", "--combine", "max", *common]) == 0
    card = json.loads((out / "models" / "model-ensemble" / "model.json").read_text())
    assert len(card["calibration_participants"]) == 3  # nothing held out: nothing is fitted
    assert [m["name"] for m in card["hyperparameters"]["members"]] == ["normative", "segment"]
    assert main([str(tiny_bids), str(out), "participant", "--model", "ensemble",
                 *common]) == 0
    assert len(list(out.glob("sub-*/anat/*_res-2_desc-ensemble_stat-anomaly_statmap.nii.gz"))) == 3
    capsys.readouterr()
    assert main([str(tiny_bids), str(out), "train", "--model-type", "ensemble", "--members",
                 "normative", *common]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main([str(tiny_bids), str(out), "train", "--model-type", "restore", "--direction",
                 "FLAIR", *common]) == 2
    assert "CHANNEL:SIGN" in capsys.readouterr().err
    # members that need no training, named by family: built on the selected subjects
    assert main([str(tiny_bids), str(out), "train", "--model-type", "ensemble", "--members",
                 "tissue", "intensity", "normative", "--model-name", "label-free",
                 *common]) == 0
    card = json.loads((out / "models" / "model-label-free" / "model.json").read_text())
    members = card["hyperparameters"]["members"]
    assert [(m["name"], m["model_type"]) for m in members] == [
        ("tissue", "tissue"), ("intensity", "intensity"), ("normative", "normative")]
    assert members[1]["hyperparameters"] == {"channel": 0, "direction": "hypo"}  # T1w dark
    assert main([str(tiny_bids), str(out), "participant", "--model", "label-free",
                 "--participant-label", "01", *common]) == 0
    assert list(out.glob("sub-01/anat/*_desc-labelfree_stat-anomaly_statmap.nii.gz"))
    capsys.readouterr()
    assert main([str(tiny_bids), str(out), "train", "--model-type", "ensemble", "--members",
                 "nosuch", "tissue", *common]) == 66
    err = capsys.readouterr().err.strip()
    assert "nosuch" in err and "needs no training" in err and len(err.splitlines()) == 1
    flair = saved_normative_model(out / "models" / "model-flair", ["FLAIR"])
    model, card = load_model(flair)  # given a calibration, as every trained model has
    card.extra["calibration_tail"] = tail_table(np.linspace(0, 3, 1000))
    save_model(model, card, flair)
    assert main([str(tiny_bids), str(out), "train", "--model-type", "ensemble", "--members",
                 "flair", "tissue", *common]) == 65
    err = capsys.readouterr().err.strip()
    assert "FLAIR" in err and len(err.splitlines()) == 1
    assert tree_digest(tiny_bids) == before


def test_members_that_need_no_training_are_built_on_the_data(tmp_path, one_torch_thread):
    from tests.models.test_tissue import _prepared, _subject

    reference = _prepared(("T1w", "FLAIR"), tmp_path)  # the slab's template maps on disk
    image, mask, lesion = _subject(("T1w", "FLAIR"), load=0.02, seed=8)
    folder = tmp_path / "subjects"
    folder.mkdir()
    subjects = []
    import nibabel as nib

    from bids_anomaly.models import SubjectImages
    from tests.models.test_tissue import _template_slab

    affine = _template_slab()[1]
    for index in range(2):
        paths = []
        for name, values in zip(("T1w", "FLAIR"), image.numpy(), strict=True):
            paths.append(folder / f"{index}_{name}.nii.gz")
            nib.Nifti1Image(values, affine).to_filename(paths[-1])
        nib.Nifti1Image(mask.numpy().astype(np.uint8), affine).to_filename(
            folder / f"{index}_mask.nii.gz")
        subjects.append(SubjectImages(f"sub-{index}", paths, folder / f"{index}_mask.nii.gz"))
    tissues = [tmp_path / f"{name}.nii.gz" for name in ("GM", "WM", "CSF")]
    data = TrainingData(subjects, ["T1w", "FLAIR"], tissues=tissues)
    ensemble = EnsembleModel()
    ensemble.add_untrained("tissue", random_seed=0)
    ensemble.add_untrained("intensity")
    assert ensemble.hyperparameters["members"][0] == {
        "name": "tissue", "model_type": "tissue", "untrained": True, "random_seed": 0}
    ensemble.fit(data)
    assert [m["model_type"] for m in ensemble.members] == ["tissue", "intensity"]
    assert ensemble.models[1].channel == 1 and ensemble.models[1].direction == "hyper"
    # the tissue member keeps its own calibration: -log10 p maps onto itself
    tail = ensemble.members[0]["tail"]
    assert np.interp(3.0, tail["score"][::-1], -np.log10(tail["p"][::-1])) == pytest.approx(
        3.0, abs=0.1)
    maps = ensemble.member_maps(image, mask)
    torch.testing.assert_close(maps[0], reference.score(image, mask), atol=0.05, rtol=0.01)
    score = ensemble.score(image, mask).numpy()
    inside = mask.numpy()
    assert score[lesion].mean() > 3 * score[inside & ~lesion].mean()
    (tmp_path / "e").mkdir()
    ensemble.save(tmp_path / "e")
    torch.testing.assert_close(EnsembleModel.load(tmp_path / "e").score(image, mask),
                               ensemble.score(image, mask))
