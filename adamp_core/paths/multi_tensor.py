r"""AdamP/SGDP on many tensors at once: one set of array operations per group of tensors that share a
row length (the multi-tensor path, for GPUs; Heo et al., ICLR 2021, Algorithms 1 and 2 unchanged).

A step of :func:`adamp_core.adamp_step` is a few dozen array operations whatever the tensor's size, so a
model of hundreds of tensors is launch-bound on a GPU. Here the channel views ``(C_i, L_i)`` of ``k``
tensors (same dtypes and device) are concatenated into one ``(R, L)`` array, :math:`R = \sum_i C_i`,
:math:`L = \max_i L_i`, shorter rows padded with zeros, and the unchanged
:func:`adamp_core.adamp.adamp_update` / :func:`adamp_core.sgdp.sgdp_update` runs once on it with a
:class:`SegmentRows` layout:

- per-row statistics (:math:`w_r\cdot g_r`, :math:`\lVert w_r\rVert^2`, ...) never leave their row;
- every reduction over a tensor's rows (the layer view's sums, the max row cosine, the min row scale)
  is a segment reduction: the per-row values are gathered into a ``(k, max C_i)`` array padded with the
  reduction's identity (0, :math:`-\infty`, :math:`+\infty`), reduced along axis 1, and each tensor's
  result is put back on each of its rows, so the decision (channel view, layer view, neither) and
  ``wd_ratio`` are taken per tensor exactly as alone;
- the thresholds :math:`\delta/\sqrt{L_i}` and :math:`\delta/\sqrt{C_i L_i}` and the step counts
  (bias corrections) are per row;
- zero padding changes nothing: a zero weight, grad and state entry adds 0 to every row sum and to no
  row maximum, its update is :math:`0/(0+\epsilon) = 0` (SGDP: 0), and it is dropped from the result.

1-d tensors (never projected) form groups of their own, one row each. :func:`group_indices` groups
tensors whose row lengths round up to the same bucket (at most 1/8 padding: 8 buckets per power of two),
so models with many different small shapes still take few groups. The results are the per-tensor step's
up to the order of the row and layer sums (float64 within 1e-12, float32 within 1e-5, tested);
everything stays sync-free. The concatenation costs a copy of params, grads and state, so a group holds
at most :data:`GROUP_MAX_ELEMENTS` elements (a tensor above it is stepped alone), which bounds the step's
extra memory whatever the model's size.

torch tensors that may be written in place (outside a tracer) take torch's own multi-tensor step instead,
:mod:`adamp_core.paths._multi_tensor_torch` (the same maths in a fixed number of operators per group, any
row lengths together, written in place); every other library keeps the array-API code here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

from .._common import finite_flag, is_python_int, keep_if_finite
from ..adamp import AdamPState, adamp_update
from ..arrays import check_array, device, is_host, namespace_name
from ..rows import RowReduce, channel_shape
from ..sgdp import SGDPState, sgdp_update
from . import MULTI_TENSOR, Options, Outcome, per_tensor

__all__ = [
    "GROUP_MAX_ELEMENTS",
    "HOST_TENSOR_MAX_ELEMENTS",
    "SegmentRows",
    "adamp_update_group",
    "group_indices",
    "row_bucket",
    "sgdp_update_group",
    # the path protocol (adamp_core.paths)
    "claim",
    "offered",
    "plan",
    "regrad",
    "run",
]

GROUP_MAX_ELEMENTS = 1 << 21  # 2M elements (8 MiB in float32) per group: bounds the concatenated copies
# On a CPU only tensors below this size join a group: a larger tensor's step is bandwidth-bound there, and
# the concatenation would only add traffic (measured: ResNet-50 shapes, torch and NumPy, one thread).
HOST_TENSOR_MAX_ELEMENTS = 1 << 16


def row_bucket(length: int) -> int:
    """The padded row length of a group: ``length`` rounded up to a multiple of 1/8 of its power of two
    (below 16, itself), so padding adds less than 1/8."""
    unit = 1 << max(0, length.bit_length() - 4)
    return -(-length // unit) * unit


def group_indices(keys: Sequence[Any], shapes: Sequence[tuple[int, ...]], max_elements: int = GROUP_MAX_ELEMENTS,
                  *, on_host: bool = False, host_max_elements: int = HOST_TENSOR_MAX_ELEMENTS) -> list[list[int]]:
    """Indices of the tensors to step together, in order of first appearance: tensors with equal
    ``keys[i]`` (whatever else must agree: dtypes, device), row lengths in the same :func:`row_bucket`
    and both projected (``ndim > 1``) or both not, up to ``max_elements`` (padded) elements per group.
    Empty tensors and tensors above ``max_elements`` get groups of one; with ``on_host`` (tensors on a
    CPU) so do tensors above ``host_max_elements`` (pass :data:`GROUP_MAX_ELEMENTS` to see a GPU's
    groups on a CPU)."""
    largest = min(max_elements, host_max_elements) if on_host else max_elements
    groups: dict[Any, list[list[int]]] = {}
    filled: dict[int, int] = {}  # id of an open group -> its padded size
    order: list[list[int]] = []
    for i, (key, shape) in enumerate(zip(keys, shapes, strict=True)):
        rows, length = channel_shape(shape)
        bucket = row_bucket(length)
        size = rows * bucket
        if rows * length == 0 or size > largest:
            order.append([i])
            continue
        k = (key, len(shape) > 1, bucket)
        open_ = groups.setdefault(k, [])
        if open_ and filled[id(open_[-1])] + size <= max_elements:
            open_[-1].append(i)
            filled[id(open_[-1])] += size
        else:
            open_.append([i])
            order.append(open_[-1])
            filled[id(open_[-1])] = size
    return order


class SegmentRows(RowReduce):
    """Layout of a group: the rows of ``k`` tensors concatenated, tensor ``i`` owning ``counts[i]``
    consecutive rows of ``lengths[i]`` entries, padded with zeros to ``row_length`` (the longest).
    Each reduction takes per-row arrays ``(R,)`` and returns per-row arrays ``(R,)`` holding the result
    of the row's own tensor (a segment reduction, broadcast back), so
    :func:`adamp_core.projection.project_update` decides each tensor on its own."""

    def __init__(self, xp: Any, counts: Sequence[int], lengths: Sequence[int], dev: Any, project: bool) -> None:
        super().__init__(None)
        self.counts = tuple(int(c) for c in counts)
        self.lengths = tuple(int(n) for n in lengths)
        self.row_length = max(self.lengths)
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
        # sqrt(row length) and sqrt(size) of each tensor, as the lone step computes them
        self._sqrt_lengths = [math.sqrt(n) for n in self.lengths]
        self._sqrt_sizes = [math.sqrt(c * n) for c, n in zip(self.counts, self.lengths, strict=True)]
        self._dev = dev

    def projects(self, ndim: int) -> bool:
        return self.project

    def thresholds(self, xp: Any, w: Any, delta: Any, dtype: Any) -> tuple[Any, Any]:
        if len(set(self.lengths)) == 1:
            thr_c = delta / self._sqrt_lengths[0]
        else:
            thr_c = self._per_row_ratio(xp, delta, self._sqrt_lengths, dtype)
        return thr_c, self._per_row_ratio(xp, delta, self._sqrt_sizes, dtype)

    def _per_row_ratio(self, xp: Any, delta: Any, roots: list[float], dtype: Any) -> Any:
        """``delta / roots[i]`` on every row of tensor ``i``, rounded as the lone step rounds it."""
        if isinstance(delta, numbers.Real):  # Python-float maths, rounded once to the dtype
            per_tensor = xp.asarray([delta / r for r in roots], dtype=dtype, device=self._dev)
        else:
            per_tensor = delta / xp.asarray(roots, dtype=dtype, device=self._dev)
        return self.spread(xp, per_tensor)

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

    def tensor_mean(self, xp: Any, row_sums: Any, w: Any) -> Any:
        """Per row ``(R,)``: the mean over the row's own tensor (its segment's sum over its true size; the
        padding holds no entry)."""
        (total,) = self.sum(xp, row_sums)
        sizes = [float(c * n) for c, n in zip(self.counts, self.lengths, strict=True)]
        return total / self.spread(xp, xp.asarray(sizes, dtype=total.dtype, device=self._dev))

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
    """The group's arrays as one ``(R, L)`` array (a copy), short rows padded with zeros."""
    rows = group.rows
    L, pad = rows.row_length, None
    parts = []
    for a, c, n in zip(arrays, rows.counts, rows.lengths, strict=True):
        a = xp.reshape(a, (c, n))
        if n < L:
            if pad is None:  # one block of zeros, sliced for every short tensor
                pad = xp.zeros((max(rows.counts), L - min(rows.lengths)), dtype=a.dtype, device=device(a))
            a = xp.concat([a, pad[:c, : L - n]], axis=1)
        parts.append(a)
    return xp.concat(parts, axis=0)


