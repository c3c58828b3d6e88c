"""Inputs a hostile but fair user gives: each gets its exit code and one line, never a traceback.

Add a case to :data:`CASES` for every new input the tool learns to refuse. Each case changes a
copy of a small dataset (or adds a file next to it) and returns the command-line arguments; the
run must exit with the expected code, print one line containing the expected words, and leave
the input dataset byte-identical.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_anomaly.cli.run import main
from tests.conftest import (
    check_hostile_case,
    saved_normative_model,
    tree_digest,
    write_minimal_bids,
)

T1W = "sub-01/anat/sub-01_T1w.nii.gz"


def _image(bids: Path, data: np.ndarray, affine: np.ndarray | None = None,
           path: str = T1W) -> None:
    nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
                    ).to_filename(bids / path)


def _zeros(bids, tmp):
    _image(bids, np.zeros((20, 20, 20), np.float32))
    return ["participant"]


def _all_nan(bids, tmp):
    _image(bids, np.full((20, 20, 20), np.nan, np.float32))
    return ["participant"]


def _sheared(bids, tmp):
    affine = np.array([[2.0, 0.5, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    _image(bids, np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), affine)
    return ["participant"]


def _nearly_binary(bids, tmp):
    data = (np.random.default_rng(0).random((20, 20, 20)) > 0.5).astype(np.int16) * 100
    data[0, 0, :3] = (1, 2, 3)
    _image(bids, data)
    return ["participant"]


def _two_dimensional(bids, tmp):
    _image(bids, np.random.default_rng(0).random((20, 20)).astype(np.float32))
    return ["participant"]


def _four_dimensional(bids, tmp):
    _image(bids, np.random.default_rng(0).random((10, 10, 10, 3)).astype(np.float32))
    return ["participant"]


def _truncated(bids, tmp):
    path = bids / T1W
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return ["participant"]


def _not_gzip(bids, tmp):
    (bids / T1W).write_bytes(b"this is not a NIfTI file")
    return ["participant"]


def _empty_label(bids, tmp):
    return ["participant", "--participant-label", ""]


def _bare_prefix(bids, tmp):
    return ["participant", "--participant-label", "sub-"]


def _filter_file(content: object) -> Callable:
    def setup(bids, tmp):
        path = tmp / "filter.json"
        path.write_text(json.dumps(content))
        return ["participant", "--bids-filter-file", str(path)]
    return setup


def _filter_not_json(bids, tmp):
    path = tmp / "filter.json"
    path.write_bytes(b"\xff\xfe{not json")
    return ["participant", "--bids-filter-file", str(path)]


def _participants(content: bytes) -> Callable:
    # the BIDS validator refuses these first (exit 16, tests/bids/test_bids_validator.py): past it,
    # the tool's own reading of participants.tsv still names what is wrong
    def setup(bids, tmp):
        (bids / "participants.tsv").write_bytes(content)
        return ["train", "--train-filter", "group=healthy", "--skip-bids-validation"]
    return setup


def _model_name(name: str) -> Callable:
    def setup(bids, tmp):
        return ["train", "--model-name", name]
    return setup


def _model(edit: Callable[[Path], None], channels: tuple[str, ...] = ("T1w",)) -> Callable:
    def setup(bids, tmp):
        directory = saved_normative_model(tmp / "model-norm", list(channels))
        edit(directory)
        return ["participant", "--model", str(directory)]
    return setup


def _edit_card(**changes: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "model.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _truncate_weights(directory: Path) -> None:
    path = directory / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _replace_weights(directory: Path) -> None:
    other = saved_normative_model(directory.parent / "model-other", ["T1w"], threshold=9.0,
                                  grid=(10, 10, 10))
    shutil.copyfile(other / "weights.safetensors", directory / "weights.safetensors")


def _other_grid(bids, tmp):
    directory = saved_normative_model(tmp / "model-small", ["T1w"], grid=(10, 11, 12))
    return ["participant", "--model", str(directory)]


def _flair_model_strict(bids, tmp):
    rng = np.random.default_rng(1)
    _image(bids, rng.random((20, 20, 20)).astype(np.float32),
           path="sub-01/anat/sub-01_FLAIR.nii.gz")
    directory = saved_normative_model(tmp / "model-ms", ["T1w", "FLAIR"])
    return ["participant", "--model", str(directory), "--stop-on-first-crash"]


CASES = {
    "all-zero T1w": (_zeros, 65, "empty"),
    "all-NaN T1w": (_all_nan, 65, "empty"),
    "sheared affine": (_sheared, 65, "sheared"),
    "nearly binary int16": (_nearly_binary, 65, "distinct intensities"),
    "2D image": (_two_dimensional, 65, "2D image"),
    "4D image": (_four_dimensional, 65, "split 4D series"),
    "truncated gzip": (_truncated, 65, "truncated or corrupt"),
    "not a NIfTI": (_not_gzip, 65, "truncated or corrupt"),
    "empty participant label": (_empty_label, 2, "not a BIDS label"),
    "bare sub- label": (_bare_prefix, 2, "not a BIDS label"),
    "filter: unknown entity": (_filter_file({"t1w": {"colour": "red"}}), 2, "unknown entity"),
    "filter: value not an object": (_filter_file({"t1w": "mprage"}), 2, "must be an object"),
    "filter: misspelt suffix": (_filter_file({"t1ww": {"acquisition": "x"}}), 2, "unknown key"),
    "filter: a list": (_filter_file(["t1w"]), 2, "JSON object"),
    "filter: bad value": (_filter_file({"t1w": {"run": {"a": 1}}}), 2, "must be a string"),
    "filter: not JSON": (_filter_not_json, 2, "--bids-filter-file"),
    "participants.tsv: unbalanced quote": (
        _participants(b'participant_id\tgroup\n"sub-01\thealthy\nsub-02\thealthy\n'), 65,
        "is not sub-<label>"),
    "participants.tsv: random bytes": (
        _participants(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))),
        65, "participants.tsv"),
    "participants.tsv: empty": (_participants(b""), 65, "not a readable tab-separated table"),
    "model name: path traversal": (_model_name("x/../../bids/code"), 2, "model name"),
    "model name: no letter": (_model_name("!!!"), 2, "model name"),
    "model name: dot-dot": (_model_name(".."), 2, "model name"),
    "model: path traversal by name": (lambda b, t: ["participant", "--model", "../../x"], 2,
                                      "model name"),
    "card: more channels than weights": (_model(_edit_card(channels=["T1w", "FLAIR"])), 65,
                                         "model.json lists"),
    "card: another channel than weights": (_model(_edit_card(channels=["T2w"])), 65,
                                           "trained on T1w"),
    "card: unknown model type": (_model(_edit_card(model_type="evil")), 65,
                                 "unknown model type 'evil'"),
    "card: threshold not a number": (_model(_edit_card(threshold="abc")), 65,
                                     "threshold 'abc'"),
    "card: fpr out of range": (_model(_edit_card(fpr=2)), 65, "fpr 2"),
    "card: unknown field": (_model(_edit_card(owner="me")), 65, "not a valid model card"),
    "card: not JSON": (_model(lambda d: (d / "model.json").write_text("{")), 65,
                       "not a valid model card"),
    "weights: truncated": (_model(_truncate_weights), 65, "checksum"),
    "weights: replaced": (_model(_replace_weights), 65, "checksum"),
    "weights: missing": (_model(lambda d: (d / "weights.safetensors").unlink()), 66,
                         "is missing"),
    "weights: another template grid": (_other_grid, 65, "another template"),
    "mixed cohort with --stop-on-first-crash": (_flair_model_strict, 65,
                                                "sub-02: model 'ms' needs channels"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_input_gives_its_exit_code_and_one_line(case, tiny_bids, tmp_path, capsys):
    check_hostile_case(CASES[case], tiny_bids, tmp_path, capsys)


@pytest.mark.parametrize("args", [["train", "--model-name", "!!!"],
                                  ["participant", "--participant-label", ""]])
def test_names_are_refused_before_any_work(args, tiny_bids, tmp_path):
    assert main([str(tiny_bids), str(tmp_path / "out"), *args]) == 2
    assert not (tmp_path / "out").exists()


def test_repeated_labels_are_processed_once(tiny_bids, tmp_path):
    from bids_anomaly.cli.parser import build_parser, settings_from_args

    args = build_parser().parse_args([str(tiny_bids), str(tmp_path / "out"), "participant",
                                      "--participant-label", "01", "sub-01", "02", "01"])
    assert settings_from_args(args).inputs.participant_label == ["01", "02"]


def test_symlinked_image_keeps_its_bids_name(tmp_path):
    from bids_anomaly.bids import bids_uri

    shared = tmp_path / "shared" / "scan.nii.gz"
    shared.parent.mkdir()
    shared.write_bytes(b"x")
    link = tmp_path / "ds" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to(shared)
    assert bids_uri(tmp_path / "ds", link) == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"


def test_dataset_description_records_no_host_path(tmp_path):
    from bids_anomaly.bids import write_dataset_description

    bids, out = tmp_path / "data" / "raw", tmp_path / "results" / "derivatives"
    write_dataset_description(out, bids)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["SourceDatasets"] == [{"URL": "bids:raw:"}]
    assert description["DatasetLinks"] == {"raw": "../../data/raw"}
    assert str(tmp_path) not in (out / "dataset_description.json").read_text()
    ignored = (out / ".bidsignore").read_text().split()
    assert {"*_regions.tsv", "*_qc.tsv", "figures/"} <= set(ignored)


def test_int16_padding_is_not_taken_for_normalised_data(tmp_path):
    from bids_anomaly.imaging.images import padding_to_zero
    from bids_anomaly.interfaces.images import ConformImage

    rng = np.random.default_rng(0)
    data = np.full((30, 30, 30), -32768, np.int16)
    data[5:25, 5:25, 5:25] = rng.integers(200, 1000, (20, 20, 20))
    fixed, value = padding_to_zero(data)
    assert value == -32768 and fixed.min() == 0 and (fixed[5:25, 5:25, 5:25] > 0).all()
    z_scored = rng.normal(size=(20, 20, 20)).astype(np.float32)
    assert padding_to_zero(z_scored)[1] is None  # a spread of negatives is data, not padding
    nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "padded.nii.gz")
    result = ConformImage(in_file=str(tmp_path / "padded.nii.gz")).run(cwd=str(tmp_path))
    assert nib.load(result.outputs.out_file).get_fdata().min() == 0


# ---------------------------------------------------------------- failures inside Nipype nodes

def _failing_workflow(base_dir: Path, error: str):
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    def fail(kind):
        if kind == "ours":
            from bids_anomaly.errors import BadDataError
            raise BadDataError("the FLAIR covers no brain")
        raise ValueError("something\nwent wrong")

    workflow = pe.Workflow(name="wf", base_dir=str(base_dir))
    subject = pe.Workflow(name="sub_07_ses_b_wf")
    subject.add_nodes([pe.Node(niu.Function(function=fail, input_names=["kind"]),
                               name="failing_step")])
    subject.get_node("failing_step").inputs.kind = error
    workflow.add_nodes([subject])
    workflow.config["execution"] = {"crashdump_dir": str(base_dir / "logs"),
                                    "crashfile_format": "txt"}
    return workflow


@pytest.mark.parametrize("nprocs", [1, 2])
def test_errors_inside_nodes_keep_their_exit_code(tmp_path, nprocs):
    from bids_anomaly.errors import BadDataError, BidsAnomalyError
    from bids_anomaly.runtime.execution import run_workflow

    with pytest.raises(BadDataError) as ours:
        run_workflow(_failing_workflow(tmp_path / "a", "ours"), nprocs, tmp_path / "a" / "logs")
    assert str(ours.value) == "sub-07_ses-b: the FLAIR covers no brain"
    assert ours.value.exit_code == 65
    with pytest.raises(BidsAnomalyError) as other:
        run_workflow(_failing_workflow(tmp_path / "b", "other"), nprocs, tmp_path / "b" / "logs")
    message = str(other.value)
    assert other.value.exit_code == 1 and "\n" not in message
    assert "sub-07_ses-b: step failing_step failed (ValueError: something went wrong)" in message
    assert "crash-" in message and Path(message.rsplit(" ", 1)[-1]).is_file()


def _dying_workflow(base_dir: Path):
    """A worker that dies in the middle of a node (as under the OOM killer), a node after it."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    def die(value):
        import os
        os._exit(9)

    def after(value):
        return value

    workflow = pe.Workflow(name="wf", base_dir=str(base_dir))
    subject = pe.Workflow(name="sub_07_wf")
    dying = pe.Node(niu.Function(function=die, input_names=["value"], output_names=["value"]),
                    name="dying_step")
    dying.inputs.value = 1
    later = pe.Node(niu.Function(function=after, input_names=["value"], output_names=["value"]),
                    name="later_step")
    subject.connect(dying, "value", later, "value")
    workflow.add_nodes([subject])
    workflow.config["execution"] = {"crashdump_dir": str(base_dir / "logs"),
                                    "crashfile_format": "txt", "poll_sleep_duration": 0.1}
    return workflow


