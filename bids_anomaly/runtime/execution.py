"""Running Nipype workflows: worker processes that never outlive the run, failures as one line.

Nipype runs each node in a worker process (MultiProc) or in this process (Linear). Five things
are added here:

- **Supervised workers.** A MultiProc worker waits on its task queue forever, so a run killed
  with ``kill -9`` used to leave its workers (and through them Python's fork server and resource
  tracker) running. Each worker now watches the process that started it and exits when it is
  gone, and ignores SIGINT, which the main process handles for the whole run.
- **Clean interruption.** SIGTERM (sent by ``kill``, SLURM's ``scancel``, ``docker stop``) and
  SIGINT are turned into :class:`~bids_anomaly.errors.Interrupted` in the main process; on the
  way out the workers are stopped, so nothing keeps running after the message. A step running
  in the main process (``--nprocs 1``) is interrupted too: Nipype takes the exception for the
  step's failure, so the run stops at the next step instead, and the crash file of the
  interrupted step is removed (it records no failure).
- **Failures mapped back.** An exception inside a node reaches the main process as a generic
  "Workflow did not execute cleanly"; the crash files of this run say which node failed and
  why. A :class:`~bids_anomaly.errors.BidsAnomalyError` raised in a node becomes the same
  error (same exit code, one line) in the main process; anything else is reported in one line
  naming the node, the subject and the crash file that holds the traceback.
- **Stale log locks.** Nipype's log file is guarded by a lock *file*; one left by a killed run
  is broken after :data:`STALE_LOG_LOCK_S` instead of blocking every later run forever.
- **Dead workers.** A worker killed from outside (the kernel's OOM killer) or crashed in native
  code leaves Nipype's scheduler waiting forever for its result; such a node now fails with a
  crash file that says the worker died, and so does every node submitted after it.
- **A quiet console.** Without ``-v``, Nipype's console shows only the warnings of the steps
  themselves (``nipype.interface``); its scheduler's messages about failing nodes, tracebacks
  included, stay in the crash files and ``pypeline.log``: the one line of :func:`failure` says
  what failed and where the traceback is.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from bids_anomaly import errors
from bids_anomaly.errors import BidsAnomalyError, Interrupted

LOGGER = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5
"""How often a worker checks that the main process is still alive."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals that stop a run (exit 128 + the signal's number)."""

_received: list[int] = []
"""The stop signals received inside :func:`interruptible` (the last one counts)."""


