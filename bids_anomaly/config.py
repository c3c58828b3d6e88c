"""The settings of a run, in documented sections; the command line is generated from them.

:class:`Settings` groups :class:`InputSettings`, :class:`ExecutionSettings`,
:class:`PreprocessingSettings`, :class:`ModelSettings`, :class:`PostprocessingSettings` and
:class:`GroupSettings`. Every field is declared once, with :func:`option`: its default, its
meaning (the ``--help`` text), its command-line flag and the levels it applies to.
:mod:`bids_anomaly.cli.parser` builds the parser from these declarations, and the model
families declare their own options the same way (:mod:`bids_anomaly.models`). A run's settings
are written as TOML (``OUTPUT_DIR/logs/<time>_<level>/bids_anomaly.toml``) and read back by
``--config-file``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from bids_anomaly import __version__
from bids_anomaly.errors import UsageError

MODALITIES = ("T1w", "FLAIR", "T2w", "PDw", "T2starw", "swi", "MEGRE")
"""Anatomical suffixes the tool reads, in order of preference for the reference image."""

SUSCEPTIBILITY = ("T2starw", "swi", "MEGRE")
"""Susceptibility-weighted suffixes: T2*-weighted GRE, SWI (BEP004, the magnitude part) and
multi-echo GRE (its echoes combined into one image, ``--echo-combination``)."""

ECHO_COMBINATIONS = ("rss", "mean", "first")
"""How the echoes of a multi-echo GRE become one image: root-sum-of-squares, mean, first."""

DIFFUSION_MAPS = ("FA", "MD", "AD", "RD")
"""Diffusion-tensor maps a subject with ``dwi`` runs gets as channels: fractional anisotropy,
mean, axial and radial diffusivity (mm^2/s)."""

CHANNELS = MODALITIES + DIFFUSION_MAPS
"""Everything a model may take as a channel (``--channels``)."""

LEVELS = ("participant", "train", "group")
"""The analysis levels."""

DEFAULT_FPR = 0.001
"""Default voxel-wise false-positive rate for a model's calibrated threshold.

One healthy brain voxel in a thousand is flagged: about 240 voxels (2 ml) per healthy brain at
2 mm, a level at which lesions of a few millilitres stand out.
"""

MIN_TRAINING_SUBJECTS = 3
"""Subject/sessions a model is trained on at least: 2 to fit it, 1 to calibrate its threshold
(families that learn nothing from the data, :attr:`calibration_only`, need 1)."""

RESOLUTIONS = (1, 2)
"""Template voxel sizes (mm) the embedded template is offered at."""

REGISTRATIONS = ("Rigid", "Affine", "SyN")
"""Reference-to-template registrations."""

NORMALIZATIONS = ("robust-zscore", "whitestripe", "percentile")
"""Intensity normalisations inside the brain (:mod:`bids_anomaly.imaging.normalization`)."""

SKULL_STRIPPED = ("auto", "yes", "no")
"""``--skull-stripped`` choices: detect, declare stripped, or always run brain extraction."""

TUNING_OBJECTIVES = ("dice", "lesion-f1")
"""What the post-processing tuned on annotations maximises (``--tune-objective``)."""

RESTRICTIONS = {"brain": "brain mask", "wm": "template white matter dilated by one voxel"}
"""Where abnormal voxels may be flagged, with the sidecars' wording."""


# ------------------------------------------------------------------------ value parsers

def positive_int(value: str) -> int:
    """An integer of at least 1."""
    return at_least(1)(value)


