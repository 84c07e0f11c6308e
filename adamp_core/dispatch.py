"""The one place that decides how a group of tensors is stepped.

An adapter hands :func:`step` one param group at a time: each tensor as a :class:`Tensor` (param,
grad, core state, row layout, whether its arrays may be written in place), the checked
hyperparameters and its options. :func:`step` splits the tensors among the execution paths with one
policy and returns an :class:`Outcome` per tensor, in order:

0. **fused Triton kernels** (:mod:`adamp_core.triton_fused`; only with ``fused="triton"``, not traced):
   torch tensors (CuPy arrays through DLPack) on a CUDA device (CPU tensors under ``TRITON_INTERPRET=1``)
   that :func:`adamp_core.triton_fused.entry` accepts, with Python-number hyperparameters; each group of
   one device and dtypes in a constant number of launches, written in place on the device (``DEVICE``).
   Opt-in until a GPU has run them (README); the rest takes the paths below, as without the option.
1. **fused CPU kernels** (:mod:`adamp_core.fused`, numba; ``fused`` not False, not traced): tensors
   whose param, grad and state are writeable, C-contiguous float32/float64 host buffers of one dtype
   (NumPy arrays, plain CPU torch tensors) and whose rows are all local. Those below
   :data:`adamp_core.fused.BATCH_MAX_SIZE` elements go in one batched kernel call per dtype, larger ones
   one row-parallel call each. They are written in place (``WRITTEN``); a tensor whose float64 sums
   leave the kernels' range (``FALLBACK``) takes the next path.
2. **multi-tensor array-API step** (:mod:`adamp_core.grouped`; ``foreach=True``, or ``None`` outside a
   tracer, which fuses per-tensor steps itself; rows local): tensors of one library, dtype, device and
   state dtypes whose row lengths share a bucket, stepped together. On a host device only tensors below
   ``host_tensor_max_elements`` join a group (a larger one's step is bandwidth-bound there).
3. **per-tensor array-API step** (:func:`adamp_core.adamp.adamp_update` / ``sgdp_update``): everything
   else, including shards whose rows span processes (``rows``), tensors the adapter marks ``alone`` and,
   by default, everything inside a tracer (``torch.compile``, ``jax.jit``: it fuses each step itself).

Paths 2 and 3 return new arrays (``NEW``) that the adapter writes back its own way (``copy_``, item
assignment, or a new pytree). Adding a path touches this module and the path's own module only. Nothing
here syncs a device: the numba kernels' status is read on the host, where the arrays are; the Triton
kernels' flags stay on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ._common import finite_flag, is_python_int, keep_if_finite
from .arrays import check_array, device, is_host
from .grouped import HOST_TENSOR_MAX_ELEMENTS, group_indices
from .optimizers import OptimizerSpec
from .projection import RowReduce

__all__ = ["DEVICE", "NEW", "SKIPPED", "WRITTEN", "Outcome", "Tensor", "advanced", "step"]

WRITTEN, NEW, SKIPPED, DEVICE = "written", "new", "skipped", "device"


class Tensor(NamedTuple):
    """One tensor of a group, as an adapter hands it to :func:`step`."""

    param: Any  # the array to step (a shard's local rows under FSDP2)
    grad: Any  # its gradient (negated already for ``maximize``)
    state: Any  # its core state (AdamPState / SGDPState)
    rows: RowReduce | None = None  # rows split across processes (see RowReduce); None: all rows here
    writable: bool = True  # param and state arrays may be written in place (False: JAX, read-only arrays)
    alone: bool = False  # only the per-tensor step (e.g. a torch DTensor left to DTensor's own propagation)


class Outcome(NamedTuple):
    """What :func:`step` did to one tensor.

    ``how`` is ``WRITTEN`` (the fused kernels wrote the param and the state's arrays in place; the state's
    step count, if any, is the adapter's to advance by one: ``param``/``state`` are None), ``NEW``
    (``param`` and ``state`` are the results, new arrays to write back; with ``skip_nonfinite`` they equal
    the old values where ``ok``, a 0-d bool array, is false), ``SKIPPED`` (a kernel found a non-finite
    grad entry: nothing changed) or ``DEVICE`` (the Triton kernels wrote the param and the state's arrays
    in place and advanced an array step count themselves, where ``ok``; a Python-int step count is the
    adapter's to advance by one, where ``ok``: see :func:`advanced`). For ``DEVICE``, ``ok`` is None (no
    ``skip_nonfinite``: written) or a 0-d bool device array (the grad was finite: written; else nothing
    changed), and ``skips`` None or a 0-d int64 device array, 1 where skipped (to add to a skip counter
    without a host sync)."""

    how: str
    param: Any = None
    state: Any = None
    ok: Any = None
    skips: Any = None


def step(
    spec: OptimizerSpec,
    tensors: Sequence[Tensor],
    hp: Any,
    *,
    skip_nonfinite: bool = False,
    fused: bool | None = None,
    foreach: bool | None = None,
    traced: bool = False,
    host_tensor_max_elements: int = HOST_TENSOR_MAX_ELEMENTS,
    sink: Callable[[list[int], list[Outcome]], None] | None = None,
) -> list[Outcome] | None:
    """Step every tensor of one param group (already checked) on its path; see the module docstring.

    ``fused`` / ``foreach``: the adapters' options (None: where they apply and pay; True: ``fused`` as None,
    ``foreach`` also inside a tracer; False: never; ``fused="triton"``: the Triton kernels first, for every
    tensor they take, then the paths of None for the rest). ``traced``: inside a tracer that fuses each tensor's
    step itself (``torch.compile``, ``jax.jit``): no kernels, and the multi-tensor step only if asked for.
    ``host_tensor_max_elements``: the largest host tensor that joins a multi-tensor group.

    Returns the outcomes in the tensors' order; or, with ``sink``, hands them to ``sink(indices, outcomes)``
    as each path finishes a unit (a kernel call, a group, a tensor) and returns None, so that an adapter
    writing results back in place never holds more than one unit's new arrays."""
    if sink is None:
        out: list[Any] = [None] * len(tensors)

        def collect(idx: list[int], outcomes: list[Outcome]) -> None:
            for i, o in zip(idx, outcomes, strict=True):
                out[i] = o

        step(spec, tensors, hp, skip_nonfinite=skip_nonfinite, fused=fused, foreach=foreach, traced=traced,
             host_tensor_max_elements=host_tensor_max_elements, sink=collect)
        return out
    rest = list(range(len(tensors)))
    if fused == "triton" and not traced and any(t.writable for t in tensors):
        from . import triton_fused  # Triton is loaded only when its kernels run

        if triton_fused.AVAILABLE:
            rest = _triton(spec, tensors, rest, hp, skip_nonfinite, sink)
    if fused is not False and not traced and any(tensors[i].writable for i in rest):
        from . import fused as _fused  # numba is loaded only where the kernels may run (never for JAX arrays)

        if _fused.AVAILABLE:
            rest = _kernels(spec, tensors, rest, hp, skip_nonfinite, sink)
    if foreach is True or (foreach is None and not traced):  # asked for, or where it pays
        together = [i for i in rest if tensors[i].rows is None and not tensors[i].alone]
        _groups(spec, tensors, together, hp, skip_nonfinite, host_tensor_max_elements, sink)
        rest = [i for i in rest if tensors[i].rows is not None or tensors[i].alone]
    for i in rest:
        sink([i], [_alone(spec, tensors[i], hp, skip_nonfinite)])
    return None


