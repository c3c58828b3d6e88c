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
    MIN_TRAINING_SUBJECTS,
    MODEL_TYPES,
    SECTIONS,
    SINGLE_SUBJECT_TYPES,
    InputSettings,
    Settings,
    at_least,
    declared_options,
    default_of,
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


def _argparse_options(item: dataclasses.Field) -> dict[str, Any]:
    """The ``argparse`` options of a declared setting, the model types filled in."""
    from bids_anomaly.models import REGISTRY

    options = dict(item.metadata["argparse"])
    if options.get("choices") == MODEL_TYPES:
        options["choices"] = sorted(REGISTRY)
    elif options.get("choices") == SINGLE_SUBJECT_TYPES:
        options["choices"] = sorted(t for t, cls in REGISTRY.items() if cls.single_subject)
    return options


def _add(group: argparse._ArgumentGroup, item: dataclasses.Field, dest: str) -> None:
    """Add the argument of a declared setting (not given: absent from the namespace)."""
    options = _argparse_options(item)
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
    from bids_anomaly.cli.demo import DEMO_HEALTHY, DEMO_MODALITIES, DEMO_PATIENTS

    parser = argparse.ArgumentParser(
        prog="bids_anomaly demo",
        description="Generate a small BIDS dataset with synthetic lesions and run participant, "
                    "train and group on it.",
    )
    parser.add_argument("output_dir", type=Path, help="folder for the dataset and the results")
    parser.add_argument("--healthy", type=at_least(MIN_TRAINING_SUBJECTS), default=DEMO_HEALTHY,
                        help=f"healthy controls to generate (default: {DEMO_HEALTHY}; at least "
                             f"{MIN_TRAINING_SUBJECTS})")
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
                            default=default_of(item),
                            help=help_text(item), **item.metadata["argparse"])
    parser.add_argument("--version", action="version", version=f"bids_anomaly {__version__}")
    return parser


def _one_value(options: dict[str, Any], value: Any) -> Any:
    """One value of a setting read from a file, converted and checked as argparse does."""
    if isinstance(value, (list, dict)):
        raise argparse.ArgumentTypeError("must be a single value, not a list or a table")
    convert = options.get("type")
    if convert is None:
        if not isinstance(value, str):
            raise argparse.ArgumentTypeError("must be a string (in quotes)")
        converted = value
    else:
        try:  # the command line gives text: so does the file (2.5 is no whole number)
            converted = convert(value if isinstance(value, str) else str(value))
        except argparse.ArgumentTypeError:
            raise
        except (ValueError, TypeError, OverflowError) as error:
            raise argparse.ArgumentTypeError(
                f"invalid {getattr(convert, '__name__', 'value')} value") from error
    choices = options.get("choices")
    if choices is not None and converted not in choices:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, choices))}")
    return converted


def setting_from_file(item: dataclasses.Field, value: Any) -> Any:
    """A setting's value read from a file, through the checks of its command-line argument.

    The declaration's ``type``, ``choices``, ``nargs`` and ``action`` apply as they do on the
    command line (a value is converted from its text, so ``2.5`` is not a whole number and
    ``1e400`` is infinite).

    Raises
    ------
    argparse.ArgumentTypeError
        The value is not one the command line accepts; its message says why.
    """
    options = _argparse_options(item)
    action = options.get("action")
    if action == "store_true":
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError("must be true or false")
        return value
    if action == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise argparse.ArgumentTypeError("must be a whole number, 0 or more")
        return value
    if options.get("nargs") in ("+", "*"):  # an empty list is the default (none given)
        values = value if isinstance(value, list) else [value]
        return [_one_value(options, one) for one in values]
    return _one_value(options, value)


FROM_COMMAND_LINE = ("bids_dir", "output_dir", "analysis_level")
"""Settings a ``--config-file`` records but the command line always gives."""


def _checked_section(path: Path, name: str, values: dict[str, Any]) -> dict[str, Any]:
    """The values of one section of ``--config-file``, each checked.

    See :func:`setting_from_file`; the model section's family options are checked too.
    """
    from bids_anomaly.models import REGISTRY, family_options

    fields = {item.name: item for item in dataclasses.fields(SECTIONS[name])}
    family = {key: item for cls in REGISTRY.values() for key, item in family_options(cls).items()}
    checked = {}
    for key, value in values.items():
        if key in FROM_COMMAND_LINE:
            continue
        where = f"--config-file {path}: {name}.{key}"
        if key == "bids_filters":
            if not isinstance(value, dict):
                raise UsageError(f"{where} must be a table of filters by suffix")
            checked[key] = value
            continue
        if key == "options":
            if not isinstance(value, dict):
                raise UsageError(f"{where} must be a table of the model family's options")
            unknown = sorted(set(value) - set(family))
            if unknown:
                raise UsageError(f"{where}: unknown model option(s) {', '.join(unknown)}")
            checked[key] = {option: _from_file(where + "." + option, family[option], v)
                            for option, v in value.items()}
            continue
        checked[key] = _from_file(where, fields[key], value)
    return checked


def _from_file(where: str, item: dataclasses.Field, value: Any) -> Any:
    """:func:`setting_from_file`, a refusal as a usage error naming the setting and file."""
    try:
        return setting_from_file(item, value)
    except argparse.ArgumentTypeError as error:
        flags = item.metadata.get("flags")
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise UsageError(f"{where} = {shown}{f' ({flags[0]})' if flags else ''}: {error}"
                         ) from None


def read_config_file(path: Path) -> dict[str, dict]:
    """The settings saved by an earlier run, by section, each value checked.

    Every value goes through the type, range and choices of its command-line argument
    (:func:`setting_from_file`).

    Raises
    ------
    UsageError
        Not readable, not TOML, not written by bids_anomaly, unknown settings, or a value the
        command line would refuse (naming the setting and the file).
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
        sections[name] = _checked_section(path, name, values)
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
