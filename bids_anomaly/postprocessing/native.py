"""Carrying template-space maps back to the grid of a subject's reference image."""

from __future__ import annotations

from pathlib import Path

from bids_anomaly import bids
from bids_anomaly.errors import MissingInputError
from bids_anomaly.imaging.spatial import apply_transforms


def to_native_space(in_file: str | Path, inputs: bids.AnatInputs, output_dir: Path,
                    space: str, out_file: str | Path, interpolation: str = "linear") -> Path:
    """Resample a template-space image onto the subject's raw reference image grid.

    The template-to-reference transform written by the preprocessing (ITK composite ``.h5``,
    ``from-<space>_to-<reference>``) is applied, and the result has the reference image's own
    shape, voxel size and orientation (its raw grid, not the RAS+ copy), so it overlays the raw
    image in any viewer.

    Parameters
    ----------
    in_file : path
        Image on the template grid (anomaly map, mask, ...).
    inputs : AnatInputs
        The subject/session; its reference image defines the output grid.
    output_dir : Path
        Root of the derivatives holding the transform.
    space : str
        Template name.
    out_file : path
        Where to write the result.
    interpolation : str
        ``linear`` for continuous maps, ``genericLabel`` or ``nearestNeighbor`` for masks and
        labels.

    Returns
    -------
    Path
        ``out_file``.

    Raises
    ------
    MissingInputError
        If the subject has not been preprocessed into ``output_dir``.
    """
    transform = bids.spec_path(output_dir, inputs.subject, inputs.session,
                               bids.transform_spec(space, inputs.reference))
    if not transform.is_file():
        raise MissingInputError(
            f"{inputs.name}: no transform {transform.name} in {output_dir}; run the "
            "participant level first")
    return apply_transforms(in_file, inputs.images[inputs.reference], [transform], out_file,
                            interpolation=interpolation)
