"""BIDS input queries (pybids) and derivative naming and writing.

This module is the one place that knows how files are named: inputs are found through pybids,
outputs are named by :func:`derivative_path`, and read back by :func:`parse_name`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bids_anomaly import __version__
from bids_anomaly.config import DIFFUSION_MAPS, MODALITIES
from bids_anomaly.errors import (
    BadDataError,
    BIDSValidationError,
    EmptySelectionError,
    MissingInputError,
    OutputError,
    UsageError,
    file_problem,
)
from bids_anomaly.validation import validate_dataset

LOGGER = logging.getLogger(__name__)

ENTITY_ORDER = (
    "sub", "ses", "task", "acq", "ce", "rec", "dir", "run",
    "from", "to", "mode", "space", "res", "model", "param", "label", "desc", "stat",
)
"""Order of entities in derivative names (BIDS order; ``stat`` last as in DESIGN.md)."""

_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$")
_LABEL = re.compile(r"^[a-zA-Z0-9]+$")
_MODEL_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,63}$")

FILTER_ENTITIES = (
    "acquisition", "ceagent", "chunk", "direction", "echo", "extension", "flip", "inv", "mt",
    "part", "proc", "reconstruction", "run", "space", "task",
)
"""pybids entities a ``--bids-filter-file`` may set (subject, session, datatype and suffix are
chosen by the tool)."""


@dataclass(frozen=True)
class DwiRun:
    """One diffusion-weighted run and its gradient files.

    Attributes
    ----------
    image : Path
        The 4D ``*_dwi.nii[.gz]``.
    bval, bvec : Path
        Its ``.bval`` and ``.bvec``: the run's own, or one it inherits from a higher level of
        the dataset; the run's own names when neither exists (reading them then fails with a
        clear message, see :func:`bids_anomaly.diffusion.read_gradients`).
    phase_encoding : str or None
        ``PhaseEncodingDirection`` of its sidecar (``j-``, ``j``, ...), None when not given.
    """

    image: Path
    bval: Path
    bvec: Path
    phase_encoding: str | None = None


@dataclass
class AnatInputs:
    """The images of one subject and session: anatomical, and diffusion runs or maps.

    Attributes
    ----------
    subject : str
        Label without ``sub-``.
    session : str or None
        Label without ``ses-``, or None for datasets without sessions.
    images : dict of str to Path
        One image per modality suffix (``T1w``, ``FLAIR``, ...).
    dwi : list of DwiRun
        Diffusion-weighted runs, fitted together (empty when none, or when maps are given).
    dwi_maps : dict of str to Path
        Diffusion maps computed by another pipeline (``--dwi-derivatives``), by channel name.
    dwi_params : tuple of str
        The diffusion maps this subject's channels include (fitted or given).
    echoes : dict of str to list of Path
        The echoes of a multi-echo image (``MEGRE``), shortest first; ``images`` holds the
        first.
    """

    subject: str
    session: str | None
    images: dict[str, Path] = field(default_factory=dict)
    echoes: dict[str, list[Path]] = field(default_factory=dict)
    dwi: list[DwiRun] = field(default_factory=list)
    dwi_maps: dict[str, Path] = field(default_factory=dict)
    dwi_params: tuple[str, ...] = ()

    @property
    def channels(self) -> list[str]:
        """Every channel this subject has: modalities (reference first), then diffusion maps."""
        return [*self.modalities, *self.dwi_params]

    @property
    def raw_files(self) -> list[Path]:
        """Every raw input file: images, dwi runs with their gradients, given maps."""
        files = list(self.images.values())
        files += [p for paths in self.echoes.values() for p in paths[1:]]
        for run in self.dwi:
            files += [run.image, run.bval, run.bvec]
        return files + list(self.dwi_maps.values())

    @property
    def reference(self) -> str:
        """The modality every other one is registered to: the first available of MODALITIES."""
        for modality in MODALITIES:
            if modality in self.images:
                return modality
        raise MissingInputError(f"{self.name}: no anatomical image")

    @property
    def modalities(self) -> list[str]:
        """Available modalities, reference first."""
        return [m for m in MODALITIES if m in self.images]

    @property
    def name(self) -> str:
        """``sub-<label>[_ses-<label>]``, for messages and workflow names."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


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
    if not _LABEL.match(label):
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


def check_bids_filters(filters: object) -> dict[str, dict]:
    """The content of a ``--bids-filter-file``, checked: suffixes and entities this tool knows.

    Raises
    ------
    UsageError
        Not an object of objects, an unknown suffix key (a typo would otherwise be silently
        ignored) or an unknown entity.
    """
    if not isinstance(filters, dict):
        raise UsageError("--bids-filter-file must hold a JSON object, e.g. "
                         '{"t1w": {"acquisition": "mprage"}}')
    known = {m.lower(): m for m in (*MODALITIES, "dwi")}
    checked = {}
    for key, query in filters.items():
        if key.lower() not in known:
            raise UsageError(f"--bids-filter-file: unknown key {key!r}; the keys are the "
                             f"lower-case suffixes {', '.join(sorted(known))}")
        if not isinstance(query, dict):
            raise UsageError(f"--bids-filter-file: the value of {key!r} must be an object of "
                             f"entities, e.g. {{\"acquisition\": \"mprage\"}}, not {query!r}")
        for entity, value in query.items():
            if entity not in FILTER_ENTITIES:
                raise UsageError(f"--bids-filter-file: {key!r} filters on unknown entity "
                                 f"{entity!r}; use {', '.join(FILTER_ENTITIES)}")
            values = value if isinstance(value, list) else [value]
            if not all(v is None or isinstance(v, (str, int, bool)) for v in values):
                raise UsageError(f"--bids-filter-file: {key}.{entity} must be a string, a "
                                 f"number, null or a list of those, not {value!r}")
        checked[key.lower()] = query
    return checked