def _arrays(spec: OptimizerSpec, t: Tensor) -> list[Any]:
    return [t.param, t.grad, *(getattr(t.state, f) for f in spec.buffers)]


def _triton(spec: OptimizerSpec, tensors: Sequence[Tensor], idx: list[int], hp: Any, skip: bool,
            sink: Any) -> list[int]:
    """Path 0: the Triton kernels, in place on the device, one launch set per group of one device and
    dtypes (:func:`adamp_core.triton_fused.entry`). Returns the indices they did not take."""
    from . import triton_fused

    if not triton_fused.supports_hyperparams(hp):
        return idx
    groups: dict[Any, list[tuple[int, Any]]] = {}
    rest = []
    interpret = triton_fused.interpreting()
    for i in idx:
        t = tensors[i]
        e = None if not t.writable or t.alone or t.rows is not None else triton_fused.entry(spec, t.param, t.grad,
                                                                                           t.state, interpret)
        if e is None:
            rest.append(i)
        else:
            groups.setdefault(e.key, []).append((i, e))
    for members in groups.values():
        ok, skips = triton_fused.step_group(spec, [e for _, e in members], hp, skip)
        sink([i for i, _ in members],
             [Outcome(DEVICE, ok=None if ok is None else ok[j], skips=None if skips is None else skips[j])
              for j in range(len(members))])
    return rest


