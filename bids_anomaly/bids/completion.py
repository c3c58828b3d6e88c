"""Records of finished subject runs, so that a repeated run skips what is already done.

Nipype caches every step, but even a fully cached pass costs about a second per subject
(hashing inputs, reading results, copying derivatives). When a subject/session finished a run
whose key (:func:`~bids_anomaly.workflows.base.subject_run_key`: version, raw images, settings,
model, atlas) is the same, and every derivative it left is still there unchanged, its workflow
is not built at all. A missing or changed derivative, or any change to what the key holds,
sends the subject through Nipype again, whose cache then redoes only what is needed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from bids_anomaly.bids.derivatives import subject_derivatives
from bids_anomaly.bids.inputs import AnatInputs
from bids_anomaly.bids.workdir import completion_record_path

LOGGER = logging.getLogger(__name__)


def _record_path(work_dir: Path, inputs: AnatInputs, key: str) -> Path:
    return completion_record_path(work_dir, inputs.name, key)


def _signatures(files: list[Path]) -> dict[str, list[int]]:
    signatures = {}
    for path in files:
        stat = os.stat(path)
        signatures[str(path)] = [stat.st_size, stat.st_mtime_ns]
    return signatures


def is_complete(work_dir: Path, inputs: AnatInputs, key: str) -> bool:
    """Whether ``inputs`` finished a run with ``key`` and its derivatives are untouched."""
    record = _record_path(work_dir, inputs, key)
    if not record.is_file():
        return False
    try:
        recorded = json.loads(record.read_text())["files"]
        return bool(recorded) and all(_signatures([Path(path)])[path] == signature
                                      for path, signature in recorded.items())
    except (OSError, json.JSONDecodeError, KeyError, TypeError):  # deleted or damaged
        return False


def mark_complete(work_dir: Path, inputs: AnatInputs, key: str, output_dir: Path
                  ) -> None:
    """Record that ``inputs`` finished a run with ``key``, with its derivatives as they are."""
    record = _record_path(work_dir, inputs, key)
    record.parent.mkdir(parents=True, exist_ok=True)
    files = subject_derivatives(output_dir, inputs.subject, inputs.session)
    record.write_text(json.dumps({"subject": inputs.name, "files": _signatures(files)},
                                 indent=1))