def check_bids_dir(bids_dir: Path, skip_validation: bool = False, *,
                   cache_dir: Path | None = None, report_path: Path | None = None,
                   timeout: float | None = None) -> None:
    """Refuse a folder that is not a valid BIDS dataset, before any work.

    Cheap checks first (the folder, ``dataset_description.json``, a ``sub-*`` folder), then the
    official BIDS validator (:func:`bids_anomaly.validation.validate_dataset`): its errors
    refuse the dataset, its warnings are logged. When the validator is not installed or fails
    to run, a warning says so and the cheap checks stand alone. The validator's result is
    cached by :func:`dataset_signature` outside the dataset, which is never written to.

    Parameters
    ----------
    bids_dir : Path
        The dataset.
    skip_validation : bool
        Only refuse a missing folder (``--skip-bids-validation``).
    cache_dir : Path, optional
        Folder of cached validation results (default
        :func:`bids_anomaly.validation.default_cache_dir`).
    report_path : Path, optional
        Where to write the validator's full report when it runs.
    timeout : float, optional
        Seconds the validator may take.

    Raises
    ------
    BIDSValidationError
        The folder is missing, or has no ``dataset_description.json`` or no ``sub-*`` folder,
        or the validator found errors (unless ``skip_validation``, in which case only a
        missing folder is refused).
    """
    if not bids_dir.is_dir():
        raise BIDSValidationError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    if skip_validation:
        return
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise BIDSValidationError(
            f"{bids_dir} is not a BIDS dataset: dataset_description.json is missing "
            "(use --skip-bids-validation to try anyway)"
        )
    try:
        content = json.loads(description.read_text(encoding="utf-8"))
    except OSError as error:
        raise MissingInputError(file_problem(description, error) or f"{description}: {error}"
                                ) from error
    except ValueError as error:  # not UTF-8 (a binary file), not JSON
        raise BIDSValidationError(f"{description} is not valid JSON ({error.__class__.__name__}"
                                  f": {error}); write the dataset's description as JSON"
                                  ) from error
    if not isinstance(content, dict):
        raise BIDSValidationError(f"{description} is not a JSON object (BIDS needs Name and "
                                  "BIDSVersion in it)")
    if not any(bids_dir.glob("sub-*")):
        raise BIDSValidationError(f"{bids_dir} is not a BIDS dataset: it has no sub-* folder")
    validate_dataset(bids_dir, dataset_signature(bids_dir), exempt=UNRELEASED_SUFFIXES,
                     cache_dir=cache_dir, report_path=report_path, timeout=timeout)


UNRELEASED_SUFFIXES = re.compile(r"^/sub-[^/]+/(ses-[^/]+/)?anat/[^/]+_swi\.(nii|nii\.gz|json)$")
"""Files indexed although the released BIDS schema does not know their suffix: SWI images
(``*_swi``, BEP004), which the schema-based validation of pybids would drop."""


