"""Microbleed detection on real T2w images with inserted synthetic microbleeds.

Usage (run by hand, never in CI)::

    python benchmarks/bench_microbleeds.py --derivatives DERIV [--per-image 10] [--fp 3]

``DERIV`` is the participant level's output on ``../shared/data/bids_real`` (its six template-space
T2w images: sub-mslub26, sub-mslubL01 and sub-mslubL12 at two sessions, sub-stroke01). No
susceptibility-weighted scan with labelled microbleeds is available here, so each T2w in turn
receives ``--per-image`` synthetic microbleeds (visible diameter 2-10 mm, the dipole blooming of
:func:`bids_anomaly.imaging.susceptibility.blooming_signal`, z along B0, applied multiplicatively
to the image above its brain's 0.5th percentile), in brain parenchyma away from CSF; the other five
images, without insertions, are the "controls": the candidate threshold keeps ``--fp`` candidates
per control on average. Two scores are compared: the detector's blobness alone, and the normative
model of the five controls (largest |robust z| inside the candidate). What this shows: how the blob
detector and the calibration behave on real anatomy, real noise and real dark structures of a real
T2w (flow voids, iron, lesion borders, the edges of thick clinical slices). What it does not show:
sensitivity to real microbleeds, whose contrast on T2w is weak (they are a T2*/SWI finding), nor
specificity against real mimics on SWI.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from bids_anomaly.evaluation.detection import detection_metrics, froc, froc_summary
from bids_anomaly.imaging.susceptibility import blooming_signal, dephasing_for_bloom
from bids_anomaly.models import REGISTRY
from bids_anomaly.models.data import SubjectImages, TrainingData
from bids_anomaly.postprocessing.microbleeds import (
    blob_candidates,
    score_candidates,
    threshold_for_fp,
)

IMAGES = ("sub-mslub26/anat/sub-mslub26",
          "sub-mslubL01/ses-1/anat/sub-mslubL01_ses-1",
          "sub-mslubL01/ses-2/anat/sub-mslubL01_ses-2",
          "sub-mslubL12/ses-1/anat/sub-mslubL12_ses-1",
          "sub-mslubL12/ses-2/anat/sub-mslubL12_ses-2",
          "sub-stroke01/anat/sub-stroke01")
SPACE = "space-MNI152NLin2009aSym_res-2"


def load(derivatives: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A template-space T2w, its brain mask and affine."""
    image = nib.load(derivatives / f"{prefix}_{SPACE}_desc-preproc_T2w.nii.gz")
    brain = np.asarray(nib.load(derivatives / f"{prefix}_{SPACE}_desc-brain_mask.nii.gz")
                       .dataobj) > 0
    return image.get_fdata(dtype=np.float32), brain, image.affine


def insert(image: np.ndarray, brain: np.ndarray, count: int, rng: np.random.Generator,
           voxel_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image with ``count`` microbleeds, their centres (voxels) and visible radii (mm)."""
    out = image.astype(np.float64)
    floor = np.percentile(image[brain], 0.5)
    # parenchyma: not the darkest or brightest (CSF) decile, 6 mm inside the brain
    low, high = np.percentile(image[brain], [10, 85])
    inner = ndimage.binary_erosion(brain, iterations=3)
    sites = np.argwhere(inner & (image > low) & (image < high))
    centres, radii = [], []
    while len(centres) < count:
        centre = sites[rng.integers(len(sites))].astype(np.float64)
        if any(np.linalg.norm(centre - c) < 8 for c in centres):
            continue
        visible = rng.uniform(1.0, 5.0)  # mm: diameters 2-10 mm
        bloom = rng.uniform(2.0, 3.0)
        signal = blooming_signal(image.shape, centre, visible / bloom,
                                 dephasing_for_bloom(bloom), (voxel_mm,) * 3)
        out = floor + (out - floor) * signal
        centres.append(centre)
        radii.append(visible)
    return out.astype(np.float32), np.array(centres), np.array(radii)


def normative_scores(controls: list[tuple[np.ndarray, np.ndarray]], folder: Path):
    """A normative model of the controls' T2w, returned fitted."""
    subjects = []
    for index, (image, brain) in enumerate(controls):
        nib.Nifti1Image(image, np.eye(4)).to_filename(folder / f"c{index}.nii.gz")
        nib.Nifti1Image(brain.astype(np.uint8), np.eye(4)).to_filename(folder / f"m{index}.nii.gz")
        subjects.append(SubjectImages(f"c{index}", [folder / f"c{index}.nii.gz"],
                                      folder / f"m{index}.nii.gz"))
    model = REGISTRY["normative"]()
    model.fit(TrainingData(subjects, ["T2w"]))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--derivatives", type=Path, required=True)
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--fp", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench_microbleeds"))
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    data = [load(args.derivatives, prefix) for prefix in IMAGES]
    voxel_mm = float(abs(data[0][2][0, 0]))
    candidates = [blob_candidates(image, brain, voxel_mm) for image, brain, _ in data]
    results: dict[str, list] = {"blobness": [], "normative": []}
    rows = []
    for test, (image, brain, _) in enumerate(data):
        others = [i for i in range(len(data)) if i != test]
        bleeding, centres, radii = insert(image, brain, args.per_image, rng, voxel_mm)
        found = blob_candidates(bleeding, brain, voxel_mm)
        model = normative_scores([(data[i][0], data[i][1]) for i in others], args.scratch)
        def zmap(volume: np.ndarray, mask: np.ndarray, model=model) -> np.ndarray:
            with torch.no_grad():
                return model.score(torch.from_numpy(volume[None]),
                                   torch.from_numpy(mask)).numpy()

        control_scores = {
            "blobness": [candidates[i]["blobness"].to_numpy() for i in others],
            "normative": [score_candidates(candidates[i], zmap(data[i][0], data[i][1]),
                                           voxel_mm).to_numpy() for i in others]}
        test_scores = {"blobness": found["blobness"].to_numpy(),
                       "normative": score_candidates(found, zmap(bleeding, brain),
                                                     voxel_mm).to_numpy()}
        points = found[["i", "j", "k"]].to_numpy(np.float64) * voxel_mm
        truth = centres * voxel_mm
        for name in results:
            threshold = threshold_for_fp(control_scores[name], args.fp)
            kept = test_scores[name] > threshold
            metrics = detection_metrics(points[kept], test_scores[name][kept], truth, radii,
                                        tolerance_mm=1.0)
            rows.append({"image": IMAGES[test].split("/")[-1], "score": name,
                         "threshold": threshold, **metrics})
            results[name].append((points, test_scores[name], truth, radii))
        print(pd.DataFrame(rows[-2:]).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    print("\nper image at the calibrated threshold:")
    print(table.round(3).to_string(index=False))
    for name, subjects in results.items():
        curve = froc(subjects)
        summary = froc_summary(curve)
        at = table[table["score"] == name]
        print(f"\n{name}: calibrated ({args.fp} FP/control): sensitivity "
              f"{at['tp'].sum() / at['n_true'].sum():.3f}, {at['fp'].mean():.2f} FP/image, "
              f"F1 {at['f1'].mean():.3f}, mean |count difference| "
              f"{at['abs_count_difference'].mean():.2f}; FROC: "
              + ", ".join(f"{k.removeprefix('sensitivity_at_')} FP {v:.3f}"
                          for k, v in summary.items()))


if __name__ == "__main__":
    main()
