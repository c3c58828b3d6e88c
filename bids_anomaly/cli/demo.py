"""``bids_anomaly demo``: generate a dataset, then run participant, train and group on it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from bids_anomaly import bids
from bids_anomaly.config import MIN_TRAINING_SUBJECTS
from bids_anomaly.errors import OutputError, UsageError
from bids_anomaly.simulation.synthetic import generate_demo_dataset

LOGGER = logging.getLogger(__name__)

DEMO_MODELS = (("normative", "normative", {"channels": ["T1w", "FLAIR"]}),
               ("gmm", "gmm", {"channels": ["T1w", "FLAIR"]}),
               ("normative", "microbleeds", {"channels": ["T2starw"],
                                             "microbleeds": "T2starw"}))
"""(model type, model name, model settings) trained and evaluated by the demo: two lesion
models on T1w + FLAIR, and microbleed detection on the T2*-weighted image."""

DEMO_HEALTHY = 4
"""Healthy controls of the default demo: 3 to fit the models, 1 to calibrate their threshold
(at least :data:`~bids_anomaly.config.MIN_TRAINING_SUBJECTS`)."""

DEMO_PATIENTS = 2
"""Patients of the default demo (one with a thick-slice FLAIR)."""

DEMO_MODALITIES = ("T1w", "FLAIR", "T2starw")
"""Contrasts of the default demo: the most common MS / white-matter-lesion protocol, and a
T2*-weighted GRE for microbleeds (the patients have 1 to 20)."""


def check_demo_dir(output_dir: Path) -> None:
    """Refuse a demo folder that is a dataset, or a path that cannot be a folder.

    The demo writes ``rawdata/``, ``derivatives/`` and ``work/`` into a folder of its own;
    nothing is written before this check.

    Raises
    ------
    OutputError
        The folder is a file or under one, or holds a dataset (exit 73).
    """
    bids.check_output_dir(output_dir)  # not another dataset, a usable path
    if (output_dir / "dataset_description.json").exists():
        raise OutputError(f"demo OUTPUT_DIR {output_dir} holds a derivative dataset of "
                          "bids_anomaly; the demo writes rawdata/, derivatives/ and work/ into "
                          "a folder of its own: choose an empty or new folder")
    for parent in output_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"demo OUTPUT_DIR {output_dir} cannot be created: {parent} "
                                  "is a file")
            break


def run_demo(output_dir: Path, n_healthy: int = DEMO_HEALTHY, n_patients: int = DEMO_PATIENTS,
             nprocs: int = 1, device: str = "auto", random_seed: int = 0, verbose: int = 0,
             modalities: tuple[str, ...] = DEMO_MODALITIES) -> Path:
    """Run the whole tool on generated data and print where the results are.

    ``output_dir`` receives ``rawdata/`` (the generated BIDS dataset with ground truth in
    ``rawdata/derivatives/lesion_masks`` and, with a T2starw image, ``.../microbleeds``),
    ``derivatives/bids_anomaly/`` (the results) and ``work/``. Models whose channels are not
    all among ``modalities`` are left out. Running it again with the same folder redoes nothing
    that finished.

    Returns
    -------
    Path
        The group report.
    """
    from bids_anomaly import levels
    from bids_anomaly.config import (
        ExecutionSettings,
        GroupSettings,
        InputSettings,
        ModelSettings,
        PreprocessingSettings,
        Settings,
    )
    from bids_anomaly.runtime.progress import _duration

    if n_healthy < MIN_TRAINING_SUBJECTS:
        raise UsageError(f"--healthy {n_healthy}: the demo trains its models on the healthy "
                         f"controls, at least {MIN_TRAINING_SUBJECTS}")
    output_dir = Path(output_dir).resolve()
    check_demo_dir(output_dir)
    rawdata = output_dir / "rawdata"
    results = output_dir / "derivatives" / "bids_anomaly"
    truth = [rawdata / "derivatives" / "lesion_masks"]
    with_bleeds = "T2starw" in modalities
    if with_bleeds:
        truth.append(rawdata / "derivatives" / "microbleeds")
    models = [(t, n, o) for t, n, o in DEMO_MODELS if set(o["channels"]) <= set(modalities)]
    start = time.monotonic()
    if not (rawdata / "dataset_description.json").is_file():
        print(f"[demo] generating a synthetic BIDS dataset in {rawdata}: {n_healthy} healthy "
              f"controls and {n_patients} patients with lesions ({', '.join(modalities)})",
              flush=True)
        try:
            generate_demo_dataset(rawdata, n_healthy=n_healthy, n_patients=n_patients,
                                  seed=random_seed, modalities=modalities,
                                  microbleeds=with_bleeds)
        except OSError as error:
            raise OutputError(f"demo: cannot write the dataset in {rawdata}: "
                              f"{error.strerror or error}") from error
    # one thread per step and one step per core: the subjects run side by side (ITK's
    # threads scale poorly), and the results are reproducible to the bit
    execution = ExecutionSettings(work_dir=output_dir / "work", nprocs=nprocs, omp_nthreads=1,
                                  device=device, random_seed=random_seed, verbose=verbose)

    # generated heads start within 8 degrees and 6 mm of the template, every contrast on the
    # grid of the T1w: registrations and N4 with few iterations suffice (--sloppy)
    preprocessing = PreprocessingSettings(sloppy=True)

    def settings(level: str, **sections) -> Settings:
        return Settings(inputs=InputSettings(bids_dir=rawdata, output_dir=results,
                                             analysis_level=level),
                        execution=execution, preprocessing=preprocessing, **sections)

    steps = [("preprocessing every participant", settings("participant"))]
    for model_type, name, options in models:
        steps.append((f"training a {model_type} model ({name}) on the healthy controls",
                      settings("train", model=ModelSettings(
                          model_type=model_type, model_name=name,
                          train_filter=["group=healthy"], **options))))
    names = [name for _, name, _ in models]
    steps.append((f"scoring every participant with {', '.join(names)}",
                  settings("participant", model=ModelSettings(model=names))))
    steps.append(("group tables and evaluation",
                  settings("group", group=GroupSettings(ground_truth=truth))))
    for number, (message, step) in enumerate(steps, start=1):
        print(f"[demo] step {number}/{len(steps)}: {message} (elapsed "
              f"{_duration(time.monotonic() - start)})", flush=True)
        print(levels.run(step), flush=True)
    for _, name, options in models:
        if options.get("microbleeds"):
            table = pd.read_csv(bids.group_table_path(results, name, "microbleeds"), sep="\t")
            print(f"[demo] {name}: {int(table['tp'].sum())} of {int(table['n_true'].sum())} "
                  f"microbleeds found, {table['fp'].mean():.1f} false positives per patient")
            continue
        table = bids.group_table_path(results, name, "evaluation")
        evaluation = pd.read_csv(table, sep="\t")
        print(f"[demo] {name}: patients' mean AUROC {evaluation['auroc'].mean():.3f}, AUPRC "
              f"{evaluation['auprc'].mean():.3f}, Dice at the calibrated threshold "
              f"{evaluation['dice'].mean():.3f} (oracle {evaluation['oracle_dice'].mean():.3f})")
    report = bids.group_report_path(results)
    print(f"[demo] done in {_duration(time.monotonic() - start)}; results in {results}, report "
          f"{report}", flush=True)
    return report
