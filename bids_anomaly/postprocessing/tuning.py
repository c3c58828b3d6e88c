"""Post-processing tuned on a few annotated subjects: threshold, minimum cluster size, restriction.

With ``train --annotations`` the label-free threshold (a voxel false-positive rate on healthy
voxels) is replaced by the combination of threshold, minimum cluster volume and restriction
(whole brain or white matter) that maximises the mean Dice or lesion-wise F1 over the annotated
subjects. Every combination of a grid is evaluated once per subject (:func:`subject_table`:
one connected-component labelling per restriction and threshold; the cluster sizes then give
every minimum size at once), so choosing on any subset of subjects is an argmax over stored
counts, and leave-one-subject-out cross-validation (:func:`cross_validate`) costs nothing more:
each subject is scored with the combination chosen on the others, which is the estimate
reported in the model card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from bids_anomaly.config import TUNING_OBJECTIVES
from bids_anomaly.postprocessing.clusters import CONNECTIVITY, remove_small_clusters
from bids_anomaly.postprocessing.regions import restriction_mask

OBJECTIVES = TUNING_OBJECTIVES
"""What tuning maximises: voxel Dice, or the F1 of lesion-wise sensitivity and precision."""

MIN_CLUSTER_VOXELS = (1, 2, 3, 5, 8, 12, 20, 30, 50)
"""Minimum cluster sizes searched, in voxels (1 keeps everything)."""

TOLERANCE = 0.01
"""Combinations within this of the best mean objective count as tied: the simplest is taken
(whole brain, smallest minimum size), as a one-standard-error rule guards a few subjects
against overfitting the post-processing."""

THRESHOLD_POINTS = 48
"""Thresholds searched: quantiles of the annotated subjects' pooled brain scores."""


@dataclass
class SubjectTable:
    """Counts of one annotated subject for every (restriction, threshold, minimum size).

    Arrays are ``(R, T, M)`` for the restrictions, thresholds and minimum sizes of the grid.
    """

    name: str
    truth_voxels: int
    n_lesions: int
    true_positive_voxels: np.ndarray
    predicted_voxels: np.ndarray
    lesions_detected: np.ndarray
    n_clusters: np.ndarray
    true_clusters: np.ndarray

    def objective(self, objective: str) -> np.ndarray:
        """Dice or lesion-wise F1 for every combination, ``(R, T, M)``."""
        if objective == "dice":
            total = self.predicted_voxels + self.truth_voxels
            return np.where(total > 0, 2 * self.true_positive_voxels / np.maximum(total, 1), 1.0)
        if objective == "lesion-f1":
            recall = self.lesions_detected / max(self.n_lesions, 1)
            precision = self.true_clusters / np.maximum(self.n_clusters, 1)
            denominator = recall + precision
            return np.where(denominator > 0, 2 * recall * precision / np.where(
                denominator > 0, denominator, 1), 0.0)
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")


@dataclass
class Grid:
    """The combinations searched."""

    restrictions: list[str]
    thresholds: list[float]
    min_cluster_voxels: list[int] = field(default_factory=lambda: list(MIN_CLUSTER_VOXELS))


def threshold_grid(scores: list[np.ndarray], points: int = THRESHOLD_POINTS,
                   extra: tuple[float, ...] = ()) -> list[float]:
    """Thresholds to search: upper quantiles of the pooled scores (no label is used).

    Parameters
    ----------
    scores : list of numpy.ndarray
        Brain-voxel scores of each annotated subject.
    points : int
        Quantile levels, log-spaced exceedance probabilities from 1e-5 to 0.3; the midpoints
        between consecutive quantiles are added.
    extra : tuple of float
        Thresholds always included (the calibrated label-free one).
    """
    pooled = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores])
    levels = 1.0 - np.geomspace(1e-5, 0.3, points)
    values = np.unique(np.quantile(pooled, levels))
    middles = (values[:-1] + values[1:]) / 2  # a gap between two quantiles gets a point too
    return sorted({float(v) for v in np.concatenate([values, middles, np.asarray(extra, float)])
                   if np.isfinite(v)})