def dataset_signature(bids_dir: Path, validate: bool = True) -> str:
    """A digest of the dataset's file names, sizes and times (and how it is indexed).

    The pybids index cached under this name is reused only while the dataset is unchanged: a
    subject added, removed or rewritten gives a new index.
    """
    digest = hashlib.sha256(f"pybids {validate} {UNRELEASED_SUFFIXES.pattern}".encode())
    for folder, subfolders, files in os.walk(bids_dir):
        subfolders[:] = sorted(d for d in subfolders
                               if d not in ("derivatives", "code", "sourcedata", ".git"))
        for name in sorted(files):
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except OSError:  # a broken symbolic link: pybids will say so
                continue
            digest.update(f"{os.path.relpath(path, bids_dir)}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_layout(bids_dir: Path, database_dir: Path, validate: bool = True):
    """Index the dataset with pybids, reusing an index cached in the work directory.

    Nothing is written here: a new index lives in memory until :func:`save_layout` (called
    once the selection is known to be valid, so a run that selects nobody leaves no trace).

    Parameters
    ----------
    bids_dir : Path
        The raw dataset (never written to).
    database_dir : Path
        Folder of pybids' SQLite indexes, one per :func:`dataset_signature`.
    validate : bool
        Let pybids check file names against the BIDS specification.

    Returns
    -------
    bids.layout.BIDSLayout
    """
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    cached = database_dir / dataset_signature(bids_dir, validate)
    indexer = BIDSLayoutIndexer(validate=validate, ignore=[re.compile(r"^/derivatives/"),
                                                          re.compile(r"^/code/"),
                                                          re.compile(r"^/sourcedata/")],
                                force_index=[UNRELEASED_SUFFIXES])
    try:
        layout = BIDSLayout(str(bids_dir), validate=validate, indexer=indexer,
                            database_path=str(cached) if cached.is_dir() else None)
    except Exception as error:  # pybids raises several types for a broken dataset
        raise BIDSValidationError(f"pybids cannot index {bids_dir}: {error}") from error
    return layout


def save_layout(layout, bids_dir: Path, database_dir: Path, validate: bool = True) -> None:
    """Keep a new pybids index in the work directory (see :func:`load_layout`)."""
    cached = database_dir / dataset_signature(bids_dir, validate)
    if not cached.is_dir():
        cached.parent.mkdir(parents=True, exist_ok=True)
        layout.save(str(cached))


def read_participants(bids_dir: Path) -> pd.DataFrame:
    """Read ``participants.tsv`` with labels (no ``sub-``) in a ``label`` column.

    Raises
    ------
    MissingInputError
        No such file, or one this user cannot read.
    BadDataError
        Not a readable table, or malformed participant ids.
    """
    path = bids_dir / "participants.tsv"
    if not os.path.lexists(path):
        raise MissingInputError(f"{path} is missing, so participants cannot be filtered by it")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False,
                            quoting=csv.QUOTE_NONE, encoding="utf-8")
    except OSError as error:
        raise MissingInputError(file_problem(path, error) or f"{path}: {error}") from error
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise BadDataError(f"{path} is not a readable tab-separated table "
                           f"({error.__class__.__name__}: {str(error).strip()})") from error
    if "participant_id" not in table.columns:
        raise BIDSValidationError(f"{path} has no participant_id column")
    malformed = [value for value in table["participant_id"]
                 if not (value.startswith("sub-") and _LABEL.match(value[4:]))]
    if malformed:
        raise BadDataError(f"{path}: participant_id {malformed[0]!r} is not sub-<label> "
                           f"(letters and digits){' (and more)' if len(malformed) > 1 else ''}")
    table["label"] = table["participant_id"].str.removeprefix("sub-")
    return table


def participants_if_any(bids_dir: Path) -> pd.DataFrame | None:
    """:func:`read_participants`, or None when the dataset has no ``participants.tsv``.

    A file that is there but cannot be read is an error, not an absence.
    """
    if not os.path.lexists(Path(bids_dir) / "participants.tsv"):
        return None
    return read_participants(bids_dir)


def participant_rows(bids_dir: Path) -> dict[str, dict[str, str]]:
    """Each participant's participants.tsv row (column to value), by label; {} without one."""
    table = participants_if_any(bids_dir)
    if table is None:
        return {}
    columns = [c for c in table.columns if c != "label"]
    return {row["label"]: {c: row[c] for c in columns}
            for row in table.drop_duplicates("label").to_dict("records")}


def filter_participants(table: pd.DataFrame, filters: list[str]) -> list[str]:
    """Labels of the rows of participants.tsv matching every ``column=value`` filter."""
    selected = pd.Series(True, index=table.index)
    for expression in filters:
        column, sep, value = expression.partition("=")
        if not sep:
            raise UsageError(f"--train-filter {expression!r}: expected COLUMN=VALUE")
        if column not in table.columns:
            raise UsageError(
                f"--train-filter {expression!r}: participants.tsv has no column {column!r} "
                f"(columns: {', '.join(c for c in table.columns if c != 'label')})"
            )
        selected &= table[column] == value
    return table.loc[selected, "label"].tolist()


def select_participants(layout, labels: list[str], bids_dir: Path,
                        filters: list[str] | None = None) -> list[str]:
    """Participants to process: the labels asked for (all by default), narrowed by filters.

    Raises
    ------
    EmptySelectionError
        A label is unknown, or the selection is empty.
    """
    available = sorted(layout.get_subjects())
    wanted = list(dict.fromkeys(check_label(label, "participant") for label in labels))
    wanted = wanted or available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise EmptySelectionError(
            f"unknown participant label(s): {', '.join(unknown)}; the dataset has "
            f"{', '.join(available[:20])}{' ...' if len(available) > 20 else ''}"
        )
    if filters:
        matching = set(filter_participants(read_participants(bids_dir), filters))
        wanted = [label for label in wanted if label in matching]
    if not wanted:
        raise EmptySelectionError("the participant labels and filters selected nobody")
    return wanted


