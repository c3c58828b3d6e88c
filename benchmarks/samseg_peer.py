"""Peer baseline: FreeSurfer's SAMSEG in lesion mode, run from its own virtual environment.

SAMSEG (``samseg`` 0.4a0 on PyPI, MIT; Cerri et al., NeuroImage 2021) needs numpy < 2 and
tensorflow, so it never becomes a dependency of the project: :func:`build_env` makes a separate
virtual environment once, and :func:`run_samseg_lesion` calls its ``run_samseg`` there as a
subprocess. Its atlas, lesion prior and lesion-shape VAE ship inside the wheel, so it runs offline
once installed.

Usage (by hand, never in CI; the project's Python with nibabel, scipy and scikit-learn)::

    python benchmarks/samseg_peer.py --env /work/runs/samseg/env --out /work/runs/samseg/RUN \
        --threads 2 sub-X_T1w.nii.gz sub-X_FLAIR.nii.gz [sub-X_T2w.nii.gz]

What it runs, read from the package's source (``samseg/cli/run_samseg.py``, ``Samseg.py``,
``SamsegLesion.py``, ``SamsegUtility.py``):

- ``run_samseg --input IMG... --lesion --lesion-mask-pattern P... --pallidum-separate
  --save-posteriors Lesions --threads N``, as SAMSEG's documentation gives for MS (T1w + FLAIR,
  pattern ``0 1``: lesions only where FLAIR is above the cortex mean, T1w unconstrained; T2w and
  PDw also ``1``). Sampling (50 burn-in + 50 samples), threshold 0.3 and seed 12345 are the
  package's defaults. Contrast names are not needed: SAMSEG is contrast-adaptive; the order only
  matters because the first image is the reference (the atlas is affinely registered to it and
  every output is written on its grid) and the pattern follows the order. Put the T1w first.
- All inputs must be on one voxel grid: ``readCroppedImages`` crops every image with the first
  image's index box and stacks the arrays. ``run_samseg --coregister`` would rigidly register and
  resample the others onto the first (GEMS ``KvlRigidRegistration``, 4th-order B-spline) but does
  not keep the transform, so this module runs that same GEMS call itself for every input whose
  grid differs from the first, keeps the matrix, and hands SAMSEG the resampled images. The
  posterior is then also carried back onto each such input's own grid (``space-<mode>``).
- ``posteriors/Lesions.mgz`` is the lesion posterior: the mean, over the 50 post-burn-in Gibbs
  sweeps, of each voxel's lesion probability given the VAE shape prior and the tied lesion
  Gaussian; it is zero outside SAMSEG's brain mask. It is rewritten here as NIfTI on the first
  input's grid (``lesion_posterior.nii.gz``).

Results are cached: a finished output folder (``result.json``) is not run again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

# The set that installed and ran (CPU only, Python 3.11, Linux x86-64).
SAMSEG_REQUIREMENTS: tuple[str, ...] = (
    "samseg==0.4a0",
    "numpy==1.26.4",
    "tensorflow-cpu==2.21.0",
)
ENV_MARKER = "samseg_peer_env.json"
RESULT = "result.json"
POSTERIOR = "lesion_posterior.nii.gz"

# SAMSEG's --lesion-mask-pattern per contrast: +1 lesions brighter than the cortex mean,
# -1 darker, 0 unconstrained (SAMSEG's documented MS setting: T1w 0, FLAIR 1).
LESION_DIRECTION: dict[str, int] = {"T1w": 0, "FLAIR": 1, "T2w": 1, "PDw": 1}

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK (GEMS) physical space is LPS, nibabel's is RAS

_COREGISTER = """
import sys
import numpy as np
from samseg import gems
fixed, moving, out, matrix, threads = sys.argv[1:6]
gems.setGlobalDefaultNumberOfThreads(int(threads))
registerer = gems.KvlRigidRegistration()
registerer.read_images(fixed, moving)
registerer.initialize_transform()
registerer.register()
registerer.write_out_result(out)
np.savetxt(matrix, np.asarray(registerer.get_transformation_matrix()))
"""


@dataclass
class SamsegResult:
    """One SAMSEG lesion-mode run: where its posterior is and how long it took."""

    posterior: Path
    seconds: float
    samseg_seconds: float
    coregister_seconds: float
    out_dir: Path
    command: list[str]
    inputs: list[str]
    modes: list[str]
    mask_pattern: list[int]
    threads: int
    posteriors_on_input_grids: dict[str, str] = field(default_factory=dict)
    cpu_seconds: float = float("nan")
    load_average: list[float] = field(default_factory=list)
    cached: bool = False


def venv_python(env_dir: Path) -> Path:
    """Return the interpreter of the virtual environment ``env_dir``."""
    sub = "Scripts/python.exe" if os.name == "nt" else "bin/python"
    return Path(env_dir) / sub


def build_env(
    env_dir: Path | str,
    base_python: str | None = None,
    requirements: tuple[str, ...] = SAMSEG_REQUIREMENTS,
) -> Path:
    """Create SAMSEG's own virtual environment in ``env_dir`` once; return its python.

    Skipped when ``env_dir`` already holds a marker written by a successful install of the same
    requirements. Needs the package index once (about 1.1 GB with tensorflow-cpu); nothing after.
    """
    env_dir = Path(env_dir)
    python = venv_python(env_dir)
    marker = env_dir / ENV_MARKER
    if marker.exists() and python.exists():
        if json.loads(marker.read_text()).get("requirements") == list(requirements):
            return python
    base = base_python or getattr(sys, "_base_executable", None) or sys.executable
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(env_dir)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, *requirements], check=True)
    check = (
        "import numpy, samseg, surfa, tensorflow, os;"
        "from samseg.SamsegLesion import SamsegLesion;"
        "atlas = os.path.join(samseg.SAMSEGDIR, 'atlas');"
        "assert os.path.isfile(os.path.join(atlas, 'Lesion_Components', 'VAE', 'model.ckpt.meta'));"
        "print(numpy.__version__, tensorflow.__version__, surfa.__version__)"
    )
    subprocess.run([str(python), "-c", check], check=True, env=_thread_env(1))
    freeze = subprocess.run(
        [str(python), "-m", "pip", "freeze"], check=True, capture_output=True, text=True
    ).stdout.split()
    marker.write_text(
        json.dumps({"requirements": list(requirements), "freeze": freeze}, indent=1) + "\n"
    )
    return python


def contrast_of(path: Path | str) -> str | None:
    """Return the BIDS suffix (``T1w``, ``FLAIR``, ``T2w``, ``PDw``) of an image file name."""
    name = Path(path).name
    match = re.search(r"_([A-Za-z0-9]+)\.nii(\.gz)?$", name)
    if match and match.group(1) in LESION_DIRECTION:
        return match.group(1)
    return None


def same_grid(a: Path | str, b: Path | str, atol: float = 1e-3) -> bool:
    """Whether two images share shape and voxel-to-world affine."""
    ia, ib = nib.load(str(a)), nib.load(str(b))
    return ia.shape[:3] == ib.shape[:3] and np.allclose(ia.affine, ib.affine, atol=atol)


def _thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    n = str(threads)
    for var in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
        "TF_NUM_INTRAOP_THREADS",
    ):
        env[var] = n
    env["TF_NUM_INTEROP_THREADS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("PYTHONPATH", None)
    return env


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes (robust to other load)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _fixed_to_moving_ras(matrix: np.ndarray) -> np.ndarray:
    """GEMS' rigid matrix (fixed -> moving points, LPS mm) as a RAS world-to-world matrix."""
    return _LPS @ matrix @ _LPS