def at_least(minimum: int) -> Callable[[str], int]:
    """The parser of an integer of at least ``minimum`` (see :func:`positive_int`)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from error
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return number

    parse.__name__ = f"at_least_{minimum}"
    return parse


def rate(value: str) -> float:
    """A number in (0, 1)."""
    number = float(value)
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return number


def volume(value: str) -> float:
    """A volume in mm3, 0 or more."""
    try:
        number = float(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a volume in mm3: {value!r}") from error
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"the volume must be 0 or more, not {value}")
    return number


def percentile(value: str) -> float:
    """A percentile in (0, 100)."""
    number = float(value)
    if not 0 < number < 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100), got {value}")
    return number


def count_or_fraction(value: str) -> int | float:
    """A number of subjects (an integer of at least 1) or a fraction in (0, 1)."""
    try:
        number = float(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a count or a fraction: {value!r}") from error
    if number.is_integer() and number >= 1:
        return int(number)
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"give a number of subjects (1 or more) or a fraction "
                                         f"in (0, 1), not {value}")
    return number


def memory_gb(value: str) -> float:
    """``--mem`` values such as ``8G``, ``8GB``, ``500M`` or ``8`` (GB), in GB."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)B?\s*", value, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read memory amount {value!r} (use e.g. 16G)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return number * {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0, "": 1.0}[unit]


def all_cpus() -> int:
    """All CPUs."""
    return os.cpu_count() or 1


MACHINE_DEFAULTS = (all_cpus,)
"""Factories of defaults that depend on the machine: :func:`help_text` says them in the words
of their docstring, with their value on this machine."""


# ------------------------------------------------------------------------ declarations

def option(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (),
           levels: tuple[str, ...] = LEVELS, factory: Callable[[], Any] | None = None,
           single_subject: bool = False, **argparse_options: Any) -> Any:
    """Declare a setting: its default, meaning and command-line flags.

    Parameters
    ----------
    default : object
        The value when nothing is said (use ``factory`` for lists and dicts).
    help : str
        What it means, for ``--help`` (``{default}`` is replaced by the default).
    flags : tuple of str
        Command-line flags; none for settings that are not set on the command line.
    levels : tuple of str
        The levels it applies to; given at another level it is a usage error.
    factory : callable, optional
        Builds the default (mutable defaults).
    single_subject : bool
        A model family's option that also applies to ``participant --single-subject``.
    **argparse_options
        ``type``, ``choices`` (a tuple, or :data:`MODEL_TYPES` / :data:`SINGLE_SUBJECT_TYPES`
        for the registered families), ``nargs``, ``metavar``, ``action``: as for
        ``argparse.add_argument``.
    """
    metadata = {"help": help, "flags": flags, "levels": levels, "argparse": argparse_options,
                "single_subject": single_subject}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def declared_options(cls: type) -> Iterator[dataclasses.Field]:
    """The fields of a settings or options dataclass that have a command-line flag."""
    for item in dataclasses.fields(cls):
        if item.metadata.get("flags"):
            yield item


def default_of(item: dataclasses.Field) -> Any:
    """The default value of a dataclass field."""
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None


def help_text(item: dataclasses.Field, here: bool = True) -> str:
    """The ``--help`` text of a declared setting, with its default filled in.

    A default that depends on the machine (:data:`MACHINE_DEFAULTS`) is said in the words of
    its factory's docstring, followed by its value on this machine unless ``here`` is False
    (the options page, the same everywhere).

    >>> from bids_anomaly.config import ExecutionSettings, declared_options
    >>> nprocs = {item.name: item for item in declared_options(ExecutionSettings)}["nprocs"]
    >>> help_text(nprocs, here=False)
    'processes running at once (default: all CPUs)'
    """
    factory = item.default_factory
    if factory in MACHINE_DEFAULTS:
        words = factory.__doc__.strip().split("\n")[0].rstrip(".")
        default = words[0].lower() + words[1:] + (f", here {factory()}" if here else "")
    else:
        default = str(default_of(item))
    return item.metadata["help"].replace("{default}", default)


# ------------------------------------------------------------------------ sections

@dataclass
class InputSettings:
    """What to read, where to write, which level to run."""

    bids_dir: Path | None = option(help="root of the BIDS dataset (read only)")
    output_dir: Path | None = option(help="root of the derivatives to write")
    analysis_level: str = option(
        "participant", "participant: preprocess (and score with --model); train: fit a model; "
        "group: tables, evaluation and report")
    participant_label: list[str] = option(
        help="participants to process (with or without sub-)", factory=list,
        flags=("--participant-label", "--participant_label"), nargs="+", metavar="LABEL")
    session_label: list[str] = option(
        help="sessions to process (default: all)", factory=list, flags=("--session-label",),
        nargs="+", metavar="LABEL")
    bids_filters: dict = option(
        help="pybids filters per lower-case suffix (from --bids-filter-file)", factory=dict)
    skip_bids_validation: bool = option(
        False, "do not refuse a dataset that fails the BIDS checks",
        flags=("--skip-bids-validation",), action="store_true")


