"""The one place that decides how a group of tensors is stepped: the policy, and the plans it keeps.

An adapter hands :func:`step` one param group at a time: each tensor as a :class:`Tensor` (param, grad,
core state, row layout, whether its arrays may be written in place), the checked hyperparameters, its
options and, to reuse what the paths built, the group's :class:`Plans`. The policy offers the group to the
execution paths of :mod:`adamp_core.paths` in this order, each taking what it claims of what is left:

0. **Triton kernels** (:mod:`adamp_core.paths.triton_fused`; only with ``fused="triton"``; traced by
   ``torch.compile``: as the operator ``torch.ops.adamp_xp.triton_step``):
   torch tensors (CuPy arrays through DLPack) on a CUDA device (CPU tensors under ``TRITON_INTERPRET=1``)
   with Python-number hyperparameters; each group of one device and dtypes in a constant number of
   launches, written in place on the device. Opt-in until a GPU has run them (README).
1. **numba kernels** (:mod:`adamp_core.paths.numba_fused`; ``fused`` not False; traced by ``torch.compile``:
   as the operator ``torch.ops.adamp_xp.numba_step``, one graph node per dtype): writeable,
   C-contiguous float32/float64 host buffers (NumPy arrays, plain CPU torch tensors) whose rows are all
   here; small ones in one batched call per dtype, larger ones one row-parallel call each, in place. A
   tensor whose float64 sums leave the kernels' range is handed back to the per-tensor step.
2. **multi-tensor array-API step** (:mod:`adamp_core.paths.multi_tensor`; ``foreach=True``, or ``None``
   outside a tracer): tensors of one library, dtype, device and state dtypes whose row lengths share a
   bucket, stepped together (on a host device only tensors below ``host_tensor_max_elements``).
3. **per-tensor array-API step** (:mod:`adamp_core.paths.per_tensor`): everything else, including shards
   whose rows span processes (``rows``), tensors the adapter marks ``alone`` and, by default, everything
   else inside a tracer (``torch.compile``, ``jax.jit``: it fuses each step itself).

A traced torch step calls the kernels' operators only once :func:`prepare_traced` registered them (the
adapter calls it where its code runs eagerly at trace time: no import inside the traced region).

Each :class:`Outcome` names the path that ran. What the paths build (claims, layouts, address tables,
segment indices, scratch buffers) is kept in :class:`Plans` and reused while the tensors' params, states,
row layouts, the options and the hyperparameters' kinds hold; new grad arrays only refresh what depends on
them (their addresses). Nothing here syncs a device.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._common import is_python_int
from .optimizers import OptimizerSpec
from .paths import Options, Outcome, Tensor, multi_tensor, numba_fused, per_tensor, triton_fused

__all__ = ["ORDER", "Outcome", "Plans", "Tensor", "observing", "prepare_traced", "step"]

# The policy: the paths in the order they are offered a group (the per-tensor step takes the rest).
ORDER = (triton_fused, numba_fused, multi_tensor, per_tensor)


class Plans:
    """What the paths built for one param group, kept by the adapter between steps (one per group) and
    checked by :func:`step` on every call: reused while the tensors hold, refreshed for new grads, built
    again otherwise. An adapter drops it when it knows the group changed (``load_state_dict``,
    ``add_param_group``); :func:`step` notices every other change itself."""

    __slots__ = ("key", "tensors", "grads", "units", "builds")

    def __init__(self) -> None:
        self.key: Any = None  # (optimizer, options, hyperparameter kinds) the plans were built for
        self.tensors: Sequence[Tensor] | None = None  # the tensors they were built or refreshed for
        self.grads: Sequence[Any] | None = None  # and their grads
        self.units: list[tuple[Any, Any]] = []  # (path module, its plan), in the policy's order
        self.builds = 0  # how many times the plans were built (tests, bench)


def _kinds(hp: Any) -> tuple[type, ...]:
    """The types of the hyperparameters' values (a Python float or an array: another plan)."""
    return tuple(type(x) for v in hp for x in (v if type(v) is tuple else (v,)))


def _same_but_grad(a: Tensor, b: Tensor) -> bool:
    """The same param, state arrays, layout and flags (a state whose Python-int count moved on is the same:
    the paths read such counts at every step)."""
    if a[0] is not b[0] or a[3] is not b[3] or a[4] != b[4] or a[5] != b[5]:
        return False
    sa, sb = a[2], b[2]
    return sa is sb or (type(sa) is type(sb) and all(
        x is y or (is_python_int(x) and is_python_int(y)) for x, y in zip(sa, sb, strict=True)))


def _refreshed(plans: Plans, tensors: Sequence[Tensor], grads: Sequence[Any]) -> bool:
    """Whether ``plans`` hold for ``tensors`` (the same list, or the same params, states and layouts) with
    ``grads``: the same grad objects, or new ones that every path takes (each refreshes its plan)."""
    old = plans.tensors
    if tensors is not old:
        if old is None or len(tensors) != len(old) or not all(map(_same_but_grad, tensors, old)):
            return False
        plans.tensors = tensors
    if grads is plans.grads or all(map(operator.is_, grads, plans.grads)):
        return True
    units = []
    for path, plan in plans.units:
        new = path.regrad(plan, grads)
        if new is None:
            return False
        units.append((path, new))
    plans.units, plans.grads = units, grads
    return True


