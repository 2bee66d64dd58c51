"""The package's layering (README, Architecture): every import points down the stack.

    data, schedules <- models <- core <- solvers, optimize <- guidance, integrations <- cli, bench

core never imports a solver (solvers register themselves with it), models and schedules import no
sampling code, and no module imports the cli.
"""

import ast
from pathlib import Path

import pytest

import diffsolve as ds

ROOT = Path(ds.__file__).parent

#: the top-level parts of the package each part may import (besides itself)
ALLOWED = {
    "schedules": set(),
    "models": {"schedules", "data"},
    "data": set(),
    "core": {"models", "schedules"},
    "solvers": {"core", "models", "schedules", "pretrained"},
    "optimize": {"core", "models", "schedules"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The diffsolve parts a module imports (relative or absolute, at any depth in the file)."""
    tree = ast.parse(path.read_text())
    pkg = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - node.level + 1]) + (node.module.split(".") if node.module else [])
            else:
                base = (node.module or "").split(".")
            if base and base[0] == "diffsolve":
                names = base[1:2] or [a.name for a in node.names]
                out.update(names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "diffsolve" and len(parts) > 1:
                    out.add(parts[1])
    return out


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_point_down_the_stack(part):
    files = sorted((ROOT / part).rglob("*.py")) if (ROOT / part).is_dir() else [ROOT / f"{part}.py"]
    assert files
    bad = {}
    for f in files:
        extra = _imports(f) - ALLOWED[part] - {part}
        if extra:
            bad[str(f.relative_to(ROOT))] = sorted(extra)
    assert not bad, f"{part} may import only {sorted(ALLOWED[part])}: {bad}"


def test_nothing_imports_the_cli():
    users = [
        str(f.relative_to(ROOT))
        for f in ROOT.rglob("*.py")
        if _part(f) not in ("cli", "__main__") and "cli" in _imports(f)
    ]
    assert not users, users
