"""One subject's lesion change across its sessions, from raw images to maps on their grids.

The steps (:mod:`~bids_anomaly.longitudinal.midpoint`, :mod:`~bids_anomaly.longitudinal.change`,
:mod:`bids_anomaly.models.tissue`):

1. every session's lesion contrast, brain-extracted (the preprocessing's brain carried back)
   and N4-corrected, on one 1 mm grid of the subject's midpoint space;
2. the template's tissue maps carried onto that grid through each session's registration
   (their mean: the priors), each session's contrast as a robust z-score in the brain common to
   all sessions;
3. one tissue model fitted on every session at once (shared tissue parameters), which maps
   each session's lesion posteriors and tissue score with the same random numbers;
4. for every consecutive pair of sessions, the change score, its label-free threshold and the
   changed lesions classed new, enlarging or shrinking.

The maps are then carried onto the later session's raw grid and into template space by
:func:`to_native` and :func:`to_template`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bids_anomaly.longitudinal.change import (
    LESION_FREE,
    ChangeMaps,
    change_maps,
    change_summary,
    classify_changes,
    null_threshold,
    robust_location_scale,
)
from bids_anomaly.longitudinal.midpoint import GRID_MM, SessionImages, align_sessions

LESION_CONTRASTS = ("FLAIR", "T2w", "PDw")
"""The contrasts in which a T2 lesion changes, in order of preference (the first a session
has is used; every session of a subject must have it)."""
TISSUES = ("GM", "WM", "CSF")
MIN_CHANGE_MM3 = 10.0
"""Smallest changed lesion kept when no ``--min-cluster-size`` is given: about a sphere of
3 mm diameter (14 mm3), the smallest new T2 lesion that MS trials count; chosen before any
label was seen."""


def lesion_class(posteriors: dict[str, np.ndarray]) -> np.ndarray:
    """Voxels of a session that are not normal-appearing (its lesions, faint ones included).

    A lesion posterior of at least :data:`~bids_anomaly.longitudinal.change.LESION_FREE`. The
    earlier session's such voxels decide whether a brightening cluster is *enlarging* (it
    touches them) or *new* (it grew in tissue that was normal-appearing), with the same level
    that defines the normal-appearing voxels of the threshold's null: faint lesions, whose
    posterior stays well below one half, still count as lesions that were there.

    >>> lesion_class({"lesion": np.array([0.05, 0.3])}).tolist()
    [False, True]
    """
    return posteriors["lesion"] >= LESION_FREE


@dataclass
class PairChange:
    """The change between two sessions on the midpoint grid.

    Attributes
    ----------
    earlier, later : str
        Session labels.
    maps : ChangeMaps
        The change score and its parts.
    threshold : float
        The label-free threshold of ``|score|``.
    classes, numbers : numpy.ndarray
        The change classes (:data:`~bids_anomaly.longitudinal.change.CLASSES`) and the clusters
        numbered as in ``table``.
    table : pandas.DataFrame
        One row per changed cluster.
    """

    earlier: str
    later: str
    maps: ChangeMaps
    threshold: float
    classes: np.ndarray
    numbers: np.ndarray
    table: pd.DataFrame

    def summary(self) -> dict:
        """Counts and volumes per class (a row of the subject's table)."""
        return change_summary(self.table, self.earlier, self.later)


@dataclass
class SubjectChange:
    """Every session of a subject on its midpoint grid, and the change of each pair.

    Attributes
    ----------
    grid : Path
        The midpoint grid.
    transforms : list of Path
        Per session, the affine from midpoint points to its points.
    images : list of numpy.ndarray
        Per session, its lesion contrast as a robust z-score in the common brain.
    brain : numpy.ndarray
        The brain of every session.
    lesions : list of numpy.ndarray
        Per session, its lesion posterior.
    pairs : list of PairChange
        Consecutive pairs, in session order.
    """

    grid: Path
    transforms: list[Path]
    images: list[np.ndarray]
    brain: np.ndarray
    lesions: list[np.ndarray]
    pairs: list[PairChange] = field(default_factory=list)


def lesion_contrast(modalities: list[str] | tuple[str, ...]) -> str | None:
    """The contrast whose change is measured (:data:`LESION_CONTRASTS`), or None.

    >>> lesion_contrast(["T1w", "T2w", "FLAIR"])
    'FLAIR'
    >>> lesion_contrast(["T1w"]) is None
    True
    """
    return next((c for c in LESION_CONTRASTS if c in modalities), None)


def _robust_z(values: np.ndarray, brain: np.ndarray) -> np.ndarray:
    centre, spread = robust_location_scale(values[brain])
    return np.where(brain, (values - centre) / spread, 0.0)


def subject_change(sessions: list[SessionImages], template_tissues: dict[str, Path],
                   work_dir: Path, seed: int = 0, fpr: float = 0.001,
                   min_cluster_mm3: float = 0.0) -> SubjectChange:
    """The change of every consecutive pair of a subject's sessions (see the module).

    Parameters
    ----------
    sessions : list of SessionImages
        Two or more sessions, in time order.
    template_tissues : dict
        The template's ``GM``, ``WM`` and ``CSF`` probability maps.
    work_dir : Path
        Where the intermediate images are written.
    seed : int
        Seed of the registrations and of the tissue model's healthy draw.
    fpr : float
        Target rate of changed voxels among the normal-appearing ones.
    min_cluster_mm3 : float
        Changed clusters smaller than this are dropped (0: :data:`MIN_CHANGE_MM3`).

    Raises
    ------
    ValueError
        Fewer than two sessions, or sessions that share too little brain to compare.
    """
    import ants
    import nibabel as nib
    import torch

    from bids_anomaly.models.data import TrainingData
    from bids_anomaly.models.tissue import TissueModel

    if len(sessions) < 2:
        raise ValueError("a change needs two sessions or more")
    work_dir = Path(work_dir)
    grid, transforms, images, masks = align_sessions(sessions, work_dir, seed=seed)
    reference = ants.image_read(str(grid))
    brain = np.logical_and.reduce([nib.load(m).get_fdata() > 0 for m in masks])
    if brain.sum() < 1000:
        raise ValueError("the sessions share fewer than 1000 brain voxels after registration: "
                         "they cannot be compared")
    priors = []
    for tissue in TISSUES:
        template_map = ants.image_read(str(template_tissues[tissue]))
        carried = []
        for session, transform in zip(sessions, transforms, strict=True):
            listed, invert = session.from_template()
            carried.append(ants.apply_transforms(
                reference, template_map, [*listed, str(transform)],
                whichtoinvert=[*invert, False], interpolator="linear").numpy())
        path = work_dir / f"prior_{tissue}.nii.gz"
        ants.image_write(reference.new_image_like(np.mean(carried, 0).astype(np.float32)),
                         str(path))
        priors.append(path)
    values = [_robust_z(nib.load(p).get_fdata(), brain) for p in images]
    model = TissueModel(random_seed=seed)
    model.fit(TrainingData([], ["FLAIR"], tissues=priors))
    scored = model.score_sessions([torch.from_numpy(v[None].astype(np.float32))
                                   for v in values], torch.from_numpy(brain))
    scores = [s.numpy().astype(np.float64) for s, _ in scored]
    posteriors = [{k: v.numpy().astype(np.float64) for k, v in p.items()} for _, p in scored]
    result = SubjectChange(grid, transforms, values, brain,
                           [p["lesion"] for p in posteriors])
    voxel_mm3 = GRID_MM ** 3
    min_voxels = max(1, int(np.ceil((min_cluster_mm3 or MIN_CHANGE_MM3) / voxel_mm3)))
    for index in range(1, len(sessions)):
        first, second = index - 1, index
        maps = change_maps(scores[first], scores[second], values[first], values[second],
                           posteriors[first], posteriors[second], brain)
        threshold = null_threshold(maps, fpr)
        classes, numbers, table = classify_changes(
            maps.score, threshold, lesion_class(posteriors[first]), voxel_mm3,
            min_voxels)
        result.pairs.append(PairChange(sessions[first].label, sessions[second].label, maps,
                                       threshold, classes, numbers, table))
    return result


def write_on_grid(values: np.ndarray, grid: Path, out_file: Path) -> Path:
    """Write an array of the midpoint grid as an image of that grid."""
    import ants

    reference = ants.image_read(str(grid))
    dtype = np.float32 if np.issubdtype(values.dtype, np.floating) else np.int32
    ants.image_write(reference.new_image_like(values.astype(dtype)), str(out_file))
    return Path(out_file)


def to_native(image: Path, session: SessionImages, transform: Path, out_file: Path,
              labels: bool = False) -> Path:
    """A midpoint-grid image on the grid of the session's raw lesion contrast.

    ``labels``: nearest-label interpolation (class and cluster maps), else linear.
    """
    import ants

    moved = ants.apply_transforms(ants.image_read(str(session.image)),
                                  ants.image_read(str(image)), [str(transform)],
                                  whichtoinvert=[True],
                                  interpolator="genericLabel" if labels else "linear")
    ants.image_write(moved, str(out_file))
    return Path(out_file)


def to_template(image: Path, session: SessionImages, transform: Path, template_grid: Path,
                out_file: Path, labels: bool = False) -> Path:
    """A midpoint-grid image in template space, through the session's registration."""
    import ants

    listed, invert = session.to_template()
    moved = ants.apply_transforms(ants.image_read(str(template_grid)),
                                  ants.image_read(str(image)), [str(transform), *listed],
                                  whichtoinvert=[True, *invert],
                                  interpolator="genericLabel" if labels else "linear")
    ants.image_write(moved, str(out_file))
    return Path(out_file)


def world_centres(table: pd.DataFrame, grid: Path, transform: Path) -> pd.DataFrame:
    """The table with each cluster's centre in the session's world coordinates (RAS mm).

    ``i``, ``j``, ``k`` (midpoint-grid voxels) become ``x``, ``y``, ``z``: the centre carried
    from the midpoint space to the session's space by ``transform``.
    """
    import ants

    from bids_anomaly.longitudinal.midpoint import read_rigid

    table = table.copy()
    voxels = table[["i", "j", "k"]].to_numpy(dtype=np.float64).reshape(-1, 3)
    reference = ants.image_read(str(grid))
    direction = np.asarray(reference.direction).reshape(3, 3)
    midpoint = np.asarray(reference.origin) + (voxels * np.asarray(reference.spacing)) @ direction.T
    matrix = read_rigid(transform)
    ras = (midpoint @ matrix[:3, :3].T + matrix[:3, 3]) * np.array([-1.0, -1.0, 1.0])
    for axis, column in enumerate("xyz"):
        table[column] = ras[:, axis].round(1)
    return table.drop(columns=["i", "j", "k"])


def summary_table(result: SubjectChange) -> pd.DataFrame:
    """One row per session pair: counts and volumes of new, enlarging, shrinking lesions."""
    rows = [pair.summary() | {"threshold": pair.threshold} for pair in result.pairs]
    return pd.DataFrame(rows)