def test_a_dead_worker_fails_the_run_instead_of_hanging_it(tmp_path):
    import threading

    from bids_anomaly.errors import BidsAnomalyError
    from bids_anomaly.runtime.execution import run_workflow

    raised: list[BaseException] = []

    def target() -> None:
        try:
            run_workflow(_dying_workflow(tmp_path), 2, tmp_path / "logs")
        except BaseException as error:  # noqa: BLE001  (the test inspects it)
            raised.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive(), "the scheduler waited for a dead worker"
    assert len(raised) == 1 and isinstance(raised[0], BidsAnomalyError), raised
    message = str(raised[0])
    assert "\n" not in message and "sub-07: step dying_step failed (BrokenProcessPool" in message
    assert "worker process running this step died" in message


def test_a_log_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path, monkeypatch):
    import logging
    import threading

    from nipype.external.cloghandler import ConcurrentRotatingFileHandler

    from bids_anomaly.runtime import execution

    monkeypatch.setattr(execution, "STALE_LOG_LOCK_S", 0.2)
    log = tmp_path / "pypeline.log"
    (tmp_path / "pypeline.log.lock").write_text("")  # as a run killed mid-line leaves it
    handler = ConcurrentRotatingFileHandler(str(log))
    logger = logging.getLogger("nipype.stale_lock_test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        execution.guard_nipype_log_lock()
        thread = threading.Thread(target=logger.info, args=("after the killed run",),
                                  daemon=True)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the log line waited for a lock nobody holds"
        logger.info("and the next line")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert log.read_text().splitlines() == ["after the killed run", "and the next line"]
    assert not (tmp_path / "pypeline.log.lock").exists()


# ------------------------------------------------------------- the most common MS protocol, real

@pytest.fixture(scope="module")
def flair_dataset(tmp_path_factory) -> Path:
    """Two generated subjects: sub-01 T1w + FLAIR (a symlink to shared storage), sub-02 T1w."""
    from bids_anomaly.simulation.synthetic import synthetic_subject

    root = tmp_path_factory.mktemp("protocol")
    first, second = synthetic_subject(seed=5, lesions=True), synthetic_subject(seed=6)
    bids = write_minimal_bids(root / "bids", {"01": {"T1w": first["T1w"]},
                                              "02": {"T1w": second["T1w"]}},
                              groups={"01": "MS"})
    shared = root / "shared" / "flair_of_patient_01.nii.gz"
    shared.parent.mkdir()
    first["FLAIR"].to_filename(shared)
    (bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz").symlink_to(shared)
    return bids


@pytest.mark.slow
def test_t1w_flair_mixed_cohort_and_retrained_threshold(flair_dataset, tmp_path):
    out = tmp_path / "out"
    before = tree_digest(flair_dataset)
    common = [str(flair_dataset), str(out), "participant", "--nprocs", "2", "--sloppy"]
    result = subprocess.run([sys.executable, "-m", "bids_anomaly", *common],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    anat = out / "sub-01" / "anat"
    flair = anat / "sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_FLAIR.json"
    assert json.loads(flair.read_text())["Sources"][0] == (
        "bids:raw:sub-01/anat/sub-01_FLAIR.nii.gz")
    assert (out / "sub-01" / "figures"
            / "sub-01_space-MNI152NLin2009aSym_desc-coregistration_FLAIR.svg").is_file()

    # a T1w + FLAIR model scores sub-01 and reports sub-02, which has no FLAIR
    model = saved_normative_model(out / "models" / "model-ms", ["T1w", "FLAIR"], threshold=4.0)
    scored = subprocess.run([sys.executable, "-m", "bids_anomaly", *common, "--model", "ms"],
                            capture_output=True, text=True, timeout=900)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "sub-02: model 'ms' needs channels ['T1w', 'FLAIR'] but FLAIR is missing" in (
        scored.stdout)
    statmap = anat / "sub-01_space-MNI152NLin2009aSym_res-2_desc-ms_stat-anomaly_statmap.nii.gz"
    mask = anat / "sub-01_space-MNI152NLin2009aSym_res-2_label-anomaly_desc-ms_mask.nii.gz"
    assert not list((out / "sub-02" / "anat").glob("*desc-ms*"))

    def flagged(threshold: float) -> tuple[int, int]:
        scores = nib.load(statmap).get_fdata()
        return int(np.asarray(nib.load(mask).dataobj).sum()), int((scores > threshold).sum())

    written, expected = flagged(4.0)
    assert written == expected > 0
    # the same weights with another threshold (a retrained --fpr): the mask follows the card
    saved_normative_model(model, ["T1w", "FLAIR"], threshold=6.0)
    again = subprocess.run([sys.executable, "-m", "bids_anomaly", *common, "--model", "ms"],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    written, expected = flagged(6.0)
    assert written == expected and written < flagged(4.0)[1]
    assert json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())[
        "Threshold"] == 6.0
    assert tree_digest(flair_dataset) == before


_SCRIPT = """
import sys, time
from pathlib import Path
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from bids_anomaly.cli import run as cli

def step(kind, marker):
    from pathlib import Path
    import time
    Path(marker).write_text("started")
    if kind == "sleep":
        time.sleep(60)
    raise ValueError("something went wrong")

def run_level(argv):
    from bids_anomaly.runtime.execution import run_workflow

    base, kind, nprocs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    workflow = pe.Workflow(name="wf", base_dir=str(base / "work"))
    for label in ("01", "02"):  # two subjects: after the first, the second is never started
        subject = pe.Workflow(name=f"sub_{label}_wf")
        node = pe.Node(niu.Function(function=step, input_names=["kind", "marker"]),
                       name="step")
        node.inputs.kind, node.inputs.marker = kind, str(base / f"started-{label}")
        subject.add_nodes([node])
        workflow.add_nodes([subject])
    workflow.config["execution"] = {"crashdump_dir": str(base / "logs"),
                                    "crashfile_format": "txt"}
    run_workflow(workflow, nprocs, base / "logs")

if __name__ == "__main__":  # the workers of --nprocs 2 import this file
    cli.run_level = run_level
    sys.exit(cli.main([]))
"""


def _run_steps(tmp_path: Path, kind: str, nprocs: int, stop: signal.Signals | None = None
               ) -> tuple[int, str, str]:
    """Run two one-step subjects through the command line's error handling (a subprocess).

    ``stop``: the signal sent once the first step has started.
    """
    script = tmp_path / "steps.py"  # Nipype reads the step's source from a file
    script.write_text(_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path), kind, str(nprocs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stop is not None:
        deadline = time.monotonic() + 120
        while (not list(tmp_path.glob("started-*")) and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.1)
        time.sleep(0.5)
        process.send_signal(stop)
    out, err = process.communicate(timeout=180)
    return process.returncode, out, err


@pytest.mark.parametrize("nprocs", [1, 2])
def test_a_stop_signal_inside_a_step_stops_the_run_in_one_line(tmp_path, nprocs):
    code, out, err = _run_steps(tmp_path, "sleep", nprocs, signal.SIGTERM)
    assert code == 143, err
    assert "Traceback" not in out + err, out + err
    assert err.strip().splitlines() == ["bids_anomaly: stopped by SIGTERM; workers stopped; "
                                        "rerun with the same work directory to resume"], err
    assert not list((tmp_path / "logs").glob("crash-*")), "a crash file for a stopped step"
    if nprocs == 1:  # one step at a time: the second subject's never starts
        assert len(list(tmp_path.glob("started-*"))) == 1, "the run went on after the signal"


@pytest.mark.parametrize("nprocs", [1, 2])
def test_a_failing_step_prints_one_line_and_no_traceback(tmp_path, nprocs):
    code, out, err = _run_steps(tmp_path, "fail", nprocs)
    assert code == 1
    assert "Traceback" not in out + err and "nipype.workflow" not in out + err, out + err
    line = err.strip()
    assert len(line.splitlines()) == 1, err
    assert "sub-01: step step failed (ValueError: something went wrong)" in line
    crash = Path(line.split("the traceback is in ")[1].split()[0])
    assert crash.is_file() and "Traceback" in crash.read_text()


# ------------------------------------------------------- OUTPUT_DIR that holds another dataset

def _raw_copy(bids: Path, out: Path) -> str:
    shutil.copytree(bids, out)
    return "the raw BIDS dataset 'test'"


def _other_pipeline(bids: Path, out: Path) -> str:
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "fMRIPrep outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.0"}]}))
    (out / "sub-01").mkdir()
    (out / "sub-01" / "sub-01_desc-confounds_timeseries.tsv").write_text("a\n1\n")
    return "the derivatives 'fMRIPrep outputs' of fMRIPrep"


