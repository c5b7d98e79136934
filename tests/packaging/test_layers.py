"""Imports point down: the foundation knows nothing of what stands on it, and only the CLI knows everything.

Layers, bottom up: `mokd.core` < `mokd_eval` < `mokd_analysis` < `mokd_train` < `mokd.cli`. The trainer stands on
the evaluation (its demo and online k-NN) and the analyses (its curves); the analyses on the evaluation protocols.
`python -m mokd_train` (`mokd_train/__main__.py`) is an entry point like `cli.py` and may import the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"mokd/core": "mokd.core", "mokd_eval": "mokd_eval", "analysis": "mokd_analysis",
            "mokd_train": "mokd_train", "mokd/cli": "mokd.cli"}
LAYER = {name: rank for rank, name in enumerate(PACKAGES.values())}
ENTRY_POINTS = {ROOT / "mokd_train" / "__main__.py"}


def layer_of(module: str) -> str | None:
    return next((name for name in LAYER if module == name or module.startswith(name + ".")), None)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def sources() -> list[tuple[str, Path]]:
    return [(package, path) for folder, package in PACKAGES.items()
            for path in sorted((ROOT / folder).rglob("*.py")) if path not in ENTRY_POINTS]


@pytest.mark.parametrize("package,path", sources(), ids=lambda value: str(value).replace(str(ROOT) + "/", ""))
def test_imports_point_down(package: str, path: Path) -> None:
    upward = sorted(module for module in imported_modules(path)
                    if (target := layer_of(module)) is not None and LAYER[target] > LAYER[package])
    assert upward == [], f"{path.relative_to(ROOT)} ({package}) imports from a higher layer: {upward}"


def test_no_generic_top_level_import_remains() -> None:
    """Nothing imports the checkout-only `cli` module or the folder name `analysis`."""
    offenders = [str(path.relative_to(ROOT)) for _, path in sources()
                 if {"cli", "analysis"} & {module.split(".")[0] for module in imported_modules(path)}]
    assert offenders == []
