"""Choice of the torch device from ``--device``."""

from __future__ import annotations

from bids_anomaly.errors import TemporaryFailure, UsageError


def resolve_device(requested: str = "auto"):
    """Return the torch device for ``auto``, ``cpu`` or ``cuda[:N]``.

    Raises
    ------
    TemporaryFailure
        CUDA was asked for and is not available (exit 75), so a job scheduler can retry it on a
        GPU node.
    """
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TemporaryFailure(
                "--device cuda was requested but CUDA is not available here (no GPU, no driver, "
                "or a CPU-only torch); run on a GPU node or use --device cpu"
            )
        return torch.device(requested)
    raise UsageError(f"--device {requested!r}: choose auto, cpu or cuda")