def carry_to_grid(
    image: Path | str, target: Path | str, fixed_to_moving: np.ndarray, out: Path | str
) -> Path:
    """Resample ``image`` (on the fixed grid) onto ``target``'s grid, trilinear, 0 outside.

    ``fixed_to_moving`` maps RAS world points of the fixed image to those of ``target`` (the
    moving image of the registration), so a target voxel ``v`` reads ``image`` at
    ``A_fixed^-1 @ inv(fixed_to_moving) @ A_target @ v``.
    """
    from scipy.ndimage import affine_transform

    src, dst = nib.load(str(image)), nib.load(str(target))
    vox = np.linalg.inv(src.affine) @ np.linalg.inv(fixed_to_moving) @ dst.affine
    data = np.asarray(src.dataobj, dtype=np.float32)
    carried = affine_transform(
        data, vox[:3, :3], offset=vox[:3, 3], output_shape=dst.shape[:3], order=1, cval=0.0
    )
    out_img = nib.Nifti1Image(np.clip(carried, 0, 1).astype(np.float32), dst.affine)
    out_img.set_qform(dst.affine, code=1)
    out_img.set_sform(dst.affine, code=1)
    nib.save(out_img, str(out))
    return Path(out)


def _mode_names(images: list[Path], contrasts: list[str | None]) -> list[str]:
    names: list[str] = []
    for i, contrast in enumerate(contrasts):
        name = contrast.lower() if contrast else f"mode{i + 1:02d}"
        names.append(name if name not in names else f"{name}{i + 1}")
    return names


