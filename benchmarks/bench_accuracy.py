"""The accuracy leaderboard: every model family on the same protocols, in one run.

Usage (run by hand, never in CI; needs the real dataset preprocessed in template space, i.e.
``bids_anomaly ../shared/data/bids_real DERIV participant``, and a demo run)::

    python benchmarks/bench_accuracy.py --derivatives DERIV --demo DEMO_DIR \
        --out benchmarks/results/accuracy

(``--bids-dir`` and ``--shapes`` default to ``bids_real`` and ``lesion_shapes`` of the
``../shared/data`` beside the repository, from whichever folder the command is run.)

Protocols (each model is fitted on the protocol's training subjects, its threshold calibrated
at ``--fpr`` on held-out subjects, never on a test subject; no lesion label is used anywhere
except to score the result):

- ``demo``: the demo's controls (all but one fit, one calibrates) and its patients.
- ``ixi-ms`` / ``ixi-stroke``: healthy IXI T1w, 5 fit, 2 calibrate, 3 test subjects with real
  MS (3 MSLUB shapes each) or stroke (1 SOOP shape of 5-100 ml) lesions inserted. The shape
  folders are split by file (even positions train the self-supervised generator, odd ones are
  inserted into the test subjects; MSLUB patient26 is left out of both, being sub-mslub26).
- ``mslub26-ixi``: sub-mslub26 against its consensus mask, models trained on 8 IXI controls
  (T1w, the only contrast they share) and calibrated on 2.
- ``mslub26-cohort``: sub-mslub26 (T1w, FLAIR, T2w), models trained on a contaminated cohort:
  three sessions of the MS patients mslubL01/L12 and sub-mslub26 itself (unlabelled), calibrated
  on the fourth mslubL session (which has lesions too: the thresholds are conservative).
- ``stroke01-cohort``: sub-stroke01 (T2w only: the IXI controls have no T2w), the same way with
  the T2w of the mslubL sessions and sub-stroke01 itself.
- ``mslub26-single``: sub-mslub26 (T1w, FLAIR, T2w) and nothing else: the situation of a clinic
  with one patient, no control, no label. Only models that need no training: the FLAIR baseline
  (its threshold the 1 - FPR quantile of the patient's own brain), the ``tissue`` model
  (``participant --single-subject tissue``, its own threshold) and its ablations, and the peer,
  SAMSEG lesion mode (``--samseg-env``; its own environment, built by
  ``benchmarks/samseg_peer.py``; its lesion posterior carried into template space through the
  subject's T1w-to-template transform; Dice at its posterior 0.5). Transductive by nature: the
  tissue model and SAMSEG fit their mixtures on the test subject itself (that is the method).
- ``mslub26-patients``: sub-mslub26 scored by models trained on the four mslubL sessions only
  (patients, no control, no label; three fit, the fourth calibrates): nothing of the train level
  sees sub-mslub26. The recipe for patients without controls is the ensemble ``train
  --model-type ensemble --members tissue intensity`` (members that need no training, the
  baseline calibrated on the patients).

Which protocols fit on the test subject: ``mslub26-cohort`` and ``stroke01-cohort`` fit the
cohort models on it (unlabelled, transductive); ``mslub26-single`` fits only the subject's own
models; ``demo``, ``ixi``, ``mslub26-ixi`` and ``mslub26-patients`` never fit a cohort model on a
test subject. The ``tissue`` model (every protocol) fits its mixture on each image it scores.

Families: the intensity baseline (the lesion contrast's robust z-score: FLAIR, else T2w bright, T1w
dark), the ``tissue`` model (its threshold its own: ``-log10 FPR`` against the healthy draw from
the model fitted on each subject), the normative model (both signs, and with the lesion contrast's
directions), the Gaussian mixture, the denoising AE (the best reconstruction model of earlier
benchmarks), the self-supervised ``segment`` and ``restore``, the denoising diffusion models
(``ddpm``: Gaussian, simplex as AnoDDPM, patch-wise as pDDPM, conditioned on the coarse input as
cDDPM, and the Gaussian network's Mahalanobis distance over ``--reconstructions`` reconstructions as
sMHD, whose fit time is that network's), and the ensemble of directional
normative, segment and restore (mean of -log10 p), chosen before any result was seen; the siamese
patch autoencoder with its latent models (voxel-wise OC-SVMs, a global OC-SVM ensemble, a patient-
specific OC-SVM, an MMST mixture of the codes; one autoencoder per protocol, the variants' fit time
is their latent model's alone). Metrics: voxel AUROC, AUPRC, oracle Dice, Dice at the calibrated
threshold, lesion-wise sensitivity and false-positive clusters per test subject at that threshold.
Writes ``OUT.md`` and ``OUT.tsv``, and the deep models' learning curves (training and held-out
healthy loss per epoch) to ``OUT_curves.tsv``; the leaderboard of docs/models.md is this table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from bench_mixture_accuracy import (
    COHORT,
    HEALTHY,
    N_CALIBRATION,
    N_FIT,
    Case,
    ground_truth,
    load_tissue_maps,
    pick_stroke_shape,
    subject_images,
)

from bids_anomaly.evaluation.ground_truth import find_ground_truth, truth_in_template
from bids_anomaly.evaluation.lesions import insert_lesions, lesion_shape_paths
from bids_anomaly.evaluation.metrics import lesion_metrics, voxel_metrics
from bids_anomaly.imaging.images import load_lesion_shape
from bids_anomaly.imaging.template import TEMPLATE_NAME, Template, get_template
from bids_anomaly.models import REGISTRY, AnomalyModel, EnsembleModel, TissueModel, TrainingData
from bids_anomaly.models.baseline import IntensityBaseline, lesion_contrast
from bids_anomaly.models.data import valid_voxels
from bids_anomaly.models.deep.engine import EngineOptions
from bids_anomaly.postprocessing.thresholds import healthy_scores, tail_table, threshold_at_fpr

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The real data beside the repository (``../shared/data``), wherever the command is run from."""
PROTOCOLS = ("demo", "ixi", "mslub26-ixi", "mslub26-cohort", "stroke01-cohort", "mslub26-single",
             "mslub26-patients")
