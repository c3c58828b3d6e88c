"""Resampling images through stored ANTs transforms (template <-> native space)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def apply_transforms(in_file: str | Path, reference_file: str | Path,
                     transforms: list[str | Path], out_file: str | Path,
                     invert: list[bool] | None = None, interpolation: str = "linear",
                     binarize: bool = False) -> Path:
    """Resample ``in_file`` onto the grid of ``reference_file`` through ``transforms``.

    Parameters
    ----------
    in_file, reference_file : path
        Moving image and output grid.
    transforms : list of path
        ITK transforms in antsApplyTransforms order: the last one is applied first.
    out_file : path
        Where to write the result.
    invert : list of bool, optional
        Invert the matching linear transform (composite ``.h5`` files are given in the wanted
        direction instead).
    interpolation : str
        antspyx interpolator name.
    binarize : bool
        Threshold at 0.5 and save as uint8 (for masks resampled with linear interpolation).

    Returns
    -------
    Path
        ``out_file``.
    """
    import ants

    moving = ants.image_read(str(in_file))
    reference = ants.image_read(str(reference_file))
    result = ants.apply_transforms(
        reference, moving, [str(t) for t in transforms], interpolator=interpolation,
        whichtoinvert=invert,
    )
    if binarize:
        result = result.new_image_like((result.numpy() > 0.5).astype(np.float32))
        result = result.astype("uint8")
    ants.image_write(result, str(out_file))
    return Path(out_file)


def map_points(points_mm: np.ndarray, transforms: list[str | Path]) -> np.ndarray:
    """Carry world points (RAS millimetres, as nibabel gives them) through ANTs transforms.

    ANTs maps points in the opposite direction to images: the transforms that resample a
    native image onto the template grid carry template points to native ones. antspyx works in
    LPS physical coordinates; the sign flips are done here.

    Parameters
    ----------
    points_mm : numpy.ndarray
        ``(N, 3)`` RAS millimetres.
    transforms : list of path
        As given to :func:`apply_transforms` for the opposite direction (last applied first).

    Returns
    -------
    numpy.ndarray
        ``(N, 3)`` RAS millimetres.
    """
    import ants
    import pandas as pd

    points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    if not len(points):
        return points.copy()
    lps = pd.DataFrame({"x": -points[:, 0], "y": -points[:, 1], "z": points[:, 2]})
    moved = ants.apply_transforms_to_points(3, lps, [str(t) for t in transforms])
    return np.column_stack([-moved["x"].to_numpy(), -moved["y"].to_numpy(),
                            moved["z"].to_numpy()])


def ants_seed(seed: int) -> int:
    """The antsRegistration ``--random-seed`` for our ``--random-seed``: never 0.

    ANTs seeds its metric sampling from the clock when the seed is 0, so the default seed of
    this tool (0) would make every registration differ from run to run.

    >>> ants_seed(0), ants_seed(41)
    (1, 42)
    """
    return int(seed) % (2**31 - 1) + 1
