"""What a new user meets first: a fast --version, nothing left behind, saved and reusable runs."""

import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from bids_anomaly.cli.run import main


def test_version_answers_without_importing_torch_or_nipype():
    code = ("import sys\nfrom bids_anomaly.cli.run import main\n"
            "assert main(['--version']) == 0\n"
            "heavy = [m for m in ('torch', 'nipype', 'pandas', 'ants') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("bids_anomaly ")


@pytest.mark.parametrize("args, code", [
    (["participant", "--participant-label", "99"], 18),
    (["train", "--train-filter", "group=nobody"], 18),
    (["group"], 18),
    (["participant", "--participant-label", "01", "--bids-filter-file", "missing.json"], 2),
])
def test_a_run_that_stops_early_leaves_nothing_behind(tiny_bids, tmp_path, args, code):
    out = tmp_path / "out"
    assert main([str(tiny_bids), str(out), *args]) == code
    assert not out.exists()


def test_notrack_is_accepted_and_does_nothing(tiny_bids, tmp_path):
    from bids_anomaly.cli.parser import parse_arguments, settings_from_args

    args, config = parse_arguments([str(tiny_bids), str(tmp_path / "out"), "participant",
                                    "--notrack"])
    settings_from_args(args, config)


def test_each_run_keeps_its_settings_and_config_file_reads_them_back(tiny_bids, tmp_path):
    from bids_anomaly.cli.parser import parse_arguments, settings_from_args
    from bids_anomaly.levels.steps import create_outputs

    out = tmp_path / "out"
    (tmp_path / "filter.json").write_text(json.dumps({"t1w": {"acquisition": "mprage"}}))
    args, config = parse_arguments([
        str(tiny_bids), str(out), "participant", "--participant-label", "02", "--fdr", "0.05",
        "--model", "norm", "--resolution", "1", "--bids-filter-file",
        str(tmp_path / "filter.json"), "--min-cluster-size", "24"])
    first = settings_from_args(args, config)
    records = [create_outputs(first), create_outputs(first)]
    assert records[0] != records[1]  # a second run does not overwrite the first's record
    assert all(r.parent.parent == out / "logs" and r.is_file() for r in records)
    assert not list((first.work_dir).glob("config-*.toml"))
    # the saved settings come back; what the command line says wins
    args, config = parse_arguments([str(tiny_bids), str(out), "participant", "--config-file",
                                    str(records[0]), "--min-cluster-size", "40"])
    again = settings_from_args(args, config)
    assert (again.inputs.participant_label, again.postprocessing.fdr, again.model.model,
            again.preprocessing.resolution) == (["02"], 0.05, ["norm"], 1)
    assert again.inputs.bids_filters == {"t1w": {"acquisition": "mprage"}}
    assert again.postprocessing.min_cluster_mm3 == 40.0


@pytest.mark.parametrize("content", ["not toml [", "[other]\nx = 1\n",
                                     "[bids_anomaly.inputs]\nunknown_setting = 1\n",
                                     "[bids_anomaly.unknown]\nx = 1\n"])
def test_a_bad_config_file_is_a_usage_error(tiny_bids, tmp_path, capsys, content):
    path = tmp_path / "settings.toml"
    path.write_text(content)
    assert main([str(tiny_bids), str(tmp_path / "out"), "participant", "--config-file",
                 str(path)]) == 2
    assert "--config-file" in capsys.readouterr().err


def test_a_derivative_with_the_same_content_is_not_rewritten(tmp_path):
    from bids_anomaly.interfaces.bids import DerivativesDataSink

    source = tmp_path / "result.nii.gz"
    nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)).to_filename(source)
    sink = DerivativesDataSink(output_dir=str(tmp_path / "out"), subject="01", suffix="mask",
                               entities={"desc": "brain"}, metadata={"Type": "Brain"},
                               in_file=str(source))
    out_file = sink.run(cwd=str(tmp_path)).outputs.out_file
    sidecar = out_file.replace(".nii.gz", ".json")
    times = [(p, os.stat(p).st_mtime_ns) for p in (out_file, sidecar)]
    time.sleep(0.05)
    sink.run(cwd=str(tmp_path))
    assert all(os.stat(p).st_mtime_ns == t for p, t in times)
    nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)).to_filename(source)
    sink.run(cwd=str(tmp_path))
    assert nib.load(out_file).get_fdata().max() == 0  # a changed result is written


def test_completion_record_holds_until_a_derivative_changes(tmp_path):
    from bids_anomaly.bids import AnatInputs
    from bids_anomaly.bids.completion import is_complete, mark_complete

    out, work = tmp_path / "out", tmp_path / "work"
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    derivative = anat / "sub-01_space-x_desc-preproc_T1w.nii.gz"
    derivative.write_bytes(b"data")
    (anat / "sub-02_desc-other_T1w.nii.gz").write_bytes(b"other subject")
    inputs = AnatInputs("01", None)
    assert not is_complete(work, inputs, "key")
    mark_complete(work, inputs, "key", out)
    assert is_complete(work, inputs, "key")
    assert not is_complete(work, inputs, "another key")
    (anat / "sub-02_desc-other_T1w.nii.gz").unlink()  # another subject's files do not count
    assert is_complete(work, inputs, "key")
    derivative.write_bytes(b"edited")
    assert not is_complete(work, inputs, "key")
    derivative.unlink()
    assert not is_complete(work, inputs, "key")


@pytest.mark.parametrize("section, line, words", [
    ("execution", 'nprocs = "abc"', "execution.nprocs = 'abc' (--nprocs): not a whole number"),
    ("execution", "nprocs = -5", "execution.nprocs = -5 (--nprocs): must be at least 1"),
    ("execution", "nprocs = 0", "execution.nprocs = 0 (--nprocs): must be at least 1"),
    ("execution", "nprocs = 1e400", "execution.nprocs = inf (--nprocs): not a whole number"),
    ("execution", "nprocs = 2.5", "execution.nprocs = 2.5 (--nprocs): not a whole number"),
    ("model", "fpr = 7.0", "model.fpr = 7.0 (--fpr): must be in (0, 1)"),
    ("model", 'model_type = "evil"', "model.model_type = 'evil' (--model-type): must be one of"),
    ("model", "calibration_fraction = 3", "model.calibration_fraction = 3: must be in (0, 1)"),
    ("model", 'options = {n_components = "many"}', "model.options.n_components = 'many'"),
    ("model", "options = {nonsense = 1}", "unknown model option(s) nonsense"),
    ("preprocessing", "resolution = 3", "preprocessing.resolution = 3 (--resolution): must be "
                                        "one of 1, 2"),
    ("preprocessing", 'registration = "Elastic"', "must be one of Rigid, Affine, SyN"),
    ("inputs", 'skip_bids_validation = "yes"', "(--skip-bids-validation): must be true or false"),
    ("group", "bootstrap = true", "group.bootstrap = True (--bootstrap): not a whole number"),
    ("postprocessing", "min_cluster_mm3 = -1", "(--min-cluster-size): the volume must be 0"),
])
def test_config_file_values_are_checked_as_on_the_command_line(tiny_bids, tmp_path, capsys,
                                                               section, line, words):
    path = tmp_path / "settings.toml"
    path.write_text(f"[bids_anomaly.{section}]\n{line}\n")
    out = tmp_path / "out"
    assert main([str(tiny_bids), str(out), "train", "--config-file", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--config-file {path}: " in err and words in err, err
    assert not out.exists()
