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
    """Write tensors and hyperparameters to ``weights.safetensors``, the same bytes every time.

    safetensors writes the keys of its header in an order of its own, which changes from one
    process to the next (its metadata is a hash map): the header is rewritten in one canonical
    form (:func:`canonical_header`), so that the same model gives the same file, checksum and
    signature.
    """
    from safetensors.torch import save

    data = save({key: value.detach().cpu().contiguous() for key, value in tensors.items()},
                metadata={"hyperparameters": json.dumps(hyperparameters, sort_keys=True)})
    (Path(directory) / WEIGHTS_FILE).write_bytes(canonical_header(data))


def canonical_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted, compact and space-padded.

    The tensors' offsets count from the end of the header, so the data block is kept as it is.

    >>> import struct
    >>> header = b'{"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    >>> data = struct.pack("<Q", len(header)) + header + bytes(4)
    >>> canonical_header(data)[8:-4]  # padded to a multiple of 8 bytes
    b'{"b":{"data_offsets":[0,4],"dtype":"F32","shape":[1]}}  '
    """
    import struct

    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data block stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + data[8 + size:]
