"""The container recipes agree with the package and pass their linters (no engine needed)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bids_anomaly import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_carry_the_package_version():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG VERSION={re.escape(__version__)}$", dockerfile, re.M)
    assert f"org.opencontainers.image.version {__version__}" in (
        ROOT / "Singularity.def").read_text()
    assert 'ENTRYPOINT ["bids_anomaly"]' in dockerfile


def test_pinned_requirements_satisfy_the_package():
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = {}
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = version
    for text in requires("bids_anomaly"):
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue  # extras (test, bench) are not in the images
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not pinned in docker/requirements.txt"
        assert requirement.specifier.contains(pinned[name]), (name, pinned[name])


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_dockerfile_has_no_hadolint_errors():
    result = subprocess.run(["hadolint", "--failure-threshold", "error", "Dockerfile"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_smoke_script_is_valid_bash():
    subprocess.run(["bash", "-n", "scripts/container-smoke.sh"], cwd=ROOT, check=True)
