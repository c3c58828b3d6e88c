"""Learning curves of weak supervision: what each annotated subject buys, leave-one-subject-out.

Usage (run by hand, never in CI; the real dataset preprocessed as for ``bench_accuracy.py`` and a
demo run with several patients, e.g. ``bids_anomaly demo DEMO --healthy 4 --patients 6``)::

    python benchmarks/bench_weak.py --derivatives DERIV --shapes ../shared/data/lesion_shapes \
        --demo DEMO --out benchmarks/results/weak

Per protocol, the label-free models are fitted on its controls and calibrated at ``--fpr`` on
held-out controls, as in the leaderboard. Its labelled subjects form a pool; each is held out in
turn, and k = 1, 2, ... of the others are "annotated" (every subset, or ``--subsets`` of them
drawn at random, per k). On the annotated ones, as ``train --annotations`` does:

- ``tuned <model>``: the label-free model's threshold, minimum cluster size and restriction
  tuned for mean Dice;
- ``stacked``: the stacked classifier (gradient-boosted trees over the label-free models'
  calibrated scores, intensities, z-scores and anatomy) fitted on the controls and the annotated
  subjects, its post-processing tuned on out-of-fold maps (k >= 2; at k = 1 the probability
  0.5), exactly as the train level does.

The held-out subject's Dice (and lesion-wise F1) at the result's post-processing is averaged
over held-out subjects and subsets. Reference lines: each label-free model at its calibrated
threshold (k = 0), and the oracle of the intensity baseline (the best Dice any threshold of the
FLAIR / T2w / T1w z-score reaches on the held-out subject itself, i.e. label-tuned on the test
subject).

Protocols: ``demo`` (T1w + FLAIR; fit 3 controls, calibrate 1; the patients), ``ixi-ms`` and
``ixi-stroke`` (IXI T1w; fit 5, calibrate 2; 3 subjects with inserted MS or stroke lesions of
the held-out shape half; ``ixi-ms`` also tests sub-mslub26's real T1w, never annotated, with the
IXI cases as annotations), ``real-t2w`` (T2w of sub-mslub26 and sub-stroke01, the only real
labelled scans, each annotated for the other; models fitted on three mslubL sessions and
calibrated on the fourth, a cohort with unlabelled MS lesions).
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from bench_accuracy import (
    DIRECTIONS,
    STROKE_TRAIN_SHAPES,
    Protocol,
    add_common_arguments,
    baseline_for,
    demo,
    ixi,
    models_for,
    patient_case,
    split_shapes,
)
from bench_mixture_accuracy import COHORT, Case, subject_images

from bids_anomaly.evaluation.metrics import dice, lesion_metrics, voxel_metrics
from bids_anomaly.imaging.template import Template, get_template
from bids_anomaly.models import (
    REGISTRY,
    EnsembleModel,
    StackedModel,
    SubjectImages,
    TrainingData,
)
from bids_anomaly.postprocessing.thresholds import healthy_scores, tail_table, threshold_at_fpr
from bids_anomaly.postprocessing.tuning import (
    Grid,
    apply_postprocessing,
    choose,
    subject_table,
    threshold_grid,
)

PROTOCOLS = ("demo", "ixi-ms", "ixi-stroke", "real-t2w", "mslub26-flair")


@dataclass
class Pool:
    """A protocol: controls, labelled subjects, and tests that are never annotated."""

    name: str
    fit: TrainingData
    calibration: TrainingData
    cases: list[Case]
    kind: str
    note: str
    extra: list[Case] = field(default_factory=list)
    shapes: list[Path] = field(default_factory=list)
    loso: bool = True


def pools(args, template: Template) -> list[Pool]:
    """The protocols asked for."""
    shapes = split_shapes(args.shapes)
    out = []
    tissues = [template.probseg[t] for t in ("GM", "WM", "CSF")]
    if "demo" in args.protocols and args.demo is not None:
        protocol = demo(args, template, shapes)
        out.append(Pool("demo", protocol.fit, protocol.calibration, protocol.tests["demo"], "ms",
                        protocol.note, shapes=protocol.shapes))
    if {"ixi-ms", "ixi-stroke"} & set(args.protocols):
        protocol = ixi(args, template, shapes)
        mslub26 = patient_case(args, "mslub26", ["T1w"], "T1w")
        for kind in ("ms", "stroke"):
            if f"ixi-{kind}" in args.protocols:
                out.append(Pool(f"ixi-{kind}", protocol.fit, protocol.calibration,
                                protocol.tests[kind], kind, protocol.note,
                                [mslub26] if kind == "ms" else [], protocol.shapes))
    if "real-t2w" in args.protocols:
        sessions = [subject_images(args.derivatives, s, ses, ["T2w"]) for s, ses in COHORT]
        cases = [patient_case(args, "mslub26", ["T2w"], "T1w"),
                 patient_case(args, "stroke01", ["T2w"], "T2w")]
        out.append(Pool("real-t2w", TrainingData(sessions[:-1], ["T2w"], regions=template.dseg),
                        TrainingData(sessions[-1:], ["T2w"]), cases, "ms",
                        "T2w; fit 3 mslubL sessions, calibrate the 4th (unlabelled lesions)",
                        shapes=shapes["ms"]["train"] + shapes["stroke"]["train"][
                            :STROKE_TRAIN_SHAPES]))
    if "mslub26-flair" in args.protocols and args.demo is not None:
        channels = ["T1w", "FLAIR"]
        sessions = [subject_images(args.derivatives, s, ses, channels) for s, ses in COHORT]
        patients = demo(args, template, shapes).tests["demo"]
        out.append(Pool(
            "mslub26-flair", TrainingData(sessions[:-1], channels, regions=template.dseg),
            TrainingData(sessions[-1:], channels), patients, "ms",
            "T1w + FLAIR; fit 3 mslubL sessions, calibrate the 4th (unlabelled lesions); the "
            "demo's synthetic patients annotated, the real sub-mslub26 tested",
            [patient_case(args, "mslub26", channels, "T1w")], shapes["ms"]["train"],
            loso=False))
    for pool in out:
        pool.fit.tissues = tissues
    return out


def case_subject(case: Case, folder: Path, affine: np.ndarray, channels: list[str],
                 annotated: bool) -> SubjectImages:
    """Write a case's images (lesions inserted in memory for the IXI cases) as NIfTI files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, channel in enumerate(channels):
        path = folder / f"{case.name}_{channel}.nii.gz"
        if not path.exists():
            nib.Nifti1Image(case.image[index].numpy(), affine).to_filename(path)
        paths.append(path)
    mask = folder / f"{case.name}_mask.nii.gz"
    lesion = folder / f"{case.name}_lesion.nii.gz"
    if not mask.exists():
        nib.Nifti1Image(case.mask.numpy().astype(np.uint8), affine).to_filename(mask)
        nib.Nifti1Image((case.truth > 0.5).astype(np.uint8), affine).to_filename(lesion)
    return SubjectImages(case.name, paths, mask, lesion if annotated else None)


