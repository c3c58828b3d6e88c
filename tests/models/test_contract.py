"""The model contract: a new family, defined here and nowhere else, works through every level."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from bids_anomaly.cli.run import main
from bids_anomaly.config import option
from bids_anomaly.models import REGISTRY, AnomalyModel, BaseModel, ChannelScorer, register
from bids_anomaly.models.base import TrainingData, valid_voxels
from tests.conftest import tree_digest


@dataclass
class ToyOptions:
    """Options of the toy family."""

    shift: float = option(0.0, "added to the healthy mean before scoring (default {default})",
                          flags=("--toy-shift",), type=float)


class ToyModel(BaseModel):
    """Distance to the healthy mean intensity of each channel, per channel."""

    model_type = "toy"
    summary = "distance to the healthy mean (a test family)"
    options = (ToyOptions,)
    options_scope = "the toy model"
    score_definition = "largest |x - mean - shift| over channels"

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = shift
        self.mean: torch.Tensor | None = None

    @classmethod
    def from_settings(cls, settings, single_subject: bool = False) -> ToyModel:
        return cls(**{**{"shift": ToyOptions.shift}, **settings.model.options})

    @property
    def hyperparameters(self) -> dict:
        return {"shift": self.shift}

    @property
    def n_channels(self) -> int | None:
        return None if self.mean is None else len(self.mean)

    def fit(self, data: TrainingData) -> None:
        sums, count = 0.0, 0
        for image, mask in data:
            valid = valid_voxels(image, mask)
            sums = sums + image[:, valid].sum(dim=1)
            count += int(valid.sum())
        self.mean = sums / max(count, 1)
        self.fit_report = {"voxels": count}

    def channel_scores(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        distance = (image - self.mean[:, None, None, None] - self.shift).abs()
        return torch.where(valid_voxels(image, mask), distance, 0.0)

    def combine(self, channel_scores: torch.Tensor) -> torch.Tensor:
        return channel_scores.amax(dim=0)

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.combine(self.channel_scores(image, mask))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean = tensors["mean"]


@pytest.fixture
def toy_family():
    register(ToyModel)
    yield ToyModel
    del REGISTRY["toy"]


def test_the_toy_family_keeps_the_contract(toy_family):
    model = ToyModel()
    assert isinstance(model, AnomalyModel) and isinstance(model, ChannelScorer)
    with pytest.raises(ValueError, match="registered already"):
        register(type("Other", (BaseModel,), {"model_type": "toy"}))


@pytest.mark.slow
def test_a_new_family_works_through_train_participant_and_group(toy_family,
                                                               preprocessed_cohort, capsys):
    tiny_bids, out = preprocessed_cohort.bids, preprocessed_cohort.out
    before = tree_digest(tiny_bids)
    common = list(preprocessed_cohort.options)  # one process: the family lives in this one
    assert main([str(tiny_bids), str(out), "train", "--model-type", "toy", "--toy-shift",
                 "0.25", *common]) == 0
    card = json.loads((out / "models" / "model-toy" / "model.json").read_text())
    assert card["model_type"] == "toy" and card["hyperparameters"] == {"shift": 0.25}
    assert card["extra"]["fit"]["voxels"] > 0
    assert main([str(tiny_bids), str(out), "participant", "--model", "toy", *common]) == 0
    maps = sorted(out.glob("sub-*/anat/*_res-2_desc-toy_stat-anomaly_statmap.nii.gz"))
    assert len(maps) == 3
    # a ChannelScorer's maps are written per channel
    assert len(list(out.glob("sub-*/anat/*_desc-toyT1w_stat-residual_statmap.nii.gz"))) == 3
    assert main([str(tiny_bids), str(out), "group", *common]) == 0
    subjects = pd.read_csv(out / "group" / "desc-toy_subjects.tsv", sep="\t")
    assert len(subjects) == 3 and set(subjects["model_role"]) == {"training", "calibration"}
    # the family's option is refused with another model type
    capsys.readouterr()
    assert main([str(tiny_bids), str(out), "train", "--model-type", "normative",
                 "--toy-shift", "1"]) == 2
    assert "--toy-shift apply to the toy model (train --model-type toy)" in (
        capsys.readouterr().err)
    assert tree_digest(tiny_bids) == before
