"""Helpers shared by the AdamP and SGDP steps (bias correction, state dtypes, scalars)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from .arrays import check_grad, device

__all__ = ["bias_correction", "scalar", "state_zeros", "check_step_count", "is_python_int"]


def is_python_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def scalar(xp: Any, value: Any, dtype: Any) -> Any:
    """A hyperparameter as used in the maths: Python numbers stay Python numbers (weak
    scalars keep the array's dtype), arrays are cast to the compute dtype."""
    if isinstance(value, numbers.Real):
        return value
    return xp.astype(value, dtype)


def bias_correction(xp: Any, beta: Any, step: Any, dtype: Any) -> Any:
    """``1 - beta**step`` for the new step count (Python number or 0-d array)."""
    if is_python_int(step) and isinstance(beta, numbers.Real):
        return 1.0 - float(beta) ** step  # exactly adamp 0.3.0's Python-float maths
    t = xp.astype(xp.asarray(step), dtype) if not isinstance(step, numbers.Real) else step
    if isinstance(beta, numbers.Real):
        if beta == 0.0:
            return 1.0
        log_beta = math.log(beta)
    else:
        log_beta = xp.log(xp.astype(beta, dtype))
    # -expm1(t log beta) instead of 1 - beta**t: no cancellation when beta**t ~ 1 (float32 at small t).
    return -xp.expm1(t * log_beta)


def state_zeros(xp: Any, param: Any, state_dtype: Any) -> Any:
    """Zeros shaped like ``param`` in ``state_dtype`` (default: the param's dtype)."""
    if state_dtype is None:
        dtype = param.dtype
    elif isinstance(state_dtype, str):
        dtype = getattr(xp, state_dtype, None)
        if dtype is None:
            raise ValueError(f"Invalid state_dtype: {state_dtype!r}")
    else:
        dtype = state_dtype
    if not xp.isdtype(dtype, "real floating"):
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (expected a real floating dtype)")
    return xp.zeros(param.shape, dtype=dtype, device=device(param))


def check_step_count(step: Any) -> None:
    if is_python_int(step):
        if step < 0:
            raise ValueError(f"Invalid state.step: {step} (expected a non-negative step count)")
        return
    shape = getattr(step, "shape", None)
    if shape is None or tuple(shape) != ():
        raise TypeError(f"Invalid state.step: {step!r} (expected an int or a 0-d integer array)")
    kind = str(step.dtype)
    if "int" not in kind:
        raise TypeError(f"Invalid state.step dtype: {step.dtype} (expected an integer dtype)")


def check_state_arrays(param: Any, **arrays: Any) -> None:
    for name, arr in arrays.items():
        check_grad(param, arr, f"state.{name}")
