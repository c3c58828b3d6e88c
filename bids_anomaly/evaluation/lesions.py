"""Synthetic lesions with real shapes and literature-based contrast, for accuracy experiments.

The shapes are manually traced lesion masks of real patients in MNI space (MS white-matter
lesions of MSLUB, ischaemic stroke lesions of SOOP). They are kept where they were traced, so
their locations are realistic, and resampled onto the template grid of the preprocessed images
as partial-volume fractions. A lesion is inserted by shifting each channel additively, in units
of the image's own grey/white-matter contrast, which keeps the image's noise texture and makes
the lesion's visibility comparable across subjects, scanners and intensity normalisations.

The MNI152 2009 template of the preprocessed images and the MNI152 6th-generation space of the
shapes differ by a few millimetres at most, which is small against lesion sizes; both are
treated as the same world coordinates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_anomaly.errors import MissingInputError

LESION_SHAPE_SETS: dict[str, tuple[str, str]] = {
    "ms": ("mslub", "*.nii*"),
    "stroke": ("soop", "bwsrsub-*_lesion.nii*"),
}
"""Per lesion kind: the sub-folder of the shape collection and the file pattern in it."""

# Intensity shift of a lesion relative to the tissue it replaces, in units of the subject's own
# |mean GM - mean WM| on that channel (GM/WM contrast is the one intensity scale every channel
# and every normalisation has).
# - MS: demyelination, oedema and gliosis raise the water content, so lesions are hyperintense
#   on T2w, PDw and FLAIR (brighter than cortex on FLAIR, hence more than one GM/WM step above
#   WM) and iso- to hypointense on T1w ("black holes" only where axonal loss is severe, so on
#   average about one step below WM, i.e. grey-matter-like); PDw contrast is a little weaker
#   than T2w (Filippi et al., Brain 2019, MAGNIMS practical guidelines).
# - Stroke: chronic infarcts become fluid-filled cavities with CSF-like signal: strongly
#   hypointense on T1w, strongly hyperintense on T2w and PDw. On FLAIR the cavity is suppressed
#   like CSF while its gliotic rim is hyperintense (Wardlaw et al., Lancet Neurol 2013, STRIVE),
#   so the average is a moderate hyperintensity. The SOOP masks trace acute infarcts; only
#   their shape and location are used, the contrast is that of the chronic stage.
LESION_CONTRAST: dict[str, dict[str, float]] = {
    "ms": {"T1w": -1.0, "T2w": 2.0, "FLAIR": 2.0, "PDw": 1.5},
    "stroke": {"T1w": -2.0, "T2w": 3.0, "FLAIR": 1.0, "PDw": 2.0},
}

TISSUE_THRESHOLD = 0.7
"""Probability above which a template voxel counts as pure grey or white matter."""


def lesion_shape_paths(folder: Path, kind: str) -> list[Path]:
    """The lesion masks of one kind in a shape collection, sorted by name.

    Parameters
    ----------
    folder : Path
        The collection, holding ``mslub/`` (MS) and ``soop/`` (stroke).
    kind : {"ms", "stroke"}
        Lesion kind.

    Returns
    -------
    list of Path

    Raises
    ------
    ValueError
        Unknown ``kind``.
    MissingInputError
        The sub-folder is missing or holds no mask.
    """
    if kind not in LESION_SHAPE_SETS:
        raise ValueError(f"lesion kind must be one of {', '.join(LESION_SHAPE_SETS)}, "
                         f"not {kind!r}")
    subfolder, pattern = LESION_SHAPE_SETS[kind]
    paths = sorted((Path(folder) / subfolder).glob(pattern))
    if not paths:
        raise MissingInputError(f"no {kind} lesion masks ({pattern}) in {Path(folder) / subfolder}")
    return paths


def tissue_means(channel: np.ndarray, brain: np.ndarray, gm: np.ndarray,
                 wm: np.ndarray) -> tuple[float, float]:
    """Robust grey- and white-matter intensity of one channel.

    Parameters
    ----------
    channel : numpy.ndarray
        Image intensities.
    brain : numpy.ndarray
        Brain mask (non-zero is brain).
    gm, wm : numpy.ndarray
        Grey- and white-matter probability maps on the same grid.

    Returns
    -------
    tuple of float
        Medians of ``channel`` over the brain voxels with GM, respectively WM, probability
        above :data:`TISSUE_THRESHOLD`.

    Raises
    ------
    ValueError
        No brain voxel is confidently grey or white matter (maps on another grid?).
    """
    brain = np.asarray(brain) > 0
    means = []
    for name, probability in (("GM", gm), ("WM", wm)):
        pure = brain & (probability > TISSUE_THRESHOLD)
        if not pure.any():
            raise ValueError(f"no brain voxel has a {name} probability above {TISSUE_THRESHOLD}: "
                             "are the tissue maps on the image's grid?")
        means.append(float(np.median(channel[pure])))
    return means[0], means[1]


def insert_lesions(channels: dict[str, np.ndarray], brain: np.ndarray, gm: np.ndarray,
                   wm: np.ndarray, shapes: list[np.ndarray], kind: str,
                   rng: np.random.Generator,
                   jitter: float = 0.25) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Add lesions of one kind to the channels of one subject.

    Each channel is shifted by ``fraction * factor * LESION_CONTRAST[kind][channel] * |GM - WM|``
    inside the brain, where ``|GM - WM|`` is the channel's own grey/white-matter contrast and
    ``factor = 1 + jitter * uniform(-1, 1)`` is drawn once per lesion and shared by the
    channels, so that a faint lesion is faint on all of them. Where lesions overlap, the one
    with the largest fraction sets the shift.

    Parameters
    ----------
    channels : dict of str to numpy.ndarray
        Images keyed by modality (``T1w``, ``T2w``, ``FLAIR``, ``PDw``); left unchanged.
    brain : numpy.ndarray
        Brain mask; nothing changes outside it.
    gm, wm : numpy.ndarray
        Grey- and white-matter probability maps on the same grid.
    shapes : list of numpy.ndarray
        Lesion partial-volume fractions in [0, 1] on the same grid (see
        :func:`load_lesion_shape`).
    kind : {"ms", "stroke"}
        Lesion kind, selecting the contrast in :data:`LESION_CONTRAST`.
    rng : numpy.random.Generator
        Source of the per-lesion contrast factors.
    jitter : float
        Relative spread of the contrast between lesions, in [0, 1).

    Returns
    -------
    channels : dict of str to numpy.ndarray
        New floating-point images with the lesions.
    truth : numpy.ndarray
        Boolean ground truth: lesion fraction above 0.5, inside the brain.

    Raises
    ------
    ValueError
        Unknown kind or channel, a ``jitter`` outside [0, 1), shapes on another grid, or a
        channel without grey/white-matter contrast.
    """
    if kind not in LESION_CONTRAST:
        raise ValueError(f"lesion kind must be one of {', '.join(LESION_CONTRAST)}, not {kind!r}")
    contrast = LESION_CONTRAST[kind]
    unknown = [name for name in channels if name not in contrast]
    if unknown:
        raise ValueError(f"no {kind} lesion contrast for {', '.join(unknown)} (known: "
                         f"{', '.join(contrast)})")
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter must be in [0, 1), not {jitter}")
    brain = np.asarray(brain) > 0
    fraction = np.zeros(brain.shape, dtype=np.float32)
    factor = np.zeros(brain.shape, dtype=np.float32)
    for shape in shapes:
        if shape.shape != brain.shape:
            raise ValueError(f"a lesion shape has grid {shape.shape}, the brain {brain.shape}")
        lesion_factor = 1.0 + jitter * rng.uniform(-1.0, 1.0)
        larger = shape > fraction
        fraction = np.where(larger, shape, fraction)
        factor = np.where(larger, lesion_factor, factor)
    amount = np.where(brain, fraction * factor, 0.0)
    lesioned = {}
    for name, image in channels.items():
        grey, white = tissue_means(image, brain, gm, wm)
        if grey == white:
            raise ValueError(f"{name} has no grey/white-matter contrast to scale lesions by")
        shift = amount * contrast[name] * abs(grey - white)
        lesioned[name] = (image + shift).astype(np.result_type(image.dtype, np.float32))
    return lesioned, (fraction > 0.5) & brain
