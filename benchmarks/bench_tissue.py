"""Seconds and memory of the tissue model per subject, at 1 and 2 mm, beside the peer's.

Usage (by hand, never in CI; needs preprocessed derivatives of the real dataset at each
resolution, ``bids_anomaly ../shared/data/bids_real DERIV participant [--resolution 1]``)::

    python benchmarks/bench_tissue.py --derivatives 2=DERIV2 1=DERIV1 --subject mslub26 \
        [--samseg-times /work/runs/samseg/times.tsv] [--threads 1 2] [--repeats 3]

What is timed is what ``participant --single-subject tissue`` runs after preprocessing: loading
the channels, fitting the subject's mixture, the posteriors, the healthy draws, growth and the
``-log10 p`` map (:meth:`TissueModel.score_with_posteriors`); the median of ``--repeats`` runs
in this process, with the machine's load average beside it (a shared machine inflates
seconds). The peer's seconds are read from the times table ``benchmarks/samseg_peer.py`` writes.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from bids_anomaly import bids
from bids_anomaly.imaging.template import TEMPLATE_NAME, get_template
from bids_anomaly.models import SubjectImages, TissueModel, TrainingData

CHANNELS = ("T1w", "FLAIR", "T2w")


def subject(derivatives: Path, label: str, resolution: int, channels: list[str]
            ) -> SubjectImages:
    """The preprocessed channels and brain mask of one subject at one resolution."""
    paths = [bids.spec_path(derivatives, label, None, bids.preproc_spec(TEMPLATE_NAME,
                                                                        resolution, c))
             for c in channels]
    mask = bids.spec_path(derivatives, label, None, bids.brain_mask_spec(TEMPLATE_NAME,
                                                                         resolution))
    return SubjectImages(f"sub-{label}", paths, mask)


def time_subject(images: SubjectImages, channels: list[str], resolution: int, threads: int,
                 repeats: int, template_dir: Path) -> dict:
    """Median seconds (load + score) of ``repeats`` runs and the brain's voxel count."""
    torch.set_num_threads(threads)
    template = get_template(resolution, template_dir)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        image, mask = images.load()
        model = TissueModel()
        model.fit(TrainingData([images], channels,
                               tissues=[template.probseg[t] for t in ("GM", "WM", "CSF")]))
        model.score_with_posteriors(image, mask)
        seconds.append(time.perf_counter() - start)
    return {"resolution_mm": resolution, "threads": threads, "channels": "+".join(channels),
            "brain_voxels": int(mask.sum()), "median_s": round(statistics.median(seconds), 1),
            "min_s": round(min(seconds), 1), "iterations": model.subject_report["iterations"],
            "load_average": round(os.getloadavg()[0], 2)}


def main() -> None:
    """Time the tissue model and print a Markdown table (peer seconds beside it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--derivatives", nargs="+", required=True, metavar="RES=DIR")
    parser.add_argument("--subject", default="mslub26")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samseg-times", type=Path)
    parser.add_argument("--template-dir", type=Path, default=Path("/tmp/bench_tissue_templates"))
    args = parser.parse_args()
    rows = []
    for item in args.derivatives:
        resolution, folder = item.split("=", 1)
        for channels in (list(CHANNELS), ["T1w", "FLAIR"], ["FLAIR"]):
            images = subject(Path(folder), args.subject, int(resolution), channels)
            for threads in args.threads:
                rows.append(time_subject(images, channels, int(resolution), threads,
                                         args.repeats, args.template_dir))
                print(rows[-1], flush=True)
    print(f"\npeak memory of this process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB\n")
    print("| resolution | channels | threads | brain voxels | median s | min s | EM iterations "
          "| load average |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['resolution_mm']} mm | {row['channels']} | {row['threads']} | "
              f"{row['brain_voxels']:,} | {row['median_s']} | {row['min_s']} | "
              f"{row['iterations']} | {row['load_average']} |")
    if args.samseg_times and args.samseg_times.is_file():
        with args.samseg_times.open() as stream:
            for row in csv.DictReader(stream, delimiter="\t"):
                print(f"\npeer SAMSEG 0.4a0 lesion mode, {row['run']}: {row['seconds']} s on "
                      f"{row['threads']} threads ({row['inputs']})")


if __name__ == "__main__":
    main()
