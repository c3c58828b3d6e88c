"""Voxel-wise accuracy of the mixture models against the intensity-thresholding baseline.

Usage (run by hand, never in CI; needs the preprocessed real dataset in template space)::

    python benchmarks/bench_mixture_accuracy.py --derivatives /tmp/allreal \
        --shapes ../shared/data/lesion_shapes --fpr 0.001 [--json results.json]

Three experiments, each reported as a Markdown table (baseline first) of voxel AUROC, AUPRC,
oracle Dice (best Dice over all thresholds), Dice at the calibrated threshold, flagged and
ground-truth voxels. Voxels are evaluated inside the subject's brain mask where every channel
the models use is valid (non-zero and finite); scores of several test subjects are pooled.

A. Synthetic lesions in healthy IXI T1w. The 10 subjects are split with a fixed seed into 5 to
   fit, 2 to calibrate (threshold: the ``1 - fpr`` quantile of their scores) and 3 to test.
   Each test subject gets real lesion shapes (3 MS shapes of MSLUB, or 1 SOOP stroke shape of
   5-100 ml) inserted with :func:`bids_anomaly.evaluation.lesions.insert_lesions`. Models: gmm,
   tmm and mmst (K by BIC; whole brain and per tissue), the best of them combined with the
   normative model, the normative model alone, and the T1w hypointensity baseline.
B. sub-mslub26 (T1w, FLAIR, T2w) against its consensus lesion mask. Without healthy
   multi-channel controls: (i) single-subject mode, a mixture fitted on the subject's own brain
   and thresholded at the ``1 - fpr`` quantile of scores simulated from the mixture; (ii) a
   "contaminated cohort", mixtures fitted on 3 sessions of the MS patients mslubL01/L12 and
   calibrated on the fourth. Baseline: FLAIR hyperintensity, calibrated on the subject itself
   (compared with (i)) and on the held-out mslubL session (compared with (ii)).
C. sub-stroke01 (T2w only) against its hand-drawn lesion mask, as in B with the T2w channel.

Every seed is fixed; the total runtime is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bids_anomaly.evaluation.ground_truth import find_ground_truth, truth_in_template
from bids_anomaly.evaluation.lesions import insert_lesions, lesion_shape_paths
from bids_anomaly.evaluation.metrics import voxel_metrics
from bids_anomaly.imaging.images import load_lesion_shape
from bids_anomaly.imaging.template import TEMPLATE_NAME, Template, get_template
from bids_anomaly.models import (
    REGISTRY,
    AnomalyModel,
    IntensityBaseline,
    MixtureModel,
    NormativeModel,
    SubjectImages,
    TrainingData,
)
from bids_anomaly.models.data import valid_voxels
from bids_anomaly.postprocessing.thresholds import healthy_scores, threshold_at_fpr

HEALTHY = ["IXI012", "IXI013", "IXI014", "IXI015", "IXI033", "IXI034", "IXI039", "IXI048",
           "IXI049", "IXI051"]
N_FIT, N_CALIBRATION = 5, 2
"""Healthy subjects to fit on and to calibrate on; the rest are test subjects."""
COHORT = [("mslubL01", "1"), ("mslubL01", "2"), ("mslubL12", "1"), ("mslubL12", "2")]
"""Sessions of MS patients (no lesion masks) that make the contaminated training cohort."""
COHORT_CHANNELS = ["T1w", "FLAIR", "T2w"]
MIXTURES = ("gmm", "tmm", "mmst")
MS_SHAPES_PER_SUBJECT = 3
STROKE_VOLUME_ML = (5.0, 100.0)
SINGLE_SUBJECT_TRIMS = (0.0, 0.02)
DEFAULT_BIDS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "bids_real"
"""The real data beside the repository (``../shared/data``), wherever the command is run from."""


@dataclass
class MixtureSettings:
    """Options shared by every mixture of the benchmark (see :class:`MixtureModel`)."""

    cohort_components: int | str
    single_components: int | str
    max_components: int
    max_samples: int
    simulated_samples: int
    seed: int


@dataclass
class Row:
    """One model's line in an experiment's table."""

    model: str
    metrics: dict[str, float]
    threshold: float
    calibration: str
    extra: dict = field(default_factory=dict)


@dataclass
class Case:
    """A test image with its ground truth and the voxels it is evaluated on."""

    name: str
    image: torch.Tensor
    mask: torch.Tensor
    truth: np.ndarray
    evaluated: np.ndarray


def preproc_prefix(derivatives: Path, subject: str, session: str | None) -> Path:
    """Common path prefix of a subject/session's template-space derivatives."""
    folder = derivatives / f"sub-{subject}"
    name = f"sub-{subject}"
    if session is not None:
        folder, name = folder / f"ses-{session}", f"{name}_ses-{session}"
    return folder / "anat" / f"{name}_space-{TEMPLATE_NAME}_res-2_"