def _binary_description(bids: Path, out: Path) -> str:
    out.mkdir()
    (out / "dataset_description.json").write_bytes(b"\xff\xfe\x00binary")
    return "cannot be read"


def _dataset_without_description(bids: Path, out: Path) -> str:
    shutil.copytree(bids, out)
    (out / "dataset_description.json").unlink()
    return "a dataset without dataset_description.json"


@pytest.mark.parametrize("make", [_raw_copy, _other_pipeline, _binary_description,
                                  _dataset_without_description],
                         ids=["raw dataset", "another pipeline", "binary description",
                              "no description"])
@pytest.mark.parametrize("level", ["participant", "group", "train"])
def test_an_output_dir_holding_another_dataset_is_refused_before_writing(
        tiny_bids, tmp_path, capsys, make, level):
    out = tmp_path / "other"
    what = make(tiny_bids, out)
    before = tree_digest(out), sorted(out.rglob("*"))
    assert main([str(tiny_bids), str(out), level]) == 73
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and what in err, err
    assert (tree_digest(out), sorted(out.rglob("*"))) == before  # nothing written, nor added


def test_a_work_dir_holding_a_dataset_is_refused(tiny_bids, tmp_path, capsys):
    other = _raw_copy(tiny_bids, tmp_path / "other") and tmp_path / "other"
    before = tree_digest(other)
    assert main([str(tiny_bids), str(tmp_path / "out"), "participant", "-w", str(other)]) == 73
    err = capsys.readouterr().err
    assert f"--work-dir {other} holds a dataset" in err and tree_digest(other) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["new", "empty", "earlier output"])
