"""Many RBF one-class SVMs: fitted by scikit-learn's libsvm, stored as tensors, evaluated in torch.

Each SVM is fitted by :class:`sklearn.svm.OneClassSVM` (libsvm's one-class solver of Schölkopf et
al. 2001) and kept only as what its decision function needs, in one packed
:class:`OneClassSVMs` for any number of SVMs:

``support_vectors`` ``(S, D)`` float32
    The support vectors of every SVM, concatenated and grouped by SVM.
``dual_coef`` ``(S,)`` float64
    libsvm's alphas (scikit-learn's ``dual_coef_``), ``0 < alpha_i <= 1`` and summing to
    ``nu * n_m`` for an SVM fitted on ``n_m`` samples.
``owner`` ``(S,)`` int64
    The SVM each support vector belongs to, sorted ascending.
``gamma``, ``offset`` ``(M,)`` float64
    The RBF width and scikit-learn's ``offset_`` (libsvm's ``rho``) of each SVM.

The decision function of SVM ``m`` at ``x`` is exactly scikit-learn's
``OneClassSVM.decision_function``::

    decision_m(x) = sum_{i : owner_i = m} alpha_i * exp(-gamma_m * ||x - s_i||^2) - offset_m

positive inside the support of the training samples, negative outside. It is computed in
float64 on the device of ``x``.

Why tensors and no pickle: a pickled estimator runs code when it is loaded and only loads with
a compatible scikit-learn version, whereas these five tensors go into ``weights.safetensors``
with the rest of a model, load anywhere without scikit-learn and move to a GPU, where hundreds
of thousands of SVMs are evaluated in a few batched tensor operations instead of one Python
call each. Samples are rounded to float32 before fitting, so that the float32 support vectors
are exactly those libsvm used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch

GammaSpec = float | str
"""An RBF width: a positive float, or ``"scale"``: ``1 / (n_features * X.var())`` per SVM."""
DTYPE = torch.float64
FIELDS = ("support_vectors", "dual_coef", "owner", "gamma", "offset")
BLOCK_ELEMENTS = 1 << 24
"""Elements of the largest intermediate float64 tensor of :meth:`OneClassSVMs.decision`
(128 MiB): rows are evaluated in blocks no larger than this."""
MAX_GROUPS_PER_TASK = 4096
"""Most groups fitted by one joblib task (bounds the data sent to and from a worker)."""
TASKS_PER_WORKER = 4


@dataclass
class OneClassSVMs:
    """M RBF one-class SVMs in packed form: the support vectors of all SVMs concatenated.

    Attributes
    ----------
    support_vectors : torch.Tensor
        ``(S, D)`` float32, grouped by owner (owner ascending).
    dual_coef : torch.Tensor
        ``(S,)`` float64, libsvm's alphas (scikit-learn's ``dual_coef_``).
    owner : torch.Tensor
        ``(S,)`` int64, index of the SVM each support vector belongs to, sorted ascending.
    gamma : torch.Tensor
        ``(M,)`` float64 RBF widths.
    offset : torch.Tensor
        ``(M,)`` float64, scikit-learn's ``offset_``: ``decision = sum_i alpha_i K(x, sv_i) -
        offset``.
    """

    support_vectors: torch.Tensor
    dual_coef: torch.Tensor
    owner: torch.Tensor
    gamma: torch.Tensor
    offset: torch.Tensor

    def __post_init__(self) -> None:
        n_vectors = self.support_vectors.shape[0]
        if self.support_vectors.ndim != 2:
            raise ValueError("support_vectors must be (S, D), not of shape "
                             f"{tuple(self.support_vectors.shape)}")
        for name in ("dual_coef", "owner"):
            if tuple(getattr(self, name).shape) != (n_vectors,):
                raise ValueError(f"{name} must have one entry per support vector ({n_vectors}), "
                                 f"not shape {tuple(getattr(self, name).shape)}")
        if self.gamma.ndim != 1 or self.offset.shape != self.gamma.shape:
            raise ValueError(f"gamma and offset must both be (M,), not "
                             f"{tuple(self.gamma.shape)} and {tuple(self.offset.shape)}")

    @property
    def n_svms(self) -> int:
        """Number of SVMs M."""
        return int(self.gamma.shape[0])

    @property
    def dim(self) -> int:
        """Dimension D of the samples."""
        return int(self.support_vectors.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.support_vectors.device

    def to(self, device: torch.device | str) -> OneClassSVMs:
        """A copy on ``device`` (the same tensors where they are there already)."""
        return OneClassSVMs(*(getattr(self, name).to(device) for name in FIELDS))

    def decision(self, x: torch.Tensor, which: torch.Tensor | None = None,
                 chunk: int = 65536) -> torch.Tensor:
        """scikit-learn's ``decision_function`` of the SVMs at the rows of ``x``.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, D)`` points, any float dtype; the SVMs are moved to its device (move them once
            with :meth:`to` to avoid a copy per call).
        which : torch.Tensor, optional
            ``(N,)`` integer indices: row ``i`` is evaluated by SVM ``which[i]`` only. By
            default every SVM evaluates every row.
        chunk : int
            Rows per chunk. With ``which``, each chunk's support vectors are gathered into a
            ``(rows, P, D)`` tensor padded to the largest count ``P`` in the chunk (padding has
            zero weight); rows are further split so that no intermediate tensor exceeds
            :data:`BLOCK_ELEMENTS`.

        Returns
        -------
        torch.Tensor
            float64 on ``x``'s device: ``(N, M)`` without ``which``, ``(N,)`` with it.

        Raises
        ------
        ValueError
            ``x`` is not ``(N, D)``, ``which`` is not ``(N,)`` or names a missing SVM, or
            ``chunk`` is not positive.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (N, {self.dim}), not of shape {tuple(x.shape)}")
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of rows, not {chunk}")
        svms = self if self.device == x.device else self.to(x.device)
        if which is None:
            return svms._decision_all(x, chunk)
        if tuple(which.shape) != (x.shape[0],):
            raise ValueError(f"which must be ({x.shape[0]},), one SVM per row of x, not of "
                             f"shape {tuple(which.shape)}")
        which = which.to(device=x.device, dtype=torch.int64)
        if len(which) and (int(which.min()) < 0 or int(which.max()) >= self.n_svms):
            raise ValueError(f"which must index SVMs 0 to {self.n_svms - 1}, not "
                             f"{int(which.min())} to {int(which.max())}")
        return svms._decision_which(x, which, chunk)

    def _decision_all(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """``(N, M)`` decisions: every SVM at every row."""
        out = torch.empty(x.shape[0], self.n_svms, dtype=DTYPE, device=x.device)
        vectors = self.support_vectors.to(DTYPE)
        # distances by ||x||^2 + ||s||^2 - 2 x.s on centred coordinates, where the expansion
        # loses fewer digits; one matrix product per block
        centre = vectors.mean(dim=0) if len(vectors) else vectors.new_zeros(self.dim)
        vectors = vectors - centre
        vector_norms = vectors.square().sum(dim=1)
        weights = self.dual_coef.to(DTYPE)
        gamma = self.gamma[self.owner]
        rows = max(1, min(chunk, BLOCK_ELEMENTS // max(len(vectors), 1)))
        for start in range(0, x.shape[0], rows):
            block = x[start:start + rows].to(DTYPE) - centre
            distance = (block.square().sum(dim=1, keepdim=True) + vector_norms
                        - 2.0 * block @ vectors.T).clamp_min_(0.0)
            kernel = torch.exp(-gamma * distance) * weights
            total = torch.zeros(len(block), self.n_svms, dtype=DTYPE, device=x.device)
            out[start:start + rows] = total.index_add_(1, self.owner, kernel) - self.offset
        return out

    def _decision_which(self, x: torch.Tensor, which: torch.Tensor, chunk: int) -> torch.Tensor:
        """``(N,)`` decisions: row ``i`` by SVM ``which[i]``."""
        out = torch.empty(x.shape[0], dtype=DTYPE, device=x.device)
        counts = torch.bincount(self.owner, minlength=self.n_svms)
        starts = torch.cumsum(counts, dim=0) - counts
        for begin in range(0, x.shape[0], chunk):
            owners = which[begin:begin + chunk]
            width = int(counts[owners].max())
            rows = max(1, BLOCK_ELEMENTS // max(width * self.dim, 1))
            for start in range(begin, begin + len(owners), rows):
                block_owners = which[start:start + rows]
                if width == 0:
                    out[start:start + rows] = -self.offset[block_owners]
                    continue
                slots = torch.arange(width, device=x.device)
                valid = slots < counts[block_owners, None]
                index = torch.where(valid, starts[block_owners, None] + slots, 0)
                vectors = self.support_vectors[index].to(DTYPE)
                block = x[start:start + rows].to(DTYPE)
                distance = (vectors - block[:, None, :]).square().sum(dim=2)
                weights = torch.where(valid, self.dual_coef[index], 0.0)
                kernel = torch.exp(-self.gamma[block_owners, None] * distance)
                out[start:start + rows] = ((weights * kernel).sum(dim=1)
                                           - self.offset[block_owners])
        return out

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The five tensors as ``{f"{prefix}.{field}": tensor}`` (for safetensors)."""
        return {f"{prefix}.{name}": getattr(self, name).contiguous() for name in FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> OneClassSVMs:
        """Inverse of :meth:`tensors`.

        Raises
        ------
        ValueError
            A tensor is missing, the shapes disagree, or ``owner`` is not sorted or names a
            missing SVM.
        """
        missing = [f"{prefix}.{name}" for name in FIELDS if f"{prefix}.{name}" not in tensors]
        if missing:
            raise ValueError(f"the one-class SVM tensors {missing} are missing")
        dtypes = (torch.float32, DTYPE, torch.int64, DTYPE, DTYPE)
        svms = cls(*(tensors[f"{prefix}.{name}"].to(dtype)
                     for name, dtype in zip(FIELDS, dtypes, strict=True)))
        owner = svms.owner
        if len(owner) and (bool((owner[1:] < owner[:-1]).any()) or int(owner[0]) < 0
                           or int(owner[-1]) >= svms.n_svms):
            raise ValueError(f"{prefix}.owner must be sorted and index SVMs 0 to "
                             f"{svms.n_svms - 1}")
        return svms

    @classmethod
    def concatenate(cls, parts: Sequence[OneClassSVMs]) -> OneClassSVMs:
        """One packed set of the SVMs of ``parts``, in order (later parts' indices shifted).

        Raises
        ------
        ValueError
            No parts, or parts of different dimensions.
        """
        if not parts:
            raise ValueError("concatenate needs at least one set of SVMs")
        dims = {part.dim for part in parts}
        if len(dims) > 1:
            raise ValueError(f"cannot concatenate SVMs of different dimensions {sorted(dims)}")
        shifts = np.cumsum([0] + [part.n_svms for part in parts[:-1]])
        return cls(
            torch.cat([part.support_vectors for part in parts]),
            torch.cat([part.dual_coef for part in parts]),
            torch.cat([part.owner + int(shift) for part, shift in zip(parts, shifts, strict=True)]),
            torch.cat([part.gamma for part in parts]),
            torch.cat([part.offset for part in parts]),
        )


def fit_one_class_svms(samples: Sequence[np.ndarray] | np.ndarray, nu: float,
                       gamma: GammaSpec = "scale", n_jobs: int = 1,
                       tol: float = 1e-3) -> OneClassSVMs:
    """Fit one ``OneClassSVM(kernel="rbf", nu=nu, gamma=gamma)`` per group of samples.

    Parameters
    ----------
    samples : sequence of numpy.ndarray or numpy.ndarray
        The groups, each ``(n_i, D)`` with ``n_i >= 1``; a 3-D array ``(M, n, D)`` is ``M``
        groups of ``n`` samples. Values are rounded to float32 (the precision of the stored
        support vectors) and fitted in float64.
    nu : float
        In (0, 1]: an upper bound on the fraction of training samples outside the boundary
        and a lower bound on the fraction of support vectors.
    gamma : float or "scale"
        RBF width; ``"scale"`` is scikit-learn's ``1 / (D * X.var())``, computed per group on
        its own samples. A group whose samples are all identical (variance 0, a single sample
        included) gets ``1 / D`` instead: scikit-learn would use 1, or, where rounding leaves a
        variance of order 1e-34, an absurdly large width.
    n_jobs : int
        joblib workers; groups are fitted in chunks, one chunk per task. libsvm's one-class
        solver is deterministic, so the result does not depend on ``n_jobs``. Worth it for
        thousands of groups: a worker process takes seconds to start (it imports torch).
    tol : float
        libsvm's stopping tolerance.

    Returns
    -------
    OneClassSVMs
        SVM ``m`` is fitted on ``samples[m]``.

    Raises
    ------
    ValueError
        No groups, a group that is empty, not 2-D, of another dimension or not finite, ``nu``
        outside (0, 1], a non-positive ``gamma`` or ``tol``, or an unknown gamma name.
    """
    if not isinstance(nu, Real) or not 0.0 < nu <= 1.0:
        raise ValueError(f"nu must be in (0, 1] (the fraction of outliers allowed), not {nu!r}")
    if isinstance(gamma, str):
        if gamma != "scale":
            raise ValueError(f"gamma must be a positive float or 'scale', not {gamma!r}")
    elif not isinstance(gamma, Real) or not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive float or 'scale', not {gamma!r}")
    if not isinstance(tol, Real) or not tol > 0:
        raise ValueError(f"tol must be positive, not {tol!r}")
    if isinstance(samples, np.ndarray) and samples.ndim != 3:
        raise ValueError(f"an array of samples must be (M, n, D) groups, not of shape "
                         f"{samples.shape}; pass one group as [X]")
    n_groups = len(samples)
    if n_groups == 0:
        raise ValueError("no groups of samples to fit one-class SVMs on")
    dim = _check_groups(samples)

    from joblib import Parallel, delayed, effective_n_jobs

    workers = effective_n_jobs(n_jobs)
    per_task = max(1, min(MAX_GROUPS_PER_TASK,
                          math.ceil(n_groups / (TASKS_PER_WORKER * workers))))
    bounds = [(start, min(start + per_task, n_groups)) for start in range(0, n_groups, per_task)]
    if workers == 1 or len(bounds) == 1:
        parts = [_fit_groups(samples, 0, nu, gamma, tol)]
    else:
        parts = Parallel(n_jobs=n_jobs)(
            delayed(_fit_groups)(samples[start:stop], start, nu, gamma, tol)
            for start, stop in bounds)
    vectors, weights, counts, widths, offsets = (np.concatenate(arrays)
                                                 for arrays in zip(*parts, strict=True))
    return OneClassSVMs(
        torch.from_numpy(vectors.reshape(-1, dim)),
        torch.from_numpy(weights),
        torch.repeat_interleave(torch.arange(n_groups), torch.from_numpy(counts)),
        torch.from_numpy(widths),
        torch.from_numpy(offsets),
    )


def _check_groups(samples: Sequence[np.ndarray] | np.ndarray) -> int:
    """The common dimension D of the groups; ValueError for an empty or misshapen group."""
    if isinstance(samples, np.ndarray):
        if samples.shape[1] == 0 or samples.shape[2] == 0:
            raise ValueError(f"every group needs at least one sample of at least one feature; "
                             f"the samples are of shape {samples.shape}")
        return int(samples.shape[2])
    dim = None
    for index, group in enumerate(samples):
        shape = np.shape(group)
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"group {index} must be (n_i, D) with at least one sample, not of "
                             f"shape {shape}")
        if dim is None:
            dim = shape[1]
        elif shape[1] != dim:
            raise ValueError(f"group {index} has {shape[1]} features, group 0 has {dim}")
    return int(dim)


def _fit_groups(groups: Sequence[np.ndarray] | np.ndarray, first: int, nu: float,
                gamma: GammaSpec, tol: float) -> tuple[np.ndarray, ...]:
    """Fit one SVM per group (one joblib task).

    Returns the support vectors (float32, concatenated), dual coefficients, number of support
    vectors, gamma and offset of each group. ``first`` is the index of ``groups[0]`` among all
    groups, for error messages.
    """
    import sklearn
    from sklearn.svm import OneClassSVM

    vectors, weights, counts, widths, offsets = [], [], [], [], []
    # the arguments are checked once by the caller: scikit-learn's per-call validation would
    # cost several times the fit of a tiny group
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        for index, group in enumerate(groups):
            values = np.asarray(group, dtype=np.float32).astype(np.float64)
            if not np.isfinite(values).all():
                raise ValueError(f"group {first + index} has values that are not finite (or "
                                 f"beyond the float32 range)")
            width = _scale_gamma(values) if isinstance(gamma, str) else float(gamma)
            model = OneClassSVM(kernel="rbf", nu=nu, gamma=width, tol=tol).fit(values)
            vectors.append(model.support_vectors_.astype(np.float32))
            weights.append(model.dual_coef_[0])
            counts.append(len(model.support_vectors_))
            widths.append(width)
            offsets.append(model.offset_[0])
    return (np.concatenate(vectors), np.concatenate(weights), np.asarray(counts, np.int64),
            np.asarray(widths, np.float64), np.asarray(offsets, np.float64))


def _scale_gamma(values: np.ndarray) -> float:
    """scikit-learn's ``gamma="scale"``, ``1 / D`` for a group without spread."""
    variance = values.var()
    if variance > 0 and (values != values[0]).any():
        return 1.0 / (values.shape[1] * variance)
    return 1.0 / values.shape[1]
