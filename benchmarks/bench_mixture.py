"""Speed, fit and memory of the mixture EM (:mod:`bids_anomaly.models.mixture.em`) against
scikit-learn.

Usage (run by hand, never in CI; about 20 minutes on 2 idle cores, several times longer when
other processes share them)::

    python benchmarks/bench_mixture.py --samples 20000000 --components 5 --json mixture.json

Part 1, speed and fit. ``--samples`` voxels of three channels (T1w, T2w, FLAIR intensities
normalised to white matter ~ 1) are drawn, as float32 from a fixed seed, from a brain-tissue
mixture: CSF, GM, WM and the GM/CSF and GM/WM partial-volume classes, with unequal weights and
correlated channels, plus 1 % of heavy-tailed outliers (a Student-t with 2 degrees of freedom,
truncated to the plausible intensities ``(0, 4]``: an untruncated one puts a few voxels
hundreds of units away, and their Gaussian log-likelihood then dominates every mean) scattered
among them. On these same voxels, with the same number of components, full
scale matrices, ``tol=1e-3`` on the mean log-likelihood per sample and at most 500 iterations:

- scikit-learn's ``GaussianMixture`` on float64 data, given our k-means initialisation
  (``weights_init``, ``means_init``, ``precisions_init``; computed by ``em.kmeans_init`` on a
  random 20 000 voxels), so that the two EM loops are compared and not two initialisations;
  once as installed and once with NumPy's BLAS on 1 thread (its fastest setting on 2 cores);
  a fit still running after ``--sklearn-timeout`` seconds is stopped;
- our batch EM from the same initialisation;
- our batch EM warm-started on a random million voxels (both fits timed together);
- our online EM (3 epochs of 100 000-voxel batches, convergence checked on 200 000 voxels);
- the Student-t and multiple-scaled t families, batch and online (no scikit-learn
  counterpart); a batch fit whose iterations would exceed ``--budget`` seconds is capped;
- scikit-learn with its own k-means initialisation (``init_params="kmeans"``), on all voxels
  when that can finish within ``--budget`` seconds, otherwise on ``--fallback-samples``.

Every fit is scored the same way, outside its timing: ``Mixture.log_prob`` in float64 on all
voxels, averaged (scikit-learn's fit is converted to a
:class:`~bids_anomaly.models.mixture.em.Mixture`; its own ``score`` is reported too).

Part 2, memory against the number of subjects. As many simulated subjects as the largest of
``--subject-counts`` are written as NIfTI (three float32 channels and a uint8 spherical brain
mask, intensities from the same mixture); for each N in ``--subject-counts``, online EM (one
epoch, ``stream_batches`` from the files, 100 000-voxel batches) runs over the first N subjects,
and, for contrast, all of their brain voxels are loaded at once, as batch EM on every voxel
would need.

Each fit and each load runs in its own fresh Python process (this script with a hidden
``--child`` option); its peak memory is the largest resident set of that process, which it reads
itself (``VmHWM`` in ``/proc/self/status``) just before it exits: ``os.wait4``'s ``ru_maxrss``
is no use here, since Linux carries the parent's resident set at the time of the spawn into the
child's (a parent holding 400 MB gives every child a ``ru_maxrss`` of at least 400 MB). The load
average of the machine is recorded before each step. Tables are printed as Markdown and, with
``--json``, written to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from bids_anomaly.models.mixture import em

CHANNELS = ["T1w", "T2w", "FLAIR"]
TISSUES = {
    # name: (weight, mean, standard deviation, correlations (T1w-T2w, T1w-FLAIR, T2w-FLAIR))
    "CSF": (0.12, (0.30, 1.60, 0.35), (0.08, 0.15, 0.08), (-0.3, 0.2, 0.1)),
    "GM": (0.38, (0.70, 0.95, 1.00), (0.06, 0.07, 0.07), (-0.4, -0.2, 0.5)),
    "WM": (0.32, (1.00, 0.70, 0.80), (0.04, 0.05, 0.05), (-0.3, -0.2, 0.4)),
    # partial volume lies along the line between its two tissues, hence strong correlations
    "GM/CSF": (0.08, (0.48, 1.25, 0.65), (0.10, 0.15, 0.12), (-0.8, 0.7, -0.6)),
    "GM/WM": (0.10, (0.85, 0.82, 0.90), (0.06, 0.06, 0.06), (-0.7, -0.6, 0.6)),
}
OUTLIER_FRACTION = 0.01
OUTLIER_DOF = 2.0
OUTLIER_CENTRE = (0.8, 1.0, 0.9)
OUTLIER_SCALE = 0.3
INTENSITY_RANGE = (0.0, 4.0)
INIT_SAMPLES = 20_000
COARSE_SAMPLES = 1_000_000
BATCH_SIZE = 100_000
EVALUATION_SAMPLES = 200_000
EPOCHS = 3
TOL = 1e-3
MAX_ITER = 500
REG = 1e-6
INIT_SUBJECTS = 3
METHODS = {
    # name: (family, kind)
    "sklearn": ("gaussian", "sklearn"),
    "sklearn 1 BLAS thread": ("gaussian", "sklearn-blas1"),
    "batch": ("gaussian", "batch"),
    "coarse-to-fine": ("gaussian", "coarse-to-fine"),
    "online": ("gaussian", "online"),
    "student batch": ("student", "batch"),
    "student online": ("student", "online"),
    "mmst batch": ("mmst", "batch"),
    "mmst online": ("mmst", "online"),
    "sklearn kmeans-init": ("gaussian", "sklearn-kmeans"),
}
LABELS = {
    "sklearn": "scikit-learn GaussianMixture, our init",
    "sklearn 1 BLAS thread": "scikit-learn GaussianMixture, our init, BLAS on 1 thread",
    "batch": "ours, batch EM, gaussian",
    "coarse-to-fine": "ours, batch EM on 1M then all, gaussian",
    "online": "ours, online EM, gaussian",
    "student batch": "ours, batch EM, student",
    "student online": "ours, online EM, student",
    "mmst batch": "ours, batch EM, mmst",
    "mmst online": "ours, online EM, mmst",
    "sklearn kmeans-init": "scikit-learn GaussianMixture, its k-means init",
}


def tissue_mixture() -> em.Mixture:
    """The brain-tissue mixture the voxels are drawn from (float64 Gaussian components)."""
    weights, means, scatter = [], [], []
    for weight, mean, sd, (r12, r13, r23) in TISSUES.values():
        correlation = torch.tensor([[1.0, r12, r13], [r12, 1.0, r23], [r13, r23, 1.0]],
                                   dtype=em.DTYPE)
        sd = torch.tensor(sd, dtype=em.DTYPE)
        weights.append(weight)
        means.append(mean)
        scatter.append(sd[:, None] * correlation * sd[None, :])
    return em.Mixture("gaussian", torch.tensor(weights, dtype=em.DTYPE),
                      torch.tensor(means, dtype=em.DTYPE), torch.stack(scatter))


def simulate_voxels(n_samples: int, seed: int) -> torch.Tensor:
    """``(n_samples, 3)`` float32 tissue intensities with heavy-tailed outliers mixed in."""
    generator = torch.Generator().manual_seed(seed)
    voxels = tissue_mixture().sample(n_samples, generator)
    n_outliers = round(OUTLIER_FRACTION * n_samples)
    heavy_tailed = em.Mixture(
        "student", torch.ones(1, dtype=em.DTYPE),
        torch.tensor([OUTLIER_CENTRE], dtype=em.DTYPE),
        OUTLIER_SCALE ** 2 * torch.eye(3, dtype=em.DTYPE)[None],
        torch.tensor([OUTLIER_DOF], dtype=em.DTYPE),
    )
    outliers = torch.empty(0, 3, dtype=em.DTYPE)
    while len(outliers) < n_outliers:
        drawn = heavy_tailed.sample(2 * n_outliers + 10, generator)
        plausible = ((drawn > INTENSITY_RANGE[0]) & (drawn <= INTENSITY_RANGE[1])).all(dim=1)
        outliers = torch.cat([outliers, drawn[plausible]])
    where = torch.randperm(n_samples, generator=generator)[:n_outliers]
    voxels[where] = outliers[:n_outliers]
    return voxels.float()


def mean_log_likelihood(mixture: em.Mixture, voxels: torch.Tensor) -> float:
    """Mean log-density per voxel, in float64 (the one score every method gets)."""
    return float(mixture.log_prob(voxels).mean())


def initial_mixtures(voxels: torch.Tensor, n_components: int) -> dict[str, dict]:
    """``kmeans_init`` of every family on the same random ``INIT_SAMPLES`` voxels."""
    generator = torch.Generator().manual_seed(0)
    sample = voxels[torch.randperm(len(voxels), generator=generator)[:INIT_SAMPLES]]
    return {family: em.kmeans_init(sample, n_components, family, seed=0).tensors()
            for family in em.FAMILIES}


def fit_sklearn(voxels: np.ndarray, init: em.Mixture | None, n_components: int,
                blas_threads: int | None = None) -> tuple[dict, em.Mixture]:
    """Time scikit-learn's ``GaussianMixture.fit`` (given ``init``, or its k-means init).

    ``blas_threads`` limits NumPy's BLAS: its ``(N, 3) @ (3, 3)`` products, most of the E-step,
    are many times slower on 2 threads than on 1 when other processes share the cores.
    """
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    options = dict(n_components=n_components, covariance_type="full", tol=TOL,
                   max_iter=MAX_ITER, reg_covar=REG, random_state=0)
    if init is not None:
        options.update(weights_init=init.weights.numpy(), means_init=init.means.numpy(),
                       precisions_init=np.linalg.inv(init.scatter.numpy()))
    model = GaussianMixture(**options)
    with threadpool_limits(blas_threads, user_api="blas"):
        start = time.perf_counter()
        model.fit(voxels)
        seconds = time.perf_counter() - start
    fitted = em.Mixture("gaussian", torch.from_numpy(model.weights_),
                        torch.from_numpy(model.means_), torch.from_numpy(model.covariances_))
    return {"seconds": seconds, "iterations": str(model.n_iter_),
            "converged": bool(model.converged_),
            "sklearn_score_fit_data": float(model.score(voxels))}, fitted


def capped_iterations(voxels: torch.Tensor, init: em.Mixture, budget: float) -> tuple[int, float]:
    """Most iterations that fit in ``budget`` seconds, from the time of one E-step."""
    start = time.perf_counter()
    em.e_step(init, voxels)
    per_iteration = time.perf_counter() - start
    # each iteration is one E-step (the M-step is negligible) and the fit ends with one more
    return max(2, min(MAX_ITER, int(budget / per_iteration) - 1)), per_iteration


def run_fit(method: str, work: Path, n_components: int, budget: float,
            samples: int | None) -> dict:
    """One fit of part 1 on the voxels saved in ``work`` (run in a child process)."""
    family, kind = METHODS[method]
    voxels = torch.from_numpy(np.load(work / "voxels.npy"))
    init = em.Mixture.from_tensors(family, torch.load(work / "init.pt")[family])
    row: dict = {"threads": torch.get_num_threads()}
    if kind.startswith("sklearn"):
        fitted_on = voxels if samples is None else voxels[:samples]
        row["fit_samples"] = len(fitted_on)
        result, mixture = fit_sklearn(fitted_on.numpy().astype(np.float64),
                                      None if kind == "sklearn-kmeans" else init, n_components,
                                      1 if kind == "sklearn-blas1" else None)
        row.update(result)
    elif kind == "online":
        result = em.fit_online(em.shuffled_batches(voxels, BATCH_SIZE, 0), init, epochs=EPOCHS,
                               evaluation=voxels[:EVALUATION_SAMPLES], tol=TOL)
        mixture = result.mixture
        row.update(seconds=result.seconds, iterations=f"{result.n_iter} batches",
                   converged=result.converged)
    else:
        max_iter, per_iteration = capped_iterations(voxels, init, budget)
        row.update(max_iter=max_iter, seconds_per_iteration=per_iteration)
        seconds, iterations = 0.0, []
        if kind == "coarse-to-fine":
            generator = torch.Generator().manual_seed(1)
            subset = voxels[torch.randperm(len(voxels), generator=generator)[:COARSE_SAMPLES]]
            coarse = em.fit_batch(subset, n_components, family, init=init, tol=TOL,
                                  max_iter=max_iter, reg=REG)
            init, seconds = coarse.mixture, coarse.seconds
            iterations.append(str(coarse.n_iter))
        result = em.fit_batch(voxels, n_components, family, init=init, tol=TOL,
                              max_iter=max_iter, reg=REG)
        mixture = result.mixture
        iterations.append(str(result.n_iter))
        row.update(seconds=seconds + result.seconds, iterations=" + ".join(iterations),
                   converged=result.converged)
    row["log_likelihood"] = mean_log_likelihood(mixture, voxels)
    return row


def write_subjects(folder: Path, n_subjects: int, shape: int, radius: float) -> int:
    """Simulated subjects (three float32 channels, uint8 mask); returns brain voxels each."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    grid = torch.stack(torch.meshgrid(*[torch.arange(shape)] * 3, indexing="ij"))
    centre = (shape - 1) / 2
    mask = ((grid - centre).square().sum(dim=0) <= radius ** 2)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mask_array = mask.numpy().astype(np.uint8)
    for index in range(n_subjects):
        voxels = simulate_voxels(int(mask.sum()), seed=1000 + index)
        stem = folder / f"sub-{index:04d}"
        nib.save(nib.Nifti1Image(mask_array, affine), f"{stem}_mask.nii.gz")
        for channel, values in zip(CHANNELS, voxels.T, strict=True):
            image = np.zeros((shape,) * 3, dtype=np.float32)
            image[mask_array > 0] = values.numpy()
            nib.save(nib.Nifti1Image(image, affine), f"{stem}_{channel}.nii.gz")
    return int(mask.sum())


