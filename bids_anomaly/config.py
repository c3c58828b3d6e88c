"""One typed settings object for a run, written to the work directory as TOML for provenance."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from bids_anomaly import __version__

MODALITIES = ("T1w", "FLAIR", "T2w", "PDw")
"""Anatomical suffixes the tool reads, in order of preference for the reference image."""

DEFAULT_FPR = 0.001
"""Default voxel-wise false-positive rate for a model's calibrated threshold.

One healthy brain voxel in a thousand is flagged: about 240 voxels (2 ml) per healthy brain at
2 mm, a level at which lesions of a few millilitres stand out.
"""

SINGLE_SUBJECT_TRIM = 0.02
"""Default trimmed fraction when a mixture is fitted on one subject's own brain.

Heavy-tailed components otherwise absorb the subject's lesions: on a generated subject whose
lesion is 3 % of a tissue, an untrimmed one-component MMST gave the lesion p-values near 1e-3
(not significant among 4,000 voxels), trimming 2 % gave 4e-6 to 1e-4.
"""

DEEP_OPTIONS = ("mode", "epochs", "batch_size", "patch_size", "learning_rate", "width", "latent",
                "patience", "residual", "precision", "num_workers", "tensorboard")
"""Settings of the deep models; None means the model's own default (``models.reconstruction``,
``training.engine.EngineOptions``)."""


@dataclass
class Settings:
    """Everything a run depends on; built from the command line by ``cli.parser``."""

    bids_dir: Path | None
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    bids_filters: dict = field(default_factory=dict)
    skip_bids_validation: bool = False
    nprocs: int = field(default_factory=lambda: os.cpu_count() or 1)
    omp_nthreads: int = 1
    mem_gb: float | None = None
    device: str = "auto"
    random_seed: int = 0
    model: str | None = None
    model_type: str = "normative"
    model_name: str | None = None
    train_filter: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    ground_truth: Path | None = None
    resolution: int = 2
    registration: str = "SyN"
    normalization: str = "robust-zscore"
    skull_stripped: str = "auto"
    fpr: float = DEFAULT_FPR
    calibration_fraction: float = 0.2
    n_components: int | str = 5
    online: bool = False
    trim: float | None = None
    per_tissue: bool = False
    with_normative: bool = False
    mixture_score: str = "nll"
    single_subject: str | None = None
    fdr: float | None = None
    min_cluster_mm3: float = 0.0
    restrict: str = "brain"
    atlas: Path | None = None
    control_label: str | None = None
    bootstrap: int = 2000
    mode: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    patch_size: int | None = None
    learning_rate: float | None = None
    width: int | None = None
    latent: int | None = None
    patience: int | None = None
    residual: str | None = None
    precision: str | None = None
    num_workers: int | None = None
    tensorboard: Path | None = None
    stop_on_first_crash: bool = False
    verbose: int = 0
    version: str = __version__

    def to_toml(self) -> str:
        """Serialise, with paths as strings and unset values left out."""
        values = {}
        for key, value in dataclasses.asdict(self).items():
            if value is None:
                continue
            values[key] = str(value) if isinstance(value, Path) else value
        return tomli_w.dumps({"bids_anomaly": values})

    def write(self, path: Path) -> Path:
        """Write the settings as TOML to ``path`` and return it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_toml())
        return path
