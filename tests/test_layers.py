"""The layers of docs/architecture.md hold: the core imports no adapter, no tool, not the official package and
no framework at import time, and its modules import each other without a circle; adapters use only the core's
public names (imports and ``module.attr`` uses alike); no adapter picks an execution path itself (no kernel or
grouping call outside adamp_core.dispatch)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted((ROOT / "adamp_core").rglob("*.py"))
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


@pytest.mark.parametrize("path", CORE, ids=[str(p.relative_to(ROOT / "adamp_core")) for p in CORE])
def test_core_imports_no_adapter_tool_or_official_package(path):
    banned = ("adamp_torch", "adamp_array", "adamp_optax", "adamp_xp", "adamp")
    bad = [m for m, _ in _imports(path) if m.split(".")[0] in banned]
    assert bad == [], f"{path.name} imports {bad}"


def _core_module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _core_imports(path: Path) -> set[str]:
    """The core modules ``path`` imports, at any depth (function-level imports too), relative ones resolved."""
    here = _core_module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    known = {_core_module(p) for p in CORE}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:  # "from . import x" names a module; "from .m import f" a name in m
                target = f"{module}.{a.name}"
                out.add(target if target in known else module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != _core_module(path)}


def test_the_core_has_no_import_circle():
    graph = {_core_module(p): _core_imports(p) for p in CORE}
    graph["adamp_core.paths"] -= {m for m in graph if m.startswith("adamp_core.paths.")}  # the package's own modules
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import circle: " + " -> ".join([*trail, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            visit(n, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "adamp_core.dispatch" not in set().union(*graph.values())  # nothing in the core depends on the policy


def test_importing_an_adapter_loads_no_kernel_library():
    code = ("import sys, adamp_torch, adamp_array; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'numba', 'triton', 'jax'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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
def test_adapters_use_only_public_attributes_of_core_modules(path):
    """``dispatch.Tensor``, ``dispatch.step``...: every attribute an adapter reads off a core module it imported
    is in that module's ``__all__``."""
    tree = ast.parse(path.read_text())
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "adamp_core":
            for a in node.names:
                if importlib.util.find_spec(f"adamp_core.{a.name}") is not None:
                    bound[a.asname or a.name] = f"adamp_core.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("adamp_core.") and a.asname:
                    bound[a.asname] = a.name
    uses = [(bound[n.value.id], n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound]
    for module, attr in uses:
        public = getattr(importlib.import_module(module), "__all__", ())
        assert attr in public, f"{path.name}: {module}.{attr} is not public"
    if "dispatch" in bound:
        assert uses, "the check saw no use"


@pytest.mark.parametrize("path", ADAPTERS, ids=[str(p.relative_to(ROOT / "adapters")) for p in ADAPTERS])
def test_no_adapter_picks_a_path(path):
    text = path.read_text()
    for name in ("adamp_batch", "sgdp_batch", "adamp_inplace", "sgdp_inplace", "run_batch", "run_inplace",
                 "group_indices", "update_group", "adamp_update", "sgdp_update", "set_threads"):
        assert name not in text, f"{path.name} calls {name}: paths are chosen by adamp_core.dispatch"
    for module, name in _imports(path):  # the paths are the dispatcher's to call
        assert not module.startswith("adamp_core.paths") and (module, name) != ("adamp_core", "paths"), path.name
