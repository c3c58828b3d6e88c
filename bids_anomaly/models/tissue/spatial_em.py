"""EM for one subject's tissues: Gaussian mixtures whose class weights vary over the brain.

The model behind the ``tissue`` family (:mod:`bids_anomaly.models.tissue.tissue`), after Van Leemput
et al. (IEEE TMI 18:897, 1999; 20:677, 2001) and SAMSEG's lesion mode (Cerri et al.,
NeuroImage 225, 2021):

- each tissue class (GM, WM, CSF) is a few Gaussian components of the channels' intensities;
  the prior of class ``k`` at voxel ``v`` is the template's tissue probability ``P_k(v)``
  (flattened by a floor, since a registration is never perfect), the weights of a class's
  components are global;
- lesions are one extra class, a broad Gaussian tied to white matter (its mean the WM mean, its
  covariance ``lesion_spread`` times the WM covariance), allowed only on the lesion side of
  every channel that has a direction (brighter than the GM mean where lesions are bright,
  darker than the WM mean where they are dark); its prior is ``omega * L(v)`` with ``L`` a
  location prior (where lesions occur) and ``omega`` fitted;
- robust estimation: each voxel's weight in the M-step is its responsibility times its
  typicality ``f / (f + lambda)``, ``lambda`` the component's density at Mahalanobis distance
  ``kappa`` (Van Leemput 2001): voxels improbable under every tissue (lesions, artefacts) do
  not bend the tissue parameters.

The M-step is :func:`bids_anomaly.models.mixture.em.m_step` on sufficient statistics; component
densities come from :meth:`bids_anomaly.models.em.Mixture.component_log_joint`. Pure torch,
CPU or GPU; the fit runs on a random subsample of the brain (the parameters of a few Gaussians
need no more), the posteriors on every voxel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bids_anomaly.models.mixture import em

DTYPE = torch.float64
WHITE_MATTER, GREY_MATTER = 1, 0
"""Class indices of the reference classes (the order of ``TISSUES`` in the family)."""
FLOOR_SCORE = -60.0
"""Log-odds given to voxels where the lesion class is not allowed (wrong side of a channel)."""


@dataclass
class TissueMixture:
    """A fitted tissue model of one subject.

    Attributes
    ----------
    components : em.Mixture
        Gaussian components; ``weights`` are the weights within each class (summing to 1 per
        class).
    classes : torch.Tensor
        ``(J,)`` class index of each component.
    n_classes : int
        Number of tissue classes.
    omega : float
        Scale of the lesion class's prior (``omega * L(v)``).
    sides : list of int
        Per channel: +1 lesions are brighter than GM, -1 darker than WM, 0 unconstrained.
    lesion_spread : float
        Lesion covariance as a multiple of the WM covariance.
    prior_floor : float
        Share of the class priors spread uniformly over the classes.
    report : dict
        Iterations and the log-likelihood trace of the fit.
    """

    components: em.Mixture
    classes: torch.Tensor
    n_classes: int
    omega: float
    sides: list[int]
    lesion_spread: float
    prior_floor: float
    report: dict = field(default_factory=dict)

    def class_mean(self, index: int) -> torch.Tensor:
        """Weighted mean of one class's components, ``(C,)``."""
        chosen = self.classes == index
        weights = self.components.weights[chosen]
        return (weights[:, None] * self.components.means[chosen]).sum(0) / weights.sum()

    def class_covariance(self, index: int) -> torch.Tensor:
        """Covariance of one class's components (moment-matched), ``(C, C)``."""
        chosen = self.classes == index
        weights = self.components.weights[chosen] / self.components.weights[chosen].sum()
        means = self.components.means[chosen]
        mean = (weights[:, None] * means).sum(0)
        spread = self.components.scatter[chosen] + (
            (means - mean)[:, :, None] * (means - mean)[:, None, :])
        return (weights[:, None, None] * spread).sum(0)


