"""The per-tensor array-API step (:func:`adamp_core.adamp.adamp_update`, :func:`adamp_core.sgdp.sgdp_update`):
the ground truth every other path is tested against, and the path of whatever the others leave (shards whose
rows span processes, tensors an adapter marks ``alone``, everything inside a tracer by default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .._common import finite_flag, keep_if_finite
from ..arrays import check_array, is_jax_traced
from . import PER_TENSOR, Options, Outcome, _jax_once

__all__ = ["claim", "offered", "plan", "regrad", "run", "step_one"]


class Plan(NamedTuple):
    """The tensors this path steps, each with its array namespace (resolved once)."""

    members: list[tuple[int, Any]]


def offered(options: Options) -> bool:
    return True


def claim(spec: Any, tensors: Sequence[Any], idx: list[int], hp: Any, options: Options) -> list[int]:
    return list(idx)


def plan(spec: Any, tensors: Sequence[Any], taken: list[int], hp: Any, options: Options) -> Plan:
    return Plan([(i, check_array(tensors[i].param)) for i in taken])


def regrad(plan: Plan, grads: Sequence[Any]) -> Plan:
    return plan


def run(plan: Plan, spec: Any, tensors: Sequence[Any], grads: Sequence[Any], hp: Any, options: Options,
        sink: Any) -> list[int]:
    for i, xp in plan.members:
        sink([i], [step_one(spec, xp, tensors[i], grads[i], hp, options.skip_nonfinite)])
    return []


def step_one(spec: Any, xp: Any, t: Any, grad: Any, hp: Any, skip: bool) -> Outcome:
    """One tensor's step with ``grad`` (``t.rows``: a shard's layout); with ``skip`` the non-finite guard of
    :mod:`adamp_core._common` (every shard of a param decides alike). Under ``jax.jit`` traced once per
    signature (:mod:`adamp_core.paths._jax_once`)."""
    if is_jax_traced(t.param) and _jax_once.shared(t):
        fn, arrays = _jax_once.traced_step(spec, hp, skip, _update)
        new_p, new_s, ok = fn(t.param, grad, t.state, arrays)
    else:
        new_p, new_s, ok = _update(spec, t.param, grad, t.state, hp, skip, xp, t.rows)
    return Outcome(PER_TENSOR, new_p, new_s, ok)


def _update(spec: Any, param: Any, grad: Any, state: Any, hp: Any, skip: bool, xp: Any = None,
            rows: Any = None) -> tuple[Any, Any, Any]:
    """``(new param, new state, ok)``: the update, and with ``skip`` the guard (``ok`` None without)."""
    xp = check_array(param) if xp is None else xp
    new_p, new_s = spec.update(xp, param, grad, state, hp, rows)
    if not skip:
        return new_p, new_s, None
    ok = finite_flag(xp, grad, rows)
    new_p, new_s = keep_if_finite(xp, ok, new_p, new_s, param, state)
    return new_p, new_s, ok


namespace = check_array  # the array namespace of a param (checked)