DIRECTIONS = {"ms": {"FLAIR": "+", "T2w": "+", "PDw": "+", "T1w": "-"},
              "stroke": {"FLAIR": "+", "T2w": "+", "PDw": "+", "T1w": "-"}}
"""The lesion contrast per kind (MS and chronic stroke: bright on FLAIR/T2w, dark on T1w)."""
TEST_SUBJECT_SHAPE = "patient26"
"""The MSLUB shape of sub-mslub26: never used to train or to insert."""
STROKE_TRAIN_SHAPES = 150
"""SOOP shapes (of the training half) given to the generator: enough variety, fast to load."""


@dataclass
class Protocol:
    """Training, calibration and test data of one protocol, and the lesion kind sought."""

    name: str
    fit: TrainingData
    calibration: TrainingData
    tests: dict[str, list[Case]]
    kind: str
    note: str
    shapes: list[Path] = field(default_factory=list)
    single: bool = False
    """Only the test subject: models that need no training alone."""
    raw: Path | None = None
    """The raw BIDS dataset of the test subjects (for the peer, which reads raw images)."""
    derivatives: Path | None = None
    """Their preprocessed derivatives (the peer's posterior is carried to template space)."""


@dataclass
class Row:
    """One model on one test set."""

    protocol: str
    model: str
    metrics: dict
    seconds: float