def subject_table(name: str, score: np.ndarray, truth: np.ndarray, brain: np.ndarray,
                  tissue: np.ndarray | None, grid: Grid) -> SubjectTable:
    """Evaluate every combination of ``grid`` on one subject.

    Parameters
    ----------
    score : numpy.ndarray
        3D anomaly map (flagged: strictly above the threshold, as the participant level does).
    truth : numpy.ndarray
        3D binary annotation.
    brain : numpy.ndarray
        3D brain mask.
    tissue : numpy.ndarray, optional
        Template tissue labels (for the ``wm`` restriction).
    """
    truth = np.asarray(truth) > 0
    lesions, n_lesions = ndimage.label(truth, structure=CONNECTIVITY)
    shape = (len(grid.restrictions), len(grid.thresholds), len(grid.min_cluster_voxels))
    counts = {key: np.zeros(shape, dtype=np.int64) for key in (
        "tp", "predicted", "detected", "clusters", "true_clusters")}
    min_sizes = np.asarray(grid.min_cluster_voxels)
    for r, restrict in enumerate(grid.restrictions):
        region = restriction_mask(restrict, brain, tissue)
        for t, threshold in enumerate(grid.thresholds):
            flagged = (score > threshold) & region
            labels, count = ndimage.label(flagged, structure=CONNECTIVITY)
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            overlap = np.bincount(labels[truth], minlength=count + 1)
            sizes[0] = overlap[0] = 0
            # the largest cluster touching each true lesion: detected while it is kept
            best = np.zeros(n_lesions + 1, dtype=np.int64)
            both = truth & (labels > 0)
            np.maximum.at(best, lesions[both], sizes[labels[both]])
            kept = sizes[None, 1:] >= min_sizes[:, None]  # (M, clusters)
            counts["predicted"][r, t] = (kept * sizes[None, 1:]).sum(1)
            counts["tp"][r, t] = (kept * overlap[None, 1:]).sum(1)
            counts["clusters"][r, t] = kept.sum(1)
            counts["true_clusters"][r, t] = (kept & (overlap[None, 1:] > 0)).sum(1)
            counts["detected"][r, t] = (best[None, 1:] >= min_sizes[:, None]).sum(1)
    return SubjectTable(name, int(truth.sum()), int(n_lesions), counts["tp"],
                        counts["predicted"], counts["detected"], counts["clusters"],
                        counts["true_clusters"])


@dataclass
class Choice:
    """One combination of the grid, by value."""

    threshold: float
    min_cluster_voxels: int
    restrict: str


def choose(tables: list[SubjectTable], grid: Grid, objective: str,
           tolerance: float = TOLERANCE) -> tuple[Choice, float]:
    """The simplest combination with the best mean objective over ``tables``, and its mean.

    Combinations within ``tolerance`` of the best are tied; ties go to the whole brain before
    the white matter, then to the smallest minimum size (the least post-processing), then to the
    highest threshold (the fewest false positives on new subjects).
    """
    mean = np.mean([table.objective(objective) for table in tables], axis=0)
    tied = mean >= float(mean.max()) - tolerance - 1e-12
    r = int(np.flatnonzero(tied.any(axis=(1, 2)))[0])
    m = int(np.flatnonzero(tied[r].any(axis=0))[0])
    t = int(np.flatnonzero(tied[r, :, m])[-1])
    return (Choice(grid.thresholds[t], grid.min_cluster_voxels[m], grid.restrictions[r]),
            float(mean[r, t, m]))


def _value(table: SubjectTable, grid: Grid, choice: Choice, objective: str) -> float:
    """The objective of one subject at one combination."""
    index = (grid.restrictions.index(choice.restrict), grid.thresholds.index(choice.threshold),
             grid.min_cluster_voxels.index(choice.min_cluster_voxels))
    return float(table.objective(objective)[index])


