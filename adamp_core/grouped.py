r"""AdamP/SGDP on many tensors at once: one set of array operations per group of tensors that share a
row length (the multi-tensor path, for GPUs; Heo et al., ICLR 2021, Algorithms 1 and 2 unchanged).

A step of :func:`adamp_core.adamp_step` is a few dozen array operations whatever the tensor's size, so a
model of hundreds of tensors is launch-bound on a GPU. Here the channel views ``(C_i, L)`` of ``k``
tensors with the same row length ``L`` (same dtypes and device) are concatenated into one ``(R, L)``
array, :math:`R = \sum_i C_i`, and the unchanged :func:`adamp_core.adamp.adamp_update` /
:func:`adamp_core.sgdp.sgdp_update` runs once on it with a :class:`SegmentRows` layout:

- per-row statistics (:math:`w_r\cdot g_r`, :math:`\lVert w_r\rVert^2`, ...) never leave their row;
- every reduction over a tensor's rows (the layer view's sums, the max row cosine, the min row scale)
  is a segment reduction: the per-row values are gathered into a ``(k, max C_i)`` array padded with the
  reduction's identity (0, :math:`-\infty`, :math:`+\infty`), reduced along axis 1, and each tensor's
  result is put back on each of its rows, so the decision (channel view, layer view, neither) and
  ``wd_ratio`` are taken per tensor exactly as alone;
- the thresholds :math:`\delta/\sqrt{L}` and :math:`\delta/\sqrt{C_i L}` and the step counts
  (bias corrections) are per row.

1-d tensors (never projected) of equal length form groups of their own, one row each. The results are
the per-tensor step's up to the order of the layer-view sums (float64 within 1e-12, float32 within
1e-5, tested); everything stays sync-free. The concatenation costs a copy of params, grads and state,
so a group holds at most :data:`GROUP_MAX_ELEMENTS` elements (a tensor above it is stepped alone), which
bounds the step's extra memory whatever the model's size.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

from ._common import is_python_int
from .adamp import AdamPState, adamp_update
from .arrays import device
from .projection import RowReduce
from .sgdp import SGDPState, sgdp_update

__all__ = [
    "GROUP_MAX_ELEMENTS",
    "HOST_TENSOR_MAX_ELEMENTS",
    "SegmentRows",
    "adamp_update_group",
    "group_indices",
    "sgdp_update_group",
]

GROUP_MAX_ELEMENTS = 1 << 21  # 2M elements (8 MiB in float32) per group: bounds the concatenated copies
# On a CPU only tensors below this size join a group: a larger tensor's step is bandwidth-bound there, and
# the concatenation would only add traffic (measured: ResNet-50 shapes, torch and NumPy, one thread).
HOST_TENSOR_MAX_ELEMENTS = 1 << 16


def _layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, row length)`` of a tensor in a group: the channel view, or one row for a 1-d tensor."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def group_indices(keys: Sequence[Any], shapes: Sequence[tuple[int, ...]], max_elements: int = GROUP_MAX_ELEMENTS,
                  max_tensor_elements: int | None = None) -> list[list[int]]:
    """Indices of the tensors to step together, in order of first appearance: tensors with equal
    ``keys[i]`` (whatever else must agree: dtypes, device), equal row length and both projected
    (``ndim > 1``) or both not, up to ``max_elements`` elements per group. Empty tensors and tensors
    above ``max_elements`` (or ``max_tensor_elements``: :data:`HOST_TENSOR_MAX_ELEMENTS` on a CPU) get
    groups of one."""
    largest = max_elements if max_tensor_elements is None else min(max_elements, max_tensor_elements)
    groups: dict[Any, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, (key, shape) in enumerate(zip(keys, shapes, strict=True)):
        size = math.prod(shape)
        if size == 0 or size > largest:
            order.append([i])
            continue
        k = (key, len(shape) > 1, _layout(shape)[1])
        open_ = groups.setdefault(k, [])
        if open_ and sum(math.prod(shapes[j]) for j in open_[-1]) + size <= max_elements:
            open_[-1].append(i)
        else:
            open_.append([i])
            order.append(open_[-1])
    return order


class SegmentRows(RowReduce):
    """Layout of a group: the rows of ``k`` tensors concatenated, tensor ``i`` owning ``counts[i]``
    consecutive rows of length ``row_length``. Each reduction takes per-row arrays ``(R,)`` and returns
    per-row arrays ``(R,)`` holding the result of the row's own tensor (a segment reduction, broadcast
    back), so :func:`adamp_core.projection.project_update` decides each tensor on its own."""

    def __init__(self, xp: Any, counts: Sequence[int], row_length: int, dev: Any, project: bool) -> None:
        super().__init__(None)
        self.counts = tuple(int(c) for c in counts)
        self.row_length = int(row_length)
        self.project = bool(project)
        self.n_rows = sum(self.counts)
        k, width = len(self.counts), max(self.counts)
        self._equal = all(c == width for c in self.counts)  # (k, C) is a reshape: no gather
        if not self._equal:
            # Row r of tensor i sits at [i, r]; the padding points at index R, the appended identity.
            gather = [self.n_rows] * (k * width)
            seg = []
            start = 0
            for i, c in enumerate(self.counts):
                gather[i * width: i * width + c] = range(start, start + c)
                seg += [i] * c
                start += c
            self._gather = xp.asarray(gather, dtype=xp.int32, device=dev)
            self._seg = xp.asarray(seg, dtype=xp.int32, device=dev)
        self._width = width
        self._sizes = [math.sqrt(c * self.row_length) for c in self.counts]  # sqrt(size_i) as the lone step
        self._dev = dev

    def projects(self, ndim: int) -> bool:
        return self.project

    def thresholds(self, xp: Any, w: Any, delta: Any, dtype: Any) -> tuple[Any, Any]:
        thr_c = delta / math.sqrt(self.row_length)
        if isinstance(delta, numbers.Real):  # the lone step's Python-float thresholds, rounded once
            per_tensor = xp.asarray([delta / s for s in self._sizes], dtype=dtype, device=self._dev)
        else:
            per_tensor = delta / xp.asarray(self._sizes, dtype=dtype, device=self._dev)
        return thr_c, self.spread(xp, per_tensor)

    def spread(self, xp: Any, per_tensor: Any) -> Any:
        """``(k,)`` values, one per tensor, put on each of the tensor's rows: ``(R,)``."""
        if self._equal:
            k = len(self.counts)
            return xp.reshape(xp.broadcast_to(xp.reshape(per_tensor, (k, 1)), (k, self._width)), (self.n_rows,))
        return xp.take(per_tensor, self._seg, axis=0)

    def per_tensor(self, xp: Any, x: Any, identity: float) -> Any:
        """``(n, R)`` per-row values as ``(n, k, max C_i)``, the padding set to ``identity``."""
        n, k = x.shape[0], len(self.counts)
        if self._equal:
            return xp.reshape(x, (n, k, self._width))
        pad = xp.full((n, 1), identity, dtype=x.dtype, device=self._dev)
        return xp.reshape(xp.take(xp.concat([x, pad], axis=1), self._gather, axis=1), (n, k, self._width))

    def _reduce(self, xp: Any, op: Any, identity: float, xs: tuple[Any, ...]) -> tuple[Any, ...]:
        per = op(self.per_tensor(xp, xp.stack(xs), identity), axis=2)  # (n, k): one launch for n reductions
        if self._equal:
            k = len(self.counts)
            back = xp.reshape(xp.broadcast_to(xp.reshape(per, (len(xs), k, 1)), (len(xs), k, self._width)),
                              (len(xs), self.n_rows))
        else:
            back = xp.take(per, self._seg, axis=1)
        return tuple(back[j, ...] for j in range(len(xs)))

    def sum(self, xp: Any, *xs: Any) -> tuple[Any, ...]:
        return self._reduce(xp, xp.sum, 0.0, xs)

    def max(self, xp: Any, *xs: Any) -> tuple[Any, ...]:
        return self._reduce(xp, xp.max, -math.inf, xs)

    def min(self, xp: Any, *xs: Any) -> tuple[Any, ...]:
        return self._reduce(xp, xp.min, math.inf, xs)

    def starts(self) -> list[int]:
        """The first row of each tensor."""
        out, start = [], 0
        for c in self.counts:
            out.append(start)
            start += c
        return out