def split_shapes(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """MS and stroke shape files, split into ``train`` (even positions) and ``test`` (odd)."""
    split = {}
    for kind in ("ms", "stroke"):
        paths = [p for p in lesion_shape_paths(folder, kind) if TEST_SUBJECT_SHAPE not in p.name]
        split[kind] = {"train": paths[0::2], "test": paths[1::2]}
    return split


def lesioned(subjects, paths: list[Path], kind: str, template: Template, seed: int
             ) -> list[Case]:
    """The subjects' T1w with real lesions of ``kind`` from ``paths`` inserted."""
    rng = np.random.default_rng(seed)
    gm, wm = load_tissue_maps(template)
    cases = []
    for subject in subjects:
        reference = nib.load(subject.mask)
        chosen = ([paths[i] for i in rng.choice(len(paths), 3, replace=False)] if kind == "ms"
                  else [pick_stroke_shape(paths, rng)])
        shapes = [load_lesion_shape(path, reference) for path in chosen]
        image, mask = subject.load()
        changed, truth = insert_lesions({"T1w": image[0].numpy()}, mask.numpy(), gm, wm, shapes,
                                        kind, rng)
        cases.append(Case(subject.name, torch.from_numpy(changed["T1w"])[None], mask, truth,
                          valid_voxels(image, mask).numpy()))
    return cases


def tissue_maps(template: Template) -> list[Path]:
    """The template's GM, WM and CSF probability maps (the tissue model's priors)."""
    return [template.probseg[t] for t in ("GM", "WM", "CSF")]


def ixi(args, template: Template, shapes: dict) -> Protocol:
    """Synthetic MS and stroke lesions in held-out IXI T1w."""
    order = sorted(HEALTHY)
    random.Random(args.seed).shuffle(order)
    subjects = [subject_images(args.derivatives, s, None, ["T1w"]) for s in order]
    test = subjects[N_FIT + N_CALIBRATION:]
    tests = {kind: lesioned(test, shapes[kind]["test"], kind, template, args.seed)
             for kind in ("ms", "stroke")}
    return Protocol("ixi", TrainingData(subjects[:N_FIT], ["T1w"], regions=template.dseg,
                                        tissues=tissue_maps(template)),
                    TrainingData(subjects[N_FIT:N_FIT + N_CALIBRATION], ["T1w"]), tests, "ms",
                    f"IXI T1w, fit {N_FIT}, calibrate {N_CALIBRATION}, test 3 x (MS, stroke)",
                    shapes["ms"]["train"] + shapes["stroke"]["train"][:STROKE_TRAIN_SHAPES])


def patient_case(args, subject: str, channels: list[str], reference: str) -> Case:
    """A real patient with its lesion mask in template space."""
    images = subject_images(args.derivatives, subject, None, channels)
    image, mask = images.load()
    truth = ground_truth(args.bids_dir, args.derivatives, subject, reference)
    return Case(images.name, image, mask, truth, valid_voxels(image, mask).numpy())


def mslub26_ixi(args, template: Template, shapes: dict) -> Protocol:
    """sub-mslub26's T1w against IXI controls."""
    subjects = [subject_images(args.derivatives, s, None, ["T1w"]) for s in sorted(HEALTHY)]
    return Protocol("mslub26-ixi", TrainingData(subjects[:8], ["T1w"], regions=template.dseg,
                                                tissues=tissue_maps(template)),
                    TrainingData(subjects[8:], ["T1w"]),
                    {"mslub26": [patient_case(args, "mslub26", ["T1w"], "T1w")]}, "ms",
                    "T1w; fit 8 IXI, calibrate 2 IXI", shapes["ms"]["train"])


def cohort(args, template: Template, shapes: dict, subject: str, channels: list[str],
           reference: str, kind: str) -> Protocol:
    """A patient scored by models trained on a contaminated cohort that includes it."""
    sessions = [subject_images(args.derivatives, s, ses, channels) for s, ses in COHORT]
    calibration = sessions[-1:]
    patient = subject_images(args.derivatives, subject, None, channels)
    fit = TrainingData([*sessions[:-1], patient], channels, regions=template.dseg,
                       tissues=tissue_maps(template))
    note = (f"{', '.join(channels)}; fit {', '.join(fit.names)} (unlabelled); calibrate "
            f"{calibration[0].name}")
    return Protocol(f"{subject}-cohort", fit, TrainingData(calibration, channels),
                    {subject: [patient_case(args, subject, channels, reference)]}, kind, note,
                    shapes[kind]["train"][:STROKE_TRAIN_SHAPES], raw=args.bids_dir,
                    derivatives=args.derivatives)


def single(args, template: Template, shapes: dict) -> Protocol:
    """sub-mslub26 alone: nothing but the subject (models that need no training)."""
    channels = ["T1w", "FLAIR", "T2w"]
    case = patient_case(args, "mslub26", channels, "T1w")
    alone = TrainingData([subject_images(args.derivatives, "mslub26", None, channels)], channels,
                         regions=template.dseg, tissues=tissue_maps(template))
    return Protocol("mslub26-single", alone, alone, {"mslub26": [case]}, "ms",
                    "sub-mslub26 alone (T1w, FLAIR, T2w): no other subject, no label",
                    single=True, raw=args.bids_dir, derivatives=args.derivatives)


def patients(args, template: Template, shapes: dict) -> Protocol:
    """sub-mslub26 scored by models trained on the mslubL sessions alone (never on it)."""
    channels = ["T1w", "FLAIR", "T2w"]
    sessions = [subject_images(args.derivatives, s, ses, channels) for s, ses in COHORT]
    fit = TrainingData(sessions[:-1], channels, regions=template.dseg,
                       tissues=tissue_maps(template))
    note = (f"{', '.join(channels)}; fit {', '.join(fit.names)} (patients, unlabelled); "
            f"calibrate {sessions[-1].name}; sub-mslub26 never seen by the train level")
    return Protocol("mslub26-patients", fit, TrainingData(sessions[-1:], channels),
                    {"mslub26": [patient_case(args, "mslub26", channels, "T1w")]}, "ms", note,
                    shapes["ms"]["train"], raw=args.bids_dir, derivatives=args.derivatives)


def demo(args, template: Template, shapes: dict) -> Protocol:
    """The demo dataset: controls fit and calibrate, patients test."""
    raw = args.demo / "rawdata"
    derivatives = args.demo / "derivatives" / "bids_anomaly"
    card = json.loads((derivatives / "models" / "model-normative" / "model.json").read_text())
    channels = card["channels"]
    healthy = sorted(p.name[4:] for p in raw.glob("sub-healthy*"))
    subjects = [subject_images(derivatives, s, None, channels) for s in healthy]
    cases = []
    for subject in sorted(p.name[4:] for p in raw.glob("sub-patient*")):
        images = subject_images(derivatives, subject, None, channels)
        transform = (derivatives / f"sub-{subject}" / "anat" /
                     f"sub-{subject}_from-T1w_to-{TEMPLATE_NAME}_mode-image_xfm.h5")
        truth = truth_in_template(
            find_ground_truth(raw / "derivatives" / "lesion_masks", subject, None), images.mask,
            {"T1w": raw / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz"},
            {"T1w": [transform]})
        image, mask = images.load()
        cases.append(Case(images.name, image, mask, truth, valid_voxels(image, mask).numpy()))
    return Protocol("demo", TrainingData(subjects[:-1], channels, regions=template.dseg,
                                         tissues=tissue_maps(template)),
                    TrainingData(subjects[-1:], channels), {"demo": cases}, "ms",
                    f"{', '.join(channels)}; fit {len(subjects) - 1} controls, calibrate 1",
                    shapes["ms"]["train"], raw=raw, derivatives=derivatives)


def baseline_for(channels: list[str]) -> tuple[str, AnomalyModel]:
    """The intensity baseline of the lesion contrast: FLAIR, else T2w bright, else T1w dark."""
    channel, direction = lesion_contrast(channels)
    return (f"baseline {channels[channel]} {direction} z",
            REGISTRY["intensity"](channel=channel, direction=direction))


class MedianBaseline(IntensityBaseline):
    """The strong baseline of ../shared/LESIONS.md: a 3-voxel median filter, then the robust z.

    Benchmark only (it is the bar every lesion family is read against, not a family): sub-mslub26
    0.573 AUPRC in LESIONS.md's protocol (MNI 1 mm, native scan).
    """

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The baseline's score of the channel after a 3-voxel median filter."""
        from scipy import ndimage

        filtered = image.clone()
        filtered[self.channel] = torch.from_numpy(ndimage.median_filter(
            image[self.channel].cpu().numpy(), size=3)).to(image.device)
        return super().score(filtered, mask)


def baselines_for(channels: list[str]) -> list[tuple[str, AnomalyModel]]:
    """The plain baseline and the strong one (median-filtered) of the lesion contrast."""
    label, plain = baseline_for(channels)
    return [(label, plain), (label.replace(" z", " median3 z"),
                             MedianBaseline(channel=plain.channel, direction=plain.direction))]


class ChannelSubset:
    """A model given only some of the protocol's channels (the tissue model's ablations)."""

    def __init__(self, model: AnomalyModel, channels: list[str], chosen: list[str]) -> None:
        self.model = model
        self.channels = chosen
        self.index = [channels.index(c) for c in chosen]
        self.self_calibrated = getattr(model, "self_calibrated", False)

    def fit(self, data: TrainingData) -> None:
        """Fit the model on the chosen channels."""
        self.model.fit(dataclasses.replace(data, channels=self.channels))

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model's score of the chosen channels."""
        return self.model.score(image[self.index], mask)

    def simulated_scores(self) -> np.ndarray:
        """The model's own healthy scores."""
        return self.model.simulated_scores()


def tissue_rows(channels: list[str], seed: int) -> list[tuple[str, AnomalyModel]]:
    """The tissue model with the defaults, and its ablations where FLAIR is there."""
    rows = [("tissue", TissueModel(random_seed=seed))]
    if "FLAIR" not in channels:
        return rows
    rows += [("tissue ablation: no robust weighting", TissueModel(outlier_distance=0,
                                                                  random_seed=seed)),
             ("tissue ablation: no location prior", TissueModel(lesion_prior="none",
                                                               random_seed=seed)),
             ("tissue ablation: no growth", TissueModel(growth=0, random_seed=seed)),
             ("tissue ablation: growth 0.5", TissueModel(growth=0.5, random_seed=seed)),
             ("tissue ablation: growth 2", TissueModel(growth=2, random_seed=seed)),
             ("tissue ablation: tissue MRF 0.5", TissueModel(mrf=0.5, random_seed=seed))]
    for chosen in (["FLAIR"], ["T1w", "FLAIR"]):
        if set(chosen) <= set(channels) and chosen != channels:
            rows.append((f"tissue ablation: {' + '.join(chosen)} only",
                         ChannelSubset(TissueModel(random_seed=seed), channels, chosen)))
    return rows


def models_for(protocol: Protocol, args, cache: Path) -> list[tuple[str, AnomalyModel]]:
    """The leaderboard's models for a protocol, unfitted, in table order."""
    channels = protocol.fit.channels
    directions = [f"{c}:{s}" for c, s in DIRECTIONS[protocol.kind].items() if c in channels]
    training = EngineOptions(epochs=args.epochs, batch_size=args.batch_size,
                             patience=args.patience, num_workers=0, seed=args.seed,
                             precision="auto")
    deep = {"mode": "2d", "width": args.width, "training": training, "cache_dir": cache}
    lesion_shapes = None
    if protocol.shapes:
        lesion_shapes = str(cache / f"shapes-{protocol.name}")
        Path(lesion_shapes).mkdir(parents=True, exist_ok=True)
        for path in protocol.shapes:
            link = Path(lesion_shapes) / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    synthetic = {"anomaly_contrast": protocol.kind, "direction": directions,
                 "anomaly_shapes": ["ellipsoid", "blob"] + (["lesion"] if lesion_shapes else []),
                 "lesion_shapes": lesion_shapes}
    if protocol.single:
        return [(label, model) for label, model in [*baselines_for(channels),
                                                     *tissue_rows(channels, args.seed)]
                if chosen(label, args.families)]
    models = [*baselines_for(channels),
              *tissue_rows(channels, args.seed)[:1 if protocol.name != "demo" else None],
              ("normative", REGISTRY["normative"]()),
              ("normative directed", REGISTRY["normative"](direction=directions)),
              ("gmm (K by BIC)", REGISTRY["gmm"](n_components="auto", max_components=6,
                                                 max_samples=300_000,
                                                 random_seed=args.seed)),
              ("dae 2d", REGISTRY["dae"](residual="both", **deep)),
              ("segment 2d" + (f" trim {args.negative_trim}" if args.negative_trim else ""),
               REGISTRY["segment"](**deep, **synthetic, negative_trim=args.negative_trim)),
              ("restore 2d", REGISTRY["restore"](**deep, **synthetic)),
              *ddpm_rows(deep, directions, args),
              ("patch-ocsvm voxel", REGISTRY["patch-ocsvm"](
                  latent_model="voxel", pairs_per_subject=args.pairs_per_subject,
                  patch_side=args.patch_side, patch_scaling=args.patch_scaling,
                  code_size=args.code_size, latent_per_tissue=args.latent_per_tissue,
                  training=dataclasses.replace(training, batch_size=1000), cache_dir=cache,
                  n_jobs=args.threads, random_seed=args.seed))]
    return [(label, model) for label, model in models
            if chosen(label, args.families)]


DDPM_CONDITION_SCALE = 8
"""The conditioned variant's blocks (16 mm at 2 mm): coarser than the lesions sought."""


def ddpm_rows(deep: dict, directions: list[str], args) -> list[tuple[str, AnomalyModel]]:
    """The diffusion variants that train a network of their own (2D, partial noising)."""
    diffusion = {**deep, "direction": directions, "noise_level": args.noise_level,
                 "ddim_steps": args.ddim_steps}
    return [("ddpm gaussian", REGISTRY["ddpm"](**diffusion)),
            ("ddpm simplex (AnoDDPM)", REGISTRY["ddpm"](noise="simplex", **diffusion)),
            (f"ddpm patches {args.noise_patch} (pDDPM)",
             REGISTRY["ddpm"](noise_patch=args.noise_patch, **diffusion)),
            (f"ddpm conditioned on {DDPM_CONDITION_SCALE}-voxel blocks (cDDPM-like)",
             REGISTRY["ddpm"](condition_scale=DDPM_CONDITION_SCALE, **diffusion))]


def chosen(label: str, families: list[str] | None) -> bool:
    """Whether ``--families`` keeps the model ``label`` (its first word or its start named)."""
    return not families or any(label == name or label.startswith(f"{name} ")
                               for name in families)


def evaluate(model: AnomalyModel, cases: list[Case], threshold: float) -> dict:
    """Pooled voxel metrics and summed lesion-wise detection at ``threshold``."""
    scores, truths, detection = [], [], []
    start = time.perf_counter()
    with torch.no_grad():
        for case in cases:
            score = model.score(case.image, case.mask).double().numpy()
            scores.append(score[case.evaluated])
            truths.append(case.truth[case.evaluated])
            predicted = (score > threshold) & case.evaluated
            detection.append(lesion_metrics(predicted, case.truth > 0.5))
    metrics = voxel_metrics(np.concatenate(scores), np.concatenate(truths), threshold)
    lesions = sum(d["n_lesions"] for d in detection)
    metrics["lesion_sensitivity"] = (sum(d["lesions_detected"] for d in detection) / lesions
                                     if lesions else float("nan"))
    metrics["fp_clusters_per_subject"] = (sum(d["false_positive_clusters"] for d in detection)
                                          / len(cases))
    metrics["score_seconds"] = (time.perf_counter() - start) / len(cases)
    return metrics


def run_protocol(protocol: Protocol, args, cache: Path, curves: list[dict]) -> list[Row]:
    """Fit, calibrate and evaluate every model of the leaderboard on one protocol.

    The deep models' loss per epoch is appended to ``curves``.
    """
    print(f"{protocol.name}: {protocol.note}", flush=True)
    rows: list[Row] = []
    fitted: dict[str, tuple[AnomalyModel, dict]] = {}

    def record(label: str, model: AnomalyModel, seconds: float) -> None:
        calibration = (model.simulated_scores() if getattr(model, "self_calibrated", False)
                       else healthy_scores(model, protocol.calibration))
        threshold = threshold_at_fpr(calibration, args.fpr)
        fitted[label] = (model, tail_table(calibration))
        for test, cases in protocol.tests.items():
            metrics = evaluate(model, cases, threshold)
            rows.append(Row(f"{protocol.name}/{test}", label, metrics, seconds))
            print(f"  {test} {label} ({seconds:.0f} s): AUPRC {metrics['auprc']:.3f} Dice "
                  f"{metrics['dice']:.3f} oracle {metrics['oracle_dice']:.3f}", flush=True)

    for label, model in models_for(protocol, args, cache):
        start = time.perf_counter()
        model.fit(protocol.fit)
        seconds = time.perf_counter() - start
        curves += [{"protocol": protocol.name, "model": label, **row}
                   for row in getattr(model, "fit_report", {}).get("history", [])]
        record(label, model, seconds)
        if label == "ddpm gaussian":  # sMHD: the same network, several reconstructions
            record(f"ddpm gaussian, Mahalanobis over {args.reconstructions} (sMHD)",
                   model.with_inference(args.reconstructions, "mahalanobis"), seconds)
        for steps in args.ddim_ablation if label.startswith("ddpm ") else []:
            if steps != args.ddim_steps:  # the same network, denoising in other steps
                record(f"{label}, {steps} DDIM steps", model.with_inference(ddim_steps=steps),
                       seconds)
        if label == "patch-ocsvm voxel":  # the other variants share its autoencoder
            for variant in ("global", "patient", "mmst"):
                start = time.perf_counter()
                other = model.with_latent_model(variant, protocol.fit)
                record(f"patch-ocsvm {variant}", other, time.perf_counter() - start)
        if label.startswith("baseline") and (protocol.name.endswith("-cohort")
                                             or protocol.single):
            # the usual clinical practice: each patient's own z-scores, thresholded at the
            # 1 - fpr quantile of its own brain (the reference of the acceptance figures)
            for test, cases in protocol.tests.items():
                own = np.concatenate([model.score(c.image, c.mask).double().numpy()[c.evaluated]
                                      for c in cases])
                metrics = evaluate(model, cases, threshold_at_fpr(own, args.fpr))
                rows.append(Row(f"{protocol.name}/{test}", f"{label} (own brain)", metrics, 0))
                print(f"  {test} {label} own brain: AUPRC {metrics['auprc']:.3f} Dice "
                      f"{metrics['dice']:.3f}", flush=True)
    rows += peer_rows(protocol, args)
    if protocol.single:
        return rows
    rows += recipe_rows(protocol, fitted, record)
    members = [label for label in fitted
               if label == "normative directed" or label.startswith(("segment", "restore"))
               or (args.ensemble_baseline and label.startswith("baseline"))]
    if len(members) >= 2:
        ensemble = EnsembleModel(combine="mean")
        for label in members:
            model, tail = fitted[label]
            ensemble.add(label, model, protocol.fit.channels, tail)
        ensemble.fit(protocol.fit)
        names = [m.split()[0] if not m.startswith("baseline") else " ".join(m.split()[:2])
                 for m in members]
        record(f"ensemble ({' + '.join(names)})", ensemble, 0.0)
    return rows


def recipe_rows(protocol: Protocol, fitted: dict, record) -> list[Row]:
    """Ensembles of the README's recipes built from this protocol's models (fixed beforehand).

    Recipe (a), patients without controls or labels, is ``--single-subject tissue``: the
    ``tissue`` row. Its ensemble alternative, ``train --model-type ensemble --members tissue
    intensity`` on the patients, on protocols whose cohort is patients; (b) with healthy
    controls: ``--members tissue normative`` after ``train --model-type normative --direction
    ...`` on the controls (``normative directed``, on protocols whose cohort is controls).
    Rows are added through ``record`` (calibrated like every ensemble); returns no rows itself.
    """
    if "tissue" not in fitted:
        return []
    patients_only = protocol.name.endswith(("-patients", "-cohort"))
    partner = "baseline" if patients_only else "normative directed"
    chosen = [label for label in fitted if label.startswith(partner)]
    if not chosen:
        return []
    ensemble = EnsembleModel(combine="mean")
    for label in ("tissue", chosen[0]):
        model, tail = fitted[label]
        ensemble.add(label, model, protocol.fit.channels, tail)
    ensemble.fit(protocol.fit)
    label = ("ensemble --members tissue intensity (patients; recipe (a) is the tissue row)"
             if patients_only else "recipe (b) ensemble --members tissue normative")
    start = time.perf_counter()
    record(label, ensemble, time.perf_counter() - start)
    return []


def peer_rows(protocol: Protocol, args) -> list[Row]:
    """SAMSEG lesion mode on each test subject's raw T1w + FLAIR (in its own environment).

    Where the test subjects have both (real or generated raw images, no inserted lesions); the
    lesion posterior is carried into template space through the subject's T1w-to-template
    transform and evaluated like every model, thresholded at 0.5 (SAMSEG's own level); seconds
    are the mean per subject.
    """
    if args.samseg_env is None or protocol.raw is None:
        return []
    import samseg_peer

    from bids_anomaly.imaging.spatial import apply_transforms

    rows = []
    for test, cases in protocol.tests.items():
        scores, truths, detection, seconds = [], [], [], []
        for case in cases:
            subject = case.name.removeprefix("sub-")
            anat = protocol.raw / f"sub-{subject}" / "anat"
            images = [anat / f"sub-{subject}_{c}.nii.gz" for c in ("T1w", "FLAIR")]
            if not all(path.is_file() for path in images):
                return rows
            result = samseg_peer.run_samseg_lesion(
                images, args.samseg_env.parent / case.name,
                samseg_peer.build_env(args.samseg_env), threads=args.threads)
            seconds.append(result.seconds)
            derived = protocol.derivatives / f"sub-{subject}" / "anat"
            with tempfile.TemporaryDirectory() as folder:
                carried = apply_transforms(
                    result.posterior,
                    derived / f"sub-{subject}_space-{TEMPLATE_NAME}_res-2_desc-brain_mask.nii.gz",
                    [derived / f"sub-{subject}_from-T1w_to-{TEMPLATE_NAME}_mode-image_xfm.h5"],
                    Path(folder) / "posterior.nii.gz")
                posterior = np.asarray(nib.load(carried).dataobj, dtype=np.float64)
            scores.append(posterior[case.evaluated])
            truths.append(case.truth[case.evaluated])
            detection.append(lesion_metrics((posterior > 0.5) & case.evaluated,
                                            case.truth > 0.5))
        metrics = voxel_metrics(np.concatenate(scores), np.concatenate(truths), 0.5)
        lesions = sum(d["n_lesions"] for d in detection)
        metrics["lesion_sensitivity"] = (sum(d["lesions_detected"] for d in detection) / lesions
                                         if lesions else float("nan"))
        metrics["fp_clusters_per_subject"] = (sum(d["false_positive_clusters"]
                                                  for d in detection) / len(cases))
        metrics["score_seconds"] = float(np.mean(seconds))
        label = "peer: SAMSEG 0.4a0 lesion mode (T1w + FLAIR; Dice at posterior 0.5)"
        rows.append(Row(f"{protocol.name}/{test}", label, metrics, float(np.mean(seconds))))
        print(f"  {test} {label} ({np.mean(seconds):.0f} s): AUPRC {metrics['auprc']:.3f} Dice "
              f"{metrics['dice']:.3f}", flush=True)
    return rows


def format_value(value: float) -> str:
    """Three decimals, ``n/a`` for NaN."""
    return "n/a" if value is None or np.isnan(value) else f"{value:.3f}"


COLUMNS = ("auroc", "auprc", "oracle_dice", "dice", "lesion_sensitivity",
           "fp_clusters_per_subject")


def write_tables(rows: list[Row], notes: dict[str, str], out: Path, header: str) -> None:
    """The leaderboard as Markdown (one table per test set) and TSV (every row)."""
    table = pd.DataFrame([{"test": r.protocol, "model": r.model, "fit_seconds": round(r.seconds),
                           "score_seconds": round(r.metrics.get("score_seconds", float("nan")), 1),
                           **{k: r.metrics[k] for k in (*COLUMNS, "predicted_voxels",
                                                        "truth_voxels")}} for r in rows])
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".tsv"), sep="\t", index=False, float_format="%.4f")
    lines = [header, ""]
    for test, group in table.groupby("test", sort=False):
        lines += [f"### {test}", "", notes.get(test.split("/")[0], ""), "",
                  "| model | AUROC | AUPRC | oracle Dice | Dice@thr | lesion sens. | "
                  "FP clusters/subj | fit s | score s/subj |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for _, r in group.iterrows():
            lines.append(f"| {r['model']} | " + " | ".join(format_value(r[c]) for c in COLUMNS)
                         + f" | {r['fit_seconds']} | {r['score_seconds']} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def write_curves(curves: list[dict], out: Path) -> None:
    """The deep models' losses per epoch as ``OUT_curves.tsv`` (none: nothing written)."""
    if curves:
        pd.DataFrame(curves).to_csv(out.with_name(f"{out.name}_curves.tsv"), sep="\t",
                                    index=False, float_format="%.5g")


def add_common_arguments(parser: argparse.ArgumentParser, epochs: int = 12, patience: int = 4,
                         batch_size: int = 16, width: int = 16) -> None:
    """The data, the threshold and the deep models' training: what the benchmarks share."""
    parser.add_argument("--derivatives", type=Path, required=True)
    parser.add_argument("--shapes", type=Path, default=SHARED_DATA / "lesion_shapes")
    parser.add_argument("--bids-dir", type=Path, default=SHARED_DATA / "bids_real")
    parser.add_argument("--demo", type=Path, help="a finished 'bids_anomaly demo DIR' folder")
    parser.add_argument("--fpr", type=float, default=0.001)
    parser.add_argument("--negative-trim", type=float, default=0.0,
                        help="segment's --negative-trim (an ablation for contaminated cohorts)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--patience", type=int, default=patience)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--template-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "bids_anomaly_bench_templates")


def main() -> None:
    """Run the chosen protocols and write the leaderboard."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--families", nargs="+",
                        help="only these (the first word of a label, or its start: 'ddpm "
                             "simplex')")
    parser.add_argument("--ensemble-baseline", action="store_true",
                        help="also put the intensity baseline into the ensemble (an ablation)")
    parser.add_argument("--pairs-per-subject", type=int, default=5000,
                        help="patch-ocsvm: siamese training pairs per subject and epoch")
    parser.add_argument("--patch-side", type=int, default=9, help="patch-ocsvm (an ablation)")
    parser.add_argument("--patch-scaling", default="cohort", help="patch-ocsvm (an ablation)")
    parser.add_argument("--code-size", type=int, default=16, help="patch-ocsvm (an ablation)")
    parser.add_argument("--latent-per-tissue", action="store_true",
                        help="patch-ocsvm: latent models per template tissue (an ablation)")
    parser.add_argument("--noise-level", type=int, default=250,
                        help="ddpm: the timestep images are noised to (of 1000)")
    parser.add_argument("--ddim-steps", type=int, default=10, help="ddpm: DDIM steps back")
    parser.add_argument("--ddim-ablation", type=int, nargs="+", default=[], metavar="N",
                        help="ddpm: also score each trained network with these DDIM steps")
    parser.add_argument("--noise-patch", type=int, default=48,
                        help="ddpm: side of the noised box of the pDDPM variant, in voxels")
    parser.add_argument("--reconstructions", type=int, default=4,
                        help="ddpm: reconstructions of the sMHD variant")
    parser.add_argument("--samseg-env", type=Path,
                        help="folder of SAMSEG's own environment (built there once by "
                             "benchmarks/samseg_peer.py; its runs are cached beside it): adds "
                             "the peer's rows to mslub26-single")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    template = get_template(2, args.template_dir)
    shapes = split_shapes(args.shapes)
    builders = {
        "demo": lambda: demo(args, template, shapes),
        "ixi": lambda: ixi(args, template, shapes),
        "mslub26-ixi": lambda: mslub26_ixi(args, template, shapes),
        "mslub26-cohort": lambda: cohort(args, template, shapes, "mslub26",
                                         ["T1w", "FLAIR", "T2w"], "T1w", "ms"),
        "stroke01-cohort": lambda: cohort(args, template, shapes, "stroke01", ["T2w"], "T2w",
                                          "stroke"),
        "mslub26-single": lambda: single(args, template, shapes),
        "mslub26-patients": lambda: patients(args, template, shapes),
    }
    rows, notes, curves = [], {}, []
    with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as folder:
        for name in args.protocols:
            if name == "demo" and args.demo is None:
                print("demo: skipped (no --demo folder)")
                continue
            protocol = builders[name]()
            notes[protocol.name] = protocol.note
            rows += run_protocol(protocol, args, Path(folder), curves)
            write_tables(rows, notes, args.out, _header(args, start))
            write_curves(curves, args.out)
    write_tables(rows, notes, args.out, _header(args, start))
    print(f"total {time.perf_counter() - start:.0f} s; tables in {args.out}.md / .tsv")


def _header(args, start: float) -> str:
    """What the tables were computed with."""
    return (f"Accuracy leaderboard (voxel FPR {args.fpr} thresholds from held-out data; deep "
            f"models 2D, width {args.width}, at most {args.epochs} epochs, patience "
            f"{args.patience}, seed {args.seed}, CPU x{args.threads}; ddpm noise level "
            f"{args.noise_level}, {args.ddim_steps} DDIM steps; "
            f"{time.perf_counter() - start:.0f} s so far)")


if __name__ == "__main__":
    main()
