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

__all__ = ["INSTALL_HINT", "TIMM_VERSION", "TimmNotInstalled", "missing", "timm_optimizers"]

TIMM_VERSION = "1.0.31"  # the version whose files the tests hold us to (installed by .ci/run)
# timm is in no extra: its torchvision requirement pulls a wheel that does not load beside a CPU torch.
INSTALL_HINT = f"pip install --no-deps timm=={TIMM_VERSION}"
_PACKAGE = "_timm_optim_reference"


class TimmNotInstalled(ImportError):
    """timm is not installed (no package named ``timm`` can be found): the one failure to load the reference
    that ``adamp-xp conformance`` reports as a SKIP. Every other one (timm found, but its optimizer files
    missing or failing to load) is a broken reference, which fails."""


def missing() -> str | None:
    """Why timm's reference cannot run here when the reason is that timm is not installed (with the install
    hint); None when a package named ``timm`` can be found, whether or not its files then load. Imports
    nothing."""
    try:
        found = importlib.util.find_spec("timm") is not None
    except ImportError:  # an import hook that refuses timm, or a parent that cannot be imported
        found = False
    return None if found else f"timm is not installed: {INSTALL_HINT}"


def timm_optimizers() -> tuple[Any, Any]:
    """``(AdamP, SGDP)``: timm's classes (``caution`` and Algorithm-1 SGDP). Raises :class:`TimmNotInstalled`
    (an ``ImportError``) when timm is not installed, another ``ImportError`` when what is installed under the
    name ``timm`` is not a package, and whatever its optimizer files raise when they do not load."""
    loaded = sys.modules.get(f"{_PACKAGE}.sgdp")
    if loaded is None:
        reason = missing()
        if reason:
            raise TimmNotInstalled(reason)
        spec = importlib.util.find_spec("timm")
        if not spec.submodule_search_locations:
            raise ImportError(f"timm at {spec.origin} is not a package (expected timm {TIMM_VERSION}'s folder)")
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