def collect_anat(layout, subject: str, sessions: list[str] | None = None,
                 bids_filters: dict | None = None, dwi_params: tuple[str, ...] = (),
                 dwi_derivatives: Path | None = None) -> list[AnatInputs]:
    """Inputs of one subject, one :class:`AnatInputs` per session.

    When several images share a suffix (runs, acquisitions, contrast agents), images without a
    ``ce-`` entity come first, then the alphabetical order of their names; the choice is logged.
    ``bids_filters`` maps a lower-case suffix (``t1w``, ``flair``, ``dwi``) to extra pybids
    entities. Every ``dwi`` run of a session is kept (runs and phase-encoding directions are
    fitted together) when ``dwi_params`` asks for diffusion maps; with ``dwi_derivatives``, the
    maps of that derivative dataset are used instead (:func:`find_dwi_maps`).
    """
    from bids.layout import Query

    bids_filters = {key.lower(): value for key, value in (bids_filters or {}).items()}
    subject_sessions = layout.get_sessions(subject=subject) or [None]
    if sessions:
        subject_sessions = [s for s in subject_sessions if s in sessions]
    collected = []
    for session in subject_sessions:
        inputs = AnatInputs(subject=subject, session=session)
        where = {"subject": subject,
                 "session": session if session is not None else Query.NONE}
        for modality in MODALITIES:
            files = layout.get(**where, datatype="anat", suffix=modality,
                               extension=[".nii", ".nii.gz"],
                               **bids_filters.get(modality.lower(), {}))
            # the magnitude of complex-valued acquisitions (part-mag), never the phase
            files = [f for f in files if f.get_entities().get("part", "mag") == "mag"]
            if not files:
                continue
            files.sort(key=lambda f: ("ce" in f.get_entities(), f.filename))
            if modality == "MEGRE":
                echoes = _echoes_of(files)
                inputs.echoes[modality] = [Path(f.path) for f in echoes]
                files = echoes + [f for f in files if f not in echoes]
            elif len(files) > 1:
                LOGGER.info("%s: %d %s images, using %s", inputs.name, len(files), modality,
                            files[0].filename)
            inputs.images[modality] = Path(files[0].path)
        if dwi_params and dwi_derivatives is not None:
            inputs.dwi_maps = find_dwi_maps(dwi_derivatives, subject, session, dwi_params)
            inputs.dwi_params = tuple(p for p in dwi_params if p in inputs.dwi_maps)
        elif dwi_params:
            files = layout.get(**where, datatype="dwi", suffix="dwi",
                               extension=[".nii", ".nii.gz"], **bids_filters.get("dwi", {}))
            inputs.dwi = [DwiRun(Path(f.path), *_gradient_files(layout, Path(f.path)),
                                 phase_encoding=f.get_metadata().get("PhaseEncodingDirection"))
                          for f in sorted(files, key=lambda f: f.filename)]
            inputs.dwi_params = tuple(dwi_params) if inputs.dwi else ()
        collected.append(inputs)
    return collected


def _echoes_of(files: list) -> list:
    """The echoes of the first multi-echo acquisition among ``files`` (pybids files).

    They are the files that differ from the first only by their ``echo`` entity, in echo order.
    """

    def others(f) -> dict:
        return {k: v for k, v in f.get_entities().items() if k not in ("echo", "extension")}

    first = others(files[0])
    echoes = [f for f in files if others(f) == first]
    echoes.sort(key=lambda f: int(f.get_entities().get("echo", 0)))
    if len(echoes) < len(files):
        LOGGER.info("%d MEGRE images; using the %d echoes of %s", len(files), len(echoes),
                    echoes[0].filename)
    return echoes


def group_dwi_runs(runs: list[DwiRun]) -> list[list[DwiRun]]:
    """Runs by phase-encoding direction, in order of appearance: the runs fitted together.

    Runs of one direction share their susceptibility distortions; runs of opposite directions
    do not, and are fitted apart (runs without ``PhaseEncodingDirection`` form one group).
    """
    groups: dict[str, list[DwiRun]] = {}
    for run in runs:
        groups.setdefault(run.phase_encoding or "", []).append(run)
    return list(groups.values())


def _gradient_files(layout, image: Path) -> tuple[Path, Path]:
    """The ``.bval`` and ``.bvec`` of a dwi run, by the inheritance principle.

    pybids finds the nearest gradient file; one whose entities are not all the run's (the
    file of another run or direction) is not taken. Without one, the run's own names are
    returned, and reading them fails with a message naming them.
    """
    own = parse_name(image)
    stem = image.name[: -len(own["extension"])]
    found = []
    for extension in (".bval", ".bvec"):
        nearest = layout.get_nearest(str(image), suffix="dwi", extension=extension, all_=True)
        candidates = [Path(c) for c in (nearest or [])]
        candidates = [c for c in candidates if all(own.get(key) == value for key, value in
                                                   parse_name(c).items()
                                                   if key not in ("suffix", "extension"))]
        found.append(candidates[0] if candidates else image.with_name(stem + extension))
    return found[0], found[1]


DWI_MAP_PATTERN = "*_param-{param}_dwimap.nii*"
"""How diffusion maps of another pipeline are found (BEP016 names, any model and space)."""