def test_an_empty_new_or_own_output_dir_is_used(tiny_bids, tmp_path, capsys, kind):
    from bids_anomaly.bids import write_dataset_description

    out = tmp_path / "out"
    if kind != "new":
        out.mkdir()
    if kind == "earlier output":
        write_dataset_description(out, tiny_bids)
    # the run goes past the output check, to the unknown label
    assert main([str(tiny_bids), str(out), "participant", "--participant-label", "99"]) == 18


def test_a_too_long_output_path_is_an_output_error(tiny_bids, tmp_path, capsys):
    out = tmp_path / ("x" * 300)
    assert main([str(tiny_bids), str(out), "participant"]) == 73
    err = capsys.readouterr().err
    assert "OUTPUT_DIR" in err and "BIDS_DIR" not in err and str(tiny_bids) not in err, err


@pytest.mark.parametrize("where", ["under a file", "a dataset"])
def test_the_demo_refuses_a_folder_it_cannot_own(tiny_bids, tmp_path, capsys, where):
    target = (tmp_path / "file" / "demo") if where == "under a file" else tiny_bids
    (tmp_path / "file").write_text("not a folder")
    before = tree_digest(tiny_bids)
    assert main(["demo", str(target)]) == 73
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(target) in err, err
    assert tree_digest(tiny_bids) == before and not (tiny_bids / "rawdata").exists()


# ------------------------------------------------------------ refused before any work (usage)

@pytest.mark.parametrize("args, words", [
    (["train"], "train needs at least 3 subject/sessions"),
    (["train", "--participant-label", "01"], "the selection has 1 (sub-01)"),
    (["participant", "--fpr", "0.01"], "--fpr at the participant level"),
    (["participant", "--extrapolate"], "--extrapolate applies to a model with covariates"),
    (["participant", "--dwi-derivatives", ".", "--dwi-maps", "none"],
     "--dwi-derivatives gives diffusion maps"),
], ids=["train with 2 subjects", "train with 1 subject", "participant --fpr",
        "--extrapolate without a model", "--dwi-derivatives with --dwi-maps none"])
