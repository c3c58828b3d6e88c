"""Generated cohorts with known age, sex and site effects, for the normative model's checks.

Every subject is a small two-channel volume on one grid: a smooth anatomy (a tissue label image
with three classes), plus, per voxel, an age slope, a sex offset and a site offset (location)
and a site scale factor, plus Gaussian noise whose standard deviation grows with age. The truth
is returned with the subjects, so that tests and benchmarks can check what a fit recovers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_anomaly.models.data import SubjectImages, TrainingData


@dataclass
class CohortTruth:
    """The effects a generated cohort was made with (per channel, in channel units)."""

    slope: list[float]
    sex_offset: list[float]
    site_offset: dict[str, list[float]]
    site_scale: dict[str, float]
    noise_sd: float
    noise_sd_slope: float
    tissue: np.ndarray
    brain: np.ndarray
    baseline: np.ndarray
    lesions: dict[str, np.ndarray] = field(default_factory=dict)


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A brain ellipsoid, three tissue classes (CSF core, WM, GM rim) and a baseline image."""
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radius = np.sqrt(sum(a ** 2 for a in axes))
    brain = radius < 0.9
    tissue = np.where(radius < 0.25, 3, np.where(radius < 0.6, 2, 1)) * brain
    baseline = np.stack([np.choose(tissue, [0.0, 1.0, 1.6, 0.4]),
                         np.choose(tissue, [0.0, 1.2, 0.8, 2.0])]).astype(np.float32)
    return brain, tissue.astype(np.uint8), baseline


def generate_cohort(folder: Path, participants: list[dict], *, shape=(16, 16, 16),
                    slope=(0.01, -0.005), sex_offset=(0.05, 0.0),
                    site_offset: dict[str, tuple[float, float]] | None = None,
                    site_scale: dict[str, float] | None = None, noise_sd: float = 0.05,
                    noise_sd_slope: float = 0.0005, reference_age: float = 50.0,
                    lesions: dict[str, float] | None = None, seed: int = 0
                    ) -> tuple[TrainingData, CohortTruth]:
    """Write a generated cohort and return it as training data with its truth.

    Parameters
    ----------
    folder : Path
        Where the NIfTI files and the tissue image go.
    participants : list of dict
        One participants.tsv row per subject (``participant_id``, ``age``, ``sex`` and, with
        site effects, ``site``), values as strings or numbers.
    slope : tuple of float
        Per channel, the change per year of age (location).
    sex_offset : tuple of float
        Per channel, the offset of sex ``M`` relative to ``F``.
    site_offset, site_scale : dict, optional
        Per site, the location offsets per channel and the noise factor.
    noise_sd, noise_sd_slope : float
        Noise standard deviation at ``reference_age`` and its change per year.
    lesions : dict, optional
        ``participant_id`` to a lesion's intensity increase on channel 0 (a cube in the WM).

    Returns
    -------
    data : TrainingData
        Channels ``FLAIR`` and ``T1w``; each subject carries its row as ``covariates``.
    truth : CohortTruth
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    brain, tissue, baseline = _grid(shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.Nifti1Image(tissue, affine).to_filename(folder / "tissue.nii.gz")
    site_offset = site_offset or {}
    site_scale = site_scale or {}
    truth = CohortTruth(slope=list(slope), sex_offset=list(sex_offset),
                        site_offset={k: list(v) for k, v in site_offset.items()},
                        site_scale=dict(site_scale), noise_sd=noise_sd,
                        noise_sd_slope=noise_sd_slope, tissue=tissue, brain=brain,
                        baseline=baseline)
    subjects = []
    centre = tuple(s // 2 for s in shape)
    for row in participants:
        name = str(row["participant_id"])
        age = float(row["age"])
        male = str(row.get("sex", "F")) == "M"
        site = str(row.get("site", ""))
        image = baseline.copy()
        for c in range(2):
            image[c] += slope[c] * (age - reference_age) + male * sex_offset[c]
            image[c] += site_offset.get(site, (0.0, 0.0))[c]
        sd = max(1e-3, noise_sd + noise_sd_slope * (age - reference_age))
        sd *= site_scale.get(site, 1.0)
        image += rng.normal(0.0, sd, image.shape).astype(np.float32)
        image *= brain
        if lesions and name in lesions:
            lesion = np.zeros(shape, bool)
            x, y, z = centre
            lesion[x + 3:x + 6, y - 1:y + 2, z - 1:z + 2] = True
            image[0][lesion] += lesions[name]
            truth.lesions[name] = lesion
        paths = []
        for c, channel in enumerate(("FLAIR", "T1w")):
            path = folder / f"{name}_{channel}.nii.gz"
            nib.Nifti1Image(image[c].astype(np.float32), affine).to_filename(path)
            paths.append(path)
        mask = folder / f"{name}_mask.nii.gz"
        nib.Nifti1Image(brain.astype(np.uint8), affine).to_filename(mask)
        subjects.append(SubjectImages(name, paths, mask,
                                      covariates={k: str(v) for k, v in row.items()}))
    return TrainingData(subjects, ["FLAIR", "T1w"], regions=folder / "tissue.nii.gz"), truth


def participants(n: int, seed: int = 0, ages: tuple[float, float] = (20.0, 80.0),
                 sites: tuple[str, ...] = (), prefix: str = "sub-") -> list[dict]:
    """``n`` participants.tsv rows: uniform ages, alternating sexes, sites in turn."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"participant_id": f"{prefix}{seed:02d}x{i:03d}",
               "age": f"{rng.uniform(*ages):.1f}", "sex": "MF"[i % 2]}
        if sites:
            row["site"] = sites[(i // 2) % len(sites)]  # not confounded with sex
        rows.append(row)
    return rows
