"""Healthy score distributions: their stored upper tail and scores as ``-log10 p``.

A model's calibration keeps the upper tail of its scores on healthy voxels (held-out controls,
or a healthy version of the subject drawn from a model fitted on it); :func:`log10_exceedance`
turns a score into ``-log10`` of its exceedance probability under that tail.
"""

from __future__ import annotations

import numpy as np
import torch

TAIL_POINTS = 200
"""Points of the stored upper tail of the healthy score distribution."""


def tail_table(values: np.ndarray, points: int = TAIL_POINTS) -> dict[str, list[float]]:
    """The upper tail of a healthy score distribution, for p-values.

    Returns
    -------
    dict
        ``p`` (exceedance probabilities from ``1 / n`` to 1, log-spaced) and ``score`` (the
        matching quantiles), both lists (JSON-ready).
    """
    values = np.asarray(values, dtype=np.float64)
    p = np.geomspace(1.0 / values.size, 1.0, points)
    return {"p": p.tolist(), "score": np.quantile(values, 1.0 - p).tolist(),
            "n": int(values.size)}


def log10_exceedance(scores: torch.Tensor, tail: dict) -> torch.Tensor:
    """``-log10 p`` of scores against a healthy tail (exponentially extrapolated beyond it).

    Parameters
    ----------
    scores : torch.Tensor
        Any shape.
    tail : dict
        ``p``, ``score`` and ``n`` as stored in a card's ``calibration_tail``.

    Returns
    -------
    torch.Tensor
        ``-log10 p`` >= 0, same shape, float32.

    Examples
    --------
    >>> tail = {"p": [0.001, 0.01, 0.1, 1.0], "score": [3.0, 2.0, 1.0, 0.0], "n": 1000}
    >>> log10_exceedance(torch.tensor([-1.0, 0.5, 2.0, 4.0]), tail).tolist()
    [0.0, 0.5, 2.0, 4.0]
    """
    levels = np.asarray(tail["score"], dtype=np.float64)[::-1]
    minus_log_p = -np.log10(np.asarray(tail["p"], dtype=np.float64))[::-1]
    levels, unique = np.unique(levels, return_index=True)
    minus_log_p = minus_log_p[unique]
    values = scores.detach().double().cpu().numpy()
    out = np.interp(values, levels, minus_log_p, left=0.0, right=minus_log_p[-1])
    top = levels[-1]
    decade = minus_log_p >= minus_log_p[-1] - 1.0  # the top decade of the stored tail
    span = levels[-1] - levels[decade][0]
    slope = (minus_log_p[-1] - minus_log_p[decade][0]) / span if span > 0 else 1.0
    beyond = values > top
    out[beyond] = minus_log_p[-1] + slope * (values[beyond] - top)
    return torch.from_numpy(np.maximum(out, 0.0)).float().to(scores.device)