def training_data(folder: Path, n_subjects: int):
    """The first ``n_subjects`` simulated subjects as :class:`TrainingData`."""
    from bids_anomaly.models.data import SubjectImages, TrainingData

    subjects = [SubjectImages(f"sub-{index:04d}",
                              [folder / f"sub-{index:04d}_{channel}.nii.gz"
                               for channel in CHANNELS],
                              folder / f"sub-{index:04d}_mask.nii.gz")
                for index in range(n_subjects)]
    return TrainingData(subjects, CHANNELS)


def run_stream(folder: Path, n_subjects: int, n_components: int) -> dict:
    """One epoch of online EM streaming the first ``n_subjects`` from disk (child process)."""
    from bids_anomaly.models.data import valid_voxels
    from bids_anomaly.models.mixture.mixture import stream_batches

    data = training_data(folder, n_subjects)
    first = torch.cat([image[:, valid_voxels(image, mask)].T
                       for image, mask in islice(data, INIT_SUBJECTS)])
    init = em.kmeans_init(first, n_components, "gaussian", seed=0)
    epoch = stream_batches(data, BATCH_SIZE, 0)
    streamed = 0

    def counted_epoch():
        nonlocal streamed
        for batch in epoch():
            streamed += len(batch)
            yield batch

    result = em.fit_online(counted_epoch, init, epochs=1, evaluation=first, tol=TOL)
    return {"voxels": streamed, "seconds": result.seconds, "batches": result.n_iter,
            "log_likelihood_first_subjects": result.log_likelihood}


