"""Expectation-maximisation for Gaussian, Student-t and multiple-scaled Student-t mixtures.

Pure torch: the same code runs on CPU and GPU. Parameters and sufficient statistics are float64;
the E-step works on chunks of samples so that memory stays bounded whatever the number of
samples.

Families
--------
``gaussian``
    Full-covariance Gaussian components.
``student``
    Multivariate Student-t components (one degrees-of-freedom per component), fitted by the
    ECM algorithm of Peel & McLachlan (2000).
``mmst``
    Multiple-scaled Student-t components (Forbes & Wraith 2014): each component has
    eigenvectors ``D``, scales ``A`` and one degrees-of-freedom per principal direction, so
    that its tails can be heavy along one direction and light along another. The eigenvectors
    are updated by pairwise plane rotations that decrease ``sum_m log(d_m' S_m d_m)``, the
    profiled objective of Flury & Gautschi's common-principal-components problem; each CM step
    does not decrease the likelihood (a generalised EM).

Two drivers share the E- and M-steps: :func:`fit_batch` (classic EM on samples in memory) and
:func:`fit_online` (the online EM of Cappé & Moulines 2009: running sufficient statistics with a
decreasing step ``t ** -alpha`` and Polyak averaging of the statistics), whose memory does not
depend on how many samples stream through it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

FAMILIES = ("gaussian", "student", "mmst")
DTYPE = torch.float64
CHUNK = 1 << 18
"""Samples per E-step chunk: memory per chunk is about CHUNK * K * C * 8 bytes a few times."""
DOF_BOUNDS = (0.5, 200.0)
"""Degrees of freedom are kept in this interval (200 is Gaussian for every practical purpose)."""
INITIAL_DOF = 10.0
_ROTATION_GRID = torch.linspace(-math.pi / 2, math.pi / 2, 181, dtype=DTYPE)
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class Mixture:
    """Parameters of a fitted mixture (float64 tensors).

    Attributes
    ----------
    family : str
        One of :data:`FAMILIES`.
    weights : torch.Tensor
        ``(K,)`` mixing proportions.
    means : torch.Tensor
        ``(K, C)`` locations.
    scatter : torch.Tensor
        ``(K, C, C)`` scale matrices (covariances for ``gaussian``; for ``mmst``,
        ``D diag(A) D'``, kept for reporting).
    dof : torch.Tensor or None
        Degrees of freedom: ``(K,)`` for ``student``, ``(K, C)`` for ``mmst``.
    directions : torch.Tensor or None
        ``mmst``: ``(K, C, C)`` orthonormal eigenvectors, one per column.
    scales : torch.Tensor or None
        ``mmst``: ``(K, C)`` scales along the directions.
    """

    family: str
    weights: torch.Tensor
    means: torch.Tensor
    scatter: torch.Tensor
    dof: torch.Tensor | None = None
    directions: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    @property
    def n_components(self) -> int:
        """Number of components K."""
        return int(self.weights.shape[0])

    @property
    def n_channels(self) -> int:
        """Dimension C of the samples."""
        return int(self.means.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.means.device

    def to(self, device: torch.device | str) -> Mixture:
        """A copy on ``device``."""
        moved = {key: (value.to(device) if isinstance(value, torch.Tensor) else value)
                 for key, value in self.__dict__.items()}
        return Mixture(**moved)

    def n_parameters(self) -> int:
        """Free parameters, for the BIC."""
        k, c = self.n_components, self.n_channels
        count = (k - 1) + k * c + k * c * (c + 1) // 2
        if self.family == "student":
            count += k
        elif self.family == "mmst":
            count += k * c
        return count

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parameters by name (for safetensors)."""
        names = ("weights", "means", "scatter", "dof", "directions", "scales")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @classmethod
    def from_tensors(cls, family: str, tensors: dict[str, torch.Tensor]) -> Mixture:
        """Inverse of :meth:`tensors`."""
        if family not in FAMILIES:
            raise ValueError(f"unknown mixture family {family!r}; use one of {FAMILIES}")
        return cls(family=family, **{key: value.to(DTYPE) for key, value in tensors.items()})

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of each sample, ``(N,)``, computed in chunks."""
        out = torch.empty(x.shape[0], dtype=DTYPE, device=x.device)
        for start in range(0, x.shape[0], CHUNK):
            chunk = x[start:start + CHUNK].to(DTYPE)
            out[start:start + CHUNK] = logsumexp_rows(self._log_prob_and_distances(chunk)[0])
        return out

    def component_log_joint(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log weight plus log-density of each component, ``(N, K)``, and squared distances.

        The computation runs in ``x``'s dtype (float32 halves the time of the E-step); the
        distances are ``(N, K)`` Mahalanobis distances for the Gaussian and Student-t families.
        """
        joints, distances = [], []
        for start in range(0, x.shape[0], CHUNK):
            joint, distance = self._log_prob_and_distances(x[start:start + CHUNK])
            joints.append(joint)
            distances.append(distance)
        if not joints:
            empty = torch.zeros(0, self.n_components, dtype=x.dtype, device=x.device)
            return empty, empty
        return torch.cat(joints), torch.cat(distances)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples from the mixture (on its device)."""
        device = self.device
        labels = torch.multinomial(self.weights.cpu(), n, replacement=True,
                                   generator=generator).to(device)
        normal = torch.randn(n, self.n_channels, dtype=DTYPE, generator=generator).to(device)
        if self.family == "mmst":
            gamma = _gamma_samples(self.dof[labels] / 2, n, generator, device)
            standard = normal / torch.sqrt(gamma)
            rotated = standard * torch.sqrt(self.scales[labels])
            return self.means[labels] + torch.einsum("ncm,nm->nc", self.directions[labels],
                                                     rotated)
        cholesky = torch.linalg.cholesky(self.scatter)[labels]
        values = torch.einsum("ncd,nd->nc", cholesky, normal)
        if self.family == "student":
            gamma = _gamma_samples(self.dof[labels][:, None] / 2, n, generator, device)
            values = values / torch.sqrt(gamma)
        return self.means[labels] + values

    def _log_prob_and_distances(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Component log joint ``(N, K)`` and squared distances (``(N, K)`` or ``(N, K, C)``)."""
        c, k, dtype = self.n_channels, self.n_components, x.dtype
        log_weights = torch.log(self.weights.clamp_min(1e-300))
        if self.family == "mmst":
            # one (C, K*C) matrix product: tall-skinny einsums are several times slower
            projection = self.directions.permute(1, 0, 2).reshape(c, k * c)
            offset = torch.einsum("kc,kcm->km", self.means, self.directions)
            rotated = (x @ projection.to(dtype)).reshape(-1, k, c) - offset.to(dtype)
            distance = rotated.square() / self.scales.to(dtype)
            nu = self.dof
            log_norm = (torch.lgamma((nu + 1) / 2) - torch.lgamma(nu / 2)
                        - 0.5 * torch.log(nu * math.pi * self.scales))
            log_p = (log_norm.to(dtype) - ((nu + 1) / 2).to(dtype)
                     * torch.log1p(distance / nu.to(dtype))).sum(dim=2)
            return log_weights.to(dtype) + log_p, distance
        cholesky = torch.linalg.cholesky(self.scatter)
        # sklearn's trick: distances from x @ U_k with U_k the inverse Cholesky factor
        precision_factor = torch.linalg.solve_triangular(
            cholesky, torch.eye(c, dtype=DTYPE, device=x.device).expand_as(cholesky), upper=False
        ).transpose(1, 2)
        offset = torch.einsum("kc,kcd->kd", self.means, precision_factor)
        projection = precision_factor.permute(1, 0, 2).reshape(c, k * c)
        projected = (x @ projection.to(dtype)).reshape(-1, k, c) - offset.to(dtype)
        distance = projected.square().sum(dim=2)
        half_log_det = torch.log(torch.diagonal(cholesky, dim1=1, dim2=2)).sum(dim=1)
        if self.family == "gaussian":
            constant = log_weights - half_log_det - 0.5 * c * _LOG_2PI
            return constant.to(dtype) - 0.5 * distance, distance
        nu = self.dof
        constant = (log_weights + torch.lgamma((nu + c) / 2) - torch.lgamma(nu / 2)
                    - c / 2 * torch.log(nu * math.pi) - half_log_det)
        log_p = constant.to(dtype) - ((nu + c) / 2).to(dtype) * torch.log1p(
            distance / nu.to(dtype))
        return log_p, distance

    def outlyingness(self, x: torch.Tensor) -> torch.Tensor:
        """Weight-based outlyingness of each sample (``mmst``), in ``-log10`` p-value units.

        Under component ``k``, the squared standardised coordinate ``delta_m`` along direction
        ``m`` follows ``F(1, nu_m)``, so its tail probability is a function of the E-step weight
        ``u_m = (nu_m + 1) / (nu_m + delta_m)``: ``p_m = I_{nu_m / (nu_m + delta_m)}(nu_m / 2,
        1 / 2)``. A small weight is an outlying direction. The score is ``-log10`` of the
        Bonferroni-combined smallest ``p_m`` under the sample's most probable component.
        """
        from scipy.special import betainc

        if self.family != "mmst":
            raise ValueError("the weight-based outlyingness is defined for mmst mixtures")
        scores = []
        for start in range(0, x.shape[0], CHUNK):
            log_joint, distance = self._log_prob_and_distances(x[start:start + CHUNK].to(DTYPE))
            best = log_joint.argmax(dim=1)
            delta = distance[torch.arange(len(best), device=x.device), best]
            nu = self.dof[best]
            ratio = (nu / (nu + delta)).cpu().numpy()
            p = betainc(nu.cpu().numpy() / 2, 0.5, ratio).min(axis=1)
            combined = np.clip(p * self.n_channels, 1e-300, 1.0)
            scores.append(torch.from_numpy(-np.log10(combined)))
        return torch.cat(scores).to(x.device)


def logsumexp_rows(values: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp of ``(N, K)`` values (several times faster than torch's on CPU).

    Every row needs a finite value.
    """
    peak = values.amax(dim=1, keepdim=True)
    return (peak + torch.log(torch.exp(values - peak).sum(dim=1, keepdim=True)))[:, 0]


def _gamma_samples(shape: torch.Tensor, n: int, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """Gamma(shape, rate=shape) draws (the latent weights of a t variable), reproducibly."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    gen = np.random.default_rng(seed)
    values = gen.gamma(shape.cpu().numpy(), 1.0 / shape.cpu().numpy())
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(device)


@dataclass
class Statistics:
    """Sufficient statistics of a batch (sums over samples), float64.

    ``u`` is the E-step weight of the t families (1 for Gaussians), ``r`` the responsibility.
    ``n``: sum r; ``su``: sum r u; ``sux``: sum r u x; ``suxx``: sum r u x x'; ``slogw``:
    sum r (E[log w] - u). For ``mmst`` every statistic has an extra direction axis ``m``.
    """

    n: torch.Tensor
    su: torch.Tensor
    sux: torch.Tensor
    suxx: torch.Tensor
    slogw: torch.Tensor | None
    log_likelihood: float
    count: int

    def scaled(self, factor: float) -> Statistics:
        """The statistics times ``factor`` (log-likelihood and count unchanged)."""
        return Statistics(self.n * factor, self.su * factor, self.sux * factor,
                          self.suxx * factor,
                          None if self.slogw is None else self.slogw * factor,
                          self.log_likelihood, self.count)

    def __add__(self, other: Statistics) -> Statistics:
        return Statistics(self.n + other.n, self.su + other.su, self.sux + other.sux,
                          self.suxx + other.suxx,
                          None if self.slogw is None else self.slogw + other.slogw,
                          self.log_likelihood + other.log_likelihood, self.count + other.count)


def e_step(mixture: Mixture, x: torch.Tensor, trim: float = 0.0,
           dtype: torch.dtype = torch.float32) -> Statistics:
    """Sufficient statistics of samples ``x`` ``(N, C)`` under ``mixture``, chunk by chunk.

    Parameters
    ----------
    mixture : Mixture
        Current parameters.
    x : torch.Tensor
        Samples, any float dtype, on the mixture's device.
    trim : float
        Fraction of the least likely samples of each chunk left out of the statistics (the
        trimmed likelihood): outliers in a contaminated training set then do not pull the fit.
    dtype : torch.dtype
        Precision of the per-sample densities and responsibilities. The moments are always
        summed in float64 (second moments of un-centred data lose digits in float32); float32
        densities make the E-step about twice as fast at a relative error near 1e-7.

    Returns
    -------
    Statistics
        Sums over the samples; ``log_likelihood`` sums the untrimmed samples' log-density.
    """
    total: Statistics | None = None
    for start in range(0, x.shape[0], CHUNK):
        stats = _chunk_statistics(mixture, x[start:start + CHUNK], trim, dtype)
        total = stats if total is None else total + stats
    return total


def _chunk_statistics(mixture: Mixture, x: torch.Tensor, trim: float,
                      dtype: torch.dtype) -> Statistics:
    c, k = mixture.n_channels, mixture.n_components
    log_joint, distance = mixture._log_prob_and_distances(x.to(dtype))
    log_density = logsumexp_rows(log_joint)
    responsibility = torch.exp(log_joint - log_density[:, None])
    keep = None
    if trim > 0:
        keep = log_density >= torch.quantile(log_density, trim)
        responsibility = responsibility * keep[:, None]
    log_likelihood = float(log_density.sum(dtype=DTYPE) if keep is None
                           else log_density[keep].sum(dtype=DTYPE))
    count = int(len(x) if keep is None else keep.sum())
    x = x.to(DTYPE)
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), c * c)
    if mixture.family == "gaussian":
        weight = responsibility.to(DTYPE)
        n = weight.sum(dim=0)
        return Statistics(n, n, weight.T @ x, (weight.T @ outer).reshape(k, c, c), None,
                          log_likelihood, count)
    nu = mixture.dof.to(dtype)
    dims = c if mixture.family == "student" else 1
    u = (nu + dims) / (nu + distance)
    expected_log_w = torch.log(u) + (torch.special.digamma((nu + dims) / 2)
                                     - torch.log((nu + dims) / 2))
    if mixture.family == "student":
        weight = (responsibility * u).to(DTYPE)
        return Statistics(responsibility.sum(dim=0, dtype=DTYPE), weight.sum(dim=0),
                          weight.T @ x, (weight.T @ outer).reshape(k, c, c),
                          (responsibility * (expected_log_w - u)).sum(dim=0, dtype=DTYPE),
                          log_likelihood, count)
    weight = (responsibility[:, :, None] * u).reshape(len(x), k * c).to(DTYPE)
    return Statistics(
        responsibility.sum(dim=0, dtype=DTYPE),
        weight.sum(dim=0).reshape(k, c),
        (weight.T @ x).reshape(k, c, c),
        (weight.T @ outer).reshape(k, c, c, c),
        (responsibility[:, :, None] * (expected_log_w - u)).sum(dim=0, dtype=DTYPE),
        log_likelihood, count,
    )


def m_step(stats: Statistics, previous: Mixture, reg: float = 1e-6) -> Mixture:
    """New parameters from sufficient statistics (ratios, so any common scaling is fine).

    Parameters
    ----------
    stats : Statistics
        From :func:`e_step` (or a running average of them).
    previous : Mixture
        The parameters the statistics were computed with (the family, and the eigenvectors
        that ``mmst``'s rotation update starts from).
    reg : float
        Added to the diagonal of every scale matrix (and to the ``mmst`` scales).
    """
    n = stats.n.clamp_min(1e-12)
    weights = n / n.sum()
    c = previous.n_channels
    eye = torch.eye(c, dtype=DTYPE, device=n.device)
    if previous.family in ("gaussian", "student"):
        su = stats.su.clamp_min(1e-12)
        means = stats.sux / su[:, None]
        scatter = (stats.suxx - su[:, None, None] * means[:, :, None] * means[:, None, :])
        scatter = 0.5 * (scatter + scatter.transpose(1, 2)) / n[:, None, None] + reg * eye
        dof = None
        if previous.family == "student":
            dof = solve_dof(stats.slogw / n)
        return Mixture(previous.family, weights, means, scatter, dof)
    su = stats.su.clamp_min(1e-12)
    directions = previous.directions
    # CM-1: location given the directions (weighted mean along each direction)
    along = torch.einsum("kcm,kmc->km", directions, stats.sux) / su
    means = torch.einsum("kcm,km->kc", directions, along)
    # CM-2: directions and scales given the location
    cross = torch.einsum("kmc,kd->kmcd", stats.sux, means)
    spread = (stats.suxx - cross - cross.transpose(2, 3)
              + su[:, :, None, None] * (means[:, :, None] * means[:, None, :])[:, None])
    spread = 0.5 * (spread + spread.transpose(2, 3)) + reg * n[:, None, None, None] * eye
    directions = rotate_directions(directions, spread)
    scales = torch.einsum("kcm,kmcd,kdm->km", directions, spread, directions) / n[:, None]
    scales = scales.clamp_min(reg)
    dof = solve_dof(stats.slogw / n[:, None])
    scatter = torch.einsum("kcm,km,kdm->kcd", directions, scales, directions)
    return Mixture("mmst", weights, means, scatter, dof, directions, scales)


def rotate_directions(directions: torch.Tensor, spread: torch.Tensor,
                      sweeps: int = 3) -> torch.Tensor:
    """Orthonormal directions that decrease ``sum_m log(d_m' S_m d_m)`` (Jacobi plane sweeps).

    Parameters
    ----------
    directions : torch.Tensor
        ``(K, C, C)`` current eigenvectors (columns).
    spread : torch.Tensor
        ``(K, C, C, C)``: for each component and direction ``m`` the weighted scatter ``S_m``.
    sweeps : int
        Passes over all pairs of directions.

    Returns
    -------
    torch.Tensor
        Updated ``(K, C, C)`` directions; never worse than the input (the zero rotation is
        always a candidate).
    """
    k, c, _ = directions.shape
    directions = directions.clone()
    grid = _ROTATION_GRID.to(directions.device)
    cos, sin = torch.cos(grid), torch.sin(grid)
    for _ in range(sweeps):
        for a in range(c):
            for b in range(a + 1, c):
                plane = directions[:, :, [a, b]]
                m_a = plane.transpose(1, 2) @ spread[:, a] @ plane
                m_b = plane.transpose(1, 2) @ spread[:, b] @ plane

                def quadratic(m: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
                    return (m[:, 0, 0, None] * p * p + 2 * m[:, 0, 1, None] * p * q
                            + m[:, 1, 1, None] * q * q)

                objective = (torch.log(quadratic(m_a, cos, sin).clamp_min(1e-300))
                             + torch.log(quadratic(m_b, -sin, cos).clamp_min(1e-300)))
                best = objective.argmin(dim=1)
                ca, sa = cos[best][:, None], sin[best][:, None]
                new_a = ca * directions[:, :, a] + sa * directions[:, :, b]
                new_b = -sa * directions[:, :, a] + ca * directions[:, :, b]
                directions[:, :, a], directions[:, :, b] = new_a, new_b
    return directions


def solve_dof(mean_log_w_minus_w: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """Degrees of freedom solving ``log(nu/2) - digamma(nu/2) + 1 + b = 0`` by bisection.

    ``b`` is the responsibility-weighted mean of ``E[log w] - E[w]``. The left-hand side
    decreases in ``nu``; where it stays positive the data are lighter-tailed than any t and
    ``nu`` is the upper bound of :data:`DOF_BOUNDS`.
    """
    target = -(1.0 + mean_log_w_minus_w)
    low = torch.full_like(target, math.log(DOF_BOUNDS[0]))
    high = torch.full_like(target, math.log(DOF_BOUNDS[1]))
    for _ in range(iterations):
        middle = (low + high) / 2
        half = torch.exp(middle) / 2
        value = torch.log(half) - torch.special.digamma(half)
        above = value > target
        low = torch.where(above, middle, low)
        high = torch.where(above, high, middle)
    return torch.exp((low + high) / 2)


def kmeans_init(x: torch.Tensor, n_components: int, family: str, seed: int,
                iterations: int = 10, reg: float = 1e-6) -> Mixture:
    """Initial mixture from k-means++ seeding (scikit-learn) and a few Lloyd iterations.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C)`` sample (a few tens of thousands of points are plenty).
    n_components : int
        K.
    family : str
        One of :data:`FAMILIES`.
    seed : int
        Seed of the k-means++ seeding.
    """
    from sklearn.cluster import kmeans_plusplus

    if family not in FAMILIES:
        raise ValueError(f"unknown mixture family {family!r}; use one of {FAMILIES}")
    if len(x) < n_components:
        raise ValueError(f"{len(x)} samples cannot initialise {n_components} components")
    x = x.to(DTYPE)
    centres, _ = kmeans_plusplus(x.cpu().numpy(), n_components, random_state=seed)
    centres = torch.from_numpy(centres).to(x.device)
    for _ in range(iterations):
        labels = torch.cdist(x, centres).argmin(dim=1)
        for k in range(n_components):
            members = x[labels == k]
            if len(members):
                centres[k] = members.mean(dim=0)
    labels = torch.cdist(x, centres).argmin(dim=1)
    c = x.shape[1]
    eye = torch.eye(c, dtype=DTYPE, device=x.device)
    overall = torch.cov(x.T).reshape(c, c) + reg * eye
    weights, scatter = [], []
    for k in range(n_components):
        members = x[labels == k]
        weights.append(max(len(members), 1) / len(x))
        scatter.append(torch.cov(members.T).reshape(c, c) + reg * eye
                       if len(members) > c else overall)
    weights = torch.tensor(weights, dtype=DTYPE, device=x.device)
    scatter = torch.stack(scatter)
    weights = weights / weights.sum()
    if family == "gaussian":
        return Mixture(family, weights, centres, scatter)
    if family == "student":
        return Mixture(family, weights, centres, scatter,
                       torch.full((n_components,), INITIAL_DOF, dtype=DTYPE, device=x.device))
    scales, directions = torch.linalg.eigh(scatter)
    return Mixture(family, weights, centres, scatter,
                   torch.full((n_components, c), INITIAL_DOF, dtype=DTYPE, device=x.device),
                   directions, scales.clamp_min(reg))


@dataclass
class FitResult:
    """A fitted mixture and how the fit went."""

    mixture: Mixture
    log_likelihood: float
    """Mean log-density per sample of the (untrimmed part of the) fitting data."""
    n_iter: int
    converged: bool
    seconds: float
    history: list[float] = field(default_factory=list)


def fit_batch(x: torch.Tensor, n_components: int, family: str = "gaussian", *,
              init: Mixture | None = None, max_iter: int = 200, tol: float = 1e-3,
              trim: float = 0.0, reg: float = 1e-6, seed: int = 0,
              init_samples: int = 50_000) -> FitResult:
    """Batch EM on samples in memory until the mean log-likelihood changes by less than ``tol``.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C)`` samples on the device to compute on.
    n_components : int
        K (ignored when ``init`` is given).
    family : str
        One of :data:`FAMILIES`.
    init : Mixture, optional
        Starting parameters; default: :func:`kmeans_init` on ``init_samples`` random samples.
    max_iter, tol : int, float
        Stop after ``max_iter`` iterations or when the mean log-likelihood per sample changed
        by less than ``tol`` (scikit-learn's criterion).
    trim : float
        Trimmed fraction per chunk (see :func:`e_step`).
    reg : float
        Diagonal regularisation of the scale matrices.
    seed : int
        Seed of the initialisation.
    """
    start = time.perf_counter()
    if init is None:
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(x), generator=generator)[:init_samples].to(x.device)
        init = kmeans_init(x[pick], n_components, family, seed)
    mixture = init.to(x.device)
    history: list[float] = []
    converged = False
    for iteration in range(1, max_iter + 1):
        stats = e_step(mixture, x, trim)
        history.append(stats.log_likelihood / max(stats.count, 1))
        mixture = m_step(stats, mixture, reg)
        if iteration > 1 and abs(history[-1] - history[-2]) < tol:
            converged = True
            break
    final = e_step(mixture, x, trim)
    return FitResult(mixture, final.log_likelihood / max(final.count, 1), iteration, converged,
                     time.perf_counter() - start, history)


def fit_online(batches: Callable[[], Iterable[torch.Tensor]], init: Mixture, *,
               epochs: int = 3, alpha: float = 0.6, burn_in: int = 20,
               evaluation: torch.Tensor | None = None, tol: float = 1e-3, trim: float = 0.0,
               reg: float = 1e-6) -> FitResult:
    """Online EM: one E-step per mini-batch, statistics updated with a decreasing step.

    ``s_t = s_{t-1} + t ** -alpha * (s(batch_t) - s_{t-1})`` (Cappé & Moulines 2009), an M-step
    after every batch, and after ``burn_in`` batches a Polyak average of the statistics, from
    which the parameters of each epoch's end are computed (the average restarts with every
    epoch, so that early iterates do not linger). Only one batch is ever in memory.

    Parameters
    ----------
    batches : callable
        Returns an iterable of ``(B, C)`` tensors: one pass (epoch) over the data, in a fresh
        random order each call.
    init : Mixture
        Starting parameters (e.g. :func:`kmeans_init` on a small sample).
    epochs : int
        At most this many passes.
    alpha : float
        Step exponent in (0.5, 1].
    burn_in : int
        Batches before averaging starts.
    evaluation : torch.Tensor, optional
        Held-out samples; after each epoch their mean log-likelihood is computed and the fit
        stops when it changed by less than ``tol``.
    trim : float
        Trimmed fraction of each batch.
    reg : float
        Diagonal regularisation.
    """
    if not 0.5 < alpha <= 1.0:
        raise ValueError(f"the step exponent must be in (0.5, 1], not {alpha}")
    start = time.perf_counter()
    mixture = init
    running: Statistics | None = None
    averaged: Statistics | None = None
    n_averaged = 0
    step = 0
    history: list[float] = []
    converged = False
    for _ in range(epochs):
        # the average restarts every epoch: it then holds only the latest pass's iterates
        averaged, n_averaged = None, 0
        for batch in batches():
            step += 1
            stats = e_step(mixture, batch.to(mixture.device), trim)
            stats = stats.scaled(1.0 / max(stats.count, 1))
            gamma = step ** -alpha
            running = stats if running is None else (running.scaled(1 - gamma)
                                                     + stats.scaled(gamma))
            mixture = m_step(running, mixture, reg)
            if step > burn_in:
                n_averaged += 1
                averaged = running if averaged is None else (
                    averaged.scaled(1 - 1 / n_averaged) + running.scaled(1 / n_averaged))
        if running is None:
            raise ValueError("the data yielded no batches")
        mixture = m_step(averaged if averaged is not None else running, mixture, reg)
        if evaluation is not None:
            history.append(float(mixture.log_prob(evaluation).mean()))
            if len(history) > 1 and abs(history[-1] - history[-2]) < tol:
                converged = True
                break
    score = history[-1] if history else float("nan")
    return FitResult(mixture, score, step, converged, time.perf_counter() - start, history)


def bic(log_likelihood_sum: float, mixture: Mixture, n_samples: int) -> float:
    """Bayesian information criterion ``-2 log L + p log n`` (lower is better)."""
    return -2.0 * log_likelihood_sum + mixture.n_parameters() * math.log(n_samples)


def select_components(x: torch.Tensor, family: str, candidates: Iterable[int], *,
                      seed: int = 0, **fit_options) -> tuple[int, dict[int, float]]:
    """The number of components with the lowest BIC on ``x``, and every candidate's BIC."""
    scores = {}
    for k in candidates:
        result = fit_batch(x, k, family, seed=seed, **fit_options)
        scores[k] = bic(result.log_likelihood * len(x), result.mixture, len(x))
    return min(scores, key=scores.get), scores


def shuffled_batches(x: torch.Tensor, batch_size: int, seed: int) -> Callable[[],
                                                                             Iterator[torch.Tensor]]:
    """A batch factory for :func:`fit_online` over samples in memory (new order each epoch)."""
    generator = torch.Generator().manual_seed(seed)

    def epoch() -> Iterator[torch.Tensor]:
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for begin in range(0, len(x), batch_size):
            yield x[order[begin:begin + batch_size]]

    return epoch