def _kernels(spec: OptimizerSpec, tensors: Sequence[Tensor], idx: list[int], hp: Any, skip: bool,
             sink: Any) -> list[int]:
    """Path 1: the fused kernels, in place. Returns the indices (of ``idx``) they did not take."""
    from . import fused as _fused

    eligible: list[tuple[int, list[int]]] = []  # (index, addresses) of the tensors the kernels can take
    rest = []
    for i in idx:
        t = tensors[i]
        addresses = None if not t.writable or t.alone or t.rows is not None else _fused.host_addresses(_arrays(spec, t))
        if addresses is None:
            rest.append(i)
        else:
            eligible.append((i, addresses))
    steps = dict(zip([i for i, _ in eligible], _next_steps(spec, [tensors[i].state for i, _ in eligible]) or [],
                     strict=False))
    batches: dict[Any, list[tuple[int, list[int]]]] = {}  # dtype -> (index, addresses) of small tensors
    for i, addresses in eligible:
        t = tensors[i]
        if math.prod(t.param.shape) < _fused.BATCH_MAX_SIZE:
            batches.setdefault(t.param.dtype, []).append((i, addresses))
            continue
        status = _fused.run_inplace(spec.kernel, _fused.host_views(_arrays(spec, t)), steps.get(i), hp, skip)
        if status == _fused.FALLBACK:
            rest.append(i)
        else:
            sink([i], [Outcome(SKIPPED if status == _fused.SKIPPED else WRITTEN)])
    for entries in batches.values():
        chosen = [i for i, _ in entries]
        params = [tensors[i].param for i in chosen]
        status = _fused.run_batch(spec.kernel, [a for _, a in entries], params,
                                  [steps[i] for i in chosen] if steps else None, hp, skip)
        done = [(i, Outcome(SKIPPED if s == _fused.SKIPPED else WRITTEN))
                for i, s in zip(chosen, status, strict=True) if s != _fused.FALLBACK]
        rest += [i for i, s in zip(chosen, status, strict=True) if s == _fused.FALLBACK]
        if done:
            sink([i for i, _ in done], [o for _, o in done])
    return sorted(rest)


def _next_steps(spec: OptimizerSpec, states: list[Any]) -> list[int] | None:
    """The step counts the kernels compute with (the new ones, from 1), read on the host where the states
    are (the kernels run on host memory only): Python ints as they are, 0-d arrays stacked and read at once
    (one conversion, not one per tensor)."""
    if not spec.has_step:
        return None
    steps = [s.step for s in states]
    if not steps:
        return []
    if all(is_python_int(t) for t in steps):
        return [t + 1 for t in steps]
    import numpy as np
    from array_api_compat import array_namespace

    return [int(t) + 1 for t in np.asarray(array_namespace(*steps).stack(steps)).tolist()]


def _groups(spec: OptimizerSpec, tensors: Sequence[Tensor], idx: list[int], hp: Any, skip: bool, host_max: int,
            sink: Any) -> None:
    """Path 2: the multi-tensor array-API step, one group of equal library, dtypes, device and row bucket
    at a time (a group of one takes the per-tensor step)."""
    if not idx:
        return
    keys, shapes = [], []
    for i in idx:
        t = tensors[i]
        xp = check_array(t.param)
        keys.append((xp, t.param.dtype, device(t.param), tuple(getattr(t.state, f).dtype for f in spec.buffers)))
        shapes.append(tuple(t.param.shape))
    on_host = all(is_host(tensors[i].param) for i in idx)
    for members in group_indices(keys, shapes, on_host=on_host, host_max_elements=host_max):
        chosen = [idx[j] for j in members]
        if len(chosen) == 1:
            sink(chosen, [_alone(spec, tensors[chosen[0]], hp, skip)])
            continue
        ts = [tensors[i] for i in chosen]
        new_p, new_s, ok = spec.update_group(
            keys[members[0]][0], [t.param for t in ts], [t.grad for t in ts], [t.state for t in ts], hp, skip
        )
        sink(chosen, [Outcome(NEW, new_p[j], new_s[j], None if ok is None else ok[j, ...]) for j in range(len(chosen))])


def _alone(spec: OptimizerSpec, t: Tensor, hp: Any, skip: bool) -> Outcome:
    """Path 3: the per-tensor array-API step (``rows``: a shard's layout)."""
    xp = check_array(t.param)
    new_p, new_s = spec.update(xp, t.param, t.grad, t.state, hp, t.rows)
    if not skip:
        return Outcome(NEW, new_p, new_s)
    ok = finite_flag(xp, t.grad, t.rows)  # every shard of a param decides alike
    new_p, new_s = keep_if_finite(xp, ok, new_p, new_s, t.param, t.state)
    return Outcome(NEW, new_p, new_s, ok)


def advanced(spec: OptimizerSpec, state: Any, how: str = WRITTEN) -> Any:
    """``state`` with its step count advanced by one (a ``WRITTEN`` outcome, for an adapter that holds
    immutable states; the kernels wrote the arrays). After a written ``DEVICE`` outcome only a Python-int
    count is advanced here: the Triton kernels advanced an array one in place."""
    if not spec.has_step or (how == DEVICE and not is_python_int(state.step)):
        return state
    return state._replace(step=state.step + 1)
