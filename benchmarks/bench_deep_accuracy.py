"""Voxel-wise accuracy of the deep models, side by side with the mixtures and the baselines.

Usage (run by hand, never in CI)::

    python benchmarks/bench_deep_accuracy.py --derivatives /tmp/allreal \
        --shapes ../shared/data/lesion_shapes --demo /tmp/demo [--epochs 20] [--json out.json]

Two experiments, each a Markdown table of voxel AUROC, AUPRC, oracle Dice, Dice at the
calibrated threshold (the ``1 - fpr`` quantile of held-out healthy scores):

A. The synthetic-lesion protocol of ``bench_mixture_accuracy.py`` (experiment A there): healthy
   IXI T1w split with a fixed seed into 5 to fit, 2 to calibrate and 3 to test, the test
   subjects with real MS (3 shapes) or stroke (1 shape) lesions inserted.
demo. The data of ``bids_anomaly demo DIR`` (run it first): 8 healthy controls (6 fit, 2
   calibrate) and 3 patients with synthetic lesions and ground-truth masks, all channels.

The deep models are trained with the same engine as ``train`` (early stopping on held-out
fitting subjects, default architectures), on CPU unless ``--device cuda``: 2D for ``--epochs``
(20), 3D for ``--epochs-3d`` (6) epochs of 16 patches of 64^3 voxels per subject.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_mixture_accuracy import (
    HEALTHY,
    N_CALIBRATION,
    N_FIT,
    Case,
    MixtureSettings,
    Row,
    evaluate,
    lesioned_cases,
    markdown_table,
    new_mixture,
    subject_images,
)

from bids_anomaly.evaluation.ground_truth import find_ground_truth, truth_in_template
from bids_anomaly.models import REGISTRY, AnomalyModel, IntensityBaseline, NormativeModel
from bids_anomaly.models.base import TrainingData, valid_voxels
from bids_anomaly.models.deep.engine import EngineOptions
from bids_anomaly.postprocessing.thresholds import healthy_scores, threshold_at_fpr
from bids_anomaly.template import TEMPLATE_NAME, Template, get_template

DEEP_VARIANTS = (("ae", "2d"), ("vae", "2d"), ("vqvae", "2d"), ("vit-ae", "2d"),
                 ("dae", "2d"), ("dae", "3d"))


def deep_model(model_type: str, mode: str, args: argparse.Namespace, cache: Path):
    """A deep model with the benchmark's training options (3D: ``--epochs-3d``)."""
    epochs = args.epochs_3d if mode == "3d" else args.epochs
    training = EngineOptions(epochs=epochs, batch_size=args.batch_size,
                             patience=args.patience, num_workers=args.num_workers,
                             seed=args.seed, precision="auto")
    return REGISTRY[model_type](mode=mode, training=training, cache_dir=cache,
                                   patch_size=64, patches_per_volume=args.patches_per_volume)


def compare(fit: TrainingData, calibration: TrainingData, kinds: dict[str, list[Case]],
            args: argparse.Namespace, baseline: AnomalyModel, cache: Path, split: str
            ) -> dict[str, list[Row]]:
    """Fit every model on ``fit``, calibrate on ``calibration``, evaluate on each case list."""
    tables: dict[str, list[Row]] = {kind: [] for kind in kinds}

    def add(label: str, model: AnomalyModel, seconds: float, extra: dict | None = None) -> None:
        threshold = threshold_at_fpr(healthy_scores(model, calibration), args.fpr)
        summary = {}
        for kind, cases in kinds.items():
            metrics = evaluate(model, cases, threshold)
            tables[kind].append(Row(label, metrics, threshold, "held-out healthy",
                                    {"split": split, "fit_seconds": round(seconds, 1),
                                     **(extra or {})}))
            summary[kind] = {k: round(metrics[k], 4) for k in ("auroc", "auprc", "oracle_dice",
                                                                "dice")}
        print(f"  {label} ({seconds:.0f} s): {json.dumps(summary)}", flush=True)

    references: list[tuple[str, AnomalyModel]] = [("baseline", baseline),
                                                  ("normative", NormativeModel())]
    mixture_settings = MixtureSettings("auto", 5, 6, 300_000, 0, args.seed)
    for model_type in ("gmm", "tmm"):
        model = new_mixture(model_type, mixture_settings, "auto", per_tissue=True)
        references.append((f"{model_type} per tissue (K by BIC)", model))
    for label, model in references if not args.skip_references else []:
        start = time.perf_counter()
        model.fit(fit)
        add(label, model, time.perf_counter() - start)
    for model_type, mode in DEEP_VARIANTS:
        if args.variants and f"{model_type}:{mode}" not in args.variants:
            continue
        model = deep_model(model_type, mode, args, cache)
        start = time.perf_counter()
        model.fit(dataclasses.replace(fit, device=args.device))  # returns the network on CPU
        report = model.fit_report
        add(f"{model_type} {mode}", model, time.perf_counter() - start,
            {"best_epoch": report["best_epoch"], "epochs_run": report["epochs_run"],
             "parameters": report["parameters"]})
    return tables


