"""The subject-level Parkinson's protocol on a generated FA/MD cohort, per model family.

Usage (run by hand, never in CI)::

    python benchmarks/bench_parkinson.py /tmp/bench_parkinson --splits 5 --threads 2

A cohort of 30 controls and 30 patients (:func:`bids_anomaly.simulation.synthetic.diffusion_cohort`:
FA 5 % lower and MD 5 % higher in two small deep grey nuclei, 8 % inter-subject variation per voxel)
is written once. For each family and each of ``--splits`` age/sex-balanced splits of the controls
(20 training, 10 held out), the model is fitted on the training controls' scaled FA and MD
(``--channel-scaling auto``: 1st-99th percentiles of the fitted subjects), calibrated on 20 % of
them, scores everybody, and the group protocol (:func:`bids_anomaly.evaluation.protocol.
split_protocol`) separates the patients from the held-out controls by the % of voxels above the 98th
percentile of the training controls' scores, in the whole brain and in the nuclei. The global (2D
slice) autoencoder against the siamese patch autoencoder with a voxel-wise one-class SVM is the MLCN
2021 comparison; the MD intensity baseline (a per-subject robust z-score of MD) runs in the same
table.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from bids_anomaly import bids
from bids_anomaly.evaluation.group import find_anomaly_maps
from bids_anomaly.evaluation.protocol import SplitModel, split_protocol
from bids_anomaly.evaluation.splits import split_controls
from bids_anomaly.models import REGISTRY
from bids_anomaly.models.data import SubjectImages, TrainingData, fit_channel_scaling
from bids_anomaly.models.deep.engine import EngineOptions
from bids_anomaly.postprocessing.thresholds import healthy_scores, threshold_at_fpr
from bids_anomaly.simulation.synthetic import diffusion_cohort

CHANNELS = ["FA", "MD"]


def families(args, cache: Path) -> dict[str, object]:
    """The compared models: a new, unfitted one per call."""
    training = EngineOptions(epochs=args.epochs, batch_size=16, patience=args.epochs,
                             num_workers=0, seed=args.seed, precision="auto")
    return {
        "baseline MD hyper z": lambda: REGISTRY["intensity"](channel=1, direction="hyper"),
        "normative": lambda: REGISTRY["normative"](),
        "gmm (K by BIC)": lambda: REGISTRY["gmm"](n_components="auto", max_components=6,
                                                  random_seed=args.seed),
        "ae 2d (global)": lambda: REGISTRY["ae"](mode="2d", width=16, training=training,
                                                 cache_dir=cache),
        "patch-ocsvm voxel (siamese patches)": lambda: REGISTRY["patch-ocsvm"](
            latent_model="voxel", patch_side=7, pairs_per_subject=2000, code_size=16,
            training=dataclasses.replace(training, batch_size=1000), cache_dir=cache,
            n_jobs=args.threads, random_seed=args.seed),
    }


def subject(root: Path, cohort, label: str) -> SubjectImages:
    """A participant's preprocessed FA and MD, as the train level reads them."""
    return SubjectImages(
        f"sub-{label}",
        [bids.spec_path(root, label, None, bids.preproc_spec(cohort.space, cohort.resolution, c))
         for c in CHANNELS],
        bids.spec_path(root, label, None, bids.brain_mask_spec(cohort.space, cohort.resolution)))


def run_family(name: str, new_model, cohort, root: Path, out: Path, splits, args) -> pd.DataFrame:
    """Fit, calibrate and score per split; the protocol's median and IQR rows."""
    models = []
    for index, (train, test) in enumerate(splits, start=1):
        data = TrainingData([subject(root, cohort, x) for x in train], CHANNELS,
                            regions=args.dseg)
        fit, calibration = data.split(0.2, args.seed)
        scaling = fit_channel_scaling(fit, "auto")
        fit, calibration = fit.scaled(scaling), calibration.scaled(scaling)
        torch.manual_seed(args.seed)
        split_model = new_model()
        split_model.fit(fit)
        threshold = threshold_at_fpr(healthy_scores(split_model, calibration), 0.001)
        desc = bids.model_desc(f"{name}-split{index:02d}")
        everybody = TrainingData([subject(root, cohort, x) for x in cohort.groups],
                                 CHANNELS).scaled(scaling)
        with torch.no_grad():
            for label, images in zip(cohort.groups, everybody.subjects, strict=True):
                score = split_model.score(*images.load()).numpy().astype(np.float32)
                path = bids.spec_path(out, label, None, bids.anomaly_map_spec(
                    cohort.space, cohort.resolution, desc))
                path.parent.mkdir(parents=True, exist_ok=True)
                nib.Nifti1Image(score, np.diag([cohort.resolution] * 3 + [1.0])).to_filename(
                    path)
        models.append(SplitModel(f"{name}-split{index:02d}", index, threshold,
                                 frozenset(f"sub-{x}" for x in train),
                                 frozenset(f"sub-{x}" for x in test)))
    # the brain masks the protocol reads sit beside the maps
    for label in cohort.groups:
        source = bids.spec_path(root, label, None, bids.brain_mask_spec(cohort.space,
                                                                         cohort.resolution))
        target = bids.spec_path(out, label, None, bids.brain_mask_spec(cohort.space,
                                                                        cohort.resolution))
        if not target.exists():
            target.symlink_to(source)
    tables = split_protocol(out, models, find_anomaly_maps(out),
                            {f"sub-{x}": g for x, g in cohort.groups.items()}, "control",
                            "percentile", 98.0, cohort.tissue, cohort.nuclei.astype(np.int64),
                            {1: "nuclei"})
    regions = tables["splitregions"]
    return regions[regions["split"].isin(["median", "iqr"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scratch", type=Path)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", help="only these (first word of the label)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.scratch / "cohort"
    cohort = diffusion_cohort(root)
    args.dseg = args.scratch / "dseg.nii.gz"
    nib.Nifti1Image(cohort.tissue, np.diag([cohort.resolution] * 3 + [1.0])).to_filename(
        args.dseg)
    rng = np.random.default_rng(3)
    controls = [x for x, g in cohort.groups.items() if g == "control"]
    table = pd.DataFrame({"label": controls,
                          "age": rng.integers(55, 80, len(controls)).astype(str),
                          "sex": rng.choice(["M", "F"], len(controls))})
    splits = split_controls(table, args.splits, 10, args.seed)
    rows = []
    for name, new_model in families(args, args.scratch / "cache").items():
        if args.families and name.split()[0] not in args.families:
            continue
        start = time.perf_counter()
        out = args.scratch / bids.model_desc(name)
        summary = run_family(bids.model_desc(name), new_model, cohort, root, out, splits, args)
        seconds = time.perf_counter() - start
        for region in ("brain", "atlas:nuclei"):
            median = summary[(summary["split"] == "median") & (summary["region"] == region)]
            iqr = summary[(summary["split"] == "iqr") & (summary["region"] == region)]
            rows.append({"model": name, "region": region,
                         "AUROC median": median["auroc"].iloc[0],
                         "AUROC IQR": iqr["auroc"].iloc[0],
                         "g-mean median": median["gmean"].iloc[0],
                         "g-mean IQR": iqr["gmean"].iloc[0],
                         "seconds (all splits)": round(seconds)})
        print(pd.DataFrame(rows).round(3).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