@dataclass
class ExecutionSettings:
    """Resources and reproducibility."""

    work_dir: Path | None = option(
        help="folder for intermediate results and caches; reuse it to resume (default: "
             "OUTPUT_DIR/work)", flags=("-w", "--work-dir"), type=Path)
    nprocs: int = option(
        help="processes running at once (default: {default})", factory=all_cpus,
        flags=("--nprocs", "--n-cpus"), type=positive_int)
    omp_nthreads: int | None = option(
        help="threads per process for ITK and torch (default: min(8, nprocs)); 1 makes the "
             "results reproducible to the bit", flags=("--omp-nthreads",), type=positive_int)
    mem_gb: float | None = option(
        help="memory limit for scheduling, e.g. 16G", flags=("--mem", "--mem-gb"),
        type=memory_gb)
    device: str = option("auto", "auto, cpu or cuda (exit 75 if cuda is asked for and absent)",
                         flags=("--device",))
    random_seed: int = option(0, "seed of every random choice (default: {default})",
                              flags=("--random-seed",), type=int)
    stop_on_first_crash: bool = option(
        False, "stop at the first failing step instead of finishing the others; with --model, "
               "a subject without the model's channels stops the run before any work",
        flags=("--stop-on-first-crash",), action="store_true")
    verbose: int = option(0, "more log output (repeat for debug)", flags=("-v", "--verbose"),
                          action="count")

    @property
    def threads(self) -> int:
        """Threads per step: ``--omp-nthreads``, or min(8, nprocs)."""
        return self.omp_nthreads or min(8, self.nprocs)


@dataclass
class PreprocessingSettings:
    """How raw images become template-space channels."""

    resolution: int = option(2, "template-space voxel size in mm (default: {default})",
                             flags=("--resolution",), type=int, choices=RESOLUTIONS)
    registration: str = option(
        "SyN", "reference-to-template registration (default: SyN, affine then deformable: "
               "Dice 0.98 with the template mask in 2.8 s at 2 mm, Affine 0.96 in 1.3-2.4 s; "
               "see docs/usage.md)", flags=("--registration",), choices=REGISTRATIONS)
    normalization: str = option(
        "robust-zscore", "intensity normalisation inside the brain: robust-zscore (median and "
                         "IQR, default), whitestripe (normal-appearing white matter) or "
                         "percentile (1st-99th percentile to 0-1)",
        flags=("--normalization",), choices=NORMALIZATIONS)
    skull_stripped: str = option(
        "auto", "auto: images whose background is one constant value around a brain-sized "
                "object are taken as skull-stripped and not stripped again; yes: every "
                "reference image is skull-stripped; no: always run brain extraction (deepbet)",
        flags=("--skull-stripped",), choices=SKULL_STRIPPED)
    echo_combination: str = option(
        "rss", "how the echoes of a multi-echo GRE (MEGRE) become one channel: rss "
               "(root-sum-of-squares, default), mean, or first (the shortest echo)",
        flags=("--echo-combination",), choices=ECHO_COMBINATIONS)
    dwi_maps: list[str] = option(
        help="diffusion-tensor maps computed for subjects with dwi runs, as channels FA, MD, "
             "AD, RD (default: FA MD; none: ignore dwi)",
        factory=lambda: ["FA", "MD"], flags=("--dwi-maps",), nargs="+",
        choices=(*DIFFUSION_MAPS, "none"))
    dwi_derivatives: Path | None = option(
        help="derivative dataset with diffusion maps computed by another pipeline (QSIPrep-like "
             "BEP016 names, sub-<label>/dwi/*_param-fa_dwimap.nii.gz): used instead of fitting "
             "the dwi runs", flags=("--dwi-derivatives",), type=Path, metavar="DERIV_DIR")
    dwi_registration: str = option(
        "Rigid", "b=0-to-reference registration of the diffusion runs: Rigid (default) or "
                 "Affine (absorbs some of the EPI's stretching)",
        flags=("--dwi-registration",), choices=("Rigid", "Affine"))
    sloppy: bool = option(
        False, "testing only: registrations and bias-field correction with few iterations "
               "(about 3x faster preprocessing, for generated data that starts near the "
               "template, as in the demo; never for real scans). Models trained on it refuse "
               "other data", flags=("--sloppy",), action="store_true")

    @property
    def dwi_params(self) -> tuple[str, ...]:
        """The diffusion maps asked for, in :data:`DIFFUSION_MAPS` order (none: empty)."""
        return tuple(m for m in DIFFUSION_MAPS if m in self.dwi_maps)

    def recorded(self) -> dict:
        """The choices a model must agree with (recorded in model cards)."""
        return {"registration": self.registration, "normalization": self.normalization,
                "dwi_registration": self.dwi_registration,
                "echo_combination": self.echo_combination, "sloppy": self.sloppy}


