"""The layering stays whole: `lint-imports` (in `make test`) checks the contracts of
pyproject.toml; these tests check that the contracts themselves cover everything."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"


def _contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    contracts: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return {c["name"]: c for c in contracts}


def test_the_core_contract_names_every_runtime_module() -> None:
    """Every module of tvdnet outside core is forbidden to the core: a module added to the
    runtime without being listed would escape the contract."""
    contract = _contracts()["The core uses nothing of the trio runtime around it"]
    runtime = {
        "tvdnet." + path.stem
        for path in (SRC / "tvdnet").glob("*.py")
        if path.stem not in ("__init__", "__main__")
    }
    assert set(contract["forbidden_modules"]) == runtime


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_nothing_outside_the_guest_library_imports_a_private_tvdnet_module() -> None:
    outside = [
        *(SRC / "device_bridge").rglob("*.py"),
        *(SRC / "tvdnet_tools").rglob("*.py"),
        *(REPO / "benchmarks").rglob("*.py"),
        *(REPO / "e2e").rglob("*.py"),
        *(REPO / "examples").rglob("*.py"),
    ]
    private = {
        str(path.relative_to(REPO)): sorted(
            name for name in _imports(path) if name.startswith("tvdnet._")
        )
        for path in outside
    }
    assert {path: names for path, names in private.items() if names} == {}
