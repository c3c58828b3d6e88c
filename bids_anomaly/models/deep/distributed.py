"""PyTorch distributed training as launched by ``torchrun``: nothing home-made.

``torchrun --nproc-per-node N --no-python bids_anomaly BIDS OUT train ...`` starts N copies of
the same command with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set (and ``--nnodes`` /
``--rdzv-endpoint`` for several nodes). Each copy joins one process group (NCCL on GPUs, Gloo on
CPUs), trains on its shard of every epoch through ``DistributedDataParallel`` and
``DistributedSampler``; rank 0 alone preprocesses, writes checkpoints and the model.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

PROCESS_GROUP_TIMEOUT = timedelta(hours=12)
"""How long ranks wait for each other (rank 0 may preprocess many subjects before training)."""


def world_size() -> int:
    """Number of processes ``torchrun`` started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether this process is one of several joined in a process group."""
    return dist.is_available() and dist.is_initialized()


def world_size_now() -> int:
    """Processes in the joined process group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Whether this process writes files (rank 0)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by ``torchrun``; return this rank's device.

    Parameters
    ----------
    device : torch.device
        The device ``--device`` resolved to; with CUDA, each rank takes ``cuda:LOCAL_RANK``.
    """
    if world_size() <= 1 or is_distributed():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    return device


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks (returns ``values`` when not distributed)."""
    if not is_distributed():
        return values
    device = values.device
    # NCCL reduces CUDA tensors only
    reduced = values.to("cuda") if dist.get_backend() == "nccl" else values.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(device)


def broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank (``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def teardown() -> None:
    """Leave the process group, once every rank is done communicating.

    Without the barrier a fast rank can close its connections while a slower one still waits
    on a collective (rank 0's checkpoint broadcast on resume), and the slower rank's Gloo
    thread aborts the process at exit ("terminate called without an active exception"; seen
    once in about 15 runs of the two-rank test, inside a full test run).
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