def flattened_priors(priors: torch.Tensor, floor: float) -> torch.Tensor:
    """``(1 - floor) P + floor / K``: every class keeps some prior everywhere."""
    return (1.0 - floor) * priors + floor / priors.shape[1]


def initial_mixture(x: torch.Tensor, priors: torch.Tensor, per_class: list[int],
                    sides: list[int], lesion_spread: float, prior_floor: float
                    ) -> TissueMixture:
    """Components started from the voxels each prior is sure of (median, MAD).

    A class's components are spread along its channels by 0.8 robust standard deviations.
    """
    means, scatter, weights, classes = [], [], [], []
    for index, count in enumerate(per_class):
        sure = priors[:, index] > 0.8
        if int(sure.sum()) < 50:  # a class the template barely has on this grid
            sure = priors[:, index] >= torch.quantile(priors[:, index].float(), 0.9)
        values = x[sure].to(DTYPE)
        median = values.median(dim=0).values
        spread = 1.4826 * (values - median).abs().median(dim=0).values
        spread = spread.clamp_min(1e-3 * float(x.abs().max().clamp_min(1.0)))
        for j in range(count):
            offset = (j - (count - 1) / 2) * 0.8
            means.append(median + offset * spread)
            scatter.append(torch.diag(spread ** 2))
            weights.append(1.0 / count)
            classes.append(index)
    device = x.device
    components = em.Mixture("gaussian", torch.tensor(weights, dtype=DTYPE, device=device),
                            torch.stack(means).to(device), torch.stack(scatter).to(device))
    return TissueMixture(components, torch.tensor(classes, device=device), len(per_class),
                         0.01, list(sides), lesion_spread, prior_floor)


def lesion_log_density(mixture: TissueMixture, x: torch.Tensor) -> torch.Tensor:
    """Log-density of the lesion class (``-inf`` on the wrong side of a directed channel)."""
    white = mixture.class_mean(WHITE_MATTER)
    grey = mixture.class_mean(GREY_MATTER)
    covariance = mixture.lesion_spread * mixture.class_covariance(WHITE_MATTER)
    lesion = em.Mixture("gaussian", torch.ones(1, dtype=DTYPE, device=x.device), white[None],
                        covariance[None])
    log_density = lesion.component_log_joint(x)[0][:, 0]
    allowed = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for channel, side in enumerate(mixture.sides):
        if side > 0:
            allowed &= x[:, channel] > grey[channel].to(x.dtype)
        elif side < 0:
            allowed &= x[:, channel] < white[channel].to(x.dtype)
    return torch.where(allowed, log_density, torch.full_like(log_density, -math.inf))


