"""The options page (docs/options.md) is generated, and lists exactly the flags of --help."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bids_anomaly.cli.options_page import COMMAND, options_page

PAGE = Path(__file__).resolve().parents[2] / "docs" / "options.md"
DEMO_SECTION = "## `bids_anomaly demo"
# argparse lists each option as "  -w WORK_DIR, --work-dir WORK_DIR   its help"
INVOCATION = re.compile(r"^  (-.*?)(?: {2}|$)", re.MULTILINE)
PAGE_FLAGS = re.compile(r"`(-[^` ]+)")


def help_flags(*command: str) -> set[str]:
    shown = subprocess.run([sys.executable, "-m", "bids_anomaly", *command, "--help"],
                           capture_output=True, text=True, check=True).stdout
    return {spelling.split()[0] for match in INVOCATION.finditer(shown)
            for spelling in match.group(1).split(", ")}


def page_flags(section: str) -> set[str]:
    return {flag for line in section.splitlines() if line.startswith("| `")
            for flag in PAGE_FLAGS.findall(line.split(" | ")[0])}


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def test_the_committed_page_is_the_generated_one(page):
    assert page == options_page(), f"docs/options.md is out of date: run {COMMAND}"


def test_the_page_lists_every_flag_of_help_and_no_other(page):
    levels, demo = page.split(DEMO_SECTION)
    shown = help_flags()
    assert {"--stop-on-first-crash", "--train-filter", "--n-cpus", "-w"} <= shown
    assert page_flags(levels) == shown
    assert page_flags(demo) == help_flags("demo")