def find_dwi_maps(deriv_dir: Path, subject: str, session: str | None,
                  params: tuple[str, ...]) -> dict[str, Path]:
    """Diffusion maps of one subject/session in another pipeline's derivatives.

    Maps are looked for as ``sub-<label>/[ses-<label>/]dwi/*_param-<fa|md|ad|rd>_dwimap.nii[.gz]``
    (BEP016 names, as QSIPrep's reconstruction writes them). When several match (spaces,
    models), names with ``model-tensor`` come first, then the alphabetical order; the choice is
    logged. A ``*_dwiref.nii[.gz]`` in the same folder is returned as ``dwiref`` (the image the
    maps are registered with; without it, MD or the first map is used).
    """
    folder = Path(deriv_dir) / f"sub-{subject}"
    if session:
        folder = folder / f"ses-{session}"
    folder = folder / "dwi"
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_"
    maps = {}
    for param in params:
        matches = sorted(folder.glob(prefix + DWI_MAP_PATTERN.format(param=param.lower())),
                         key=lambda p: (parse_name(p).get("model") not in ("tensor", "dti"),
                                        p.name))
        if matches:
            if len(matches) > 1:
                LOGGER.info("sub-%s: %d %s maps in %s, using %s", subject, len(matches), param,
                            folder, matches[0].name)
            maps[param] = matches[0]
    references = sorted(folder.glob(prefix + "*_dwiref.nii*"))
    if maps and references:
        maps["dwiref"] = references[0]
    return maps


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


def derivative_path(output_dir: Path, subject: str, session: str | None, suffix: str,
                    extension: str = ".nii.gz", datatype: str = "anat",
                    **entities: str | int | None) -> Path:
    """Full path of a derivative under ``output_dir`` (see :func:`derivative_name`).

    Figures of every session go to ``sub-<label>/figures/``, next to ``sub-<label>.html``.
    """
    folder = Path(output_dir) / f"sub-{subject}"
    if session and datatype != "figures":
        folder = folder / f"ses-{session}"
    return folder / datatype / derivative_name(subject, session, suffix, extension, **entities)


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


def model_dir(output_dir: Path, model_name: str) -> Path:
    """The folder of a trained model, ``OUTPUT_DIR/models/model-<name>`` (name checked)."""
    return models_dir(output_dir) / f"model-{check_model_name(model_name)}"


def model_names(output_dir: Path) -> list[str]:
    """Names of the trained models under ``OUTPUT_DIR/models``."""
    return sorted(p.name.removeprefix("model-") for p in models_dir(output_dir).glob("model-*"))


SPLIT_MODEL = re.compile(r"^(?P<family>.+)-split(?P<index>[0-9]{2,})$")
"""Names of the models of one ``train --splits`` run: ``<family>-split01``, ..."""


def split_models(output_dir: Path, family: str) -> list[str]:
    """The names of the models trained by ``train --splits`` as ``family``, in split order."""
    names = []
    for name in model_names(output_dir):
        match = SPLIT_MODEL.match(name)
        if match and match["family"] == family:
            names.append((int(match["index"]), name))
    return [name for _, name in sorted(names)]


def model_cards(output_dir: Path) -> list[Path]:
    """The ``model.json`` of every trained model."""
    return sorted(models_dir(output_dir).glob("model-*/model.json"))


def model_desc(model_name: str) -> str:
    """The ``desc-`` label of a model's outputs: its name without non-alphanumerics.

    >>> model_desc("wmh-gmm")
    'wmhgmm'
    """
    desc = re.sub(r"[^a-zA-Z0-9]", "", model_name)
    if not desc:
        raise UsageError(f"model name {model_name!r} needs at least one letter or digit")
    return desc


GENERATED_BY = "bids_anomaly"
"""``GeneratedBy`` name of this tool's derivative datasets: how it knows its own outputs."""