def run_samseg_lesion(
    images: list[Path | str],
    out_dir: Path | str,
    python: Path | str,
    threads: int = 2,
    mask_pattern: list[int] | None = None,
    pallidum_separate: bool = True,
    extra_args: tuple[str, ...] = (),
    force: bool = False,
) -> SamsegResult:
    """Run SAMSEG lesion mode on co-acquired images of one session; cache in ``out_dir``.

    ``images``: the first is the reference grid (put the T1w first); the others are rigidly
    co-registered and resampled onto it by GEMS when their grid differs. ``mask_pattern``
    defaults to :data:`LESION_DIRECTION` of each file's BIDS suffix. ``python`` is the
    interpreter of :func:`build_env`'s environment. Returns the NIfTI lesion posterior on the
    first image's grid and the wall seconds (co-registration included).
    """
    out_dir = Path(out_dir)
    result_file = out_dir / RESULT
    images = [Path(p).resolve() for p in images]
    if result_file.exists() and not force:
        done = json.loads(result_file.read_text())
        if done["inputs"] == [str(p) for p in images]:
            done["posterior"] = Path(done["posterior"])
            done["out_dir"] = Path(done["out_dir"])
            done["cached"] = True
            return SamsegResult(**done)
    contrasts = [contrast_of(p) for p in images]
    if mask_pattern is None:
        if None in contrasts:
            raise ValueError(f"cannot tell the contrast of {images}; pass mask_pattern")
        mask_pattern = [LESION_DIRECTION[c] for c in contrasts if c is not None]
    if len(mask_pattern) != len(images):
        raise ValueError("one lesion mask pattern value per image")
    modes = _mode_names(images, contrasts)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = _thread_env(threads)
    log = (out_dir / "samseg.log").open("w")
    load_start = os.getloadavg()[0]
    cpu_start = _children_cpu()
    start = time.perf_counter()

    # Co-register every input not on the first image's grid (as run_samseg --coregister does).
    inputs = [str(images[0])]
    matrices: dict[str, np.ndarray] = {}
    for image, mode in zip(images[1:], modes[1:], strict=True):
        if same_grid(images[0], image):
            inputs.append(str(image))
            continue
        moved = out_dir / f"{mode}_coreg-{modes[0]}.nii.gz"
        matrix = out_dir / f"{mode}_coreg-{modes[0]}_rigid.txt"
        cmd = [str(python), "-c", _COREGISTER, str(images[0]), str(image), str(moved)]
        subprocess.run(
            [*cmd, str(matrix), str(threads)], check=True, env=env, stdout=log, stderr=log
        )
        inputs.append(str(moved))
        matrices[mode] = np.loadtxt(matrix)
    coregistered = time.perf_counter()

    samseg_dir = out_dir / "samseg"
    command = [
        str(python), "-m", "samseg.cli.run_samseg",
        "--input", *inputs,
        "--output", str(samseg_dir),
        "--mode", *modes,
        "--threads", str(threads),
        "--lesion",
        "--lesion-mask-pattern", *[str(p) for p in mask_pattern],
        "--save-posteriors", "Lesions",
    ]  # fmt: skip
    if pallidum_separate:
        command.append("--pallidum-separate")
    command.extend(extra_args)
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    finished = time.perf_counter()
    log.close()

    # posteriors/Lesions.mgz (first image's grid) -> NIfTI with the first image's own affine.
    reference = nib.load(str(images[0]))
    mgz = nib.load(str(samseg_dir / "posteriors" / "Lesions.mgz"))
    if mgz.shape[:3] != reference.shape[:3] or not np.allclose(
        mgz.affine, reference.affine, atol=1e-3
    ):
        raise RuntimeError("SAMSEG's posterior is not on the first input's grid")
    data = np.asarray(mgz.dataobj, dtype=np.float32).reshape(reference.shape[:3])
    posterior_img = nib.Nifti1Image(data, reference.affine)
    posterior_img.set_qform(reference.affine, code=1)
    posterior_img.set_sform(reference.affine, code=1)
    posterior = out_dir / POSTERIOR
    nib.save(posterior_img, str(posterior))
    on_grids: dict[str, str] = {}
    for image, mode in zip(images[1:], modes[1:], strict=True):
        if mode in matrices:
            carried = out_dir / f"lesion_posterior_space-{mode}.nii.gz"
            ras = _fixed_to_moving_ras(matrices[mode])
            on_grids[mode] = str(carry_to_grid(posterior, image, ras, carried))

    result = SamsegResult(
        posterior=posterior,
        seconds=finished - start,
        samseg_seconds=finished - coregistered,
        coregister_seconds=coregistered - start,
        out_dir=out_dir,
        command=command,
        inputs=[str(p) for p in images],
        modes=modes,
        mask_pattern=list(mask_pattern),
        threads=threads,
        posteriors_on_input_grids=on_grids,
        cpu_seconds=_children_cpu() - cpu_start,
        load_average=[load_start, os.getloadavg()[0]],  # other work on the machine, if any
    )
    record = asdict(result)
    record.update(posterior=str(posterior), out_dir=str(out_dir), cached=False)
    result_file.write_text(json.dumps(record, indent=1) + "\n")
    return result


