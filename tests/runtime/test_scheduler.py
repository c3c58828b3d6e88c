"""The scheduler's dependency matrix: scipy's LIL matrix with column sums it can afford."""

import numpy as np
import pytest
import scipy.sparse as ssp

from bids_anomaly.runtime.execution import dependency_matrix, run_workflow


def _random_lil(rng: np.random.Generator, n: int, entries: int, dtype=float) -> ssp.lil_matrix:
    matrix = ssp.lil_matrix((n, n), dtype=dtype)
    for _ in range(entries):
        matrix[rng.integers(n), rng.integers(n)] = rng.integers(1, 3)
    return matrix


@pytest.mark.parametrize("dtype", [float, int])
def test_column_sums_are_scipys_through_the_schedulers_edits(dtype):
    rng = np.random.default_rng(0)
    scipy_matrix = _random_lil(rng, 60, 150, dtype)
    ours = dependency_matrix(scipy_matrix.copy())
    assert dependency_matrix(ours) is ours  # wrapped once
    for step in range(40):
        expected, got = scipy_matrix.sum(0), ours.sum(0)
        assert type(got) is type(expected) and got.dtype == expected.dtype
        assert got.shape == expected.shape and np.array_equal(got, expected)
        job = int(rng.integers(60))
        if step % 3 == 0:  # a job done: its row cleared, as Nipype's _task_finished_cb does
            for matrix in (scipy_matrix, ours):
                row = matrix.getrowview(job)
                row[row.nonzero()] = 0
        else:  # a dependency added
            scipy_matrix[job, step] = 1
            ours[job, step] = 1
    # other sums are scipy's own
    assert np.array_equal(ours.sum(1), scipy_matrix.sum(1)) and ours.sum() == scipy_matrix.sum()
    empty = dependency_matrix(ssp.lil_matrix((0, 0)))
    assert empty.sum(0).shape == (1, 0)


def _fan_workflow(base_dir):
    """Four nodes waiting on one, one waiting on the four: the matrix's sums decide the order."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    def double(value):
        return 2 * value

    def total(a, b, c, d):
        return a + b + c + d

    workflow = pe.Workflow(name="wf", base_dir=str(base_dir))
    source = pe.Node(niu.IdentityInterface(fields=["value"]), name="source")
    source.inputs.value = 5
    summed = pe.Node(niu.Function(function=total, input_names=list("abcd"),
                                  output_names=["total"]), name="summed")
    for name in "abcd":
        doubled = pe.Node(niu.Function(function=double, input_names=["value"],
                                       output_names=["value"]), name=f"doubled_{name}")
        workflow.connect([(source, doubled, [("value", "value")]),
                          (doubled, summed, [("value", name)])])
    workflow.config["execution"] = {"crashdump_dir": str(base_dir / "logs"),
                                    "crashfile_format": "txt", "poll_sleep_duration": 0.01}
    return workflow


def test_a_workflow_runs_to_the_end_under_the_supervised_scheduler(tmp_path):
    import gzip
    import pickle

    run_workflow(_fan_workflow(tmp_path), 2, tmp_path / "logs")
    with gzip.open(tmp_path / "wf" / "summed" / "result_summed.pklz") as handle:
        assert pickle.load(handle).outputs.total == 40


class _LockedTracker:
    """A status callback holding a lock, as the run's progress does (it cannot be pickled)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []

    def __call__(self, node, event: str) -> None:
        with self.lock:
            self.events.append((node.name, event))


def test_a_mapnode_runs_under_the_supervised_scheduler_with_a_progress_callback(tmp_path):
    import gzip
    import pickle

    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    def double(value):
        return 2 * value

    workflow = pe.Workflow(name="wf", base_dir=str(tmp_path))
    doubled = pe.MapNode(niu.Function(function=double, input_names=["value"],
                                      output_names=["value"]),
                         iterfield=["value"], name="doubled")
    doubled.inputs.value = [1, 2, 3]
    workflow.add_nodes([doubled])
    workflow.config["execution"] = {"crashdump_dir": str(tmp_path / "logs"),
                                    "crashfile_format": "txt", "poll_sleep_duration": 0.01}
    tracker = _LockedTracker()
    run_workflow(workflow, 2, tmp_path / "logs", status_callback=tracker)
    with gzip.open(tmp_path / "wf" / "doubled" / "result_doubled.pklz") as handle:
        assert pickle.load(handle).outputs.value == [2, 4, 6]
    assert ("doubled", "end") in tracker.events  # reported here, in the main process


def test_a_step_that_cannot_reach_a_worker_is_named_as_such():
    from concurrent.futures.process import BrokenProcessPool

    from bids_anomaly.runtime.execution import _lost_task

    died = _lost_task(3, BrokenProcessPool("gone"))["traceback"][-1]
    assert died.startswith("BrokenProcessPool: the worker process running this step died (gone)")
    unsent = _lost_task(4, AttributeError("Can't pickle local object 'f.<locals>.g'"))
    assert unsent["taskid"] == 4 and unsent["result"] is None
    assert unsent["traceback"][-1] == ("AttributeError: the step could not be run in a worker "
                                       "process (Can't pickle local object 'f.<locals>.g')\n")
