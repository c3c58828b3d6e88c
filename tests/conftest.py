"""Shared fixtures: small generated BIDS datasets and the real data in ../shared/data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bids_real"


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``: to prove a dataset was not written to."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file()
    }


def check_hostile_case(case: tuple, bids_dir: Path, tmp_path: Path, capsys,
                       extra: list[str] | None = None) -> Path:
    """Run a hostile-input case ``(setup, exit code, words)``: its code, one line, input intact.

    ``setup(bids_dir, folder)`` prepares the case and returns the command's arguments after
    OUTPUT_DIR; ``extra`` are appended. Returns the output folder.
    """
    from bids_anomaly.cli.run import main

    setup, code, words = case
    work = tmp_path / "case"
    work.mkdir()
    args = setup(bids_dir, work)
    before = tree_digest(bids_dir)
    output = tmp_path / "out"
    assert main([str(bids_dir), str(output), *args, *(extra or [])]) == code
    err = capsys.readouterr().err.strip()
    assert words in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert tree_digest(bids_dir) == before
    return output


def write_minimal_bids(root: Path, subjects: dict[str, dict[str, nib.Nifti1Image]],
                       groups: dict[str, str] | None = None) -> Path:
    """Write a BIDS dataset with the given images (``{label: {suffix: image}}``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "test", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    rows = ["participant_id\tgroup"]
    for label, images in subjects.items():
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        for suffix, img in images.items():
            img.to_filename(anat / f"sub-{label}_{suffix}.nii.gz")
        rows.append(f"sub-{label}\t{(groups or {}).get(label, 'healthy')}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def small_subject() -> dict[str, nib.Nifti1Image]:
    """One synthetic subject with lesions (T1w, T2w, FLAIR, lesion_mask)."""
    from bids_anomaly.simulation.synthetic import synthetic_subject

    return synthetic_subject(seed=3, lesions=True)


def _tiny_subjects() -> dict[str, dict[str, nib.Nifti1Image]]:
    """Subjects 01 and 02 of small random T1w volumes (seeded)."""
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return {
        label: {"T1w": nib.Nifti1Image(rng.random((20, 20, 20)).astype(np.float32), affine)}
        for label in ("01", "02")
    }


@pytest.fixture
def tiny_bids(tmp_path: Path) -> Path:
    """A two-subject dataset of small random volumes (enough for every check before processing)."""
    return write_minimal_bids(tmp_path / "bids", _tiny_subjects())


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that ``build(folder)`` fills once for the whole test run, pytest-xdist workers
    included (the first to ask builds it under a lock; the others wait and read it).

    For results the tests read: two tests writing into it at once would race.
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' folders share this parent
        root = root.parent
    folder = root / f"shared-{name}"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # an earlier build that failed
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@dataclass(frozen=True)
class Cohort:
    """A dataset preprocessed once for the session, and the options it was preprocessed with."""

    bids: Path
    out: Path
    options: tuple[str, ...]


COHORT_OPTIONS = ("--nprocs", "1", "--omp-nthreads", "1", "--device", "cpu", "--sloppy")
"""Options of :func:`preprocessed_cohort`'s preprocessing. The tests that share it pass them
too: another seed, thread count, device or preset would preprocess the cohort again."""


@pytest.fixture(scope="session")
def preprocessed_cohort(tmp_path_factory) -> Cohort:
    """Three healthy subjects of small random volumes, preprocessed once for the session.

    ``tiny_bids`` with ``sub-03`` a copy of ``sub-01`` (the fewest subjects a model trains
    on), run through the participant level with :data:`COHORT_OPTIONS` into a shared
    OUTPUT_DIR. The end-to-end tests of the model families (contract, ensemble, patch OC-SVM)
    train and apply their models there under names of their own; nothing preprocesses again.
    The dataset is never written to (the tests check its digest). Each test process builds it
    once (with pytest-xdist, every worker that runs one of those tests).
    """
    from bids_anomaly.cli.run import main

    root = tmp_path_factory.mktemp("cohort")
    subjects = _tiny_subjects()
    subjects["03"] = subjects["01"]
    bids_dir = write_minimal_bids(root / "bids", subjects)
    out = root / "out"
    assert main([str(bids_dir), str(out), "participant", *COHORT_OPTIONS]) == 0
    return Cohort(bids_dir, out, COHORT_OPTIONS)


@pytest.fixture
def one_torch_thread():
    """Tiny networks: one thread (several fight over a busy machine's cores, 50x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def real_data() -> Path:
    """The real dataset of ../shared/data, or skip."""
    if not REAL_DATA.is_dir():
        pytest.skip("../shared/data/bids_real is not available")
    return REAL_DATA


def template_grid(resolution: int = 2) -> tuple[int, ...]:
    """Shape of the embedded template's grid."""
    from bids_anomaly.imaging.template import template_images

    return template_images(resolution)["T1w"].shape


def saved_normative_model(directory: Path, channels: list[str], threshold: float = 3.0,
                          grid: tuple[int, ...] | None = None, fpr: float = 0.001,
                          calibrated: bool = False, spread: float = 1.0) -> Path:
    """A normative model on the template grid (median 0, spread ``spread``), saved with its card.

    ``calibrated``: the card holds the tail of healthy scores (|z| of a standard normal, as
    training stores it) and the threshold at ``fpr`` on them instead of ``threshold``.
    """
    import torch

    from bids_anomaly.models import ModelCard, NormativeModel, save_model
    from bids_anomaly.postprocessing.thresholds import tail_table, threshold_at_fpr

    extra = {}
    if calibrated:
        healthy = np.abs(np.random.default_rng(0).standard_normal(200_000))
        threshold = threshold_at_fpr(healthy, fpr)
        extra["calibration_tail"] = tail_table(healthy)
    grid = grid or template_grid()
    model = NormativeModel()
    model.location = torch.zeros(len(channels), *grid)
    model.spread = torch.full((len(channels), *grid), float(spread))
    model.support = torch.ones(grid, dtype=torch.bool)
    card = ModelCard(name=directory.name.removeprefix("model-"), model_type="normative",
                     channels=list(channels), template="MNI152NLin2009aSym", resolution=2,
                     preprocessing={}, hyperparameters=model.hyperparameters,
                     training_participants=[], calibration_participants=[],
                     threshold=threshold, fpr=fpr, calibration_voxels=1, extra=extra)
    return save_model(model, card, directory)