def oracle_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Best Dice of ``scores >= t`` over every threshold ``t``; return (Dice, t)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], truth[order].astype(np.float64)
    tp = np.cumsum(y)
    last = np.r_[s[1:] != s[:-1], True]  # thresholds between distinct values only
    n_pred = np.arange(1, len(s) + 1)[last]
    dice = 2 * tp[last] / (n_pred + y.sum())
    best = int(np.argmax(dice))
    return float(dice[best]), float(s[last][best])


def lesion_scores(
    posterior: Path | str, mask: Path | str, support: Path | str, erode: int = 2
) -> dict[str, float]:
    """Voxel AUPRC, oracle Dice and Dice at 0.5 inside ``support``'s eroded nonzero region."""
    from scipy.ndimage import binary_erosion
    from sklearn.metrics import average_precision_score

    p = np.asarray(nib.load(str(posterior)).dataobj, dtype=np.float64)
    y = np.asarray(nib.load(str(mask)).dataobj) > 0
    region = binary_erosion(np.asarray(nib.load(str(support)).dataobj) != 0, iterations=erode)
    s, t = p[region], y[region]
    best, at = oracle_dice(s, t)
    pred = s >= 0.5
    return {
        "auprc": float(average_precision_score(t, s)),
        "oracle_dice": best,
        "oracle_threshold": at,
        "dice_at_0.5": float(2 * (pred & t).sum() / (pred.sum() + t.sum())),
        "voxels": int(region.sum()),
        "lesion_voxels": int(t.sum()),
    }


def _update_times(times: Path, result: SamsegResult) -> None:
    rows: list[dict[str, str]] = []
    if times.exists():
        with times.open() as f:
            rows = [r for r in csv.DictReader(f, delimiter="\t") if r["run"] != result.out_dir.name]
    rows.append(
        {
            "run": result.out_dir.name,
            "seconds": f"{result.seconds:.1f}",
            "samseg_seconds": f"{result.samseg_seconds:.1f}",
            "coregister_seconds": f"{result.coregister_seconds:.1f}",
            "cpu_seconds": f"{result.cpu_seconds:.1f}",
            "threads": str(result.threads),
            "inputs": " ".join(Path(p).name for p in result.inputs),
        }
    )
    with times.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="T1w first, then FLAIR [, T2w]")
    parser.add_argument("--env", type=Path, required=True, help="SAMSEG's venv (built if absent)")
    parser.add_argument("--out", type=Path, required=True, help="output folder of this run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mask-pattern", type=int, nargs="+", help="default: from BIDS suffix")
    parser.add_argument("--times", type=Path, help="TSV of seconds per run to update")
    parser.add_argument("--lesion-mask", type=Path, help="score the posterior against this mask")
    parser.add_argument("--support", type=Path, help="image whose nonzero support (eroded) scores")
    parser.add_argument("--force", action="store_true", help="run again even if cached")
    args = parser.parse_args(argv)

    python = build_env(args.env)
    result = run_samseg_lesion(
        args.images, args.out, python, args.threads, args.mask_pattern, force=args.force
    )
    if args.times:
        _update_times(args.times, result)
    summary: dict[str, object] = {
        "posterior": str(result.posterior),
        "seconds": round(result.seconds, 1),
        "cached": result.cached,
        **result.posteriors_on_input_grids,
    }
    if args.lesion_mask:
        support = args.support or args.images[min(1, len(args.images) - 1)]
        summary.update(lesion_scores(result.posterior, args.lesion_mask, support))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