@dataclass
class TuningResult:
    """The tuned post-processing and what cross-validation says of it (the model card's)."""

    objective: str
    threshold: float
    min_cluster_voxels: int
    min_cluster_mm3: float
    restrict: str
    training_objective: float
    cv_objective: float | None
    cv_subjects: list[dict]
    label_free: dict

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def cross_validate(tables: list[SubjectTable], grid: Grid, objective: str,
                   voxel_volume: float, label_free: Choice | None = None) -> TuningResult:
    """Tune on all subjects; estimate by leave-one-subject-out (each scored with the others').

    Parameters
    ----------
    tables : list of SubjectTable
        One per annotated subject (k >= 1; with k = 1 there is no cross-validated estimate).
    label_free : Choice, optional
        The label-free post-processing (calibrated threshold, no minimum size, whole brain),
        evaluated on the same subjects for comparison; it must be on the grid.
    """
    chosen, best = choose(tables, grid, objective)
    held_out = []
    if len(tables) > 1:
        for i, table in enumerate(tables):
            others = [t for j, t in enumerate(tables) if j != i]
            choice, _ = choose(others, grid, objective)
            held_out.append({"subject": table.name, **asdict(choice),
                             objective: _value(table, grid, choice, objective)})
    reference = {}
    if label_free is not None:
        values = [_value(t, grid, label_free, objective) for t in tables]
        reference = {**asdict(label_free), objective: float(np.mean(values))}
    return TuningResult(
        objective=objective, threshold=chosen.threshold,
        min_cluster_voxels=chosen.min_cluster_voxels,
        min_cluster_mm3=chosen.min_cluster_voxels * voxel_volume if chosen.min_cluster_voxels > 1
        else 0.0, restrict=chosen.restrict, training_objective=best,
        cv_objective=(float(np.mean([h[objective] for h in held_out])) if held_out else None),
        cv_subjects=held_out, label_free=reference)


def tune_postprocessing(maps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                        tissue: np.ndarray | None, voxel_volume: float, objective: str = "dice",
                        label_free_threshold: float | None = None,
                        restrictions: tuple[str, ...] = ("brain", "wm")) -> TuningResult:
    """Tune threshold, minimum cluster size and restriction on annotated subjects.

    Parameters
    ----------
    maps : dict
        Per subject name, ``(score, truth, brain)`` 3D arrays on the template grid.
    tissue : numpy.ndarray, optional
        Template tissue labels (without them only the whole brain is searched).
    voxel_volume : float
        mm^3 per voxel (the minimum size is stored in mm^3, as ``--min-cluster-size`` takes it).
    label_free_threshold : float, optional
        The calibrated threshold, reported for comparison.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> truth = np.zeros((20, 20, 20), bool); truth[5:9, 5:9, 5:9] = True
    >>> score = rng.uniform(0, 1, truth.shape) + 2 * truth
    >>> result = tune_postprocessing({"s": (score, truth, np.ones_like(truth))}, None, 1.0)
    >>> 1.0 <= result.threshold < 2.0, result.training_objective
    (True, 1.0)
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if not maps:
        raise ValueError("tuning needs at least one annotated subject")
    usable = [r for r in restrictions if r == "brain" or tissue is not None]
    extra = (label_free_threshold,) if label_free_threshold is not None else ()
    grid = Grid(usable, threshold_grid([s[b > 0] for s, _, b in maps.values()], extra=extra))
    tables = [subject_table(name, score, truth, brain, tissue, grid)
              for name, (score, truth, brain) in maps.items()]
    label_free = (Choice(float(label_free_threshold), 1, "brain")
                  if label_free_threshold is not None else None)
    return cross_validate(tables, grid, objective, voxel_volume, label_free)


def apply_postprocessing(score: np.ndarray, brain: np.ndarray, tissue: np.ndarray | None,
                         threshold: float, min_cluster_voxels: int = 1,
                         restrict: str = "brain") -> np.ndarray:
    """The mask the participant level writes: above threshold, restricted, small clusters out.

    ``score`` may be a mask already (threshold 0), e.g. the Benjamini-Hochberg discoveries.

    >>> score = np.zeros((5, 5, 5)); score[1, 1, 1] = score[3, 3, 2:4] = 2.0
    >>> int(apply_postprocessing(score, np.ones_like(score), None, 1.0, 2).sum())
    2
    """
    flagged = (np.asarray(score) > threshold) & restriction_mask(restrict, brain, tissue)
    return remove_small_clusters(flagged, min_cluster_voxels)
