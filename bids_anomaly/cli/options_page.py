"""The options page (``docs/options.md``), generated from the parsers, so that it cannot drift.

Every argument of ``bids_anomaly BIDS_DIR OUTPUT_DIR LEVEL`` and of ``bids_anomaly demo`` is
listed, in the groups and order of ``--help``, with every flag spelling, the levels a declared
setting applies to (:func:`bids_anomaly.config.option`) and its help text. A default that
depends on the machine is said in words (:data:`bids_anomaly.config.MACHINE_DEFAULTS`), so that
the page is the same everywhere. Write it with::

    python -m bids_anomaly.cli.options_page > docs/options.md

``tests/cli/test_options_page.py`` checks the committed page against a fresh one and against
``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from bids_anomaly.cli.parser import build_demo_parser, build_parser
from bids_anomaly.config import LEVELS, SECTIONS, declared_options, help_text

COMMAND = "python -m bids_anomaly.cli.options_page > docs/options.md"
"""How the page is written (said at its top)."""


def declared_settings() -> dict[str, dataclasses.Field]:
    """Every declared setting and family option, by its parser destination."""
    from bids_anomaly.models import REGISTRY, family_options

    fields = {f"{section}.{item.name}": item
              for section, cls in SECTIONS.items() for item in dataclasses.fields(cls)}
    for cls in REGISTRY.values():
        fields.update({f"options.{name}": item for name, item in family_options(cls).items()})
    return fields


def _cell(text: str) -> str:
    """Text for a Markdown table cell (pipes escaped, one line)."""
    return " ".join(text.split()).replace("|", "\\|")


def _invocation(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    """The flags of an option, each in code, with the value it takes (as ``--help`` shows)."""
    value = ""
    if action.nargs != 0:
        value = " " + formatter._format_args(action, formatter._get_default_metavar_for_optional(
            action))
    return ", ".join(f"`{flag}{value}`" for flag in action.option_strings)


def _levels(dest: str, field: dataclasses.Field | None) -> str:
    """The levels a setting applies to, for the table.

    A model family's options apply where a model of the family is fitted: ``train``, and
    ``participant --single-subject`` for those declared ``single_subject``
    (:func:`bids_anomaly.models.check_family_options`).
    """
    if dest.startswith("options."):
        return "train" + (", participant --single-subject"
                          if field.metadata.get("single_subject") else "")
    levels = field.metadata["levels"] if field is not None else LEVELS
    return "all" if tuple(levels) == LEVELS else ", ".join(levels)


def _table(actions: list[argparse.Action], fields: dict[str, dataclasses.Field],
           formatter: argparse.HelpFormatter, with_levels: bool) -> list[str]:
    """The Markdown table of one argument group's options."""
    header = ["| option | levels | meaning |", "| --- | --- | --- |"] if with_levels else [
        "| option | meaning |", "| --- | --- |"]
    rows = []
    for action in actions:
        if not action.option_strings:
            continue
        field = fields.get(action.dest)
        meaning = help_text(field, here=False) if field is not None else action.help
        cells = [_invocation(action, formatter)]
        if with_levels:
            cells.append(_levels(action.dest, field))
        cells.append(meaning)
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return header + rows if rows else []


def _positionals(parser: argparse.ArgumentParser, fields: dict[str, dataclasses.Field]
                 ) -> list[str]:
    """The positional arguments, as a list."""
    lines = []
    for action in parser._actions:
        if not action.option_strings:
            field = fields.get(f"inputs.{action.dest}")
            meaning = help_text(field, here=False) if field is not None else action.help
            name = "{" + ",".join(action.choices) + "}" if action.choices else action.dest
            lines.append(f"- `{name}`: {' '.join(meaning.split())}")
    return lines


def _parser_sections(parser: argparse.ArgumentParser, fields: dict[str, dataclasses.Field],
                     with_levels: bool) -> list[str]:
    """The positional arguments, then one table per argument group, in ``--help``'s order."""
    formatter = parser._get_formatter()
    lines = _positionals(parser, fields) + [""]
    for group in parser._action_groups:
        table = _table(group._group_actions, fields, formatter, with_levels)
        if table:
            lines += [f"### {group.title[0].upper()}{group.title[1:]}", "", *table, ""]
    return lines


def options_page() -> str:
    """The Markdown text of ``docs/options.md``."""
    fields = declared_settings()
    demo_fields = {item.name: item for item in declared_options(SECTIONS["execution"])}
    lines = [
        "# Options",
        "",
        f"<!-- Generated by `{COMMAND}` from the declared options; do not edit by hand. -->",
        "",
        "Every option of the command line, as `bids_anomaly --help` and `bids_anomaly demo "
        "--help` list them. An option given at a level it does not apply to is refused (exit "
        "2); a model family's options apply to `train` with that `--model-type` (and the "
        "options marked for it to `participant --single-subject`). Every run's settings are "
        "written to `OUTPUT_DIR/logs/<time>_<level>/bids_anomaly.toml`, which `--config-file` "
        "reads back.",
        "",
        "## `bids_anomaly BIDS_DIR OUTPUT_DIR LEVEL`",
        "",
        *_parser_sections(build_parser(), fields, with_levels=True),
        "## `bids_anomaly demo OUTPUT_DIR`",
        "",
        "Generates a small BIDS dataset with synthetic lesions and runs participant, train and "
        "group on it.",
        "",
        *_parser_sections(build_demo_parser(), demo_fields, with_levels=False),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(options_page())