def subject_images(derivatives: Path, subject: str, session: str | None,
                   modalities: list[str]) -> SubjectImages:
    """The preprocessed channels and brain mask of one subject/session."""
    prefix = preproc_prefix(derivatives, subject, session)
    name = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    return SubjectImages(name, [Path(f"{prefix}desc-preproc_{m}.nii.gz") for m in modalities],
                         Path(f"{prefix}desc-brain_mask.nii.gz"))


def model_label(model_type: str, model: MixtureModel) -> str:
    """Short table label: family, whole brain or per tissue, trim and the components chosen."""
    components = "/".join(str(model.fit_report[key]["components"])
                          for key in sorted(model.fit_report, key=int))
    label = f"{model_type} {'tissue' if model.per_tissue else 'whole'}"
    if model.trim:
        label += f" trim={model.trim}"
    if model.normative:
        label += " +normative"
    if model.score_kind == "outlyingness":
        label += " outlyingness"
    return f"{label} K={components}"


def new_mixture(model_type: str, settings: MixtureSettings, components: int | str,
                **options) -> MixtureModel:
    """A mixture model of the benchmark's common settings."""
    return REGISTRY[model_type](n_components=components, max_components=settings.max_components,
                                max_samples=settings.max_samples, random_seed=settings.seed,
                                **options)


def outlyingness_variant(model: MixtureModel) -> MixtureModel:
    """The same fitted mmst mixture, scored by weight-based outlyingness instead of the NLL.

    A refit with ``score="outlyingness"`` gives the identical mixture (the score plays no part
    in the fit), at twice the cost.
    """
    variant = copy.copy(model)
    variant.score_kind = "outlyingness"
    return variant


def evaluate(model: AnomalyModel, cases: list[Case], threshold: float) -> dict[str, float]:
    """Voxel metrics of ``model`` on ``cases``, evaluated voxels of all cases pooled."""
    scores, truth = [], []
    with torch.no_grad():
        for case in cases:
            scores.append(model.score(case.image, case.mask).double().numpy()[case.evaluated])
            truth.append(case.truth[case.evaluated])
    return voxel_metrics(np.concatenate(scores), np.concatenate(truth), threshold)


def load_tissue_maps(template: Template) -> tuple[np.ndarray, np.ndarray]:
    """The template's grey- and white-matter probability maps."""
    return tuple(np.asarray(nib.load(template.probseg[tissue]).dataobj, dtype=np.float32)
                 for tissue in ("GM", "WM"))


def pick_stroke_shape(paths: list[Path], rng: np.random.Generator) -> Path:
    """A random stroke lesion mask whose volume is within :data:`STROKE_VOLUME_ML`."""
    low, high = STROKE_VOLUME_ML
    for index in rng.permutation(len(paths)):
        img = nib.load(paths[index])
        volume = np.count_nonzero(np.asarray(img.dataobj)) * np.prod(img.header.get_zooms()[:3])
        if low <= volume / 1000 <= high:
            return paths[index]
    raise ValueError(f"no stroke lesion mask of {low}-{high} ml among {len(paths)}")


def lesioned_cases(subjects: list[SubjectImages], shapes_dir: Path, kind: str,
                   template: Template, seed: int) -> list[Case]:
    """The test subjects' T1w with inserted lesions of one kind (``ms`` or ``stroke``)."""
    rng = np.random.default_rng(seed)
    paths = lesion_shape_paths(shapes_dir, kind)
    gm, wm = load_tissue_maps(template)
    cases = []
    for subject in subjects:
        reference = nib.load(subject.mask)
        if kind == "ms":
            chosen = [paths[i] for i in rng.choice(len(paths), MS_SHAPES_PER_SUBJECT,
                                                   replace=False)]
        else:
            chosen = [pick_stroke_shape(paths, rng)]
        shapes = [load_lesion_shape(path, reference) for path in chosen]
        image, mask = subject.load()
        brain = mask.numpy()
        lesioned, truth = insert_lesions({"T1w": image[0].numpy()}, brain, gm, wm, shapes,
                                         kind, rng)
        evaluated = valid_voxels(image, mask).numpy()
        cases.append(Case(subject.name, torch.from_numpy(lesioned["T1w"])[None], mask, truth,
                          evaluated))
    return cases


