"""A subject's sessions in one space that favours none of them (the midpoint space).

Every session's brain-extracted lesion contrast is registered rigidly to the first session's
(antspyx, Mattes mutual information inside the brains; the sessions may differ in voxel size,
slice thickness, orientation and scanner). The midpoint is the mean of the sessions' poses:
with ``M_k`` the rigid map from session 1's points to session ``k``'s (``M_1`` the identity),
``H = expm(mean_k logm(M_k))`` and session ``k`` is reached from the midpoint by ``M_k H^-1``
(for two sessions, each is half of the motion away), as FreeSurfer's and ANTs' longitudinal
streams do to avoid the bias of a target session. Every session is then resampled once onto an
isotropic grid in that space.

Physical points are ITK's (LPS); a transform maps points of its fixed image to points of its
moving image, as ``antsApplyTransforms`` uses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.linalg import expm, logm

GRID_MM = 1.0
"""Voxel size of the midpoint grid (the lesion contrast's in-plane detail is kept)."""
GRID_MARGIN_MM = 10.0
"""Margin around the first session's field of view (the others sit a little elsewhere)."""


def midpoint_maps(to_sessions: list[np.ndarray]) -> list[np.ndarray]:
    """For each session, the map from midpoint points to its points.

    Parameters
    ----------
    to_sessions : list of numpy.ndarray
        ``(4, 4)`` rigid maps from the first session's points to each session's (the first is
        the identity).

    Returns
    -------
    list of numpy.ndarray
        ``M_k H^-1`` with ``H`` the mean pose (the matrix exponential of the mean logarithm).

    Examples
    --------
    >>> shift = np.eye(4); shift[0, 3] = 4.0
    >>> first, second = midpoint_maps([np.eye(4), shift])
    >>> round(float(first[0, 3]), 6), round(float(second[0, 3]), 6)
    (-2.0, 2.0)
    """
    logs = [np.real(logm(matrix)) for matrix in to_sessions]
    mean_pose = np.real(expm(np.mean(logs, axis=0)))
    inverse = np.linalg.inv(mean_pose)
    return [matrix @ inverse for matrix in to_sessions]


def read_rigid(path: str | Path) -> np.ndarray:
    """A rigid or affine ITK transform file as a ``(4, 4)`` matrix (fixed to moving points)."""
    import ants

    transform = ants.read_transform(str(path))
    parameters = np.asarray(transform.parameters, dtype=np.float64)
    centre = np.asarray(transform.fixed_parameters, dtype=np.float64)[:3]
    linear = parameters[:9].reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = parameters[9:12] + centre - linear @ centre
    return matrix


def write_affine(matrix: np.ndarray, path: str | Path) -> Path:
    """Write a ``(4, 4)`` map of points as an ITK affine transform file."""
    import ants

    transform = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                           matrix=matrix[:3, :3], offset=matrix[:3, 3])
    ants.write_transform(transform, str(path))
    return Path(path)


def register_rigid(fixed: str | Path, moving: str | Path, fixed_mask: str | Path,
                   moving_mask: str | Path, out_dir: str | Path, seed: int = 0) -> np.ndarray:
    """Rigid map from ``fixed``'s points to ``moving``'s, inside both brains (antspyx).

    Both images are multiplied by their brain masks (skull and neck would pull a rigid fit of
    two protocols apart); Mattes mutual information copes with other contrasts and scanners.
    """
    import ants

    from bids_anomaly.imaging.spatial import ants_seed

    fixed_image = ants.image_read(str(fixed)) * ants.image_read(str(fixed_mask))
    moving_image = ants.image_read(str(moving)) * ants.image_read(str(moving_mask))
    ants.config._random_seed = ants_seed(seed)  # antspy's only way to seed the sampling
    result = ants.registration(fixed=fixed_image, moving=moving_image,
                               type_of_transform="Rigid", aff_metric="mattes",
                               outprefix=str(Path(out_dir) / "rigid_"))
    return read_rigid(result["fwdtransforms"][0])


def midpoint_grid(first: str | Path, out_file: str | Path) -> Path:
    """An isotropic :data:`GRID_MM` grid over the first session's field of view plus a margin."""
    import ants

    image = ants.resample_image(ants.image_read(str(first)), (GRID_MM,) * 3, use_voxels=False,
                                interp_type=0)
    margin = int(round(GRID_MARGIN_MM / GRID_MM))
    padded = ants.pad_image(image, pad_width=[(margin, margin)] * 3)
    grid = padded * 0
    ants.image_write(grid, str(out_file))
    return Path(out_file)


