"""The official BIDS validator (``bids-validator-deno``), run on the input dataset.

:func:`validate_dataset` runs the validator as a subprocess with JSON output, offline, with a
timeout; errors refuse the dataset (:class:`BIDSValidationError`, exit 16) in one line that names
the validator's issue codes and files, warnings are logged, and a validator that is missing or
fails to run is reported and skipped (the hand-made checks of
:func:`bids_anomaly.bids.check_bids_dir` then stand alone). A result is cached by the dataset's
signature, outside the dataset, so that an unchanged dataset is validated once.

The validator is a dependency of bids_anomaly (PyPI ``bids-validator-deno``, with the ``deno``
runtime); an environment without it still runs, with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bids_anomaly.errors import BIDSValidationError

LOGGER = logging.getLogger(__name__)

VALIDATOR = "bids-validator-deno"
"""The validator's console script (PyPI ``bids-validator-deno``, on the ``deno`` runtime)."""

VALIDATOR_FLAGS = ("--format", "json", "--ignoreNiftiHeaders")
"""JSON on stdout; NIfTI headers are left to this tool, which reads every image it uses and
names what is wrong with it (empty, 4D, truncated...) with its own exit code (65)."""

VALIDATOR_TIMEOUT_S = 600.0
"""Longest a validation may take (``BIDS_ANOMALY_VALIDATOR_TIMEOUT`` overrides it, seconds)."""

CACHE_ENV = "BIDS_ANOMALY_VALIDATION_CACHE"
"""Folder of cached validation results; ``off`` caches nothing. Default:
``$XDG_CACHE_HOME/bids_anomaly/validation`` (``~/.cache/...``)."""

CACHE_ENTRIES = 512
"""Cached results kept (the oldest are removed beyond this)."""

SHOWN_CODES = 3
"""Issue codes named in the one-line error message."""

SHOWN_FILES = 2
"""Files named per issue code in the one-line error message."""

HINT = "use --skip-bids-validation to go on anyway"


class ValidatorUnavailable(RuntimeError):
    """The validator is not installed, or did not run to the end (crash, timeout, no JSON)."""


@dataclass(frozen=True)
class Issue:
    """One issue the validator reports.

    Attributes
    ----------
    code : str
        The validator's code (``NOT_INCLUDED``, ``PARTICIPANT_ID_MISMATCH``...).
    severity : str
        ``error`` or ``warning``.
    location : str
        File relative to the dataset (no leading ``/``), empty for the dataset as a whole.
    sub_code : str
        The field or column concerned, when the validator says.
    """

    code: str
    severity: str
    location: str = ""
    sub_code: str = ""

    def __str__(self) -> str:
        sub = f"[{self.sub_code}]" if self.sub_code else ""
        return f"{self.severity} {self.code}{sub} {self.location or '(dataset)'}"


