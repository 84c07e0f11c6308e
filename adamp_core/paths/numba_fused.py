r"""Fused in-place CPU kernels (numba) for AdamP and SGDP: the fast path of the stateful adapters.

The pure steps (:func:`adamp_core.adamp_step`, :func:`adamp_core.sgdp_step`) stay the reference; these
kernels compute the same update, are tested against them step by step, and are used only where they
apply (:func:`supports`): writeable, C-contiguous float32/float64 NumPy arrays (torch CPU tensors
through their zero-copy ``.numpy()`` view), state in the param's dtype.

Each tensor takes two passes over memory instead of the ~15 of the array-API step:

1. **statistics** (reads ``w, g`` and the state): per row :math:`r` of the channel view, in float64,
   :math:`w_r\cdot g_r,\ |w_r|^2,\ |g_r|^2` and :math:`w_r\cdot p_r`, where :math:`p` is the
   unprojected update recomputed on the fly (Alg. 2 lines 2-4: :math:`m/(\sqrt{v}/\sqrt{1-\beta_2^t}+\epsilon)`;
   Alg. 1 line 2: the momentum buffer, or :math:`g+\mu b` with nesterov).
2. **decision** (per tensor, from the row statistics only): channel view if
   :math:`\max_r|\cos(g_r,w_r)| < \delta/\sqrt{\dim r}`, else the layer view if
   :math:`|\cos(g,w)| < \delta/\sqrt{\dim w}`, else none; the per-row coefficient of the projection
   :math:`\Pi(p) = p - w\,(w\cdot p)/(|w|+\epsilon)^2` (adamp 0.3.0's ``p_n = w/(|w|+eps)``).
3. **update** (reads ``w, g`` and the state, writes them): the state update again, the projection with
   the row coefficient, decoupled weight decay and the step, in one expression per element.

That is 4 reads + 7 reads/writes for AdamP, about 1.6x the memory traffic of a fused AdamW step.
Float64 accumulation makes the sums of squares of float32 data accurate and free of overflow and
underflow. For float64 data whose row sums of squares leave :math:`[2^{-968}, 2^{968}]` (or are 0 or NaN) a
kernel writes nothing and reports it, and the caller runs the pure step, whose power-of-two row scaling is
exact there.

Non-finite gradients propagate as in the pure step (NaN statistics never project). With
``skip_nonfinite`` a kernel that saw a NaN/inf gradient entry writes nothing and reports it.

numba is optional (the ``fast`` extra): :data:`AVAILABLE` says whether it is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from .._common import host_bias_correction
from ..rows import channel_shape
from ._numba_status import FALLBACK, OK, SKIPPED

__all__ = [
    "AVAILABLE",
    "BATCH_MAX_SIZE",
    "FALLBACK",
    "OK",
    "SKIPPED",
    "adamp_batch",
    "adamp_inplace",
    "host_addresses",
    "host_views",
    "run_batch",
    "run_inplace",
    "sgdp_batch",
    "sgdp_inplace",
    "supports",
]

AVAILABLE = importlib.util.find_spec("numba") is not None

_PARALLEL_MIN = 1 << 16  # elements: below this, thread start-up costs more than it saves
# Tensors below this size are best updated together by adamp_batch/sgdp_batch (threads share out the
# tensors); above it, one parallel kernel per tensor (threads share out the rows).
BATCH_MAX_SIZE = _PARALLEL_MIN


def supports(param: Any, *others: Any) -> bool:
    """Whether the fused kernels can update ``param`` (and its grad and state arrays ``others``) in place:
    NumPy arrays, float32 or float64, all the same dtype and shape, C-contiguous, ``param`` and the
    state writeable."""
    if not AVAILABLE or type(param) is not np.ndarray or param.dtype not in (np.float32, np.float64):
        return False
    for x in (param, *others):
        if type(x) is not np.ndarray or x.dtype != param.dtype or x.shape != param.shape:
            return False
        if not x.flags.c_contiguous:
            return False
    return param.flags.writeable and all(x.flags.writeable for x in others[1:])


def _rows(x: np.ndarray) -> np.ndarray:
    """The channel view ``(shape[0], -1)`` for ``ndim >= 2``; one row otherwise (never projected)."""
    return x.reshape(channel_shape(x.shape))


def _compiled() -> Any:
    """The kernels (:mod:`adamp_core.paths._numba_kernels`), imported on first use: numba loads (and compiles,
    or reads its cache) only when a step runs on this path."""
    from . import _numba_kernels

    return _numba_kernels


@contextlib.contextmanager
def _keeping_torch_threads() -> Iterator[None]:
    """numba's OpenMP layer shares libgomp with torch: starting numba's pool and each parallel
    launch reset the calling thread's OpenMP thread count, which is what ``torch.get_num_threads()``
    reports. Put it back, so that a user's ``torch.set_num_threads`` survives our kernels."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if before is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def set_threads(n: int) -> None:
    """Threads for the parallel kernels (numba's pool), capped at numba's maximum; the torch adapter
    passes ``torch.get_num_threads()`` so that one setting governs both libraries."""
    import numba

    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    with _keeping_torch_threads():  # reading numba's count starts its pool, too
        if n != numba.get_num_threads():
            numba.set_num_threads(n)


