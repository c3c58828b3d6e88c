"""Same seed, same bytes; a killed run resumes to the same bytes; no process outlives a run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tree_digest, write_minimal_bids

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two generated subjects with T1w and FLAIR."""
    from bids_anomaly.simulation.synthetic import synthetic_subject

    subjects = {}
    for label, seed in (("01", 11), ("02", 12)):
        images = synthetic_subject(seed=seed, lesions=label == "01")
        subjects[label] = {"T1w": images["T1w"], "FLAIR": images["FLAIR"]}
    return write_minimal_bids(tmp_path_factory.mktemp("repro") / "bids", subjects)


def _command(bids: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bids_anomaly", str(bids), str(out), "participant",
            "-w", str(out.parent / "work"), *extra]


def derivative_digest(out: Path) -> dict[str, str]:
    """SHA-256 of every derivative (logs left out: they hold times and paths)."""
    return {name: digest for name, digest in tree_digest(out).items()
            if not name.startswith("logs/")}


def _descendants(pid: int) -> set[int]:
    """Live (not zombie) processes below ``pid``, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = set(), [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_same_seed_same_bytes_and_a_killed_run_resumes_to_them(dataset, tmp_path):
    """Run a goes through; run b is killed (-9) after its registration and resumed.

    Every step of b is computed once, before the kill (from the conformed images to the
    registration) or after it (the rest), in two processes, and the derivatives must be a's
    bytes: the same seed gives the same bytes and the resumed run those of an uninterrupted
    one (two uninterrupted runs and a third resumed one, as this test ran before, computed
    each step a third time).
    """
    options = ("--participant-label", "01", "--nprocs", "1", "--omp-nthreads", "1",
               "--random-seed", "3")
    out = tmp_path / "a" / "out"
    result = subprocess.run(_command(dataset, out, *options), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = derivative_digest(out)
    assert len(expected) > 15

    # kill -9 once the registration to the template has finished, then resume
    out = tmp_path / "b" / "out"
    in_a = list((tmp_path / "a" / "work").rglob("result_register_to_template.pklz"))[0]
    marker = out.parent / "work" / in_a.relative_to(tmp_path / "a" / "work")
    process = subprocess.Popen(_command(dataset, out, *options), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)

    def registered() -> bool:  # its result written and its hash file final (Nipype's cache)
        return marker.exists() and any(not name.name.endswith("_unfinished.json")
                                       for name in marker.parent.glob("_0x*.json"))

    try:
        assert _wait_for(registered, 600), "the registration never finished"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert not (out / "sub-01.html").exists()  # killed before the end
    registered_at = marker.stat().st_mtime_ns
    result = subprocess.run(_command(dataset, out, *options), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert derivative_digest(out) == expected
    assert marker.stat().st_mtime_ns == registered_at  # resumed, not registered again


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_no_process_outlives_a_stopped_run(dataset, tmp_path, how):
    process = subprocess.Popen(_command(dataset, tmp_path / "out", "--nprocs", "2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    seen: set[int] = set()

    def workers_started() -> bool:
        seen.update(_descendants(process.pid))
        return len(seen) >= 3  # resource tracker, fork server, a worker

    try:
        assert _wait_for(workers_started, 120), f"no workers started: {seen}"
        time.sleep(2)  # the workers are inside their first steps
        seen.update(_descendants(process.pid))
        process.send_signal(how)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    if how == signal.SIGTERM:
        assert process.returncode == 143
        assert "Traceback" not in err and "ERROR" not in err, err
        assert err.strip().splitlines()[-1].startswith("bids_anomaly: stopped by SIGTERM")
    assert _wait_for(lambda: not _alive(seen), 20), f"orphans: {_alive(seen)}"
