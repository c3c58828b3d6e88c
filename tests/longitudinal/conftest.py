"""Generated sessions of one head for the longitudinal tests: a template, tissues, lesions.

The template space is the first session's world space (2 mm grid); each session is a FLAIR-like
image of the same head on its own grid, possibly moved, rescaled and with lesions of its own.
Each session's registration to the template is an exact affine file, as preprocessing would
have written it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

RADII = np.array([30.0, 26.0, 24.0])
"""Half-axes of the head (mm)."""
FLAIR = {"CSF": 0.25, "GM": 1.3, "WM": 1.0}
"""Tissue intensities of the generated FLAIR (lesions are 1.9)."""


def _grid(voxel: tuple[float, float, float], shape: tuple[int, int, int]
          ) -> tuple[np.ndarray, np.ndarray]:
    """A RAS affine centred on 0 and the world coordinates of its voxel centres."""
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * v for n, v in zip(shape, voxel, strict=True)]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return affine, index * np.asarray(voxel) + affine[:3, 3]


def tissues_at(points: np.ndarray) -> dict[str, np.ndarray]:
    """One-hot tissue classes of the generated head at world points (mm, RAS)."""
    radius = np.sqrt(((points / RADII) ** 2).sum(-1))
    ventricle = np.sqrt(((points / np.array([6.0, 10.0, 5.0])) ** 2).sum(-1)) < 1
    wm = (radius < 0.72) & ~ventricle
    gm = (radius >= 0.72) & (radius < 0.9)
    csf = ((radius >= 0.9) & (radius < 1.0)) | ventricle
    return {"GM": gm, "WM": wm, "CSF": csf}


def lesion_at(points: np.ndarray, centre: tuple[float, float, float], radius: float
              ) -> np.ndarray:
    """A spherical lesion (world mm)."""
    return np.sqrt(((points - np.asarray(centre)) ** 2).sum(-1)) < radius


@dataclass
class Session:
    """A generated session: its label, image and how it reaches the template."""

    label: str
    image: Path
    template_mask: Path
    reference_to_template: Path
    template_to_reference: Path


@dataclass
class Template:
    """The generated template: tissue probabilities and its grid."""

    tissues: dict[str, Path]
    grid: Path


def _affine_file(shift: np.ndarray, path: Path) -> Path:
    """An ITK affine (LPS points) that maps template points to a session's (a shift in RAS)."""
    import ants

    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=np.eye(3),
        offset=list(np.asarray(shift) * np.array([-1.0, -1.0, 1.0])))
    ants.write_transform(transform, str(path))
    return path


def make_template(folder: Path) -> Template:
    """Tissue probability maps (smoothed classes) and the brain on a 2 mm grid."""
    folder.mkdir(parents=True, exist_ok=True)
    affine, points = _grid((2.0, 2.0, 2.0), (36, 32, 30))
    classes = tissues_at(points)
    paths = {}
    for name, hard in classes.items():
        smooth = ndimage.gaussian_filter(hard.astype(np.float32), 0.8)
        paths[name] = folder / f"tpl_label-{name}_probseg.nii.gz"
        nib.Nifti1Image(smooth.astype(np.float32), affine).to_filename(paths[name])
    brain = folder / "tpl_desc-brain_mask.nii.gz"
    inside = np.sqrt(((points / RADII) ** 2).sum(-1)) < 1.0
    nib.Nifti1Image(inside.astype(np.uint8), affine).to_filename(brain)
    return Template(paths, brain)


def make_session(folder: Path, label: str, lesions: list[tuple[tuple[float, float, float],
                                                               float]],
                 voxel: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 shift: tuple[float, float, float] = (0.0, 0.0, 0.0), scale: float = 1.0,
                 offset: float = 0.0, seed: int = 0) -> tuple[Session, np.ndarray]:
    """A FLAIR of the head moved by ``shift`` mm (RAS), with ``lesions`` (centre, radius).

    The lesions are given in head coordinates. Returns the session and its lesion mask on its
    own grid.
    """
    folder.mkdir(parents=True, exist_ok=True)
    extent = 2 * RADII + 16
    shape = tuple(int(np.ceil(e / v)) for e, v in zip(extent, voxel, strict=True))
    affine, points = _grid(voxel, shape)
    head = points - np.asarray(shift)  # where each voxel sits in the head
    classes = tissues_at(head)
    image = np.zeros(shape, np.float32)
    for name, hard in classes.items():
        image[hard] = FLAIR[name]
    image = ndimage.gaussian_filter(image, 0.6 / np.asarray(voxel))
    lesion = np.zeros(shape, bool)
    for centre, radius in lesions:
        lesion |= lesion_at(head, centre, radius)
    image[lesion] = 1.9
    rng = np.random.default_rng(seed)
    inside = np.sqrt(((head / RADII) ** 2).sum(-1)) < 1.0
    skull = (np.sqrt(((head / (RADII + 5)) ** 2).sum(-1)) < 1.0) & ~inside
    image[skull] = 0.8
    image = image + rng.normal(0, 0.04, shape)
    image = np.clip(image * scale + offset, 0, None).astype(np.float32)
    path = folder / f"ses-{label}_FLAIR.nii.gz"
    nib.Nifti1Image(image, affine).to_filename(path)
    tpl_affine, tpl_points = _grid((2.0, 2.0, 2.0), (36, 32, 30))
    mask = folder / f"ses-{label}_space-tpl_desc-brain_mask.nii.gz"
    nib.Nifti1Image((np.sqrt(((tpl_points / RADII) ** 2).sum(-1)) < 1.0).astype(np.uint8),
                    tpl_affine).to_filename(mask)
    forward = _affine_file(np.asarray(shift), folder / f"ses-{label}_from-T1w_to-tpl.mat")
    inverse = _affine_file(-np.asarray(shift), folder / f"ses-{label}_from-tpl_to-T1w.mat")
    return Session(label, path, mask, forward, inverse), lesion


@pytest.fixture(scope="session")
def generated_template(tmp_path_factory) -> Template:
    """The generated template (shared by the tests of this folder)."""
    return make_template(tmp_path_factory.mktemp("template"))
