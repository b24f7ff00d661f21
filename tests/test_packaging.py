"""Packaging: the license ships, the dependencies are what the package imports, nothing points outside the repo."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_offload"

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")

# imported only inside `try: ... except ImportError`, each with a fallback or a clear message (datasets: the
# `examples` extra, asked for by `hf_offload.demo.import_datasets`)
OPTIONAL = {"deepspeed", "psutil", "datasets"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        name = requirement.split(";")[0]
        for separator in "<>=!~[ ":
            name = name.split(separator)[0]
        names.add(name.strip().lower().replace("-", "_"))
    return names


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found.update(name.split(".")[0] for name in names)
    return {name for name in found if name not in stdlib and name not in ("hf_offload", "__future__")}


def test_the_license_ships_in_full():
    text = (ROOT / "LICENSE").read_text()
    assert _project()["license"] == "Apache-2.0" and "LICENSE" in _project()["license-files"]
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_dependencies_are_what_the_package_imports():
    declared = _requirement_names(_project()["dependencies"])
    imported = _third_party_imports() - OPTIONAL  # every one imported under its distribution's name
    assert imported == declared, f"not declared: {imported - declared}; declared, not imported: {declared - imported}"
    examples = _requirement_names(_project()["optional-dependencies"]["examples"])
    assert "datasets" not in declared and "datasets" in examples


def test_no_type_marker_without_a_type_check():
    """py.typed promises checked annotations; none ships until `mypy hf_offload` is clean in CI."""
    assert not (PACKAGE / "py.typed").exists()
    assert "py.typed" not in (ROOT / "pyproject.toml").read_text()