class _Group(NamedTuple):
    rows: SegmentRows
    shapes: list[tuple[int, ...]]


def _concat(xp: Any, group: _Group, arrays: Sequence[Any]) -> Any:
    """The group's arrays as one ``(R, L)`` array (a copy)."""
    L = group.rows.row_length
    return xp.concat([xp.reshape(a, (c, L)) for a, c in zip(arrays, group.rows.counts, strict=True)], axis=0)


def _split(xp: Any, group: _Group, x: Any) -> list[Any]:
    """The ``(R, L)`` result as one array per tensor (views where the backend has them)."""
    return [xp.reshape(x[s: s + c, ...], shape)
            for s, c, shape in zip(group.rows.starts(), group.rows.counts, group.shapes, strict=True)]


def _plan(xp: Any, params: Sequence[Any]) -> _Group:
    shapes = [tuple(p.shape) for p in params]
    layouts = [_layout(s) for s in shapes]
    lengths = {L for _, L in layouts}
    projected = {len(s) > 1 for s in shapes}
    if len(lengths) != 1 or len(projected) != 1 or any(math.prod(s) == 0 for s in shapes):
        raise ValueError(f"Invalid group: shapes {shapes} (expected non-empty tensors of one row length, "
                         "all 1-d or all with ndim > 1; see group_indices)")
    rows = SegmentRows(xp, [c for c, _ in layouts], lengths.pop(), device(params[0]), projected.pop())
    return _Group(rows, shapes)