MODEL_TYPES = "model types"
"""``choices`` of a setting that names a registered model family (the parser fills them in)."""

SINGLE_SUBJECT_TYPES = "single-subject model types"
"""``choices`` of a setting that names a family that can be fitted on one subject."""


@dataclass
class ModelSettings:
    """Which model to train or apply; the family's own options are in ``options``."""

    model: list[str] = option(
        help="trained models to apply (names under OUTPUT_DIR/models/ or model directories); "
             "several are applied in one run, each subject preprocessed once",
        factory=list, flags=("--model",), levels=("participant",), nargs="+",
        metavar="NAME|PATH")
    model_type: str = option("normative", "the kind of model (default: {default})",
                             flags=("--model-type",), levels=("train",),
                             choices=MODEL_TYPES)
    model_name: str | None = option(help="name of the model (default: the type)",
                                    flags=("--model-name",), levels=("train",))
    train_filter: list[str] = option(
        help="participants.tsv rows to train on, e.g. group=healthy", factory=list,
        flags=("--train-filter",), levels=("train",), nargs="+", metavar="COLUMN=VALUE")
    channels: list[str] = option(
        help="channels to use: modalities and diffusion maps (train; default: the modalities "
             "every subject has; diffusion maps only when asked for); at the participant level, "
             "the channels of --single-subject (default: every modality of the subject; "
             "subjects without one of them are not scored)", factory=list,
        flags=("--channels",), levels=("train", "participant"), nargs="+", choices=CHANNELS)
    fpr: float = option(
        DEFAULT_FPR, "voxel false-positive rate of the calibrated threshold (train; and of "
                     "--single-subject; default: {default})", flags=("--fpr",), type=rate,
        levels=("train", "participant"))
    annotations: Path | None = option(
        help="derivative folder with lesion masks of some participants, named as for "
             "--ground-truth (weak supervision): the threshold, minimum cluster size and "
             "restriction are tuned on them by cross-validation and stored in the model; the "
             "stacked family learns from them. Annotated participants join the selection "
             "unless --participant-label is given; the others are the controls",
        flags=("--annotations",), levels=("train",), type=Path, metavar="DERIV_DIR")
    tune_objective: str = option(
        "dice", "what the post-processing tuned on --annotations maximises: dice (mean voxel "
                "Dice over the annotated subjects) or lesion-f1 (lesion-wise F1 of detection "
                "sensitivity and cluster precision) (default: {default})",
        flags=("--tune-objective",), levels=("train",), choices=TUNING_OBJECTIVES)
    splits: int | None = option(
        help="train N models, each on a random, age/sex-balanced (when participants.tsv has "
             "age and sex) part of the selected controls, the others held out for testing "
             "(models NAME-split01...); participant --model NAME scores with all of them, "
             "group reports the subject-level protocol per split with medians and IQR",
        flags=("--splits",), levels=("train",), type=positive_int, metavar="N")
    split_test_size: int | float = option(
        0.25, "controls held out per split: a number, or a fraction of the selected "
              "(default: {default})", flags=("--split-test-size",), levels=("train",),
        type=count_or_fraction, metavar="N|FRACTION")
    microbleeds: str | None = option(
        help="also detect cerebral microbleeds on this susceptibility-weighted channel (one of "
             "--channels: T2starw, swi or MEGRE): dark round blobs of 2-10 mm, vessel-like "
             "ones rejected, scored by the model's map and thresholded at --fp-per-subject "
             "false positives per held-out control",
        flags=("--microbleeds",), levels=("train",), choices=SUSCEPTIBILITY, metavar="CHANNEL")
    fp_per_subject: float = option(
        3.0, "microbleed candidates kept per healthy control on average (--microbleeds; "
             "default: {default})", flags=("--fp-per-subject",), levels=("train",), type=float,
        metavar="F")
    channel_scaling: str = option(
        "auto", "per-channel scaling learnt from the training subjects, (x - q1) / (q99 - q1) "
                "with their 1st and 99th percentiles, stored in the model: auto (default) "
                "scales the diffusion maps (in physical units) and leaves the anatomical "
                "channels (normalised per subject by preprocessing); quantile scales every "
                "channel (as Pinon et al. 2023); none",
        flags=("--channel-scaling",), levels=("train",), choices=("auto", "quantile", "none"))
    transfer: str | None = option(
        help="adapt this trained normative model (a name under OUTPUT_DIR/models/ or a model "
             "directory, trained with --site-column) to a new site from the selected controls "
             "of that site: only the site's random effects are estimated, without the original "
             "data; the threshold stays the original calibration's (model --model-name)",
        flags=("--transfer",), levels=("train",), metavar="NAME|PATH")
    extrapolate: bool = option(
        False, "score participants whose covariates (e.g. age) lie outside the training range "
               "of a model with --covariates, extrapolating its norms; without it they are "
               "refused", flags=("--extrapolate",), levels=("participant",),
        action="store_true")
    calibration_fraction: float = option(
        0.2, "share of the training subjects held out to calibrate the threshold", type=rate)
    single_subject: str | None = option(
        help="fit this model on each subject's own brain and flag its improbable voxels; for "
             "users without healthy controls. The threshold is the --fpr quantile of the fitted "
             "model itself", flags=("--single-subject",), levels=("participant",),
        choices=SINGLE_SUBJECT_TYPES)
    longitudinal: bool = option(
        False, "for subjects with two sessions or more (--session-label selects them): new, "
               "enlarging and shrinking lesions between consecutive sessions, from their own "
               "tissue models and a test of their intensity difference on the subject's "
               "midpoint space, at --fpr; every session is also scored on its own (by "
               "--single-subject, default tissue, or --model)",
        flags=("--longitudinal",), levels=("participant",), action="store_true")
    options: dict = option(
        help="the model family's options given on the command line (see the family's "
             "Options)", factory=dict)