def _split(xp: Any, group: _Group, x: Any) -> list[Any]:
    """The ``(R, L)`` result as one array per tensor, padding dropped (views where the backend has them)."""
    rows = group.rows
    return [xp.reshape(x[s: s + c, :n], shape)
            for s, c, n, shape in zip(rows.starts(), rows.counts, rows.lengths, group.shapes, strict=True)]


def _plan(xp: Any, params: Sequence[Any]) -> _Group:
    """The layout of a group: its :class:`SegmentRows` (index arrays on the params' device) and shapes."""
    shapes = [tuple(p.shape) for p in params]
    layouts = [channel_shape(s) for s in shapes]
    projected = {len(s) > 1 for s in shapes}
    if len(projected) != 1 or any(math.prod(s) == 0 for s in shapes):
        raise ValueError(f"Invalid group: shapes {shapes} (expected non-empty tensors, all 1-d or all with "
                         "ndim > 1; see group_indices)")
    rows = SegmentRows(xp, [c for c, _ in layouts], [n for _, n in layouts], device(params[0]), projected.pop())
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


def _alone(xp: Any, update: Any, p: Any, g: Any, s: Any, hp: Any, skip: bool) -> tuple[list[Any], list[Any], Any]:
    """A group of one tensor: the plain step, without the concatenation's copies."""
    new_p, new_s = update(xp, p, g, s, hp)
    if not skip:
        return [new_p], [new_s], None
    ok = finite_flag(xp, g)
    new_p, new_s = keep_if_finite(xp, ok, new_p, new_s, p, s)
    return [new_p], [new_s], xp.reshape(ok, (1,))


