"""Wall time and peak memory of each level on the real scans (run by hand, never in CI).

Usage::

    python benchmarks/bench_skeleton.py ../shared/data/bids_real /tmp/bench --nprocs 2

Each step runs as its own process (as a user would run it); peak memory is the largest resident
set of that process and its children. Steps run in order on one output folder, so the train step
reuses the preprocessing of the first steps, and the last step is a rerun with everything cached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path


def measure(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return (wall seconds, peak RSS in GiB of the process tree)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    # wait4 gives this step's own usage; RUSAGE_CHILDREN would be the maximum over every
    # step run so far
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), command)
    return wall, usage.ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--nprocs", default="2")
    args = parser.parse_args()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    base = ["bids_anomaly", str(args.bids_dir), str(args.output_dir)]
    common = ["--nprocs", args.nprocs]
    healthy = ["IXI012", "IXI013", "IXI014", "IXI015", "IXI033", "IXI034", "IXI039", "IXI048",
               "IXI049", "IXI051"]
    steps = [
        ("preprocess IXI012 (T1w, 2 mm)", [*base, "participant", "--participant-label",
                                            "IXI012", *common]),
        ("preprocess mslubL01 (2 sessions, T1w+T2w+FLAIR raw)",
         [*base, "participant", "--participant-label", "mslubL01", *common]),
        ("preprocess the other 9 IXI", [*base, "participant", "--participant-label",
                                        *healthy[1:], *common]),
        ("train normative on 10 IXI (preprocessing cached)",
         [*base, "train", "--model-type", "normative", "--train-filter", "group=healthy",
          "--model-name", "ixi", *common]),
        ("score IXI012 + mslubL01 with it", [*base, "participant", "--participant-label",
                                            "IXI012", "mslubL01", "--model", "ixi", *common]),
        ("rerun preprocess IXI012 (cached)", [*base, "participant", "--participant-label",
                                              "IXI012", *common]),
    ]
    print(f"{'step':55s} {'wall s':>8s} {'peak GiB':>9s}")
    for name, command in steps:
        wall, peak = measure(command)
        print(f"{name:55s} {wall:8.1f} {peak:9.2f}", flush=True)


if __name__ == "__main__":
    main()