@dataclass
class PostprocessingSettings:
    """From an anomaly map to a mask, clusters and regional tables (participant level)."""

    fdr: float | None = option(
        help="threshold by Benjamini-Hochberg at false-discovery rate Q on voxel p-values from "
             "the healthy calibration, instead of the voxel false-positive rate",
        flags=("--fdr",), levels=("participant",), type=rate, metavar="Q")
    min_cluster_mm3: float = option(
        0.0, "drop clusters of abnormal voxels smaller than this many cubic millimetres from "
             "the mask and the clusters table (default: 0, keep all)",
        flags=("--min-cluster-size",), levels=("participant",), type=volume, metavar="MM3")
    restrict: str = option(
        "brain", "flag abnormal voxels in the whole brain (default) or in the template's white "
                 "matter only (wm; for white-matter hyperintensities and MS lesions)",
        flags=("--restrict",), levels=("participant",), choices=tuple(RESTRICTIONS))
    atlas: Path | None = option(
        help="discrete atlas in the template's (MNI) space with a BIDS label table beside it "
             "(DSEG without .nii[.gz], plus .tsv: columns index, name); adds each cluster's "
             "region and the burden per region to the tables (participant), and its regions to "
             "the subject-level protocol of --splits models (group)", flags=("--atlas",),
        levels=("participant", "group"), type=Path, metavar="DSEG")
    report_modality: str | None = option(
        help="the image the participant pages draw the results on (default: FLAIR when the "
             "subject has one, else another lesion contrast, else the reference); group "
             "--ground-truth redraws them with the ground truth outlined",
        flags=("--report-modality",), levels=("participant", "group"), choices=MODALITIES)

    def given(self) -> list[str]:
        """Flags of the options set to something else than their default."""
        return [item.metadata["flags"][0] for item in declared_options(type(self))
                if getattr(self, item.name) != default_of(item)]


