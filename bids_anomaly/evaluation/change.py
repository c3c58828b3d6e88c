"""The group level's tables of lesion change (``participant --longitudinal``).

Every subject's counts and volumes of new, enlarging and shrinking lesions per session pair,
and, with ``--ground-truth`` folders holding change masks (``*_label-change_mask.nii[.gz]`` of
the later session, on any of its raw grids, e.g. the MSLUB consensus change masks), the
change maps evaluated voxel- and lesion-wise as the anomaly maps are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_anomaly import bids
from bids_anomaly.evaluation.ground_truth import (
    CHANGE_LABEL,
    first_found,
    transforms_to_template,
    truth_in_template,
)
from bids_anomaly.evaluation.metrics import lesion_metrics, voxel_metrics
from bids_anomaly.imaging.images import load_volume, same_grid

LOGGER = logging.getLogger(__name__)

CHANGE_METRICS = ("auroc", "auprc", "oracle_dice", "dice", "lesion_sensitivity",
                  "false_positive_clusters")
"""The evaluation columns summarised per group."""
COUNT_COLUMNS = tuple(f"{name}_{kind}" for name in ("new", "enlarging", "shrinking")
                      for kind in ("count", "ml"))


def find_change_truth(deriv_dir: Path, subject: str, session: str | None) -> Path | None:
    """The change mask of a later session (``*_label-change_mask.nii[.gz]``), or None."""
    for path in sorted(Path(deriv_dir).glob(f"sub-{subject}/**/sub-{subject}_*_mask.nii*")):
        entities = bids.parse_name(path)
        if entities.get("ses") == session and entities.get("label") == CHANGE_LABEL:
            return path
    return None


def change_counts(output_dir: Path, participants: pd.DataFrame | None) -> pd.DataFrame:
    """Every subject's table of lesion change per session pair, in one table."""
    tables = []
    for folder in sorted(p for p in Path(output_dir).glob("sub-*") if p.is_dir()):
        subject = folder.name[4:]
        path = bids.spec_path(output_dir, subject, None, bids.change_summary_spec())
        if not path.is_file():
            continue
        table = pd.read_csv(path, sep="\t", dtype={"earlier": str, "later": str})
        table.insert(0, "participant_id", f"sub-{subject}")
        if participants is not None and "group" in participants.columns:
            match = participants.loc[participants["label"] == subject, "group"]
            table.insert(1, "group", str(match.iloc[0]) if len(match) else "n/a")
        tables.append(table)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def evaluate_changes(output_dir: Path, truth_dirs: list[Path], layout,
                     counts: pd.DataFrame) -> pd.DataFrame:
    """Voxel- and lesion-wise metrics of every change map with a change mask.

    The map is evaluated on the change mask's grid when it is the grid of the native change
    map (the later session's raw lesion contrast), inside the brain of the change map (its
    non-zero voxels) and the mask; else in template space inside the session's brain.

    Parameters
    ----------
    output_dir : Path
        The derivatives.
    truth_dirs : list of Path
        ``--ground-truth`` folders.
    layout : bids.layout.BIDSLayout
        The raw dataset (the grids the masks may be on).
    counts : pandas.DataFrame
        :func:`change_counts` (the rows evaluated, with their group).
    """
    rows = []
    for row in counts.to_dict("records"):
        subject = row["participant_id"][4:]
        earlier, later = row["earlier"], row["later"]
        truth_file = first_found(find_change_truth, truth_dirs, subject, later)
        if truth_file is None:
            continue
        template_map = next((p for p in bids.change_maps(output_dir)
                             if p.name.startswith(f"sub-{subject}_ses-{later}_")
                             and f"_desc-since{earlier}_" in p.name), None)
        if template_map is None:
            LOGGER.warning("sub-%s ses-%s: change ground truth but no change map; skipped",
                           subject, later)
            continue
        entities = bids.parse_name(template_map)
        space, res = entities["space"], int(entities["res"])
        contrast = bids.read_sidecar(template_map).get("Contrast", "FLAIR")
        native_map = bids.spec_path(output_dir, subject, later,
                                    bids.change_map_spec(contrast, None, earlier))
        truth_image = load_volume(truth_file, finite=True)
        if native_map.is_file() and same_grid(truth_image, nib.load(native_map)):
            grid = "native"
            scores = nib.load(native_map).get_fdata(dtype=np.float32)
            mask_path = bids.spec_path(output_dir, subject, later,
                                       bids.change_mask_spec(contrast, None, earlier))
            truth = np.asarray(truth_image.dataobj) > 0
            region = (scores != 0) | truth
        else:
            grid = "template"
            scores = nib.load(template_map).get_fdata(dtype=np.float32)
            mask_path = bids.spec_path(output_dir, subject, later,
                                       bids.change_mask_spec(space, res, earlier))
            brain_path = bids.spec_path(output_dir, subject, later,
                                        bids.brain_mask_spec(space, res))
            raw = bids.collect_anat(layout, subject, [later])
            chains = transforms_to_template(template_map.parent,
                                            template_map.name.split("_space-")[0], space)
            truth = truth_in_template(truth_file, brain_path, raw[0].images if raw else {},
                                      chains)
            region = (np.asarray(nib.load(brain_path).dataobj) > 0) | truth
        changed = np.asarray(nib.load(mask_path).dataobj) > 0
        metrics = voxel_metrics(np.abs(scores[region]), truth[region],
                                predicted=changed[region])
        metrics.update(lesion_metrics(changed & region, truth))
        keys = {k: row[k] for k in ("participant_id", "group") if k in row}
        rows.append({**keys, "earlier": earlier, "later": later, "grid": grid,
                     "ground_truth": truth_file.name, **metrics})
    return pd.DataFrame(rows)
