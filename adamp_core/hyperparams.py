"""Validated hyperparameters, with the official ``adamp==0.3.0`` names and defaults.

Every public entry point (the core, the tree functions, the adapters) checks its
hyperparameters here, before any array is read, so a bad value never leaves
anything half-updated. Messages follow torch.optim (``Invalid learning rate:
-1.0``) and always name the parameter and the value.

The rule, the same for every entry point: a value outside its mathematical domain is refused
(``lr``, ``eps``, ``weight_decay``, ``delta``, ``wd_ratio``: finite and >= 0; ``betas``: each in
[0, 1); ``momentum`` and ``dampening``: in [0, 1], and ``momentum < 1`` with weight decay, which
SGDP divides by ``1 - momentum``; NaN never). Everything the official ``adamp==0.3.0`` runs inside
that domain runs here and means the same: ``SGDP(nesterov=True)`` with the default ``momentum=0`` is
plain SGD there and here (``torch.optim.SGD`` refuses it), and Nesterov with a dampening follows the
official formula; both warn, as they are probably not what was meant.

Hyperparameters given as arrays (a traced learning rate from an optax schedule,
say) are accepted unchecked: checking them would need a device-to-host sync.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import warnings
from typing import Any, NamedTuple

from .arrays import dtype_is

__all__ = [
    "check_fused",
    "ADAMP_DEFAULTS",
    "ADAMP_OPTIONS",
    "SGDP_DEFAULTS",
    "SGDP_OPTIONS",
    "AdamPHyperparams",
    "SGDPHyperparams",
    "check_adamp",
    "check_flag",
    "check_sgdp",
]

ADAMP_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False
)
# `lr` has no default in the official SGDP; neither here.
SGDP_DEFAULTS: dict[str, Any] = dict(
    momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1
)
# Options beyond the official signature, after its hyperparameters (a checkpoint or a group without them
# means their default, which steps exactly as adamp 0.3.0): ``caution`` (timm 1.0.31's name and position),
# and for SGDP ``project_buffer``.
ADAMP_OPTIONS: dict[str, Any] = dict(caution=False)
SGDP_OPTIONS: dict[str, Any] = dict(caution=False, project_buffer=True)


class AdamPHyperparams(NamedTuple):
    lr: Any
    betas: tuple[Any, Any]
    eps: Any
    weight_decay: Any
    delta: Any
    wd_ratio: Any
    nesterov: bool
    caution: bool = False  # Cautious AdamP (timm's ``caution``; adamp_core.caution)


class SGDPHyperparams(NamedTuple):
    lr: Any
    momentum: Any
    dampening: Any
    weight_decay: Any
    nesterov: bool
    eps: Any
    delta: Any
    wd_ratio: Any
    caution: bool = False  # Cautious SGDP (timm's ``caution``; adamp_core.caution)
    project_buffer: bool = True  # store the projected buffer (adamp 0.3.0); False: Alg. 1 as printed (timm)


def _is_real_scalar(x: Any) -> bool:
    """A real number held on the host (a Python or NumPy scalar, not a bool): checked here; a 0-d array
    (anything else) passes unchecked."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _real(value: Any, label: str) -> Any:
    """Return a Python number as float; pass 0-d arrays through unchecked."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes, complex)):
        raise TypeError(f"Invalid {label}: {value!r} (expected a real number)")
    if _is_real_scalar(value):
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"Invalid {label}: {value}")
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        if tuple(value.shape) != ():
            raise ValueError(f"Invalid {label}: expected a scalar or a 0-d array, got shape {tuple(value.shape)}")
        if dtype_is(value, ("bool", "complex floating")):
            raise TypeError(f"Invalid {label}: a 0-d array of dtype {value.dtype} (expected a real number)")
        return value
    raise TypeError(f"Invalid {label}: {value!r} (expected a real number)")


def _nonnegative(value: Any, label: str, *, finite: bool = True) -> Any:
    value = _real(value, label)
    if _is_real_scalar(value) and (value < 0.0 or (finite and math.isinf(value))):
        raise ValueError(f"Invalid {label}: {value}")
    return value


def _beta(value: Any, label: str) -> Any:
    value = _real(value, label)
    if _is_real_scalar(value) and not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {label}: {value}")
    return value


def _unit(value: Any, label: str) -> Any:
    """A real number in [0, 1] (momentum, dampening)."""
    value = _real(value, label)
    if _is_real_scalar(value) and not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {label}: {value} (expected a number in [0, 1])")
    return value


def check_flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool, else ``TypeError`` naming ``name`` (the options nesterov, skip_nonfinite...)."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name} value: {value!r} (expected True or False)")
    return value


def check_adamp(lr: Any = 1e-3, betas: Any = (0.9, 0.999), eps: Any = 1e-8, weight_decay: Any = 0.0,
                delta: Any = 0.1, wd_ratio: Any = 0.1, nesterov: Any = False, caution: Any = False) -> AdamPHyperparams:
    """Validate AdamP hyperparameters; raise ``ValueError``/``TypeError`` naming the bad one."""
    lr = _nonnegative(lr, "learning rate")
    eps = _nonnegative(eps, "epsilon value")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    beta1 = _beta(betas[0], "beta parameter at index 0")
    beta2 = _beta(betas[1], "beta parameter at index 1")
    weight_decay = _nonnegative(weight_decay, "weight_decay value")
    delta = _nonnegative(delta, "delta value")
    wd_ratio = _nonnegative(wd_ratio, "wd_ratio value")
    return AdamPHyperparams(lr, (beta1, beta2), eps, weight_decay, delta, wd_ratio, check_flag(nesterov, "nesterov"),
                            check_flag(caution, "caution"))


def check_sgdp(lr: Any, momentum: Any = 0.0, dampening: Any = 0.0, weight_decay: Any = 0.0, nesterov: Any = False,
               eps: Any = 1e-8, delta: Any = 0.1, wd_ratio: Any = 0.1, caution: Any = False,
               project_buffer: Any = True) -> SGDPHyperparams:
    """Validate SGDP hyperparameters; raise ``ValueError``/``TypeError`` naming the bad one."""
    lr = _nonnegative(lr, "learning rate")
    momentum = _unit(momentum, "momentum value")
    dampening = _unit(dampening, "dampening value")
    weight_decay = _nonnegative(weight_decay, "weight_decay value")
    nesterov = check_flag(nesterov, "nesterov")
    eps = _nonnegative(eps, "epsilon value")
    delta = _nonnegative(delta, "delta value")
    wd_ratio = _nonnegative(wd_ratio, "wd_ratio value")
    caution = check_flag(caution, "caution")
    project_buffer = check_flag(project_buffer, "project_buffer")
    if nesterov and _is_real_scalar(momentum) and _is_real_scalar(dampening) and (momentum <= 0.0 or dampening != 0.0):
        # adamp==0.3.0 runs these (torch.optim.SGD refuses them): a drop-in runs them too, and says so.
        warnings.warn(
            f"SGDP with nesterov=True, momentum={momentum}, dampening={dampening}: Nesterov momentum usually"
            " means a momentum > 0 and no dampening; stepping as adamp 0.3.0 does"
            + (" (momentum 0: plain SGD)" if momentum == 0.0 else ""),
            UserWarning,
            stacklevel=3,
        )
    # SGDP divides the decoupled weight decay by (1 - momentum) (official sgdp.py).
    if _is_real_scalar(weight_decay) and _is_real_scalar(momentum) and weight_decay > 0.0 and momentum >= 1.0:
        raise ValueError(
            f"Invalid momentum value: {momentum} (weight decay is divided by 1 - momentum, so momentum must be < 1"
            f" when weight_decay={weight_decay})"
        )
    return SGDPHyperparams(lr, momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio, caution,
                           project_buffer)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_fused(value: Any) -> None:
    """The adapters' ``fused`` option: None (the numba kernels of :mod:`adamp_core.paths.numba_fused` where
    they apply, else the array-API step), True (the same, and numba must be installed), False (always the
    array-API step) or ``"triton"`` (the
    Triton kernels of :mod:`adamp_core.paths.triton_fused` for every torch tensor they take, opt-in; Triton must
    be installed)."""
    if value == "triton" and isinstance(value, str):
        if not _installed("triton"):
            raise ValueError("Invalid fused value: 'triton' (the Triton kernels need triton: pip install "
                             "-e '.[triton]')")
        return
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid fused value: {value!r} (expected None, True, False or 'triton')")
    if value is True and not _installed("numba"):
        raise ValueError("Invalid fused value: True (the fused kernels need numba: pip install -e '.[fast]')")