class SessionImages:
    """One session's lesion contrast and how it reaches the template.

    Parameters
    ----------
    label : str
        The session label.
    image : Path
        The raw lesion contrast (FLAIR, else T2w or PDw), as acquired.
    template_mask : Path
        The session's brain mask in template space (a preprocessing derivative).
    reference_to_template : Path
        ``from-<reference>_to-<template>`` (maps template points to reference points).
    template_to_reference : Path
        ``from-<template>_to-<reference>`` (maps reference points to template points).
    to_reference : Path, optional
        ``from-<contrast>_to-<reference>`` (maps reference points to contrast points); None
        when the contrast is the session's reference image.
    """

    def __init__(self, label: str, image: Path, template_mask: Path,
                 reference_to_template: Path, template_to_reference: Path,
                 to_reference: Path | None = None) -> None:
        self.label = label
        self.image = Path(image)
        self.template_mask = Path(template_mask)
        self.reference_to_template = Path(reference_to_template)
        self.template_to_reference = Path(template_to_reference)
        self.to_reference = None if to_reference is None else Path(to_reference)

    def from_template(self) -> tuple[list[str], list[bool]]:
        """Transforms (and inversions) taking template images onto the contrast's grid."""
        if self.to_reference is None:
            return [str(self.template_to_reference)], [False]
        return [str(self.template_to_reference), str(self.to_reference)], [False, True]

    def to_template(self) -> tuple[list[str], list[bool]]:
        """Transforms taking contrast-grid images onto the template grid."""
        if self.to_reference is None:
            return [str(self.reference_to_template)], [False]
        return [str(self.to_reference), str(self.reference_to_template)], [False, False]


def native_brain(session: SessionImages, out_dir: Path) -> tuple[Path, Path]:
    """The contrast N4-corrected inside its brain, and that brain mask, on its own grid.

    The brain is the session's template-space mask carried back through its transforms (the
    brain extraction of preprocessing, not a second one).
    """
    import ants

    out_dir = Path(out_dir)
    image = ants.image_read(str(session.image))
    transforms, invert = session.from_template()
    mask = ants.apply_transforms(image, ants.image_read(str(session.template_mask)),
                                 transforms, whichtoinvert=invert, interpolator="linear")
    mask = ants.threshold_image(mask, 0.5, 1e12)
    corrected = ants.n4_bias_field_correction(image, mask=mask)
    paths = (out_dir / f"ses-{session.label}_n4.nii.gz",
             out_dir / f"ses-{session.label}_brain.nii.gz")
    ants.image_write(corrected * mask, str(paths[0]))
    ants.image_write(mask, str(paths[1]))
    return paths


def align_sessions(sessions: list[SessionImages], out_dir: Path, seed: int = 0
                   ) -> tuple[Path, list[Path], list[Path], list[Path]]:
    """Every session on one isotropic grid of the midpoint space.

    Returns
    -------
    grid : Path
        The midpoint grid (an empty image).
    transforms : list of Path
        Per session, the affine from midpoint points to its points.
    images : list of Path
        Per session, its N4-corrected brain on the grid (B-spline, clipped at 0).
    masks : list of Path
        Per session, its brain on the grid (linear, thresholded at 0.5).
    """
    import ants

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    native = [native_brain(session, out_dir) for session in sessions]
    poses = [np.eye(4)]
    for index in range(1, len(sessions)):
        folder = out_dir / f"rigid_ses-{sessions[index].label}"
        folder.mkdir(exist_ok=True)
        poses.append(register_rigid(native[0][0], native[index][0], native[0][1],
                                    native[index][1], folder, seed))
    grid = midpoint_grid(native[0][0], out_dir / "midpoint_grid.nii.gz")
    reference = ants.image_read(str(grid))
    transforms, images, masks = [], [], []
    for session, (image, mask), matrix in zip(sessions, native, midpoint_maps(poses),
                                              strict=True):
        transform = write_affine(matrix, out_dir / f"from-midpoint_to-ses{session.label}.mat")
        moved = ants.apply_transforms(reference, ants.image_read(str(image)), [str(transform)],
                                      interpolator="bSpline")
        moved_mask = ants.apply_transforms(reference, ants.image_read(str(mask)),
                                           [str(transform)], interpolator="linear")
        images.append(out_dir / f"ses-{session.label}_midpoint.nii.gz")
        masks.append(out_dir / f"ses-{session.label}_midpoint_brain.nii.gz")
        ants.image_write(ants.threshold_image(moved, 0, 1e12, 1, 0) * moved, str(images[-1]))
        ants.image_write(ants.threshold_image(moved_mask, 0.5, 1e12), str(masks[-1]))
        transforms.append(transform)
    return grid, transforms, images, masks
