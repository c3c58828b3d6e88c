"""Heteroscedastic location-scale regression of many targets at once (voxels or regions).

For every target ``t`` (a voxel of a channel, or a region's mean of a channel) and subject ``i``
with design row ``d_i`` (intercept, covariates, site indicators)::

    y_it = d_i . beta_t + exp(d_i . gamma_t / 2) * e_it,     e_it ~ N(0, 1)

Location ``beta`` and log-variance ``gamma`` are fitted for all targets together in torch
(CPU or GPU), by iteratively reweighted least squares over a stream of subjects: memory holds
``targets x q x q`` sums, never the subjects' images, so it does not grow with their number.

- Location: weighted least squares with weights ``1 / sigma^2`` times Huber's weight of the
  standardised residual (tuning 1.345): a lesion in a control pulls the fit little.
- Scale: a gamma GLM with log link on the squared residuals (the Gaussian likelihood of the
  variance), started from the regression of ``log r^2`` (Harvey 1976), with squared
  standardised residuals winsorised at 3.5^2 and divided by their expectation under the
  Gaussian (so the scale stays consistent). Residuals are divided by ``sqrt(1 - h)`` (``h`` the
  leverage) so that few subjects do not shrink the variance.
- Random effects: design columns with a ridge ``penalty`` (in subjects: a site seen in ``n``
  controls keeps ``n / (n + penalty)`` of its raw offset) are the best linear unbiased
  predictions of random intercepts, on the location and on the log-scale (as the site effects of
  hierarchical normative models).
- Offsets: known per-subject location and log-variance (a trained model's population
  prediction) let the same code fit only a new site's effects (transfer).

The predictive standard deviation of a new subject adds the uncertainty of its predicted mean:
``sigma(d) * sqrt(1 + d' G d)`` with ``G`` the inverse of the design's cross-product (a
homoscedastic approximation, shared by all targets; see :func:`leverage`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

LOG_CHI2_MEAN = -1.2703628454614782
"""E[log chi^2_1] = digamma(1/2) + log 2: the bias of ``log r^2`` as an estimate of log
variance."""

HUBER = 1.345
"""Huber's tuning constant (95 % efficiency under the Gaussian)."""

WINSOR = 3.5
"""Standardised residuals beyond this count as this much in the scale fit."""


def _winsor_consistency(c: float = WINSOR) -> float:
    """E[min(Z^2, c^2)] for a standard Gaussian Z."""
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    tail = math.erfc(c / math.sqrt(2))  # P(|Z| > c)
    return (1 - tail) - 2 * c * phi + c * c * tail


KAPPA = _winsor_consistency()

Stream = Callable[[], Iterator[tuple[int, torch.Tensor, torch.Tensor]]]
"""A fresh pass over the subjects: ``(row in the design, values (T,), valid (T,) bool)``."""

Offset = Callable[[int], torch.Tensor]
"""A subject's known part of the location or log-variance, ``(T,)``, by design row."""


@dataclass
class LocationScaleFit:
    """Fitted coefficients of every target.

    Attributes
    ----------
    location : torch.Tensor
        ``(q, T)`` location coefficients.
    log_variance : torch.Tensor
        ``(q, T)`` log-variance coefficients.
    count : torch.Tensor
        ``(T,)`` subjects that had a valid value at each target.
    """

    location: torch.Tensor
    log_variance: torch.Tensor
    count: torch.Tensor


