"""The regional, subject-level protocol over repeated splits of the controls (``--splits``).

As in the Parkinson's disease studies (Muñoz-Ramírez et al., MLCN 2021; Pinon et al., ISBI
2023): for each split model (``train --splits``), voxels are abnormal above a threshold (by
default the 98th percentile of the voxel scores of that split's training controls, or the
model's calibrated threshold); each subject's score is the share of abnormal voxels (%) in the
whole brain, each template tissue and each atlas region; patients are separated from the
split's held-out controls by that score (AUROC, and the best g-mean with its sensitivity,
specificity and cut-off); the splits are summarised by their median and interquartile range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_anomaly import bids
from bids_anomaly.errors import BidsAnomalyError
from bids_anomaly.evaluation.splits import summarize_splits
from bids_anomaly.evaluation.statistics import best_gmean
from bids_anomaly.postprocessing.regions import regional_table

LOGGER = logging.getLogger(__name__)

THRESHOLDS = ("percentile", "calibrated")
"""How voxels are called abnormal in the protocol (``--burden-threshold``)."""

SPLIT_COLUMNS = ("auroc", "gmean", "sensitivity", "specificity", "cutoff")
"""Per split and region: the subject-level results of
:func:`~bids_anomaly.evaluation.statistics.best_gmean`."""


@dataclass(frozen=True)
class SplitModel:
    """One model of a ``train --splits`` run.

    Attributes
    ----------
    name : str
        The model's name (``<family>-splitKK``).
    index : int
        Its split, from 1.
    threshold : float
        Its calibrated threshold.
    train, test : frozenset of str
        Its training (fitted and calibration) and held-out controls, as ``sub-<label>``.
    """

    name: str
    index: int
    threshold: float
    train: frozenset[str]
    test: frozenset[str]


def split_families(output_dir: Path) -> dict[str, list[SplitModel]]:
    """The ``train --splits`` runs of a derivative dataset: family name to its split models."""
    from bids_anomaly.models.store import read_card

    families: dict[str, list[SplitModel]] = {}
    for card_path in bids.model_cards(output_dir):
        try:
            card = read_card(card_path.parent)
        except BidsAnomalyError as error:
            LOGGER.warning("%s: %s; left out of the split protocol", card_path, error)
            continue
        split = card.extra.get("split")
        if not isinstance(split, dict):
            continue
        families.setdefault(split["family"], []).append(SplitModel(
            card.name, int(split["index"]), float(card.threshold),
            frozenset(split["train_controls"]), frozenset(split["test_controls"])))
    return {family: sorted(models, key=lambda m: m.index)
            for family, models in sorted(families.items())}


def control_threshold(maps: list[Path], brains: list[Path], percentile: float) -> float:
    """The ``percentile`` of the voxel scores pooled over brains (the training controls)."""
    values = []
    for map_path, brain_path in zip(maps, brains, strict=True):
        brain = np.asarray(nib.load(brain_path).dataobj) > 0
        scores = nib.load(map_path).get_fdata(dtype=np.float32)[brain]
        values.append(scores[np.isfinite(scores)])
    pooled = np.concatenate(values) if values else np.zeros(0, np.float32)
    if not pooled.size:
        return float("nan")
    return float(np.percentile(pooled, percentile))


def _map_entities(map_path: Path) -> tuple[str, str | None, str, int]:
    entities = bids.parse_name(map_path)
    return entities["sub"], entities.get("ses"), entities["space"], int(entities["res"])


def _brain_path(output_dir: Path, map_path: Path) -> Path:
    subject, session, space, res = _map_entities(map_path)
    return bids.spec_path(output_dir, subject, session, bids.brain_mask_spec(space, res))


def split_burden(output_dir: Path, model: SplitModel, maps: list[Path], groups: dict[str, str],
                 control: str, threshold_mode: str, percentile: float,
                 tissue: np.ndarray | None, atlas: np.ndarray | None,
                 atlas_labels: dict[int, str] | None) -> tuple[float, pd.DataFrame]:
    """The regional burden of every subject of one split, at the split's threshold.

    Parameters
    ----------
    output_dir : Path
        The derivative dataset.
    model : SplitModel
        The split's model.
    maps : list of Path
        Its template-space anomaly maps.
    groups : dict
        ``group`` of each participant (``sub-<label>``).
    control : str
        The controls' group.
    threshold_mode, percentile
        See :data:`THRESHOLDS`.
    tissue, atlas, atlas_labels
        Regions (see :func:`~bids_anomaly.postprocessing.regions.regional_table`).

    Returns
    -------
    threshold : float
    table : pandas.DataFrame
        One row per participant (sessions averaged) and region: ``participant_id``, ``group``,
        ``role`` (``test`` control, ``training`` control or ``patient``), ``region`` and
        ``abnormal_percent``.
    """
    roles = {}
    for path in maps:
        participant = f"sub-{_map_entities(path)[0]}"
        group = groups.get(participant)
        if participant in model.test:
            roles[path] = "test"
        elif participant in model.train:
            roles[path] = "training"
        elif group not in (None, "", "n/a") and group != control:
            roles[path] = "patient"
    if threshold_mode == "percentile":
        training = [p for p, role in roles.items() if role == "training"]
        threshold = control_threshold(training, [_brain_path(output_dir, p) for p in training],
                                      percentile)
    else:
        threshold = model.threshold
    rows = []
    for path, role in roles.items():
        if role == "training":
            continue
        img = nib.load(path)
        scores = img.get_fdata(dtype=np.float32)
        brain = np.asarray(nib.load(_brain_path(output_dir, path)).dataobj) > 0
        table = regional_table(scores, scores > threshold, brain,
                               float(np.prod(img.header.get_zooms()[:3])), tissue, atlas,
                               atlas_labels)
        participant = f"sub-{_map_entities(path)[0]}"
        for _, row in table.iterrows():
            name = row["region"] if row["source"] == "brain" else f"{row['source']}:{row['region']}"
            rows.append({"participant_id": participant, "group": groups.get(participant, "n/a"),
                         "role": role, "region": name,
                         "abnormal_percent": row["abnormal_percent"]})
    burden = pd.DataFrame(rows, columns=["participant_id", "group", "role", "region",
                                         "abnormal_percent"])
    burden = burden.groupby(["participant_id", "group", "role", "region"], as_index=False,
                            sort=True).mean()
    return threshold, burden


def separate(burden: pd.DataFrame) -> pd.DataFrame:
    """Per region: patients vs test controls by the % of abnormal voxels (:func:`best_gmean`)."""
    rows = []
    for region, rows_of_region in burden.groupby("region", sort=False):
        patients = rows_of_region.loc[rows_of_region["role"] == "patient", "abnormal_percent"]
        controls = rows_of_region.loc[rows_of_region["role"] == "test", "abnormal_percent"]
        rows.append({"region": region, "n_patients": int(patients.notna().sum()),
                     "n_test_controls": int(controls.notna().sum()),
                     **best_gmean(patients.to_numpy(), controls.to_numpy())})
    return pd.DataFrame(rows)


def split_protocol(output_dir: Path, models: list[SplitModel], maps: dict[str, list[Path]],
                   groups: dict[str, str], control: str, threshold_mode: str = "percentile",
                   percentile: float = 98.0, tissue: np.ndarray | None = None,
                   atlas: np.ndarray | None = None, atlas_labels: dict[int, str] | None = None
                   ) -> dict[str, pd.DataFrame]:
    """The subject-level protocol of one ``train --splits`` run, split by split.

    Parameters
    ----------
    output_dir : Path
        The derivative dataset.
    models : list of SplitModel
        The run's models (:func:`split_families`).
    maps : dict
        Template-space anomaly maps by model ``desc``
        (:func:`~bids_anomaly.evaluation.group.find_anomaly_maps`).
    groups : dict
        ``group`` of each participant (``sub-<label>``).
    control : str
        The controls' group.
    threshold_mode, percentile, tissue, atlas, atlas_labels
        See :func:`split_burden`.

    Returns
    -------
    dict of str to pandas.DataFrame
        ``splits``: one row per split (whole brain: threshold, counts, AUROC, best g-mean,
        sensitivity, specificity, cut-off), then rows ``median``, ``q1``, ``q3`` and ``iqr``;
        ``splitregions``: the same per split and region, then the summary rows per region;
        ``splitburden``: every subject's regional burden per split.
    """
    burdens, regions = [], []
    splits = []
    for model in models:
        desc = bids.model_desc(model.name)
        if not maps.get(desc):
            LOGGER.warning("split model %s has no anomaly maps (run participant --model %s): "
                           "left out", model.name, model.name)
            continue
        threshold, burden = split_burden(output_dir, model, maps[desc], groups, control,
                                         threshold_mode, percentile, tissue, atlas,
                                         atlas_labels)
        result = separate(burden).assign(split=model.index, model=model.name)
        brain = result[result["region"] == "brain"].iloc[0] if len(result) else None
        splits.append({"split": model.index, "model": model.name, "threshold": threshold,
                       "n_training_controls": len(model.train),
                       "n_test_controls": int(brain["n_test_controls"]) if brain is not None
                       else 0,
                       "n_patients": int(brain["n_patients"]) if brain is not None else 0,
                       **{c: brain[c] if brain is not None else np.nan for c in SPLIT_COLUMNS}})
        burdens.append(burden.assign(split=model.index))
        regions.append(result)
    if not splits:
        return {}
    per_split = pd.DataFrame(splits)
    per_split = pd.concat([per_split, summarize_splits(per_split, ["threshold",
                                                                    *SPLIT_COLUMNS])],
                          ignore_index=True)
    per_region = pd.concat(regions, ignore_index=True)
    summaries = [summarize_splits(rows, SPLIT_COLUMNS).assign(region=region)
                 for region, rows in per_region.groupby("region", sort=False)]
    per_region = pd.concat([per_region, *summaries], ignore_index=True)
    columns = ["split", "model", "region", "n_patients", "n_test_controls", *SPLIT_COLUMNS]
    burden = pd.concat(burdens, ignore_index=True)
    return {"splits": per_split,
            "splitregions": per_region[[c for c in columns if c in per_region.columns]],
            "splitburden": burden[["split", *[c for c in burden.columns if c != "split"]]]}
