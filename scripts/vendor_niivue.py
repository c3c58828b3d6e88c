"""Vendor the NiiVue browser bundle into ``bids_anomaly/reports/assets``.

Run at development time, never at run time: the reports inline the vendored file so that
they open from disk with no network. The package is fetched from the npm registry with
``npm pack`` (``npm`` must be on the PATH), its single-file UMD build (which defines the
global ``niivue``) is copied, gzipped, to ``assets/niivue.js.gz``, its licence to
``assets/NIIVUE_LICENSE`` and the version to ``assets/NIIVUE_VERSION``.

Usage::

    python scripts/vendor_niivue.py [--version 0.69.0]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.69.0"
PACKAGE = "@niivue/niivue"
BUNDLE = "package/dist/niivue.umd.js"
ASSETS = Path(__file__).resolve().parents[1] / "bids_anomaly" / "reports" / "assets"

# The npm tarball ships no LICENSE file; this is the text of LICENSE in the upstream
# repository (https://github.com/niivue/niivue), which package.json names ("BSD-2-Clause").
UPSTREAM_LICENSE = """\
BSD 2-Clause License

Copyright (c) 2021, Niivue
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def npm_pack(spec: str, folder: Path) -> Path:
    """Download a package tarball with ``npm pack`` and return its path.

    Parameters
    ----------
    spec : str
        ``name@version`` (or a semver range) of the package.
    folder : Path
        Where the tarball is written.

    Returns
    -------
    Path
        The downloaded ``.tgz``.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not on the PATH")
    result = subprocess.run([npm, "pack", spec, "--silent"], cwd=folder,
                            capture_output=True, text=True, check=True)
    name = result.stdout.strip().splitlines()[-1]
    return folder / name


def _member_text(archive: tarfile.TarFile, name: str) -> bytes:
    member = archive.extractfile(name)
    if member is None:
        raise SystemExit(f"{name} is not a regular file in the tarball")
    return member.read()


def _licence(archive: tarfile.TarFile) -> tuple[str | None, dict]:
    """The top-level LICENSE text of an npm tarball (None if absent) and its package.json."""
    names = [n for n in archive.getnames() if n.count("/") == 1]
    manifest = json.loads(_member_text(archive, "package/package.json"))
    licences = sorted(n for n in names
                      if Path(n).name.upper().startswith(("LICENSE", "LICENCE", "COPYING")))
    text = _member_text(archive, licences[0]).decode() if licences else None
    return text, manifest


def dependency_notices(dependencies: dict[str, str], folder: Path) -> str:
    """The licences of the packages bundled into the NiiVue build (its dependencies).

    Parameters
    ----------
    dependencies : dict of str to str
        ``package.json``'s dependencies: name to semver range.
    folder : Path
        Scratch folder for the tarballs.

    Returns
    -------
    str
        One section per dependency: name, version, licence identifier and text.
    """
    sections = []
    for name, spec in sorted(dependencies.items()):
        with tarfile.open(npm_pack(f"{name}@{spec}", folder)) as archive:
            text, manifest = _licence(archive)
        header = (f"{name} {spec} (licence of {manifest.get('version')}, the latest in that "
                  f"range: {manifest.get('license', 'see below')})")
        sections.append(f"{'=' * 78}\n{header}\n\n{(text or 'no licence file shipped').strip()}\n")
    return "\n".join(sections)


def vendor(version: str = VERSION, assets: Path = ASSETS) -> Path:
    """Fetch NiiVue ``version`` and write the bundle, its licence and version into ``assets``.

    Parameters
    ----------
    version : str
        Exact version of ``@niivue/niivue`` to vendor.
    assets : Path
        Destination folder.

    Returns
    -------
    Path
        The vendored bundle.
    """
    assets.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = npm_pack(f"{PACKAGE}@{version}", Path(tmp))
        with tarfile.open(tarball) as archive:
            if BUNDLE not in archive.getnames():
                raise SystemExit(f"{BUNDLE} not in {tarball.name}; the package layout changed")
            bundle = _member_text(archive, BUNDLE)
            licence, manifest = _licence(archive)
        licence = licence or UPSTREAM_LICENSE
        # the UMD build bundles NiiVue's dependencies: their notices go along
        notices = dependency_notices(manifest.get("dependencies", {}), Path(tmp))
    if b"import(" in bundle or b"new Worker(" in bundle:
        raise SystemExit("the bundle loads further code at run time; it cannot be inlined")
    target = assets / "niivue.js.gz"  # gzipped (mtime 0: same bytes every time), a third
    target.write_bytes(gzip.compress(bundle, compresslevel=9, mtime=0))
    (assets / "NIIVUE_LICENSE").write_text(
        f"NiiVue {version} ({PACKAGE} on npm, https://github.com/niivue/niivue)\n"
        f"vendored as niivue.js.gz from {BUNDLE.removeprefix('package/')}\n\n{licence}\n"
        "The build bundles these packages, under their own licences:\n\n" + notices)
    (assets / "NIIVUE_VERSION").write_text(f"{version}\n")
    digest = hashlib.sha256(bundle).hexdigest()
    print(f"NiiVue {version}: {target} ({len(bundle) / 1e6:.2f} MB, sha256 {digest})")
    return target


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=VERSION, help="@niivue/niivue version to vendor")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="destination folder")
    args = parser.parse_args(argv)
    vendor(args.version, args.assets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
