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