def subsets(others: list[int], k: int, limit: int, seed: int) -> list[tuple[int, ...]]:
    """Every k-subset of ``others``, or ``limit`` of them drawn at random."""
    every = list(itertools.combinations(others, k))
    if len(every) <= limit:
        return every
    return random.Random(seed).sample(every, limit)


def held_out_metrics(mask: np.ndarray, truth: np.ndarray) -> dict:
    """Dice and lesion-wise F1 of a written mask."""
    lesions = lesion_metrics(mask, truth)
    recall = lesions["lesion_sensitivity"]
    precision = lesions["cluster_precision"]
    f1 = (2 * recall * precision / (recall + precision)
          if lesions["n_clusters"] and recall + precision > 0 else 0.0)
    return {"dice": dice(mask, truth), "lesion_f1": f1}


def run_pool(pool: Pool, args, template: Template, folder: Path) -> list[dict]:
    """The learning curves of one protocol."""
    print(f"{pool.name}: {pool.note}; {len(pool.cases)} labelled subjects"
          + (f", {len(pool.extra)} extra test(s)" if pool.extra else ""), flush=True)
    channels = pool.fit.channels
    tissue = np.asarray(nib.load(template.dseg).dataobj).astype(np.int64)
    affine = nib.load(pool.fit.subjects[0].mask).affine
    directions = [f"{c}:{s}" for c, s in DIRECTIONS[pool.kind].items() if c in channels]
    baseline_label, baseline = baseline_for(channels)
    label_free = {baseline_label: baseline, "normative": REGISTRY["normative"](),
                  "normative directed": REGISTRY["normative"](direction=directions)}
    if args.segment:  # the self-supervised network of the leaderboard, with its settings
        protocol = Protocol(pool.name, pool.fit, pool.calibration, {}, pool.kind, pool.note,
                            pool.shapes)
        label_free.update((label, model) for label, model in models_for(protocol, args, folder)
                          if label.startswith("segment"))
    calibrated = {}
    for label, model in label_free.items():
        start = time.perf_counter()
        model.fit(pool.fit)
        scores = healthy_scores(model, pool.calibration)
        calibrated[label] = (model, threshold_at_fpr(scores, args.fpr), tail_table(scores))
        print(f"  {label} fitted and calibrated in {time.perf_counter() - start:.0f} s",
              flush=True)
    members = [label for label in calibrated if label != "normative"]
    if len(members) > 2:  # the leaderboard's ensemble of the directional and deep models
        ensemble = EnsembleModel(combine="mean")
        for label in members[1:]:
            model, _, tail = calibrated[label]
            ensemble.add(label, model, channels, tail)
        ensemble.fit(pool.fit)
        scores = healthy_scores(ensemble, pool.calibration)
        calibrated["ensemble (normative directed + segment)"] = (
            ensemble, threshold_at_fpr(scores, args.fpr), tail_table(scores))
    everyone = pool.cases + pool.extra
    truths = [c.truth > 0.5 for c in everyone]
    brains = [c.mask.numpy() for c in everyone]
    maps = {label: [model.score(c.image, c.mask).numpy() for c in everyone]
            for label, (model, _, _) in calibrated.items()}
    rows = []

    def record(method: str, k: int, held: int, values: dict, subset=()) -> None:
        rows.append({"protocol": pool.name, "method": method, "k": k,
                     "held_out": everyone[held].name,
                     "role": "labelled" if held < n else "never annotated",
                     "annotated": " ".join(everyone[i].name for i in subset), **values})

    n = len(pool.cases)
    tests = list(range(len(everyone)))
    if not pool.loso:  # the labelled subjects only annotate: only the others are tested
        tests = list(range(n, len(everyone)))
    for held in tests:  # k = 0: label-free at the calibrated threshold; the baseline's oracle
        for label, (_, threshold, _) in calibrated.items():
            mask = apply_postprocessing(maps[label][held], brains[held], tissue, threshold)
            record(label, 0, held, held_out_metrics(mask, truths[held]))
        oracle = voxel_metrics(maps[baseline_label][held][brains[held] | truths[held]],
                               truths[held][brains[held] | truths[held]], threshold=0.0)
        record(f"{baseline_label} oracle", 0, held, {"dice": oracle["oracle_dice"],
                                                     "lesion_f1": np.nan})
    # tuned post-processing: one table per subject on a protocol-wide grid
    for label in (baseline_label, *members[1:]):
        grid = Grid(["brain", "wm"], threshold_grid(
            [m[b] for m, b in zip(maps[label], brains, strict=True)],
            extra=(calibrated[label][1],)))
        tables = [subject_table(c.name, maps[label][i], truths[i], brains[i], tissue, grid)
                  for i, c in enumerate(everyone)]
        for held in tests:
            others = [i for i in range(n) if i != held]
            for k in range(1, len(others) + 1):
                for subset in subsets(others, k, args.tuning_subsets, args.seed + held):
                    choice, _ = choose([tables[i] for i in subset], grid, "dice")
                    mask = apply_postprocessing(maps[label][held], brains[held], tissue,
                                                choice.threshold, choice.min_cluster_voxels,
                                                choice.restrict)
                    record(f"tuned {label}", k, held, held_out_metrics(mask, truths[held]),
                           subset)
    # stacking, as the train level fits and tunes it
    subjects = [case_subject(c, folder / pool.name, affine, channels, True) for c in everyone]
    for held in tests if not args.skip_stacking else []:
        others = [i for i in range(n) if i != held]
        for k in range(1, len(others) + 1):
            for subset in subsets(others, k, args.subsets, args.seed + held):
                start = time.perf_counter()
                stacked = StackedModel(healthy_voxels=args.healthy_voxels,
                                       random_seed=args.seed)
                for label in members:
                    model, _, tail = calibrated[label]
                    stacked.members.add(label, model, channels, tail)
                data = TrainingData(pool.fit.subjects + [subjects[i] for i in subset],
                                    channels, regions=template.dseg,
                                    tissues=pool.fit.tissues)
                stacked.fit(data)
                score = stacked.score(everyone[held].image, everyone[held].mask).numpy()
                threshold, minimum, restrict = 0.5, 1, "brain"
                if k >= 2:
                    folds = stacked.out_of_fold_scores(data)
                    grid = Grid(["brain", "wm"], threshold_grid(
                        [folds[subjects[i].name][brains[i]] for i in subset]))
                    tables = [subject_table(subjects[i].name, folds[subjects[i].name],
                                            truths[i], brains[i], tissue, grid) for i in subset]
                    choice, _ = choose(tables, grid, "dice")
                    threshold, minimum, restrict = (choice.threshold, choice.min_cluster_voxels,
                                                    choice.restrict)
                mask = apply_postprocessing(score, brains[held], tissue, threshold, minimum,
                                            restrict)
                values = held_out_metrics(mask, truths[held])
                record("stacked", k, held, {**values, "seconds": time.perf_counter() - start},
                       subset)
                print(f"  stacked k={k} held {everyone[held].name}: Dice {values['dice']:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.finetune_epochs and "segment 2d" in calibrated:
        rows += finetuned(pool, args, calibrated["segment 2d"][0], subjects, everyone, brains,
                          truths, tissue)
    return rows


def finetuned(pool: Pool, args, base, subjects: list[SubjectImages], everyone: list[Case],
              brains: list[np.ndarray], truths: list[np.ndarray], tissue: np.ndarray
              ) -> list[dict]:
    """Level 3: the label-free segment network fine-tuned on all but the held-out subject.

    As ``train --model-type segment --finetune NAME --annotations ...`` does: the annotated
    lesions join the synthetic anomalies for ``--finetune-epochs`` epochs, the threshold is
    calibrated on the healthy calibration subjects (no tuning: the network saw every annotated
    subject).
    """
    import dataclasses

    rows = []
    n = len(pool.cases)
    for held in range(0 if pool.loso else n, len(everyone)):
        others = [i for i in range(n) if i != held]
        start = time.perf_counter()
        hyperparameters = base.stored_hyperparameters()
        model = type(base).from_hyperparameters(hyperparameters)
        model.training = dataclasses.replace(base.training, epochs=args.finetune_epochs,
                                             patience=0, checkpoint_dir=None)
        model.cache_dir = base.cache_dir
        state = {k: v.clone() for k, v in base.network.state_dict().items()}
        model.initial_state = lambda architecture, data, state=state: state
        model.fit(TrainingData(pool.fit.subjects + [subjects[i] for i in others],
                               pool.fit.channels, regions=pool.fit.regions))
        threshold = threshold_at_fpr(healthy_scores(model, pool.calibration), args.fpr)
        score = model.score(everyone[held].image, everyone[held].mask).numpy()
        mask = apply_postprocessing(score, brains[held], tissue, threshold)
        values = held_out_metrics(mask, truths[held])
        rows.append({"protocol": pool.name, "method": "segment fine-tuned", "k": len(others),
                     "held_out": everyone[held].name,
                     "role": "labelled" if held < n else "never annotated",
                     "annotated": " ".join(everyone[i].name for i in others), **values,
                     "seconds": time.perf_counter() - start})
        print(f"  segment fine-tuned k={len(others)} held {everyone[held].name}: Dice "
              f"{values['dice']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def write_tables(rows: list[dict], out: Path, header: str, notes: dict[str, str]) -> None:
    """Per protocol and held-out set, mean Dice per method and k (Markdown), every row (TSV)."""
    table = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".tsv"), sep="\t", index=False, float_format="%.4f")
    lines = [header, ""]
    for protocol, group in table.groupby("protocol", sort=False):
        labelled = group["role"] == "labelled"
        for title, part in (("labelled subjects, leave-one-out", group[labelled]),
                            ("never-annotated test subject(s)", group[~labelled])):
            if part.empty:
                continue
            ks = sorted(part["k"].unique())
            lines += [f"### {protocol}: {title} (mean Dice on the held-out subject)", "",
                      notes.get(protocol, ""), "",
                      "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
                      "|---|" + "---|" * len(ks)]
            for method, rows_m in part.groupby("method", sort=False):
                means = rows_m.groupby("k")["dice"].mean()
                lines.append(f"| {method} | " + " | ".join(
                    f"{means[k]:.3f}" if k in means else "" for k in ks) + " |")
            lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    """Run the protocols and write the learning curves."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, epochs=30, patience=6, batch_size=8, width=8)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--subsets", type=int, default=2,
                        help="annotated subsets per held-out subject and k (stacking)")
    parser.add_argument("--tuning-subsets", type=int, default=20,
                        help="annotated subsets per held-out subject and k (tuning)")
    parser.add_argument("--healthy-voxels", type=int, default=20000)
    parser.add_argument("--segment", action="store_true",
                        help="also the self-supervised segment network (label-free, a stacking "
                             "member, in the ensemble)")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="with --segment: also fine-tune it on all but the held-out subject "
                             "for this many epochs (level 3)")
    parser.add_argument("--skip-stacking", action="store_true",
                        help="only the label-free models, the tuned post-processing and the "
                             "fine-tuning")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/weak"))
    # the leaderboard's other families are built by models_for, never fitted here
    parser.set_defaults(pairs_per_subject=5000, patch_side=9, patch_scaling="cohort",
                        code_size=16, latent_per_tissue=False, families=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    template = get_template(2, args.template_dir)
    rows, notes = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_weak_") as folder:
        for pool in pools(args, template):
            notes[pool.name] = pool.note
            rows += run_pool(pool, args, template, Path(folder))
            write_tables(rows, args.out, _header(args, start), notes)
    print(f"total {time.perf_counter() - start:.0f} s; tables in {args.out}.md / .tsv")


def _header(args, start: float) -> str:
    return (f"Weak supervision learning curves (label-free thresholds at voxel FPR {args.fpr} "
            f"from held-out controls; stacking: {args.subsets} annotated subset(s) per held-out "
            f"subject and k, tuning: up to {args.tuning_subsets}; seed {args.seed}; CPU "
            f"x{args.threads}; {time.perf_counter() - start:.0f} s so far)")


if __name__ == "__main__":
    main()