def run_ixi(args: argparse.Namespace, template: Template, cache: Path) -> dict[str, list[Row]]:
    """Experiment A: synthetic lesions in held-out IXI T1w."""
    order = sorted(HEALTHY)
    random.Random(args.seed).shuffle(order)
    subjects = [subject_images(args.derivatives, s, None, ["T1w"]) for s in order]
    fit = TrainingData(subjects[:N_FIT], ["T1w"], regions=template.dseg)
    calibration = TrainingData(subjects[N_FIT:N_FIT + N_CALIBRATION], ["T1w"])
    test = subjects[N_FIT + N_CALIBRATION:]
    kinds = {kind: lesioned_cases(test, args.shapes, kind, template, args.seed)
             for kind in ("ms", "stroke")}
    split = (f"fit {', '.join(fit.names)}; calibrate {', '.join(calibration.names)}; "
             f"test {', '.join(s.name for s in test)}")
    print(f"A: {split}", flush=True)
    tables = compare(fit, calibration, kinds, args, IntensityBaseline(0, "hypo"), cache, split)
    return {f"A. synthetic {kind} lesions in IXI T1w (3 test subjects)": rows
            for kind, rows in tables.items()}


def run_demo(args: argparse.Namespace, template: Template, cache: Path) -> dict[str, list[Row]]:
    """The demo dataset: healthy controls to fit and calibrate, patients to test."""
    raw = args.demo / "rawdata"
    derivatives = args.demo / "derivatives" / "bids_anomaly"
    card = json.loads((derivatives / "models" / "model-gmm" / "model.json").read_text())
    channels = card["channels"]
    healthy = sorted(p.name[4:] for p in raw.glob("sub-healthy*"))
    patients = sorted(p.name[4:] for p in raw.glob("sub-patient*"))
    subjects = [subject_images(derivatives, s, None, channels) for s in healthy]
    n_calibration = 2
    fit = TrainingData(subjects[:-n_calibration], channels, regions=template.dseg)
    calibration = TrainingData(subjects[-n_calibration:], channels)
    cases = []
    for subject in patients:
        images = subject_images(derivatives, subject, None, channels)
        anat = derivatives / f"sub-{subject}" / "anat"
        transform = anat / f"sub-{subject}_from-T1w_to-{TEMPLATE_NAME}_mode-image_xfm.h5"
        truth_file = find_ground_truth(raw / "derivatives" / "lesion_masks", subject, None)
        truth = truth_in_template(truth_file, images.mask,
                                  {"T1w": raw / f"sub-{subject}" / "anat" /
                                   f"sub-{subject}_T1w.nii.gz"}, {"T1w": [transform]})
        image, mask = images.load()
        cases.append(Case(images.name, image, mask, truth, valid_voxels(image, mask).numpy()))
    split = (f"fit {', '.join(fit.names)}; calibrate {', '.join(calibration.names)}; "
             f"test {', '.join(c.name for c in cases)}")
    print(f"demo: {split} ({', '.join(channels)})", flush=True)
    baseline = IntensityBaseline(channels.index("FLAIR") if "FLAIR" in channels else 0, "hyper")
    tables = compare(fit, calibration, {"demo": cases}, args, baseline, cache, split)
    return {f"demo. synthetic lesions, {', '.join(channels)} (3 patients)": tables["demo"]}


def main() -> None:
    """Run the experiments and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--derivatives", type=Path, help="preprocessed real dataset (A)")
    parser.add_argument("--shapes", type=Path, help="lesion shape collection (A)")
    parser.add_argument("--demo", type=Path, help="folder of a finished bids_anomaly demo")
    parser.add_argument("--experiments", default="A,demo")
    parser.add_argument("--variants", nargs="+", default=[], metavar="TYPE:MODE",
                        help="deep variants to run, e.g. ae:2d dae:3d (default: all)")
    parser.add_argument("--skip-references", action="store_true",
                        help="only the deep models (not the baseline, normative, mixtures)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--epochs-3d", type=int, default=6)
    parser.add_argument("--patches-per-volume", type=int, default=16)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fpr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "bids_anomaly_bench_templates")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    template = get_template(2, args.template_dir)
    cache = Path(tempfile.mkdtemp(prefix="bench_deep_cache_"))
    tables: dict[str, list[Row]] = {}
    start = time.perf_counter()
    experiments = args.experiments.split(",")
    if "demo" in experiments:
        tables.update(run_demo(args, template, cache))
    if "A" in experiments:
        tables.update(run_ixi(args, template, cache))
    print(f"\nepochs {args.epochs} (patience {args.patience}), batch {args.batch_size}, fpr "
          f"{args.fpr}, device {args.device}, {torch.get_num_threads()} threads; total "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    for title, rows in tables.items():
        print(f"\n### {title}\n\n{markdown_table(rows)}")
    if args.json:
        args.json.write_text(json.dumps(
            {"tables": {t: [asdict(r) for r in rows] for t, rows in tables.items()}},
            indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