def _launch(name: str, size: int, *args: Any) -> tuple[int, bool]:
    """Run the serial kernel below ``_PARALLEL_MIN`` elements, the parallel one above."""
    serial, parallel = _compiled().KERNELS[name]
    if size < _PARALLEL_MIN:
        return serial(*args)
    with _keeping_torch_threads():
        return parallel(*args)


def _adamp_host(hp: Any, t: int) -> tuple[list[float], float, float]:
    """AdamP's kernel scalars at the new step count ``t``, Python floats: ``(b1, b2, 1 - b1, 1 - b2,
    1/sqrt(1 - b2^t), eps)``, the step size ``lr / (1 - b1^t)`` and the decay ``lr * weight_decay``."""
    b1, b2 = (float(b) for b in hp.betas)
    lr, sbc2 = float(hp.lr), math.sqrt(host_bias_correction(b2, t))
    sc = [b1, b2, 1.0 - b1, 1.0 - b2, 1.0 / sbc2, float(hp.eps)]
    return sc, lr / host_bias_correction(b1, t), lr * float(hp.weight_decay)


def _sgdp_host(hp: Any) -> tuple[list[float], float, float]:
    """SGDP's kernel scalars, Python floats: ``(momentum, 1 - dampening)``, the step size ``lr`` and the
    decay ``lr * weight_decay / (1 - momentum)`` (official sgdp.py: decay scaled by 1/(1 - momentum))."""
    lr, mu, wd = float(hp.lr), float(hp.momentum), float(hp.weight_decay)
    return [mu, 1.0 - float(hp.dampening)], lr, lr * wd / (1.0 - mu) if wd != 0.0 else 0.0


def _options(hp: Any, scale: float, dtype: Any, skip_nonfinite: bool) -> tuple[Any, ...]:
    """The kernels' last arguments: nesterov, keep the unprojected state (nesterov, or SGDP's
    ``project_buffer=False``), caution, delta, eps (rounded to ``dtype``), the decoupled decay factors
    ``[not projected, projected]`` (``scale``, and ``scale`` times ``wd_ratio``), skip, check the range."""
    dtype = np.dtype(dtype)
    decay = np.array([1.0 - scale, 1.0 - scale * float(hp.wd_ratio)], dtype=dtype)
    eps = float(dtype.type(hp.eps))
    keep = bool(hp.nesterov) or not getattr(hp, "project_buffer", True)
    return (bool(hp.nesterov), keep, bool(hp.caution), float(hp.delta), eps, decay, bool(skip_nonfinite),
            dtype == np.float64)


def _inplace(name: str, param: np.ndarray, grad: np.ndarray, s1: np.ndarray, s2: np.ndarray,
             host: tuple[list[float], float, float], hp: Any, skip_nonfinite: bool) -> tuple[int, bool]:
    """One tensor by the kernel ``name`` (serial or parallel by its size); ``host``: ``_adamp_host`` or
    ``_sgdp_host``, rounded here to the param's dtype."""
    (sc, step, scale), r1 = host, _rows(s1)
    return _launch(name, param.size, _rows(param), _rows(grad), r1, r1 if s2 is s1 else _rows(s2),
                   np.array(sc, param.dtype), param.dtype.type(step), param.ndim > 1,
                   *_options(hp, scale, param.dtype, skip_nonfinite))


