"""The array and optax adapters against ``adamp==0.3.0``, for the tests and ``adamp-xp conformance``.

Each run puts every shape of :data:`~adamp_xp.testing.oracle.SHAPES` into *one* optimizer (so the
adapters' multi-param bookkeeping is exercised), feeds it the official trajectory's gradients
(:func:`~adamp_xp.testing.oracle.reference_run`) and compares the params and every state array
after every step, normwise over the trajectory (:func:`~adamp_xp.testing.oracle.rel_error`).
Every library (the adapters, JAX, optax, torch, the official package) is imported lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends import Backend, available_backends
from .oracle import ADAMP_CASES, SGDP_CASES, SHAPES, reference_run, rel_error, tolerance

__all__ = ["adapter_rows", "optax_kwargs", "run_array_adapter", "run_optax_adapter"]

TARGETS = ("adamp_array", "adamp_optax")


def _cases(optimizer: str) -> dict[str, dict[str, Any]]:
    return ADAMP_CASES if optimizer == "adamp" else SGDP_CASES


def optax_kwargs(optimizer: str, hp: dict[str, Any]) -> dict[str, Any]:
    """Official keyword arguments (``lr``, ``betas``) renamed to ``adamp_optax``'s."""
    out = dict(hp)
    if "lr" in out:
        out["learning_rate"] = out.pop("lr")
    if optimizer == "adamp" and "betas" in out:
        out["b1"], out["b2"] = out.pop("betas")
    return out


def _references(optimizer: str, case: str, dtype: str, steps: int, shapes: Any) -> dict[str, Any]:
    return {name: reference_run(optimizer, case, name, dtype, steps) for name in shapes}


def _host(backend: Backend, x: Any) -> np.ndarray:
    # A copy: to_numpy may share memory with a float64 torch tensor that the adapter updates in place.
    return np.array(backend.to_numpy(x), copy=True)


def _compare(refs: dict[str, Any], ours: dict[str, dict[str, list[np.ndarray]]]) -> float:
    worst = 0.0
    for name, ref in refs.items():
        worst = max(worst, rel_error(ours[name]["param"], ref.params))
        for field in ref.states[0]:
            worst = max(worst, rel_error(ours[name][field], [s[field] for s in ref.states]))
    return worst


def run_array_adapter(
    backend: Backend, optimizer: str, case: str, dtype: str, steps: int = 18, shapes: Any = None
) -> float:
    """Max normwise relative error of ``adamp_array`` on ``backend`` against the official optimizer."""
    import adamp_array

    shapes = list(SHAPES) if shapes is None else list(shapes)
    refs = _references(optimizer, case, dtype, steps, shapes)
    params = {name: backend.asarray(ref.init, dtype) for name, ref in refs.items()}
    hp = _cases(optimizer)[case]
    opt = adamp_array.AdamP(params, **hp) if optimizer == "adamp" else adamp_array.SGDP(params, **hp)
    ours: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in shapes}
    for t in range(steps):
        current = opt.step({name: backend.asarray(ref.grads[t], dtype) for name, ref in refs.items()})
        states = opt.states
        for name, ref in refs.items():
            ours[name].setdefault("param", []).append(_host(backend, current[name]))
            for field in ref.states[t]:
                ours[name].setdefault(field, []).append(_host(backend, getattr(states[name], field)))
    return _compare(refs, ours)


def run_optax_adapter(
    backend: Backend, optimizer: str, case: str, dtype: str, steps: int = 18, shapes: Any = None, jit: bool = True
) -> float:
    """Max normwise relative error of ``adamp_optax`` (``update`` + ``optax.apply_updates``, under
    ``jax.jit`` by default) on a JAX ``backend`` against the official optimizer."""
    import jax
    import optax

    import adamp_optax

    shapes = list(SHAPES) if shapes is None else list(shapes)
    refs = _references(optimizer, case, dtype, steps, shapes)
    kw = optax_kwargs(optimizer, _cases(optimizer)[case])
    tx = adamp_optax.adamp(**kw) if optimizer == "adamp" else adamp_optax.sgdp(**kw)

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if jit:
        step = jax.jit(step)
    params = {name: backend.asarray(ref.init, dtype) for name, ref in refs.items()}
    state = tx.init(params)
    ours: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in shapes}
    for t in range(steps):
        params, state = step(params, state, {name: backend.asarray(ref.grads[t], dtype) for name, ref in refs.items()})
        for name, ref in refs.items():
            ours[name].setdefault("param", []).append(_host(backend, params[name]))
            for field in ref.states[t]:
                ours[name].setdefault(field, []).append(_host(backend, getattr(state, field)[name]))
    return _compare(refs, ours)


def adapter_rows(
    dtypes: tuple[str, ...] = ("float64", "float32"),
    steps: int = 18,
    backends: list[Backend] | None = None,
    cases: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{backend, device, dtype, target, max_rel_error, passed}`` for ``adamp-xp conformance``.

    ``adamp_array`` runs on every available backend, ``adamp_optax`` on the JAX ones; each row is
    the worst error over both optimizers and all of their oracle cases and shapes, and passes within
    :func:`~adamp_xp.testing.oracle.tolerance`. JAX float64 rows need ``jax_enable_x64`` (set it
    before creating any JAX array); without it they are left out. ``cases`` (``{"adamp": [...],
    "sgdp": [...]}``) restricts the oracle cases (default: all of them).
    """
    cases = {opt: list(_cases(opt)) for opt in ("adamp", "sgdp")} if cases is None else cases
    rows = []
    for b in available_backends() if backends is None else backends:
        for dtype in dtypes:
            if not b.supports(dtype):
                continue
            for target in TARGETS:
                if target == "adamp_optax" and b.library != "jax":
                    continue
                run = run_array_adapter if target == "adamp_array" else run_optax_adapter
                err = max(run(b, opt, case, dtype, steps) for opt, names in cases.items() for case in names)
                rows.append(
                    dict(
                        backend=b.id,
                        device=b.device,
                        dtype=dtype,
                        target=target,
                        max_rel_error=err,
                        passed=bool(err <= tolerance(dtype)),
                    )
                )
    return rows
