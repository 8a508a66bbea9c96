"""The install declares what the code imports, so a new virtual environment runs the tests."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_normal(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported(folder: Path) -> set[str]:
    """Top-level modules named by plain import statements (optional imports that go through
    importlib, with an install hint, are left to the code that makes them)."""
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"skinflint", "tests", "__future__"}


def test_every_imported_package_is_declared() -> None:
    owners = packages_distributions()
    declared = _declared()
    missing = {
        module: owners.get(module, ["not installed"])
        for module in sorted(_imported(ROOT / "skinflint") | _imported(ROOT / "tests"))
        if not declared & {_normal(d) for d in owners.get(module, [])}
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_constraints_pin_every_declared_package() -> None:
    pinned = {
        _normal(line.split("==")[0])
        for line in (ROOT / "requirements" / "dev.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert _declared() - {"skinflint"} <= pinned