def _build(plans: Plans, spec: OptimizerSpec, tensors: Sequence[Tensor], grads: Sequence[Any], hp: Any,
           options: Options) -> None:
    """Offer the group to the paths in :data:`ORDER`; each claims and plans on the tensors with ``grads``."""
    if not all(map(operator.is_, grads, [t[1] for t in tensors])):
        tensors = [t._replace(grad=g) for t, g in zip(tensors, grads, strict=True)]
    rest = list(range(len(tensors)))
    units = []
    for path in ORDER:
        if not rest or not path.offered(options):
            continue
        taken = path.claim(spec, tensors, rest, hp, options)
        if taken:
            units.append((path, path.plan(spec, tensors, taken, hp, options)))
            chosen = set(taken)
            rest = [i for i in rest if i not in chosen]
    plans.units, plans.grads = units, grads
    plans.builds += 1


def step(
    spec: OptimizerSpec,
    tensors: Sequence[Tensor],
    hp: Any,
    *,
    skip_nonfinite: bool = False,
    fused: bool | str | None = None,
    foreach: bool | None = None,
    traced: bool = False,
    host_tensor_max_elements: int = multi_tensor.HOST_TENSOR_MAX_ELEMENTS,
    sink: Callable[[list[int], list[Outcome]], None] | None = None,
    plans: Plans | None = None,
    grads: Sequence[Any] | None = None,
) -> list[Outcome] | None:
    """Step every tensor of one param group (already checked) on its path; see the module docstring.

    ``fused`` / ``foreach``: the adapters' options (None: where they apply and pay; True: ``fused`` as None,
    ``foreach`` also inside a tracer; False: never; ``fused="triton"``: the Triton kernels first, for every
    tensor they take, then the paths of None for the rest). ``traced``: inside a tracer that fuses each
    tensor's step itself (``torch.compile``, ``jax.jit``): the kernels only as torch operators (after
    :func:`prepare_traced`), and the multi-tensor step only if asked for. ``host_tensor_max_elements``: the
    largest host tensor that joins a multi-tensor group.
    ``plans``: the group's :class:`Plans`, to reuse across steps (None: built for this call only).
    ``grads``: this step's grads, index-aligned with ``tensors``, when they are not the tensors' own (an
    adapter that keeps its tensors between steps and only swaps the grads: no new Tensor per step).

    Returns the outcomes in the tensors' order; or, with ``sink``, hands them to ``sink(indices, outcomes)``
    as each path finishes a unit (a kernel call, a group, a tensor) and returns None, so that an adapter
    writing results back in place never holds more than one unit's new arrays."""
    if sink is None:
        out: list[Any] = [None] * len(tensors)

        def collect(idx: list[int], outcomes: list[Outcome]) -> None:
            for i, o in zip(idx, outcomes, strict=True):
                out[i] = o

        step(spec, tensors, hp, skip_nonfinite=skip_nonfinite, fused=fused, foreach=foreach, traced=traced,
             host_tensor_max_elements=host_tensor_max_elements, sink=collect, plans=plans, grads=grads)
        return out
    if _OBSERVERS:
        sink = _observed(sink)
    options = Options(skip_nonfinite, fused, foreach, traced, host_tensor_max_elements)
    plans = Plans() if plans is None else plans
    grads = [t[1] for t in tensors] if grads is None else grads
    key = (spec.key, options, _kinds(hp))
    if plans.key != key or not _refreshed(plans, tensors, grads):
        plans.key = None  # a build that raises leaves nothing half-made behind
        _build(plans, spec, tensors, grads, hp, options)
        plans.tensors, plans.key = tensors, key
    back: list[int] = []
    for path, plan in plans.units:
        back += path.run(plan, spec, tensors, grads, hp, options, sink)
    for i in sorted(back):  # handed back (the numba kernels' range check): the per-tensor step
        xp = per_tensor.namespace(tensors[i].param)
        sink([i], [per_tensor.step_one(spec, xp, tensors[i], grads[i], hp, skip_nonfinite)])
    return None


def prepare_traced(spec: OptimizerSpec, fused: bool | str | None, like: Any = None) -> None:
    """Load what a traced step (``traced=True``) of ``spec`` with ``fused`` calls, before tracing starts: an
    adapter calls it where its code runs eagerly at trace time (``adamp_torch``'s ``_init_group``), so that
    no import, registration or lookup of a library happens inside the traced region (dynamo gives up a frame
    that imports a module, and runs it eagerly at every call). ``like``: an array of the step, whose
    array-API namespace is resolved here."""
    if like is not None:
        per_tensor.namespace(like)
    for path in ORDER:
        prepare = getattr(path, "prepare_traced", None)
        if prepare is not None:
            prepare(spec, fused)


_OBSERVERS: list[Callable[[list[Outcome]], None]] = []


@contextlib.contextmanager
def observing(observer: Callable[[list[Outcome]], None]) -> Iterator[None]:
    """Hand every unit's outcomes to ``observer`` too, for the steps run inside the block (conformance and
    the bench read which path ran from ``Outcome.path``). Under ``jax.jit`` the dispatcher runs once, while
    tracing: what it chose is what the compiled program runs."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def _observed(sink: Callable[[list[int], list[Outcome]], None]) -> Callable[[list[int], list[Outcome]], None]:
    def both(idx: list[int], outcomes: list[Outcome]) -> None:
        for observer in _OBSERVERS:
            observer(outcomes)
        sink(idx, outcomes)

    return both