@dataclass
class GroupSettings:
    """Group tables, evaluation and statistics."""

    ground_truth: list[Path] = option(
        help="derivative folder(s) with lesion masks (*_label-<x>_mask.nii.gz or *_dseg.nii.gz) "
             "and microbleeds (*_label-microbleed_points.tsv or _mask.nii.gz) to evaluate "
             "against; the first folder holding a subject's file is used",
        flags=("--ground-truth",), levels=("group",), type=Path, nargs="+", factory=list,
        metavar="DERIV_DIR")
    control_label: str | None = option(
        help="the participants.tsv 'group' value of the controls in patients-vs-controls "
             "statistics (default: the first of healthy, control, controls, hc, cn present)",
        flags=("--control-label",), levels=("group",), metavar="GROUP")
    burden_threshold: str = option(
        "percentile", "subject-level protocol of --splits models: a voxel is abnormal above "
                      "the --control-percentile of the voxel scores of the split's training "
                      "controls (percentile, default, as in the Parkinson's disease papers) or "
                      "above the model's calibrated threshold (calibrated)",
        flags=("--burden-threshold",), levels=("group",), choices=("percentile", "calibrated"))
    control_percentile: float = option(
        98.0, "the percentile of --burden-threshold percentile (default: {default})",
        flags=("--control-percentile",), levels=("group",), type=percentile, metavar="P")
    bootstrap: int = option(2000, "bootstrap resamples of the confidence intervals (default: "
                                  "{default})", flags=("--bootstrap",), levels=("group",),
                            type=positive_int, metavar="N")


SECTIONS = {
    "inputs": InputSettings, "execution": ExecutionSettings,
    "preprocessing": PreprocessingSettings, "model": ModelSettings,
    "postprocessing": PostprocessingSettings, "group": GroupSettings,
}
"""Section name in :class:`Settings` (and in the TOML record) and its dataclass."""


