"""Susceptibility-weighted inputs: T2starw, swi (BEP004) and multi-echo GRE (MEGRE)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_anomaly import bids
from bids_anomaly.interfaces.images import CombineEchoes
from tests.conftest import check_hostile_case

COMMON = ["--nprocs", "1", "--omp-nthreads", "1", "--device", "cpu"]


def _write(anat: Path, name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = anat / f"{name}.nii.gz"
    nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2, 2, 1]) if affine is None
                    else affine).to_filename(path)
    return path


@pytest.fixture
def susceptibility_bids(tmp_path: Path) -> Path:
    """One subject: T1w, T2starw, swi magnitude and phase, a 3-echo MEGRE (magnitude, phase)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "bids"
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion":
                                                               "1.9.0"}))
    for name in ("sub-01_T1w", "sub-01_T2starw", "sub-01_part-mag_swi", "sub-01_part-phase_swi",
                 "sub-01_echo-1_part-phase_MEGRE", "sub-01_echo-2_part-phase_MEGRE"):
        _write(anat, name, rng.random((12, 12, 12)) + 1)
    for echo in (3, 1, 2):  # written out of order
        _write(anat, f"sub-01_echo-{echo}_part-mag_MEGRE",
               np.full((12, 12, 12), 100.0 / echo) + rng.random((12, 12, 12)))
    return root


def test_susceptibility_images_are_found_magnitude_only(susceptibility_bids, tmp_path):
    layout = bids.load_layout(susceptibility_bids, tmp_path / "db", validate=True)
    (inputs,) = bids.collect_anat(layout, "01")
    anat = susceptibility_bids / "sub-01" / "anat"
    assert inputs.images["T2starw"] == anat / "sub-01_T2starw.nii.gz"
    # swi is not in the released BIDS schema: indexed anyway (BEP004), magnitude only
    assert inputs.images["swi"] == anat / "sub-01_part-mag_swi.nii.gz"
    assert inputs.echoes["MEGRE"] == [anat / f"sub-01_echo-{e}_part-mag_MEGRE.nii.gz"
                                      for e in (1, 2, 3)]
    assert inputs.images["MEGRE"] == inputs.echoes["MEGRE"][0]
    assert inputs.modalities == ["T1w", "T2starw", "swi", "MEGRE"]
    assert set(inputs.echoes["MEGRE"]) <= set(inputs.raw_files)


def test_one_echo_is_not_a_combination(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "bids"
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion":
                                                               "1.9.0"}))
    _write(anat, "sub-01_T1w", rng.random((8, 8, 8)) + 1)
    _write(anat, "sub-01_echo-1_MEGRE", rng.random((8, 8, 8)) + 1)
    (inputs,) = bids.collect_anat(bids.load_layout(root, tmp_path / "db"), "01")
    assert len(inputs.echoes["MEGRE"]) == 1


@pytest.mark.parametrize("method", ["rss", "mean", "first"])
def test_echo_combination(method, tmp_path):
    rng = np.random.default_rng(2)
    echoes = [rng.random((6, 6, 6)) * 100 / (e + 1) for e in range(3)]
    files = [str(_write(tmp_path, f"echo{e}", data)) for e, data in enumerate(echoes)]
    result = CombineEchoes(in_files=files, method=method).run(cwd=str(tmp_path))
    combined = nib.load(result.outputs.out_file).get_fdata()
    stack = np.stack([e.astype(np.float32) for e in echoes]).astype(np.float64)
    expected = {"rss": np.sqrt((stack ** 2).sum(0)), "mean": stack.mean(0),
                "first": stack[0]}[method]
    assert np.allclose(combined, expected, rtol=1e-5)


def _echoes_on_two_grids(bids_dir: Path, folder: Path) -> list[str]:
    anat = bids_dir / "sub-01" / "anat"
    _write(anat, "sub-01_echo-1_MEGRE", np.random.default_rng(0).random((20, 20, 20)) + 1)
    _write(anat, "sub-01_echo-2_MEGRE", np.random.default_rng(1).random((20, 20, 20)) + 1,
           np.diag([3.0, 3, 3, 1]))
    for echo in (1, 2):  # valid BIDS: each echo gives its EchoTime (the validator requires it)
        (anat / f"sub-01_echo-{echo}_MEGRE.json").write_text(json.dumps({"EchoTime":
                                                                         0.005 * echo}))
    return ["participant"]


def test_echoes_on_different_grids_stop_before_any_work(tiny_bids, tmp_path, capsys):
    out = check_hostile_case((_echoes_on_two_grids, 65, "the echoes of one MEGRE must share"),
                             tiny_bids, tmp_path, capsys, COMMON)
    assert not list(out.glob("sub-*"))


def test_multi_echo_images_are_combined_in_the_workflow(susceptibility_bids, tmp_path):
    from bids_anomaly.config import InputSettings, PreprocessingSettings, Settings
    from bids_anomaly.imaging.template import get_template
    from bids_anomaly.workflows.base import init_participant_wf

    layout = bids.load_layout(susceptibility_bids, tmp_path / "db")
    (inputs,) = bids.collect_anat(layout, "01")
    settings = Settings(inputs=InputSettings(bids_dir=susceptibility_bids,
                                             output_dir=tmp_path / "out"),
                        preprocessing=PreprocessingSettings(echo_combination="mean"))
    workflow = init_participant_wf(settings, [inputs], get_template(2, tmp_path / "tpl"))
    combine = workflow.get_node("sub_01_wf").get_node("combine_MEGRE_echoes")
    assert combine.inputs.method == "mean"
    assert combine.inputs.in_files == [str(p) for p in inputs.echoes["MEGRE"]]
    names = workflow.list_node_names()
    for modality in ("T2starw", "swi", "MEGRE"):
        assert any(n.endswith(f"coregister_{modality}") for n in names)
