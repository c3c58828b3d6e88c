"""Regions of interest: restricting the anomaly mask, user atlases and regional burden.

A regional table summarises one subject's anomaly map per tissue class of the template (grey
matter, white matter, CSF) and, when the user gives an atlas (``--atlas DSEG``), per atlas
region: for Parkinson's disease work, for instance, the deep grey nuclei of a subcortical atlas.
The atlas is a discrete segmentation in the template's space with a BIDS label table
(``*_dseg.tsv``: columns ``index`` and ``name``) beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.processing import resample_from_to
from scipy import ndimage

from bids_anomaly.config import RESTRICTIONS
from bids_anomaly.errors import BadDataError, MissingInputError
from bids_anomaly.imaging.images import load_volume
from bids_anomaly.imaging.template import TISSUE_LABELS

LOGGER = logging.getLogger(__name__)


ATLAS_MIN_INSIDE = 0.8
"""Share of an atlas's labelled voxels that must fall inside the template's (dilated) brain.

An atlas drawn in another space (a subject's native space, another template with a different
origin) lands mostly outside the brain, which this catches; MNI-space atlases of different
MNI flavours (2009a/c, 6th generation) differ by millimetres and pass.
"""

REGION_COLUMNS = {
    "region": {"Description": "region name: brain, a template tissue class, or an atlas label"},
    "source": {"Description": "where the region comes from",
               "Levels": {"brain": "the subject's brain mask",
                          "tissue": "the template's tissue segmentation",
                          "atlas": "the user's atlas (--atlas)"}},
    "label": {"Description": "integer label of the region in its segmentation"},
    "n_voxels": {"Description": "voxels of the region inside the subject's brain mask"},
    "volume_ml": {"Description": "volume of the region inside the brain mask", "Units": "ml"},
    "mean_score": {"Description": "mean anomaly score over the region"},
    "p95_score": {"Description": "95th percentile of the anomaly score over the region"},
    "abnormal_ml": {"Description": "volume of the region's voxels in the anomaly mask",
                    "Units": "ml"},
    "abnormal_percent": {"Description": "share of the region's voxels in the anomaly mask",
                         "Units": "%"},
}
"""Column definitions of ``*_regions.tsv`` (written to its JSON sidecar)."""


@dataclass(frozen=True)
class Atlas:
    """A user atlas resampled onto the template grid.

    Attributes
    ----------
    path : Path
        The atlas on the template grid (uint16 NIfTI).
    labels : dict of int to str
        Region names by label, from the atlas's TSV.
    source : Path
        The file the user gave.
    """

    path: Path
    labels: dict[int, str]
    source: Path


def atlas_table_path(atlas_file: Path) -> Path:
    """The label table beside an atlas: ``<name>.tsv`` for ``<name>.nii[.gz]``."""
    name = atlas_file.name
    for extension in (".nii.gz", ".nii"):
        if name.endswith(extension):
            return atlas_file.with_name(name[: -len(extension)] + ".tsv")
    return atlas_file.with_suffix(".tsv")


def read_atlas_labels(table_file: Path) -> dict[int, str]:
    """Region names by label from a BIDS segmentation table (columns ``index`` and ``name``).

    Raises
    ------
    MissingInputError
        The table does not exist.
    BadDataError
        It lacks the columns, has non-integer or duplicate indices, or empty names.
    """
    if not table_file.is_file():
        raise MissingInputError(
            f"--atlas needs its label table {table_file} (a TSV with columns 'index' and "
            "'name', as BIDS dseg.tsv files)")
    try:
        table = pd.read_csv(table_file, sep="\t", dtype={"name": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise BadDataError(f"{table_file}: not a readable TSV ({error})") from error
    missing = {"index", "name"} - set(table.columns)
    if missing:
        raise BadDataError(f"{table_file}: needs the columns 'index' and 'name' (BIDS dseg.tsv); "
                           f"missing {', '.join(sorted(missing))}")
    index = pd.to_numeric(table["index"], errors="coerce")
    if index.isna().any() or (index != index.round()).any() or (index < 0).any():
        raise BadDataError(f"{table_file}: 'index' must hold non-negative integers")
    if index.duplicated().any():
        raise BadDataError(f"{table_file}: duplicate indices "
                           f"{sorted(set(index[index.duplicated()].astype(int)))}")
    names = table["name"].fillna("").str.strip()
    if (names == "").any():
        raise BadDataError(f"{table_file}: every label needs a name")
    return {int(i): str(n) for i, n in zip(index, names, strict=True) if int(i) != 0}


def load_atlas(atlas_file: Path, template_mask_file: Path, out_file: Path,
               table_file: Path | None = None) -> Atlas:
    """Check a user atlas and resample it onto the template grid (nearest neighbour).

    Parameters
    ----------
    atlas_file : Path
        Discrete segmentation in the template's space (any grid).
    template_mask_file : Path
        The template's brain mask: the output grid and the space check.
    out_file : Path
        Where to write the atlas on the template grid.
    table_file : Path, optional
        Label table (default: :func:`atlas_table_path`).

    Returns
    -------
    Atlas

    Raises
    ------
    BadDataError
        Not a 3D image, non-integer values (a probabilistic atlas), labels without a name in the
        table, no label left on the template grid, or an atlas that does not lie on the
        template's brain (another space).
    MissingInputError
        The image or its label table does not exist.
    """
    atlas_file = Path(atlas_file)
    if not atlas_file.is_file():
        raise MissingInputError(f"--atlas {atlas_file}: no such file")
    labels = read_atlas_labels(table_file or atlas_table_path(atlas_file))
    img = load_volume(atlas_file, dtype=np.float64)
    data = np.asarray(img.dataobj)
    if not np.allclose(data, np.round(data)) or data.min() < 0:
        raise BadDataError(
            f"{atlas_file}: an atlas holds non-negative integer labels; this image has "
            "fractional or negative values (a probabilistic atlas? give its discrete dseg)")
    present = set(np.unique(data).astype(int)) - {0}
    unnamed = sorted(present - set(labels))
    if unnamed:
        raise BadDataError(f"{atlas_file}: labels {unnamed[:10]} have no name in its table")
    template = nib.load(str(template_mask_file))
    img = nib.Nifti1Image(np.round(data).astype(np.int32), img.affine)
    if img.shape != template.shape or not np.allclose(img.affine, template.affine, atol=1e-3):
        img = resample_from_to(img, template, order=0, mode="constant", cval=0)
    grid = np.asarray(img.dataobj).astype(np.uint16)
    if not grid.any():
        raise BadDataError(f"{atlas_file}: no labelled voxel falls on the template's grid; is "
                           "it in the template's space?")
    brain = ndimage.binary_dilation(np.asarray(template.dataobj) > 0, iterations=2)
    inside = float((brain & (grid > 0)).sum() / (grid > 0).sum())
    if inside < ATLAS_MIN_INSIDE:
        raise BadDataError(
            f"{atlas_file}: only {inside:.0%} of its labelled voxels lie in the template's brain "
            f"(at least {ATLAS_MIN_INSIDE:.0%} expected); it must be in the template's space "
            "(MNI), not a subject's native space")
    lost = sorted(present - set(np.unique(grid).astype(int)))
    if lost:
        LOGGER.warning("%s: labels %s are too small for the %s mm template grid and are left "
                       "out", atlas_file.name, lost,
                       "x".join(f"{z:g}" for z in template.header.get_zooms()[:3]))
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # rewritten only when it changed: its timestamp is part of the scoring steps' cache key
    if not (out_file.is_file() and np.array_equal(np.asarray(nib.load(out_file).dataobj), grid)):
        out = nib.Nifti1Image(grid, template.affine)
        out.set_data_dtype(np.uint16)
        out.to_filename(out_file)
    kept = {label: name for label, name in labels.items() if label in present and label not in lost}
    return Atlas(path=out_file, labels=kept, source=atlas_file.resolve())


def restriction_mask(restrict: str, brain: np.ndarray, tissue: np.ndarray | None) -> np.ndarray:
    """Voxels where abnormal voxels may be flagged.

    Parameters
    ----------
    restrict : {"brain", "wm"}
        ``brain``: the brain mask. ``wm``: the template's white matter dilated by one voxel (so
        that lesions at the ventricles' and cortex's borders keep their edges), inside the brain.
    brain : numpy.ndarray
        Brain mask.
    tissue : numpy.ndarray, optional
        Template tissue labels (:data:`~bids_anomaly.imaging.template.TISSUE_LABELS`); needed for
        ``wm``.
    """
    brain = np.asarray(brain) > 0
    if restrict == "brain":
        return brain
    if restrict != "wm":
        raise ValueError(f"restriction must be one of {tuple(RESTRICTIONS)}, not {restrict!r}")
    if tissue is None:
        raise ValueError("the white-matter restriction needs the template's tissue labels")
    white = np.asarray(tissue) == next(k for k, v in TISSUE_LABELS.items() if v == "WM")
    return ndimage.binary_dilation(white, iterations=1) & brain


def regional_table(anomaly_map: np.ndarray, anomaly_mask: np.ndarray, brain: np.ndarray,
                   voxel_volume: float, tissue: np.ndarray | None = None,
                   atlas: np.ndarray | None = None,
                   atlas_labels: dict[int, str] | None = None) -> pd.DataFrame:
    """Anomaly burden per region: the whole brain, each tissue class, each atlas region.

    Parameters
    ----------
    anomaly_map, anomaly_mask, brain : numpy.ndarray
        Score, abnormal voxels and brain mask on one grid.
    voxel_volume : float
        In mm3.
    tissue : numpy.ndarray, optional
        Template tissue labels.
    atlas : numpy.ndarray, optional
        Atlas labels on the same grid, named by ``atlas_labels``.

    Returns
    -------
    pandas.DataFrame
        The columns of :data:`REGION_COLUMNS`, one row per region. Regions are intersected with
        the brain mask; a region with no voxel there has n/a scores.
    """
    brain = np.asarray(brain) > 0
    scores = np.asarray(anomaly_map, dtype=np.float64)
    flagged = (np.asarray(anomaly_mask) > 0) & brain
    regions = [("brain", "brain", 0, brain)]
    if tissue is not None:
        tissue = np.asarray(tissue)
        regions += [(name, "tissue", label, brain & (tissue == label))
                    for label, name in TISSUE_LABELS.items()]
    if atlas is not None:
        atlas = np.asarray(atlas)
        regions += [(name, "atlas", label, brain & (atlas == label))
                    for label, name in sorted((atlas_labels or {}).items())]
    rows = []
    for name, source, label, region in regions:
        n_voxels = int(region.sum())
        values = scores[region]
        abnormal = int(flagged[region].sum())
        rows.append({
            "region": name, "source": source, "label": label, "n_voxels": n_voxels,
            "volume_ml": n_voxels * voxel_volume / 1000,
            "mean_score": float(values.mean()) if n_voxels else float("nan"),
            "p95_score": float(np.percentile(values, 95)) if n_voxels else float("nan"),
            "abnormal_ml": abnormal * voxel_volume / 1000,
            "abnormal_percent": 100 * abnormal / n_voxels if n_voxels else float("nan"),
        })
    return pd.DataFrame(rows, columns=list(REGION_COLUMNS))
