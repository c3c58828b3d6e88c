"""Per-step time and memory of the preprocessing, against one plain antspyx SyN registration.

Usage (run by hand, never in CI; needs ``pip install -e ".[bench]"`` for psutil)::

    python benchmarks/bench_preproc.py ../shared/data/bids_real /tmp/bench_preproc --threads 2

For one subject of each kind in the dataset, the whole per-subject preprocessing workflow
(every modality, derivatives and QC included) runs on a fresh work directory with Nipype's
Linear plugin; then the same workflow runs again on the same work directory (the cached rerun);
then once more on another fresh work directory with Nipype's resource monitor on, for the peak
memory of each step (the monitor's polling slows the run, so it is not timed); then one plain
``ants.registration(type_of_transform="SyN")`` of the raw reference image to the template, with
the same number of ITK threads. torch, antspyx, deepbet and nilearn's plotting are imported
before any timing, as they are for both sides.

Then, as a user would run them, two whole processes: ``bids_anomaly participant`` for the
subject (``--nprocs`` = threads, fresh output folder) and a Python process that imports antspyx
and runs the plain SyN. Ratios are taken within this one run, so the machine's load affects both
sides alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "IXI T1w 2 mm with skull (PSR)": ("IXI012", None),
    "raw clinical T1w+T2w+FLAIR, thick slices (LPS)": ("mslubL01", "1"),
    "skull-stripped, MNI space, 3 modalities": ("mslub26", None),
    "T2w only": ("stroke01", None),
}


def run_case(bids_dir: Path, out: Path, subject: str, session: str | None, threads: int,
             resolution: int) -> dict:
    """Preprocess one subject twice (fresh, then cached) and time one plain SyN."""
    import ants
    from nipype import config

    from bids_anomaly import bids
    from bids_anomaly.config import Settings
    from bids_anomaly.imaging.template import get_template
    from bids_anomaly.levels.steps import configure_nipype
    from bids_anomaly.workflows.base import init_single_subject_wf, workflow_name

    case_dir = out / subject
    shutil.rmtree(case_dir, ignore_errors=True)
    settings = Settings(bids_dir=bids_dir, output_dir=case_dir / "derivatives",
                        analysis_level="participant", work_dir=case_dir / "work", nprocs=1,
                        omp_nthreads=threads, resolution=resolution)
    (case_dir / "derivatives" / "logs").mkdir(parents=True)
    configure_nipype(settings)
    layout = bids.load_layout(bids_dir, case_dir / "work" / "bids_db", validate=False)
    template = get_template(resolution, case_dir / "work" / "templates")
    inputs = bids.collect_anat(layout, subject, [session] if session else None)[0]

    def build(work_dir=settings.work_dir):
        from nipype.pipeline import engine as pe

        workflow = pe.Workflow(name=workflow_name(), base_dir=str(work_dir))
        workflow.add_nodes([init_single_subject_wf(settings, inputs, template)])
        return workflow

    start = time.perf_counter()
    graph = build().run(plugin="Linear")
    first = time.perf_counter() - start
    seconds = {node.name: getattr(node.result.runtime, "duration", 0.0) or 0.0
               for node in graph.nodes()}
    start = time.perf_counter()
    build().run(plugin="Linear")
    rerun = time.perf_counter() - start
    config.enable_resource_monitor()
    config.set("monitoring", "sample_frequency", "0.2")
    graph = build(case_dir / "work_monitored").run(plugin="Linear")
    config.disable_resource_monitor()
    steps = {node.name: (seconds.get(node.name, 0.0),
                         getattr(node.result.runtime, "mem_peak_gb", None))
             for node in graph.nodes()}

    fixed = ants.image_read(str(template.t1w))
    moving = ants.image_read(str(inputs.images[inputs.reference]))
    start = time.perf_counter()
    ants.registration(fixed, moving, type_of_transform="SyN",
                      outprefix=str(case_dir / "plain_syn_"))
    syn = time.perf_counter() - start
    return {"inputs": inputs, "first": first, "rerun": rerun, "syn": syn, "steps": steps,
            "template": template}


def run_processes(bids_dir: Path, out: Path, subject: str, session: str | None,
                  reference: Path, template_t1w: Path, threads: int) -> tuple[float, float]:
    """Wall seconds of ``bids_anomaly participant`` and of a plain-SyN Python process."""
    out = out / f"{subject}_cli"
    shutil.rmtree(out, ignore_errors=True)
    command = ["bids_anomaly", str(bids_dir), str(out), "participant", "--participant-label",
               subject, "--nprocs", str(threads), "--omp-nthreads", str(threads),
               "--skip-bids-validation"]
    if session:
        command += ["--session-label", session]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = time.perf_counter() - start
    code = (f"import ants; ants.registration(ants.image_read({str(template_t1w)!r}), "
            f"ants.image_read({str(reference)!r}), type_of_transform='SyN', "
            f"outprefix={str(out / 'syn_')!r})")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return ours, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2, help="ITK and torch threads")
    parser.add_argument("--resolution", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    args.bids_dir, args.output_dir = args.bids_dir.resolve(), args.output_dir.resolve()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    # Nipype's resource monitor writes its traces into the current directory
    os.chdir(args.output_dir)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import ants  # noqa: F401
    import deepbet  # noqa: F401
    import nilearn.plotting  # noqa: F401
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for label in args.cases:
        subject, session = CASES[label]
        result = run_case(args.bids_dir.resolve(), args.output_dir.resolve(), subject, session,
                          args.threads, args.resolution)
        inputs = result["inputs"]
        print(f"\n## {label}: {inputs.name} ({', '.join(inputs.modalities)})")
        print(f"{'step':40s} {'seconds':>8s} {'peak GiB':>9s}")
        for name, (seconds, peak) in sorted(result["steps"].items(), key=lambda kv: -kv[1][0]):
            if seconds >= 0.05:
                peak_text = f"{peak:9.2f}" if peak else f"{'-':>9s}"
                print(f"{name:40s} {seconds:8.2f} {peak_text}")
        ratio = result["first"] / result["syn"]
        print(f"whole preprocessing {result['first']:.1f} s; cached rerun {result['rerun']:.1f} s "
              f"({100 * result['rerun'] / result['first']:.0f} %); plain SyN "
              f"{result['syn']:.1f} s; ratio {ratio:.2f}x", flush=True)
        cli, cli_syn = run_processes(args.bids_dir, args.output_dir, subject, session,
                                     inputs.images[inputs.reference], result["template"].t1w,
                                     args.threads)
        print(f"whole processes: bids_anomaly participant {cli:.1f} s, plain SyN {cli_syn:.1f} s, "
              f"ratio {cli / cli_syn:.2f}x", flush=True)
        rows.append((label, result["first"], result["syn"], ratio, result["rerun"], cli,
                     cli_syn))
    print(f"\n{'case':48s} {'ours s':>7s} {'SyN s':>6s} {'ratio':>6s} {'rerun %':>8s} "
          f"{'CLI s':>6s} {'SyN proc s':>10s} {'ratio':>6s}")
    for label, first, syn, ratio, rerun, cli, cli_syn in rows:
        print(f"{label:48s} {first:7.1f} {syn:6.1f} {ratio:6.2f} {100 * rerun / first:8.0f} "
              f"{cli:6.1f} {cli_syn:10.1f} {cli / cli_syn:6.2f}")


if __name__ == "__main__":
    main()
