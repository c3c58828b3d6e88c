"""The command-line contract: exit codes and one-line messages, and an untouched input."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_anomaly import __version__
from bids_anomaly.cli.run import main
from bids_anomaly.models import build_model
from tests.conftest import saved_normative_model, tree_digest


@pytest.fixture
def run(tiny_bids, tmp_path, capsys):
    """Run the CLI on tiny_bids; check the input is byte-identical afterwards."""

    def _run(*args, bids_dir=None, output=None):
        bids_dir = bids_dir or tiny_bids
        output = output or tmp_path / "out"
        before = tree_digest(tiny_bids)
        code = main([str(bids_dir), str(output), *args])
        err = capsys.readouterr().err
        assert tree_digest(tiny_bids) == before
        return code, err

    return _run


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # argparse's own answer, from --help's parser
        from bids_anomaly.cli.parser import build_parser

        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_usage_errors_exit_2(run, tiny_bids, capsys):
    code, err = run("participant", output=tiny_bids / "derivatives" / "out")
    assert code == 2 and "inside BIDS_DIR" in err
    code, err = run("participant", output=tiny_bids)
    assert code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_bids), "/tmp/x", "nonsense-level"])
    assert exit_info.value.code == 2


def test_not_bids_exits_16(run, tmp_path):
    code, err = run("participant", bids_dir=tmp_path / "missing")
    assert code == 16 and "does not exist" in err
    plain = tmp_path / "plain"
    (plain / "sub-01" / "anat").mkdir(parents=True)
    code, err = run("participant", bids_dir=plain)
    assert code == 16 and "dataset_description.json" in err
    # validation skipped: the run goes on, here to the unknown label (18)
    code, err = run("participant", "--skip-bids-validation", "--participant-label", "zz",
                    bids_dir=plain)
    assert code == 18


def test_unknown_participant_exits_18(run):
    code, err = run("participant", "--participant-label", "99")
    assert code == 18 and "unknown participant label(s): 99" in err
    code, err = run("train", "--train-filter", "group=patient")
    assert code == 18


def test_corrupt_nifti_exits_65_naming_the_file(run, tiny_bids):
    path = tiny_bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    before = path.read_bytes()
    path.write_bytes(before[: len(before) // 2])
    try:
        code, err = run("participant", "--participant-label", "02")
    finally:
        path.write_bytes(before)
    assert code == 65 and "sub-02_T1w.nii.gz" in err and "truncated or corrupt" in err


def test_4d_anatomical_exits_65(run, tiny_bids):
    path = tiny_bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    before = path.read_bytes()
    nib.Nifti1Image(np.zeros((10, 10, 10, 4), np.float32), np.eye(4)).to_filename(path)
    try:
        code, err = run("participant", "--participant-label", "02")
    finally:
        path.write_bytes(before)
    assert code == 65 and "expected a 3D volume" in err


def test_no_usable_anatomical_exits_66(run, tiny_bids):
    anat = tiny_bids / "sub-03" / "anat"
    anat.mkdir(parents=True)
    nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)).to_filename(
        anat / "sub-03_T1map.nii.gz")
    with (tiny_bids / "participants.tsv").open("a") as table:  # valid BIDS: sub-03 is listed
        table.write("sub-03\thealthy\n")
    code, err = run("participant", "--participant-label", "03")
    assert code == 66 and "usable anatomical image" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_gpu_exits_75(run, tmp_path):
    code, err = run("participant", "--device", "cuda")
    assert code == 75 and "CUDA is not available" in err
    assert not (tmp_path / "out").exists()


def test_model_with_other_channels_exits_65(run, tmp_path):
    directory = saved_normative_model(tmp_path / "model-flair", ["FLAIR"])
    code, err = run("participant", "--model", str(directory))
    assert code == 65 and "FLAIR is missing" in err
    card_path = directory / "model.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "resolution": 1}))
    code, err = run("participant", "--model", str(directory))
    assert code == 65 and "at 1 mm" in err
    code, err = run("participant", "--model", "no-such-model")
    assert code == 66 and "no such model" in err


def test_atlas_errors_exit_with_sysexits(run, tiny_bids, tmp_path):
    code, err = run("participant", "--single-subject", "gmm", "--atlas",
                    str(tmp_path / "none_dseg.nii.gz"))
    assert code == 66 and "no such file" in err and "none_dseg" in err
    atlas = tmp_path / "prob_dseg.nii.gz"
    nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)).to_filename(atlas)
    (tmp_path / "prob_dseg.tsv").write_text("index\tname\n1\tx\n")
    code, err = run("participant", "--single-subject", "gmm", "--atlas", str(atlas))
    assert code == 65 and "fractional" in err
    # the atlas is refused before any subject is processed
    assert not list((tmp_path / "out").glob("sub-*"))


def test_group_without_maps_exits_18(run):
    code, err = run("group")
    assert code == 18 and "no anomaly maps" in err


@pytest.mark.parametrize("args, message", [
    (("participant", "--fdr", "0.05"), "--fdr need a model"),
    (("participant", "--restrict", "wm"), "--restrict need a model"),
    (("train", "--atlas", "x_dseg.nii.gz"), "apply to the group and participant levels"),
    (("participant", "--atlas", "x_dseg.nii.gz"), "--atlas need a model"),
    (("participant", "--burden-threshold", "calibrated"), "apply to the group level"),
    (("participant", "--splits", "3"), "apply to the train level"),
    (("train", "--splits", "2", "--annotations", "."), "cannot be combined"),
    (("participant", "--control-label", "HC"), "apply to the group level"),
    (("train", "--ground-truth", "."), "apply to the group level"),
    (("train", "--single-subject", "mmst"), "apply to the participant level"),
    (("group", "--min-cluster-size", "10"), "apply to the participant level"),
    (("train", "--model-type", "gmm", "--mixture-score", "outlyingness"), "needs --model-type"),
    (("train", "--model-type", "normative", "--online"), "apply to the mixture models"),
    (("train", "--model-type", "gmm", "--epochs", "3"), "and training a deep model"),
    (("train", "--model-type", "normative", "--nu", "0.1"),
     "apply to the patch autoencoder with one-class models (train --model-type patch-ocsvm)"),
    (("participant", "--mode", "3d"), "apply to training a deep model"),
])
def test_mixture_options_that_do_not_fit_exit_2(run, args, message):
    code, err = run(*args)
    assert code == 2 and message in err


@pytest.mark.parametrize("args, message", [
    (("group", "--control-percentile", "100"), "must be in (0, 100)"),
    (("train", "--split-test-size", "0"), "or a fraction in (0, 1)"),
    (("train", "--splits", "0"), "must be at least 1"),
])
def test_protocol_values_are_checked_by_the_parser(run, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run(*args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_split_test_size_is_a_count_or_a_fraction():
    from bids_anomaly.config import count_or_fraction

    assert count_or_fraction("15") == 15 and isinstance(count_or_fraction("15"), int)
    assert count_or_fraction("0.25") == 0.25


def test_components_accepts_auto_or_a_positive_integer(tiny_bids, tmp_path):
    from bids_anomaly.cli.parser import build_parser, settings_from_args

    parser = build_parser()
    base = [str(tiny_bids), str(tmp_path / "out"), "train", "--model-type", "mmst"]
    settings = settings_from_args(parser.parse_args(base + ["--components", "auto", "--online",
                                                            "--per-tissue", "--trim", "0.02"]))
    assert settings.model.options == {"n_components": "auto", "online": True,
                                      "per_tissue": True, "trim": 0.02}
    model = build_model(settings)
    assert (model.n_components, model.online, model.per_tissue, model.trim) == (
        "auto", True, True, 0.02)
    for bad in (["--components", "0"], ["--components", "many"], ["--trim", "0.6"]):
        with pytest.raises(SystemExit):
            parser.parse_args(base + bad)


def test_deep_options_reach_the_model(tiny_bids, tmp_path):
    from bids_anomaly.cli.parser import build_parser, settings_from_args

    args = build_parser().parse_args(
        [str(tiny_bids), str(tmp_path / "out"), "train", "--model-type", "dae", "--mode", "3d",
         "--epochs", "7", "--batch-size", "4", "--patch-size", "48", "--residual", "hyper",
         "--precision", "fp32", "--model-name", "mydae", "--random-seed", "9"])
    model = build_model(settings_from_args(args))
    assert (model.model_type, model.mode, model.patch_size, model.residual) == (
        "dae", "3d", 48, "hyper")
    assert (model.training.epochs, model.training.batch_size, model.training.seed,
            model.training.precision) == (7, 4, 9, "fp32")
    assert model.training.checkpoint_dir == tmp_path / "out" / "work" / "train" / "model-mydae"
    assert model.width == 32  # unset options keep the model's defaults


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed here")
def test_tensorboard_without_the_package_exits_2(run, tmp_path):
    code, err = run("train", "--model-type", "ae", "--tensorboard", str(tmp_path / "tb"))
    assert code == 2 and "needs the tensorboard package" in err


def test_torchrun_is_for_train_only(run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run("participant")
    assert code == 2 and "only train is launched with torchrun" in err