def _dataset_kind(description: object) -> str:
    """What a ``dataset_description.json`` says its dataset is, for messages."""
    if not isinstance(description, dict):
        return "a dataset_description.json that is not a JSON object"
    name = description.get("Name")
    kind = description.get("DatasetType", "raw")
    named = f" {str(name)[:60]!r}" if name else ""
    if kind != "derivative":
        return f"the {kind} BIDS dataset{named}"
    makers = [str(g.get("Name")) for g in description.get("GeneratedBy") or []
              if isinstance(g, dict) and g.get("Name")]
    return (f"the derivatives{named} of {', '.join(makers)}" if makers
            else f"the derivative dataset{named}")


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output folder that holds another dataset, before anything is written.

    An empty or new folder, or an earlier output of this tool (its ``dataset_description.json``
    says ``GeneratedBy`` bids_anomaly), is fine. A folder whose ``dataset_description.json`` is
    anything else (a raw dataset, another pipeline's derivatives, unreadable), or that holds a
    dataset without one (``participants.tsv``, ``sub-*`` folders, ``.bidsignore``), would have
    its description replaced and files added: it is refused.

    Raises
    ------
    OutputError
        The folder cannot be used (exit 73), in one line naming it and what it holds.
    """
    output_dir = Path(output_dir)
    advice = ("bids_anomaly writes only into an empty or new folder or into its own earlier "
              "output: choose another OUTPUT_DIR")
    try:
        exists = output_dir.exists()
        if exists and not output_dir.is_dir():
            raise OutputError(f"OUTPUT_DIR {output_dir} is a file, not a folder; {advice}")
        description = output_dir / "dataset_description.json"
        if exists and description.exists():
            try:
                content = json.loads(description.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise OutputError(f"OUTPUT_DIR {output_dir} holds a dataset_description.json "
                                  f"that cannot be read ({error.__class__.__name__}); "
                                  f"{advice}") from error
            ours = (isinstance(content, dict) and content.get("DatasetType") == "derivative"
                    and any(isinstance(g, dict) and g.get("Name") == GENERATED_BY
                            for g in content.get("GeneratedBy") or []))
            if not ours:
                raise OutputError(f"OUTPUT_DIR {output_dir} holds {_dataset_kind(content)}, "
                                  f"not an output of bids_anomaly; {advice}")
        elif exists:
            found = [name for name in ("participants.tsv", ".bidsignore")
                     if (output_dir / name).exists()]
            found += sorted(p.name for p in output_dir.glob("sub-*") if p.is_dir())[:1]
            if found:
                raise OutputError(f"OUTPUT_DIR {output_dir} holds a dataset without "
                                  f"dataset_description.json ({', '.join(found)}), not an "
                                  f"output of bids_anomaly; {advice}")
    except OSError as error:  # too long a name, a forbidden parent
        raise OutputError(f"OUTPUT_DIR {output_dir} cannot be used: {error.strerror or error}"
                          ) from error
    try:
        limit = os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # not said: Linux's
        limit = 4096
    length = len(os.fsencode(output_dir))
    if length + OUTPUT_NAMES_MAX > limit:
        raise OutputError(f"OUTPUT_DIR {output_dir} is {length} bytes long: the files written "
                          f"under it need up to {OUTPUT_NAMES_MAX} more, beyond the system's "
                          f"limit of {limit}; choose a shorter OUTPUT_DIR")


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


OUTPUT_NAMES_MAX = 400
"""Room the output folder must leave below :data:`PATH_MAX` for what is written under it
(the work folder's step folders, derivative names) within the system's longest path."""


def write_dataset_description(output_dir: Path, bids_dir: Path | None) -> Path:
    """Write the derivative dataset's ``dataset_description.json`` and ``.bidsignore``."""
    import os

    output_dir.mkdir(parents=True, exist_ok=True)
    generated_by = {"Name": GENERATED_BY, "Version": __version__,
                    "CodeURL": "https://github.com/bids-anomaly/bids_anomaly"}
    container = os.environ.get("BIDS_ANOMALY_CONTAINER")
    if container:
        generated_by["Container"] = {"Type": container, "Tag": __version__}
    description = {
        "Name": "bids_anomaly derivatives: preprocessed images and anomaly maps",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
    }
    if bids_dir is not None:
        # sidecars cite their sources as bids:raw:... URIs; DatasetLinks says where raw is,
        # relative to this dataset (no absolute host path is recorded)
        raw = os.path.relpath(Path(bids_dir).absolute(), Path(output_dir).absolute())
        description["SourceDatasets"] = [{"URL": "bids:raw:"}]
        description["DatasetLinks"] = {"raw": Path(raw).as_posix()}
    path = output_dir / "dataset_description.json"
    update_text(path, json.dumps(description, indent=2) + "\n")
    ignored = ["logs/", "work/", "models/", "group/", "figures/", "*.html", "*_clusters.tsv",
               "*_regions.tsv", "*_qc.tsv", "*_microbleeds.tsv"]
    update_text(output_dir / ".bidsignore", "\n".join(ignored) + "\n")
    return path


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar of a derivative (``x_T1w.nii.gz`` -> ``x_T1w.json``).

    >>> sidecar_path(Path("sub-01_desc-x_clusters.tsv")).name
    'sub-01_desc-x_clusters.json'
    """
    name = Path(path).name
    for extension in (".nii.gz", ".nii", ".h5", ".mat", ".tsv"):
        if name.endswith(extension):
            name = name[: -len(extension)]
            break
    return Path(path).with_name(name + ".json")


def read_sidecar(path: Path) -> dict:
    """The metadata of a derivative (empty when it has no sidecar)."""
    sidecar = sidecar_path(path)
    return json.loads(sidecar.read_text()) if sidecar.is_file() else {}


def write_sidecar(image_path: Path, metadata: dict) -> Path:
    """Write the JSON sidecar of a derivative next to it."""
    path = sidecar_path(image_path)
    update_text(path, json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    return path


def update_text(path: Path, content: str) -> Path:
    """Write ``content`` to ``path`` unless it holds it already (its time then stays)."""
    path = Path(path)
    if not (path.is_file() and path.read_text(encoding="utf-8") == content):
        path.write_text(content, encoding="utf-8")
    return path


# The derivatives this tool writes. Writers (the datasinks) and readers (train, group) both
# name files through these functions, so a name is spelled in one place only.

def preproc_spec(space: str, res: int, modality: str) -> dict:
    """Naming of a channel in template space.

    A preprocessed, normalised image, or a diffusion map (``dwi/*_model-tensor_param-fa_dwimap``,
    BEP016 names).
    """
    if modality in DIFFUSION_MAPS:
        return {"suffix": "dwimap", "datatype": "dwi", "space": space, "res": res,
                "model": "tensor", "param": modality.lower()}
    return {"suffix": modality, "space": space, "res": res, "desc": "preproc"}


def dwiref_spec(space: str, res: int) -> dict:
    """Naming of the mean b = 0 image of the diffusion runs in template space."""
    return {"suffix": "dwiref", "datatype": "dwi", "space": space, "res": res}


def brain_mask_spec(space: str, res: int) -> dict:
    """Naming of the brain mask in template space."""
    return {"suffix": "mask", "space": space, "res": res, "desc": "brain"}


def transform_spec(source: str, target: str, extension: str = ".h5") -> dict:
    """Naming of a transform from ``source`` space/modality to ``target``."""
    return {"suffix": "xfm", "extension": extension, "from_": source, "to": target,
            "mode": "image"}


def qc_spec() -> dict:
    """Naming of the one-row table of registration QC metrics of a subject/session."""
    return {"suffix": "qc", "extension": ".tsv", "desc": "registration"}


def figure_spec(kind: str, modality: str, space: str | None = None) -> dict:
    """Naming of a QC figure: ``kind`` is brainmask, registration or coregistration."""
    return {"suffix": modality, "extension": ".svg", "datatype": "figures", "space": space,
            "desc": kind}


def anomaly_figure_spec(space: str, res: int, desc: str) -> dict:
    """Naming of a model's anomaly overlay figure (three planes through the peak)."""
    return {"suffix": "statmap", "extension": ".png", "datatype": "figures", "space": space,
            "res": res, "desc": desc, "stat": "anomaly"}


def lightbox_figure_spec(space: str, res: int, desc: str, truth: bool = False) -> dict:
    """Naming of a model's lightbox figure (axial slices through every cluster).

    With ``truth`` (drawn by the group level with the ground truth outlined), ``label-truth``:
    a file of its own, so that the participant level's figure, recorded as done, is left as
    it was.
    """
    return {"suffix": "lightbox", "extension": ".png", "datatype": "figures", "space": space,
            "res": res, "desc": desc, "label": "truth" if truth else None}


def subject_report_path(output_dir: Path, subject: str) -> Path:
    """Path of a participant's HTML page, ``sub-<label>.html`` at the derivatives' root."""
    return Path(output_dir) / f"sub-{subject}.html"


def anomaly_map_spec(space: str, res: int | None, desc: str) -> dict:
    """Naming of a model's continuous anomaly map.

    ``space`` is the template, or the reference modality (``T1w``) for the native-space copy,
    which has no ``res-`` entity.
    """
    return {"suffix": "statmap", "space": space, "res": res, "desc": desc, "stat": "anomaly"}


def clusters_spec(space: str, res: int, desc: str) -> dict:
    """Entities of a model's clusters table (``desc-<model>_clusters.tsv``)."""
    return {"suffix": "clusters", "extension": ".tsv", "space": space, "res": res,
            "desc": desc}


def regions_spec(space: str, res: int, desc: str) -> dict:
    """Entities of a model's regional burden table (``desc-<model>_regions.tsv``)."""
    return {"suffix": "regions", "extension": ".tsv", "space": space, "res": res,
            "desc": desc}


def microbleeds_spec(space: str, res: int, desc: str) -> dict:
    """Entities of a model's microbleed candidates table (``desc-<model>_microbleeds.tsv``)."""
    return {"suffix": "microbleeds", "extension": ".tsv", "space": space, "res": res,
            "desc": desc}


def microbleed_mask_spec(space: str, res: int | None, desc: str) -> dict:
    """Naming of a model's microbleed candidates mask, one label per candidate kept."""
    return {"suffix": "mask", "space": space, "res": res, "label": "microbleed", "desc": desc}


def residual_map_spec(space: str, res: int, desc: str, channel: str) -> dict:
    """Entities of a model's residual map of one channel (``desc-<model><channel>``)."""
    return {"suffix": "statmap", "space": space, "res": res, "desc": f"{desc}{channel}",
            "stat": "residual"}


def normative_map_spec(space: str, res: int, desc: str, channel: str, stat: str) -> dict:
    """Entities of a covariate model's per-channel ``z`` or ``centile`` map.

    ``desc-<model><channel>_stat-<stat>_statmap``.
    """
    return {"suffix": "statmap", "space": space, "res": res, "desc": f"{desc}{channel}",
            "stat": stat}


def norms_spec(space: str, res: int, desc: str) -> dict:
    """Entities of a covariate model's regional norms table (``desc-<model>_norms.tsv``)."""
    return {"suffix": "norms", "extension": ".tsv", "space": space, "res": res, "desc": desc}


def probseg_spec(space: str, res: int, desc: str, label: str) -> dict:
    """Naming of a model's class posterior map (``label-<class>_desc-<model>_probseg``)."""
    return {"suffix": "probseg", "space": space, "res": res, "label": label, "desc": desc}


def anomaly_mask_spec(space: str, res: int | None, desc: str) -> dict:
    """Naming of a model's thresholded anomaly mask (``res`` None: native space)."""
    return {"suffix": "mask", "space": space, "res": res, "label": "anomaly", "desc": desc}


def subject_derivatives(output_dir: Path, subject: str, session: str | None) -> list[Path]:
    """Every derivative of one subject/session: its images, tables, sidecars and figures."""
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_"
    folder = Path(output_dir) / f"sub-{subject}"
    base = folder / f"ses-{session}" if session else folder
    return sorted(p for d in (base / "anat", base / "dwi", folder / "figures") if d.is_dir()
                  for p in d.glob(prefix + "*") if p.is_file())


def spec_path(output_dir: Path, subject: str, session: str | None, spec: dict) -> Path:
    """Path of the derivative described by one of the ``*_spec`` functions."""
    return derivative_path(output_dir, subject, session, **spec)


GROUP_TABLES = {
    "subjects": "anomaly burden per subject/session",
    "regions": "regional burden per subject/session, tissue class and atlas region",
    "evaluation": "voxel- and lesion-wise metrics per subject against the ground truth",
    "evaluationsummary": "evaluation means per group with bootstrap confidence intervals",
    "statistics": "patients vs controls: AUROC of each burden measure, effect sizes",
    "microbleeds": "microbleed detection per subject against the ground truth: sensitivity, "
                   "false positives, F1, count difference at the calibrated threshold",
    "froc": "microbleed FROC curve: sensitivity against false positives per subject",
    "norms": "models with covariates: every subject's regional values against its norms "
             "(expected value, z-score, centile) with its participants.tsv columns",
    "splits": "train --splits runs: per split, patients vs held-out controls by the share of "
              "abnormal voxels in the brain (AUROC, best g-mean), with median and IQR",
    "splitregions": "the same per split and region (tissues, atlas regions)",
    "splitburden": "every subject's share of abnormal voxels per split and region",
}
"""Tables of the group level, by suffix (``group/desc-<model>_<suffix>.tsv``)."""


def group_table_path(output_dir: Path, desc: str, suffix: str) -> Path:
    """Path of a group-level table of one model (see :data:`GROUP_TABLES`)."""
    if suffix not in GROUP_TABLES:
        raise ValueError(f"unknown group table {suffix!r}")
    return Path(output_dir) / "group" / f"desc-{desc}_{suffix}.tsv"


def run_config_path(output_dir: Path, level: str, when: float | None = None) -> Path:
    """Where a run's settings are kept: ``logs/<YYYYmmdd-HHMMSS>_<level>/bids_anomaly.toml``.

    One folder per run, never overwritten (a second run in the same second gets a suffix), so
    that any earlier run can be repeated with ``--config-file``.
    """
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    folder = Path(output_dir) / "logs" / f"{stamp}_{level}"
    number = 1
    while folder.exists():
        number += 1
        folder = Path(output_dir) / "logs" / f"{stamp}_{level}-{number}"
    return folder / "bids_anomaly.toml"


def group_figures_dir(output_dir: Path) -> Path:
    """Folder of the group report's figures."""
    return Path(output_dir) / "group" / "figures"


ANOMALY_MAPS = "sub-*/**/anat/*_stat-anomaly_statmap.nii.gz"
"""Where the group level finds every model's anomaly maps (a glob under OUTPUT_DIR)."""


def anomaly_maps(output_dir: Path) -> list[Path]:
    """Every anomaly map of the derivative dataset, template space and native."""
    return sorted(Path(output_dir).glob(ANOMALY_MAPS))


def subject_anomaly_maps(output_dir: Path, subject: str, session: str | None,
                         space: str) -> list[Path]:
    """The template-space anomaly maps of one subject/session, every model."""
    anat = spec_path(output_dir, subject, session, qc_spec()).parent
    name = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    return sorted(anat.glob(f"{name}_space-{space}_res-*_stat-anomaly_statmap.nii.gz"))


def transforms_to(anat_dir: Path, prefix: str, target: str, extension: str = ".h5"
                  ) -> list[Path]:
    """The stored transforms of one subject/session (``prefix``) to ``target``."""
    return sorted(Path(anat_dir).glob(f"{prefix}_from-*_to-{target}_mode-image_xfm{extension}"))


# Folders of the output and work directories (one place for each).

def log_dir(output_dir: Path) -> Path:
    """Logs, crash files and each run's settings."""
    return Path(output_dir) / "logs"


def models_dir(output_dir: Path) -> Path:
    """Where trained models are written (``model-<name>/`` each)."""
    return Path(output_dir) / "models"


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
    """Record of a finished subject/session run (:mod:`bids_anomaly.completion`)."""
    return Path(work_dir) / "completed" / f"{name}_{key[:24]}.json"


def group_record_path(work_dir: Path) -> Path:
    """What the last group run read and wrote (its outputs are kept while that holds)."""
    return Path(work_dir) / "group" / "outputs.json"


def group_report_path(output_dir: Path) -> Path:
    """Path of the group report."""
    return Path(output_dir) / "group" / "report.html"


def bids_uri(bids_dir: Path, path: Path) -> str:
    """BIDS URI of a raw file (``bids:raw:sub-01/anat/...``), as used in ``Sources``.

    The path inside the dataset is kept as it is named there: a file that is a symbolic link
    to shared storage outside the dataset still has its BIDS name.

    >>> bids_uri(Path("/data/ds"), Path("/data/ds/sub-01/anat/sub-01_T1w.nii.gz"))
    'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
    """
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(bids_dir))
    return "bids:raw:" + Path(relative).as_posix()
