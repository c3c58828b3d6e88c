"""The input dataset: its checks, its pybids index, participants.tsv and each subject's inputs.

Inputs are found through pybids (:func:`load_layout`, :func:`collect_anat`); the official
validator runs first (:mod:`bids_anomaly.bids.validation`).
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

from bids_anomaly.bids.names import LABEL_PATTERN, check_label, parse_name
from bids_anomaly.bids.validation import validate_dataset
from bids_anomaly.config import MODALITIES
from bids_anomaly.errors import (
    BadDataError,
    BIDSValidationError,
    EmptySelectionError,
    MissingInputError,
    UsageError,
    file_problem,
)

LOGGER = logging.getLogger(__name__)

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
        clear message, see :func:`bids_anomaly.imaging.diffusion.read_gradients`).
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
    official BIDS validator (:func:`bids_anomaly.bids.validation.validate_dataset`): its errors
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
        :func:`bids_anomaly.bids.validation.default_cache_dir`).
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
                 if not (value.startswith("sub-") and LABEL_PATTERN.match(value[4:]))]
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
