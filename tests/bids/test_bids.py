import pandas as pd
import pytest

from bids_anomaly import bids
from bids_anomaly.errors import BIDSValidationError, EmptySelectionError, UsageError


def test_derivative_names_follow_entity_order():
    path = bids.spec_path("/out", "01", "2", bids.anomaly_mask_spec("MNI", 2, "gmm"))
    assert str(path) == ("/out/sub-01/ses-2/anat/"
                         "sub-01_ses-2_space-MNI_res-2_label-anomaly_desc-gmm_mask.nii.gz")
    name = bids.derivative_name("01", None, **bids.anomaly_map_spec("MNI", 1, "normative"))
    assert name == "sub-01_space-MNI_res-1_desc-normative_stat-anomaly_statmap.nii.gz"
    assert bids.parse_name(name)["stat"] == "anomaly"


def test_invalid_labels_are_refused():
    with pytest.raises(ValueError, match="letters and digits"):
        bids.derivative_name("01", None, "mask", desc="wmh-gmm")
    assert bids.model_desc("wmh-gmm") == "wmhgmm"


def test_train_filter_selects_rows():
    table = pd.DataFrame({"participant_id": ["sub-a", "sub-b", "sub-c"],
                          "group": ["healthy", "MS", "healthy"], "sex": ["F", "M", "M"]})
    table["label"] = table["participant_id"].str.removeprefix("sub-")
    assert bids.filter_participants(table, ["group=healthy"]) == ["a", "c"]
    assert bids.filter_participants(table, ["group=healthy", "sex=M"]) == ["c"]
    with pytest.raises(UsageError, match="no column 'site'"):
        bids.filter_participants(table, ["site=x"])


def test_not_bids_is_refused(tmp_path):
    with pytest.raises(BIDSValidationError, match="does not exist"):
        bids.check_bids_dir(tmp_path / "missing")
    with pytest.raises(BIDSValidationError, match="dataset_description.json is missing"):
        bids.check_bids_dir(tmp_path)
    bids.check_bids_dir(tmp_path, skip_validation=True)


def test_selection_and_collection(tiny_bids, tmp_path):
    layout = bids.load_layout(tiny_bids, tmp_path / "db")
    assert bids.select_participants(layout, [], tiny_bids) == ["01", "02"]
    assert bids.select_participants(layout, ["sub-02"], tiny_bids) == ["02"]
    with pytest.raises(EmptySelectionError, match="unknown participant label.*99"):
        bids.select_participants(layout, ["99"], tiny_bids)
    with pytest.raises(EmptySelectionError):
        bids.select_participants(layout, [], tiny_bids, ["group=patient"])
    (inputs,) = bids.collect_anat(layout, "01")
    assert inputs.session is None and inputs.reference == "T1w"
    assert inputs.images["T1w"].name == "sub-01_T1w.nii.gz"


def test_non_enhanced_image_is_preferred(tmp_path):
    import nibabel as nib
    import numpy as np

    from tests.conftest import write_minimal_bids

    img = nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4))
    root = write_minimal_bids(tmp_path / "b", {"01": {"ce-gadolinium_T1w": img, "T1w": img}})
    layout = bids.load_layout(root, tmp_path / "db")
    (inputs,) = bids.collect_anat(layout, "01")
    assert inputs.images["T1w"].name == "sub-01_T1w.nii.gz"
