"""Speed of the deep models: training samples per second, data waiting, inference per subject.

Every registered deep family is timed by default: the reconstruction autoencoders and the
self-supervised ``segment`` and ``restore`` models (their synthetic anomalies are generated
inside the data loader workers, so the data wait includes the generator).

Usage (run by hand on an idle machine, never in CI)::

    python benchmarks/bench_deep.py [--device cpu|cuda] [--types ae dae] [--modes 2d 3d] \
        [--subjects 6] [--channels 2] [--num-workers 2] [--json out.json]

Subjects are generated volumes on the template grid at 2 mm (99 x 117 x 95: an ellipsoid
brain of smooth random intensities, ``--channels`` channels), written as NIfTI and read
through the same cache and data loaders as ``train``. Each model type and mode is trained for
``--epochs`` epochs with the default architecture; the last epoch gives the training samples
per second and the share of the epoch spent waiting for the data loader. Inference is timed on
one whole subject at 2 mm and on a 1 mm grid (197 x 233 x 189, the network rebuilt for it),
after one warm-up call, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from bids_anomaly.models import REGISTRY, DeepModel, SubjectImages, TrainingData
from bids_anomaly.models.deep.engine import EngineOptions
from bids_anomaly.models.deep.networks import Architecture

GRID_2MM = (99, 117, 95)
GRID_1MM = (197, 233, 189)


def generated_subject(folder: Path, index: int, shape: tuple[int, ...], channels: int
                      ) -> SubjectImages:
    """An ellipsoid 'brain' with smooth random intensities (robust-z-like scale)."""
    rng = np.random.default_rng(index)
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = (sum(a ** 2 / r ** 2 for a, r in zip(axes, (0.8, 0.85, 0.8), strict=True)) <= 1)
    paths = []
    for c in range(channels):
        data = gaussian_filter(rng.normal(size=shape), 2.0) * 8 * mask
        path = folder / f"sub-{index}_c{c}.nii.gz"
        nib.Nifti1Image(data.astype(np.float32), np.eye(4)).to_filename(path)
        paths.append(path)
    mask_path = folder / f"sub-{index}_mask.nii.gz"
    nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)).to_filename(mask_path)
    return SubjectImages(f"sub-{index}", paths, mask_path)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings would otherwise stop early)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_inference(model, image: torch.Tensor, mask: torch.Tensor, repeats: int,
                   device: torch.device) -> float:
    """Median seconds of ``model.score`` on one subject (after a warm-up call)."""
    model.score(image, mask)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.score(image, mask)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def for_grid(model, grid: tuple[int, ...]):
    """The same kind of model with its (untrained) network built for another grid."""
    architecture = model.network.architecture
    other = type(model)(**{k: v for k, v in model.hyperparameters.items()
                           if k not in ("training", "architecture", "image_shape")},
                        training=model.training)
    other.image_shape = grid
    shape = other._input_shape(grid)
    fields = {**architecture.__dict__, "input_shape": shape}
    other.network = other._new_network(Architecture(**fields))
    return other


def main() -> None:
    """Train and time every requested model type and mode; print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--types", nargs="+", default=[
        t for t, c in REGISTRY.items() if issubclass(c, DeepModel)])
    parser.add_argument("--modes", nargs="+", default=["2d", "3d"])
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-1mm", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    folder = Path(tempfile.mkdtemp(prefix="bench_deep_"))
    subjects = [generated_subject(folder, i, GRID_2MM, args.channels)
                for i in range(args.subjects)]
    data = TrainingData(subjects, [f"c{c}" for c in range(args.channels)], device)
    image, mask = subjects[0].load(device)
    big = generated_subject(folder, 99, GRID_1MM, args.channels).load(device)
    rows = []
    for model_type in args.types:
        for mode in args.modes:
            training = EngineOptions(epochs=args.epochs, batch_size=args.batch_size,
                                     num_workers=args.num_workers, patience=0,
                                     precision=args.precision)
            model = REGISTRY[model_type](mode=mode, training=training,
                                            cache_dir=folder / "cache")
            model.fit(data)
            last = model.fit_report["history"][-1]
            model.network.to(device)
            infer_2mm = time_inference(model, image, mask, args.repeats, device)
            infer_1mm = float("nan")
            if not args.skip_1mm:
                infer_1mm = time_inference(for_grid(model, GRID_1MM), *big, args.repeats,
                                           device)
            row = {"type": model_type, "mode": mode,
                   "parameters": model.fit_report["parameters"],
                   "samples_per_second": last["samples_per_second"],
                   "data_wait_fraction": last["data_wait_fraction"],
                   "inference_2mm_s": round(infer_2mm, 3), "inference_1mm_s": round(infer_1mm, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.num_workers} workers, precision {args.precision}, {args.channels} channels, "
          f"{args.subjects} subjects, epoch {args.epochs} of {args.epochs}\n")
    print("| type | mode | parameters | train samples/s | data wait | inference 2 mm (s) | "
          "inference 1 mm (s) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['mode']} | {r['parameters']:,} | "
              f"{r['samples_per_second']:.1f} | {100 * r['data_wait_fraction']:.1f} % | "
              f"{r['inference_2mm_s']:.2f} | {r['inference_1mm_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
