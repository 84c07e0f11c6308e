"""The fused CPU kernels (:mod:`adamp_core.paths.numba_fused`) as PyTorch operators, so that a compiled step
(``torch.compile(optimizer.step)``) calls them as one node of its graph instead of breaking the graph or
tracing the array-API maths.

``torch.ops.adamp_xp.numba_step`` steps a list of plain CPU float32/float64 tensors of one optimizer in place
(params, state buffers, step counts: its mutated arguments) and returns the int64 flags of the tensors it
skipped (``skip_nonfinite`` and a non-finite grad: 1, nothing written). Its fake implementation only makes
that flag tensor, so dynamo and AOTAutograd trace it without running numba; inductor calls the real kernel.
A tensor whose float64 row sums leave the kernels' range is stepped inside the operator by the per-tensor
array-API step (the ground truth), as the eager path hands it back.

Imported by :func:`adamp_core.paths.numba_fused.prepare_traced` before tracing starts (never at import of
the core or an adapter: it imports torch; numba itself loads on the operator's first real call).
"""

from __future__ import annotations

from typing import Any

import torch

from ..optimizers import ADAMP, SGDP
from . import Options, Tensor, per_tensor

__all__ = ["bind", "numba_step", "pack", "step_op"]

_SPECS = {"adamp": ADAMP, "sgdp": SGDP}
# One template of each optimizer's hyperparameters: the order and kind of the fields pack() flattens.
_TEMPLATES = {"adamp": ADAMP.check(**ADAMP.all_defaults), "sgdp": SGDP.check(**{**SGDP.all_defaults, "lr": 0.1})}


def pack(hp: Any) -> tuple[Any, list[float], list[bool]]:
    """``hp`` (an AdamP/SGDP hyperparameter NamedTuple, every value but ``lr`` a Python number) as the
    operator's arguments: the lr tensor (None for a Python lr), the numbers in field order (a Python lr
    first), the flags in field order."""
    lr = hp.lr if torch.is_tensor(hp.lr) else None
    floats: list[float] = [] if lr is not None else [float(hp.lr)]
    flags: list[bool] = []
    for v in hp[1:]:
        if type(v) is bool:
            flags.append(v)
        elif type(v) is tuple:
            floats.extend(float(x) for x in v)
        else:
            floats.append(float(v))
    return lr, floats, flags


def _unpack(kind: str, lr: Any, floats: list[float], flags: list[bool]) -> Any:
    """The inverse of :func:`pack`, with a Python-float lr (a CPU tensor lr read: the kernels take numbers)."""
    template = _TEMPLATES[kind]
    fl, fb = iter(floats), iter(flags)
    values = [float(lr) if lr is not None else next(fl)]
    for v in template[1:]:
        if type(v) is bool:
            values.append(next(fb))
        elif type(v) is tuple:
            values.append(tuple(next(fl) for _ in v))
        else:
            values.append(next(fl))
    return type(template)(*values)


_PATH: list[Any] = [None]  # adamp_core.paths.numba_fused, handed in by bind() (no import circle)


def bind(path: Any) -> None:
    """Give the operator the numba path's module (:mod:`adamp_core.paths.numba_fused` calls this)."""
    _PATH[0] = path


_PLANS: dict[Any, Any] = {}  # (kind, skip, state addresses) -> the numba path's plan, refreshed for new grads


@torch.library.custom_op("adamp_xp::numba_step", mutates_args=("params", "bufs", "steps"), device_types="cpu")
def numba_step(kind: str, params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
               steps: list[torch.Tensor], lr: torch.Tensor | None, floats: list[float], flags: list[bool],
               skip_nonfinite: bool) -> torch.Tensor:
    """One step of ``kind`` ("adamp"/"sgdp") of every tensor, in place; ``bufs``: the state buffers, flat
    (``exp_avg, exp_avg_sq`` per tensor; ``momentum``), ``steps``: AdamP's 0-d int64 counts (advanced in
    place). Returns int64 flags, 1 where a non-finite grad skipped the tensor."""
    from . import NUMBA

    numba_fused = _PATH[0]
    spec = _SPECS[kind]
    hp = _unpack(kind, lr, floats, flags)
    n, k = len(params), len(spec.buffers)
    tensors = [Tensor(p, g, spec.state(steps[i], *bufs[i * k:(i + 1) * k]) if steps else
                      spec.state(*bufs[i * k:(i + 1) * k]))
               for i, (p, g) in enumerate(zip(params, grads, strict=True))]
    options = Options(skip_nonfinite, True)
    key = (kind, skip_nonfinite, *(x.data_ptr() for x in (*params, *bufs, *steps)))
    plan = _PLANS.get(key)
    plan = numba_fused.regrad(plan, grads) if plan is not None else None
    if plan is None:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        plan = numba_fused.plan(spec, tensors, list(range(n)), hp, options)
    _PLANS[key] = plan
    skipped = torch.zeros(n, dtype=torch.int64)
    outs: list[Any] = []

    def sink(idx: list[int], outcomes: list[Any]) -> None:
        outs.extend(zip(idx, outcomes, strict=True))

    back = numba_fused.run(plan, spec, tensors, grads, hp, options, sink)
    for i, o in outs:
        if o.ok is False:
            skipped[i] = 1
    for i in back:  # out of the kernels' float64 range: the per-tensor step, written here
        o = per_tensor.step_one(spec, per_tensor.namespace(params[i]), tensors[i], grads[i], hp, skip_nonfinite)
        params[i].copy_(o.param)
        for new, old in zip(o.state, tensors[i].state, strict=True):
            old.copy_(new)
        if o.ok is not None:
            skipped[i] = torch.logical_not(o.ok).to(torch.int64)
    assert all(o.path == NUMBA for _, o in outs)
    return skipped


step_op = torch.ops.adamp_xp.numba_step.default  # what a traced step calls (an OpOverload: one graph node)


@numba_step.register_fake
def _(kind: str, params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
      steps: list[torch.Tensor], lr: torch.Tensor | None, floats: list[float], flags: list[bool],
      skip_nonfinite: bool) -> torch.Tensor:
    return params[0].new_empty(len(params), dtype=torch.int64)
