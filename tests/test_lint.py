"""The code base stays ruff clean and mypy clean (both are test dependencies), and no function
under ``src/goodnet`` runs over 50 lines."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    run = subprocess.run([ruff, "check", "src", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_mypy_clean():
    """``mypy`` on ``src/`` (its settings are in pyproject.toml) reports no error."""
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "Success: no issues found" in run.stdout


MAX_FUNCTION_LINES = 50


def _function_lengths() -> dict[str, int]:
    """``path:qualified.name`` → lines from ``def`` to the body's last line, for every function
    and method under ``src/goodnet`` (nested ones too)."""
    package = ROOT / "src" / "goodnet"
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str, path: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    assert child.end_lineno is not None
                    lengths[f"{path}:{name}"] = child.end_lineno - child.lineno + 1
                visit(child, f"{name}.", path)
            else:
                visit(child, prefix, path)

    for file in sorted(package.rglob("*.py")):
        visit(ast.parse(file.read_text(encoding="utf-8")), "",
              file.relative_to(package).as_posix())
    return lengths


def test_no_function_is_over_50_lines():
    """A function that needs more than 50 lines is doing several things: split it into
    helpers that name each one (issue 28)."""
    long = {name: n for name, n in _function_lengths().items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(
        f"{name} ({n})" for name, n in sorted(long.items()))