def run_synthetic(derivatives: Path, shapes_dir: Path, template: Template, fpr: float,
                  settings: MixtureSettings) -> dict[str, list[Row]]:
    """Experiment A: synthetic MS and stroke lesions in held-out healthy IXI T1w."""
    order = sorted(HEALTHY)
    random.Random(settings.seed).shuffle(order)
    subjects = [subject_images(derivatives, s, None, ["T1w"]) for s in order]
    fit = TrainingData(subjects[:N_FIT], ["T1w"], regions=template.dseg)
    calibration = TrainingData(subjects[N_FIT:N_FIT + N_CALIBRATION], ["T1w"])
    test = subjects[N_FIT + N_CALIBRATION:]
    kinds = {kind: lesioned_cases(test, shapes_dir, kind, template, settings.seed)
             for kind in ("ms", "stroke")}
    split = (f"fit {', '.join(fit.names)}; calibrate {', '.join(calibration.names)}; "
             f"test {', '.join(s.name for s in test)}")
    print(f"A: {split}", flush=True)
    tables: dict[str, list[Row]] = {kind: [] for kind in kinds}

    def add(label: str, model: AnomalyModel, extra: dict | None = None) -> dict[str, float]:
        threshold = threshold_at_fpr(healthy_scores(model, calibration), fpr)
        auprc = {}
        for kind, cases in kinds.items():
            metrics = evaluate(model, cases, threshold)
            tables[kind].append(Row(label, metrics, threshold, "held-out IXI",
                                    {"split": split, **(extra or {})}))
            auprc[kind] = metrics["auprc"]
        print(f"  {label}: AUPRC {auprc}", flush=True)
        return auprc

    baseline = IntensityBaseline(channel=0, direction="hypo")
    baseline.fit(fit)
    add("baseline T1w hypo z", baseline)
    best: tuple[float, str, dict] | None = None
    for model_type in MIXTURES:
        for per_tissue in (False, True):
            options = {"per_tissue": per_tissue}
            model = new_mixture(model_type, settings, settings.cohort_components, **options)
            start = time.perf_counter()
            model.fit(fit)
            seconds = time.perf_counter() - start
            auprc = add(model_label(model_type, model), model,
                        {"fit_seconds": seconds, "fit_report": model.fit_report})
            mean_auprc = float(np.mean(list(auprc.values())))
            if best is None or mean_auprc > best[0]:
                best = (mean_auprc, model_type, options)
    _, model_type, options = best
    combined = new_mixture(model_type, settings, settings.cohort_components, normative=True,
                           **options)
    combined.fit(fit)
    add(model_label(model_type, combined), combined, {"fit_report": combined.fit_report})
    normative = NormativeModel()
    normative.fit(fit)
    add("normative", normative)
    return {f"A. synthetic {kind} lesions in IXI T1w (3 test subjects)": rows
            for kind, rows in tables.items()}


def fit_single_subject(model: MixtureModel, image: torch.Tensor, mask: torch.Tensor,
                       regions: torch.Tensor, fpr: float, n_simulated: int) -> float:
    """Fit ``model`` on the subject's own valid voxels; return its simulated threshold.

    As :class:`bids_anomaly.interfaces.anomaly.FitSubjectModel` does: the threshold is the
    ``1 - fpr`` quantile of the scores of samples drawn from the fitted mixture.
    """
    model.fit_subject(image, mask, regions)
    return threshold_at_fpr(model.simulated_scores(n_simulated), fpr)