def log_class_priors(mixture: TissueMixture, priors: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(N, K)`` log of the flattened template class priors."""
    return torch.log(flattened_priors(priors, mixture.prior_floor)).to(dtype)


def joint_log_probabilities(mixture: TissueMixture, x: torch.Tensor, class_prior: torch.Tensor,
                            location: torch.Tensor | None,
                            class_bias: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log prior-times-density of every component, and of the lesion class.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C)`` intensities (float32 or float64).
    class_prior : torch.Tensor
        ``(N, K)`` log class priors (:func:`log_class_priors`).
    location : torch.Tensor or None
        ``(N,)`` lesion location prior; None: no lesion class.
    class_bias : torch.Tensor, optional
        ``(N, K)`` log-prior terms added per class (the MRF's neighbourhood evidence).

    Returns
    -------
    tissue : torch.Tensor
        ``(N, J)`` log joint of each component.
    lesion : torch.Tensor or None
        ``(N,)`` log joint of the lesion class.
    log_density : torch.Tensor
        ``(N, J)`` log-density of each component alone (for the typicality weights).
    """
    dtype = x.dtype
    log_within, _ = mixture.components.component_log_joint(x)
    log_weights = torch.log(mixture.components.weights.clamp_min(1e-300)).to(dtype)
    log_density = log_within - log_weights
    if class_bias is not None:
        class_prior = torch.log_softmax(class_prior + class_bias.to(dtype), dim=1)
    tissue = log_within + class_prior[:, mixture.classes]
    if location is None:
        return tissue, None, log_density
    lesion_prior = (mixture.omega * location).to(dtype)
    tissue = tissue + torch.log1p(-lesion_prior)[:, None]
    lesion = lesion_log_density(mixture, x) + torch.log(lesion_prior)
    return tissue, lesion, log_density


def fit_tissue_mixture(x: torch.Tensor, priors: torch.Tensor, location: torch.Tensor | None,
                       per_class: list[int], sides: list[int], *, outlier_distance: float = 3.0,
                       lesion_spread: float = 50.0, prior_floor: float = 0.1,
                       max_iter: int = 30, tol: float = 1e-2) -> TissueMixture:
    """Fit the tissue model to voxels ``x`` ``(N, C)`` with class priors ``(N, K)``.

    Parameters
    ----------
    location : torch.Tensor or None
        Lesion location prior ``(N,)`` in (0, 1]; None fits the tissues without a lesion class.
    per_class : list of int
        Gaussian components per class.
    sides : list of int
        Per channel, the lesion side (+1 brighter than GM, -1 darker than WM, 0 either).
    outlier_distance : float
        Van Leemput's ``kappa``; 0 turns the typicality weights off.
    lesion_spread : float
        Lesion covariance as a multiple of the WM covariance.
    prior_floor : float
        Share of the class priors spread uniformly over the classes.
    max_iter, tol : int, float
        Most EM iterations; stop when no component mean moves by more than ``tol`` of its
        standard deviation. (The robust weights make the fit an M-estimation, not an ascent
        of the likelihood: the likelihood is reported, not used to stop.)

    Returns
    -------
    TissueMixture
    """
    mixture = initial_mixture(x, priors, per_class, sides, lesion_spread, prior_floor)
    work = x.to(torch.float32)
    class_prior = log_class_priors(mixture, priors)
    values = x.to(DTYPE)
    outer = (values[:, :, None] * values[:, None, :]).reshape(len(values), -1)
    eye = torch.eye(x.shape[1], dtype=DTYPE, device=x.device)
    consistency = (typicality_consistency(outlier_distance, x.shape[1])
                   if outlier_distance > 0 else 1.0)
    trace: list[float] = []
    for _ in range(max_iter):
        tissue, lesion, log_density = joint_log_probabilities(mixture, work, class_prior,
                                                              location)
        joint = tissue if lesion is None else torch.cat([tissue, lesion[:, None]], dim=1)
        log_norm = em.logsumexp_rows(joint)
        responsibility = torch.exp(joint - log_norm[:, None])
        trace.append(float(log_norm.mean()))
        weight = responsibility[:, :mixture.components.n_components]
        if outlier_distance > 0:
            weight = weight * typicality(mixture, log_density, outlier_distance)
        stats = _statistics(weight, values, outer)
        updated = em.m_step(stats, mixture.components, reg=0.0)
        scatter = (updated.scatter * consistency
                   + 1e-6 * eye * float(x.var(dim=0).mean().clamp_min(1e-12)))
        within = updated.weights.clone()
        for index in range(mixture.n_classes):
            chosen = mixture.classes == index
            within[chosen] = within[chosen] / within[chosen].sum().clamp_min(1e-300)
        shift = ((updated.means - mixture.components.means).abs()
                 / torch.diagonal(scatter, dim1=1, dim2=2).sqrt()).max()
        mixture.components = em.Mixture("gaussian", within, updated.means, scatter)
        if lesion is not None:
            share = responsibility[:, -1].sum() / location.sum().clamp_min(1e-12)
            mixture.omega = float(share.clamp(1e-4, 0.5))
        if float(shift) < tol:
            break
    mixture.report = {"iterations": len(trace), "log_likelihood": trace[-1] if trace else None,
                      "voxels": int(x.shape[0])}
    return mixture


def typicality(mixture: TissueMixture, log_density: torch.Tensor,
               outlier_distance: float) -> torch.Tensor:
    """``f / (f + lambda)`` per voxel and component (Van Leemput 2001)."""
    c = mixture.components.n_channels
    half_log_det = 0.5 * torch.logdet(mixture.components.scatter)
    log_lambda = -0.5 * outlier_distance ** 2 - half_log_det - 0.5 * c * math.log(2 * math.pi)
    return torch.sigmoid(log_density - log_lambda.to(log_density.dtype)[None])


def typicality_consistency(outlier_distance: float, n_channels: int) -> float:
    """Factor that makes the typicality-weighted covariance of a Gaussian unbiased.

    A Gaussian's voxels weighted by ``w(d2) = 1 / (1 + exp((d2 - kappa^2) / 2))`` (its
    typicality, ``d2`` the squared Mahalanobis distance, chi-square with ``C`` degrees of
    freedom) have the covariance ``Sigma E[w d2] / (C E[w])``: the tails weigh less, the fit
    narrows, and a healthy draw from it would be too tight. The factor is ``C E[w] / E[w d2]``,
    as for any M-estimator of scatter.

    >>> round(typicality_consistency(3.0, 1), 3), round(typicality_consistency(30.0, 2), 6)
    (1.064, 1.0)
    """
    from scipy import integrate, stats

    kappa2, dof = outlier_distance ** 2, n_channels

    def weight(d2: float) -> float:
        return 1.0 / (1.0 + math.exp(min((d2 - kappa2) / 2.0, 700.0)))

    upper = kappa2 + 200.0
    mean_w = integrate.quad(lambda d2: weight(d2) * stats.chi2.pdf(d2, dof), 0, upper,
                            limit=200)[0]
    mean_wd2 = integrate.quad(lambda d2: weight(d2) * d2 * stats.chi2.pdf(d2, dof), 0, upper,
                              limit=200)[0]
    return dof * mean_w / mean_wd2


def _statistics(weight: torch.Tensor, values: torch.Tensor, outer: torch.Tensor
                ) -> em.Statistics:
    """Gaussian sufficient statistics (float64 sums) of weighted voxels.

    ``values`` are the float64 intensities ``(N, C)``, ``outer`` their flattened outer products
    ``(N, C * C)``.
    """
    weight = weight.to(DTYPE)
    c = values.shape[1]
    n = weight.sum(dim=0)
    return em.Statistics(n, n, weight.T @ values, (weight.T @ outer).reshape(-1, c, c), None,
                         0.0, len(values))


def face_neighbour_sum(volume: torch.Tensor) -> torch.Tensor:
    """Sum of the 6 face neighbours of every voxel (0 beyond the edges)."""
    padded = F.pad(volume[None, None], (1, 1, 1, 1, 1, 1))[0, 0]
    return (padded[:-2, 1:-1, 1:-1] + padded[2:, 1:-1, 1:-1] + padded[1:-1, :-2, 1:-1]
            + padded[1:-1, 2:, 1:-1] + padded[1:-1, 1:-1, :-2] + padded[1:-1, 1:-1, 2:])


def grow(log_odds: torch.Tensor, inside: torch.Tensor, threshold: float, coupling: float,
         sweeps: int = 3) -> torch.Tensor:
    """Lesion growth from confident voxels into their neighbours (mean field).

    Each voxel's lesion log-odds rises by ``coupling`` times the number of its face neighbours
    believed above ``threshold`` (``sigmoid(score - threshold)``), over ``sweeps`` mean-field
    sweeps: faint borders of a lesion join it, isolated bright voxels do not grow (the lesion
    growth of Schmidt et al. 2012, as a Potts prior on the lesion class).

    Parameters
    ----------
    log_odds : torch.Tensor
        ``(X, Y, Z)`` lesion log-odds.
    inside : torch.Tensor
        ``(X, Y, Z)`` bool, the voxels that take part.
    threshold : float
        The log-odds the neighbours' belief is measured against.
    coupling : float
        Log-odds per confident face neighbour (0: no growth).
    sweeps : int
        Mean-field sweeps.
    """
    if coupling <= 0:
        return log_odds
    grown = log_odds
    for _ in range(sweeps):
        belief = torch.where(inside, torch.sigmoid(grown - threshold), 0.0)
        grown = torch.where(inside, log_odds + coupling * face_neighbour_sum(belief), log_odds)
    return grown


def mrf_class_bias(posteriors: torch.Tensor, valid: torch.Tensor, beta: float) -> torch.Tensor:
    """Potts mean-field term per class: ``beta`` times the posterior summed over neighbours.

    Parameters
    ----------
    posteriors : torch.Tensor
        ``(N, K)`` class posteriors of the valid voxels.
    valid : torch.Tensor
        ``(X, Y, Z)`` bool grid of those voxels.

    Returns
    -------
    torch.Tensor
        ``(N, K)``.
    """
    out = torch.empty_like(posteriors)
    for index in range(posteriors.shape[1]):
        grid = torch.zeros(valid.shape, dtype=posteriors.dtype, device=posteriors.device)
        grid[valid] = posteriors[:, index]
        out[:, index] = beta * face_neighbour_sum(grid)[valid]
    return out


def class_posteriors(mixture: TissueMixture, x: torch.Tensor, priors: torch.Tensor,
                     location: torch.Tensor | None, valid: torch.Tensor,
                     mrf: float = 0.0, mrf_sweeps: int = 3
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class posteriors ``(N, K)`` (lesion last, when modelled) and the lesion log-odds.

    With ``mrf`` > 0, the class priors are updated by a Potts model over face neighbours
    (``mrf_sweeps`` mean-field sweeps) before the final posteriors.
    """
    bias = None
    class_prior = log_class_priors(mixture, priors, x.dtype)
    for sweep in range(mrf_sweeps + 1 if mrf > 0 else 1):
        tissue, lesion, _ = joint_log_probabilities(mixture, x, class_prior, location, bias)
        per_class = torch.stack([em.logsumexp_rows(tissue[:, mixture.classes == k])
                                 for k in range(mixture.n_classes)], dim=1)
        joint = per_class if lesion is None else torch.cat([per_class, lesion[:, None]], dim=1)
        posteriors = torch.softmax(joint, dim=1)
        if sweep < mrf_sweeps and mrf > 0:
            bias = mrf_class_bias(posteriors[:, :mixture.n_classes], valid, mrf)
    log_odds = None
    if lesion is not None:
        log_odds = (lesion - em.logsumexp_rows(per_class)).clamp_min(FLOOR_SCORE)
    return posteriors, log_odds


def simulate_healthy(mixture: TissueMixture, x: torch.Tensor, priors: torch.Tensor,
                     location: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Intensities ``(N, C)`` of a lesion-free version of the subject, drawn from the model.

    Each voxel draws a tissue component from its posterior given its own intensities and that
    it is healthy (the subject's anatomy as the model sees it, lesions given the tissue they
    most resemble), then healthy intensities from that Gaussian.
    """
    tissue, _, _ = joint_log_probabilities(mixture, x, log_class_priors(mixture, priors, x.dtype),
                                           location)
    weights = torch.softmax(tissue.double(), dim=1)
    drawn = torch.multinomial(weights.cpu(), 1, generator=generator)[:, 0].to(priors.device)
    cholesky = torch.linalg.cholesky(mixture.components.scatter)
    normal = torch.randn(len(drawn), mixture.components.n_channels, dtype=DTYPE,
                         generator=generator).to(priors.device)
    return (mixture.components.means[drawn]
            + torch.einsum("ncd,nd->nc", cholesky[drawn], normal))
