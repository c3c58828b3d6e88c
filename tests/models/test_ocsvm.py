"""Packed one-class SVMs: torch decisions equal scikit-learn's, storage and packing keep them."""

import joblib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.svm import OneClassSVM

from bids_anomaly.models.patch_ocsvm.ocsvm import OneClassSVMs, fit_one_class_svms

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = 1e-5
NU = 0.2


def _queries(rng: np.random.Generator, dim: int, centre: float = 0.0) -> np.ndarray:
    """Points near the training distribution and far outliers, float64."""
    near = centre + rng.standard_normal((150, dim))
    far = centre + 8.0 + 3.0 * rng.standard_normal((30, dim))
    return np.concatenate([near, far, np.full((1, dim), centre + 1e3)])


def _groups(dim: int = 8) -> list[np.ndarray]:
    """Groups of 1 to 120 samples at different places and scales, and a constant group."""
    rng = np.random.default_rng(7)
    sizes_and_scales = [(1, 1.0), (5, 0.5), (30, 2.0), (120, 1.0), (47, 0.1)]
    groups = [(float(index) + scale * rng.standard_normal((size, dim))).astype(np.float32)
              for index, (size, scale) in enumerate(sizes_and_scales)]
    groups.insert(2, np.full((20, dim), 0.3, dtype=np.float32))
    return groups


def _reference(group: np.ndarray, gamma) -> OneClassSVM:
    """scikit-learn's own fit; a constant group is documented to get gamma 1 / D."""
    if gamma == "scale" and np.all(group == group[0]):
        gamma = 1.0 / group.shape[1]
    return OneClassSVM(kernel="rbf", nu=NU, gamma=gamma).fit(group)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", ["scale", 0.05])
