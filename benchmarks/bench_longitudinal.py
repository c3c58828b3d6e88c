"""Lesion change between sessions: the product's change map beside two anchors, in one run.

Usage (by hand, never in CI; needs the real dataset preprocessed at the participant level,
``bids_anomaly ../shared/data/bids_real DERIV participant``, and, for the peer, SAMSEG's own
environment, built by ``benchmarks/samseg_peer.py``)::

    python benchmarks/bench_longitudinal.py --derivatives DERIV \
        [--samseg-env /work/runs/samseg/env] --out benchmarks/results/longitudinal

Pairs: sub-mslubL01 and sub-mslubL12 of ``bids_real`` (raw clinical sessions of other voxel
sizes, slice thicknesses and scanners), truth the MSLUB consensus change masks of
``../shared/data/mslub_change`` on each later session's FLAIR grid. Every map is evaluated on
that grid, inside the later session's brain (the template-space brain carried back). No label
is used except to score; nothing is fitted on anything but the pair itself.

Rows:

- ``change`` (the product, what ``participant --longitudinal`` writes): tissue-score difference
  and difference test, equal weights fixed before any label was seen; its ablations, each alone;
- anchor ``subtraction``: each session's robust z, absolute difference, 3-voxel median, on the
  same midpoint grid (the same rigid registration);
- peer ``SAMSEG |P2 - P1|``: SAMSEG lesion mode on each session (T1w + FLAIR), its lesion
  posteriors carried onto the midpoint grid by the same registration, absolute difference.

Metrics: voxel AUROC, AUPRC, oracle Dice, Dice at the label-free threshold (the product: the
``1 - FPR`` quantile over normal-appearing voxels; the anchor: the same quantile over the brain;
the peer: posterior difference 0.5), lesion-wise detection of the change clusters at that
threshold, seconds per pair.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from bids_anomaly.evaluation.metrics import lesion_metrics, voxel_metrics
from bids_anomaly.imaging.template import TEMPLATE_NAME, get_template
from bids_anomaly.longitudinal.change import two_sided_evidence
from bids_anomaly.longitudinal.midpoint import SessionImages
from bids_anomaly.longitudinal.subject import subject_change

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The real data beside the repository (``../shared/data``), wherever the command is run from."""
PAIRS = ("mslubL01", "mslubL12")
CONTRAST = "FLAIR"


def session_images(bids_dir: Path, derivatives: Path, subject: str, session: str
                   ) -> SessionImages:
    """The raw FLAIR of a session and its preprocessing transforms."""
    anat = derivatives / f"sub-{subject}" / f"ses-{session}" / "anat"
    prefix = f"sub-{subject}_ses-{session}"
    return SessionImages(
        session, bids_dir / f"sub-{subject}" / f"ses-{session}" / "anat" /
        f"{prefix}_{CONTRAST}.nii.gz",
        anat / f"{prefix}_space-{TEMPLATE_NAME}_res-2_desc-brain_mask.nii.gz",
        anat / f"{prefix}_from-T1w_to-{TEMPLATE_NAME}_mode-image_xfm.h5",
        anat / f"{prefix}_from-{TEMPLATE_NAME}_to-T1w_mode-image_xfm.h5",
        anat / f"{prefix}_from-{CONTRAST}_to-T1w_mode-image_xfm.mat")


def to_grid(reference: ants.ANTsImage, moving: ants.ANTsImage, transforms: list[str],
            invert: list[bool], interpolator: str = "linear") -> np.ndarray:
    """``moving`` resampled onto ``reference`` through ``transforms``."""
    return ants.apply_transforms(reference, moving, transforms, whichtoinvert=invert,
                                 interpolator=interpolator).numpy()