def adamp_inplace(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, step: int,
                  hp: Any, skip_nonfinite: bool = False) -> tuple[int, bool]:
    """One AdamP step written into ``param``, ``exp_avg``, ``exp_avg_sq`` (``step``: the new count ``t``,
    from 1; ``hp``: checked :class:`adamp_core.hyperparams.AdamPHyperparams` of Python floats).

    Returns ``(status, projected)``: :data:`OK`; :data:`SKIPPED` (``skip_nonfinite`` and a non-finite
    grad entry) or :data:`FALLBACK` (float64 row sums of squares out of range, see above): nothing written.
    """
    return _inplace("adamp", param, grad, exp_avg, exp_avg_sq, _adamp_host(hp, step), hp, skip_nonfinite)


def sgdp_inplace(param: np.ndarray, grad: np.ndarray, momentum: np.ndarray, hp: Any,
                 skip_nonfinite: bool = False) -> tuple[int, bool]:
    """One SGDP step written into ``param`` and its ``momentum`` buffer; returns ``(status, projected)``
    as :func:`adamp_inplace`."""
    return _inplace("sgdp", param, grad, momentum, momentum, _sgdp_host(hp), hp, skip_nonfinite)


class Dims(NamedTuple):
    """The batch kernel's view of a list of shapes: ``(rows, row length)`` of each, and whether each is
    projected (ndim > 1). A plan builds it once."""

    dims: np.ndarray
    project: np.ndarray


def _dims(shapes: Any) -> Dims:
    dims = np.array([channel_shape(tuple(s)) for s in shapes], dtype=np.int64).reshape(-1, 2)
    return Dims(dims, np.array([len(s) > 1 for s in shapes], dtype=np.bool_))


def _run_batch(name: str, addresses: np.ndarray, shapes: Any, dtype: Any, sc: np.ndarray, steps: np.ndarray,
               scale: float, hp: Any, skip_nonfinite: bool) -> Any:
    """Many tensors by the batch kernel ``name``: ``sc`` (rows) and ``steps`` per tensor, in ``dtype``;
    ``shapes``: their shapes, or their :class:`Dims` (a plan's, built once)."""
    dims, project = shapes if isinstance(shapes, Dims) else _dims(shapes)
    out = np.empty(len(dims), dtype=np.int8)
    with _keeping_torch_threads():
        _compiled().BATCH[name](np.empty(0, dtype=dtype), np.ascontiguousarray(addresses, dtype=np.int64), dims,
                                project, sc,
                     steps, out, *_options(hp, scale, dtype, skip_nonfinite))
    return out


def adamp_batch(addresses: np.ndarray, shapes: Any, dtype: Any, steps: Any, hp: Any,
                skip_nonfinite: bool = False) -> Any:
    """:func:`adamp_inplace` for many tensors in one kernel call (the tensors are shared out among
    numba's threads, each tensor by the serial kernel): no per-tensor Python or dispatch cost, which
    dominates for small tensors.

    ``addresses``: int64 array ``(n, 4)``, the data addresses of ``param``, ``grad``, ``exp_avg`` and
    ``exp_avg_sq`` of each tensor, all C-contiguous arrays of ``shapes[i]`` and ``dtype`` (float32 or
    float64) that the caller has checked (as :func:`supports` does) and keeps alive; ``steps``: the new
    step count ``t`` of each. Returns the int8 status of each tensor (:data:`OK`, :data:`SKIPPED`,
    :data:`FALLBACK`; as :func:`adamp_inplace`, nothing is written for the last two). The step counts
    are the caller's to advance.
    """
    # The scalars once per distinct step count, with the same Python maths as adamp_inplace.
    steps = np.asarray(steps, dtype=np.int64)
    if steps.size and steps.min() == steps.max():  # the usual case: one count for the whole group
        sc1, size1, _ = _adamp_host(hp, int(steps[0]))
        sc = np.tile(np.array(sc1, dtype=dtype), (steps.size, 1))
        step_size = np.full(steps.size, size1, dtype=dtype)
    else:
        uniq, inverse = np.unique(steps, return_inverse=True)
        host = [_adamp_host(hp, int(t)) for t in uniq]
        sc = np.array([h[0] for h in host], dtype=dtype).reshape(-1, 6)[inverse]
        step_size = np.array([h[1] for h in host], dtype=dtype)[inverse]
    scale = float(hp.lr) * float(hp.weight_decay)  # as _adamp_host
    return _run_batch("adamp", addresses, shapes, dtype, sc, step_size, scale, hp, skip_nonfinite)


