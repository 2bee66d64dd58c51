"""The habits of a well-kept library, checked with the tests: ruff (lint and format) and mypy over the
package, with the configuration in pyproject.toml and the versions the test extra pins."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["diffsolve", "tests", "scripts"]


def _tool(name: str) -> list[str]:
    """The tool as installed beside this Python (the test extra installs it)."""
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.exists() else shutil.which(name)
    assert found, f"{name} is not installed: install the test extra (pip install '.[test]')"
    return [found]


@pytest.mark.parametrize("args", [["check", *PATHS], ["format", "--check", *PATHS]], ids=["lint", "format"])
def test_ruff(args):
    out = subprocess.run([*_tool("ruff"), *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy(tmp_path):
    out = subprocess.run(
        [*_tool("mypy"), "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_py_typed_ships():
    """The package marks itself typed (PEP 561): py.typed beside its modules, and in the package data
    pyproject.toml installs."""
    assert (ROOT / "diffsolve" / "py.typed").exists()
    data = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"py.typed"' in data, data
