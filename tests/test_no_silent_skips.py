"""A broken install must fail the tests, not skip them: no test may import the project's own
packages or its hard dependencies (pyproject ``dependencies``) through ``pytest.importorskip``,
or swallow their ImportError, and ``make test`` fails when pytest collects nothing. Optional
extras may still be skipped when absent."""

from __future__ import annotations

import ast
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def required_modules() -> set[str]:
    """Top-level import names that must be present: the project's packages and every module
    the installed hard dependencies provide (``scikit-learn`` -> ``sklearn``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {
        pattern.rstrip("*").rstrip(".")
        for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    distributions = {
        Requirement(spec).name.lower().replace("_", "-")
        for spec in project["project"]["dependencies"]
    }
    provided = {
        module
        for module, owners in packages_distributions().items()
        if any(owner.lower().replace("_", "-") in distributions for owner in owners)
    }
    as_modules = {name.replace("-", "_") for name in distributions}  # in case one is missing
    return packages | provided | as_modules


def silent_skips(source: str, required: set[str]) -> list[str]:
    """Each place in ``source`` where a missing required module would skip instead of fail."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name != "importorskip":
                continue
            keyword = {k.arg: k.value for k in node.keywords}.get("modname")
            first = node.args[0] if node.args else keyword
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                found.append(f"line {node.lineno}: importorskip of a computed module name")
            elif first.value.split(".")[0] in required:
                found.append(f"line {node.lineno}: importorskip of required module {first.value!r}")
        elif isinstance(node, ast.ExceptHandler) and node.type is not None:
            caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names = {getattr(c, "id", getattr(c, "attr", None)) for c in caught}
            if names & {"ImportError", "ModuleNotFoundError"}:
                found.append(f"line {node.lineno}: except ImportError")
    return found


def test_required_modules_come_from_pyproject() -> None:
    required = required_modules()
    expected = {"mlcore", "target_service", "defenses", "attacker"}
    expected |= {"torch", "numpy", "scipy", "sklearn", "numba", "fastapi", "pydantic_settings"}
    assert expected <= required, sorted(expected - required)


def test_no_test_skips_when_a_required_module_is_missing() -> None:
    required = required_modules()
    problems = {
        str(path.relative_to(ROOT)): found
        for path in sorted(TESTS.rglob("*.py"))
        if (found := silent_skips(path.read_text(encoding="utf-8"), required))
    }
    assert problems == {}, "import these normally, so a broken install fails: " + str(problems)


def test_make_test_fails_when_no_test_is_collected() -> None:
    """pytest exits 5 when it collects nothing (a broken checkout or install): `make test`
    must pass that exit code on, not turn it into success."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "pytest" in recipe and "rc" not in recipe and "||" not in recipe, recipe


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            'import pytest\ntorch = pytest.importorskip(modname="torch")',
            ["line 2: importorskip of required module 'torch'"],
        ),
        ('from pytest import importorskip\nimportorskip("sklearn.datasets")', ["line 2"]),
        ("pytest.importorskip(modname='mlcore.mutual_information')", ["line 1"]),
        ("pytest.importorskip(name)", ["line 1: importorskip of a computed module name"]),
        ("try:\n    import numba\nexcept (ImportError, OSError):\n    pass", ["line 3"]),
        ('pytest.importorskip("psycopg")', []),  # an optional extra may be skipped
        ("try:\n    x = 1\nexcept ValueError:\n    pass", []),
    ],
)
def test_the_scan_finds_each_kind_of_silent_skip(source: str, expected: list[str]) -> None:
    found = silent_skips(source, {"torch", "sklearn", "mlcore", "numba"})
    assert len(found) == len(expected)
    assert all(f.startswith(e) for f, e in zip(found, expected, strict=True))
