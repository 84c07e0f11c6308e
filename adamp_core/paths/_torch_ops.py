"""The fused kernels (:mod:`adamp_core.paths.numba_fused`, :mod:`adamp_core.paths.triton_fused`) as PyTorch
operators, so that a compiled step
(``torch.compile(optimizer.step)``) calls them as one node of its graph instead of breaking the graph or
tracing the array-API maths.

``torch.ops.adamp_xp.numba_step`` (``triton_step``: the same on one CUDA device, or CPU tensors under
``TRITON_INTERPRET=1``) steps a list of tensors of one optimizer in place
(params, state buffers, step counts: its mutated arguments) and returns the int64 flags of the tensors it
skipped (``skip_nonfinite`` and a non-finite grad: 1, nothing written). Its fake implementation only makes
that flag tensor, so dynamo and AOTAutograd trace it without running numba; inductor calls the real kernel.
A tensor whose float64 row sums leave the kernels' range is stepped inside the operator by the per-tensor
array-API step (the ground truth), as the eager path hands it back.

Imported by the paths' ``prepare_traced`` before tracing starts (never at import of the core or an adapter:
it imports torch; numba and triton load on an operator's first real call).
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..optimizers import ADAMP, SGDP
from . import Options, Tensor, per_tensor

__all__ = ["OPS", "bind", "call", "numba_step", "pack", "triton_step"]

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


_PATHS: dict[str, Any] = {}  # "numba"/"triton" -> the path's module, handed in by bind() (no import circle)


def bind(name: str, path: Any) -> None:
    """Give the operators a path's module (:mod:`adamp_core.paths.numba_fused` and
    :mod:`adamp_core.paths.triton_fused` call this from their ``prepare_traced``)."""
    _PATHS[name] = path


# (path, kind, skip, state addresses) -> (the path's plan, the grads it holds), refreshed for new grad objects
_PLANS: dict[Any, Any] = {}


def _step(name: str, kind: str, params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
          steps: list[torch.Tensor], lr: torch.Tensor | None, floats: list[float], flags: list[bool],
          skip_nonfinite: bool) -> torch.Tensor:
    """The operators' body: the path's plan (kept while the tensors' addresses hold; new grads refresh it, as
    the dispatcher does), its run, and the skip flags."""
    path = _PATHS[name]
    spec = _SPECS[kind]
    hp = _unpack(kind, lr, floats, flags)
    n, k = len(params), len(spec.buffers)
    tensors = [Tensor(p, g, spec.state(steps[i], *bufs[i * k:(i + 1) * k]) if steps else
                      spec.state(*bufs[i * k:(i + 1) * k]))
               for i, (p, g) in enumerate(zip(params, grads, strict=True))]
    options = Options(skip_nonfinite, "triton" if name == "triton" else True)
    key = (name, kind, skip_nonfinite, *(x.data_ptr() for x in (*params, *bufs, *steps)))
    plan, planned_grads = _PLANS.get(key, (None, None))
    if plan is not None and not all(map(operator.is_, grads, planned_grads)):  # new grad objects: refreshed
        plan = path.regrad(plan, grads)
    if plan is None:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        plan = path.plan(spec, tensors, list(range(n)), hp, options)
    _PLANS[key] = (plan, grads)
    flags_out: list[Any] = [None] * n
    outs: list[Any] = []

    def sink(idx: list[int], outcomes: list[Any]) -> None:
        outs.extend(zip(idx, outcomes, strict=True))

    back = path.run(plan, spec, tensors, grads, hp, options, sink)
    for i, o in outs:
        if o.ok is False:  # a host kernel skipped it
            flags_out[i] = 1
        elif o.skips is not None:  # a device kernel's flag (no sync)
            flags_out[i] = o.skips
    for i in back:  # out of the numba kernels' float64 range: the per-tensor step, written here
        o = per_tensor.step_one(spec, per_tensor.namespace(params[i]), tensors[i], grads[i], hp, skip_nonfinite)
        params[i].copy_(o.param)
        for new, old in zip(o.state, tensors[i].state, strict=True):
            old.copy_(new)
        if o.ok is not None:
            flags_out[i] = torch.logical_not(o.ok).to(torch.int64)
    if all(f is None or type(f) is int for f in flags_out):
        return torch.tensor([f or 0 for f in flags_out], dtype=torch.int64, device=params[0].device)
    zero = params[0].new_zeros((), dtype=torch.int64)
    return torch.stack([zero + f if f is not None else zero for f in flags_out])


@torch.library.custom_op("adamp_xp::numba_step", mutates_args=("params", "bufs", "steps"), device_types="cpu")
def numba_step(kind: str, params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
               steps: list[torch.Tensor], lr: torch.Tensor | None, floats: list[float], flags: list[bool],
               skip_nonfinite: bool) -> torch.Tensor:
    """One step of ``kind`` ("adamp"/"sgdp") of every tensor by the numba kernels, in place; ``bufs``: the
    state buffers, flat (``exp_avg, exp_avg_sq`` per tensor; ``momentum``), ``steps``: AdamP's 0-d int64
    counts (advanced in place). Returns int64 flags, 1 where a non-finite grad skipped the tensor."""
    return _step("numba", kind, params, grads, bufs, steps, lr, floats, flags, skip_nonfinite)


@torch.library.custom_op("adamp_xp::triton_step", mutates_args=("params", "bufs", "steps"))
def triton_step(kind: str, params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                steps: list[torch.Tensor], lr: torch.Tensor | None, floats: list[float], flags: list[bool],
                skip_nonfinite: bool) -> torch.Tensor:
    """:func:`numba_step` by the Triton kernels (:mod:`adamp_core.paths.triton_fused`: one device, a constant
    number of launches, no host read), so a captured step (CUDA graphs) replays them. An opaque operator
    (``custom_op``) rather than ``triton_op``: the kernels write through device tables of addresses, which
    ``triton_op``'s mutation analysis (of the kernels' tensor arguments) cannot see; ``mutates_args`` says
    exactly what is written."""
    return _step("triton", kind, params, grads, bufs, steps, lr, floats, flags, skip_nonfinite)


def _fake(kind: str, params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
          steps: list[torch.Tensor], lr: torch.Tensor | None, floats: list[float], flags: list[bool],
          skip_nonfinite: bool) -> torch.Tensor:
    return params[0].new_empty(len(params), dtype=torch.int64)


numba_step.register_fake(_fake)
triton_step.register_fake(_fake)

# what a traced step calls (OpOverloads: one graph node each), by path name
OPS = {"numba": torch.ops.adamp_xp.numba_step.default, "triton": torch.ops.adamp_xp.triton_step.default}


def call(name: str, spec: Any, tensors: Any, idx: list[int], grads: Any, hp: Any, skip_nonfinite: bool) -> Any:
    """Inside a torch trace: the operator of path ``name`` on the tensors ``idx`` (one node of the graph);
    returns the skip flags."""
    lr, floats, flags = pack(hp)
    ts = [tensors[i] for i in idx]
    bufs = [getattr(t.state, f) for t in ts for f in spec.buffers]
    steps = [t.state.step for t in ts] if spec.has_step else []
    return OPS[name](spec.key, [t.param for t in ts], [grads[i] for i in idx], bufs, steps, lr, floats, flags,
                     skip_nonfinite)
