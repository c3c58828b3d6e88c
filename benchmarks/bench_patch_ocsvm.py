"""Fit and score time, and peak memory, of the patch autoencoder + one-class models at scale.

Usage (run by hand on an idle machine, never in CI)::

    python benchmarks/bench_patch_ocsvm.py [--subjects 10 100] [--device cpu|cuda] \
        [--pairs-per-subject 1000] [--epochs 1] [--json out.json]

Each cohort size runs in its own process (so that its peak memory is its own): that many
generated subjects on the 2 mm template grid (99 x 117 x 95, an ellipsoid brain of smooth random
intensities, 2 channels; :func:`bench_deep.generated_subject`) are written as NIfTI, the siamese
autoencoder is trained (``--epochs`` of ``--pairs-per-subject`` pairs per subject: the
representation's training time scales with the pairs, reported per pair), then each latent model
is fitted on the same autoencoder (the voxel-wise OC-SVMs: one per brain voxel, in ``--jobs``
processes) and one subject is scored (median of ``--repeats``). Peak memory is the process's
maximum resident set size plus the largest of its worker processes'.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_deep import GRID_2MM, generated_subject

from bids_anomaly.models import REGISTRY, TrainingData
from bids_anomaly.models.deep.engine import EngineOptions

VARIANTS = ("voxel", "global", "patient", "mmst")


def peak_memory_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def one_cohort(args) -> dict:
    """Everything for one cohort size, in this process."""
    device = torch.device(args.device)
    folder = Path(tempfile.mkdtemp(prefix="bench_patch_ocsvm_"))
    subjects = [generated_subject(folder, i, GRID_2MM, 2) for i in range(args.one)]
    data = TrainingData(subjects, ["c0", "c1"], device)
    brain_voxels = int(subjects[0].load()[1].sum())
    training = EngineOptions(epochs=args.epochs, batch_size=1000, num_workers=args.workers,
                             patience=0, seed=0)
    model = REGISTRY["patch-ocsvm"](latent_model="patient", pairs_per_subject=args.pairs,
                                    training=training, cache_dir=folder / "cache",
                                    n_jobs=args.jobs)
    start = time.perf_counter()
    model.fit(data)  # the patient variant learns nothing but the autoencoder
    train_seconds = time.perf_counter() - start
    image, mask = subjects[0].load(device)
    row = {"subjects": args.one, "brain_voxels": brain_voxels, "device": str(device),
           "pairs": args.one * args.pairs * args.epochs,
           "autoencoder_seconds": round(train_seconds, 1),
           "pairs_per_second": round(args.one * args.pairs * args.epochs / train_seconds),
           "variants": {}}
    for variant in VARIANTS:
        start = time.perf_counter()
        fitted = model if variant == "patient" else model.with_latent_model(variant, data)
        fit_seconds = time.perf_counter() - start if variant != "patient" else 0.0
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fitted.score(image, mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        latent = fitted.fit_report.get("latent")
        row["variants"][variant] = {"fit_seconds": round(fit_seconds, 1),
                                    "score_seconds": round(statistics.median(times), 2),
                                    **(latent if isinstance(latent, dict) else {})}
        print(json.dumps({variant: row["variants"][variant]}), flush=True)
    own, children = peak_memory_mb()
    row["peak_memory_mb"] = round(own)
    row["peak_worker_memory_mb"] = round(children)
    return row


def main() -> None:
    """Run each cohort size in a child process; print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs-per-subject", dest="pairs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_cohort(args)), flush=True)
        return
    rows = []
    for n in args.subjects:
        command = [sys.executable, __file__, "--one", str(n), "--device", args.device,
                   "--pairs-per-subject", str(args.pairs), "--epochs", str(args.epochs),
                   "--workers", str(args.workers), "--jobs", str(args.jobs),
                   "--repeats", str(args.repeats)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        print(output, flush=True)
        rows.append(json.loads(output.split("RESULT ", 1)[1]))
    print(f"\n{rows[0]['device']}, {torch.get_num_threads()} threads, {args.jobs} SVM "
          f"processes, autoencoder {args.epochs} epoch(s) of {args.pairs} pairs per subject\n")
    print("| subjects | brain voxels | autoencoder s (pairs/s) | variant | latent fit s | "
          "score s/subject | peak MB (workers) |\n|---|---|---|---|---|---|---|")
    for row in rows:
        for variant, values in row["variants"].items():
            print(f"| {row['subjects']} | {row['brain_voxels']:,} | "
                  f"{row['autoencoder_seconds']} ({row['pairs_per_second']:,}) | {variant} | "
                  f"{values['fit_seconds']} | {values['score_seconds']} | "
                  f"{row['peak_memory_mb']:,} ({row['peak_worker_memory_mb']:,}) |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
