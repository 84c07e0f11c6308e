"""AdamP/SGDP over many params at once: a list, tuple or dict of arrays.

``params``, ``grads`` and ``states`` have the same structure (same length, or the same
keys). A ``None`` grad leaves its param and state as they are (like ``p.grad is None`` in
torch.optim). Every hyperparameter, grad and state is checked before anything is
computed, so a bad entry anywhere raises before any result exists; the error names the
entry (``grads[3]`` or ``grads['fc.weight']``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._common import finite_flag, keep_if_finite
from .adamp import AdamPState, adamp_update, check_adamp_state
from .adamp import adamp_init as _adamp_init
from .arrays import check_array, check_grad, check_hyper_arrays
from .hyperparams import _flag, check_adamp, check_sgdp
from .sgdp import SGDPState, check_sgdp_state, sgdp_update
from .sgdp import sgdp_init as _sgdp_init

__all__ = ["adamp_init", "adamp_step", "sgdp_init", "sgdp_step"]


def _keys(tree: Any, what: str) -> list[Any]:
    if isinstance(tree, Mapping):
        return list(tree.keys())
    if isinstance(tree, Sequence) and not isinstance(tree, (str, bytes)) and not hasattr(tree, "shape"):
        return list(range(len(tree)))
    raise TypeError(f"{what} must be a list, tuple or dict of arrays, got {type(tree).__name__}")


def _rebuild(like: Any, values: dict[Any, Any]) -> Any:
    if isinstance(like, Mapping):
        return {k: values[k] for k in like}
    return type(like)(values[i] for i in range(len(like))) if isinstance(like, tuple) else [
        values[i] for i in range(len(like))
    ]


def _label(name: str, key: Any) -> str:
    return f"{name}[{key!r}]"


def _match(params: Any, other: Any, what: str) -> list[Any]:
    keys = _keys(params, "params")
    other_keys = _keys(other, what)
    if isinstance(params, Mapping) != isinstance(other, Mapping) or keys != other_keys:
        raise ValueError(f"{what} must have the same structure as params: keys/length {other_keys} vs {keys}")
    return keys


def _init(params: Any, init: Any, state_dtype: Any) -> Any:
    keys = _keys(params, "params")
    for k in keys:  # name the bad entry before anything is allocated
        check_array(params[k], _label("params", k))
    return _rebuild(params, {k: init(params[k], state_dtype=state_dtype) for k in keys})


def adamp_init(params: Any, *, state_dtype: Any = None) -> Any:
    """:func:`adamp_core.adamp_init` for every param; same structure as ``params``."""
    return _init(params, _adamp_init, state_dtype)


def sgdp_init(params: Any, *, state_dtype: Any = None) -> Any:
    """:func:`adamp_core.sgdp_init` for every param; same structure as ``params``."""
    return _init(params, _sgdp_init, state_dtype)


def _validate(params: Any, grads: Any, states: Any, check_state: Any, hp: Any) -> list[tuple[Any, Any]]:
    keys = _match(params, grads, "grads")
    _match(params, states, "states")
    todo = []
    for k in keys:
        p, g = params[k], grads[k]
        xp = check_array(p, _label("params", k))
        if g is None:
            continue
        check_grad(p, g, _label("grads", k))
        check_hyper_arrays(p, hp)
        try:
            check_state(p, states[k])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{_label('states', k)}: {exc}") from None
        todo.append((k, xp))
    return todo


def _step(
    params: Any, grads: Any, states: Any, hp: Any, check_state: Any, update: Any, skip_nonfinite: Any = False
) -> tuple[Any, Any]:
    skip = _flag(skip_nonfinite, "skip_nonfinite")
    todo = _validate(params, grads, states, check_state, hp)
    new_p = {k: params[k] for k in _keys(params, "params")}
    new_s = {k: states[k] for k in _keys(params, "params")}
    for k, xp in todo:
        new_p[k], new_s[k] = update(xp, params[k], grads[k], states[k], hp)
        if skip:  # each param on its own: a NaN in one grad leaves only that param (and state) as it was
            ok = finite_flag(xp, grads[k])
            new_p[k], new_s[k] = keep_if_finite(xp, ok, new_p[k], new_s[k], params[k], states[k])
    return _rebuild(params, new_p), _rebuild(params, new_s)


def adamp_step(
    params: Any,
    grads: Any,
    states: Any,
    lr: Any = 1e-3,
    betas: tuple[Any, Any] = (0.9, 0.999),
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    delta: Any = 0.1,
    wd_ratio: Any = 0.1,
    nesterov: bool = False,
    *,
    skip_nonfinite: bool = False,
) -> tuple[Any, Any]:
    """:func:`adamp_core.adamp_step` over a list/tuple/dict; returns ``(params, states)``.
    ``skip_nonfinite``: as in :func:`adamp_core.adamp_step`, param by param."""
    hp = check_adamp(lr, betas, eps, weight_decay, delta, wd_ratio, nesterov)
    return _step(params, grads, states, hp, check_adamp_state, adamp_update, skip_nonfinite)


def sgdp_step(
    params: Any,
    grads: Any,
    states: Any,
    lr: Any,
    momentum: Any = 0.0,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    nesterov: bool = False,
    eps: Any = 1e-8,
    delta: Any = 0.1,
    wd_ratio: Any = 0.1,
    *,
    skip_nonfinite: bool = False,
) -> tuple[Any, Any]:
    """:func:`adamp_core.sgdp_step` over a list/tuple/dict; returns ``(params, states)``.
    ``skip_nonfinite``: as in :func:`adamp_core.sgdp_step`, param by param."""
    hp = check_sgdp(lr, momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio)
    return _step(params, grads, states, hp, check_sgdp_state, sgdp_update, skip_nonfinite)


# Re-exported so that `from adamp_core.tree import AdamPState` works in tree-level code.
AdamPState = AdamPState
SGDPState = SGDPState