@dataclass
class ValidationResult:
    """What the validator found in a dataset.

    Attributes
    ----------
    errors : list of Issue
        Issues of severity error (none exempted).
    warnings : dict of str to int
        Number of warnings by code.
    exempted : list of Issue
        Errors this tool accepts on purpose (files it reads although the schema does not know
        them, see ``exempt`` of :func:`validate_dataset`).
    report : str
        Path of the full report (the validator's JSON), empty when none was written.
    seconds : float
        Wall time of the validation.
    cached : bool
        Whether the result comes from the cache.
    """

    errors: list[Issue] = field(default_factory=list)
    warnings: dict[str, int] = field(default_factory=dict)
    exempted: list[Issue] = field(default_factory=list)
    report: str = ""
    seconds: float = 0.0
    cached: bool = False

    def to_json(self) -> dict:
        """The result as a JSON object (what the cache stores)."""
        content = asdict(self)
        content.pop("cached")
        return content

    @classmethod
    def from_json(cls, content: dict) -> ValidationResult:
        """Read back :meth:`to_json`."""
        return cls(errors=[Issue(**issue) for issue in content["errors"]],
                   warnings={str(k): int(v) for k, v in content["warnings"].items()},
                   exempted=[Issue(**issue) for issue in content.get("exempted", [])],
                   report=str(content.get("report", "")),
                   seconds=float(content.get("seconds", 0.0)), cached=True)

    def error_message(self, bids_dir: Path) -> str:
        """One line: the number of errors, their first codes with a few files each, the hint.

        The codes named are chosen to name as many different files as they can (one bad file
        name alone gives several codes).

        Examples
        --------
        >>> result = ValidationResult(errors=[Issue("NOT_INCLUDED", "error", "sub-01/x.nii")])
        >>> result.error_message(Path("/data"))  # doctest: +NORMALIZE_WHITESPACE
        '/data is not valid BIDS: the BIDS validator found 1 error in 1 file: NOT_INCLUDED
        (sub-01/x.nii); use --skip-bids-validation to go on anyway'
        """
        by_code: dict[str, list[str]] = {}
        for issue in self.errors:
            files = by_code.setdefault(issue.code, [])
            if issue.location and issue.location not in files:
                files.append(issue.location)
        shown: list[str] = []
        named: set[str] = set()
        remaining = list(by_code)
        while remaining and len(shown) < SHOWN_CODES:
            # the code naming most files not named yet (the first such in the report on a tie)
            code = max(remaining, key=lambda c: len(set(by_code[c][:SHOWN_FILES]) - named))
            remaining.remove(code)
            files = by_code[code]
            named.update(files[:SHOWN_FILES])
            listed = ", ".join(files[:SHOWN_FILES]) + (", ..." if len(files) > SHOWN_FILES
                                                       else "")
            shown.append(f"{code} ({listed})" if listed else code)
        if remaining:
            shown.append(f"and {len(remaining)} more code{'s' if len(remaining) > 1 else ''}")
        count = len(self.errors)
        files = len({issue.location for issue in self.errors if issue.location})
        where = f" in {files} file{'s' if files != 1 else ''}" if files else ""
        report = f" (full report: {self.report})" if self.report else ""
        return (f"{bids_dir} is not valid BIDS: the BIDS validator found {count} "
                f"error{'s' if count != 1 else ''}{where}: {'; '.join(shown)}{report}; {HINT}")

    def warning_summary(self) -> str:
        """One line: the number of warnings and their codes (most frequent first)."""
        total = sum(self.warnings.values())
        codes = ", ".join(f"{code} x{count}" if count > 1 else code
                          for code, count in Counter(self.warnings).most_common())
        return f"the BIDS validator reports {total} warning{'s' if total != 1 else ''}: {codes}"


def find_validator() -> list[str] | None:
    """The command that runs the validator, or None when it is not installed.

    The console script of this Python's environment first, then the one on ``PATH``, then the
    package itself through this Python (a script that was not put on ``PATH``).
    """
    here = shutil.which(VALIDATOR, path=os.path.dirname(sys.executable))
    found = here or shutil.which(VALIDATOR)
    if found:
        return [found]
    if (importlib.util.find_spec("bids_validator_deno") is not None
            and importlib.util.find_spec("deno") is not None):
        return [sys.executable, "-c",
                "import sys; sys.argv[0] = 'bids-validator-deno'; "
                "from bids_validator_deno import cli; cli()"]
    return None


def validator_version() -> str:
    """The installed validator's version ("unknown" when its package metadata is missing)."""
    try:
        return version("bids-validator-deno")
    except PackageNotFoundError:
        return "unknown"


