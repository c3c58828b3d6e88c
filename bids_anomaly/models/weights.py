"""The weights file of a model folder: named tensors and hyperparameters, in safetensors.

Written by a family's ``save`` and read by its ``load``
(:class:`~bids_anomaly.models.contract.BaseModel`); nothing is unpickled. The folder around it is
described in :mod:`bids_anomaly.models.store`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_FILE = "weights.safetensors"


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and hyperparameters stored by :func:`write_weights` (no code is unpickled)."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as stream:
        tensors = {key: stream.get_tensor(key) for key in stream.keys()}
        metadata = stream.metadata() or {}
    return tensors, json.loads(metadata.get("hyperparameters", "{}"))


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], hyperparameters: dict) -> None:
    """Write tensors and hyperparameters to ``weights.safetensors``."""
    from safetensors.torch import save_file

    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()},
              str(Path(directory) / WEIGHTS_FILE),
              metadata={"hyperparameters": json.dumps(hyperparameters)})
