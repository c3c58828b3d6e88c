"""``--single-subject tissue`` end to end on the channel sets users have."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_anomaly.cli.run import main
from tests.conftest import tree_digest, write_minimal_bids

CHANNEL_SETS = {"flair": ("FLAIR",), "twochannels": ("T1w", "FLAIR"),
                "threechannels": ("T1w", "FLAIR", "T2w")}
"""A subject per channel set: FLAIR only, the commonest MS protocol, and all three."""


@pytest.mark.slow
def test_flair_only_two_and_three_channel_subjects(tmp_path):
    from bids_anomaly.simulation.synthetic import synthetic_subject

    subjects, truths = {}, {}
    for seed, (label, channels) in enumerate(CHANNEL_SETS.items(), start=11):
        images = synthetic_subject(seed, lesions=True)
        subjects[label] = {channel: images[channel] for channel in channels}
        truths[label] = np.asarray(images["lesion_mask"].dataobj) > 0
    bids_dir = write_minimal_bids(tmp_path / "bids", subjects,
                                  {label: "patient" for label in subjects})
    before = tree_digest(bids_dir)
    out = tmp_path / "out"
    assert main([str(bids_dir), str(out), "participant", "--single-subject", "tissue",
                 "--nprocs", "2", "--omp-nthreads", "1", "--random-seed", "3",
                 "--sloppy"]) == 0
    for label, channels in CHANNEL_SETS.items():
        anat = out / f"sub-{label}" / "anat"
        reference = channels[0]
        native = nib.load(anat / f"sub-{label}_space-{reference}_desc-tissuesingle_stat-"
                                 "anomaly_statmap.nii.gz").get_fdata()
        lesion = truths[label]
        inside = native > 0
        assert native[lesion].mean() > 5 * native[inside & ~lesion].mean(), label
        sidecar = json.loads((anat / f"sub-{label}_space-MNI152NLin2009aSym_res-2_desc-"
                                     "tissuesingle_stat-anomaly_statmap.json").read_text())
        assert sidecar["ModelChannels"] == list(channels)
        assert sidecar["ModelType"] == "tissue"
        assert len(list(anat.glob("*_desc-tissuesingle_probseg.nii.gz"))) == 4
        assert list((out / f"sub-{label}" / "figures").glob("*tissuesingle_lightbox.png"))
    # --channels chooses the channels of the subject's own model; subjects without them are
    # not scored (here the FLAIR-only subject lacks T1w)
    assert main([str(bids_dir), str(out), "participant", "--single-subject", "tissue",
                 "--channels", "T1w", "FLAIR", "--nprocs", "2", "--omp-nthreads", "1",
                 "--random-seed", "3", "--sloppy"]) == 0  # preprocessed as above: not again
    sidecar = json.loads((out / "sub-threechannels" / "anat" / (
        "sub-threechannels_space-MNI152NLin2009aSym_res-2_desc-tissuesingle_stat-anomaly_"
        "statmap.json")).read_text())
    assert sidecar["ModelChannels"] == ["T1w", "FLAIR"]
    assert tree_digest(bids_dir) == before


def test_participant_channels_need_a_single_subject_model(tiny_bids, tmp_path, capsys):
    assert main([str(tiny_bids), str(tmp_path / "out"), "participant", "--channels",
                 "FLAIR"]) == 2
    assert "--single-subject" in capsys.readouterr().err
