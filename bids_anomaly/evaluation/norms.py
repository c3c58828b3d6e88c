"""Regional norms at the group level.

Every participant's regional z-scores and centiles, and the fitted centile curves of the models
whose norms depend on covariates.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from bids_anomaly import bids
from bids_anomaly.errors import BidsAnomalyError

LOGGER = logging.getLogger(__name__)


def model_name_of(map_path: Path) -> str | None:
    """The model that wrote an anomaly map (its sidecar's ``Model``), None when unknown."""
    sidecar = Path(str(map_path).removesuffix(".nii.gz") + ".json")
    try:
        return json.loads(sidecar.read_text()).get("Model")
    except (OSError, json.JSONDecodeError):
        return None


def gather_norms(output_dir: Path, desc: str, maps: list[Path],
                 participants: pd.DataFrame | None) -> pd.DataFrame:
    """Every participant's regional norms table of one model, with its participants.tsv row.

    Returns
    -------
    pandas.DataFrame
        ``participant_id``, ``session_id``, then the columns of ``*_norms.tsv`` (region,
        channel, value, expected, sd, z, centile) and of participants.tsv; empty when the model
        wrote none (a model without covariates).
    """
    frames = []
    for path in maps:
        entities = bids.parse_name(path)
        table = bids.spec_path(output_dir, entities["sub"], entities.get("ses"),
                               bids.norms_spec(entities["space"], int(entities["res"]), desc))
        if table.is_file():
            frame = pd.read_csv(table, sep="\t", na_values="n/a")
            frame.insert(0, "session_id", entities.get("ses"))
            frame.insert(0, "participant_id", f"sub-{entities['sub']}")
            frames.append(frame)
    if not frames:
        return pd.DataFrame()
    norms = pd.concat(frames, ignore_index=True)
    if participants is not None:
        extra = participants.drop(columns=["label"]).drop_duplicates("participant_id")
        extra = extra[[c for c in extra.columns if c not in norms.columns or
                       c == "participant_id"]]
        norms = norms.merge(extra, on="participant_id", how="left")
    return norms


def centile_curves(output_dir: Path, model_name: str | None
                   ) -> tuple[str | None, pd.DataFrame, list[str]]:
    """The regional centile curves of a model against its first numeric covariate.

    Returns
    -------
    column : str or None
        The covariate on the x axis (None: the model has no numeric covariate, or cannot be
        read).
    curves : pandas.DataFrame
        :meth:`~bids_anomaly.models.norms.CovariateNorms.centile_curves`, with channel names.
    level_columns : list of str
        The categorical covariates whose levels have their own curves (in order).
    """
    from bids_anomaly.models.store import load_model

    if not model_name:
        return None, pd.DataFrame(), []
    try:
        model, card = load_model(bids.model_dir(output_dir, model_name))
    except BidsAnomalyError as error:
        LOGGER.warning("model %s cannot be read for its centile curves: %s", model_name, error)
        return None, pd.DataFrame(), []
    norms = getattr(model, "norms", None)
    numeric = list(norms.encoder.numeric) if norms is not None else []
    if not numeric:
        return None, pd.DataFrame(), []
    column = numeric[0]
    curves = norms.centile_curves(column)
    curves["channel"] = [card.channels[int(c)] for c in curves["channel"]]
    return column, curves, list(norms.encoder.levels)


def curve_levels(norms: pd.DataFrame, level_columns: list[str]) -> pd.Series:
    """Each row's curve ``level``: its categorical covariates' values, or "all"."""
    if not level_columns or not set(level_columns) <= set(norms.columns):
        return pd.Series("all", index=norms.index)
    return norms[level_columns].astype(str).agg(" ".join, axis=1)
