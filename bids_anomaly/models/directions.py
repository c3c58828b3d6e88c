"""Directional scores: which sign of a per-channel deviation counts as anomalous.

MS lesions and white-matter hyperintensities are bright on FLAIR and T2w and dark on T1w; a
score that counts every improbable deviation in both directions on every channel drowns them in
normal variation (dark FLAIR partial volume at the ventricles, bright T1w fat). A direction per
channel, ``FLAIR:+ T2w:+ T1w:-``, keeps only the deviations that look like the lesions sought:

- ``+``: brighter than expected (``max(d, 0)``);
- ``-``: darker than expected (``max(-d, 0)``);
- ``+-`` (or ``both``): either (``|d|``).

Channels not named keep the family's default (usually ``+-``). The directions are stored with
the model (its hyperparameters, hence its card), so a model scores the same way wherever it is
used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bids_anomaly.config import option
from bids_anomaly.errors import UsageError


class DirectionError(UsageError, ValueError):
    """A direction that does not parse or names a channel the model lacks (exit 2)."""


SIGNS = {"+": "+", "-": "-", "+-": "+-", "-+": "+-", "both": "+-", "hyper": "+", "hypo": "-"}
"""Accepted spellings of a direction, and what each means (``+``, ``-`` or ``+-``)."""


def direction_option() -> list[str]:
    """The ``--direction`` option, for the options dataclass of every family that has it."""
    return option(
        help="per-channel direction of the deviations that count, e.g. FLAIR:+ T2w:+ T1w:- "
             "(+ brighter, - darker, +- either; unnamed channels: the model's default)",
        factory=list, flags=("--direction",), nargs="+", metavar="CHANNEL:SIGN")


@dataclass
class DirectionOptions:
    """Which sign of each channel's deviation is anomalous (see :mod:`.directions`)."""

    direction: list[str] = direction_option()


def parse_directions(values: list[str] | dict[str, str] | None) -> dict[str, str]:
    """``["FLAIR:+", "T1w:-"]`` (or a stored dict) as ``{"FLAIR": "+", "T1w": "-"}``.

    Raises
    ------
    DirectionError
        A value that is not ``CHANNEL:SIGN`` with a known sign, or a channel named twice.
    """
    if not values:
        return {}
    items = values.items() if isinstance(values, dict) else [
        value.rsplit(":", 1) if ":" in value else (value, "") for value in values]
    directions: dict[str, str] = {}
    for channel, sign in items:
        if not channel or sign not in SIGNS:
            raise DirectionError(f"direction {channel}:{sign}: write CHANNEL:SIGN with SIGN one of "
                             "+, - or +- (e.g. FLAIR:+ T1w:-)")
        if channel in directions:
            raise DirectionError(f"direction: channel {channel} is named twice")
        directions[channel] = SIGNS[sign]
    return directions


def check_channels(directions: dict[str, str], channels: list[str]) -> None:
    """Refuse directions for channels the model does not have.

    Raises
    ------
    DirectionError
        A named channel that is not one of ``channels``.
    """
    unknown = sorted(set(directions) - set(channels))
    if unknown:
        raise DirectionError(f"--direction names {', '.join(unknown)}, but the model's channels "
                         f"are {', '.join(channels)}")


def directed(deviation: torch.Tensor, channels: list[str] | None,
             directions: dict[str, str], default: str = "+-") -> torch.Tensor:
    """The non-negative part of each channel's signed deviation that counts.

    Parameters
    ----------
    deviation : torch.Tensor
        ``(C, ...)``: positive where the image is brighter than expected.
    channels : list of str, optional
        The channels' names, in order (None: every channel gets ``default``).
    directions : dict
        ``{channel: sign}`` from :func:`parse_directions`.
    default : str
        The sign of channels not named.

    Returns
    -------
    torch.Tensor
        Same shape, >= 0.
    """
    default = SIGNS[default]
    out = []
    for index in range(deviation.shape[0]):
        name = channels[index] if channels and index < len(channels) else None
        sign = directions.get(name, default) if name is not None else default
        value = deviation[index]
        out.append(value.clamp_min(0) if sign == "+" else (-value).clamp_min(0) if sign == "-"
                   else value.abs())
    return torch.stack(out)


def describe(channels: list[str] | None, directions: dict[str, str],
             default: str = "+-") -> str:
    """How the directions read in a score definition, e.g. ``FLAIR +, T1w -``."""
    default = SIGNS[default]
    if not directions:
        return {"+": "brighter only", "-": "darker only", "+-": "both signs"}[default]
    named = [f"{c} {directions.get(c, default)}" for c in (channels or sorted(directions))]
    return ", ".join(named)