def leverage(design: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """``G = (D'D + diag(penalty))^-1``, ``(q, q)``: a new row ``d`` has leverage ``d' G d``."""
    design = design.double()
    gram = design.T @ design + torch.diag(penalty.double().to(design.device))
    return torch.linalg.pinv(gram)


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched ``gram^-1 rhs`` with a tiny relative ridge (targets seen by few subjects)."""
    q = gram.shape[-1]
    eye = torch.eye(q, dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    return torch.linalg.solve(gram + 1e-8 * scale[:, None, None] * eye, rhs[..., None])[..., 0]


def _penalised(gram: torch.Tensor, penalty: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gram + diag(penalty) * weight`` per target (``weight`` ``(T,)``: mean weight)."""
    return gram + torch.diag_embed(weight[:, None] * penalty[None, :])


def _expand(coefficients: torch.Tensor, cols: torch.Tensor, q: int) -> torch.Tensor:
    """``(T, len(cols))`` coefficients as ``(T, q)``, 0 in the other columns."""
    full = coefficients.new_zeros(coefficients.shape[0], q)
    full[:, cols] = coefficients
    return full


def fit_location_scale(stream: Stream, design: torch.Tensor, penalty: torch.Tensor,
                       n_targets: int, *, iterations: int = 3,
                       min_variance: torch.Tensor | float = 0.0,
                       location_offset: Offset | None = None,
                       scale_offset: Offset | None = None,
                       scale_columns: list[int] | None = None,
                       scale_penalty: torch.Tensor | None = None,
                       device: torch.device | str = "cpu") -> LocationScaleFit:
    """Fit location and log-variance of every target by IRLS over passes of ``stream``.

    Parameters
    ----------
    stream : Stream
        Called once per pass (``2 + iterations`` passes).
    design : torch.Tensor
        ``(n, q)`` design rows, the first column the intercept (or, for a transfer, the new
        site's indicator).
    penalty : torch.Tensor
        ``(q,)`` ridge per column, in subjects (0: fixed effect; > 0: random effect).
    n_targets : int
        ``T``, the length of each subject's values.
    iterations : int
        Joint reweighting passes after the two starting passes.
    min_variance : torch.Tensor or float
        Floor of the variance per target (``(T,)`` or a number).
    location_offset, scale_offset : Offset, optional
        Known parts of each subject's location and log-variance.
    scale_columns : list of int, optional
        The design columns of the log-variance (default: all; the intercept and the sites
        only for a homoscedastic model with site scales).
    scale_penalty : torch.Tensor, optional
        ``(q,)`` ridge of the log-variance's columns (default: ``penalty``).
    device : torch.device or str
        Where the sums live.

    Returns
    -------
    LocationScaleFit
        The log-variance coefficients of the columns not in ``scale_columns`` are 0.
    """
    design = design.double().to(device)
    penalty = penalty.double().to(device)
    q, n_t = design.shape[1], n_targets
    cols = torch.tensor(sorted(scale_columns) if scale_columns is not None else range(q),
                        dtype=torch.long, device=device)
    scale_design = design[:, cols]
    scale_penalty = (penalty if scale_penalty is None
                     else scale_penalty.double().to(device))
    floor = torch.as_tensor(min_variance, dtype=torch.float64, device=device).clamp_min(1e-30)
    log_floor = floor.log().expand(n_t)
    outer = design[:, :, None] * design[:, None, :]  # (n, q, q)

    def offsets(row: int) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        loc = location_offset(row).double().to(device) if location_offset else 0.0
        scale = scale_offset(row).double().to(device) if scale_offset else 0.0
        return loc, scale

    # pass 1: ordinary least squares of the location (each subject weighs 1)
    gram0 = torch.zeros(n_t, q, q, dtype=torch.float64, device=device)
    rhs = torch.zeros(n_t, q, dtype=torch.float64, device=device)
    count = torch.zeros(n_t, dtype=torch.float64, device=device)
    for row, values, valid in stream():
        w = valid.to(device).double()
        y = torch.nan_to_num(values.to(device).double()) - offsets(row)[0]
        gram0 += w[:, None, None] * outer[row]
        rhs += (w * y)[:, None] * design[row]
        count += w
    mean_weight = (count / count.clamp_min(1)).clamp_min(1e-12)
    gram0_pen = _penalised(gram0, penalty, mean_weight)
    location = _solve(gram0_pen, rhs)
    gram_inv = torch.linalg.pinv(gram0_pen)

    # pass 2: log-variance from log r^2 (leverage-corrected)
    rhs_scale = torch.zeros(n_t, len(cols), dtype=torch.float64, device=device)
    for row, values, valid in stream():
        valid = valid.to(device)
        w = valid.double()
        loc_off, scale_off = offsets(row)
        d = design[row]
        residual = torch.nan_to_num(values.to(device).double()) - loc_off - location @ d
        h = (torch.einsum("tij,j->ti", gram_inv, d) @ d) * w
        r2 = residual ** 2 / (1 - h).clamp_min(0.05)
        target = torch.log(r2 + floor) - LOG_CHI2_MEAN - scale_off
        rhs_scale += (w * target)[:, None] * scale_design[row]
    gram_scale = _penalised(gram0, scale_penalty, mean_weight)[:, cols][:, :, cols]
    log_variance = _expand(_solve(gram_scale, rhs_scale), cols, q)

    # joint reweighted passes
    ordinary = True
    for _ in range(iterations):
        gram_w = torch.zeros(n_t, q, q, dtype=torch.float64, device=device)
        rhs_w = torch.zeros(n_t, q, dtype=torch.float64, device=device)
        rhs_scale = torch.zeros(n_t, len(cols), dtype=torch.float64, device=device)
        weight_sum = torch.zeros(n_t, dtype=torch.float64, device=device)
        for row, values, valid in stream():
            valid = valid.to(device)
            m = valid.double()
            loc_off, scale_off = offsets(row)
            d = design[row]
            y = torch.nan_to_num(values.to(device).double()) - loc_off
            eta = torch.maximum(log_variance @ d + scale_off, log_floor)
            variance = eta.exp()
            residual = y - location @ d
            # leverage under the last fit's weights (1 for the ordinary least squares, else
            # 1 / sigma^2 without the Huber factor)
            h = (torch.einsum("tij,j->ti", gram_inv, d) @ d) * (m if ordinary else m / variance)
            u = residual / (variance * (1 - h).clamp_min(0.05)).sqrt()
            w = m * torch.clamp(HUBER / u.abs().clamp_min(1e-12), max=1.0) / variance
            gram_w += w[:, None, None] * outer[row]
            rhs_w += (w * y)[:, None] * d
            weight_sum += w
            working = (eta - scale_off) + torch.clamp(u ** 2, max=WINSOR ** 2) / KAPPA - 1
            rhs_scale += (m * working)[:, None] * scale_design[row]
        mean_w = (weight_sum / count.clamp_min(1)).clamp_min(1e-30)
        gram_w_pen = _penalised(gram_w, penalty, mean_w)
        location = _solve(gram_w_pen, rhs_w)
        log_variance = _expand(_solve(gram_scale, rhs_scale), cols, q)
        gram_inv = torch.linalg.pinv(gram_w_pen)
        ordinary = False

    return LocationScaleFit(location=location.T.contiguous(),
                            log_variance=log_variance.T.contiguous(), count=count)


def predict(fit_location: torch.Tensor, fit_log_variance: torch.Tensor, design: torch.Tensor,
            leverage_matrix: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted location and predictive standard deviation of new subjects.

    Parameters
    ----------
    fit_location, fit_log_variance : torch.Tensor
        ``(q, ...)`` coefficients (any trailing shape).
    design : torch.Tensor
        ``(n, q)`` design rows.
    leverage_matrix : torch.Tensor, optional
        :func:`leverage`'s ``G``; the standard deviation is widened by ``sqrt(1 + d' G d)``.

    Returns
    -------
    location, sd : torch.Tensor
        ``(n, ...)`` each.
    """
    design = design.to(fit_location.dtype)
    flat_loc = fit_location.reshape(fit_location.shape[0], -1)
    flat_scale = fit_log_variance.reshape(fit_log_variance.shape[0], -1).to(design.dtype)
    location = design @ flat_loc
    sd = (0.5 * (design @ flat_scale)).exp()
    if leverage_matrix is not None:
        g = leverage_matrix.to(design.dtype)
        sd = sd * (1 + ((design @ g) * design).sum(-1, keepdim=True)).sqrt()
    shape = (design.shape[0], *fit_location.shape[1:])
    return location.reshape(shape), sd.reshape(shape)
