"""The weights file: the same model gives the same bytes, in any process, and reads back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from bids_anomaly.models.weights import WEIGHTS_FILE, read_weights, write_weights

_WRITE = """
import sys, torch
from bids_anomaly.models.weights import write_weights
tensors = {"Weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "bias": torch.ones(3)}
write_weights(sys.argv[1], tensors, {"width": 8, "channels": ["T1w", "FLAIR"], "a": None})
"""


def test_same_model_same_bytes_in_fresh_processes(tmp_path):
    """safetensors orders its header's keys differently from one process to the next."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    written = []
    for index in range(4):
        folder = tmp_path / f"run{index}"
        folder.mkdir()
        subprocess.run([sys.executable, "-c", _WRITE, str(folder)], env=env, check=True)
        written.append((folder / WEIGHTS_FILE).read_bytes())
    assert all(data == written[0] for data in written)
    # the header is canonical: sorted keys, compact, padded to 8 bytes
    size = int.from_bytes(written[0][:8], "little")
    assert size % 8 == 0 and written[0][8:8 + size].startswith(b'{"Weight":{"data_offsets"')
    tensors, hyperparameters = read_weights(tmp_path / "run0")
    assert torch.equal(tensors["Weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert hyperparameters == {"width": 8, "channels": ["T1w", "FLAIR"], "a": None}


def test_weights_written_before_still_read(tmp_path):
    """A file written by safetensors itself (the models trained before) reads the same."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / WEIGHTS_FILE),
              metadata={"hyperparameters": '{"k": 1}'})
    tensors, hyperparameters = read_weights(tmp_path)
    assert torch.equal(tensors["w"], torch.zeros(2)) and hyperparameters == {"k": 1}
    write_weights(tmp_path, tensors, hyperparameters)
    again, same = read_weights(tmp_path)
    assert torch.equal(again["w"], torch.zeros(2)) and same == {"k": 1}
