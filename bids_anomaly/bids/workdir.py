"""Records in the work directory: caches, checkpoints and what is already done.

Nothing here is a derivative: the work directory can be deleted at any time and is rebuilt.
"""

from __future__ import annotations

from pathlib import Path

from bids_anomaly.bids.names import check_model_name
from bids_anomaly.errors import OutputError


def check_work_dir(work_dir: Path) -> None:
    """Refuse a work folder that holds a dataset (a ``dataset_description.json``).

    Raises
    ------
    OutputError
        ``--work-dir`` points into a dataset (exit 73).
    """
    try:
        held = (Path(work_dir) / "dataset_description.json").exists()
    except OSError as error:
        raise OutputError(f"--work-dir {work_dir} cannot be used: {error.strerror or error}"
                          ) from error
    if held:
        raise OutputError(f"--work-dir {work_dir} holds a dataset (dataset_description.json): "
                          "the work folder is filled with caches; choose an empty or new "
                          "folder")


def checkpoint_dir(work_dir: Path, model_name: str) -> Path:
    """Per-epoch checkpoints and loss log of a deep model being trained."""
    return Path(work_dir) / "train" / f"model-{check_model_name(model_name)}"


def volume_cache_dir(work_dir: Path) -> Path:
    """Preprocessed volumes cached for training deep models."""
    return Path(work_dir) / "cache" / "volumes"


def layout_index_dir(work_dir: Path) -> Path:
    """The pybids indexes of the input dataset, one per dataset signature."""
    return Path(work_dir) / "bids_db"


def template_cache_dir(work_dir: Path) -> Path:
    """The template's files, written once per resolution."""
    return Path(work_dir) / "templates"


def atlas_cache_path(work_dir: Path, space: str, resolution: int) -> Path:
    """The user's atlas resampled onto the template grid."""
    return Path(work_dir) / "atlas" / f"atlas_space-{space}_res-{resolution}_dseg.nii.gz"


def annotation_paths(work_dir: Path, name: str, space: str, resolution: int
                     ) -> tuple[Path, Path]:
    """A subject/session's annotation carried to the template grid, and its healthy mask.

    The second is the brain mask without the annotated lesions (and one voxel around them):
    the subject's healthy tissue when annotated patients stand in for controls.
    """
    folder = Path(work_dir) / "annotations"
    prefix = f"{name}_space-{space}_res-{resolution}"
    return (folder / f"{prefix}_label-lesion_mask.nii.gz",
            folder / f"{prefix}_desc-healthy_mask.nii.gz")


def validated_inputs_path(work_dir: Path) -> Path:
    """The raw images already checked, with their sizes and times."""
    return Path(work_dir) / "validated-inputs.json"


def completion_record_path(work_dir: Path, name: str, key: str) -> Path:
    """Record of a finished subject/session run (:mod:`bids_anomaly.bids.completion`)."""
    return Path(work_dir) / "completed" / f"{name}_{key[:24]}.json"


def group_record_path(work_dir: Path) -> Path:
    """What the last group run read and wrote (its outputs are kept while that holds)."""
    return Path(work_dir) / "group" / "outputs.json"