def test_one_svm_matches_scikit_learn(gamma, device):
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((300, 16)).astype(np.float32)
    queries = _queries(rng, 16)
    reference = OneClassSVM(kernel="rbf", nu=NU, gamma=gamma).fit(samples)
    expected = reference.decision_function(queries)
    svms = fit_one_class_svms([samples], nu=NU, gamma=gamma).to(device)
    x = torch.from_numpy(queries).to(device)
    every = svms.decision(x)
    assert every.shape == (len(queries), 1) and every.dtype == torch.float64
    assert every.device.type == device
    np.testing.assert_allclose(every[:, 0].cpu().numpy(), expected, rtol=0, atol=TOLERANCE)
    # float32 queries, each row by SVM 0
    each = svms.decision(x.float(), which=torch.zeros(len(queries), dtype=torch.int64))
    np.testing.assert_allclose(each.cpu().numpy(),
                               reference.decision_function(queries.astype(np.float32)),
                               rtol=0, atol=TOLERANCE)
    # the data is non-trivial: inliers inside, the outliers clearly outside
    assert (expected[:150] > 0).mean() > 0.5
    assert (expected[150:] < 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", ["scale", 0.3])
def test_packed_svms_match_scikit_learn_per_group(gamma, device):
    groups = _groups()
    references = [_reference(group, gamma) for group in groups]
    svms = fit_one_class_svms(groups, nu=NU, gamma=gamma).to(device)
    assert svms.n_svms == len(groups) and svms.dim == 8
    assert torch.equal(svms.owner.cpu(), torch.sort(svms.owner.cpu()).values)
    counts = torch.bincount(svms.owner.cpu(), minlength=len(groups))
    assert counts.tolist() == [len(ref.support_vectors_) for ref in references]
    if gamma == "scale":
        assert svms.gamma[2].item() == pytest.approx(1.0 / 8)

    rng = np.random.default_rng(1)
    queries = _queries(rng, 8, centre=2.0)
    expected = np.stack([ref.decision_function(queries) for ref in references], axis=1)
    x = torch.from_numpy(queries).to(device)
    every = svms.decision(x, chunk=7)
    assert every.shape == (len(queries), len(groups))
    np.testing.assert_allclose(every.cpu().numpy(), expected, rtol=0, atol=TOLERANCE)

    which = torch.from_numpy(rng.integers(0, len(groups), len(queries))).to(device)
    each = svms.decision(x, which=which, chunk=7)
    assert each.shape == (len(queries),)
    picked = expected[np.arange(len(queries)), which.cpu().numpy()]
    np.testing.assert_allclose(each.cpu().numpy(), picked, rtol=0, atol=TOLERANCE)


def test_parallel_fit_is_identical_to_serial_and_to_a_list():
    rng = np.random.default_rng(2)
    samples = rng.standard_normal((40, 12, 6)).astype(np.float32) * rng.uniform(0.5, 2, (40, 1, 1))
    serial = fit_one_class_svms(samples, nu=NU, n_jobs=1)
    # threads split and merge the chunks as worker processes do, without the seconds each
    # process takes to start and import torch
    with joblib.parallel_config(backend="threading"):
        parallel = fit_one_class_svms(samples, nu=NU, n_jobs=2)
    listed = fit_one_class_svms(list(samples), nu=NU)
    for name in ("support_vectors", "dual_coef", "owner", "gamma", "offset"):
        assert torch.equal(getattr(serial, name), getattr(parallel, name)), name
        assert torch.equal(getattr(serial, name), getattr(listed, name)), name
    assert serial.n_svms == 40


def test_tensors_round_trip_through_safetensors(tmp_path):
    svms = fit_one_class_svms(_groups(), nu=NU)
    save_file(svms.tensors("voxel_svm"), tmp_path / "weights.safetensors")
    loaded = load_file(tmp_path / "weights.safetensors")
    assert set(loaded) == {f"voxel_svm.{name}" for name in
                           ("support_vectors", "dual_coef", "owner", "gamma", "offset")}
    assert loaded["voxel_svm.support_vectors"].dtype == torch.float32
    assert loaded["voxel_svm.dual_coef"].dtype == torch.float64
    restored = OneClassSVMs.from_tensors(loaded, "voxel_svm")
    x = torch.from_numpy(_queries(np.random.default_rng(3), 8))
    which = torch.arange(len(x)) % svms.n_svms
    assert torch.equal(restored.decision(x), svms.decision(x))
    assert torch.equal(restored.decision(x, which), svms.decision(x, which))


def test_from_tensors_rejects_inconsistent_tensors():
    tensors = fit_one_class_svms(_groups(), nu=NU).tensors("svm")
    short = dict(tensors, **{"svm.dual_coef": tensors["svm.dual_coef"][:-1]})
    with pytest.raises(ValueError, match="dual_coef"):
        OneClassSVMs.from_tensors(short, "svm")
    with pytest.raises(ValueError, match="gamma and offset"):
        OneClassSVMs.from_tensors(dict(tensors, **{"svm.offset": tensors["svm.offset"][:-1]}),
                                  "svm")
    with pytest.raises(ValueError, match="owner"):
        OneClassSVMs.from_tensors(dict(tensors, **{"svm.owner": tensors["svm.owner"].flip(0)}),
                                  "svm")
    with pytest.raises(ValueError, match="missing"):
        OneClassSVMs.from_tensors(tensors, "other")


def test_concatenate_shifts_owners_and_equals_one_fit():
    groups = _groups()
    whole = fit_one_class_svms(groups, nu=NU)
    first, second = fit_one_class_svms(groups[:2], nu=NU), fit_one_class_svms(groups[2:], nu=NU)
    joined = OneClassSVMs.concatenate([first, second])
    assert joined.n_svms == len(groups)
    assert torch.equal(joined.owner, torch.cat([first.owner, second.owner + 2]))
    for name in ("support_vectors", "dual_coef", "owner", "gamma", "offset"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    other = fit_one_class_svms([np.zeros((3, 4), np.float32) + np.arange(4)], nu=NU)
    with pytest.raises(ValueError, match="dimensions"):
        OneClassSVMs.concatenate([first, other])


@pytest.mark.parametrize("nu", [0.0, -0.1, 1.5])
def test_bad_nu_is_rejected(nu):
    with pytest.raises(ValueError, match="nu must be in"):
        fit_one_class_svms([np.ones((5, 3))], nu=nu)


def test_bad_groups_are_rejected():
    with pytest.raises(ValueError, match="group 1 must be"):
        fit_one_class_svms([np.ones((5, 3)), np.empty((0, 3))], nu=NU)
    with pytest.raises(ValueError, match="group 1 has 2 features"):
        fit_one_class_svms([np.ones((5, 3)), np.ones((5, 2))], nu=NU)
    with pytest.raises(ValueError, match="at least one sample"):
        fit_one_class_svms(np.empty((4, 0, 3)), nu=NU)
    with pytest.raises(ValueError, match="no groups"):
        fit_one_class_svms([], nu=NU)
    with pytest.raises(ValueError, match="not finite"):
        fit_one_class_svms([np.ones((5, 3)), np.full((5, 3), np.nan)], nu=NU)
    with pytest.raises(ValueError, match="gamma"):
        fit_one_class_svms([np.random.default_rng(0).random((5, 3))], nu=NU, gamma="auto")


def test_decision_rejects_wrong_shapes_and_indices():
    svms = fit_one_class_svms(_groups(), nu=NU)
    with pytest.raises(ValueError, match="x must be"):
        svms.decision(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="which must index"):
        svms.decision(torch.zeros(2, 8), which=torch.tensor([0, svms.n_svms]))
    with pytest.raises(ValueError, match="one SVM per row"):
        svms.decision(torch.zeros(2, 8), which=torch.tensor([0]))