def sgdp_batch(addresses: np.ndarray, shapes: Any, dtype: Any, hp: Any, skip_nonfinite: bool = False) -> Any:
    """:func:`sgdp_inplace` for many tensors in one kernel call, as :func:`adamp_batch`; ``addresses``:
    ``(n, 3)``, of ``param``, ``grad`` and ``momentum``."""
    sc, lr, scale = _sgdp_host(hp)
    n = len(addresses)
    sc_rows = np.tile(np.array(sc, dtype=dtype), (n, 1))
    return _run_batch("sgdp", addresses, shapes, dtype, sc_rows, np.full(n, lr, dtype=dtype), scale, hp, skip_nonfinite)


# -- what the dispatcher (adamp_core.dispatch) calls: which arrays the kernels take, and how --------------


def _torch_plain(x: Any) -> bool:
    """A plain CPU torch tensor (a Parameter included; no DTensor or other subclass) whose memory the
    kernels may use as it is: no conjugate or negative bit."""
    torch = sys.modules.get("torch")
    return (torch is not None and type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "cpu"
            and not x.is_conj() and not x.is_neg())


def host_addresses(arrays: list[Any]) -> list[int] | None:
    """The data addresses of ``arrays`` (param, grad, state buffers) when the kernels can step them in
    place: NumPy arrays or plain CPU torch tensors, one float32/float64 dtype and one shape, C-contiguous,
    param and state writeable; else None. Metadata only (a torch tensor's address, without a NumPy view)."""
    first = arrays[0]
    if type(first) is np.ndarray:
        return [x.ctypes.data for x in arrays] if supports(*arrays) else None
    if not _torch_plain(first):
        return None
    torch = sys.modules["torch"]
    if first.dtype not in (torch.float32, torch.float64):
        return None
    for x in arrays:
        if type(x) is not torch.Tensor and x is not first:  # grads and state: plain tensors
            return None
        if x.dtype != first.dtype or x.shape != first.shape or not x.is_contiguous() or x.device.type != "cpu":
            return None
        if x.is_conj() or x.is_neg():
            return None
    return [x.data_ptr() for x in arrays]


def host_views(arrays: list[Any]) -> list[np.ndarray]:
    """Zero-copy NumPy views of arrays that :func:`host_addresses` accepted."""
    return [x if type(x) is np.ndarray else x.detach().numpy() for x in arrays]


def run_inplace(kernel: str, views: list[np.ndarray], step: int | None, hp: Any, skip_nonfinite: bool) -> int:
    """One tensor by :func:`adamp_inplace` (``kernel`` "adamp", ``step`` the new count) or
    :func:`sgdp_inplace` ("sgdp"); returns its status."""
    if kernel == "adamp":
        return adamp_inplace(*views, step, hp, skip_nonfinite)[0]
    return sgdp_inplace(*views, hp, skip_nonfinite)[0]


def _numpy_dtype(x: Any) -> Any:
    """The NumPy dtype (float32 or float64) of an array :func:`host_addresses` accepted: a NumPy array's
    own, a torch tensor's by its element size."""
    if type(x) is np.ndarray:
        return x.dtype.type
    return np.float32 if x.element_size() == 4 else np.float64


def run_batch(kernel: str, addresses: list[list[int]], params: list[Any], steps: list[int] | None, hp: Any,
              skip_nonfinite: bool) -> Any:
    """Many tensors of one dtype by :func:`adamp_batch` / :func:`sgdp_batch` (``addresses`` from
    :func:`host_addresses`, ``params`` for their shapes); returns the status of each."""
    table = np.array(addresses, dtype=np.int64)
    shapes = [tuple(p.shape) for p in params]
    dtype = _numpy_dtype(params[0])
    if kernel == "adamp":
        return adamp_batch(table, shapes, dtype, steps, hp, skip_nonfinite)
    return sgdp_batch(table, shapes, dtype, hp, skip_nonfinite)


# -- the path (adamp_core.paths): claim, plan, regrad, run ------------------------------------------------

