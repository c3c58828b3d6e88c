"""How far apart two identical participant runs end, by thread count (run by hand, never in CI).

Usage::

    python benchmarks/bench_reproducibility.py ../shared/data/bids_real /tmp/repro \\
        --participant-label mslub26 --threads 1 2

For each thread count, the participant level runs twice into fresh folders with the same seed.
Every derivative is compared: byte-identical or not, and for images the largest absolute
difference and its median and 99th percentile over the voxels that are non-zero in either run
(normalised intensity units for the preprocessed images) and, for masks, how many voxels changed.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def run(bids: Path, out: Path, labels: list[str], threads: int, seed: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bids_anomaly", str(bids), str(out), "participant",
                    "-w", str(out.parent / "work"), "--participant-label", *labels,
                    "--nprocs", "1", "--omp-nthreads", str(threads), "--random-seed", str(seed)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def compare(first: Path, second: Path) -> list[dict]:
    rows = []
    for path in sorted(first.rglob("*")):
        if not path.is_file() or "logs" in path.relative_to(first).parts:
            continue
        other = second / path.relative_to(first)
        row = {"file": str(path.relative_to(first)),
               "identical": hashlib.sha256(path.read_bytes()).digest()
               == hashlib.sha256(other.read_bytes()).digest()}
        if path.name.endswith(".nii.gz") and not row["identical"]:
            a = np.asarray(nib.load(path).dataobj, dtype=np.float64)
            b = np.asarray(nib.load(other).dataobj, dtype=np.float64)
            difference = np.abs(a - b)
            inside = (a != 0) | (b != 0)
            row["max_abs_diff"] = float(difference.max())
            row["median_abs_diff"] = float(np.median(difference[inside]))
            row["p99_abs_diff"] = float(np.percentile(difference[inside], 99))
            if path.name.endswith("_mask.nii.gz"):
                row["mask_voxels_changed"] = int(((a > 0) != (b > 0)).sum())
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--participant-label", nargs="+", required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--random-seed", type=int, default=0)
    args = parser.parse_args()
    for threads in args.threads:
        outs = [args.output_dir / f"threads{threads}-run{i}" / "out" for i in (1, 2)]
        seconds = [run(args.bids_dir, out, args.participant_label, threads, args.random_seed)
                   for out in outs]
        rows = compare(*outs)
        identical = sum(row["identical"] for row in rows)
        print(f"\n## --omp-nthreads {threads}: {identical}/{len(rows)} files byte-identical "
              f"(runs {seconds[0]:.0f} s and {seconds[1]:.0f} s)")
        for row in rows:
            if not row["identical"]:
                details = ", ".join(f"{k} {v:.3g}" for k, v in row.items()
                                    if k not in ("file", "identical"))
                print(f"- {row['file']}: {details or 'bytes differ'}")


if __name__ == "__main__":
    main()
