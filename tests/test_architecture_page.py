"""docs/architecture.md, the map of the package, names what is there and nothing else."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bids_anomaly"
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
MAP = "\n".join(re.findall(r"```\n(.*?)```", PAGE, re.DOTALL))  # the two maps


def named(folder: Path) -> set[str]:
    """The modules and packages of a folder, as the map writes them (``x.py``, ``x/``)."""
    return {f"{p.name}/" if p.is_dir() else p.name for p in folder.iterdir()
            if p.name != "__pycache__" and (p.suffix == ".py" and p.name != "__init__.py"
                                            or (p / "__init__.py").is_file())}


def test_the_map_names_every_package_and_module_of_the_layers():
    expected = named(PACKAGE) | named(PACKAGE / "models")
    missing = {name for name in expected if not re.search(rf"(?<![\w.]){re.escape(name)}", MAP)}
    assert not missing


def test_every_file_the_map_names_exists():
    files = {p.name for p in PACKAGE.rglob("*.py")} | {
        f"{p.name}/" for p in PACKAGE.rglob("*") if (p / "__init__.py").is_file()}
    mentioned = set(re.findall(r"(?<![\w.])(\w+\.py|\w+/)(?=[\s,:;)])", MAP))
    assert mentioned - {"bids_anomaly/", "assets/"} <= files
