"""Time, memory and acceptance figures of the diffusion branch on ``bids_dwi``.

Usage (run by hand, never in CI)::

    python benchmarks/bench_dwi.py ../shared/data/bids_dwi /tmp/bench_dwi --threads 2

Two whole ``bids_anomaly participant`` processes on fresh output and work folders, as a user
runs them: the T1w alone (``--dwi-maps none``) and T1w + dwi (FA, MD); wall time and the peak
resident memory of the process tree (sampled every 0.2 s with psutil). Then, on the second
run's maps: the mean FA inside the template's white matter (probability > 0.5 and > 0.9), the
MD inside the template's ventricles (CSF probability > 0.9, deeper than 10 mm) and the b=0 QC
row (coverage, NMI with the T1w); and the ablations of docs/usage.md (AP and PA fitted together,
each run alone) in native space with the package's own functions.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def run(command: list[str]) -> tuple[float, float]:
    """Wall time (s) and peak resident memory (GB) of a process and its children."""
    import psutil

    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if process.returncode:
        raise SystemExit(process.stderr.read().decode())
    return time.perf_counter() - start, peak / 1024**3


def template_figures(out: Path, work: Path) -> dict[str, float]:
    """FA in the template's white matter, MD in its ventricles."""
    from scipy import ndimage

    from bids_anomaly import bids
    from bids_anomaly.imaging.template import get_template

    template = get_template(2, work / "templates")
    fa, md = (nib.load(bids.spec_path(out, "xa30", None, bids.preproc_spec(
        template.name, 2, p))).get_fdata() for p in ("FA", "MD"))
    wm = nib.load(template.probseg["WM"]).get_fdata()
    csf = nib.load(template.probseg["CSF"]).get_fdata()
    brain = nib.load(template.brain_mask).get_fdata() > 0
    deep = ndimage.distance_transform_edt(brain) * template.resolution > 10
    ventricles = (csf > 0.9) & deep & (md > 0)
    return {"FA in WM > 0.5": fa[(wm > 0.5) & (fa > 0)].mean(),
            "FA in WM > 0.9": fa[(wm > 0.9) & (fa > 0)].mean(),
            "MD in ventricles (median)": float(np.median(md[ventricles])),
            "MD in ventricles (99th percentile)": float(np.percentile(md[ventricles], 99))}


def native_ablations(bids_dir: Path) -> None:
    """The 90th percentile of FA in the b=0 brain mask: runs fitted together or alone."""
    from bids_anomaly.imaging.diffusion import (
        brain_mask_from_b0,
        fit_tensor,
        load_dwi_runs,
        mean_b0,
    )

    stem = bids_dir / "sub-xa30" / "dwi" / "sub-xa30_dir-"
    for runs in (["AP"], ["PA"], ["AP", "PA"]):
        dwi = load_dwi_runs([f"{stem}{r}_dwi.nii.gz" for r in runs],
                            [f"{stem}{r}_dwi.bval" for r in runs],
                            [f"{stem}{r}_dwi.bvec" for r in runs])
        b0 = mean_b0(dwi)
        mask = brain_mask_from_b0(b0, dwi.header.get_zooms()[:3])
        maps = fit_tensor(dwi, mask, ("FA", "MD"))
        print(f"  native, {' + '.join(runs)} fitted together: FA 90th percentile "
              f"{np.percentile(maps['FA'][mask], 90):.3f}, MD median "
              f"{np.median(maps['MD'][mask]):.3e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("scratch", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    common = ["--nprocs", str(args.threads), "--omp-nthreads", "1"]
    outputs = {}
    for name, extra in (("T1w only", ["--dwi-maps", "none"]), ("T1w + dwi (FA, MD)", [])):
        folder = args.scratch / name.split()[-1].strip("()").replace(",", "")
        shutil.rmtree(folder, ignore_errors=True)
        seconds, gigabytes = run(["bids_anomaly", str(args.bids_dir), str(folder / "out"),
                                  "participant", "-w", str(folder / "work"), *common, *extra])
        print(f"{name}: {seconds:.0f} s, peak {gigabytes:.2f} GB")
        outputs[name] = folder
    folder = outputs["T1w + dwi (FA, MD)"]
    for key, value in template_figures(folder / "out", folder / "work").items():
        print(f"  {key}: {value:.4g}")
    print((folder / "out" / "sub-xa30" / "anat" / "sub-xa30_desc-registration_qc.tsv")
          .read_text())
    native_ablations(args.bids_dir)


if __name__ == "__main__":
    main()
