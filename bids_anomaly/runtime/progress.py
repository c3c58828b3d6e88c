"""Progress of long runs: a bar with an ETA on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter

LOGGER = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    """``1 h 05 min``, ``3 min 20 s`` or ``12 s``.

    >>> _duration(3900), _duration(200), _duration(12.4)
    ('1 h 05 min', '3 min 20 s', '12 s')
    """
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


STEP_SECONDS = {
    "Registration": 6.5,
    "BrainExtraction": 4.0,
    "N4BiasFieldCorrection": 2.7,
    "QCFigures": 1.9,
    "FitSubjectModel": 5.0,
    "ScoreAnomaly": 2.0,
    "ResampleToVoxelSize": 0.6,
    "ApplyTransforms": 0.3,
}
"""Typical single-thread seconds of the slow steps (one subject at 2 mm, measured on generated
and bids_real subjects); they weigh each step's share of the work in the ETA."""

OTHER_STEP_SECONDS = 0.1
"""Weight of every other step (writing derivatives, small computations)."""

HEARTBEAT_SECONDS = 30.0
"""Without a terminal, a progress line at least this often."""


class WorkflowProgress:
    """Per-subject progress of a Nipype workflow, fed by the plugin's ``status_callback``.

    Every node that finishes (run or found in the cache) advances its subject. On a terminal a
    tqdm bar counts the steps with an ETA and shows how many subjects are done. Elsewhere (batch
    jobs, logs) a line is logged when a subject finishes and, in between, at least every
    :data:`HEARTBEAT_SECONDS`, with the share of the work done and an ETA.

    The ETA weighs each step by its typical duration (:data:`STEP_SECONDS`) and divides the work
    left by the rate of the steps that really ran: steps found in the cache take no time and
    would otherwise make the first estimates far too short.

    Parameters
    ----------
    workflow : nipype.pipeline.engine.Workflow
        The top workflow, whose direct sub-workflows are the subjects.
    labels : dict of str to str
        Display name of each subject sub-workflow, by its name (``sub_01_wf``: ``sub-01``).
    stream : file-like, optional
        Where the bar goes (default ``sys.stderr``); the bar is used only when it is a TTY.
    heartbeat : float
        Seconds between progress lines without a terminal (0: only when a subject finishes).
    """

    def __init__(self, workflow, labels: dict[str, str], stream=None,
                 heartbeat: float = HEARTBEAT_SECONDS) -> None:
        from nipype.interfaces.utility import IdentityInterface

        self.labels = labels
        self.totals: Counter[str] = Counter()
        self.weights: dict[str, float] = {}
        # identity nodes are removed from the graph that runs, so they never report
        for name in workflow.list_node_names():
            interface = workflow.get_node(name).interface
            if not isinstance(interface, IdentityInterface):
                self.totals[name.split(".")[0]] += 1
                self.weights[name] = STEP_SECONDS.get(type(interface).__name__,
                                                      OTHER_STEP_SECONDS)
        self.total_work = sum(self.weights.values()) or 1.0
        self.done: Counter[str] = Counter()
        self.failed: set[str] = set()
        self.finished: list[str] = []
        self.work_done = 0.0
        self.work_run = 0.0  # of the steps that took time (not found in the cache)
        self.started: dict[str, float] = {}
        self.start = time.monotonic()
        self.first_run: float | None = None
        self.stream = stream if stream is not None else sys.stderr
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=sum(self.totals.values()), unit="step", file=self.stream,
                            desc="participant", dynamic_ncols=True)
            self._postfix()
        elif heartbeat > 0:
            threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                             name="progress-heartbeat").start()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{len(self.finished)}/{len(self.totals)} subjects done")

    def eta(self) -> float | None:
        """Seconds left, from the rate of the steps that ran (None before any ran)."""
        if self.first_run is None or self.work_run <= 0:
            return None
        rate = self.work_run / max(time.monotonic() - self.first_run, 1e-3)
        return max(self.total_work - self.work_done, 0.0) / rate

    def _beat(self, interval: float) -> None:
        while not self.stopped.wait(interval):
            with self.lock:
                eta = self.eta()
                LOGGER.info("participant: %.0f %% of the work done, %d/%d subject/sessions "
                            "finished, elapsed %s, ETA %s", 100 * self.work_done / self.total_work,
                            len(self.finished), len(self.totals),
                            _duration(time.monotonic() - self.start),
                            _duration(eta) if eta is not None else "estimating")

    def __call__(self, node, status: str) -> None:
        """The ``status_callback`` of Nipype's plugins: ``status`` is start, end or exception."""
        parts = node.fullname.split(".")
        subject = parts[1] if len(parts) > 2 else parts[0]
        if subject not in self.totals:
            return
        name = ".".join(parts[1:])
        with self.lock:
            if status == "start":
                self.started[name] = time.monotonic()
                return
            weight = self.weights.get(name, OTHER_STEP_SECONDS)
            self.work_done += weight
            began = self.started.pop(name, None)
            if began is not None and time.monotonic() - began > 0.2:  # it ran
                self.first_run = began if self.first_run is None else min(self.first_run,
                                                                          began)
                self.work_run += weight
            self.done[subject] += 1
            if status == "exception":
                self.failed.add(subject)
            if self.bar is not None:
                self.bar.update(1)
            if self.done[subject] == self.totals[subject]:
                self._subject_finished(subject)

    def _subject_finished(self, subject: str) -> None:
        self.finished.append(subject)
        name = self.labels.get(subject, subject)
        state = "failed" if subject in self.failed else "done"
        if self.bar is not None:
            self._postfix()
            self.bar.write(f"{name}: {state}", file=self.stream)
            return
        elapsed = time.monotonic() - self.start
        remaining = len(self.totals) - len(self.finished)
        eta = self.eta()
        if eta is None:  # everything so far came from the cache
            eta = elapsed / len(self.finished) * remaining
        eta_text = f", ETA {_duration(eta)}" if remaining else ""
        LOGGER.info("%s: %s (%d/%d subject/sessions, elapsed %s%s)", name, state,
                    len(self.finished), len(self.totals), _duration(elapsed), eta_text)

    def close(self) -> None:
        """Stop the heartbeat and close the bar."""
        self.stopped.set()
        if self.bar is not None:
            self.bar.close()


class ItemProgress:
    """Progress through a list of items (subjects of the group level): a bar or log lines.

    Parameters
    ----------
    total : int
        Number of items.
    description : str
        Label of the bar and of the log lines.
    stream : file-like, optional
        Where the bar goes (default ``sys.stderr``); the bar is used only when it is a TTY.
    """

    def __init__(self, total: int, description: str, stream=None) -> None:
        self.total, self.description, self.count = total, description, 0
        self.start = time.monotonic()
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, file=stream, dynamic_ncols=True)

    def advance(self, item: str) -> None:
        """Start ``item``: the bar moves on, or a log line names it with the ETA."""
        if self.bar is not None:
            if self.count:
                self.bar.update(1)
            self.bar.set_postfix_str(item)
        else:
            elapsed = time.monotonic() - self.start
            eta = (f", ETA {_duration(elapsed / self.count * (self.total - self.count))}"
                   if self.count else "")
            LOGGER.info("%s: %s (%d/%d%s)", self.description, item, self.count + 1,
                        self.total, eta)
        self.count += 1

    def close(self) -> None:
        """Finish the bar (nothing to do without one)."""
        if self.bar is not None:
            if self.count:
                self.bar.update(1)
            self.bar.close()