def test_impossible_requests_are_refused_before_any_work(tiny_bids, tmp_path, capsys, args,
                                                         words):
    out = tmp_path / "out"
    assert main([str(tiny_bids), str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_the_demo_needs_three_healthy_controls(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", str(tmp_path / "demo"), "--healthy", "1"])
    assert exit_info.value.code == 2 and "at least 3" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------- a model whose card or weights were changed

def _calibrated(edit: Callable[[Path], None]) -> Callable:
    """A case: a trained-like model (its card holds the calibration tail), edited."""
    def setup(bids, tmp):
        directory = saved_normative_model(tmp / "model-norm", ["T1w"], calibrated=True)
        edit(directory)
        return ["participant", "--model", str(directory)]
    return setup


def _card_values(directory: Path) -> dict:
    return json.loads((directory / "model.json").read_text())


def _write_card(directory: Path, values: dict, sign: bool) -> None:
    """Write a card, signed again when ``sign`` (as one who knows how cards are signed)."""
    if sign:
        from bids_anomaly.models.store import card_signature

        values["signature"] = card_signature(values)
    (directory / "model.json").write_text(json.dumps(values))


def _change_card(sign: bool = False, **changes: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        _write_card(directory, {**_card_values(directory), **changes}, sign)
    return edit


def _nan_weights(sign: bool) -> Callable[[Path], None]:
    """Weights multiplied by NaN, the card's checksum of them refreshed."""
    def edit(directory: Path) -> None:
        from bids_anomaly.models.store import file_checksum
        from bids_anomaly.models.weights import read_weights, write_weights

        tensors, hyperparameters = read_weights(directory)
        tensors["location"] = tensors["location"] * float("nan")
        write_weights(directory, tensors, hyperparameters)
        values = _card_values(directory)
        values["checksum"] = file_checksum(directory / "weights.safetensors")
        _write_card(directory, values, sign)
    return edit


def _unsigned(directory: Path) -> None:
    values = _card_values(directory)
    values.pop("signature", None)  # as cards were written before they were signed
    _write_card(directory, values, sign=False)


def _damaged_tail(directory: Path) -> None:
    values = _card_values(directory)
    values["extra"]["calibration_tail"]["score"] = ["x"] * 10
    _write_card(directory, values, sign=True)


MODEL_CASES = {
    "weights times NaN, checksum refreshed": (_calibrated(_nan_weights(False)), 65,
                                              "model 'norm': its weights hold NaN"),
    "weights times NaN, card signed again": (_calibrated(_nan_weights(True)), 65,
                                             "model 'norm': its weights hold NaN"),
    "threshold 1e-6": (_calibrated(_change_card(threshold=1e-6)), 65,
                       "threshold 1e-06 disagrees with the calibration"),
    "threshold 1e-6, card signed again": (_calibrated(_change_card(True, threshold=1e-6)), 65,
                                          "threshold 1e-06 disagrees with the calibration"),
    "threshold -1e300, card signed again": (
        _calibrated(_change_card(True, threshold=-1e300)), 65,
        "threshold -1e+300 disagrees with the calibration"),
    "fpr changed": (_calibrated(_change_card(True, fpr=0.5)), 65,
                    "the card says fpr 0.5"),
    "a field no other check reads": (_calibrated(_change_card(training_participants=["x"])),
                                     65, "does not match its signature"),
    "card written before cards were signed": (_calibrated(_unsigned), 65,
                                              "has no signature (written by bids_anomaly"),
    "damaged calibration tail": (_calibrated(_damaged_tail), 65, "calibration_tail is damaged"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES), ids=list(MODEL_CASES))
def test_an_edited_or_broken_model_is_refused_at_load(case, tiny_bids, tmp_path, capsys):
    out = check_hostile_case(MODEL_CASES[case], tiny_bids, tmp_path, capsys)
    assert not list(out.glob("sub-*/anat/*stat-anomaly*")), "scored with a broken model"


def test_a_model_scoring_nan_is_refused_naming_it(tmp_path):
    """Finite weights (a spread of 0) that score NaN: the scoring step refuses them."""
    from bids_anomaly.errors import BadDataError
    from bids_anomaly.interfaces.anomaly import ScoreAnomaly

    directory = saved_normative_model(tmp_path / "model-flat", ["T1w"], grid=(12, 12, 12),
                                      spread=0.0)
    values = _card_values(directory)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image, mask = tmp_path / "t1w.nii.gz", tmp_path / "mask.nii.gz"
    nib.Nifti1Image(np.zeros((12, 12, 12), np.float32), affine).to_filename(image)
    nib.Nifti1Image(np.ones((12, 12, 12), np.uint8), affine).to_filename(mask)
    score = ScoreAnomaly(channel_files=[str(image)], mask_file=str(mask),
                         model_dir=str(directory), model_checksum=values["checksum"],
                         card_checksum="x")
    with pytest.raises(BadDataError, match="model 'flat' scores 1728 brain voxels NaN"):
        score.run(cwd=str(tmp_path))


def test_a_diverging_deep_model_fails_instead_of_saving(tmp_path):
    from bids_anomaly.errors import BidsAnomalyError
    from bids_anomaly.models import REGISTRY, SubjectImages, TrainingData
    from bids_anomaly.models.deep.engine import EngineOptions

    rng = np.random.default_rng(0)
    subjects = []
    for index in range(3):
        image, mask = tmp_path / f"s{index}.nii.gz", tmp_path / f"m{index}.nii.gz"
        nib.Nifti1Image(rng.normal(1, 0.1, (32, 32, 4)).astype(np.float32),
                        np.eye(4)).to_filename(image)
        nib.Nifti1Image(np.ones((32, 32, 4), np.uint8), np.eye(4)).to_filename(mask)
        subjects.append(SubjectImages(f"sub-{index}", [image], mask))
    training = EngineOptions(epochs=3, batch_size=8, num_workers=0, seed=0,
                             learning_rate=1e30, warmup_epochs=0.0)
    model = REGISTRY["ae"](mode="2d", width=4, latent=4, training=training,
                           cache_dir=tmp_path / "cache")
    with pytest.raises(BidsAnomalyError, match="training diverged at epoch 1") as failure:
        model.fit(TrainingData(subjects, ["T1w"]))
    assert failure.value.exit_code == 1


@pytest.mark.parametrize("kind", ["gpu", "cpu", "other"])
def test_a_deep_model_out_of_memory_names_the_batch_size_to_lower(kind, tmp_path):
    import torch

    from bids_anomaly.errors import TrainingError
    from bids_anomaly.models import REGISTRY, SubjectImages, TrainingData
    from bids_anomaly.models.deep.engine import EngineOptions

    subjects = []
    for index in range(3):
        image, mask = tmp_path / f"s{index}.nii.gz", tmp_path / f"m{index}.nii.gz"
        nib.Nifti1Image(np.ones((16, 16, 4), np.float32), np.eye(4)).to_filename(image)
        nib.Nifti1Image(np.ones((16, 16, 4), np.uint8), np.eye(4)).to_filename(mask)
        subjects.append(SubjectImages(f"sub-{index}", [image], mask))
    training = EngineOptions(epochs=2, batch_size=8, num_workers=0, seed=0)
    model = REGISTRY["ae"](mode="2d", width=4, latent=4, training=training,
                           cache_dir=tmp_path / "cache")

    error = {"gpu": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
             "other": RuntimeError("some other failure")}.get(kind)

    def allocation_fails(module, batch, generator):
        if error is None:  # a real allocation the CPU allocator refuses (4 PiB)
            torch.empty(2 ** 50)
        raise error

    model._batch_loss = allocation_fails
    if kind == "other":  # any other error is not disguised
        with pytest.raises(RuntimeError, match="some other failure"):
            model.fit(TrainingData(subjects, ["T1w"]))
        return
    with pytest.raises(TrainingError, match=r"^out of memory training on the CPU with batches "
                                            r"of 8 \(.*\): lower --batch-size") as failure:
        model.fit(TrainingData(subjects, ["T1w"]))
    assert failure.value.exit_code == 1
    assert ("CUDA out of memory" if kind == "gpu" else "can't allocate memory") in str(
        failure.value)


def test_a_fit_with_nan_parameters_is_not_saved(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from bids_anomaly.config import InputSettings, ModelSettings, Settings
    from bids_anomaly.errors import BidsAnomalyError
    from bids_anomaly.levels.train import fit_and_save
    from bids_anomaly.models import NormativeModel, SubjectImages, TrainingData

    fit = NormativeModel.fit

    def diverging_fit(self, data):
        fit(self, data)
        self.location = self.location * float("nan")

    monkeypatch.setattr(NormativeModel, "fit", diverging_fit)
    rng = np.random.default_rng(0)
    subjects = []
    for index in range(4):
        image, mask = tmp_path / f"s{index}.nii.gz", tmp_path / f"m{index}.nii.gz"
        nib.Nifti1Image(rng.normal(1, 0.1, (8, 8, 8)).astype(np.float32),
                        np.eye(4)).to_filename(image)
        nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)).to_filename(mask)
        subjects.append(SubjectImages(f"sub-{index}", [image], mask))
    out = tmp_path / "out"
    settings = Settings(inputs=InputSettings(bids_dir=tmp_path / "bids", output_dir=out,
                                             analysis_level="train"),
                        model=ModelSettings(model_name="norm"))
    with pytest.raises(BidsAnomalyError, match="model norm: training diverged"):
        fit_and_save(settings, TrainingData(subjects, ["T1w"]),
                     SimpleNamespace(name="MNI152NLin2009aSym", resolution=2), {})
    assert not (out / "models" / "model-norm").exists()


def test_model_files_share_one_mode(tmp_path):
    import os
    import stat

    directory = saved_normative_model(tmp_path / "model-m", ["T1w"], grid=(4, 4, 4))
    modes = {stat.S_IMODE(os.stat(p).st_mode) for p in directory.iterdir()}
    assert len(modes) == 1 and modes.pop() & 0o044, "weights private, card readable"


def test_a_page_shows_the_bad_outputs_of_another_model_instead_of_crashing(tmp_path):
    """Outputs a model with a threshold of -1e300 wrote (the whole brain flagged)."""
    from bids_anomaly import bids
    from bids_anomaly.bids import AnatInputs
    from bids_anomaly.reports.subject import anomaly_overlay, write_subject_reports

    out, space, res = tmp_path / "out", "MNI152NLin2009aSym", 2
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    brain = np.zeros((20, 20, 20), np.uint8)
    brain[4:16, 4:16, 4:16] = 1

    def write(spec: dict, data: np.ndarray) -> Path:
        path = bids.spec_path(out, "01", None, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(data, affine).to_filename(path)
        return path

    write(bids.preproc_spec(space, res, "T1w"), rng.random((20, 20, 20)).astype(np.float32))
    write(bids.brain_mask_spec(space, res), brain)
    statmap = write(bids.anomaly_map_spec(space, res, "bad"),
                    rng.random((20, 20, 20)).astype(np.float32) * brain)
    write(bids.anomaly_mask_spec(space, res, "bad"), brain)
    bids.write_sidecar(statmap, {"Model": "bad", "Threshold": -1e300})
    inputs = AnatInputs("01", None, images={"T1w": tmp_path / "sub-01_T1w.nii.gz"})
    page = write_subject_reports(out, [inputs], space)[0].read_text()
    assert "The outputs of model bad cannot be shown" in page
    assert anomaly_overlay(out, statmap) is None  # the group level's figure: none, no crash


# ------------------------------------------------------------ images that cannot be a head

def _raw_pixdim_zero(bids, tmp):
    img = nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32),
                          None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    img.header["pixdim"][1:4] = 0  # nibabel would read 1 mm
    img.to_filename(bids / T1W)
    return ["participant"]


def _voxels(size: float, shape: tuple[int, ...] = (20, 20, 20)) -> Callable:
    def setup(bids, tmp):
        _image(bids, np.random.default_rng(0).random(shape).astype(np.float32),
               np.diag([size, size, size, 1.0]))
        return ["participant"]
    return setup


def _complex(bids, tmp):
    rng = np.random.default_rng(0)
    _image(bids, (rng.random((20, 20, 20)) + 1j * rng.random((20, 20, 20))).astype(np.complex64))
    return ["participant"]


IMAGE_CASES = {  # every message starts with the file
    "100 mm voxels": (_voxels(100.0), 65, "_T1w.nii.gz: voxels of 100 x 100 x 100 mm"),
    "0.002 mm voxels": (_voxels(0.002), 65, "_T1w.nii.gz: voxels of 0.002 x 0.002 x 0.002 mm"),
    "8 x 8 x 8 image": (_voxels(2.0, (8, 8, 8)), 65,
                        "_T1w.nii.gz: 8 x 8 x 8 voxels covering 16 x 16 x 16 mm"),
    "a slab 4 voxels thick": (_voxels(2.0, (40, 40, 4)), 65, "_T1w.nii.gz: 40 x 40 x 4 voxels"),
    "pixdim 0 without qform or sform": (_raw_pixdim_zero, 65,
                                        "_T1w.nii.gz: the header gives voxel sizes"),
    "complex-valued image": (_complex, 65, "_T1w.nii.gz: a complex-valued image (complex64)"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES), ids=list(IMAGE_CASES))
def test_an_image_that_cannot_be_a_head_is_refused_before_any_work(case, tiny_bids, tmp_path,
                                                                   capsys):
    out = check_hostile_case(IMAGE_CASES[case], tiny_bids, tmp_path, capsys,
                             ["--skip-bids-validation"])
    assert not out.exists(), "something was written before the image was refused"


def _z_scored_brain(background: float) -> np.ndarray:
    """A skull-stripped head z-scored inside the brain, its constant background ``background``."""
    rng = np.random.default_rng(0)
    grid = np.indices((60, 60, 60)).astype(np.float32) - 30
    brain = (grid[0] / 24) ** 2 + (grid[1] / 28) ** 2 + (grid[2] / 22) ** 2 < 1
    values = 300 + 100 * (np.abs(grid[0]) < 8) + rng.normal(0, 20, brain.shape)
    z = (values - values[brain].mean()) / values[brain].std()
    return np.where(brain, z, background).astype(np.float32)


@pytest.mark.parametrize("background", [-2.5, -1.0, 0.0])
def test_a_z_scored_skull_stripped_image_is_raised_above_its_background(tmp_path, background):
    from bids_anomaly.interfaces.deepbet import BrainExtraction
    from bids_anomaly.interfaces.images import ConformImage

    data = _z_scored_brain(background)
    nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(tmp_path / "z.nii.gz")
    conformed = ConformImage(in_file=str(tmp_path / "z.nii.gz")).run(cwd=str(tmp_path))
    assert "as in z-scored images" in conformed.outputs.note
    out = nib.load(conformed.outputs.out_file).get_fdata()
    brain = data != background
    assert (out[~brain] == 0).all() and (out[brain] > 0).all()
    assert np.allclose(out[brain] - out[brain].min(), data[brain] - data[brain].min(),
                       atol=1e-4)  # the differences kept: a normalisation gives the same
    mask = BrainExtraction(in_file=conformed.outputs.out_file).run(cwd=str(tmp_path))
    assert mask.outputs.method == "detected"
    assert (np.asarray(nib.load(mask.outputs.out_mask).dataobj) > 0).sum() == brain.sum()


def test_the_qc_table_says_when_intensities_were_raised(tmp_path):
    from bids_anomaly.interfaces.qc import RegistrationQC

    mask = np.zeros((20, 20, 20), np.uint8)
    mask[5:15, 5:15, 5:15] = 1
    rng = np.random.default_rng(0)
    for name, data in (("mask", mask), ("image", rng.random((20, 20, 20)).astype(np.float32))):
        nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(tmp_path / f"{name}.nii")
    files = {key: str(tmp_path / f"{name}.nii") for key, name in (
        ("native_mask", "mask"), ("std_mask", "mask"), ("template_mask", "mask"),
        ("std_reference", "image"), ("template_t1w", "image"))}
    qc = RegistrationQC(subject_name="sub-01", reference="T1w", skull_stripping="detected",
                        modalities=[], notes=["", "sub-01_T1w.nii.gz: intensities below 0 ..."],
                        **files)
    table = qc.run(cwd=str(tmp_path)).outputs.out_tsv
    assert "sub-01_T1w.nii.gz: intensities below 0" in Path(table).read_text()


# ----------------------------------------------------------------- ground truth that is wrong

def _fake_outputs(out: Path, bids_dir: Path) -> None:
    """The derivatives of one scored subject (sub-01) on a 20^3 template-like grid."""
    from bids_anomaly import bids
    from bids_anomaly.bids import write_dataset_description

    write_dataset_description(out, bids_dir)
    space, res = "MNI152NLin2009aSym", 2
    brain = np.zeros((20, 20, 20), np.uint8)
    brain[4:16, 4:16, 4:16] = 1
    rng = np.random.default_rng(0)
    for spec, data in ((bids.brain_mask_spec(space, res), brain),
                       (bids.anomaly_map_spec(space, res, "norm"),
                        (rng.random(brain.shape) * brain).astype(np.float32)),
                       (bids.anomaly_mask_spec(space, res, "norm"), brain * 0)):
        path = bids.spec_path(out, "01", None, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(path)
    bids.write_sidecar(bids.spec_path(out, "01", None, bids.anomaly_map_spec(space, res, "norm")),
                       {"Model": "norm", "Threshold": 3.0})


@pytest.mark.parametrize("case, data, affine, words", [
    ("another grid", np.ones((7, 7, 7), np.uint8), np.eye(4), "its grid (7x7x7 voxels) is "
                                                              "neither the template's"),
    ("all NaN", np.full((20, 20, 20), np.nan, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]),
     "8000 of its 8000 voxels are NaN or infinite"),
], ids=["another grid", "all NaN"])
def test_ground_truth_that_cannot_be_evaluated_is_refused(tiny_bids, tmp_path, capsys, case,
                                                          data, affine, words):
    out, truth = tmp_path / "out", tmp_path / "truth"
    _fake_outputs(out, tiny_bids)
    (truth / "sub-01" / "anat").mkdir(parents=True)
    (truth / "dataset_description.json").write_text(json.dumps(
        {"Name": "truth", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    mask = truth / "sub-01" / "anat" / "sub-01_label-lesion_mask.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(mask)
    assert main([str(tiny_bids), str(out), "group", "--ground-truth", str(truth)]) == 65
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(mask) in err and words in err, err


@pytest.mark.slow
def test_a_z_scored_real_scan_is_processed(real_data, tmp_path):
    """sub-mslub26's skull-stripped T1w z-scored inside the brain, its background constant."""
    source = nib.load(real_data / "sub-mslub26" / "anat" / "sub-mslub26_T1w.nii.gz")
    data = source.get_fdata()
    brain = data > 0
    z = (data - data[brain].mean()) / data[brain].std()
    bids = write_minimal_bids(tmp_path / "bids", {"01": {"T1w": nib.Nifti1Image(
        np.where(brain, z, z[~brain].min() if (~brain).any() else -3.0).astype(np.float32),
        source.affine)}})
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "--skip-bids-validation",
                 "--nprocs", "2"]) == 0
    qc = (out / "sub-01" / "anat" / "sub-01_desc-registration_qc.tsv").read_text()
    assert "as in z-scored images" in qc  # the warning in the report's QC table
    import pandas as pd

    row = pd.read_csv(out / "sub-01" / "anat" / "sub-01_desc-registration_qc.tsv",
                      sep="\t").iloc[0]
    assert row["qc_pass"] and row["dice"] > 0.95
    assert "as in z-scored images" in (out / "sub-01.html").read_text()


# ------------------------------------------------------------- the right code, the right words

WORDING_CASES = {
    "--model a missing path": (lambda b, t: ["participant", "--model", "/missing/path"], 66,
                               "--model /missing/path: no such model directory"),
    "unknown --session-label": (lambda b, t: ["participant", "--session-label", "zz"], 18,
                                "unknown session label(s) zz"),
    "a filter matching nothing": (_filter_file({"t1w": {"acquisition": "mprage"}}), 18,
                                  "the t1w filter (acquisition=mprage) matches no image"),
    "card name '!!!'": (_calibrated(_change_card(True, name="!!!")), 65,
                        "its name comes from the card and is not a model name"),
    "card resolution 3": (_calibrated(_change_card(True, resolution=3)), 65,
                          "resolution 3 is not a voxel size this version offers (1, 2 mm)"),
    "card of another template": (
        _calibrated(_change_card(True, template="MNI152NLin6Asym")), 65,
        "trained in template MNI152NLin6Asym, the data are in MNI152NLin2009aSym"),
}


@pytest.mark.parametrize("case", list(WORDING_CASES), ids=list(WORDING_CASES))
def test_each_failure_gets_its_code_and_advice_that_can_be_followed(case, tiny_bids, tmp_path,
                                                                    capsys):
    check_hostile_case(WORDING_CASES[case], tiny_bids, tmp_path, capsys)


def test_no_advice_to_use_a_resolution_that_is_in_use_or_not_offered(tiny_bids, tmp_path,
                                                                     capsys):
    for template, resolution in (("MNI152NLin6Asym", 2), ("MNI152NLin2009aSym", 3)):
        directory = saved_normative_model(tmp_path / f"model-{resolution}", ["T1w"],
                                          calibrated=True)
        _change_card(True, template=template, resolution=resolution)(directory)
        assert main([str(tiny_bids), str(tmp_path / "out"), "participant", "--model",
                     str(directory)]) == 65
        err = capsys.readouterr().err
        assert "--resolution" not in err, err


# ------------------------------------------------------------------ nothing raw on the console

def _console(bids: Path, out: Path, *args: str) -> tuple[int, list[str]]:
    """Run the command line in a process of its own: its real console (stderr) lines."""
    result = subprocess.run([sys.executable, "-m", "bids_anomaly", str(bids), str(out), *args],
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr.splitlines()


def _ours(line: str) -> bool:
    return line.startswith(("INFO bids_anomaly", "WARNING bids_anomaly", "bids_anomaly: "))


@pytest.mark.parametrize("setup", [_raw_pixdim_zero, _complex], ids=["pixdim 0", "complex"])
def test_library_warnings_stay_off_the_console(tiny_bids, tmp_path, setup):
    setup(tiny_bids, tmp_path)
    code, lines = _console(tiny_bids, tmp_path / "out", "participant", "--skip-bids-validation")
    assert code == 65
    assert all(_ours(line) for line in lines), lines  # no nibabel fix, no ComplexWarning
    assert lines[-1].startswith("bids_anomaly: error: ") and "sub-01_T1w" in lines[-1]


def test_a_newline_in_a_path_is_printed_escaped(tmp_path):
    bids = tmp_path / "new\nline"
    code, lines = _console(bids, tmp_path / "out", "participant")
    assert code == 16
    assert lines == [f"bids_anomaly: error: BIDS_DIR {str(tmp_path)}/new\\nline does not exist "
                     "or is not a folder"], lines


def test_figures_of_a_map_with_nan_or_a_huge_threshold_raise_no_warning(tmp_path):
    import warnings

    from bids_anomaly.reports.figures import plot_anomaly_overlay, plot_lightbox

    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    scores = rng.random((20, 20, 20)).astype(np.float32)
    scores[0, 0, :5] = np.nan
    for name, data in (("map", scores), ("bg", rng.random((20, 20, 20)).astype(np.float32))):
        nib.Nifti1Image(data, affine).to_filename(tmp_path / f"{name}.nii.gz")
    clusters = np.zeros((20, 20, 20), np.int32)
    clusters[8:12, 8:12, 8:12] = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_lightbox(tmp_path / "bg.nii.gz", tmp_path / "map.nii.gz", clusters,
                      tmp_path / "lightbox.png", 1e300)
        plot_anomaly_overlay(tmp_path / "bg.nii.gz", tmp_path / "map.nii.gz", None,
                             tmp_path / "overlay.png", threshold=0.5)
    raw = [str(w.message) for w in caught
           if "overflow" in str(w.message) or "Non-finite" in str(w.message)]
    assert not raw, raw


# ------------------------------------------------- files a user error, not an internal error

def _symlink(target: str) -> Callable:
    def setup(bids, tmp):
        path = bids / T1W
        path.unlink()
        path.symlink_to(target if target != "itself" else path.name)
        return ["participant", "--skip-bids-validation"]
    return setup


def _binary_description(bids, tmp):
    (bids / "dataset_description.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    return ["participant"]


def _long_threshold(digits: int) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        text = (directory / "model.json").read_text()
        values = _card_values(directory)
        (directory / "model.json").write_text(
            text.replace(f'"threshold": {json.dumps(values["threshold"])}',
                         '"threshold": 1' + "0" * (digits - 1)))
    return edit


def _with_fdr(setup: Callable) -> Callable:
    def with_fdr(bids, tmp):
        return [*setup(bids, tmp), "--fdr", "0.05"]
    return with_fdr


FILE_CASES = {
    "binary dataset_description.json": (_binary_description, 16,
                                        "dataset_description.json is not valid JSON"),
    "dangling symlink, validation skipped": (_symlink("/nonexistent/t1w.nii.gz"), 65,
                                             "a symbolic link to /nonexistent/t1w.nii.gz, "
                                             "which does not exist"),
    "symlink loop, validation skipped": (_symlink("itself"), 65,
                                         "a symbolic link that loops back on itself"),
    "card threshold of 5000 digits": (_calibrated(_long_threshold(5000)), 65,
                                      "is not a valid model card"),
    "card threshold of 4000 digits": (_calibrated(_long_threshold(4000)), 65,
                                      "is not a finite number"),
    "damaged calibration tail with --fdr": (_with_fdr(_calibrated(_damaged_tail)), 65,
                                            "calibration_tail is damaged"),
}


@pytest.mark.parametrize("case", list(FILE_CASES), ids=list(FILE_CASES))
def test_files_that_cannot_be_used_are_user_errors(case, tiny_bids, tmp_path, capsys):
    out = check_hostile_case(FILE_CASES[case], tiny_bids, tmp_path, capsys)
    assert not list(out.glob("sub-*")), "work was done before the refusal"


def _unreadable(path: Path, monkeypatch) -> None:
    """Take away the permission to read ``path``.

    Root reads every file whatever its mode: under root, opening it raises the error the system
    gives anyone else (Permission denied), through every way the tool opens files.
    """
    import builtins
    import io
    import os

    path.chmod(0)
    if os.geteuid() != 0:
        return
    target = os.path.realpath(path)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(file) == target:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)


@pytest.mark.parametrize("what, args, code, words", [
    ("participants.tsv", ["train", "--train-filter", "group=healthy"], 66,
     "participants.tsv: permission denied"),
    ("sub-01/anat/sub-01_T1w.nii.gz", ["participant"], 65,
     "sub-01_T1w.nii.gz: permission denied"),
    ("model-norm/weights.safetensors", ["participant", "--model", "MODEL"], 66,
     "weights.safetensors: permission denied"),
    ("model-norm/model.json", ["participant", "--model", "MODEL"], 66,
     "model.json: permission denied"),
], ids=["participants.tsv", "image", "weights", "card"])
def test_an_unreadable_file_says_permission_denied(tiny_bids, tmp_path, capsys, monkeypatch,
                                                   what, args, code, words):
    saved_normative_model(tiny_bids.parent / "model-norm", ["T1w"], calibrated=True)
    target = tiny_bids.parent / what if what.startswith("model") else tiny_bids / what
    args = [str(tiny_bids.parent / "model-norm") if a == "MODEL" else a for a in args]
    _unreadable(target, monkeypatch)
    try:
        assert main([str(tiny_bids), str(tmp_path / "out"), *args,
                     "--skip-bids-validation"]) == code
    finally:
        target.chmod(0o644)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "corrupt" not in err, err
