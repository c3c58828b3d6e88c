"""Write a coarse lesion-zone atlas of the embedded template, for ``--atlas``.

White-matter lesions are described by zone in MS and small-vessel disease (periventricular,
juxtacortical, deep white matter; Filippi et al., Lancet Neurol 2016; Wardlaw et al., Lancet
Neurol 2013), and deep grey matter matters in Parkinson's disease. This script derives such
zones from the template's own tissue segmentation, per hemisphere, so that the regional
tables have anatomically meaningful rows without any download:

- ventricles: CSF more than ``--deep-mm`` inside the brain (the lateral and third ventricles);
- periventricular WM: white matter within ``--periventricular-mm`` of the ventricles;
- juxtacortical WM: white matter within ``--juxtacortical-mm`` of cortical grey matter;
- deep WM: the remaining white matter;
- deep GM: grey matter in the box of MNI coordinates that holds the basal ganglia and
  thalami (:data:`DEEP_GM_BOX`), more than 15 mm inside the brain (which leaves out the
  insula and cingulate cortex); about 30 ml per hemisphere at 2 mm;
- cortical GM: the remaining grey matter.

The zones are geometric approximations, not a substitute for a labelled anatomical atlas;
give such an atlas (e.g. a subcortical atlas in MNI space) to ``--atlas`` when you have one.

Usage::

    python scripts/zone_atlas.py OUT_DIR [--resolution 2]

writes ``OUT_DIR/tpl-<template>_res-<r>_atlas-zones_dseg.nii.gz`` and its ``.tsv``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from bids_anomaly.imaging.template import RESOLUTIONS, TISSUE_LABELS, get_template

DEEP_GM_BOX = {"x": (-33.0, 33.0), "y": (-38.0, 28.0), "z": (-12.0, 24.0)}
"""MNI extent (mm) of the caudate, putamen, pallidum and thalamus, both hemispheres."""

DEEP_GM_DEPTH_MM = 15.0

ZONES = ("ventricles", "periventricular-WM", "juxtacortical-WM", "deep-WM", "deep-GM",
         "cortical-GM")


def zone_atlas(dseg: nib.Nifti1Image, mask: nib.Nifti1Image, deep_mm: float = 20.0,
               periventricular_mm: float = 10.0,
               juxtacortical_mm: float = 4.0) -> tuple[np.ndarray, dict[int, str]]:
    """Zone labels on the template grid and their names (left hemisphere odd, right even)."""
    label = {name: value for value, name in TISSUE_LABELS.items()}
    tissue = np.asarray(dseg.dataobj).astype(int)
    brain = np.asarray(mask.dataobj) > 0
    spacing = dseg.header.get_zooms()[:3]
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    csf, wm, gm = (tissue == label[k] for k in ("CSF", "WM", "GM"))
    ventricles = csf & (depth > deep_mm)
    near_ventricles = ndimage.distance_transform_edt(~ventricles, sampling=spacing)
    world = nib.affines.apply_affine(dseg.affine, np.argwhere(np.ones(tissue.shape, bool)))
    world = world.reshape(*tissue.shape, 3)
    box = np.ones(tissue.shape, bool)
    for axis, (low, high) in enumerate(DEEP_GM_BOX.values()):
        box &= (world[..., axis] >= low) & (world[..., axis] <= high)
    deep_gm = gm & box & (depth > DEEP_GM_DEPTH_MM)
    cortex = gm & ~deep_gm
    near_cortex = ndimage.distance_transform_edt(~cortex, sampling=spacing)
    periventricular = wm & (near_ventricles <= periventricular_mm)
    juxtacortical = wm & ~periventricular & (near_cortex <= juxtacortical_mm)
    deep_wm = wm & ~periventricular & ~juxtacortical
    zones = (ventricles, periventricular, juxtacortical, deep_wm, deep_gm, cortex)
    left = world[..., 0] < 0
    atlas = np.zeros(tissue.shape, np.uint16)
    names = {}
    for index, (name, zone) in enumerate(zip(ZONES, zones, strict=True)):
        for offset, (side, hemisphere) in enumerate((("left", left), ("right", ~left))):
            value = 2 * index + 1 + offset
            atlas[zone & hemisphere] = value
            names[value] = f"{side}-{name}"
    return atlas, names


def main(argv: list[str] | None = None) -> None:
    """Command line: write the atlas and its label table, print the zone volumes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=2)
    parser.add_argument("--deep-mm", type=float, default=20.0)
    parser.add_argument("--periventricular-mm", type=float, default=10.0)
    parser.add_argument("--juxtacortical-mm", type=float, default=4.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        template = get_template(args.resolution, Path(scratch))
        dseg, mask = nib.load(template.dseg), nib.load(template.brain_mask)
        atlas, names = zone_atlas(dseg, mask, args.deep_mm, args.periventricular_mm,
                                  args.juxtacortical_mm)
        stem = f"tpl-{template.name}_res-{args.resolution}_atlas-zones_dseg"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = nib.Nifti1Image(atlas, dseg.affine)
        out.set_data_dtype(np.uint16)
        out.to_filename(args.out_dir / f"{stem}.nii.gz")
    pd.DataFrame({"index": list(names), "name": list(names.values())}).to_csv(
        args.out_dir / f"{stem}.tsv", sep="\t", index=False)
    counts = np.bincount(atlas.ravel(), minlength=max(names) + 1)
    for value, name in names.items():
        print(f"{value:3d} {name:28s} {counts[value] * args.resolution ** 3 / 1000:8.1f} ml")
    print(f"written: {args.out_dir / stem}.nii.gz and .tsv")


if __name__ == "__main__":
    main()
