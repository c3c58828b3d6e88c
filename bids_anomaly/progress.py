"""Progress of long runs: a bar with an ETA on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
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


class WorkflowProgress:
    """Per-subject progress of a Nipype workflow, fed by the plugin's ``status_callback``.

    Every node that finishes (run or found in the cache) advances its subject. On a terminal a
    tqdm bar counts the steps with an ETA and shows how many subjects are done; elsewhere
    (batch jobs, logs) one line is logged when a subject finishes, with the elapsed time and an
    ETA from the mean time per finished subject.

    Parameters
    ----------
    workflow : nipype.pipeline.engine.Workflow
        The top workflow, whose direct sub-workflows are the subjects.
    labels : dict of str to str
        Display name of each subject sub-workflow, by its name (``sub_01_wf``: ``sub-01``).
    stream : file-like, optional
        Where the bar goes (default ``sys.stderr``); the bar is used only when it is a TTY.
    """

    def __init__(self, workflow, labels: dict[str, str], stream=None) -> None:
        from nipype.interfaces.utility import IdentityInterface

        self.labels = labels
        self.totals: Counter[str] = Counter()
        # identity nodes are removed from the graph that runs, so they never report
        for name in workflow.list_node_names():
            if not isinstance(workflow.get_node(name).interface, IdentityInterface):
                self.totals[name.split(".")[0]] += 1
        self.done: Counter[str] = Counter()
        self.failed: set[str] = set()
        self.finished: list[str] = []
        self.start = time.monotonic()
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=sum(self.totals.values()), unit="step", file=self.stream,
                            desc="participant", dynamic_ncols=True)
            self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{len(self.finished)}/{len(self.totals)} subjects done")

    def __call__(self, node, status: str) -> None:
        """The ``status_callback`` of Nipype's plugins: ``status`` is start, end or exception."""
        if status == "start":
            return
        parts = node.fullname.split(".")
        subject = parts[1] if len(parts) > 2 else parts[0]
        if subject not in self.totals:
            return
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
        eta = f", ETA {_duration(elapsed / len(self.finished) * remaining)}" if remaining else ""
        LOGGER.info("%s: %s (%d/%d subject/sessions, elapsed %s%s)", name, state,
                    len(self.finished), len(self.totals), _duration(elapsed), eta)

    def close(self) -> None:
        """Close the bar (nothing to do without one)."""
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
