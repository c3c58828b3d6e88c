"""Write ``docker/requirements.txt``: the installed versions of bids_anomaly's dependency closure.

Run in the environment the test suite passed in, after a dependency change::

    python scripts/pin_requirements.py > docker/requirements.txt

The container images install exactly these versions (local version labels such as ``+cpu`` are
dropped: the PyTorch index the build uses decides between the CPU and CUDA builds).
"""

from __future__ import annotations

import importlib.metadata as metadata
import re

from packaging.markers import Marker

HEADER = """\
# Pinned runtime dependencies of the container images: the versions the test suite passed
# with (Python 3.11, linux x86_64). Regenerate after a dependency change with
# python scripts/pin_requirements.py > docker/requirements.txt. torch comes from the PyTorch
# index given by TORCH_INDEX_URL (CPU or a CUDA build of the same version)."""


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(root: str = "bids_anomaly") -> dict[str, str]:
    """Installed version of every distribution ``root`` needs, directly or not (no extras)."""
    versions: dict[str, str] = {}
    stack = [root]
    while stack:
        dist = metadata.distribution(stack.pop())
        key = _key(dist.metadata["Name"])
        if key in versions:
            continue
        versions[key] = dist.version.split("+")[0]
        for requirement in dist.requires or []:
            name, _, marker = requirement.partition(";")
            if marker and not Marker(marker).evaluate({"extra": ""}):
                continue
            stack.append(re.match(r"^([A-Za-z0-9_.\-]+)", name.strip()).group(1))
    versions.pop(_key(root))
    return versions


def main() -> None:
    """Print the pinned requirements."""
    print(HEADER)
    for name, version in sorted(dependency_closure().items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
