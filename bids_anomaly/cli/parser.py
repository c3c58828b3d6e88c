"""The argument parser, generated from the settings' declarations; it only parses.

Every option comes from a field declared with :func:`bids_anomaly.config.option`: the sections of
:class:`~bids_anomaly.config.Settings`, and each registered model family's options (one argument
group per family scope). Values not given on the command line keep their default, or the value
of ``--config-file``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from bids_anomaly import __version__
from bids_anomaly.bids import check_bids_filters, check_label, check_model_name
from bids_anomaly.config import (
    LEVELS,
    MODEL_TYPES,
    SECTIONS,
    SINGLE_SUBJECT_TYPES,
    InputSettings,
    Settings,
    declared_options,
    help_text,
    positive_int,
)
from bids_anomaly.errors import UsageError
from bids_anomaly.models import check_family_options

GROUP_TITLES = {
    "inputs": "selecting data",
    "execution": "resources and reproducibility",
    "preprocessing": "preprocessing",
    "model": "models (train a model, or apply one at the participant level)",
    "postprocessing": "post-processing of the anomaly maps (participant, with a model)",
    "group": "group level",
}
"""Titles of the argument groups, by settings section."""


def _add(group: argparse._ArgumentGroup, item: dataclasses.Field, dest: str) -> None:
    """Add the argument of a declared setting (not given: absent from the namespace)."""
    from bids_anomaly.models import REGISTRY

    options = dict(item.metadata["argparse"])
    if options.get("choices") == MODEL_TYPES:
        options["choices"] = sorted(REGISTRY)
    elif options.get("choices") == SINGLE_SUBJECT_TYPES:
        options["choices"] = sorted(t for t, cls in REGISTRY.items() if cls.single_subject)
    if "metavar" not in options and "choices" not in options and options.get("action") not in (
            "store_true", "count"):
        options["metavar"] = item.name.upper()
    group.add_argument(*item.metadata["flags"], dest=dest, default=argparse.SUPPRESS,
                       help=help_text(item), **options)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``bids_anomaly BIDS_DIR OUTPUT_DIR LEVEL`` (model types from the registry)."""
    from bids_anomaly.models import REGISTRY, family_options

    parser = argparse.ArgumentParser(
        prog="bids_anomaly",
        description="Unsupervised anomaly detection and segmentation in brain MRI (BIDS App). "
                    "Run 'bids_anomaly demo OUTDIR' for a complete example on generated data.",
    )
    fields = {item.name: item for item in dataclasses.fields(InputSettings)}
    parser.add_argument("bids_dir", type=Path, help=help_text(fields["bids_dir"]))
    parser.add_argument("output_dir", type=Path, help=help_text(fields["output_dir"]))
    parser.add_argument("analysis_level", choices=LEVELS,
                        help=help_text(fields["analysis_level"]))
    parser.add_argument("--version", action="version", version=f"bids_anomaly {__version__}")
    parser.add_argument("--config-file", type=Path, metavar="TOML",
                        help="settings of an earlier run (OUTPUT_DIR/logs/<time>_<level>/"
                             "bids_anomaly.toml); options given on the command line win")
    parser.add_argument("--notrack", action="store_true",
                        help="accepted for compatibility with fMRIPrep; this tool never sends "
                             "usage data anywhere")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(GROUP_TITLES[section])
        if section == "inputs":
            group.add_argument("--bids-filter-file", type=Path, metavar="JSON",
                               help="extra pybids filters per suffix, e.g. "
                                    '{"t1w": {"acquisition": "mprage"}}')
        for item in declared_options(cls):
            _add(group, item, f"{section}.{item.name}")
    added: set[str] = set()
    for scope in dict.fromkeys(cls.options_scope for cls in REGISTRY.values() if cls.options):
        families = sorted(t for t, cls in REGISTRY.items() if cls.options_scope == scope)
        group = parser.add_argument_group(
            f"options of {scope} (train --model-type {'|'.join(families)}; unset: the "
            "model's default)")
        for name, item in family_options(REGISTRY[families[0]]).items():
            if name not in added:
                added.add(name)
                _add(group, item, f"options.{name}")
    return parser