def offered(options: Any) -> bool:
    """numba installed, ``fused`` not False; inside a tracer only once :func:`prepare_traced` registered the
    kernels as a torch operator (a compiled torch step on a CPU, ``fused=True``; see :data:`TRACED_DEFAULT`)."""
    if not AVAILABLE or options.fused is False:
        return False
    if options.traced:
        return _TORCH_OP[0] is not None and (options.fused is True or TRACED_DEFAULT)
    return True


# Whether a compiled torch step on a CPU calls the kernels (as torch.ops.adamp_xp.numba_step) with the default
# fused=None, rather than letting inductor generate the array-API step: chosen by measurement
# (adamp_xp.bench.compiled: ResNet-50 shapes, float32, CPU). fused=True always calls them.
TRACED_DEFAULT = True

_TORCH_OP: list[Any] = [None]  # torch.ops.adamp_xp.numba_step once registered (prepare_traced)


def prepare_traced(spec: Any, fused: Any) -> None:
    """Before a torch step is traced (torch.compile): register the kernels as a torch operator
    (:mod:`adamp_core.paths._torch_ops`), so that the traced step calls it. Nothing where ``fused`` is False
    or numba is not installed; numba itself loads on the operator's first real call."""
    if AVAILABLE and fused is not False and _TORCH_OP[0] is None:
        from . import _torch_ops

        _torch_ops.bind("numba", sys.modules[__name__])
        _TORCH_OP[0] = _torch_ops


def _count_view(step: Any) -> Any:
    """A step count as the kernels' host side reads and advances it: a Python int as it is (read by value,
    returned advanced), a 0-d integer array as a writeable NumPy view of it (a NumPy array, or a plain 0-d
    int64 CPU torch tensor's zero-copy view), None where neither (the array-API paths take that tensor)."""
    from .._common import is_python_int

    if is_python_int(step):
        return step if step >= 0 else None
    if type(step) is np.ndarray:
        return step if step.ndim == 0 and step.dtype.kind in "iu" and step.flags.writeable else None
    torch = sys.modules.get("torch")
    if torch is not None and type(step) is torch.Tensor and step.dtype is torch.int64 and step.dim() == 0 \
            and step.device.type == "cpu" and not step.is_neg():
        return step.numpy()
    return None


def _buffers(spec: Any, state: Any) -> list[Any]:
    return [getattr(state, f) for f in spec.buffers]


def _traced_fits(spec: Any, t: Any, hp: Any) -> bool:
    """Inside a torch trace (metadata of fake tensors only): plain CPU tensors of one float32/float64 dtype and
    shape, contiguous, an int64 0-d CPU count; every hyperparameter a Python number but ``lr`` (a CPU tensor
    lr is read by the operator: a host value)."""
    torch = sys.modules.get("torch")
    if torch is None or not t.writable or t.alone or t.rows is not None:
        return False
    first = t.param
    if type(first) not in (torch.Tensor, torch.nn.Parameter) or first.dtype not in (torch.float32, torch.float64):
        return False
    for x in (first, t.grad, *_buffers(spec, t.state)):
        if (x is not first and type(x) is not torch.Tensor) or x.dtype != first.dtype or x.shape != first.shape \
                or x.device.type != "cpu" or not x.is_contiguous():
            return False
    if spec.has_step:
        s = t.state.step
        if type(s) is not torch.Tensor or s.dtype != torch.int64 or s.dim() != 0 or s.device.type != "cpu":
            return False
    return all(not hasattr(v, "shape") for v in hp[1:]) and (not hasattr(hp.lr, "shape") or hp.lr.device.type == "cpu")


def claim(spec: Any, tensors: Any, idx: list[int], hp: Any, options: Any) -> list[int]:
    """Tensors whose param, grad and state are writeable C-contiguous float32/float64 host buffers of one
    dtype (:func:`host_addresses`), rows all here, and a step count the kernels can read and advance."""
    if options.traced:
        return [i for i in idx if _traced_fits(spec, tensors[i], hp)]
    taken = []
    for i in idx:
        t = tensors[i]
        if not t.writable or t.alone or t.rows is not None:
            continue
        if spec.has_step and _count_view(t.state.step) is None:
            continue
        if host_addresses([t.param, t.grad, *_buffers(spec, t.state)]) is not None:
            taken.append(i)
    return taken


