"""Lesion change of generated session pairs, through the Nipype interface of the workflow."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_anomaly.interfaces.longitudinal import LesionChange
from tests.longitudinal.conftest import lesion_at, make_session

KEPT = ((8.0, 6.0, 4.0), 3.0)  # in both sessions, unchanged
GROWING = ((-9.0, -4.0, 2.0), 2.5)  # grows to 4.5 mm
GROWN = ((-9.0, -4.0, 2.0), 4.5)
NEW = ((4.0, -10.0, -4.0), 3.5)  # only in the later session
GONE = ((-6.0, 10.0, -2.0), 3.5)  # only in the earlier session


def _run(tmp_path, template, sessions, fpr=0.001):
    node = LesionChange(
        labels=[s.label for s in sessions], images=[str(s.image) for s in sessions],
        template_masks=[str(s.template_mask) for s in sessions],
        reference_to_template=[str(s.reference_to_template) for s in sessions],
        template_to_reference=[str(s.template_to_reference) for s in sessions],
        to_reference=["" for _ in sessions],
        template_tissues=[str(template.tissues[t]) for t in ("GM", "WM", "CSF")],
        template_grid=str(template.grid), fpr=fpr, random_seed=0, min_cluster_mm3=5.0)
    folder = tmp_path / "node"
    folder.mkdir(parents=True)
    import os

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return node.run().outputs
    finally:
        os.chdir(cwd)


def _world(image: nib.Nifti1Image) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1)
    return index @ image.affine[:3, :3].T + image.affine[:3, 3]


def test_new_enlarging_and_shrinking_lesions_across_grids_and_scales(tmp_path,
                                                                    generated_template):
    """Session 2: another grid (0.9 x 0.9 x 2 mm), moved 3 mm, twice as bright plus 50."""
    first, _ = make_session(tmp_path / "s1", "1", [KEPT, GROWING, GONE], seed=1)
    shift = (3.0, -2.0, 1.0)
    second, _ = make_session(tmp_path / "s2", "2", [KEPT, GROWN, NEW], voxel=(0.9, 0.9, 2.0),
                             shift=shift, scale=2.0, offset=50.0, seed=2)
    outputs = _run(tmp_path, generated_template, [first, second])
    table = pd.read_csv(outputs.clusters, sep="\t")
    dseg = nib.load(outputs.native_dsegs)
    assert dseg.shape == nib.load(second.image).shape  # the later session's raw grid
    classes = np.asarray(dseg.dataobj)
    head = _world(dseg) - np.asarray(shift)

    def share(lesion, value):
        region = lesion_at(head, *lesion)
        return float((classes[region] == value).mean())

    assert share(NEW, 1) > 0.4
    growth = lesion_at(head, *GROWN) & ~lesion_at(head, *GROWING)
    assert float((classes[growth] == 2).mean()) > 0.3
    assert share(GONE, 3) > 0.4
    assert float((classes[lesion_at(head, KEPT[0], 2.0)] > 0).mean()) < 0.05
    kinds = set(table["change"])
    assert {"new", "enlarging", "shrinking"} <= kinds
    new = table[table["change"] == "new"].iloc[0]  # the largest new lesion, at NEW in world mm
    expected = np.asarray(NEW[0]) + np.asarray(shift)
    assert np.abs(new[["x", "y", "z"]].to_numpy(float) - expected).max() < 2.5
    summary = pd.read_csv(outputs.summary, sep="\t", dtype={"earlier": str, "later": str})
    assert summary.loc[0, ["earlier", "later"]].tolist() == ["1", "2"]
    assert summary.loc[0, "new_count"] >= 1 and summary.loc[0, "shrinking_ml"] > 0.05
    template_map = nib.load(outputs.template_maps)
    assert template_map.shape == nib.load(generated_template.grid).shape
    values = np.asarray(template_map.dataobj)
    tpl_points = _world(template_map)
    assert values[lesion_at(tpl_points, NEW[0], 2.0)].mean() > outputs.thresholds[0]
    assert values[lesion_at(tpl_points, GONE[0], 2.0)].mean() < -outputs.thresholds[0]
    assert len(outputs.figures) and str(outputs.figures).endswith(".png")


def test_a_pair_without_change_is_flagged_near_the_target_rate(tmp_path, generated_template):
    """The same head rescanned on another grid: changed voxels near the target FPR."""
    lesions = [KEPT, GROWING]
    first, _ = make_session(tmp_path / "s1", "a", lesions, seed=3)
    second, _ = make_session(tmp_path / "s2", "b", lesions, voxel=(1.1, 1.0, 1.2),
                             shift=(-2.0, 1.0, 0.0), seed=4)
    outputs = _run(tmp_path, generated_template, [first, second], fpr=0.01)
    changed = np.asarray(nib.load(outputs.native_masks).dataobj) > 0
    brain = np.asarray(nib.load(second.image).dataobj) > 0.5
    # clusters of at least 5 voxels: isolated noise voxels are not counted
    assert 0.001 < changed[brain].mean() < 0.03


@pytest.mark.slow
def test_three_sessions_give_two_pairs_and_one_session_is_refused(tmp_path,
                                                                  generated_template):
    sessions = [make_session(tmp_path / f"s{i}", str(i), [KEPT] + ([NEW] if i == 3 else []),
                             seed=10 + i)[0] for i in (1, 2, 3)]
    outputs = _run(tmp_path, generated_template, sessions)
    summary = pd.read_csv(outputs.summary, sep="\t", dtype={"earlier": str, "later": str})
    assert summary[["earlier", "later"]].values.tolist() == [["1", "2"], ["2", "3"]]
    # the new lesion (0.18 ml) in the second pair; a few noise voxels at most in the first
    assert summary.loc[1, "new_ml"] > 0.1 and summary.loc[1, "new_ml"] > 3 * summary.loc[
        0, "new_ml"]
    assert len(outputs.native_maps) == 2
    with pytest.raises(ValueError, match="do not match"):
        _run(tmp_path / "one", generated_template, sessions[:1])


_SAME_BYTES = """
import hashlib, sys
from pathlib import Path
from bids_anomaly.longitudinal.midpoint import SessionImages
from bids_anomaly.longitudinal.subject import subject_change
from tests.longitudinal.conftest import make_session, make_template
from tests.longitudinal.test_subject import KEPT, NEW
root = Path(sys.argv[1])
sessions = [make_session(root / "s1", "1", [KEPT], seed=5)[0],
            make_session(root / "s2", "2", [KEPT, NEW], voxel=(1.0, 1.0, 1.5),
                         shift=(1.0, 2.0, -1.0), seed=6)[0]]
sessions = [SessionImages(s.label, s.image, s.template_mask, s.reference_to_template,
                          s.template_to_reference) for s in sessions]
result = subject_change(sessions, make_template(root / "tpl").tissues, root / "work", seed=3)
pair = result.pairs[0]
print(hashlib.sha256(pair.maps.score.tobytes() + pair.classes.tobytes()).hexdigest(),
      pair.table.to_csv())
"""


@pytest.mark.slow
def test_same_seed_same_bytes(tmp_path):
    """Two runs in fresh processes with one thread per step (as the command line runs them)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                       os.environ.get("PYTHONPATH")]))}
    outputs = [subprocess.run([sys.executable, "-c", _SAME_BYTES, str(tmp_path / f"run{i}")],
                              env=env, capture_output=True, text=True, check=True).stdout
               for i in (1, 2)]
    assert outputs[0] == outputs[1] and len(outputs[0]) > 64
