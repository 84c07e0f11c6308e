"""timm's own AdamP and SGDP (``timm/optim/adamp.py``, ``sgdp.py``), the reference for ``caution=True`` and for
SGDP's ``project_buffer=False``, loaded without importing the rest of timm.

``import timm`` imports torchvision, and PyPI's torchvision wheels do not load beside a CPU torch (README,
Integrations). The two optimizer files need only torch (``sgdp.py`` imports ``projection`` from
``.adamp``), so they are loaded from the installed timm's folder, by path, as the modules of a private
package (``_timm_optim_reference``): nothing named ``timm`` enters ``sys.modules``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

__all__ = ["TIMM_VERSION", "timm_optimizers"]

TIMM_VERSION = "1.0.31"  # the version whose files the tests hold us to (installed by .ci/run)
_PACKAGE = "_timm_optim_reference"


def timm_optimizers() -> tuple[Any, Any]:
    """``(AdamP, SGDP)``: timm's classes (``caution`` and Algorithm-1 SGDP). Raises ``ImportError`` when
    timm is not installed."""
    loaded = sys.modules.get(f"{_PACKAGE}.sgdp")
    if loaded is None:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("timm is not installed (pip install --no-deps timm==" + TIMM_VERSION + ")")
        folder = Path(spec.submodule_search_locations[0]) / "optim"
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[_PACKAGE] = package
        for name in ("adamp", "sgdp"):  # adamp first: sgdp imports its projection
            file_spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[file_spec.name] = module
            file_spec.loader.exec_module(module)
        loaded = sys.modules[f"{_PACKAGE}.sgdp"]
    return sys.modules[f"{_PACKAGE}.adamp"].AdamP, loaded.SGDP