@dataclass
class Settings:
    """Everything a run depends on, by section (built by ``cli.parser`` or by the demo)."""

    inputs: InputSettings = field(default_factory=InputSettings)
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    preprocessing: PreprocessingSettings = field(default_factory=PreprocessingSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    postprocessing: PostprocessingSettings = field(default_factory=PostprocessingSettings)
    group: GroupSettings = field(default_factory=GroupSettings)
    version: str = __version__

    # the places every level uses, by their short names
    @property
    def bids_dir(self) -> Path:
        """The input dataset."""
        return self.inputs.bids_dir

    @property
    def output_dir(self) -> Path:
        """The derivative dataset."""
        return self.inputs.output_dir

    @property
    def work_dir(self) -> Path:
        """The cache (``OUTPUT_DIR/work`` unless ``--work-dir``)."""
        return self.execution.work_dir or self.inputs.output_dir / "work"

    @property
    def level(self) -> str:
        """The analysis level."""
        return self.inputs.analysis_level

    def check(self) -> None:
        """Refuse settings that do not fit together (usage errors, exit 2).

        Raises
        ------
        UsageError
            Output or work folder inside the input, an option at a level it does not apply to,
            a post-processing option without a model, ``--fpr`` at the participant level
            without ``--single-subject``, ``--extrapolate`` without ``--model``,
            ``--dwi-derivatives`` with ``--dwi-maps none``. (The model families check their own
            options: :func:`bids_anomaly.models.check_family_options`.)
        """
        bids_dir, output_dir = self.inputs.bids_dir, self.inputs.output_dir
        if output_dir == bids_dir or bids_dir in output_dir.parents:
            raise UsageError(
                f"OUTPUT_DIR {output_dir} is inside BIDS_DIR {bids_dir}; the input dataset is "
                "never written to: choose an output folder outside it")
        if self.work_dir == bids_dir or bids_dir in self.work_dir.parents:
            raise UsageError(f"--work-dir {self.work_dir} is inside BIDS_DIR {bids_dir}")
        for section in (self.model, self.postprocessing, self.group):
            misplaced = [item for item in declared_options(type(section))
                         if self.level not in item.metadata["levels"]
                         and getattr(section, item.name) != default_of(item)]
            if misplaced:
                levels = sorted({lv for item in misplaced for lv in item.metadata["levels"]})
                raise UsageError(
                    f"{', '.join(item.metadata['flags'][0] for item in misplaced)} apply to the "
                    f"{' and '.join(levels)} level{'s' if len(levels) > 1 else ''}")
        if "none" in self.preprocessing.dwi_maps and len(self.preprocessing.dwi_maps) > 1:
            raise UsageError("--dwi-maps none cannot be combined with maps")
        if self.model.transfer and (self.model.splits or self.model.annotations is not None
                                    or self.model.options):
            raise UsageError("--transfer adapts a trained model as it is: it cannot be combined "
                             "with --splits, --annotations or the family's options")
        if self.model.splits and self.model.annotations is not None:
            raise UsageError("--splits repeats training on controls; it cannot be combined "
                             "with --annotations")
        if self.model.microbleeds and self.model.channels and (
                self.model.microbleeds not in self.model.channels):
            raise UsageError(f"--microbleeds {self.model.microbleeds} must be one of --channels "
                             f"({' '.join(self.model.channels)})")
        if self.model.fp_per_subject != 3.0 and not self.model.microbleeds:
            raise UsageError("--fp-per-subject needs --microbleeds CHANNEL")
        if not self.model.fp_per_subject > 0:
            raise UsageError("--fp-per-subject must be above 0")
        if self.model.extrapolate and not self.model.model:
            raise UsageError("--extrapolate applies to a model with covariates: give --model "
                             "NAME")
        if self.preprocessing.dwi_derivatives is not None and not self.preprocessing.dwi_params:
            raise UsageError("--dwi-derivatives gives diffusion maps: it cannot be combined "
                             "with --dwi-maps none")
        if self.model.longitudinal and not (self.model.model or self.model.single_subject):
            self.model.single_subject = "tissue"  # each session scored on its own as well
        if (self.level == "participant" and self.model.fpr != DEFAULT_FPR
                and not (self.model.single_subject or self.model.longitudinal)):
            raise UsageError("--fpr at the participant level is the false-positive rate of "
                             "--single-subject; a trained model's threshold was calibrated at "
                             "training (train --fpr)")
        if self.model.tune_objective != "dice" and self.model.annotations is None:
            raise UsageError("--tune-objective needs --annotations (the post-processing is "
                             "tuned on annotated subjects)")
        if (self.level == "participant" and self.model.channels
                and not self.model.single_subject):
            raise UsageError("--channels at the participant level chooses the channels of "
                             "--single-subject TYPE (a trained model keeps its own)")
        postprocessing = [flag for flag in self.postprocessing.given()
                          if self.level == "participant"
                          and flag not in ("--atlas", "--report-modality")
                          or self.level != "group" and flag == "--atlas"]
        if postprocessing and not (self.model.model or self.model.single_subject):
            raise UsageError(f"{', '.join(postprocessing)} need a model: --model NAME or "
                             "--single-subject TYPE")

    def to_toml(self) -> str:
        """Serialise by section, with paths as strings and unset values left out."""
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items() if v is not None}
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value

        record = {"version": self.version}
        for name in SECTIONS:
            values = dataclasses.asdict(getattr(self, name))
            record[name] = {key: plain(value) for key, value in values.items()
                            if value is not None}
        return tomli_w.dumps({"bids_anomaly": record})

    def write(self, path: Path) -> Path:
        """Write the settings as TOML to ``path`` and return it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_toml())
        return path