def run_load(folder: Path, n_subjects: int) -> dict:
    """All brain voxels of the first ``n_subjects`` in memory at once (child process)."""
    from bids_anomaly.models.data import valid_voxels

    start = time.perf_counter()
    voxels = torch.cat([image[:, valid_voxels(image, mask)].T
                        for image, mask in training_data(folder, n_subjects)])
    return {"voxels": len(voxels), "seconds": time.perf_counter() - start,
            "megabytes": voxels.nbytes / 2**20}


def peak_resident_megabytes() -> float:
    """Largest resident set of this process so far (its own, unlike ``ru_maxrss``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (Linux only)")


def measure(arguments: list[str], timeout: float | None = None) -> dict:
    """Run this script as a child; its JSON result with wall seconds and the load before it.

    A child that runs past ``timeout`` seconds is killed and gives ``{"stopped_after": timeout}``.
    """
    command = [sys.executable, __file__, *arguments]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout, process.kill) if timeout else None
    if timer is not None:
        timer.start()
    output = process.stdout.read()
    _, status, _ = os.wait4(process.pid, 0)
    if timer is not None:
        timer.cancel()
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if timer is not None and code == -signal.SIGKILL:
        result = {"stopped_after": timeout}
    elif code != 0:
        raise subprocess.CalledProcessError(code, command)
    else:
        result = json.loads(output.strip().splitlines()[-1])
    return {**result, "process_seconds": wall, "load_average_before": load}


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; floats are printed as given by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_facts() -> dict:
    """Threads and versions the figures depend on."""
    import sklearn
    from threadpoolctl import threadpool_info

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__,
            "python": platform.python_version(), "processor": platform.processor(),
            "blas_threads": {info["internal_api"]: info["num_threads"]
                             for info in threadpool_info()}}


def part_fit(args: argparse.Namespace) -> dict:
    """Part 1: every method on the same simulated voxels."""
    work = args.work / "voxels"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    voxels = simulate_voxels(args.samples, seed=args.seed)
    np.save(work / "voxels.npy", voxels.numpy())
    torch.save(initial_mixtures(voxels, args.components), work / "init.pt")
    truth = mean_log_likelihood(tissue_mixture(), voxels)
    print(f"simulated {args.samples:,} voxels in {time.perf_counter() - start:.0f} s; mean "
          f"log-likelihood under the generating tissue mixture (outliers not modelled) "
          f"{truth:.5f}", flush=True)
    del voxels
    common = ["--work", str(work), "--components", str(args.components),
              "--budget", str(args.budget)]
    rows: dict[str, dict] = {}
    for method in METHODS:
        if method == "sklearn kmeans-init":
            continue
        timeout = args.sklearn_timeout if method.startswith("sklearn") else None
        rows[method] = measure(["--child", "fit", "--method", method, *common], timeout)
        report_progress(method, rows[method])
    if all("stopped_after" in rows[method] for method in ("sklearn", "sklearn 1 BLAS thread")):
        raise SystemExit(f"scikit-learn did not finish within {args.sklearn_timeout} s on "
                         f"{args.samples:,} voxels; rerun with fewer --samples")
    # scikit-learn's own k-means init on all voxels only if it can finish within the budget:
    # its EM alone, from our init, already took rows["sklearn"]["seconds"]
    method = "sklearn kmeans-init"
    rows[method] = {"stopped_after": None}
    if rows["sklearn"].get("seconds", math.inf) < args.budget:
        rows[method] = measure(["--child", "fit", "--method", method, *common], args.budget)
    if "stopped_after" in rows[method]:
        rows[method] = measure(["--child", "fit", "--method", method,
                                "--fit-samples", str(args.fallback_samples), *common])
    report_progress(method, rows[method])
    return {"samples": args.samples, "components": args.components,
            "generating_mixture_log_likelihood": truth, "methods": rows}


def report_progress(method: str, row: dict) -> None:
    """One line per finished step, for whoever watches the run."""
    if "stopped_after" in row:
        print(f"{LABELS[method]}: stopped after {row['stopped_after']} s", flush=True)
        return
    print(f"{LABELS[method]} on {row.get('fit_samples', 'all'):} voxels: {row['seconds']:.1f} "
          f"s, iterations {row['iterations']}, LL {row['log_likelihood']:.5f}, peak "
          f"{row['peak_mb']:.0f} MB, load {row['load_average_before']:.1f}", flush=True)


def fit_table(part: dict) -> str:
    """Markdown table of part 1; speed-ups against both scikit-learn runs from our init."""
    methods = part["methods"]
    references = [methods[name] for name in ("sklearn", "sklearn 1 BLAS thread")]
    reference_ll = next(row["log_likelihood"] for row in references if "seconds" in row)

    def speed_up(reference: dict, row: dict) -> str:
        return f"{reference['seconds'] / row['seconds']:.1f}x" if "seconds" in reference else "-"

    rows = []
    for method, row in methods.items():
        label = LABELS[method]
        if "stopped_after" in row:
            rows.append([label, f"> {row['stopped_after']:.0f} (stopped)"] + ["-"] * 8
                        + [f"{row['load_average_before']:.1f}"])
            continue
        if row.get("fit_samples", part["samples"]) != part["samples"]:
            label += f" (fitted on {row['fit_samples']:,})"
        if not row["converged"] and row.get("max_iter", MAX_ITER) < MAX_ITER:
            label += f" (stopped at the cap of {row['max_iter']} iterations)"
        difference = row["log_likelihood"] - reference_ll
        rows.append([label, f"{row['seconds']:.1f}", row["iterations"],
                     "yes" if row["converged"] else "no", f"{row['log_likelihood']:.5f}",
                     speed_up(references[0], row), speed_up(references[1], row),
                     f"{100 * difference / abs(reference_ll):+.4f}", f"{difference:+.5f}",
                     f"{row['peak_mb']:.0f}", f"{row['load_average_before']:.1f}"])
    return markdown_table(["method", "seconds", "iterations", "converged",
                           "mean log-lik/sample", "speed-up vs sklearn",
                           "speed-up vs sklearn 1 BLAS thread", "rel. LL diff vs sklearn (%)",
                           "LL diff", "peak RSS (MB)", "load avg before"], rows)


def part_stream(args: argparse.Namespace) -> dict:
    """Part 2: streaming online EM and loading everything, against the number of subjects."""
    folder = args.work / "subjects"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    per_subject = write_subjects(folder, max(args.subject_counts), args.shape, args.radius)
    print(f"wrote {max(args.subject_counts)} subjects ({per_subject} brain voxels each) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    baseline = measure(["--child", "baseline"])["peak_mb"]
    rows = []
    for n_subjects in args.subject_counts:
        common = ["--work", str(folder), "--subjects", str(n_subjects)]
        streamed = measure(["--child", "stream", "--components", str(args.components), *common])
        loaded = measure(["--child", "load", *common])
        rows.append({"subjects": n_subjects, "stream": streamed, "load": loaded})
        print(f"{n_subjects} subjects: streamed {streamed['voxels']:,} voxels in "
              f"{streamed['seconds']:.1f} s, peak {streamed['peak_mb']:.0f} MB; loading all "
              f"peaks at {loaded['peak_mb']:.0f} MB", flush=True)
    return {"brain_voxels_per_subject": per_subject, "shape": [args.shape] * 3,
            "import_only_peak_mb": baseline, "counts": rows}


def stream_table(part: dict) -> str:
    """Markdown table of part 2."""
    rows = [[row["subjects"], f"{row['stream']['voxels']:,}", f"{row['stream']['seconds']:.1f}",
             f"{row['stream']['process_seconds']:.1f}", f"{row['stream']['peak_mb']:.0f}",
             f"{row['load']['megabytes']:.0f}", f"{row['load']['peak_mb']:.0f}"]
            for row in part["counts"]]
    return markdown_table(["subjects", "voxels streamed", "online EM s", "process s",
                           "peak RSS streaming (MB)", "voxels in memory (MB)",
                           "peak RSS loading all (MB)"], rows)


def run_child(args: argparse.Namespace) -> None:
    """The hidden ``--child`` modes: one measured step, its result as JSON on stdout."""
    if args.child == "fit":
        result = run_fit(args.method, args.work, args.components, args.budget, args.fit_samples)
    elif args.child == "stream":
        result = run_stream(args.work, args.subjects, args.components)
    elif args.child == "load":
        result = run_load(args.work, args.subjects)
    else:
        import bids_anomaly.models.mixture.mixture  # noqa: F401

        result = {}
    print(json.dumps({**result, "peak_mb": peak_resident_megabytes()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000_000)
    parser.add_argument("--components", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=600.0,
                        help="seconds a batch fit of ours or scikit-learn's own init may take")
    parser.add_argument("--sklearn-timeout", type=float, default=1200.0,
                        help="seconds after which a scikit-learn fit from our init is stopped")
    parser.add_argument("--fallback-samples", type=int, default=2_000_000,
                        help="voxels for scikit-learn's own init when all would exceed budget")
    parser.add_argument("--subject-counts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--shape", type=int, default=32, help="subject grid, voxels per side")
    parser.add_argument("--radius", type=float, default=15.3, help="brain mask radius, voxels")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_mixture"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=["fit", "stream", "load", "baseline"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--subjects", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fit-samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    report: dict = {"command": " ".join(sys.argv), "machine": machine_facts()}
    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    if 1 in args.parts:
        report["fit"] = part_fit(args)
    if 2 in args.parts:
        report["memory"] = part_stream(args)
    if "fit" in report:
        fit = report["fit"]
        print(f"\n## Speed and fit: {fit['samples']:,} voxels x 3 channels, "
              f"K={fit['components']}, tol={TOL}, torch threads "
              f"{report['machine']['torch_threads']}\n")
        print(fit_table(fit))
        scores = ", ".join(f"{row['sklearn_score_fit_data']:.5f}"
                           for row in fit["methods"].values() if "sklearn_score_fit_data" in row)
        print(f"\nMean log-likelihood under the generating mixture (whose tissues do not "
              f"model the outliers): {fit['generating_mixture_log_likelihood']:.5f}; "
              f"scikit-learn's own score(X) of its fits, in table order: {scores}.")
    if "memory" in report:
        memory = report["memory"]
        print(f"\n## Memory against subjects: {memory['brain_voxels_per_subject']:,} brain "
              f"voxels per subject, online EM 1 epoch, batches of {BATCH_SIZE:,}\n")
        print(stream_table(memory))
        print(f"\nA fresh process importing torch and the package peaks at "
              f"{memory['import_only_peak_mb']:.0f} MB.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