def ground_truth(bids_dir: Path, derivatives: Path, subject: str, reference: str) -> np.ndarray:
    """The subject's lesion mask carried into template space through its reference image."""
    truth_file = find_ground_truth(bids_dir / "derivatives" / "lesion_masks", subject, None)
    if truth_file is None:
        raise FileNotFoundError(f"no lesion mask for sub-{subject} in {bids_dir}")
    anat = derivatives / f"sub-{subject}" / "anat"
    transform = anat / f"sub-{subject}_from-{reference}_to-{TEMPLATE_NAME}_mode-image_xfm.h5"
    raw = bids_dir / f"sub-{subject}" / "anat" / f"sub-{subject}_{reference}.nii.gz"
    mask = Path(f"{preproc_prefix(derivatives, subject, None)}desc-brain_mask.nii.gz")
    truth = truth_in_template(truth_file, mask, {reference: raw}, {reference: [transform]})
    if truth is None:
        raise ValueError(f"{truth_file} matches neither the template grid nor {raw}")
    return truth


def run_patient(bids_dir: Path, derivatives: Path, subject: str, modalities: list[str],
                reference: str, baseline_channel: str, template: Template, fpr: float,
                settings: MixtureSettings) -> list[Row]:
    """Experiments B and C: one patient with a real lesion mask.

    Single-subject mixtures, mixtures of the contaminated mslubL cohort, and the
    hyperintensity baseline on ``baseline_channel`` calibrated both ways.
    """
    target = subject_images(derivatives, subject, None, modalities)
    image, mask = target.load()
    evaluated = valid_voxels(image, mask).numpy()
    truth = ground_truth(bids_dir, derivatives, subject, reference)
    cases = [Case(target.name, image, mask, truth, evaluated)]
    cohort = TrainingData([subject_images(derivatives, s, ses, modalities) for s, ses in COHORT],
                          modalities, regions=template.dseg)
    fit, calibration = cohort.split(1 / len(COHORT), seed=settings.seed)
    cohort_note = f"fit {', '.join(fit.names)}; calibrate {', '.join(calibration.names)}"
    print(f"{target.name}: cohort {cohort_note}", flush=True)
    rows: list[Row] = []

    def add(label: str, model: AnomalyModel, threshold: float, calibrated_on: str,
            extra: dict | None = None) -> None:
        metrics = evaluate(model, cases, threshold)
        rows.append(Row(label, metrics, threshold, calibrated_on, extra or {}))
        print(f"  {label} [{calibrated_on}]: AUPRC {metrics['auprc']:.3f} Dice "
              f"{metrics['dice']:.3f}", flush=True)

    baseline = IntensityBaseline(channel=modalities.index(baseline_channel), direction="hyper")
    baseline.fit(fit)
    with torch.no_grad():
        own = baseline.score(image, mask).double().numpy()[evaluated]
    add(f"baseline {baseline_channel} hyper z", baseline, threshold_at_fpr(own, fpr),
        "self (own z-scores)")
    add(f"baseline {baseline_channel} hyper z", baseline,
        threshold_at_fpr(healthy_scores(baseline, calibration), fpr), "held-out mslubL")

    regions = torch.from_numpy(np.asarray(nib.load(template.dseg).dataobj).astype(np.int64))
    for model_type in MIXTURES:
        for per_tissue in (False, True):
            for trim in SINGLE_SUBJECT_TRIMS:
                model = new_mixture(model_type, settings, settings.single_components,
                                    per_tissue=per_tissue, trim=trim)
                start = time.perf_counter()
                threshold = fit_single_subject(model, image, mask, regions, fpr,
                                               settings.simulated_samples)
                extra = {"fit_seconds": time.perf_counter() - start,
                         "fit_report": model.fit_report}
                add(model_label(model_type, model), model, threshold, "self (simulated)", extra)
                if model_type == "mmst":
                    variant = outlyingness_variant(model)
                    threshold = threshold_at_fpr(
                        variant.simulated_scores(settings.simulated_samples), fpr)
                    add(model_label(model_type, variant), variant, threshold,
                        "self (simulated)", extra)

    for model_type in MIXTURES:
        for per_tissue in (False, True):
            model = new_mixture(model_type, settings, settings.cohort_components,
                                per_tissue=per_tissue)
            start = time.perf_counter()
            model.fit(fit)
            extra = {"fit_seconds": time.perf_counter() - start, "fit_report": model.fit_report,
                     "cohort": cohort_note}
            variants = [model] + ([outlyingness_variant(model)] if model_type == "mmst" else [])
            for variant in variants:
                threshold = threshold_at_fpr(healthy_scores(variant, calibration), fpr)
                add(model_label(model_type, variant), variant, threshold, "held-out mslubL",
                    extra)
    return rows


