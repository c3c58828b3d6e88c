"""The argument parser: the BIDS Apps contract of DESIGN.md, and the demo."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path

from bids_anomaly import __version__
from bids_anomaly.bids import check_bids_filters, check_label, check_model_name
from bids_anomaly.config import (
    DEEP_OPTIONS,
    DEFAULT_FPR,
    MODALITIES,
    SINGLE_SUBJECT_TRIM,
    Settings,
)
from bids_anomaly.demo import DEMO_HEALTHY, DEMO_MODALITIES, DEMO_PATIENTS
from bids_anomaly.errors import UsageError
from bids_anomaly.models import REGISTRY
from bids_anomaly.models.networks import DEEP_TYPES
from bids_anomaly.models.reconstruction import MODES, RESIDUALS
from bids_anomaly.normalization import METHODS
from bids_anomaly.postprocessing.regions import RESTRICTIONS
from bids_anomaly.skullstrip import MODES as SKULL_STRIPPED_MODES
from bids_anomaly.template import RESOLUTIONS
from bids_anomaly.training.engine import PRECISIONS

LEVELS = ("participant", "train", "group")


def _memory_gb(value: str) -> float:
    """Parse ``--mem`` values such as ``8G``, ``8GB``, ``500M`` or ``8`` (GB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)B?\s*", value, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read memory amount {value!r} (use e.g. 16G)")
    number, unit = float(match.group(1)), match.group(2).upper()
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0, "": 1.0}[unit]
    return number * scale


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _components(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return _positive_int(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {value}") \
            from error


def _trim(value: str) -> float:
    number = float(value)
    if not 0 <= number < 0.5:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.5), got {value}")
    return number


def _volume(value: str) -> float:
    try:
        volume = float(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a volume in mm3: {value!r}") from error
    if not volume >= 0:
        raise argparse.ArgumentTypeError(f"the volume must be 0 or more, not {value}")
    return volume


def _fpr(value: str) -> float:
    number = float(value)
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``bids_anomaly BIDS_DIR OUTPUT_DIR LEVEL``."""
    parser = argparse.ArgumentParser(
        prog="bids_anomaly",
        description="Unsupervised anomaly detection and segmentation in brain MRI (BIDS App). "
                    "Run 'bids_anomaly demo OUTDIR' for a complete example on generated data.",
    )
    parser.add_argument("bids_dir", type=Path, help="root of the BIDS dataset (read only)")
    parser.add_argument("output_dir", type=Path, help="root of the derivatives to write")
    parser.add_argument("analysis_level", choices=LEVELS,
                        help="participant: preprocess (and score with --model); train: fit a "
                             "model; group: tables, evaluation and report")
    parser.add_argument("--version", action="version", version=f"bids_anomaly {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug)")
    parser.add_argument("--config-file", type=Path, metavar="TOML",
                        help="settings of an earlier run (OUTPUT_DIR/logs/<time>_<level>/"
                             "bids_anomaly.toml); options given on the command line win")
    parser.add_argument("--notrack", action="store_true",
                        help="accepted for compatibility with fMRIPrep; this tool never sends "
                             "usage data anywhere")

    select = parser.add_argument_group("selecting data")
    select.add_argument("--participant-label", "--participant_label", nargs="+", default=[],
                        metavar="LABEL", help="participants to process (with or without sub-)")
    select.add_argument("--session-label", nargs="+", default=[], metavar="LABEL",
                        help="sessions to process (default: all)")
    select.add_argument("--bids-filter-file", type=Path, metavar="JSON",
                        help="extra pybids filters per suffix, e.g. "
                             '{"t1w": {"acquisition": "mprage"}}')
    select.add_argument("--skip-bids-validation", action="store_true",
                        help="do not refuse a dataset that fails the BIDS checks")

    run = parser.add_argument_group("resources and reproducibility")
    run.add_argument("-w", "--work-dir", type=Path,
                     help="folder for intermediate results and caches; reuse it to resume "
                          "(default: OUTPUT_DIR/work)")
    run.add_argument("--nprocs", "--n-cpus", type=_positive_int, default=os.cpu_count() or 1,
                     help="processes running at once (default: all CPUs)")
    run.add_argument("--omp-nthreads", type=_positive_int, default=None,
                     help="threads per process for ITK and torch (default: min(8, nprocs))")
    run.add_argument("--mem", "--mem-gb", dest="mem_gb", type=_memory_gb,
                     help="memory limit for scheduling, e.g. 16G")
    run.add_argument("--device", default="auto",
                     help="auto, cpu or cuda (exit 75 if cuda is asked for and absent)")
    run.add_argument("--random-seed", type=int, default=0, help="seed of every random choice")
    run.add_argument("--stop-on-first-crash", action="store_true",
                     help="stop at the first failing step instead of finishing the others")

    prep = parser.add_argument_group("preprocessing")
    prep.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=2,
                      help="template-space voxel size in mm (default: 2)")
    prep.add_argument("--registration", default="SyN", choices=("Rigid", "Affine", "SyN"),
                      help="reference-to-template registration (default: SyN, affine then "
                           "deformable: Dice 0.98 with the template mask in 2.8 s at 2 mm, "
                           "Affine 0.96 in 1.3-2.4 s; see the README)")
    prep.add_argument("--normalization", choices=METHODS, default="robust-zscore",
                      help="intensity normalisation inside the brain: robust-zscore (median "
                           "and IQR, default), whitestripe (normal-appearing white matter) or "
                           "percentile (1st-99th percentile to 0-1)")
    prep.add_argument("--skull-stripped", choices=SKULL_STRIPPED_MODES, default="auto",
                      help="auto: images whose background is one constant value around a "
                           "brain-sized object are taken as skull-stripped and not stripped "
                           "again; yes: every reference image is skull-stripped; no: always run "
                           "brain extraction (deepbet)")

    model = parser.add_argument_group("models")
    model.add_argument("--model", metavar="NAME|PATH",
                       help="participant: trained model to apply (a name under "
                            "OUTPUT_DIR/models/ or a model directory)")
    model.add_argument("--model-type", choices=sorted(REGISTRY), default="normative",
                       help="train: the kind of model (default: normative)")
    model.add_argument("--model-name", help="train: name of the model (default: the type)")
    model.add_argument("--train-filter", nargs="+", default=[], metavar="COLUMN=VALUE",
                       help="train: participants.tsv rows to train on, e.g. group=healthy")
    model.add_argument("--channels", nargs="+", choices=MODALITIES, default=[],
                       help="train: modalities to use (default: those every subject has)")
    model.add_argument("--fpr", type=_fpr, default=DEFAULT_FPR,
                       help=f"train: voxel false-positive rate of the calibrated threshold "
                            f"(default: {DEFAULT_FPR})")
    model.add_argument("--components", dest="n_components", type=_components, default=5,
                       metavar="K|auto",
                       help="train: components of a gmm/tmm/mmst mixture, or 'auto' for the "
                            "number in 1..8 with the lowest BIC (default: 5)")
    model.add_argument("--online", action="store_true",
                       help="train: online EM streaming over every voxel of every subject "
                            "(memory independent of the number of subjects) instead of batch "
                            "EM on a sample of 1 million voxels")
    model.add_argument("--trim", type=_trim, metavar="FRACTION",
                       help="leave this fraction of the least likely voxels out of each EM "
                            "step, so that lesions do not pull the fit (default: 0 for train, "
                            f"{SINGLE_SUBJECT_TRIM} for --single-subject, whose fit always "
                            "contains the subject's lesions)")
    model.add_argument("--per-tissue", action="store_true",
                       help="train: one mixture per template tissue class (GM, WM, CSF)")
    model.add_argument("--with-normative", action="store_true",
                       help="train: add the voxel-wise normative score to the mixture's")
    model.add_argument("--mixture-score", choices=("nll", "outlyingness"), default="nll",
                       help="train: negative log-likelihood, or for mmst the weight-based "
                            "outlyingness (default: nll)")
    model.add_argument("--single-subject", choices=("gmm", "tmm", "mmst"),
                       help="participant: fit this mixture on each subject's own brain and "
                            "flag its improbable voxels; for users without healthy controls. "
                            "The threshold is the --fpr quantile of the fitted mixture itself "
                            "(--components, --trim and --per-tissue apply)")
    model.add_argument("--fdr", type=_fpr, metavar="Q",
                       help="participant: threshold by Benjamini-Hochberg at false-discovery "
                            "rate Q on voxel p-values from the healthy calibration, instead "
                            "of the voxel false-positive rate")

    model.add_argument("--min-cluster-size", dest="min_cluster_mm3", type=_volume,
                       default=0.0, metavar="MM3",
                       help="participant: drop clusters of abnormal voxels smaller than this "
                            "many cubic millimetres from the mask and the clusters table "
                            "(default: 0, keep all)")
    model.add_argument("--restrict", choices=RESTRICTIONS,
                       help="participant: flag abnormal voxels in the whole brain (default) or "
                            "in the template's white matter only (wm; for white-matter "
                            "hyperintensities and MS lesions)")
    model.add_argument("--atlas", type=Path, metavar="DSEG",
                       help="participant: discrete atlas in the template's (MNI) space with a "
                            "BIDS label table beside it (DSEG without .nii[.gz], plus .tsv: "
                            "columns index, name); adds each cluster's region and the burden "
                            "per region to the tables")

    deep = parser.add_argument_group(
        "deep models (train --model-type ae|vae|vqvae|vit-ae|dae; unset: the model's default)")
    deep.add_argument("--mode", choices=MODES,
                      help="axial slices (2d), slices with their neighbours as extra channels "
                           "(2.5d) or 3D patches with sliding-window inference (3d); default 2d")
    deep.add_argument("--epochs", type=_positive_int, help="most epochs (default 50)")
    deep.add_argument("--batch-size", type=_positive_int,
                      help="samples per step and GPU (default 32)")
    deep.add_argument("--patch-size", type=_positive_int, metavar="VOXELS",
                      help="3d: side of the training patches and inference windows (default 64)")
    deep.add_argument("--learning-rate", type=float, metavar="LR",
                      help="peak AdamW learning rate, warm-up then cosine (default 1e-3)")
    deep.add_argument("--width", type=_positive_int,
                      help="feature maps of the first network level (default 32)")
    deep.add_argument("--latent", type=_positive_int,
                      help="bottleneck size: AE bottleneck channels, VAE code length / 16, "
                           "VQ-VAE embedding size (default 16)")
    deep.add_argument("--patience", type=int, metavar="EPOCHS",
                      help="stop when the healthy validation loss has not improved for this "
                           "many epochs (0: never; default 10)")
    deep.add_argument("--residual", choices=RESIDUALS,
                      help="which residuals are anomalous: both signs, only brighter (hyper, "
                           "e.g. FLAIR lesions) or only darker (hypo) than the reconstruction "
                           "(default both)")
    deep.add_argument("--precision", choices=PRECISIONS,
                      help="auto: bf16 mixed precision on a GPU, fp32 on a CPU (default auto)")
    deep.add_argument("--num-workers", type=int, metavar="N",
                      help="data-loader worker processes per GPU (default 2)")
    deep.add_argument("--tensorboard", type=Path, metavar="DIR",
                      help="also log the losses for TensorBoard in DIR (needs tensorboard)")

    group = parser.add_argument_group("group level")
    group.add_argument("--ground-truth", type=Path, metavar="DERIV_DIR",
                       help="derivative folder with lesion masks (*_label-<x>_mask.nii.gz or "
                            "*_dseg.nii.gz) to evaluate against")
    group.add_argument("--control-label", metavar="GROUP",
                       help="the participants.tsv 'group' value of the controls in patients-"
                            "vs-controls statistics (default: the first of healthy, control, "
                            "controls, hc, cn present)")
    group.add_argument("--bootstrap", type=_positive_int, default=2000, metavar="N",
                       help="bootstrap resamples of the confidence intervals (default 2000)")
    return parser


def build_demo_parser() -> argparse.ArgumentParser:
    """The parser of ``bids_anomaly demo OUTDIR``."""
    parser = argparse.ArgumentParser(
        prog="bids_anomaly demo",
        description="Generate a small BIDS dataset with synthetic lesions and run participant, "
                    "train and group on it.",
    )
    parser.add_argument("output_dir", type=Path, help="folder for the dataset and the results")
    parser.add_argument("--healthy", type=_positive_int, default=DEMO_HEALTHY,
                        help=f"healthy controls to generate (default: {DEMO_HEALTHY}; at least "
                             "3)")
    parser.add_argument("--patients", type=_positive_int, default=DEMO_PATIENTS,
                        help=f"patients with synthetic lesions to generate (default: "
                             f"{DEMO_PATIENTS})")
    parser.add_argument("--modalities", nargs="+", choices=("T1w", "T2w", "FLAIR"),
                        default=list(DEMO_MODALITIES),
                        help=f"contrasts to generate (default: {' '.join(DEMO_MODALITIES)})")
    parser.add_argument("--nprocs", type=_positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--version", action="version", version=f"bids_anomaly {__version__}")
    return parser


CONFIG_IGNORED = ("bids_dir", "output_dir", "analysis_level", "version", "bids_filters")
"""Settings a ``--config-file`` does not set: given on the command line, or recorded only."""


def read_config_file(path: Path) -> dict:
    """The settings saved by an earlier run (``[bids_anomaly]`` table of a TOML file).

    Raises
    ------
    UsageError
        Not readable, not TOML, or without a ``[bids_anomaly]`` table.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        values = tomllib.loads(Path(path).read_text())["bids_anomaly"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as error:
        raise UsageError(f"--config-file {path}: not a settings file written by bids_anomaly "
                         f"({error.__class__.__name__}: {error})") from error
    if not isinstance(values, dict):
        raise UsageError(f"--config-file {path}: [bids_anomaly] is not a table")
    return values


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """Parse the command line, with the defaults of ``--config-file`` when one is given.

    Returns
    -------
    args : argparse.Namespace
    config : dict
        The settings read from ``--config-file`` (empty without one).
    """
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config-file", type=Path)
    known, _ = pre.parse_known_args(argv)
    config = {}
    if known.config_file is not None:
        config = read_config_file(known.config_file)
        destinations = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - {field.name for field in dataclasses.fields(Settings)})
        if unknown:
            raise UsageError(f"--config-file {known.config_file}: unknown settings "
                             f"{', '.join(unknown)}")
        parser.set_defaults(**{key: value for key, value in config.items()
                               if key in destinations and key not in CONFIG_IGNORED})
    return parser.parse_args(argv), config


def settings_from_args(args: argparse.Namespace, config: dict | None = None) -> Settings:
    """Check the parsed arguments against each other and build the run's settings.

    Raises
    ------
    UsageError
        Output inside the input, an unreadable filter file, or options that do not fit the level.
    """
    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    if output_dir == bids_dir or bids_dir in output_dir.parents:
        raise UsageError(
            f"OUTPUT_DIR {output_dir} is inside BIDS_DIR {bids_dir}; the input dataset is never "
            "written to: choose an output folder outside it"
        )
    work_dir = (args.work_dir or output_dir / "work").resolve()
    if work_dir == bids_dir or bids_dir in work_dir.parents:
        raise UsageError(f"--work-dir {work_dir} is inside BIDS_DIR {bids_dir}")
    filters = {}
    if args.bids_filter_file:
        try:
            filters = json.loads(Path(args.bids_filter_file).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"--bids-filter-file {args.bids_filter_file}: {error}") from error
        filters = check_bids_filters(filters)
    elif config and config.get("bids_filters"):
        filters = check_bids_filters(config["bids_filters"])
    participant_labels = [check_label(label, "participant") for label in args.participant_label]
    session_labels = [check_label(label, "session") for label in args.session_label]
    if args.model_name is not None:
        check_model_name(args.model_name)
    if args.analysis_level != "participant" and args.model:
        raise UsageError("--model applies to the participant level; train writes a new model "
                         "(--model-type, --model-name)")
    if args.analysis_level != "participant" and (args.single_subject or args.fdr
                                                  or args.min_cluster_mm3 or args.restrict
                                                  or args.atlas):
        raise UsageError("--single-subject, --fdr, --min-cluster-size, --restrict and --atlas "
                         "apply to the participant level")
    if args.analysis_level != "group" and (args.control_label or args.ground_truth):
        raise UsageError("--ground-truth and --control-label apply to the group level")
    postprocessing = [option for option, given in (
        ("--fdr", args.fdr), ("--min-cluster-size", args.min_cluster_mm3),
        ("--restrict", args.restrict), ("--atlas", args.atlas)) if given]
    if postprocessing and not (args.model or args.single_subject):
        raise UsageError(f"{', '.join(postprocessing)} need a model: --model NAME or "
                         "--single-subject TYPE")
    mixture_types = ("gmm", "tmm", "mmst")
    if args.mixture_score == "outlyingness" and "mmst" not in (args.model_type,
                                                                 args.single_subject):
        raise UsageError("--mixture-score outlyingness needs --model-type mmst (or "
                         "--single-subject mmst)")
    if args.analysis_level == "train" and args.model_type not in mixture_types and (
            args.online or args.trim is not None or args.per_tissue or args.with_normative):
        raise UsageError(f"--online, --trim, --per-tissue and --with-normative apply to the "
                         f"mixture models ({', '.join(mixture_types)}), not to "
                         f"{args.model_type}")
    deep_given = [f"--{name.replace('_', '-')}" for name in DEEP_OPTIONS
                  if getattr(args, name) is not None]
    if deep_given and (args.analysis_level != "train" or args.model_type not in DEEP_TYPES):
        raise UsageError(f"{', '.join(deep_given)} apply to training a deep model "
                         f"(train --model-type {'|'.join(DEEP_TYPES)})")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    omp = args.omp_nthreads or min(8, args.nprocs)
    return Settings(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=args.analysis_level,
        work_dir=work_dir,
        participant_label=list(dict.fromkeys(participant_labels)),
        session_label=list(dict.fromkeys(session_labels)),
        bids_filters=filters,
        skip_bids_validation=args.skip_bids_validation,
        nprocs=args.nprocs,
        omp_nthreads=omp,
        mem_gb=args.mem_gb,
        device=args.device,
        random_seed=args.random_seed,
        model=args.model,
        model_type=args.model_type,
        model_name=args.model_name,
        train_filter=args.train_filter,
        channels=args.channels,
        ground_truth=args.ground_truth.resolve() if args.ground_truth else None,
        resolution=args.resolution,
        registration=args.registration,
        normalization=args.normalization,
        skull_stripped=args.skull_stripped,
        fpr=args.fpr,
        n_components=args.n_components,
        online=args.online,
        trim=args.trim,
        per_tissue=args.per_tissue,
        with_normative=args.with_normative,
        mixture_score=args.mixture_score,
        single_subject=args.single_subject,
        fdr=args.fdr,
        min_cluster_mm3=args.min_cluster_mm3,
        restrict=args.restrict or "brain",
        atlas=args.atlas.resolve() if args.atlas else None,
        control_label=args.control_label,
        bootstrap=args.bootstrap,
        **{name: getattr(args, name) for name in DEEP_OPTIONS},
        stop_on_first_crash=args.stop_on_first_crash,
        verbose=args.verbose,
    )