def adamp_update_group(
    xp: Any, params: Sequence[Any], grads: Sequence[Any], states: Sequence[AdamPState], hp: Any,
    skip_nonfinite: bool = False, layout: _Group | None = None,
) -> tuple[list[Any], list[AdamPState], Any]:
    """:func:`adamp_core.adamp.adamp_update` of every tensor of one group (see :func:`group_indices`:
    one dtype, state dtypes and device, all 1-d or all with ``ndim > 1``), computed together; no checks
    (callers validated everything). A group of one takes the plain step.

    Returns ``(new_params, new_states, ok)``: ``ok`` is None, or with ``skip_nonfinite`` a ``(k,)`` bool
    array, false for a tensor whose grad has a non-finite entry (that tensor and its state are returned
    as they were; its step count does not advance). ``layout``: the group's :func:`layout`, built once by
    a plan (default: built here)."""
    if len(params) == 1:
        return _alone(xp, adamp_update, params[0], grads[0], states[0], hp, skip_nonfinite)
    group = layout or _plan(xp, params)
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
    skip_nonfinite: bool = False, layout: _Group | None = None,
) -> tuple[list[Any], list[SGDPState], Any]:
    """:func:`adamp_core.sgdp.sgdp_update` of every tensor of one group, computed together; returns
    ``(new_params, new_states, ok)`` as :func:`adamp_update_group` does."""
    if len(params) == 1:
        return _alone(xp, sgdp_update, params[0], grads[0], states[0], hp, skip_nonfinite)
    group = layout or _plan(xp, params)
    w, g = _concat(xp, group, params), _concat(xp, group, grads)
    b = _concat(xp, group, [s.momentum for s in states])
    new_w, new = sgdp_update(xp, w, g, SGDPState(b), hp, group.rows)
    new_b, ok = new.momentum, None
    if skip_nonfinite:
        ok_rows, ok = _finite_rows(xp, group, g)
        keep = xp.reshape(ok_rows, (-1, 1))
        new_w, new_b = xp.where(keep, new_w, w), xp.where(keep, new_b, b)
    return _split(xp, group, new_w), [SGDPState(x) for x in _split(xp, group, new_b)], ok


# -- the path (adamp_core.paths): claim, plan, regrad, run ------------------------------------------------

_UPDATE_GROUP = {"adamp": adamp_update_group, "sgdp": sgdp_update_group}


class Plan(NamedTuple):
    """The groups of a param group's tensors: per group its indices, namespace and layout (None: a group of
    one, stepped alone)."""

    groups: list[tuple[list[int], Any, _Group | None]]


def offered(options: Options) -> bool:
    """Asked for (``foreach=True``), or ``None`` outside a tracer (which fuses per-tensor steps itself)."""
    return options.foreach is True or (options.foreach is None and not options.traced)


def claim(spec: Any, tensors: Sequence[Any], idx: list[int], hp: Any, options: Options) -> list[int]:
    """Every tensor whose rows are all here and that may be stepped with others."""
    return [i for i in idx if tensors[i].rows is None and not tensors[i].alone]


