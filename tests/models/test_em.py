"""EM for Gaussian, t and multiple-scaled t mixtures on generated samples with known parameters."""

import math

import pytest
import torch

from bids_anomaly.models.mixture import em

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _three_blobs(dof=None, family="gaussian") -> em.Mixture:
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0, 0.0], [4.0, 1.0, -2.0], [-3.0, 3.0, 1.0]],
                         dtype=torch.float64)
    rotation = torch.linalg.qr(torch.tensor([[1.0, 0.3, 0.2], [0.1, 1.0, 0.4],
                                             [0.2, -0.3, 1.0]], dtype=torch.float64))[0]
    scales = torch.tensor([[1.0, 0.5, 0.2], [0.6, 0.3, 0.3], [0.4, 0.2, 0.1]],
                          dtype=torch.float64)
    scatter = torch.stack([rotation @ torch.diag(s) @ rotation.T for s in scales])
    return em.Mixture(family, weights, means, scatter, dof)


def _sample(mixture: em.Mixture, n: int, seed: int = 1) -> torch.Tensor:
    return mixture.sample(n, torch.Generator().manual_seed(seed)).float()


def _match(fitted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Order of the fitted components that best matches the true means."""
    return torch.cdist(true, fitted).argmin(dim=1)


def test_gaussian_batch_em_recovers_known_parameters():
    true = _three_blobs()
    x = _sample(true, 60_000)
    result = em.fit_batch(x, 3, "gaussian", seed=0, tol=1e-6)
    order = _match(result.mixture.means, true.means)
    assert result.converged
    assert torch.allclose(result.mixture.weights[order], true.weights, atol=0.01)
    assert torch.allclose(result.mixture.means[order], true.means, atol=0.03)
    assert torch.allclose(result.mixture.scatter[order], true.scatter, atol=0.03)
    # the fitted likelihood is at least the true parameters' (it is the maximum)
    assert result.log_likelihood >= float(true.log_prob(x.double()).mean()) - 1e-4


def test_student_em_recovers_degrees_of_freedom():
    true = _three_blobs(torch.tensor([3.0, 8.0, 200.0], dtype=torch.float64), "student")
    x = _sample(true, 60_000)
    result = em.fit_batch(x, 3, "student", seed=0, tol=1e-6, max_iter=150)
    order = _match(result.mixture.means, true.means)
    dof = result.mixture.dof[order]
    assert abs(dof[0] - 3.0) < 0.5
    assert 5.0 < dof[1] < 13.0
    assert dof[2] > 25.0
    assert torch.allclose(result.mixture.means[order], true.means, atol=0.05)


@pytest.mark.parametrize("family", ["student", "mmst"])
def test_heavy_tailed_families_reduce_to_the_gaussian(family):
    gaussian = _three_blobs()
    x = _sample(gaussian, 5_000).double()
    k, c = 3, 3
    if family == "student":
        limit = em.Mixture(family, gaussian.weights, gaussian.means, gaussian.scatter,
                           torch.full((k,), 1e8, dtype=torch.float64))
    else:
        scales, directions = torch.linalg.eigh(gaussian.scatter)
        limit = em.Mixture(family, gaussian.weights, gaussian.means, gaussian.scatter,
                           torch.full((k, c), 1e8, dtype=torch.float64), directions, scales)
    assert torch.allclose(limit.log_prob(x), gaussian.log_prob(x), atol=1e-5)
    # fitted on Gaussian data: large degrees of freedom and the Gaussian fit's likelihood
    data = _sample(gaussian, 30_000, seed=2)
    fitted = em.fit_batch(data, 3, family, seed=0, tol=1e-6, max_iter=150)
    reference = em.fit_batch(data, 3, "gaussian", seed=0, tol=1e-6)
    assert fitted.mixture.dof.min() > 20
    assert abs(fitted.log_likelihood - reference.log_likelihood) < 1e-3 * abs(
        reference.log_likelihood)


def test_mmst_tails_differ_by_direction():
    """One direction heavy-tailed (dof 2), the other light (Gaussian): MMST sees both."""
    generator = torch.Generator().manual_seed(0)
    n = 60_000
    heavy = torch.randn(n, generator=generator, dtype=torch.float64) / torch.sqrt(
        torch.distributions.Gamma(1.0, 1.0).sample((n,)))
    light = torch.randn(n, generator=generator, dtype=torch.float64)
    angle = math.radians(30)
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)],
                             [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    x = (torch.stack([heavy, light], dim=1) @ rotation.T).float()
    result = em.fit_batch(x, 1, "mmst", seed=0, tol=1e-6, max_iter=300)
    direction = result.mixture.directions[0]
    dof = result.mixture.dof[0]
    heavy_axis = int(torch.argmin(dof))
    assert abs(float(direction[:, heavy_axis] @ rotation[:, 0])) > 0.99
    assert dof[heavy_axis] < 3.0 and dof[1 - heavy_axis] > 30
    student = em.fit_batch(x, 1, "student", seed=0, tol=1e-6, max_iter=300)
    assert result.log_likelihood > student.log_likelihood + 0.01


def test_rotation_update_never_increases_the_objective():
    generator = torch.Generator().manual_seed(3)
    k, c = 4, 3
    directions = torch.linalg.qr(torch.randn(k, c, c, generator=generator,
                                             dtype=torch.float64))[0]
    factors = torch.randn(k, c, c, c, generator=generator, dtype=torch.float64)
    spread = factors @ factors.transpose(2, 3) + 0.1 * torch.eye(c, dtype=torch.float64)

    def objective(d):
        return torch.log(torch.einsum("kcm,kmcd,kdm->km", d, spread, d)).sum(dim=1)

    rotated = em.rotate_directions(directions, spread)
    assert (objective(rotated) <= objective(directions) + 1e-12).all()
    assert torch.allclose(rotated.transpose(1, 2) @ rotated,
                          torch.eye(c, dtype=torch.float64).expand(k, c, c), atol=1e-10)


@pytest.mark.parametrize("family", em.FAMILIES)
def test_online_em_reaches_the_batch_solution(family):
    """Heavy-tailed data (t with 4, 6 and 8 degrees of freedom), same initialisation."""
    true = _three_blobs(torch.tensor([4.0, 6.0, 8.0], dtype=torch.float64), "student")
    x = _sample(true, 100_000)
    init = em.kmeans_init(x[:20_000], 3, family, seed=0)
    batch = em.fit_batch(x, 3, family, init=init, tol=1e-5)
    online = em.fit_online(em.shuffled_batches(x, 5_000, seed=0), init, epochs=4,
                           evaluation=x, tol=1e-5)
    assert abs(online.log_likelihood - batch.log_likelihood) < 3e-3 * abs(batch.log_likelihood)
    order = _match(online.mixture.means, batch.mixture.means)
    assert torch.allclose(online.mixture.means[order], batch.mixture.means, atol=0.05)


def test_trimming_resists_gross_outliers():
    generator = torch.Generator().manual_seed(0)
    healthy = torch.randn(50_000, 2, generator=generator)
    outliers = torch.randn(2_500, 2, generator=generator) * 0.5 + torch.tensor([8.0, -8.0])
    x = torch.cat([healthy, outliers])
    plain = em.fit_batch(x, 1, "gaussian", seed=0)
    trimmed = em.fit_batch(x, 1, "gaussian", seed=0, trim=0.08)
    assert float(plain.mixture.scatter[0].diagonal().max()) > 3.0
    assert torch.allclose(trimmed.mixture.scatter[0], torch.eye(2, dtype=torch.float64),
                          atol=0.25)
    assert torch.allclose(trimmed.mixture.means[0], torch.zeros(2, dtype=torch.float64),
                          atol=0.05)


def test_bic_selects_the_true_number_of_components():
    x = _sample(_three_blobs(), 30_000)
    best, table = em.select_components(x, "gaussian", range(1, 6), seed=0)
    assert best == 3
    assert table[3] < table[2] and table[3] < table[5]


def test_reproducible_with_a_seed():
    x = _sample(_three_blobs(), 20_000)
    first = em.fit_batch(x, 3, "mmst", seed=7)
    second = em.fit_batch(x, 3, "mmst", seed=7)
    assert torch.equal(first.mixture.means, second.mixture.means)


@pytest.mark.parametrize("device", DEVICES)
def test_devices_agree(device):
    x = _sample(_three_blobs(), 20_000)
    init = em.kmeans_init(x, 3, "student", seed=0)
    cpu = em.fit_batch(x, 3, init=init, family="student", max_iter=20, tol=0)
    other = em.fit_batch(x.to(device), 3, init=init.to(device), family="student",
                         max_iter=20, tol=0)
    assert torch.allclose(other.mixture.means.cpu(), cpu.mixture.means, atol=1e-4)
    assert abs(other.log_likelihood - cpu.log_likelihood) < 1e-5