def received_signal() -> int | None:
    """The stop signal received since :func:`interruptible` began, or None."""
    return _received[-1] if _received else None


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`~bids_anomaly.errors.Interrupted` in the block.

    The signal is also remembered (:func:`received_signal`): code that catches every exception,
    as Nipype does around a step, cannot hide it. Only the main thread can install signal
    handlers; elsewhere (a test runner's thread) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        _received.append(signum)
        raise Interrupted(signum)

    _received.clear()
    previous = {signum: signal.signal(signum, terminate) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc, or None when it does not exist."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def _main_process_alive(main_pid: int, started: str | None) -> bool:
    """Whether the main process still runs: not gone, not a zombie, not a reused pid."""
    if started is None:  # no /proc: existence is all that can be asked
        try:
            os.kill(main_pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    state = _process_state(main_pid)
    return state is not None and state[0] not in ("Z", "X") and state[1] == started


def _watch_main_process(main_pid: int) -> None:
    """Exit this worker as soon as the main process has died (even by SIGKILL)."""
    known = _process_state(main_pid)
    started = known[1] if known else None
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if not _main_process_alive(main_pid, started):
            os._exit(1)


STALE_LOG_LOCK_S = 30.0
"""A lock file of Nipype's log older than this was left by a killed run and is broken."""


class _BreakableLogLock:
    """Nipype's log lock, a lock *file* (``pypeline.log.lock``), broken when it is stale.

    Nipype's ``ConcurrentRotatingFileHandler`` holds an existence-based lock while it writes a
    line. A run killed in that instant (``kill -9``, the OOM killer, a scheduler's time limit)
    leaves the file behind, and every later run on the same output folder used to wait for it
    forever at its first log line. Writing a line takes milliseconds: a lock not released
    within :data:`STALE_LOG_LOCK_S` is removed and taken again.
    """

    def __init__(self, path: str) -> None:
        from filelock import SoftFileLock

        self.path = path
        self._lock = SoftFileLock(path, timeout=STALE_LOG_LOCK_S)

    def acquire(self) -> None:
        """Take the lock, breaking a stale one."""
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self._lock.acquire()

    def release(self) -> None:
        """Release the lock."""
        self._lock.release()


def guard_nipype_log_lock() -> None:
    """Give Nipype's log file handlers a lock that a killed run cannot leave held forever."""
    import logging as logging_module

    from nipype.external.cloghandler import ConcurrentRotatingFileHandler

    for name in list(logging_module.root.manager.loggerDict):
        if not name.startswith("nipype"):
            continue
        for handler in logging_module.getLogger(name).handlers:
            if (isinstance(handler, ConcurrentRotatingFileHandler)
                    and not isinstance(handler.stream_lock, _BreakableLogLock)):
                handler.stream_lock = _BreakableLogLock(handler.lock_file)


def _steps_only(record: logging.LogRecord) -> bool:
    """Console filter: the steps' own messages, not the scheduler's (failures, tracebacks)."""
    return record.name == "nipype.interface"


def set_nipype_console_level(level: str) -> None:
    """Show Nipype's messages from ``level`` on the console; its log file keeps them all.

    Nipype logs to one stream handler on the ``nipype`` logger and to ``pypeline.log``; its
    loggers are set to the file's level, so the console gets its own. Below ``INFO`` (no
    ``-v``), the console shows the steps' warnings only: a failing step is reported in one line
    by :func:`failure`, its traceback stays in its crash file.
    """
    import logging as logging_module

    from nipype import logging as nipype_logging  # noqa: F401  (creates the handler)

    nipype_logger = logging_module.getLogger("nipype")
    nipype_logger.propagate = False  # its own handler shows what the console should
    quiet = logging_module.getLevelName(level) > logging_module.INFO
    for handler in nipype_logger.handlers:
        if type(handler) is logging_module.StreamHandler:
            handler.setLevel(level)
            handler.removeFilter(_steps_only)
            if quiet:
                handler.addFilter(_steps_only)
    guard_nipype_log_lock()


def quiet_library_warnings(debug: bool = False) -> None:
    """Keep the libraries' warnings off the console (``debug``: log them).

    Python warnings (numpy's overflow, nilearn's non-finite values) and nibabel's header fixes
    are what libraries say about inputs this tool checks itself: those that matter are refused
    or logged in one line by the tool (a complex image, voxel sizes of 0, NaN voxels).
    """
    logging.captureWarnings(True)
    level = logging.DEBUG if debug else logging.CRITICAL + 1
    for name in ("py.warnings", "nibabel.global"):
        logging.getLogger(name).setLevel(level)


def _initialize_worker(cwd: str, main_pid: int, console_level: str) -> None:
    """Set up a MultiProc worker: Nipype's own set-up, SIGINT ignored, a watch on the main."""
    from nipype.pipeline.plugins.multiproc import process_initializer

    process_initializer(cwd)
    quiet_library_warnings(debug=console_level == "DEBUG")
    set_nipype_console_level(console_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_main_process, args=(main_pid,), daemon=True,
                     name="watch-main-process").start()


def _lost_task(taskid: int, error: BaseException) -> dict:
    """A Nipype task result for a node whose worker process died, or that never reached one.

    Neither has a result of its own. The traceback is written like Python's so that
    :func:`read_crash` finds the cause.
    """
    if isinstance(error, BrokenProcessPool):
        reason = (f"BrokenProcessPool: the worker process running this step died ({error}); "
                  "it was killed (out of memory?) or crashed. Run the same command again to "
                  "resume")
    else:  # e.g. the step could not be pickled to be sent
        reason = (f"{type(error).__name__}: the step could not be run in a worker process "
                  f"({error})")
    return {"taskid": taskid, "result": None,
            "traceback": ["Traceback (most recent call last):\n", f"{reason}\n"]}


@functools.cache
def _dependency_matrix_class() -> type:
    """:class:`scipy.sparse.lil_matrix` with cheap column sums (see :func:`dependency_matrix`)."""
    from itertools import chain

    import numpy as np
    import scipy.sparse as ssp

    class DependencyMatrix(ssp.lil_matrix):
        def sum(self, axis=None, dtype=None, out=None):
            if axis != 0 or dtype is not None or out is not None:
                return super().sum(axis=axis, dtype=dtype, out=out)
            columns = np.fromiter(chain.from_iterable(self.rows), dtype=np.intp)
            weights = np.fromiter(chain.from_iterable(self.data), dtype=np.float64)
            sums = np.bincount(columns, weights, minlength=self.shape[1])
            return np.asmatrix(sums.astype(self.dtype if self.dtype.kind == "f" else np.int64))

    return DependencyMatrix


def dependency_matrix(matrix):
    """Nipype's job dependency matrix as a LIL matrix whose column sums cost microseconds.

    The scheduler asks for the column sums (jobs still waiting on others) twice per loop, every
    ``poll_sleep_duration``: scipy converts the LIL matrix to CSR each time, 1 ms for the 500
    jobs of a 6-subject run (15 s of the main process's CPU in a 90-s demo run, taken from the
    workers on a 2-core machine) and growing with the cohort. Here they are counted from the
    matrix's own row lists: the same ``numpy.matrix``; every other operation is scipy's.
    """
    cls = _dependency_matrix_class()
    return matrix if isinstance(matrix, cls) else cls(matrix)


def supervised_multiproc(plugin_args: dict, console_level: str = "WARNING"):
    """Nipype's MultiProc plugin whose workers stop with the main process (see module docs).

    A worker that dies (killed by the kernel, a crash in native code) breaks the pool: the node
    it ran and every node submitted after fail with a crash file saying so, instead of the
    scheduler waiting for a result that never comes.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from nipype.pipeline.plugins import MultiProcPlugin

    class SupervisedMultiProcPlugin(MultiProcPlugin):
        @property
        def depidx(self):
            """The dependency matrix (:func:`dependency_matrix`: cheap column sums)."""
            return self._depidx

        @depidx.setter
        def depidx(self, matrix) -> None:
            self._depidx = None if matrix is None else dependency_matrix(matrix)

        def __init__(self, plugin_args: dict | None = None) -> None:
            super().__init__(plugin_args=plugin_args)
            self.pool.shutdown(wait=False)  # started no worker yet: replaced by ours
            context = multiprocessing.get_context(self.plugin_args.get("mp_context"))
            self.pool = ProcessPoolExecutor(
                max_workers=self.processors, initializer=_initialize_worker,
                initargs=(self._cwd, os.getpid(), console_level), mp_context=context)

        stopping = False

        def _async_callback(self, args) -> None:
            # a killed worker's task has no result to report; a task whose worker died is
            # reported by _get_result (Nipype's callback would raise and lose the task)
            if not self.stopping and args.exception() is None:
                super()._async_callback(args)

        def _get_result(self, taskid: int) -> dict | None:
            result = super()._get_result(taskid)
            future = self._task_obj.get(taskid)
            if result is None and future is not None and future.done() and (
                    future.exception() is not None):
                return _lost_task(taskid, future.exception())
            return result

        def _submit_job(self, node, updatehash: bool = False) -> int:
            try:
                return super()._submit_job(node, updatehash=updatehash)
            except BrokenProcessPool as error:  # an earlier worker died: fail, never wait
                self._taskresult[self._taskid] = _lost_task(self._taskid, error)
                return self._taskid

        def stop_workers(self) -> None:
            """Kill the workers (a node still running is abandoned) and close the pool."""
            self.stopping = True
            processes = list((getattr(self.pool, "_processes", None) or {}).values())
            for process in processes:
                with contextlib.suppress(Exception):
                    process.kill()
            self.pool.shutdown(wait=True, cancel_futures=True)

    return SupervisedMultiProcPlugin(plugin_args=plugin_args)


@dataclass
class Crash:
    """What a Nipype crash file says: the node, the exception type and its message."""

    path: Path
    node: str
    error_type: str
    message: str

    @property
    def subject(self) -> str | None:
        """``sub-<label>[_ses-<label>]`` of the node, from its workflow path."""
        match = re.search(r"\.(sub_[A-Za-z0-9]+(?:_ses_[A-Za-z0-9]+)?)_wf\.", self.node + ".")
        if not match:
            return None
        return match.group(1).replace("sub_", "sub-", 1).replace("_ses_", "_ses-")

    def error(self) -> BidsAnomalyError:
        """The user-facing error: ours with its exit code, anything else exit 1, one line."""
        name = self.error_type.rsplit(".", 1)[-1]
        cls = getattr(errors, name, None)
        where = self.subject or self.node
        if isinstance(cls, type) and issubclass(cls, BidsAnomalyError):
            return cls(f"{where}: {self.message}")
        step = self.node.rsplit(".", 1)[-1]
        return BidsAnomalyError(f"{where}: step {step} failed ({name}: {self.message}); the "
                                f"traceback is in {self.path}")


def read_crash(path: Path) -> Crash:
    """Parse a Nipype crash file (text format) into a :class:`Crash`.

    The file holds ``Node: <name>`` and the traceback of the failure inside the node (nested in
    Nipype's own, each line indented by a tab); the last exception of it is the cause.
    """
    text = Path(path).read_text(errors="replace")
    node_match = re.search(r"^Node: (.+)$", text, re.MULTILINE)
    node = node_match.group(1).strip() if node_match else "unknown"
    body = text.split("\nTraceback:\n", 1)[-1]
    lines = [line[1:] if line.startswith("\t") else line for line in body.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    tail = lines[starts[-1] + 1:] if starts else lines
    first = next((i for i, line in enumerate(tail) if line.strip() and not line.startswith(" ")),
                 None)
    exception = " ".join(line.strip() for line in tail[first:] if line.strip()) if (
        first is not None) else "unknown error"
    error_type, _, message = exception.partition(": ")
    return Crash(Path(path), node, error_type.strip(), " ".join(message.split()))


class _StopWhenInterrupted:
    """A Nipype status callback that stops a serial run once a stop signal arrived.

    Nipype's serial plugin catches every exception of a step, the signal's among them, writes a
    crash file and goes on with the next step; the end of the interrupted step raises it again.
    ``callback`` (the progress of the run, if any) is called first. Nipype pickles the plugin's
    arguments with every MapNode it sends to a worker, where no status is reported: the
    callback, which may hold locks, stays behind in this process (a worker's copy has none).
    """

    def __init__(self, callback: Callable | None) -> None:
        self.callback = callback

    def __call__(self, node, event: str) -> None:
        if self.callback is not None:
            self.callback(node, event)
        signum = received_signal()
        if signum is not None:
            raise Interrupted(signum)

    def __getstate__(self) -> dict:
        return {"callback": None}


def _forget_interrupted_steps(log_dir: Path, start: float) -> None:
    """Remove the crash files of steps stopped by a signal (they record no failure)."""
    for path in crash_files_since(log_dir, start):
        if read_crash(path).error_type.rsplit(".", 1)[-1] in ("Interrupted", "KeyboardInterrupt"):
            path.unlink(missing_ok=True)


def crash_files_since(log_dir: Path, start: float) -> list[Path]:
    """Nipype crash files written in ``log_dir`` since ``start`` (a ``time.time()``)."""
    files = [p for p in Path(log_dir).glob("crash-*.txt") if p.stat().st_mtime >= start - 1]
    return sorted(files, key=lambda p: p.stat().st_mtime)


def failure(log_dir: Path, start: float, error: Exception) -> BidsAnomalyError:
    """The error to report for a workflow that failed (see :func:`read_crash`)."""
    crashes = [read_crash(path) for path in crash_files_since(log_dir, start)]
    if not crashes:
        return BidsAnomalyError(f"processing failed: {' '.join(str(error).split())}")
    first = crashes[0].error()
    if len(crashes) > 1:
        first.args = (f"{first.args[0]} (and {len(crashes) - 1} more failed step(s); see "
                      f"{log_dir})",)
    return first


def run_workflow(workflow, nprocs: int, log_dir: Path, mem_gb: float | None = None,
                 status_callback: Callable | None = None, console_level: str = "WARNING"
                 ) -> None:
    """Run a Nipype workflow: MultiProc with supervised workers, or Linear for one process.

    ``console_level`` is the lowest level of Nipype messages shown on the console, by this
    process and the workers (:func:`set_nipype_console_level`); ``pypeline.log`` keeps every
    message of the level Nipype is configured with.

    Raises
    ------
    BidsAnomalyError
        A node failed (see :func:`failure`).
    KeyboardInterrupt
        SIGINT, or SIGTERM under :func:`interruptible`; the workers are stopped first.
    """
    set_nipype_console_level(console_level)
    plugin_args: dict = {"status_callback": _StopWhenInterrupted(status_callback)}
    if nprocs > 1:
        # forked workers of a process that already ran torch can hang (OpenMP state), so the
        # pool starts its workers from a clean server process
        plugin_args.update(n_procs=nprocs, raise_insufficient=False, mp_context="forkserver")
        if mem_gb:
            plugin_args["memory_gb"] = mem_gb
        plugin = supervised_multiproc(plugin_args, console_level)
    else:
        from nipype.pipeline.plugins import LinearPlugin

        plugin = LinearPlugin(plugin_args=plugin_args)
    start = time.time()
    # MultiProc runs a full garbage collection before each round of submissions; over the
    # objects of a loaded process (pybids, torch, nilearn) each took 0.17 s, 10 of the 19 s a
    # demo scoring run spent in the scheduler. Objects alive now are exempted (gc.freeze):
    # what the run allocates is still collected.
    gc.collect()
    gc.freeze()
    try:
        workflow.run(plugin=plugin)
    except KeyboardInterrupt:
        _forget_interrupted_steps(log_dir, start)
        raise
    except RuntimeError as error:
        signum = received_signal()
        if signum is not None:  # a step stopped by the signal, reported as its failure
            _forget_interrupted_steps(log_dir, start)
            raise Interrupted(signum) from None
        raise failure(log_dir, start, error) from error
    finally:
        gc.unfreeze()
        if hasattr(plugin, "stop_workers"):
            plugin.stop_workers()