def build_demo_parser() -> argparse.ArgumentParser:
    """The parser of ``bids_anomaly demo OUTDIR``."""
    from bids_anomaly.demo import DEMO_HEALTHY, DEMO_MODALITIES, DEMO_PATIENTS

    parser = argparse.ArgumentParser(
        prog="bids_anomaly demo",
        description="Generate a small BIDS dataset with synthetic lesions and run participant, "
                    "train and group on it.",
    )
    parser.add_argument("output_dir", type=Path, help="folder for the dataset and the results")
    parser.add_argument("--healthy", type=positive_int, default=DEMO_HEALTHY,
                        help=f"healthy controls to generate (default: {DEMO_HEALTHY}; at least "
                             "3)")
    parser.add_argument("--patients", type=positive_int, default=DEMO_PATIENTS,
                        help=f"patients with synthetic lesions to generate (default: "
                             f"{DEMO_PATIENTS})")
    parser.add_argument("--modalities", nargs="+", choices=("T1w", "T2w", "FLAIR", "T2starw"),
                        default=list(DEMO_MODALITIES),
                        help=f"contrasts to generate (default: {' '.join(DEMO_MODALITIES)})")
    execution = {item.name: item for item in declared_options(SECTIONS["execution"])}
    for name in ("nprocs", "device", "random_seed", "verbose"):
        item = execution[name]
        parser.add_argument(*item.metadata["flags"], dest=name,
                            default=item.default,
                            help=help_text(item), **item.metadata["argparse"])
    parser.add_argument("--version", action="version", version=f"bids_anomaly {__version__}")
    return parser


def read_config_file(path: Path) -> dict[str, dict]:
    """The settings saved by an earlier run, by section.

    Raises
    ------
    UsageError
        Not readable, not TOML, not written by bids_anomaly, or with unknown settings.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        record = tomllib.loads(Path(path).read_text())["bids_anomaly"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as error:
        raise UsageError(f"--config-file {path}: not a settings file written by bids_anomaly "
                         f"({error.__class__.__name__}: {error})") from error
    if not isinstance(record, dict):
        raise UsageError(f"--config-file {path}: [bids_anomaly] is not a table")
    sections = {}
    for name, values in record.items():
        if name == "version":
            continue
        if name not in SECTIONS or not isinstance(values, dict):
            raise UsageError(f"--config-file {path}: unknown settings section {name!r}")
        known = {item.name for item in dataclasses.fields(SECTIONS[name])}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"--config-file {path}: unknown settings {', '.join(unknown)}")
        sections[name] = values
    return sections


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, dict[str, dict]]:
    """Parse the command line; read ``--config-file`` when one is given.

    Returns
    -------
    args : argparse.Namespace
        Only the options given on the command line (and the positional arguments).
    config : dict
        The settings of ``--config-file`` by section (empty without one).
    """
    args = build_parser().parse_args(argv)
    config = read_config_file(args.config_file) if args.config_file else {}
    return args, config


def _given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The options given on the command line whose destination starts with ``prefix.``."""
    return {dest.split(".", 1)[1]: value for dest, value in vars(args).items()
            if dest.startswith(prefix + ".")}


def settings_from_args(args: argparse.Namespace, config: dict[str, dict] | None = None
                       ) -> Settings:
    """The run's settings: defaults, then ``--config-file``, then the command line.

    Raises
    ------
    UsageError
        An unreadable filter file, a bad label or model name, or options that do not fit the
        level (:meth:`~bids_anomaly.config.Settings.check`).
    """
    config = config or {}
    sections = {}
    for name in SECTIONS:
        values = {**config.get(name, {}), **_given(args, name)}
        if name == "model":
            values["options"] = {**config.get("model", {}).get("options", {}),
                                 **_given(args, "options")}
        sections[name] = values
    inputs = sections["inputs"]
    inputs.update(bids_dir=args.bids_dir.resolve(), output_dir=args.output_dir.resolve(),
                  analysis_level=args.analysis_level)
    if args.bids_filter_file:
        try:
            inputs["bids_filters"] = json.loads(Path(args.bids_filter_file).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"--bids-filter-file {args.bids_filter_file}: {error}") from error
    inputs["bids_filters"] = check_bids_filters(inputs.get("bids_filters", {}))
    inputs["participant_label"] = list(dict.fromkeys(
        check_label(label, "participant") for label in inputs.get("participant_label", [])))
    inputs["session_label"] = list(dict.fromkeys(
        check_label(label, "session") for label in inputs.get("session_label", [])))
    for section, key in (("execution", "work_dir"), ("postprocessing", "atlas"),
                         ("model", "annotations"), ("preprocessing", "dwi_derivatives")):
        if sections[section].get(key) is not None:
            sections[section][key] = Path(sections[section][key]).resolve()
    sections["group"]["ground_truth"] = [Path(p).resolve() for p in
                                         sections["group"].get("ground_truth") or []]
    if sections["model"].get("model_name") is not None:
        check_model_name(sections["model"]["model_name"])
    if sections["model"]["options"].get("tensorboard") is not None:
        sections["model"]["options"]["tensorboard"] = Path(
            sections["model"]["options"]["tensorboard"])
    settings = Settings(**{name: SECTIONS[name](**values) for name, values in sections.items()})
    settings.check()
    check_family_options(settings)
    return settings