def _steps(xp: Any, group: _Group, steps: Sequence[Any], dev: Any) -> tuple[Any, Any]:
    """The step counts as ``(k,)`` and as a per-row ``(R, 1)`` array (what the bias corrections take)."""
    if all(is_python_int(t) for t in steps):
        t = xp.asarray(list(steps), device=dev)  # the default integer dtype (int32 in JAX without x64)
    else:
        t = xp.stack([xp.asarray(s, device=dev) for s in steps])
    return t, xp.reshape(group.rows.spread(xp, t), (group.rows.n_rows, 1))


def _finite_rows(xp: Any, group: _Group, g: Any) -> tuple[Any, Any]:
    """Per-row ``(R,)`` and per-tensor ``(k,)`` flags: every entry of the tensor's grad is finite."""
    flags = xp.astype(xp.all(xp.isfinite(g), axis=1), xp.float32)
    per = xp.min(group.rows.per_tensor(xp, xp.reshape(flags, (1, -1)), math.inf), axis=2)[0, ...] > 0
    return group.rows.spread(xp, per), per


def _new_steps(xp: Any, steps: Sequence[Any], t: Any, ok: Any) -> list[Any]:
    if all(is_python_int(s) for s in steps):  # host counts stay host counts (one sync with a skip flag)
        return [s + (1 if ok is None else int(bool(ok[i, ...]))) for i, s in enumerate(steps)]
    new = t + 1 if ok is None else xp.where(ok, t + 1, t)
    return [xp.astype(new[i, ...], s.dtype, copy=False) for i, s in enumerate(steps)]


def adamp_update_group(
    xp: Any, params: Sequence[Any], grads: Sequence[Any], states: Sequence[AdamPState], hp: Any,
    skip_nonfinite: bool = False,
) -> tuple[list[Any], list[AdamPState], Any]:
    """:func:`adamp_core.adamp.adamp_update` of every tensor of one group (see :func:`group_indices`:
    equal row length, dtypes and device), computed together; no checks (callers validated everything).

    Returns ``(new_params, new_states, ok)``: ``ok`` is None, or with ``skip_nonfinite`` a ``(k,)`` bool
    array, false for a tensor whose grad has a non-finite entry (that tensor and its state are returned
    as they were; its step count does not advance)."""
    group = _plan(xp, params)
    dev = device(params[0])
    w, g = _concat(xp, group, params), _concat(xp, group, grads)
    m = _concat(xp, group, [s.exp_avg for s in states])
    v = _concat(xp, group, [s.exp_avg_sq for s in states])
    t, t_rows = _steps(xp, group, [s.step for s in states], dev)
    new_w, new = adamp_update(xp, w, g, AdamPState(t_rows, m, v), hp, group.rows)
    new_m, new_v, ok = new.exp_avg, new.exp_avg_sq, None
    if skip_nonfinite:
        ok_rows, ok = _finite_rows(xp, group, g)
        keep = xp.reshape(ok_rows, (-1, 1))
        new_w, new_m, new_v = xp.where(keep, new_w, w), xp.where(keep, new_m, m), xp.where(keep, new_v, v)
    steps = _new_steps(xp, [s.step for s in states], t, ok)
    new_states = [AdamPState(*f) for f in zip(steps, _split(xp, group, new_m), _split(xp, group, new_v), strict=True)]
    return _split(xp, group, new_w), new_states, ok


def sgdp_update_group(
    xp: Any, params: Sequence[Any], grads: Sequence[Any], states: Sequence[SGDPState], hp: Any,
    skip_nonfinite: bool = False,
) -> tuple[list[Any], list[SGDPState], Any]:
    """:func:`adamp_core.sgdp.sgdp_update` of every tensor of one group, computed together; returns
    ``(new_params, new_states, ok)`` as :func:`adamp_update_group` does."""
    group = _plan(xp, params)
    w, g = _concat(xp, group, params), _concat(xp, group, grads)
    b = _concat(xp, group, [s.momentum for s in states])
    new_w, new = sgdp_update(xp, w, g, SGDPState(b), hp, group.rows)
    new_b, ok = new.momentum, None
    if skip_nonfinite:
        ok_rows, ok = _finite_rows(xp, group, g)
        keep = xp.reshape(ok_rows, (-1, 1))
        new_w, new_b = xp.where(keep, new_w, w), xp.where(keep, new_b, b)
    return _split(xp, group, new_w), [SGDPState(x) for x in _split(xp, group, new_b)], ok
