"""Layers only point down. The one written order of lnm_auto's packages, lowest first: a module may import its
own package and the packages below it, never one above (imports inside functions count too). The plans
contract imports neither SimpleITK nor pandas, so every stage can read plans cheaply."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lnm_auto"

# lowest first; packages on one line share a layer (they may import each other's lower neighbours only)
LAYERS: list[tuple[str, ...]] = [
    ("utils",),
    ("imaging",),          # image geometry, node instances (components), the surface estimate
    ("plans",),            # the plans contract: Plans, every topology and its planning rule
    ("datasets",),         # raw datasets: reading, verifying, the phantom
    ("conversion",),       # nnU-Net / DICOM -> raw dataset
    ("networks",),
    ("preprocessing",),
    ("radiomics",),
    ("configurations",),   # the registry of configuration kinds
    ("planning",),         # fingerprint -> plans (+ the preprocessing run)
    ("evaluation",),       # metrics, cross-validation, model selection
    ("training",),
    ("detection",),        # the nnU-Net v2 node detector: export, nnU-Net's own planning and training
    ("inference",),
    ("cli", "demo"),
    ("__main__",),
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_packages(path: Path) -> list[tuple[str, int]]:
    """(lnm_auto package, line) of every lnm_auto import in a module, top-level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lnm_auto" and len(parts) > 1:
                found.append((parts[1], node.lineno))
            elif parts[0] == "lnm_auto" and isinstance(node, ast.ImportFrom):
                found += [(a.name, node.lineno) for a in node.names]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_has_a_layer():
    packages = {package_of(p) for p in MODULES} - {"__init__"}
    assert packages <= set(RANK), f"packages without a layer in LAYERS: {sorted(packages - set(RANK))}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_its_layer_or_below(module):
    own = package_of(module)
    if own == "__init__":
        return
    upward = [f"line {line}: lnm_auto.{pkg} (layer {RANK[pkg]}) from {own} (layer {RANK[own]})"
              for pkg, line in imported_packages(module) if pkg in RANK and RANK[pkg] > RANK[own]]
    assert not upward, f"{module.relative_to(PACKAGE.parent)} imports upward: " + "; ".join(upward)


def test_reading_plans_is_cheap():
    """The plans contract and the configuration registry load without SimpleITK, pandas, torch or scikit-learn."""
    code = ("import sys, lnm_auto.plans.plans, lnm_auto.configurations; "
            "print(sorted(m for m in ('SimpleITK', 'pandas', 'torch', 'sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_command_line_modules_live_in_cli():
    """argparse is used only by the command-line package (and the demo's entry there)."""
    users = [p.relative_to(PACKAGE) for p in MODULES
             if package_of(p) not in ("cli", "__main__") and "import argparse" in p.read_text(encoding="utf-8")]
    assert users == []
