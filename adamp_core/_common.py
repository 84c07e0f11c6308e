"""Helpers shared by the AdamP and SGDP steps (bias correction, state dtypes, scalars)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from .arrays import check_array, check_grad, check_hyper_arrays, dtype_is, is_jax_traced
from .hyperparams import check_flag

__all__ = [
    "all_finite",
    "checked_step",
    "bias_correction",
    "check_step_count",
    "finite_flag",
    "host_bias_correction",
    "is_python_int",
    "reread",
    "keep_if_finite",
    "scalar",
    "state_zeros",
]


def is_python_int(x: Any) -> bool:
    # NumPy integer scalars (what a 0-d int array + 1 gives) are arrays here, not host counts.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and not hasattr(x, "dtype")


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


def host_bias_correction(beta: float, t: int) -> float:
    """:func:`bias_correction`'s array formula, ``-expm1(t log beta)``, in Python floats (a checked
    ``beta`` in [0, 1)): what the fused kernels (:mod:`adamp_core.paths.numba_fused`) take, computed on the host."""
    return -math.expm1(t * math.log(beta)) if beta > 0 else 1.0


def reread(xp: Any, *xs: Any) -> tuple[Any, ...] | None:
    """Under ``jax.jit`` (tracers), ``xs`` again behind an optimization barrier (the same buffers at run
    time), else None.

    A step reduces over an expression of its arrays (the update direction, from the new moments) and also
    uses it elementwise; XLA then writes the expression to memory once and reads it back twice. Rebuilt
    from these arrays for the reductions, it is a second expression XLA cannot merge with the first, so
    each fusion computes it from the arrays it reads anyway: one array fewer written and read per step.
    Pass the *new* state (the reductions then run after it is written, in place in a donated buffer;
    reading the old state there would make XLA copy it first)."""
    if not xs or not is_jax_traced(xs[0]):
        return None
    from jax import lax

    return tuple(lax.optimization_barrier(tuple(xs)))


def state_zeros(xp: Any, param: Any, state_dtype: Any) -> Any:
    """Zeros shaped and placed like ``param`` in ``state_dtype`` (default: the param's dtype).

    ``zeros_like`` infers the placement from ``param``: its device (torch, CuPy), its memory format
    (torch), and under JAX its sharding and whether it is committed to a device (an explicit
    ``device=`` would commit the state next to uncommitted params, so a jitted step would compile
    twice, and a sharded param's state would not be sharded)."""
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
    return xp.zeros_like(param, dtype=dtype)


def check_step_count(step: Any) -> None:
    if is_python_int(step):
        if step < 0:
            raise ValueError(f"Invalid state.step: {step} (expected a non-negative step count)")
        return
    shape = getattr(step, "shape", None)
    if shape is None or tuple(shape) != ():
        raise TypeError(f"Invalid state.step: {step!r} (expected an int or a 0-d integer array)")
    if not dtype_is(step, "integral"):
        raise TypeError(f"Invalid state.step dtype: {step.dtype} (expected an integer dtype)")


def check_state_arrays(param: Any, **arrays: Any) -> None:
    for name, arr in arrays.items():
        check_grad(param, arr, f"state.{name}")


# -- non-finite gradients ---------------------------------------------------------------------------
# Policy (the same in the core, the tree functions and every adapter): by default a NaN/inf gradient
# flows into the param and the state exactly as the arithmetic gives, like torch.optim and
# adamp==0.3.0. With skip_nonfinite=True a param whose gradient has any non-finite entry is left as
# it was, param and state (the step count does not advance: the step did not happen, as with
# torch.amp.GradScaler and optax.apply_if_finite), decided by xp.where on a 0-d flag (no sync).


def finite_flag(xp: Any, grad: Any, rows: Any = None) -> Any:
    """0-d bool array: every entry of ``grad`` is finite. ``rows`` (a
    :class:`adamp_core.projection.RowReduce`) also combines the flags of every shard of a param whose
    rows are split across processes, so that all of them decide alike."""
    ok = xp.all(xp.isfinite(grad))
    if rows is None:
        return ok
    flag = xp.reshape(xp.astype(ok, xp.float32), (1,))
    (low,) = rows.min(xp, flag)
    return low > 0


def all_finite(grad: Any) -> Any:
    r"""0-d boolean array, true when every entry of ``grad`` is finite: the test ``skip_nonfinite=True``
    makes before a step (:math:`\bigwedge_i \operatorname{isfinite}(g_i)`). Sync-free."""
    xp = check_array(grad, "grad")
    return finite_flag(xp, grad)


def keep_if_finite(xp: Any, ok: Any, new_param: Any, new_state: Any, param: Any, state: Any) -> tuple[Any, Any]:
    """``(new_param, new_state)`` where the 0-d flag ``ok`` is true, else ``(param, state)`` unchanged.

    Arrays are selected with ``xp.where`` (no sync). A state holding a Python-int step count (the host
    count of adamp 0.3.0) cannot be selected on the device: ``ok`` is then read on the host, one sync
    (free for NumPy).
    """
    if any(is_python_int(f) for f in state):
        return (new_param, new_state) if bool(ok) else (param, state)
    fields = (xp.where(ok, n, o) for n, o in zip(new_state, state, strict=True))
    return xp.where(ok, new_param, param), type(state)(*fields)


def checked_step(param: Any, grad: Any, state: Any, hp: Any, check_state: Any, update: Any,
                 skip_nonfinite: Any) -> tuple[Any, Any]:
    """:func:`adamp_core.adamp_step` / :func:`adamp_core.sgdp_step` once their hyperparameters are checked
    (``hp``): every check of the param, grad, array hyperparameters and state before any maths, then
    ``update`` and, with ``skip_nonfinite``, the non-finite guard."""
    skip = check_flag(skip_nonfinite, "skip_nonfinite")
    xp = check_array(param)
    check_grad(param, grad)
    check_hyper_arrays(param, hp)
    check_state(param, state)
    new_param, new_state = update(xp, param, grad, state, hp)
    if skip:
        return keep_if_finite(xp, finite_flag(xp, grad), new_param, new_state, param, state)
    return new_param, new_state
