"""train --covariates / --site-column / --transfer and participant --extrapolate, end to end."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from bids_anomaly.bids.validation import find_validator
from bids_anomaly.cli.run import main
from tests.conftest import tree_digest

ROWS = {"01": ("31", "F", "x"), "02": ("52", "M", "x"), "03": ("44", "F", "x"),
        "04": ("38", "M", "y")}


def _participants(bids_dir, rows=ROWS):
    lines = ["participant_id\tgroup\tage\tsex\tsite"]
    lines += [f"sub-{label}\thealthy\t" + "\t".join(values) for label, values in rows.items()]
    (bids_dir / "participants.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def four_subjects(tiny_bids):
    for label in ("03", "04"):
        anat = tiny_bids / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        shutil.copyfile(tiny_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz",
                        anat / f"sub-{label}_T1w.nii.gz")
    _participants(tiny_bids)
    return tiny_bids


def test_bad_covariates_exit_65_naming_the_column_before_any_work(four_subjects, tmp_path,
                                                                  capsys):
    out = tmp_path / "out"
    base = [str(four_subjects), str(out), "train", "--model-type", "normative"]
    assert main([*base, "--covariates", "agee"]) == 65
    assert "'agee' is not a column of participants.tsv" in capsys.readouterr().err
    _participants(four_subjects, {**ROWS, "02": ("n/a", "M", "x")})
    assert main([*base, "--covariates", "age", "sex"]) == 65
    assert "covariate 'age': sub-02" in capsys.readouterr().err
    _participants(four_subjects, {**ROWS, "02": ("fifty", "M", "x")})
    # not valid BIDS (age is a number): the validator refuses it (16), the tool's own check
    # names the column when the validation is skipped
    assert main([*base, "--covariates", "age"]) == (65 if find_validator() is None else 16)
    capsys.readouterr()
    assert main([*base, "--covariates", "age", "--skip-bids-validation"]) == 65
    assert "'age' mixes numbers and text ('fifty')" in capsys.readouterr().err
    assert main([*base, "--covariate-df", "2"]) == 2
    assert "need --covariates" in capsys.readouterr().err
    assert main([*base, "--covariates", "age", "--transfer", "m"]) == 2
    assert not list(out.glob("sub-*"))  # refused before preprocessing


@pytest.mark.slow
def test_covariates_through_train_participant_transfer_and_group(four_subjects, tmp_path,
                                                                 capsys):
    before = tree_digest(four_subjects)
    out = tmp_path / "out"
    common = ["--nprocs", "1", "--omp-nthreads", "1", "--sloppy"]
    run = [str(four_subjects), str(out)]
    assert main([*run, "train", "--model-type", "normative", "--covariates", "age",
                 "--site-column", "site", "--participant-label", "01", "02", "03",
                 *common]) == 0
    card = json.loads((out / "models" / "model-normative" / "model.json").read_text())
    assert card["hyperparameters"]["covariates"] == ["age"]
    assert card["extra"]["fit"]["design"] == ["intercept", "age", "site[x]"]
    # sub-04 is of a site the model does not know: refused, naming the way out
    assert main([*run, "participant", "--model", "normative", *common]) == 65
    assert "site 'y'" in capsys.readouterr().err
    assert main([*run, "train", "--transfer", "normative", "--participant-label", "04",
                 *common]) == 0
    adapted = json.loads((out / "models" / "model-normative-transfer" / "model.json")
                         .read_text())
    assert adapted["extra"]["transfer"]["sites"] == ["y"]
    assert adapted["threshold"] == card["threshold"]
    assert main([*run, "participant", "--model", "normative-transfer", *common]) == 0
    anat = out / "sub-04" / "anat"
    assert len(list(anat.glob("*_desc-normativetransferT1w_stat-z_statmap.nii.gz"))) == 1
    assert len(list(anat.glob("*_desc-normativetransferT1w_stat-centile_statmap.nii.gz"))) == 1
    norms = pd.read_csv(next(anat.glob("*_desc-normativetransfer_norms.tsv")), sep="\t")
    assert list(norms["region"]) == ["brain", "GM", "WM", "CSF"]
    # ages outside the training range (31-52): refused unless --extrapolate
    _participants(four_subjects, {**ROWS, "04": ("80", "M", "y")})
    assert main([*run, "participant", "--model", "normative-transfer",
                 "--participant-label", "04", *common]) == 65
    assert "age 80 is outside the model's training range [31, 52]" in capsys.readouterr().err
    assert main([*run, "participant", "--model", "normative-transfer",
                 "--participant-label", "04", "--extrapolate", *common]) == 0
    assert main([*run, "group", *common]) == 0
    table = pd.read_csv(out / "group" / "desc-normativetransfer_norms.tsv", sep="\t")
    assert set(table["participant_id"]) == {"sub-01", "sub-02", "sub-03", "sub-04"}
    report = (out / "group" / "report.html").read_text()
    assert "Regional norms" in report
    assert (out / "group" / "figures" / "desc-normativetransfer_centiles.svg").is_file()
    _participants(four_subjects)
    assert tree_digest(four_subjects) == before
