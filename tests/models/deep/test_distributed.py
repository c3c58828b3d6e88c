"""DDP through torchrun: two CPU ranks (Gloo) train one model and agree on its weights.

An autoencoder (the engine) and a diffusion model (a family with random draws of its own),
trained in turn by the same two ranks.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models.test_deep import _subject

ROOT = Path(__file__).resolve().parents[3]
MODEL_TYPES = ("ae", "ddpm")


@pytest.mark.slow
def test_torchrun_two_ranks_train_the_same_models(tmp_path):
    subjects = [_subject(tmp_path, i) for i in range(4)]
    listing = tmp_path / "subjects.json"
    listing.write_text(json.dumps([{"name": s.name, "channels": [str(p) for p in s.channels],
                                    "mask": str(s.mask)} for s in subjects]))
    out = tmp_path / "out"
    for model_type in MODEL_TYPES:
        (out / model_type).mkdir(parents=True)
    command = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "tests.models.deep.ddp_worker", str(listing), str(out), *MODEL_TYPES])
    environment = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = {}
    for model_type in MODEL_TYPES:
        folder = out / model_type
        reports = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["world_size"] for r in reports] == [2, 2]
        histories = [[(row["train_loss"], row["validation_loss"])
                      for row in r["report"]["history"]] for r in reports]
        assert histories[0] == histories[1], model_type  # losses are reduced over the ranks
        weights[model_type] = [torch.load(folder / f"rank{r}.pt", weights_only=True)
                               for r in range(2)]
        for key, value in weights[model_type][0].items():
            assert torch.equal(value, weights[model_type][1][key]), (model_type, key)
        saved = torch.load(folder / "checkpoints" / "checkpoint.pt", weights_only=True)
        assert saved["epoch"] == 2
        losses = [row["train_loss"] for row in reports[0]["report"]["history"]]
        assert losses[1] < losses[0], model_type

    # run again: rank 0 reads the finished checkpoints and hands them to rank 1; nothing retrains
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    for model_type in MODEL_TYPES:
        for r in range(2):
            folder = out / model_type
            report = json.loads((folder / f"rank{r}.json").read_text())["report"]
            assert report["resumed_from_epoch"] == 2, model_type
            again = torch.load(folder / f"rank{r}.pt", weights_only=True)
            assert all(torch.equal(value, again[key])
                       for key, value in weights[model_type][0].items()), model_type