class _Batch(NamedTuple):
    """Small tensors of one dtype, stepped by one batch call."""

    idx: list[int]
    params: list[Any]  # what a new grad is checked against (regrad)
    table: np.ndarray  # (n, 2 + buffers) int64 addresses: param, grad, state arrays
    dims: Dims
    dtype: Any
    counts: np.ndarray | None  # int64 addresses of int64 step counts, read and advanced by compiled helpers
    views: list[Any] | None  # else (other counts) per tensor: a NumPy view of its count, or its Python int


class _Big(NamedTuple):
    """One large tensor, stepped by the row-parallel kernel on NumPy views of its arrays."""

    i: int
    param: Any
    views: list[np.ndarray]  # param, grad, state arrays
    count: np.ndarray | None  # a NumPy view of its step count (an array); None: a Python int, or none


class Plan(NamedTuple):
    batches: list[_Batch]
    bigs: list[_Big]
    torch_threads: bool  # the tensors are torch's: torch.set_num_threads governs the kernels' threads


class TracedPlan(NamedTuple):
    """Inside a torch trace: the tensors of each dtype, stepped by one call of the torch operator."""

    groups: list[list[int]]


def plan(spec: Any, tensors: Any, taken: list[int], hp: Any, options: Any) -> Plan | TracedPlan:
    """Address tables, kernel dims and step-count addresses of the batches (one per dtype), NumPy views of
    the large tensors; built once. Inside a torch trace, only the tensors of each dtype."""
    if options.traced:
        by_dtype: dict[Any, list[int]] = {}
        for i in taken:
            by_dtype.setdefault(tensors[i].param.dtype, []).append(i)
        return TracedPlan(list(by_dtype.values()))
    small: dict[Any, list[int]] = {}
    bigs = []
    for i in taken:
        t = tensors[i]
        if math.prod(t.param.shape) < BATCH_MAX_SIZE:
            small.setdefault(t.param.dtype, []).append(i)
            continue
        count = _count_view(t.state.step) if spec.has_step else None
        count = count if type(count) is np.ndarray else None
        bigs.append(_Big(i, t.param, host_views([t.param, t.grad, *_buffers(spec, t.state)]), count))
    batches = []
    for idx in small.values():
        ts = [tensors[i] for i in idx]
        table = np.array([host_addresses([t.param, t.grad, *_buffers(spec, t.state)]) for t in ts], dtype=np.int64)
        counts = views = None
        if spec.has_step:
            views = [_count_view(t.state.step) for t in ts]
            if all(type(v) is np.ndarray and v.dtype == np.int64 for v in views):
                counts, views = np.array([v.ctypes.data for v in views], dtype=np.int64), None
        batches.append(_Batch(idx, [t.param for t in ts], table, _dims([t.param.shape for t in ts]),
                              _numpy_dtype(ts[0].param), counts, views))
    torch_threads = any(type(tensors[i].param) is not np.ndarray for i in taken)
    return Plan(batches, bigs, torch_threads)


def _grad_fits(param: Any, grad: Any) -> bool:
    """Whether a new grad array can stand in for the old one in a plan: what :func:`host_addresses`
    requires of it, against its param."""
    if type(param) is np.ndarray:
        return type(grad) is np.ndarray and grad.dtype == param.dtype and grad.shape == param.shape \
            and grad.flags.c_contiguous
    torch = sys.modules["torch"]
    return (type(grad) is torch.Tensor and grad.dtype is param.dtype and grad.shape == param.shape
            and grad.device.type == "cpu" and grad.is_contiguous() and not grad.is_conj() and not grad.is_neg())


def _address(x: Any) -> int:
    return x.ctypes.data if type(x) is np.ndarray else x.data_ptr()


def regrad(plan: Plan, grads: Any) -> Plan | None:
    """The plan with the addresses of new grad arrays (``grads``, index-aligned with the group's tensors);
    None where one does not fit."""
    batches = []
    for b in plan.batches:
        new = [grads[i] for i in b.idx]
        if not all(map(_grad_fits, b.params, new)):
            return None
        addresses = list(map(_address, new))
        table = b.table
        if not np.array_equal(table[:, 1], addresses):  # the allocator often hands the same memory back
            table = table.copy()
            table[:, 1] = addresses
        batches.append(b._replace(table=table))
    bigs = []
    for big in plan.bigs:
        grad = grads[big.i]
        if not _grad_fits(big.param, grad):
            return None
        bigs.append(big._replace(views=[big.views[0], host_views([grad])[0], *big.views[2:]]))
    return plan._replace(batches=batches, bigs=bigs)