def plan(spec: Any, tensors: Sequence[Any], taken: list[int], hp: Any, options: Options) -> Plan:
    """Groups of one library, dtype, device, state dtypes and row bucket (:func:`group_indices`), each with
    its :class:`SegmentRows` built once. Torch tensors that may be written in place (outside a tracer) take
    torch's own multi-tensor step instead (:mod:`adamp_core.paths._multi_tensor_torch`): groups of one
    dtype, device, state dtypes and kind of step count, any row lengths, in a fixed number of operators."""
    native = [] if options.traced else [i for i in taken if tensors[i].writable and namespace_name(tensors[i].param)
                                        == "torch"]
    groups = _native_groups(spec, tensors, native, options) if native else []
    if native:
        chosen = set(native)
        taken = [i for i in taken if i not in chosen]
    keys, shapes = [], []
    for i in taken:
        t = tensors[i]
        xp = check_array(t.param)
        keys.append((xp, t.param.dtype, device(t.param), tuple(getattr(t.state, f).dtype for f in spec.buffers)))
        shapes.append(tuple(t.param.shape))
    on_host = all(is_host(tensors[i].param) for i in taken)
    for members in group_indices(keys, shapes, on_host=on_host, host_max_elements=options.host_tensor_max_elements):
        chosen = [taken[j] for j in members]
        xp = keys[members[0]][0]
        layout = None if len(chosen) == 1 else _plan(xp, [tensors[i].param for i in chosen])
        groups.append((chosen, xp, layout))
    return Plan(groups)


def _native_groups(spec: Any, tensors: Sequence[Any], idx: list[int], options: Options) -> list[tuple[Any, ...]]:
    """The torch tensors' groups (:func:`adamp_core.paths._multi_tensor_torch.group_tensors`), each with its
    :class:`adamp_core.paths._multi_tensor_torch.TorchGroup` (a tensor alone: None, the per-tensor step)."""
    from . import _multi_tensor_torch as native

    keys, shapes = [], []
    for i in idx:
        t = tensors[i]
        step = getattr(t.state, "step", None) if spec.has_step else None
        count = "int" if is_python_int(step) else (None if step is None else (step.dtype, step.device))
        keys.append((t.param.dtype, t.param.device, tuple(getattr(t.state, f).dtype for f in spec.buffers), count))
        shapes.append(tuple(t.param.shape))
    on_host = all(is_host(tensors[i].param) for i in idx)
    largest = min(native.MAX_ELEMENTS, options.host_tensor_max_elements) if on_host else native.MAX_ELEMENTS
    groups: list[tuple[Any, ...]] = []
    for members in native.group_tensors(keys, shapes, on_host=on_host,
                                        host_max_elements=options.host_tensor_max_elements):
        chosen = [idx[j] for j in members]
        xp = check_array(tensors[chosen[0]].param)
        size = math.prod(shapes[members[0]])
        alone = len(chosen) == 1 and (size == 0 or size > largest)  # empty or too large: the per-tensor step
        layout = None if alone else native.TorchGroup(spec, xp, [tensors[i] for i in chosen],
                                                      len(shapes[members[0]]) > 1)
        groups.append((chosen, xp, layout))
    return groups


def regrad(plan: Plan, grads: Sequence[Any]) -> Plan:
    """Nothing of the plan depends on the grads (they are read by value)."""
    return plan


def run(plan: Plan, spec: Any, tensors: Sequence[Any], grads: Sequence[Any], hp: Any, options: Options,
        sink: Any) -> list[int]:
    """One step of every group: new arrays (``Outcome.param``) for the adapter to write back, or, for torch's
    own step, written in place."""
    update, skip = _UPDATE_GROUP[spec.key], options.skip_nonfinite
    for chosen, xp, layout in plan.groups:
        if layout is None:
            sink(chosen, [per_tensor.step_one(spec, xp, tensors[chosen[0]], grads[chosen[0]], hp, skip)])
            continue
        if getattr(layout, "native", False):
            sink(chosen, layout.run([tensors[i] for i in chosen], [grads[i] for i in chosen], hp, skip))
            continue
        ts = [tensors[i] for i in chosen]
        new_p, new_s, ok = update(xp, [t.param for t in ts], [grads[i] for i in chosen], [t.state for t in ts], hp,
                                  skip, layout)
        sink(chosen, [Outcome(MULTI_TENSOR, new_p[j], new_s[j], None if ok is None else ok[j, ...])
                      for j in range(len(chosen))])
    return []
