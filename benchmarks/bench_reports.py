"""Size of the HTML reports and the time to build them, on a finished demo run.

Usage (run by hand, never in CI)::

    python benchmarks/bench_reports.py DEMO_DIR [--copy SCRATCH]

``DEMO_DIR`` is the folder ``bids_anomaly demo DEMO_DIR`` wrote (``rawdata/`` and
``derivatives/bids_anomaly/``). The derivatives are copied to ``SCRATCH`` (default: a temporary
folder) with every report and report figure removed, then the participant pages
(:func:`~bids_anomaly.reports.subject.write_subject_reports`) and the group level (tables,
figures and ``group/report.html``) are built again and timed; the size of every page is listed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", type=Path)
    parser.add_argument("--copy", type=Path)
    args = parser.parse_args()
    from bids_anomaly.cli.parser import parse_arguments, settings_from_args
    from bids_anomaly.levels.group import run_group
    from bids_anomaly.levels.steps import collect_subjects, index_dataset
    from bids_anomaly.reports.subject import write_subject_reports

    scratch = args.copy or Path(tempfile.mkdtemp())
    out = scratch / "bids_anomaly"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(args.demo / "derivatives" / "bids_anomaly", out,
                    ignore=shutil.ignore_patterns("*.html", "*_statmap.png", "work"))
    shutil.rmtree(out / "group", ignore_errors=True)
    work = scratch / "work"
    shutil.rmtree(work, ignore_errors=True)
    rawdata = args.demo / "rawdata"
    settings = settings_from_args(*parse_arguments(
        [str(rawdata), str(out), "participant", "-w", str(work)]))
    layout = index_dataset(settings)
    subjects = collect_subjects(settings, layout, sorted(layout.get_subjects()))
    start = time.perf_counter()
    pages = write_subject_reports(out, subjects, "MNI152NLin2009aSym")
    participant_seconds = time.perf_counter() - start
    group_settings = settings_from_args(*parse_arguments(
        [str(rawdata), str(out), "group", "-w", str(work), "--ground-truth",
         str(rawdata / "derivatives" / "lesion_masks"),
         str(rawdata / "derivatives" / "microbleeds")]))
    start = time.perf_counter()
    run_group(group_settings)
    group_seconds = time.perf_counter() - start
    report = out / "group" / "report.html"
    print(f"participant pages: {len(pages)} in {participant_seconds:.1f} s")
    for page in pages:
        print(f"  {page.name}: {page.stat().st_size / 1e6:.2f} MB")
    print(f"group level (tables, figures, report): {group_seconds:.1f} s; report.html "
          f"{report.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
