"""Under ``jax.jit``, each tensor's step traced once per signature instead of once per tensor.

Inside a JAX trace every array operation of the per-tensor step goes through Python (``jax.numpy``'s own
jitted wrappers, then the tracer): a few thousand operations per projected tensor, most of the time a
``jax.jit(...).lower`` of a model's step spends in the optimizer. Models repeat shapes (ResNet-50: 161
tensors, 28 shapes), so the step is wrapped in a nested ``jax.jit``: JAX traces it once per (shape, dtype,
placement) and the outer trace only records a call. XLA inlines the calls before optimizing, so the
compiled program, its results and its cost are those of the step traced tensor by tensor (tested).

Hyperparameters that are Python numbers stay Python numbers inside (part of the cache key, never traced:
``1 - beta`` is rounded as the per-tensor step rounds it); array hyperparameters (a scheduled ``lr``) are
arguments. JAX is imported only here, and only once a JAX tracer was seen.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .._common import is_python_int

__all__ = ["shared", "traced_step"]


def shared(t: Any) -> bool:
    """Whether tensor ``t``'s step can be a shared trace: every row is here (no shard layout) and its state
    holds arrays only (a Python-int step count is advanced on the host, which a trace would turn into an
    array)."""
    return t.rows is None and not any(is_python_int(x) for x in t.state)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def traced_step(spec: Any, hp: Any, skip: bool, step: Any) -> Any:
    """``(fn, arrays)``: ``step(spec, param, grad, state, hp, skip) -> (param, state, ok)`` as a ``jax.jit``
    function ``fn(param, grad, state, arrays)``, ``arrays`` being ``hp``'s array leaves (the rest is fixed in
    it); one per optimizer, hyperparameter values and ``skip`` (the last :data:`KEPT` of them are kept)."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(hp)
    fixed = tuple(None if _is_array(x) else x for x in leaves)
    arrays = [x for x in leaves if _is_array(x)]
    # The values' types and signs too: 0.0 == -0.0 and 1 == 1.0 == True, but each rounds its own way.
    key = (id(spec), id(step), tree, skip, tuple((type(x), x, _sign(x)) for x in fixed))
    fn = _KEPT.pop(key, None)
    if fn is None:
        fn = _compiled(spec, tree, fixed, skip, step)
        while len(_KEPT) >= KEPT:
            _KEPT.pop(next(iter(_KEPT)))
    _KEPT[key] = fn  # the most recent last
    return fn, arrays


KEPT = 64
_KEPT: dict[Any, Any] = {}


def _sign(x: Any) -> float | None:
    return math.copysign(1.0, float(x)) if isinstance(x, numbers.Real) else None


def _compiled(spec: Any, tree: Any, fixed: tuple[Any, ...], skip: bool, step: Any) -> Any:
    import jax

    def one(param: Any, grad: Any, state: Any, arrays: list[Any]) -> Any:
        it = iter(arrays)
        hp = jax.tree_util.tree_unflatten(tree, [next(it) if f is None else f for f in fixed])
        return step(spec, param, grad, state, hp, skip)

    one.__name__ = one.__qualname__ = f"{spec.key}_step"  # jit(adamp_step) in the HLO's op names
    return jax.jit(one)
