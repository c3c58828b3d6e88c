"""BIDS names: labels, entities, and file names built and parsed.

The one place that knows how a file is named: outputs are named by :func:`derivative_name`
(placed by :func:`bids_anomaly.bids.derivatives.derivative_path`) and read back by
:func:`parse_name`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bids_anomaly.errors import UsageError

ENTITY_ORDER = (
    "sub", "ses", "task", "acq", "ce", "rec", "dir", "run",
    "from", "to", "mode", "space", "res", "model", "param", "label", "desc", "stat",
)
"""Order of entities in derivative names (BIDS order; ``stat`` last as in DESIGN.md)."""

_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$")
LABEL_PATTERN = re.compile(r"^[a-zA-Z0-9]+$")
_MODEL_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,63}$")


def check_label(value: str, what: str) -> str:
    """A participant or session label without its prefix, checked.

    Raises
    ------
    UsageError
        Empty, or not made of letters and digits only (as BIDS labels are).

    Examples
    --------
    >>> check_label("sub-01", "participant")
    '01'
    """
    label = value.removeprefix("sub-" if what == "participant" else "ses-")
    if not LABEL_PATTERN.match(label):
        raise UsageError(f"{what} label {value!r} is not a BIDS label: use letters and digits "
                         "only (with or without the prefix)")
    return label


def participant_of(name: str) -> str:
    """The participant label of a ``sub-<label>[_ses-<label>]`` name.

    >>> participant_of("sub-01_ses-a")
    '01'
    """
    return name.split("_")[0].removeprefix("sub-")


def check_model_name(name: str) -> str:
    """A model name, checked before any work: it becomes a folder name and a ``desc-`` label.

    Raises
    ------
    UsageError
        Not 1-64 letters, digits, ``-`` or ``_`` starting with a letter or digit (so that no
        name can point outside ``OUTPUT_DIR/models``).

    Examples
    --------
    >>> check_model_name("wmh-gmm")
    'wmh-gmm'
    """
    if not _MODEL_NAME.match(name):
        raise UsageError(f"model name {name!r}: use 1-64 letters, digits, '-' or '_', starting "
                         "with a letter or digit")
    return name


def derivative_name(subject: str, session: str | None, suffix: str,
                    extension: str = ".nii.gz", **entities: str | int | None) -> str:
    """Name of a derivative file, entities in BIDS order.

    Parameters
    ----------
    subject, session : str
        Labels without prefixes; ``session`` may be None.
    suffix : str
        BIDS suffix (``T1w``, ``mask``, ``statmap``, ``xfm``...).
    extension : str
        With the leading dot.
    **entities
        Other entities by their short name; ``from`` is spelled ``from_``. None values are left
        out.

    Examples
    --------
    >>> derivative_name("01", None, "mask", space="MNI152NLin2009aSym", res=2, desc="brain")
    'sub-01_space-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz'
    >>> derivative_name("01", "a", "xfm", ".h5", from_="T1w", to="MNI", mode="image")
    'sub-01_ses-a_from-T1w_to-MNI_mode-image_xfm.h5'
    """
    values = {"sub": subject, "ses": session}
    values.update({key.rstrip("_"): value for key, value in entities.items()})
    unknown = set(values) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}")
    parts = [f"{key}-{values[key]}" for key in ENTITY_ORDER if values.get(key) is not None]
    for part in parts:
        if not _ENTITY.match(part):
            raise ValueError(f"invalid entity {part!r}: labels are letters and digits only")
    return "_".join([*parts, suffix]) + extension


def parse_name(path: str | Path) -> dict[str, str]:
    """Entities, ``suffix`` and ``extension`` of a BIDS file name.

    Examples
    --------
    >>> parse_name("sub-01_ses-2_label-lesion_mask.nii.gz")
    {'sub': '01', 'ses': '2', 'label': 'lesion', 'suffix': 'mask', 'extension': '.nii.gz'}
    """
    name = Path(path).name
    stem, dot, rest = name.partition(".")
    parts = stem.split("_")
    parsed = dict(part.split("-", 1) for part in parts[:-1] if "-" in part)
    parsed["suffix"] = parts[-1]
    parsed["extension"] = dot + rest
    return parsed


def bids_uri(bids_dir: Path, path: Path) -> str:
    """BIDS URI of a raw file (``bids:raw:sub-01/anat/...``), as used in ``Sources``.

    The path inside the dataset is kept as it is named there: a file that is a symbolic link
    to shared storage outside the dataset still has its BIDS name.

    >>> bids_uri(Path("/data/ds"), Path("/data/ds/sub-01/anat/sub-01_T1w.nii.gz"))
    'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
    """
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(bids_dir))
    return "bids:raw:" + Path(relative).as_posix()
