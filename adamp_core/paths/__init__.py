"""Execution paths: the same AdamP/SGDP update computed four ways, behind one protocol.

Every path is one module here with the same five functions; :mod:`adamp_core.dispatch` offers a param
group to them in its order (its policy) and caches what they build in a :class:`adamp_core.dispatch.Plans`:

``offered(options) -> bool``
    whether the adapter's options let the path run at all (and its library is installed);
``claim(spec, tensors, idx, hp, options) -> list[int]``
    the indices of ``idx`` whose tensors it takes, decided on metadata only (library, dtype, device,
    strides, writability, row layout, the hyperparameters' kinds): never a value, never a sync;
``plan(spec, tensors, taken, hp, options) -> plan``
    what stays the same from step to step for the tensors it claimed: layouts, address tables, segment
    indices, scratch buffers, launch arguments. Built once, kept while the group's params, state arrays,
    shapes, dtypes, devices, options and hyperparameter kinds hold;
``regrad(plan, grads) -> plan | None``
    the plan for the same params and states with new grad arrays (``grads``, index-aligned with the group's
    tensors; torch's ``zero_grad(set_to_none=True)`` gives new ones every step): only what depends on the
    grads is rebuilt (their addresses), or None where a new grad no longer fits the path (the group is then
    claimed again);
``run(plan, spec, tensors, grads, hp, options, sink) -> list[int]``
    one step: the launches, with hyperparameters packed once per change of their values. Each finished
    unit (a kernel call, a group, a tensor) goes to ``sink(indices, outcomes)``; returns the indices it
    handed back (the numba kernels' float64 range check), which the per-tensor step takes.

Every path advances the step counts of the tensors it wrote itself: in place for array counts (the numba
and Triton kernels), in the returned state for Python-int counts and for new arrays. So an adapter never
advances a count; it writes new arrays back, keeps returned states, and counts skips (:class:`Outcome`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..rows import RowReduce

__all__ = ["MULTI_TENSOR", "NUMBA", "Options", "Outcome", "PER_TENSOR", "TRITON", "Tensor", "written"]

# Path names (Outcome.path): what conformance and the bench report.
TRITON, NUMBA, MULTI_TENSOR, PER_TENSOR = "triton", "numba", "multi_tensor", "per_tensor"


class Tensor(NamedTuple):
    """One tensor of a group, as an adapter hands it to :func:`adamp_core.dispatch.step`."""

    param: Any  # the array to step (a shard's local rows under FSDP2)
    grad: Any  # its gradient (negated already for ``maximize``)
    state: Any  # its core state (AdamPState / SGDPState)
    rows: RowReduce | None = None  # rows split across processes (see RowReduce); None: all rows here
    writable: bool = True  # param and state arrays may be written in place (False: JAX, read-only arrays)
    alone: bool = False  # only the per-tensor step (e.g. a torch DTensor left to DTensor's own propagation)


class Outcome(NamedTuple):
    """What a path did to one tensor.

    ``path``: which path stepped it (:data:`TRITON`, :data:`NUMBA`, :data:`MULTI_TENSOR`, :data:`PER_TENSOR`).
    ``param``: None where the path wrote the param and the state's arrays in place; else the new param, a
    new array for the adapter to write back its own way. ``state``: the state after the step (new arrays
    with ``param``; in place, the same arrays with a Python-int count advanced), or None where there is
    nothing to keep (written in place, any array count advanced in place). ``ok``: None (no
    ``skip_nonfinite``, or nothing to tell), False (a host kernel found a non-finite grad entry: nothing
    written, the count not advanced) or a 0-d bool array on the param's device (the grad was finite:
    written; else param and state kept). ``skips``: None or a 0-d int64 device array, 1 where skipped (to
    add to a skip counter without a host sync)."""

    path: str
    param: Any = None
    state: Any = None
    ok: Any = None
    skips: Any = None


class Options(NamedTuple):
    """The adapter's options for one group, as every path reads them (see :func:`adamp_core.dispatch.step`)."""

    skip_nonfinite: bool = False
    fused: Any = None  # None, True, False or "triton"
    foreach: bool | None = None
    traced: bool = False  # inside a tracer that fuses each step itself (torch.compile, jax.jit)
    host_tensor_max_elements: int = 1 << 16  # the largest host tensor that joins a multi-tensor group


def written(path: str) -> Outcome:
    """The outcome of a tensor a path wrote in place, its array count (if any) advanced in place."""
    return _WRITTEN[path]


_WRITTEN = {name: Outcome(name) for name in (TRITON, NUMBA, MULTI_TENSOR, PER_TENSOR)}
