"""The participant workflow is built (not run) for the option combinations users have."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_anomaly.bids import AnatInputs
from bids_anomaly.config import (
    ExecutionSettings,
    InputSettings,
    ModelSettings,
    PostprocessingSettings,
    Settings,
)
from bids_anomaly.postprocessing.regions import Atlas
from bids_anomaly.workflows.base import AppliedModel, init_participant_wf
from tests.conftest import saved_normative_model


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from bids_anomaly.imaging.template import get_template

    return get_template(2, tmp_path_factory.mktemp("templates"))


@pytest.fixture
def raw(tmp_path) -> Path:
    """Raw images of every modality, named as pybids would find them."""
    folder = tmp_path / "bids" / "sub-01" / "anat"
    folder.mkdir(parents=True)
    for modality in ("T1w", "FLAIR", "T2w", "PDw"):
        nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)).to_filename(
            folder / f"sub-01_{modality}.nii.gz")
    return folder


def _inputs(raw: Path, modalities, session=None) -> AnatInputs:
    return AnatInputs("01", session, {m: raw / f"sub-01_{m}.nii.gz" for m in modalities})


def _settings(tmp_path, **sections) -> Settings:
    return Settings(inputs=InputSettings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                                         analysis_level="participant"),
                    execution=ExecutionSettings(nprocs=1, omp_nthreads=1, device="cpu"),
                    **sections)


def _nodes(workflow) -> set[str]:
    return {name.split(".", 1)[1] for name in workflow.list_node_names()}


@pytest.mark.parametrize("modalities", [
    ["T1w"], ["T1w", "FLAIR"], ["T1w", "FLAIR", "T2w"], ["T1w", "FLAIR", "T2w", "PDw"],
    ["T2w"], ["FLAIR", "T2w"],
], ids=lambda m: "+".join(m))
def test_preprocessing_for_zero_to_three_extra_modalities(raw, tmp_path, template, modalities):
    inputs = _inputs(raw, modalities)
    workflow = init_participant_wf(_settings(tmp_path), [inputs], template)
    nodes = _nodes(workflow)
    reference, others = inputs.reference, inputs.modalities[1:]
    assert f"anat_preproc_wf.conform_{reference}" in nodes
    assert f"ds_anat_wf.ds_preproc_{reference}" in nodes
    for modality in others:  # one coregistration, one figure picked from the list, each
        assert f"anat_preproc_wf.coregister_{modality}" in nodes
        assert f"ds_anat_wf.select_coregistration_{modality}" in nodes
        assert f"ds_anat_wf.ds_fig_coregistration_{modality}" in nodes
    assert sum(n.startswith("anat_preproc_wf.coregister_") for n in nodes) == len(others)
    assert not any("score" in n for n in nodes)


def test_trained_model_with_fdr_atlas_and_wm(raw, tmp_path, template):
    directory = saved_normative_model(tmp_path / "model-ms", ["T1w", "FLAIR"])
    from bids_anomaly.models import load_model

    _, card = load_model(directory)
    atlas_file = tmp_path / "atlas_dseg.nii.gz"
    nib.Nifti1Image(np.ones((4, 4, 4), np.uint16), np.eye(4)).to_filename(atlas_file)
    settings = _settings(tmp_path, model=ModelSettings(model=[str(directory)]),
                         postprocessing=PostprocessingSettings(fdr=0.05, restrict="wm",
                                                               atlas=atlas_file))
    atlas = Atlas(atlas_file, {1: "brain"}, atlas_file)
    workflow = init_participant_wf(settings, [_inputs(raw, ["T1w", "FLAIR", "T2w"])], template,
                                   [AppliedModel(directory, card, settings)], atlas)
    score = workflow.get_node("sub_01_wf").get_node("score_anomaly")
    assert (score.inputs.fdr, score.inputs.restrict) == (0.05, "wm")
    assert score.inputs.atlas_labels == {"1": "brain"}
    assert score.inputs.card_checksum and score.inputs.model_checksum == card.checksum
    nodes = _nodes(workflow)
    assert {"score_anomaly_native_map", "ds_anomaly_wf.ds_anomaly_mask",
            "ds_anomaly_wf.ds_regions"} <= nodes
    assert not any(n.startswith("ds_anomaly_wf.select_") for n in nodes)  # no channel maps


def test_model_stage_reads_finished_preprocessing(raw, tmp_path, template):
    directory = saved_normative_model(tmp_path / "model-t1", ["T1w"])
    from bids_anomaly.models import load_model

    _, card = load_model(directory)
    settings = _settings(tmp_path, model=ModelSettings(model=[str(directory)]))
    inputs = _inputs(raw, ["T1w", "FLAIR"])
    workflow = init_participant_wf(settings, [inputs], template,
                                   [AppliedModel(directory, card, settings)],
                                   preprocessed={inputs.name})
    nodes = _nodes(workflow)
    assert not any(n.startswith("anat_preproc_wf") or n.startswith("ds_anat_wf")
                   for n in nodes)
    derivatives = workflow.get_node("sub_01_wf").get_node("preprocessed").inputs
    assert derivatives.preproc_T1w.endswith(
        "sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz")
    assert derivatives.template_to_ref.endswith(
        "sub-01_from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.h5")


def test_single_subject_per_tissue(raw, tmp_path, template):
    settings = _settings(tmp_path, model=ModelSettings(
        single_subject="mmst", options={"per_tissue": True, "n_components": 2}))
    workflow = init_participant_wf(settings, [_inputs(raw, ["T1w", "FLAIR"])], template)
    fit = workflow.get_node("sub_01_wf").get_node("fit_subject_model")
    assert fit.inputs.model_type == "mmst"
    assert fit.inputs.hyperparameters["per_tissue"] is True
    assert fit.inputs.hyperparameters["n_components"] == 2
    assert fit.inputs.hyperparameters["trim"] == 0.02  # the single-subject default


def test_several_sessions_get_their_own_workflows(raw, tmp_path, template):
    subjects = [_inputs(raw, ["T1w"], session) for session in ("1", "2")]
    workflow = init_participant_wf(_settings(tmp_path), subjects, template)
    assert {name.split(".")[0] for name in workflow.list_node_names()} == {
        "sub_01_ses_1_wf", "sub_01_ses_2_wf"}
    sink = workflow.get_node("sub_01_ses_2_wf").get_node("ds_anat_wf").get_node(
        "ds_preproc_T1w")
    assert sink.inputs.session == "2"


def test_scored_subjects_only_get_the_model(raw, tmp_path, template):
    directory = saved_normative_model(tmp_path / "model-fl", ["FLAIR"])
    from bids_anomaly.models import load_model

    _, card = load_model(directory)
    settings = _settings(tmp_path, model=ModelSettings(model=[str(directory)]))
    with_flair, without = _inputs(raw, ["T1w", "FLAIR"], "a"), _inputs(raw, ["T1w"], "b")
    workflow = init_participant_wf(settings, [with_flair, without], template,
                                   [AppliedModel(directory, card, settings,
                                                 frozenset({with_flair.name}))])
    names = workflow.list_node_names()
    assert any(n.startswith("sub_01_ses_a_wf.score_anomaly") for n in names)
    assert not any(n.startswith("sub_01_ses_b_wf.score_anomaly") for n in names)


def test_several_models_are_applied_in_one_workflow(raw, tmp_path, template):
    """The models of a --splits run: one model stage per model, named after it."""
    from bids_anomaly.models import load_model

    applied = []
    for name in ("pd-split01", "pd-split02"):
        directory = saved_normative_model(tmp_path / f"model-{name}", ["T1w"])
        _, card = load_model(directory)
        applied.append(AppliedModel(directory, card, _settings(tmp_path)))
    inputs = _inputs(raw, ["T1w"])
    workflow = init_participant_wf(_settings(tmp_path), [inputs], template, applied,
                                   preprocessed={inputs.name})
    nodes = _nodes(workflow)
    for desc in ("pdsplit01", "pdsplit02"):
        assert {f"score_anomaly_{desc}", f"ds_anomaly_wf_{desc}.ds_anomaly_map"} <= nodes
    assert "score_anomaly" not in nodes


@pytest.mark.parametrize("sloppy", [False, True])
def test_the_sloppy_preset_reaches_every_registration_and_bias_correction(raw, tmp_path,
                                                                          template, sloppy):
    from bids_anomaly.config import PreprocessingSettings

    settings = Settings(**{**vars(_settings(tmp_path)),
                           "preprocessing": PreprocessingSettings(sloppy=sloppy)})
    workflow = init_participant_wf(settings, [_inputs(raw, ["T1w", "FLAIR", "T2w"])], template)
    anat = workflow.get_node("sub_01_wf").get_node("anat_preproc_wf")
    names = ["register_to_template", "coregister_FLAIR", "coregister_T2w", "n4_T1w_lowres",
             "n4_T1w", "n4_FLAIR", "n4_T2w"]
    assert [anat.get_node(n).inputs.sloppy for n in names] == [sloppy] * len(names)
    assert settings.preprocessing.recorded()["sloppy"] is sloppy  # in cards and sidecars


def test_several_model_names_are_applied_once_each(tmp_path):
    """``--model A B``: each name, a --splits run's name as its splits, a repeat once."""
    from bids_anomaly.levels.participant import models_to_apply

    out = tmp_path / "out"
    for name in ("a", "b", "pd-split01", "pd-split02"):
        saved_normative_model(out / "models" / f"model-{name}", ["T1w"])
    settings = _settings(tmp_path, model=ModelSettings(model=["b", "pd", "a", "b"]))
    assert models_to_apply(settings) == ["b", "pd-split01", "pd-split02", "a"]
    assert models_to_apply(_settings(tmp_path)) == []
    settings = _settings(tmp_path, model=ModelSettings(model=["nosuch"]))
    assert models_to_apply(settings) == ["nosuch"]  # resolve_model refuses it, naming it