_THREADS: list[int] = [0]  # the count last given to numba by run()


def run(plan: Plan, spec: Any, tensors: Any, grads: Any, hp: Any, options: Any, sink: Any) -> list[int]:
    """One step: one batch call per dtype, one row-parallel call per large tensor, written in place; array
    step counts read and advanced in place by compiled helpers (no per-tensor Python for them). Returns
    the tensors handed back (:data:`FALLBACK`: float64 sums out of the kernels' range)."""
    from . import NUMBA, Outcome, written

    if type(plan) is TracedPlan:
        return _run_traced(plan, spec, tensors, grads, hp, options, sink)
    if plan.torch_threads:  # torch.set_num_threads governs the kernels too
        n = sys.modules["torch"].get_num_threads()
        if n != _THREADS[0]:
            set_threads(n)
            _THREADS[0] = n
    skip, adamp, rest = options.skip_nonfinite, spec.key == "adamp", []
    done = written(NUMBA)
    for b in plan.batches:
        ints = None
        if adamp:
            if b.counts is not None:
                steps = _compiled().read_counts(b.counts)
            else:  # Python ints (adamp_array's host counts) read from the states, or other integer arrays
                ints = [tensors[i].state.step if type(v) is not np.ndarray else None
                        for i, v in zip(b.idx, b.views, strict=True)]
                steps = np.array([int(v) if n is None else n for n, v in zip(ints, b.views, strict=True)],
                                 dtype=np.int64) + 1
            status = adamp_batch(b.table, b.dims, b.dtype, steps, hp, skip)
        else:
            status = sgdp_batch(b.table, b.dims, b.dtype, hp, skip)
        if b.counts is not None:
            _compiled().advance_counts(b.counts, status)
        elif ints is not None:
            for v, s_ in zip(b.views, status.tolist(), strict=True):
                if s_ == OK and type(v) is np.ndarray:
                    v[()] += 1
            if all(n is None for n in ints):
                ints = None
        if ints is None and not status.any():
            sink(b.idx, [done] * len(b.idx))
            continue
        idx, outcomes = [], []
        for j, s in enumerate(status.tolist()):
            i = b.idx[j]
            if s == FALLBACK:
                rest.append(i)
                continue
            idx.append(i)
            if s == SKIPPED:
                outcomes.append(Outcome(NUMBA, ok=False))
            elif ints is not None and ints[j] is not None:
                outcomes.append(Outcome(NUMBA, state=tensors[i].state._replace(step=ints[j] + 1)))
            else:
                outcomes.append(done)
        if idx:
            sink(idx, outcomes)
    for big in plan.bigs:
        t = tensors[big.i]
        step = None
        if adamp:
            step = int(big.count) + 1 if big.count is not None else t.state.step + 1
        status = run_inplace(spec.key, big.views, step, hp, skip)
        if status == FALLBACK:
            rest.append(big.i)
        elif status == SKIPPED:
            sink([big.i], [Outcome(NUMBA, ok=False)])
        elif adamp and big.count is None:
            sink([big.i], [Outcome(NUMBA, state=t.state._replace(step=step))])
        else:
            if big.count is not None:
                big.count[()] += 1
            sink([big.i], [done])
    return rest


def _run_traced(plan: TracedPlan, spec: Any, tensors: Any, grads: Any, hp: Any, options: Any, sink: Any) -> list[int]:
    """Inside a torch trace: one call of ``torch.ops.adamp_xp.numba_step`` per dtype (a node of the graph; it
    writes params, state and counts in place and returns the skip flags)."""
    from . import NUMBA, Outcome, written

    for idx in plan.groups:
        skipped = _TORCH_OP[0].call("numba", spec, tensors, idx, grads, hp, options.skip_nonfinite)
        if options.skip_nonfinite:
            sink(idx, [Outcome(NUMBA, skips=skipped[j]) for j in range(len(idx))])
        else:
            sink(idx, [written(NUMBA)] * len(idx))
    return []