def default_cache_dir() -> Path | None:
    """Where results are cached (:data:`CACHE_ENV`), or None to cache nothing."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "no", "none") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home folder (any uid in a container)
            return None
    return Path(base) / "bids_anomaly" / "validation"


def _timeout() -> float:
    try:
        return float(os.environ.get("BIDS_ANOMALY_VALIDATOR_TIMEOUT", VALIDATOR_TIMEOUT_S))
    except ValueError:
        return VALIDATOR_TIMEOUT_S


def run_validator(bids_dir: Path, command: list[str] | None = None,
                  timeout: float | None = None) -> dict:
    """Run the validator on ``bids_dir`` and parse its JSON report.

    Parameters
    ----------
    bids_dir : Path
        The dataset (only read: the validator writes nothing without ``--outfile``).
    command : list of str, optional
        The validator (default: :func:`find_validator`).
    timeout : float, optional
        Seconds before it is stopped (default :data:`VALIDATOR_TIMEOUT_S`).

    Returns
    -------
    dict
        The validator's JSON report (``issues.issues``: code, severity, location...).

    Raises
    ------
    ValidatorUnavailable
        Not installed, stopped by the timeout, or no JSON report came out.
    """
    command = command or find_validator()
    if not command:
        raise ValidatorUnavailable(f"{VALIDATOR} is not installed (pip install "
                                   "bids-validator-deno)")
    timeout = _timeout() if timeout is None else timeout
    # offline and quiet: no colours, no update check, no prompt; the schema is in the bundle
    env = {**os.environ, "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "DENO_NO_PROMPT": "1"}
    try:
        done = subprocess.run([*command, *VALIDATOR_FLAGS, os.path.abspath(bids_dir)],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired as error:
        raise ValidatorUnavailable(f"{VALIDATOR} did not finish within {timeout:g} s") from error
    except OSError as error:
        raise ValidatorUnavailable(f"{VALIDATOR} could not be started: {error}") from error
    try:
        report = json.loads(done.stdout)
        report["issues"]["issues"]  # noqa: B018  (the shape this module reads)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise ValidatorUnavailable(f"{VALIDATOR} failed (exit code {done.returncode}: "
                                   f"{last})") from error
    return report


def _issue(item: dict) -> Issue:
    return Issue(code=str(item.get("code", "UNKNOWN")), severity=str(item.get("severity", "error")),
                 location=str(item.get("location") or "").lstrip("/"),
                 sub_code=str(item.get("subCode") or ""))


def summarise(report: dict, exempt: re.Pattern | None = None) -> ValidationResult:
    """The errors and warning counts of a validator report.

    ``NOT_INCLUDED`` errors on files matching ``exempt`` (a pattern on the path from the
    dataset's root, with a leading ``/``) are set apart, not counted as errors.
    """
    result = ValidationResult()
    warnings: Counter[str] = Counter()
    for item in report["issues"]["issues"]:
        issue = _issue(item)
        if issue.severity == "error":
            if (exempt and issue.code == "NOT_INCLUDED"
                    and exempt.search("/" + issue.location)):
                result.exempted.append(issue)
            else:
                result.errors.append(issue)
        elif issue.severity == "warning":
            warnings[issue.code] += 1
    result.warnings = dict(warnings.most_common())
    return result


def _outside(path: Path, bids_dir: Path) -> bool:
    """Whether ``path`` is outside the dataset (nothing is ever written into it)."""
    return not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(bids_dir))


def _cache_key(bids_dir: Path, signature: str, exempt: re.Pattern | None) -> str:
    text = "\0".join((os.path.realpath(bids_dir), signature, validator_version(),
                      " ".join(VALIDATOR_FLAGS), exempt.pattern if exempt else ""))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> ValidationResult | None:
    try:
        result = ValidationResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if result.report and not Path(result.report).is_file():
        result.report = ""
    return result


def _prune(cache_dir: Path) -> None:
    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed by another run meanwhile
            return 0.0

    entries = sorted(cache_dir.glob("[!.]*.json"), key=mtime, reverse=True)
    for path in entries[2 * CACHE_ENTRIES:]:  # a result and, with errors, its report
        path.unlink(missing_ok=True)


def _validate(bids_dir: Path, exempt: re.Pattern | None, timeout: float | None,
              report_path: Path | None, error_report: Path | None) -> ValidationResult | None:
    """Run the validator (None when it cannot run: a warning says so).

    Its full report goes to ``report_path``, or, when the dataset has errors, to
    ``error_report``.
    """
    start = time.monotonic()
    try:
        report = run_validator(bids_dir, timeout=timeout)
    except ValidatorUnavailable as error:
        LOGGER.warning("BIDS validator not run: %s; only the basic checks were made "
                       "(dataset_description.json, sub-* folders)", error)
        return None
    result = summarise(report, exempt)
    result.seconds = round(time.monotonic() - start, 3)
    LOGGER.debug("BIDS validator %s on %s (%.1f s), every issue:\n%s", validator_version(),
                 bids_dir, result.seconds,
                 "\n".join(str(_issue(item)) for item in report["issues"]["issues"]))
    target = report_path or (error_report if result.errors else None)
    if target is not None:
        try:
            _write_atomic(target, json.dumps(report, indent=2) + "\n")
            result.report = os.path.abspath(target)
        except OSError as error:
            LOGGER.warning("cannot write the BIDS validator's report to %s: %s", target, error)
    return result


def validate_dataset(bids_dir: Path, signature: str | None = None, *,
                     exempt: re.Pattern | None = None, cache_dir: Path | None = None,
                     report_path: Path | None = None, timeout: float | None = None
                     ) -> ValidationResult | None:
    """Run the BIDS validator on ``bids_dir``: refuse errors, log warnings.

    Parameters
    ----------
    bids_dir : Path
        The dataset (never written to).
    signature : str, optional
        A digest of the dataset's files (:func:`bids_anomaly.bids.dataset_signature`): the
        result is cached under it (with the dataset's path and the validator's version) and
        reused while it holds. None: validate every time.
    exempt : re.Pattern, optional
        Files the validator does not know but this tool reads on purpose (their
        ``NOT_INCLUDED`` errors are logged, not fatal).
    cache_dir : Path, optional
        Folder of cached results (default :func:`default_cache_dir`); never inside the dataset.
    report_path : Path, optional
        Where to write the validator's full JSON report when it runs (a cached result writes
        none). Without it, the report is kept next to the cached result when the dataset has
        errors. Either way the error message names it.
    timeout : float, optional
        Seconds the validator may take (default :data:`VALIDATOR_TIMEOUT_S`,
        ``BIDS_ANOMALY_VALIDATOR_TIMEOUT``).

    Returns
    -------
    ValidationResult or None
        None when the validator is not installed or failed to run (a warning says so).

    Raises
    ------
    BIDSValidationError
        The validator found errors: their number, first codes and files, in one line.
    """
    bids_dir = Path(bids_dir)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if cache_dir is not None and not _outside(cache_dir, bids_dir):
        cache_dir = None
    if report_path is not None and not _outside(report_path, bids_dir):
        LOGGER.warning("the BIDS validator's report is not written to %s: it is inside the "
                       "input dataset", report_path)
        report_path = None
    key = _cache_key(bids_dir, signature, exempt) if signature else None
    cached = cache_dir / f"{key}.json" if cache_dir is not None and key else None
    result = _read_cache(cached) if cached is not None else None
    if result is None or (result.errors and not result.report):
        result = _validate(bids_dir, exempt, timeout,
                           Path(report_path) if report_path is not None else None,
                           cached.with_suffix(".report.json") if cached is not None else None)
        if result is None:
            return None
        if cached is not None:
            try:
                _write_atomic(cached, json.dumps(result.to_json()) + "\n")
                _prune(cache_dir)
            except OSError as error:
                LOGGER.debug("validation result not cached in %s: %s", cache_dir, error)
    for issue in result.exempted:
        LOGGER.info("%s: not in the released BIDS schema, read anyway", issue.location)
    if result.errors:
        raise BIDSValidationError(result.error_message(bids_dir))
    when = ("unchanged since validated, cached result" if result.cached
            else f"{result.seconds:.1f} s")
    if result.warnings:
        log = LOGGER.info if result.cached else LOGGER.warning
        log("%s (bids-validator %s, %s)", result.warning_summary(), validator_version(), when)
    else:
        LOGGER.info("the BIDS validator reports no issue (bids-validator %s, %s)",
                    validator_version(), when)
    return result
