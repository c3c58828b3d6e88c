"""Progress display: a bar on a terminal, log lines per finished subject otherwise."""

import io
import logging

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_anomaly.runtime.progress import ItemProgress, WorkflowProgress


def _add(x):
    return x + 1


def _workflow(tmp_path):
    top = pe.Workflow("top", base_dir=str(tmp_path))
    for subject in ("sub_a_wf", "sub_b_wf"):
        workflow = pe.Workflow(subject)
        source = pe.Node(niu.IdentityInterface(fields=["x"]), name="source")
        source.inputs.x = 1
        first = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=_add),
                        name="first")
        second = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=_add),
                         name="second")
        workflow.connect([(source, first, [("x", "x")]), (first, second, [("x", "x")])])
        top.add_nodes([workflow])
    return top


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_name_each_finished_subject_with_an_eta(tmp_path, caplog):
    workflow = _workflow(tmp_path)
    progress = WorkflowProgress(workflow, {"sub_a_wf": "sub-a", "sub_b_wf": "sub-b"},
                                stream=io.StringIO())
    assert progress.totals == {"sub_a_wf": 2, "sub_b_wf": 2}  # identity nodes never run
    with caplog.at_level(logging.INFO, logger="bids_anomaly.runtime.progress"):
        workflow.run(plugin="Linear", plugin_args={"status_callback": progress})
    lines = [r.getMessage() for r in caplog.records if r.name == "bids_anomaly.runtime.progress"]
    assert len(lines) == 2
    assert lines[0].startswith("sub-") and "done (1/2" in lines[0] and "ETA" in lines[0]
    assert "(2/2" in lines[1] and "ETA" not in lines[1]
    # a rerun finds every node in the cache and still reports both subjects
    caplog.clear()
    progress = WorkflowProgress(workflow, {}, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="bids_anomaly.runtime.progress"):
        workflow.run(plugin="Linear", plugin_args={"status_callback": progress})
    assert sum("done" in r.getMessage() for r in caplog.records) == 2


def test_bar_on_a_terminal(tmp_path, caplog):
    workflow = _workflow(tmp_path)
    terminal = _Terminal()
    progress = WorkflowProgress(workflow, {"sub_a_wf": "sub-a", "sub_b_wf": "sub-b"},
                                stream=terminal)
    with caplog.at_level(logging.INFO, logger="bids_anomaly.runtime.progress"):
        workflow.run(plugin="Linear", plugin_args={"status_callback": progress})
    progress.close()
    output = terminal.getvalue()
    assert "4/4" in output and "2/2 subjects done" in output and "sub-a: done" in output
    assert not [r for r in caplog.records if r.name == "bids_anomaly.runtime.progress"]


def test_item_progress_logs_position_and_eta(caplog):
    with caplog.at_level(logging.INFO, logger="bids_anomaly.runtime.progress"):
        progress = ItemProgress(3, "group x", stream=io.StringIO())
        for item in ("a", "b", "c"):
            progress.advance(item)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "group x: a (1/3)" and lines[2].startswith("group x: c (3/3, ETA")
    terminal = _Terminal()
    progress = ItemProgress(2, "group y", stream=terminal)
    progress.advance("a")
    progress.advance("b")
    progress.close()
    assert "2/2" in terminal.getvalue()


def _sleep(x):
    import time

    time.sleep(0.4)
    return x


def test_batch_mode_says_where_it_is_between_subjects(tmp_path, caplog):
    top = pe.Workflow("top", base_dir=str(tmp_path))
    subject = pe.Workflow("sub_a_wf")
    previous = None
    for index in range(4):
        node = pe.Node(niu.Function(input_names=["x"], output_names=["x"], function=_sleep),
                       name=f"step{index}")
        if previous is None:
            node.inputs.x = 0
        else:
            subject.connect(previous, "x", node, "x")
        previous = node
    top.add_nodes([subject])
    progress = WorkflowProgress(top, {"sub_a_wf": "sub-a"}, stream=io.StringIO(),
                                heartbeat=0.25)
    with caplog.at_level(logging.INFO, logger="bids_anomaly.runtime.progress"):
        top.run(plugin="Linear", plugin_args={"status_callback": progress})
    progress.close()
    beats = [r.getMessage() for r in caplog.records if "of the work done" in r.getMessage()]
    assert len(beats) >= 3  # about 1.6 s of work, a line every 0.25 s
    assert "ETA estimating" in beats[0]  # nothing has run yet
    later = [b for b in beats if "ETA estimating" not in b]
    assert later and all("ETA" in b and "elapsed" in b for b in later)
    # the ETA after the first steps is about the time the remaining steps take (0.4 s each)
    eta_seconds = [int(b.split("ETA ")[1].split(" s")[0]) for b in later if " min" not in
                   b.split("ETA ")[1]]
    assert eta_seconds and max(eta_seconds) <= 3
