"""The layers of docs/architecture.md hold: the core imports no adapter, no tool, not the official package and
no framework at import time; adapters use only the core's public names; no adapter picks an execution path
itself (no kernel or grouping call outside adamp_core.dispatch)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted((ROOT / "adamp_core").glob("*.py"))
ADAPTERS = sorted((ROOT / "adapters").rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every import in ``path``, at any depth (function-level imports too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.module, a.name) for a in node.names]
    return out


@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_core_imports_no_adapter_tool_or_official_package(path):
    banned = ("adamp_torch", "adamp_array", "adamp_optax", "adamp_xp", "adamp")
    bad = [m for m, _ in _imports(path) if m.split(".")[0] in banned]
    assert bad == [], f"{path.name} imports {bad}"


def test_importing_the_core_loads_no_framework():
    code = ("import sys, adamp_core; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'jax', 'cupy', 'numba', 'adamp', 'adamp_torch', 'adamp_array', 'adamp_optax', 'adamp_xp'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("path", ADAPTERS, ids=[str(p.relative_to(ROOT / "adapters")) for p in ADAPTERS])
def test_adapters_use_only_the_cores_public_names(path):
    for module, name in _imports(path):
        if module.split(".")[0] != "adamp_core":
            continue
        assert not any(part.startswith("_") for part in module.split(".")), f"{path.name}: private module {module}"
        if name is None:
            continue
        mod = importlib.import_module(module)
        public = getattr(mod, "__all__", ())
        is_module = importlib.util.find_spec(f"{module}.{name}") is not None if module == "adamp_core" else False
        assert name in public or (is_module and not name.startswith("_")), f"{path.name}: {module}.{name} is not public"


@pytest.mark.parametrize("path", ADAPTERS, ids=[str(p.relative_to(ROOT / "adapters")) for p in ADAPTERS])
def test_no_adapter_picks_a_path(path):
    text = path.read_text()
    for name in ("adamp_batch", "sgdp_batch", "adamp_inplace", "sgdp_inplace", "run_batch", "run_inplace",
                 "group_indices", "update_group", "adamp_update", "sgdp_update"):
        assert name not in text, f"{path.name} calls {name}: paths are chosen by adamp_core.dispatch"
