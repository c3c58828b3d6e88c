"""The examples in the package's docstrings (``>>>``) run, and show what they say."""

import doctest
import importlib
import io
from pathlib import Path

import pytest

import bids_anomaly

PACKAGE = Path(bids_anomaly.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))
           if path.name != "__main__.py"}  # importing it runs the command line


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [test for test in doctest.DocTestFinder().find(module, name) if test.examples]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_docstring_examples_hold(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    for test in _examples(name):
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()


def test_every_written_example_is_run():
    # examples the finder missed (in a comment, or in an object it does not see) would let the
    # test above pass without running them
    written = {name for name, path in SOURCES.items()
               if ">>> " in path.read_text(encoding="utf-8")}
    run = sum(len(test.examples) for name in written for test in _examples(name))
    assert len(written) >= 20 and run == sum(
        path.read_text(encoding="utf-8").count(">>> ") for path in SOURCES.values())
