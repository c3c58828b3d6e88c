"""Covariate- and site-aware normative models: generated cohorts, transfer, real IXI controls.

Usage (run by hand, never in CI)::

    python benchmarks/bench_normative_covariates.py [--derivatives DERIV] [--out FILE.md]
        [--cli BIDS_DIR OUTPUT_DIR]

1. Generated cohorts (:mod:`bids_anomaly.simulation.cohorts`): two sites, ages 20-80, a known age
slope,
   sex offset, site offset and site scale, noise growing with age. The covariate model
   (``--covariates age sex --site-column site``) is fitted on 80 controls; the recovered effects,
   the z-scores of 40 held-out controls per age band and site, a lesion's detection, and the
   false-positive rate of the held-out controls at a threshold calibrated on the held-out
   controls of all ages (voxel FPR 0.01), by age band, with and without covariates.
2. Transfer: a model of site A (40 controls) adapted with 5 controls of site C (offset and scale
   of its own); FPR of 20 held-out site-C controls at the calibrated threshold of site A's
   held-out controls, against: site A's norms applied to site C unchanged, and a plain model of
   the 5 site-C controls alone.
3. Real data (``--derivatives``: the participant level's output on ``../shared/data/bids_real``):
   the 10 IXI controls (ages 23-51, T1w), leave-one-out: norms of 9 (age and sex, linear,
   homoscedastic at this n), the held-out control scored (extrapolating when it is the youngest
   or oldest); its voxel FPR at |z| > 2.576 and 3.29 (nominal 0.01, 0.001 two-sided) and its z
   spread, with age and sex, with sex only (the ablation of age) and without covariates.
4. With ``--cli ../shared/data/bids_real DERIV``: the same folds through the command line
   (train, participant --extrapolate), FPR of the written anomaly mask.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from bids_anomaly.models import NormativeModel
from bids_anomaly.models.data import SubjectImages, TrainingData, valid_voxels
from bids_anomaly.postprocessing.thresholds import healthy_scores, threshold_at_fpr
from bids_anomaly.simulation.cohorts import generate_cohort, participants

EFFECTS = {"site_offset": {"A": (0.0, 0.0), "B": (0.3, -0.2)}, "site_scale": {"B": 1.5},
           "noise_sd": 0.15, "noise_sd_slope": 0.0015}
BANDS = ((20, 40, "20-40"), (40, 60, "40-60"), (60, 81, "60-80"))
SPACE = "space-MNI152NLin2009aSym_res-2"


def scorer(model, subject, extrapolate=True):
    """The model that scores ``subject`` (its norms with covariates)."""
    return model.given(subject.covariates, extrapolate) if model.needs_covariates else model


def flagged(model, subject, threshold):
    """Voxels above ``threshold`` and valid voxels of one subject."""
    image, mask = subject.load()
    valid = valid_voxels(image, mask)
    score = scorer(model, subject).score(image, mask)
    return int((score[valid] > threshold).sum()), int(valid.sum())


def generated(root: Path) -> list[str]:
    """Section 1: recovery, held-out z, lesion, FPR by age band with and without covariates."""
    lines = ["## 1. Generated two-site cohort (80 training, 40 held-out controls)", ""]
    train, truth = generate_cohort(root / "train", participants(80, 1, sites=("A", "B")),
                                   **EFFECTS)
    rows = participants(40, 2, sites=("A", "B"))
    lesioned = rows[0]["participant_id"]
    test, test_truth = generate_cohort(root / "test", rows, seed=5, lesions={lesioned: 1.5},
                                       **EFFECTS)
    start = time.perf_counter()
    model = NormativeModel(covariates=["age", "sex"], site_column="site")
    model.fit(train)
    fit_time = time.perf_counter() - start
    plain = NormativeModel()
    plain.fit(train)

    def predicted(age, sex="F", site="A"):
        return model.norms.predict({"age": str(age), "sex": sex, "site": site})[:2]

    slope = ((predicted(70)[0] - predicted(30)[0]) / 40).median(dim=1).values
    sex = (predicted(50, "M")[0] - predicted(50)[0]).median(dim=1).values
    site = (predicted(50, site="B")[0] - predicted(50)[0]).median(dim=1).values
    scale = (predicted(50, site="B")[1] / predicted(50)[1]).median(dim=1).values
    lines += [f"Fit: {fit_time:.1f} s (16^3 grid, 2 channels, design "
              f"{model.fit_report['design']}).", "",
              "| effect | channel | truth | recovered (median over voxels) |", "|---|---|---|---|"]
    for c, channel in enumerate(("FLAIR", "T1w")):
        lines += [f"| age slope /year | {channel} | {truth.slope[c]:g} | {slope[c]:.4f} |",
                  f"| sex M-F | {channel} | {truth.sex_offset[c]:g} | {sex[c]:.4f} |",
                  f"| site B-A offset | {channel} | {truth.site_offset['B'][c]:g} | "
                  f"{site[c]:.4f} |",
                  f"| site B/A sd | {channel} | {truth.site_scale['B']:g} | {scale[c]:.3f} |"]
    healthy = test.subset([i for i, s in enumerate(test.subjects) if s.name != lesioned])
    lines += ["", "Held-out z-scores (both channels, support voxels) by age band and site:", "",
              "| band | site | controls | mean z | sd z | P(abs z > 3) (nominal 0.0027) |",
              "|---|---|---|---|---|---|"]
    for low, high, band in BANDS:
        for site_name in ("A", "B"):
            chosen = [s for s in healthy.subjects if low <= float(s.covariates["age"]) < high
                      and s.covariates["site"] == site_name]
            z = []
            for subject in chosen:
                image, mask = subject.load()
                maps, _, _ = model.normative_outputs(image, mask, subject.covariates, True)
                z.append(maps[:, model.norms.support & mask].reshape(-1))
            z = torch.cat(z)
            lines.append(f"| {band} | {site_name} | {len(chosen)} | {z.mean():.3f} | "
                         f"{z.std():.3f} | {(z.abs() > 3).float().mean():.4f} |")
    lines += ["", "Voxel FPR of held-out controls at the threshold calibrated on all held-out "
              "controls (target 0.01):", "", "| band | with covariates | without |",
              "|---|---|---|"]
    thresholds = {name: threshold_at_fpr(healthy_scores(m, healthy), 0.01)
                  for name, m in (("cov", model), ("plain", plain))}
    for low, high, band in BANDS:
        chosen = [s for s in healthy.subjects if low <= float(s.covariates["age"]) < high]
        rates = {}
        for name, m in (("cov", model), ("plain", plain)):
            counts = np.array([flagged(m, s, thresholds[name]) for s in chosen])
            rates[name] = counts[:, 0].sum() / counts[:, 1].sum()
        lines.append(f"| {band} ({len(chosen)}) | {rates['cov']:.4f} | {rates['plain']:.4f} |")
    subject = next(s for s in test.subjects if s.name == lesioned)
    lesion = torch.from_numpy(test_truth.lesions[lesioned])
    image, mask = subject.load()
    found = {name: float((scorer(m, subject).score(image, mask)[lesion] > thresholds[name])
                         .float().mean()) for name, m in (("cov", model), ("plain", plain))}
    lines += ["", f"Lesion (+1.5 on FLAIR, {int(lesion.sum())} voxels, age "
              f"{subject.covariates['age']}): share of its voxels above the threshold: "
              f"{found['cov']:.2f} with covariates, {found['plain']:.2f} without.", ""]
    return lines


def transfer(root: Path) -> list[str]:
    """Section 2: transfer to a new site from 5 controls."""
    effects = {"site_offset": {"A": (0.0, 0.0), "C": (0.4, 0.3)}, "site_scale": {"C": 1.3},
               "noise_sd": 0.15, "noise_sd_slope": 0.0}
    train, _ = generate_cohort(root / "a", participants(40, 3, sites=("A",)), **effects)
    held_a, _ = generate_cohort(root / "a_test", participants(20, 6, sites=("A",),
                                                              ages=(25.0, 75.0)),
                                seed=11, **effects)
    model = NormativeModel(covariates=["age"], site_column="site")
    model.fit(train)
    threshold = threshold_at_fpr(healthy_scores(model, held_a), 0.01)
    data, _ = generate_cohort(root / "c", participants(25, 4, sites=("C",), ages=(25.0, 75.0)),
                              seed=9, **effects)
    controls, held = data.subset(list(range(5))), data.subset(list(range(5, 25)))

    def rate(m, subjects, thr, as_site=None):
        counts = []
        for s in subjects:
            if as_site:
                s = SubjectImages(s.name, s.channels, s.mask,
                                  covariates={**s.covariates, "site": as_site})
            counts.append(flagged(m, s, thr))
        counts = np.array(counts)
        return counts[:, 0].sum() / counts[:, 1].sum()

    unchanged = rate(model, held.subjects, threshold, as_site="A")
    start = time.perf_counter()
    model.transfer(controls)
    seconds = time.perf_counter() - start
    adapted = rate(model, held.subjects, threshold)
    own = NormativeModel()
    own.fit(controls)
    own_threshold = threshold_at_fpr(healthy_scores(own, controls), 0.01)  # optimistic
    alone = rate(own, held.subjects, own_threshold)
    return ["## 2. Transfer to a new site (5 controls)", "",
            "Site A model: 40 controls aged 20-80, threshold calibrated on 20 held-out site-A "
            "controls at voxel FPR 0.01. Site C: offset (+0.4, +0.3), noise x1.3. Voxel FPR "
            "of 20 held-out site-C controls:", "",
            "| norms | FPR (target 0.01) |", "|---|---|",
            f"| site A's, unchanged | {unchanged:.4f} |",
            f"| transferred with 5 site-C controls ({seconds:.1f} s) | {adapted:.4f} |",
            f"| plain model of the 5 site-C controls (threshold on the same 5) | {alone:.4f} |",
            ""]


def real(derivatives: Path) -> list[str]:
    """Section 3: leave-one-out over the 10 IXI controls of bids_real."""
    table = pd.read_csv(Path(__file__).resolve().parents[2] / "shared" / "data" / "bids_real"
                        / "participants.tsv", sep="\t", dtype=str)
    table = table[table["group"] == "healthy"]
    subjects = []
    for row in table.to_dict("records"):
        name = row["participant_id"]
        anat = derivatives / name / "anat"
        subjects.append(SubjectImages(
            name, [anat / f"{name}_{SPACE}_desc-preproc_T1w.nii.gz"],
            anat / f"{name}_{SPACE}_desc-brain_mask.nii.gz", covariates=row))
    from bids_anomaly.imaging.template import get_template

    template = get_template(2, Path(tempfile.mkdtemp()) / "template")
    lines = ["## 3. Real IXI controls, leave-one-out (T1w)", "",
             "cov: norms of age and sex; sex: the same model with sex only (the ablation of "
             "age: same machinery, same predictive sd); none: the plain normative model "
             "(median, MAD).", "",
             "| held out | age | sex | FPR 2.576 cov | sex | none | FPR 3.29 cov | sex | none "
             "| sd z cov | sex | none |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    totals = []
    for k, subject in enumerate(subjects):
        rest = TrainingData([s for i, s in enumerate(subjects) if i != k], ["T1w"],
                            regions=template.dseg)
        with_cov = NormativeModel(covariates=["age", "sex"], covariate_df="1")
        with_cov.fit(rest)
        sex_only = NormativeModel(covariates=["sex"])
        sex_only.fit(rest)
        plain = NormativeModel()
        plain.fit(rest)
        image, mask = subject.load()
        valid = valid_voxels(image, mask)
        row = []
        spreads = []
        for m in (with_cov, sex_only, plain):
            s = scorer(m, subject)
            z = ((image - s.location) / s.spread)[0]
            inside = valid & s.support
            spreads.append(float(z[inside].std()))
            row.append([float((z[inside].abs() > t).float().mean()) for t in (2.576, 3.29)])
        values = [*(r[0] for r in row), *(r[1] for r in row), *spreads]
        totals.append(values)
        lines.append(f"| {subject.name} | {subject.covariates['age']} | "
                     f"{subject.covariates['sex']} | "
                     + " | ".join(f"{v:.4f}" for v in values[:6]) + " | "
                     + " | ".join(f"{v:.3f}" for v in values[6:]) + " |")
    mean = np.mean(totals, axis=0)
    lines.append("| **mean** | | | " + " | ".join(f"**{v:.4f}**" for v in mean[:6])
                 + " | " + " | ".join(f"**{v:.3f}**" for v in mean[6:]) + " |")
    return [*lines, ""]


def cli_folds(bids_dir: Path, output_dir: Path, work_dir: Path | None = None) -> list[str]:
    """Section 4: the same leave-one-out through the command line (train, then participant).

    Each fold trains ``loo<k>`` (with ``--covariates age sex --covariate-df 1``) and
    ``plain<k>`` on the other 9 IXI controls (the train level holds 2 of them out to calibrate
    the threshold at the default voxel FPR 0.001), then scores the held-out control with
    ``participant --model ... --extrapolate``; its voxel FPR is its anomaly mask's share of its
    brain mask.
    """
    from bids_anomaly.cli.run import main as cli

    table = pd.read_csv(bids_dir / "participants.tsv", sep="\t", dtype=str)
    labels = [p.removeprefix("sub-") for p in table.loc[table["group"] == "healthy",
                                                        "participant_id"]]
    common = ["--nprocs", "2", "--omp-nthreads", "1",
              *(["-w", str(work_dir)] if work_dir else [])]
    lines = ["## 4. The leave-one-out through the command line", "",
             "train on 9 IXI controls (7 fitted, 2 calibrating the threshold at voxel FPR "
             "0.001), participant on the 10th; FPR = its anomaly mask / its brain mask.", "",
             "| held out | age | FPR with age, sex | FPR without |", "|---|---|---|---|"]
    rates = []
    for k, held in enumerate(labels):
        rest = [label for label in labels if label != held]
        row = []
        for name, extra in ((f"loo{k:02d}", ["--covariates", "age", "sex", "--covariate-df",
                                             "1"]), (f"plain{k:02d}", [])):
            assert cli([str(bids_dir), str(output_dir), "train", "--model-type", "normative",
                        "--model-name", name, "--participant-label", *rest, *extra,
                        *common]) == 0
            assert cli([str(bids_dir), str(output_dir), "participant", "--model", name,
                        "--participant-label", held, *(["--extrapolate"] if extra else []),
                        *common]) == 0
            anat = output_dir / f"sub-{held}" / "anat"
            mask = np.asarray(nib.load(next(anat.glob(
                f"*_{SPACE}_label-anomaly_desc-{name}_mask.nii.gz"))).dataobj) > 0
            brain = np.asarray(nib.load(next(anat.glob(f"*_{SPACE}_desc-brain_mask.nii.gz")))
                               .dataobj) > 0
            row.append(float(mask[brain].mean()))
        rates.append(row)
        age = table.loc[table["participant_id"] == f"sub-{held}", "age"].item()
        lines.append(f"| sub-{held} | {age} | {row[0]:.5f} | {row[1]:.5f} |")
    mean = np.mean(rates, axis=0)
    lines.append(f"| **mean** | | **{mean[0]:.5f}** | **{mean[1]:.5f}** |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--derivatives", type=Path, help="participant output on bids_real")
    parser.add_argument("--out", type=Path, help="write the tables (markdown) here too")
    parser.add_argument("--work-dir", type=Path, help="the participant run's work folder")
    parser.add_argument("--cli", nargs=2, type=Path, metavar=("BIDS_DIR", "OUTPUT_DIR"),
                        help="also run the leave-one-out through the command line (bids_real "
                             "and its participant output: 20 trainings, 20 scorings)")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = ["# Normative models with covariates and sites", ""]
    with tempfile.TemporaryDirectory() as folder:
        lines += generated(Path(folder) / "gen")
        lines += transfer(Path(folder) / "transfer")
    if args.derivatives:
        lines += real(args.derivatives)
    if args.cli:
        lines += cli_folds(*args.cli, args.work_dir)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
