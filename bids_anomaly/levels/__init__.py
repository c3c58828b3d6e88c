"""The BIDS App levels: :func:`run` checks the settings and runs the level they ask for.

``participant`` (:mod:`.participant`) preprocesses and scores subjects, ``train`` (:mod:`.train`)
fits a model, ``group`` (:mod:`.group`) writes the group tables and report; :mod:`.steps` holds
what they share.
"""

from __future__ import annotations

import os
from pathlib import Path

from bids_anomaly import bids
from bids_anomaly.config import Settings
from bids_anomaly.errors import UsageError, one_line


def set_threads(omp_nthreads: int) -> None:
    """Threads of ITK (read when antspyx first runs a filter) and OpenMP, for every worker."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(omp_nthreads)
    os.environ.setdefault("OMP_NUM_THREADS", str(omp_nthreads))


def run(settings: Settings) -> str:
    """Run the level of ``settings`` and return the line that says what it wrote.

    Paths in it have their control characters escaped (:func:`~bids_anomaly.errors.one_line`).

    Nothing is written before the settings, the output and work folders
    (:func:`~bids_anomaly.bids.check_output_dir`, :func:`~bids_anomaly.bids.check_work_dir`)
    and the device are checked.

    Raises
    ------
    BidsAnomalyError
        Any failure a user can cause or fix, with its exit code.
    """
    from bids_anomaly.models import check_family_options
    from bids_anomaly.models.deep import distributed
    from bids_anomaly.runtime.device import resolve_device

    settings.check()
    check_family_options(settings)
    bids.check_output_dir(settings.output_dir)
    bids.check_work_dir(settings.work_dir)
    if distributed.world_size() > 1 and settings.level != "train":
        raise UsageError(f"the {settings.level} level runs as one process; only train is "
                         "launched with torchrun")
    set_threads(settings.execution.threads)
    resolve_device(settings.execution.device)
    if settings.level == "participant":
        from bids_anomaly.levels.participant import run_participant

        subjects, skipped = run_participant(settings)
        line = (f"participant level done for {len(subjects)} subject/session(s); derivatives "
                f"in {one_line(str(settings.output_dir))}")
        if skipped:
            line += (f"\nnot scored by model {' '.join(settings.model.model)} "
                     f"({len(skipped)}): "
                     + "; ".join(f"{inputs.name}: {reason}" for inputs, reason in skipped))
        return line
    if settings.level == "train":
        from bids_anomaly.levels.train import run_train

        directories: list[Path] = run_train(settings)
        if not distributed.is_main():
            return ""
        if len(directories) == 1:
            return f"model written to {one_line(str(directories[0]))}"
        return (f"{len(directories)} models written to {one_line(str(directories[0].parent))}: "
                + ", ".join(d.name for d in directories))
    from bids_anomaly.levels.group import run_group

    tables = run_group(settings)
    return "group level done: " + ", ".join(one_line(str(path)) for path in tables)