def format_value(value: float) -> str:
    """Three decimals, ``n/a`` for NaN."""
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def markdown_table(rows: list[Row]) -> str:
    """The experiment's table in Markdown, rows in the order they were computed."""
    lines = ["| model | calibrated on | AUROC | AUPRC | oracle Dice | Dice@threshold | "
             "flagged voxels | truth voxels |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row.metrics
        lines.append(f"| {row.model} | {row.calibration} | {format_value(m['auroc'])} | "
                     f"{format_value(m['auprc'])} | {format_value(m['oracle_dice'])} | "
                     f"{format_value(m['dice'])} | {m['predicted_voxels']} | "
                     f"{m['truth_voxels']} |")
    return "\n".join(lines)


def parse_components(value: str) -> int | str:
    """``auto`` or a positive number of components."""
    return value if value == "auto" else int(value)


def main() -> None:
    """Run the chosen experiments and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--derivatives", type=Path, required=True,
                        help="preprocessed template-space images of the real dataset")
    parser.add_argument("--shapes", type=Path, required=True,
                        help="lesion shape collection (mslub/ and soop/)")
    parser.add_argument("--bids-dir", type=Path, default=DEFAULT_BIDS_DIR,
                        help="the raw dataset (lesion masks and raw reference images)")
    parser.add_argument("--fpr", type=float, default=0.001,
                        help="voxel false-positive rate of the calibrated thresholds")
    parser.add_argument("--experiments", default="ABC", help="which of A, B, C to run")
    parser.add_argument("--components", type=parse_components, default="auto",
                        help="components of the cohort mixtures (A, B-ii, C-ii)")
    parser.add_argument("--single-components", type=parse_components, default=5,
                        help="components of the single-subject mixtures (B-i, C-i)")
    parser.add_argument("--max-components", type=int, default=6,
                        help="largest K tried by BIC for 'auto'")
    parser.add_argument("--max-samples", type=int, default=300_000,
                        help="voxels per batch-EM fit")
    parser.add_argument("--simulated-samples", type=int, default=1_000_000,
                        help="samples drawn from a single-subject mixture for its threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "bids_anomaly_bench_templates")
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    args = parser.parse_args()

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    settings = MixtureSettings(args.components, args.single_components, args.max_components,
                               args.max_samples, args.simulated_samples, args.seed)
    template = get_template(2, args.template_dir)
    tables: dict[str, list[Row]] = {}
    seconds: dict[str, float] = {}
    if "A" in args.experiments:
        begin = time.perf_counter()
        tables.update(run_synthetic(args.derivatives, args.shapes, template, args.fpr,
                                    settings))
        seconds["A"] = time.perf_counter() - begin
    patients = {"B": ("mslub26", COHORT_CHANNELS, "T1w", "FLAIR"),
                "C": ("stroke01", ["T2w"], "T2w", "T2w")}
    for key, (subject, modalities, reference, baseline_channel) in patients.items():
        if key not in args.experiments:
            continue
        begin = time.perf_counter()
        title = f"{key}. sub-{subject} ({', '.join(modalities)}), real lesion mask"
        tables[title] = run_patient(args.bids_dir, args.derivatives, subject, modalities,
                                    reference, baseline_channel, template, args.fpr, settings)
        seconds[key] = time.perf_counter() - begin
    total = time.perf_counter() - start

    print(f"\nfpr {args.fpr}; cohort K {args.components} (BIC up to {args.max_components}); "
          f"single-subject K {args.single_components}; max_samples {args.max_samples}; "
          f"simulated samples {args.simulated_samples}; seed {args.seed}")
    for title, rows in tables.items():
        print(f"\n### {title}\n\n{markdown_table(rows)}")
    timing = ", ".join(f"{key} {value / 60:.1f} min" for key, value in seconds.items())
    print(f"\nTotal runtime {total / 60:.1f} min ({timing}); {torch.get_num_threads()} threads")
    if args.json:
        args.json.write_text(json.dumps(
            {"settings": {**asdict(settings), "fpr": args.fpr}, "seconds": seconds,
             "total_seconds": total,
             "tables": {title: [asdict(row) for row in rows] for title, rows in tables.items()}},
            indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
