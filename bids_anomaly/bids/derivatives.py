"""The derivative dataset: where every output goes, its description, sidecars and checks.

Each output is described by a spec (its entities and suffix, e.g. :func:`anomaly_map_spec`)
and placed by :func:`derivative_path`; :func:`check_output_dir` refuses a folder that holds
another dataset.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from bids_anomaly import __version__
from bids_anomaly.bids.names import check_model_name, derivative_name
from bids_anomaly.config import DIFFUSION_MAPS
from bids_anomaly.errors import OutputError, UsageError


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
    # what the BIDS specification does not name yet (tables, transforms, statistical maps,
    # the report viewer), so that the official validator accepts the rest (folders without
    # their trailing slash: bids-validator 3 ignores ``work/`` or ``figures/`` in no folder)
    ignored = ["logs", "work", "models", "group", "figures/", "**/figures", VIEWER_DIR,
               f"{VIEWER_DIR}/", "*.html",
               *(f"*_{suffix}.{extension}" for suffix in ("clusters", "regions", "qc",
                                                          "microbleeds", "norms", "change")
                 for extension in ("tsv", "json")),
               "*_xfm.*", "*_statmap.*"]
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


VIEWER_DIR = "viewer"
"""Folder at the derivatives' root with the participant pages' viewer library (not BIDS)."""


def viewer_library_path(output_dir: Path) -> Path:
    """Path of the NiiVue viewer library the participant pages share, written once per dataset.

    ``viewer/niivue.js`` at the derivatives' root (listed in ``.bidsignore``), loaded by the
    pages with a relative ``<script src>``, so that a copied output folder still opens offline.
    """
    return Path(output_dir) / VIEWER_DIR / "niivue.js"


def viewer_volume_path(volume: Path) -> Path:
    """Path of a volume's copy for the participant pages' viewers, as JavaScript.

    The NIfTI ``sub-<label>/[ses-<label>/]<datatype>/<name>.nii.gz`` becomes
    ``sub-<label>/[ses-<label>/]figures/<name>.js`` (``figures/`` is in ``.bidsignore``):
    browsers refuse ``fetch`` of local files, but load ``<script src>`` ones.
    """
    volume = Path(volume)
    name = re.sub(r"\.nii(\.gz)?$", "", volume.name)
    return volume.parent.parent / "figures" / f"{name}.js"


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


def change_map_spec(space: str, res: int | None, earlier: str) -> dict:
    """Naming of a session's lesion-change map since session ``earlier``.

    ``desc-since<earlier>_stat-change_statmap`` of the later session; ``space`` is the
    template, or the lesion contrast (``FLAIR``) without ``res-`` on the later session's raw
    grid.
    """
    return {"suffix": "statmap", "space": space, "res": res, "desc": f"since{earlier}",
            "stat": "change"}


def change_mask_spec(space: str, res: int | None, earlier: str) -> dict:
    """Naming of a session's changed voxels since session ``earlier`` (above the threshold)."""
    return {"suffix": "mask", "space": space, "res": res, "label": "change",
            "desc": f"since{earlier}"}


def change_dseg_spec(space: str, res: int | None, earlier: str) -> dict:
    """Naming of a session's lesion-change classes since ``earlier``.

    1 new, 2 enlarging, 3 shrinking (:data:`~bids_anomaly.longitudinal.change.CLASSES`).
    """
    return {"suffix": "dseg", "space": space, "res": res, "desc": f"since{earlier}"}


def change_clusters_spec(earlier: str) -> dict:
    """Entities of a session's table of changed lesions since ``earlier``."""
    return {"suffix": "clusters", "extension": ".tsv", "desc": f"since{earlier}"}


def change_figure_spec(earlier: str) -> dict:
    """Naming of a session pair's before / after / change lightbox."""
    return {"suffix": "lightbox", "extension": ".png", "datatype": "figures",
            "desc": f"since{earlier}", "stat": "change"}


def change_summary_spec() -> dict:
    """Entities of a subject's table of lesion change per session pair (no ``ses-``)."""
    return {"suffix": "change", "extension": ".tsv", "desc": "lesions"}


CHANGE_MAPS = "sub-*/ses-*/anat/*_res-*_desc-since*_stat-change_statmap.nii.gz"
"""Where the group level finds the template-space change maps (a glob under OUTPUT_DIR)."""


def change_maps(output_dir: Path) -> list[Path]:
    """Every template-space lesion-change map of the derivative dataset."""
    return sorted(Path(output_dir).glob(CHANGE_MAPS))


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
    "changes": "participant --longitudinal: new, enlarging and shrinking lesions (counts, "
               "volumes) per subject and session pair",
    "changeevaluation": "the change maps against change ground truth (label-change masks), "
                        "voxel- and lesion-wise, per subject and session pair",
    "changesummary": "change evaluation and counts: means per group",
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


def group_report_path(output_dir: Path) -> Path:
    """Path of the group report."""
    return Path(output_dir) / "group" / "report.html"