def pair_maps(args, subject: str, template, folder: Path) -> dict:
    """Every map of one pair on the later session's FLAIR grid, with the seconds."""
    sessions = [session_images(args.bids_dir, args.derivatives, subject, s) for s in ("1", "2")]
    start = time.perf_counter()
    result = subject_change(sessions, template.probseg, folder, seed=args.seed, fpr=args.fpr)
    seconds = time.perf_counter() - start
    pair, values, brain = result.pairs[0], result.images, result.brain
    maps, threshold, transforms = pair.maps, pair.threshold, result.transforms
    reference = ants.image_read(str(result.grid))
    anchor = ndimage.median_filter(np.abs(values[1] - values[0]), 3) * brain
    grids = {
        "change (tissue difference + difference test)": (np.abs(maps.score), threshold),
        "ablation: tissue difference alone": (np.abs(maps.tissue_difference),
                                              float(np.quantile(np.abs(
                                                  maps.tissue_difference[maps.null]),
                                                  1 - args.fpr))),
        "ablation: difference test alone": (two_sided_evidence(maps.difference_z),
                                            -np.log10(args.fpr)),
        "anchor: rigid FLAIR subtraction": (anchor, float(np.quantile(anchor[brain],
                                                                      1 - args.fpr))),
    }
    timing = {"change (tissue difference + difference test)": seconds}
    if args.samseg_env is not None:
        import samseg_peer

        python = samseg_peer.build_env(args.samseg_env)
        posteriors_mid, peer_seconds = [], 0.0
        for session, transform in zip(sessions, transforms, strict=True):
            anat = args.bids_dir / f"sub-{subject}" / f"ses-{session.label}" / "anat"
            prefix = f"sub-{subject}_ses-{session.label}"
            result = samseg_peer.run_samseg_lesion(
                [anat / f"{prefix}_T1w.nii.gz", anat / f"{prefix}_FLAIR.nii.gz"],
                args.samseg_env.parent / f"{prefix}", python, threads=args.threads)
            peer_seconds += result.seconds
            on_flair = result.posteriors_on_input_grids.get("flair", result.posterior)
            posteriors_mid.append(to_grid(reference, ants.image_read(str(on_flair)),
                                          [str(transform)], [False]))
        grids["peer: SAMSEG |P2 - P1|"] = (np.abs(posteriors_mid[1] - posteriors_mid[0])
                                           * brain, 0.5)
        timing["peer: SAMSEG |P2 - P1|"] = peer_seconds
    later = ants.image_read(str(sessions[1].image))
    native = {name: (to_grid(later, reference.new_image_like(values.astype(np.float32)),
                             [str(transforms[1])], [True]), threshold)
              for name, (values, threshold) in grids.items()}
    return {"maps": native, "seconds": timing, "later": sessions[1]}


def evaluate(args, subject: str, result: dict) -> list[dict]:
    """Metrics of every map of a pair on the later session's FLAIR grid."""
    later = result["later"]
    truth_file = (args.change / f"sub-{subject}" / f"ses-{later.label}" / "anat" /
                  f"sub-{subject}_ses-{later.label}_label-change_mask.nii.gz")
    truth = np.asarray(nib.load(truth_file).dataobj) > 0
    image = ants.image_read(str(later.image))
    transforms, invert = later.from_template()
    brain = to_grid(image, ants.image_read(str(later.template_mask)), transforms, invert) > 0.5
    rows = []
    for name, (values, threshold) in result["maps"].items():
        metrics = voxel_metrics(values[brain], truth[brain], threshold)
        detection = lesion_metrics((values > threshold) & brain, truth & brain)
        rows.append({"pair": f"sub-{subject}", "map": name, **{
            k: metrics[k] for k in ("auroc", "auprc", "oracle_dice", "dice")},
            "lesion_sensitivity": detection["lesion_sensitivity"],
            "false_positive_clusters": detection["false_positive_clusters"],
            "seconds": result["seconds"].get(name, float("nan"))})
    return rows


def main() -> None:
    """Run every pair and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--derivatives", type=Path, required=True)
    parser.add_argument("--bids-dir", type=Path, default=SHARED_DATA / "bids_real")
    parser.add_argument("--change", type=Path, default=SHARED_DATA / "mslub_change")
    parser.add_argument("--samseg-env", type=Path)
    parser.add_argument("--fpr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_longitudinal"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/longitudinal"))
    args = parser.parse_args()
    args.bids_dir, args.change = args.bids_dir.resolve(), args.change.resolve()
    torch.set_num_threads(args.threads)
    template = get_template(2, args.work / "templates")
    rows = []
    for subject in PAIRS:
        folder = args.work / subject
        folder.mkdir(parents=True, exist_ok=True)
        result = pair_maps(args, subject, template, folder)
        rows += evaluate(args, subject, result)
        for row in rows[-len(result["maps"]):]:
            print(f"{row['pair']} {row['map']}: AUPRC {row['auprc']:.3f} oracle Dice "
                  f"{row['oracle_dice']:.3f} Dice {row['dice']:.3f} ({row['seconds']:.0f} s)",
                  flush=True)
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".tsv"), sep="\t", index=False, float_format="%.4f")
    mean = table.groupby("map", sort=False)[["auroc", "auprc", "oracle_dice", "dice",
                                             "lesion_sensitivity", "seconds"]].mean()
    lines = ["| map | pair | AUROC | AUPRC | oracle Dice | Dice@thr | lesion sens. | "
             "FP clusters | s per pair |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['map']} | {r['pair']} | {r['auroc']:.3f} | {r['auprc']:.3f} | "
                     f"{r['oracle_dice']:.3f} | {r['dice']:.3f} | "
                     f"{r['lesion_sensitivity']:.3f} | {r['false_positive_clusters']} | "
                     f"{r['seconds']:.0f} |")
    for name, r in mean.iterrows():
        lines.append(f"| {name} | mean | {r['auroc']:.3f} | {r['auprc']:.3f} | "
                     f"{r['oracle_dice']:.3f} | {r['dice']:.3f} | "
                     f"{r['lesion_sensitivity']:.3f} | | {r['seconds']:.0f} |")
    args.out.with_suffix(".md").write_text(
        f"Lesion change, voxel FPR {args.fpr}, seed {args.seed}, "
        f"{args.threads} threads\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
