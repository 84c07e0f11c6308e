r"""Fused multi-tensor AdamP/SGDP in Triton: a whole param group in a constant number of kernel launches.

The array-API step (:func:`adamp_core.adamp.adamp_update`, :func:`adamp_core.sgdp.sgdp_update`) stays the
reference; these kernels compute the same update (Heo et al., ICLR 2021, Algorithms 1 and 2), are tested
against it step by step, and run only where the adapters' ``fused="triton"`` asks for them. They take a
group's torch tensors of one param dtype and state dtypes on one device (CUDA; CPU tensors only under
Triton's interpreter, ``TRITON_INTERPRET=1``, for CI), any count and any shapes, float32, float64, float16
and bfloat16 params with float32 maths (float64 for float64 params) and state of any of those dtypes, in
three launches per step whatever the number of tensors (five with caution), on the structure of apex's
``multi_tensor_lamb``:

1. **stats** (one program per tile: up to 16 rows of one tensor and up to 16k of their entries, walked in
   blocks of 16 x 32, or one long row in blocks of 512, whichever fills the blocks better): per row of the
   channel view :math:`(C, L)`, with the update recomputed from the new moments,

   .. math:: w_r\cdot g_r,\quad |w_r|^2,\quad |g_r|^2,\quad w_r\cdot u_r,\qquad
             u = \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t}+\epsilon}\ \text{(AdamP)},\ b_t\ \text{(SGDP)}

   summed in float64: exact enough for float32 and 16-bit data, whose squares cannot overflow or underflow
   there (float32 weights near 1e19 or 1e-20 stay exact), and for float64 data on rows scaled by a power
   of two (the largest finite entry in [1, 2), as :func:`adamp_core.projection.row_stats`), finite
   wherever the true norms fit. A row longer than a tile leaves one such part per tile, with its
   exponents. :math:`|g_r|^2` is not finite exactly where a grad entry is not (the non-finite test).
2. **decide** (one program per tensor): each row's parts and then the rows combined with the exact
   power-of-two rescaling of :mod:`adamp_core.projection` (``rho``, ``sigma``); the channel view if
   :math:`\max_r |\cos(g_r, w_r)| < \delta/\sqrt{L}`, else the layer view if
   :math:`|\cos(g, w)| < \delta/\sqrt{CL}`, else none (1-d, 0-d and empty params: none); per row the
   coefficient :math:`c_r = (w_r\cdot u_r)/(|w_r|+\epsilon)^2` (or the layer's), so that
   :math:`\Pi(u) = u - c_r w_r`; the decay factor :math:`1 - \eta\lambda r` (SGDP: over
   :math:`1-\mu`, with :math:`r` = ``wd_ratio`` where projected) and the step size
   :math:`\eta/(1-\beta_1^t)`; then the step count, advanced in place where the tensor is written.
   With ``caution`` two more: per row the entries of :math:`q` kept (signs agreeing with
   :math:`\Pi(g)`) and :math:`w\cdot q` over them, then per tensor the kept fraction and the coefficient
   of the second projection (:mod:`adamp_core.caution`).
3. **update** (one program per tile): the state update again, :math:`q = u - c_r w`,
   :math:`w \leftarrow w(1-\eta\lambda r) - \text{step}\cdot q`, and the state, written in place
   (SGDP without nesterov stores :math:`q` as its buffer, as adamp 0.3.0's in-place projection does).

Tensor addresses come from a device table (an int64 tensor of ``data_ptr()``\ s cast to pointers in the
kernels), per-tensor metadata and the tile list from device tables built once per group layout; the
step counts are read and advanced on the device; nothing is read back: no host sync in a step. With
``skip_nonfinite`` a tensor whose grad has a NaN/inf entry is not written at all and its step count not
advanced, decided on the device (the dispatcher's ``DEVICE`` outcome carries the flags as device arrays).
Hyperparameters are kernel arguments (Python floats, passed as float64 bits); a group with array
hyperparameters takes the array-API paths.

Triton is optional (the ``triton`` extra): :data:`AVAILABLE` says whether it is installed; it is
imported only when these kernels first run. They are opt-in (``fused="triton"``) until the GPU check
script has passed on a real GPU (README).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import struct
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..rows import channel_shape

__all__ = ["AVAILABLE", "ITERS", "Counts", "Entry", "GroupPlan", "check_available", "claim", "counting", "entry",
           "interpreting", "offered", "plan", "plan_group", "regrad", "run", "run_group", "step_group",
           "stubbed", "supports_hyperparams"]

AVAILABLE = importlib.util.find_spec("triton") is not None

# A tile's block: TILE_R rows x TILE_C columns, or one row x WIDE_C columns (the kernels' constants)
TILE_R, TILE_C, WIDE_C = 16, 32, 512
ITERS = 32  # blocks per tile along its rows (16k entries at most): longer rows are cut into parts
ROW_BLOCK = 128  # rows per iteration of decide
NUM_WARPS = 4
_CACHE_SIZE = 16  # layouts and address tables kept per process (least recently used dropped)


def check_available() -> None:
    """Raise the adapters' error for ``fused="triton"`` when Triton is not installed."""
    if not AVAILABLE:
        raise ValueError("Invalid fused value: 'triton' (the Triton kernels need triton: "
                         "pip install -e '.[triton]')")


def interpreting() -> bool:
    """Whether CPU tensors go to Triton's interpreter: ``TRITON_INTERPRET=1`` (how CI runs the kernels), or
    to no kernel at all inside :func:`stubbed`."""
    return _STUBBED[0] or os.environ.get("TRITON_INTERPRET", "0") == "1"


_STUBBED = [False]


@contextlib.contextmanager
def stubbed() -> Iterator[None]:
    """Inside the block CPU tensors take this path and every launch is counted but not run: the host's
    work of a step alone (plans, checks, tables, argument packing), what ``adamp-xp bench --host`` measures.
    The params are not updated."""
    _STUBBED[0] = True
    try:
        yield
    finally:
        _STUBBED[0] = False


@dataclass
class Counts:
    """What the kernels did on the host (see :func:`counting`): kernel launches and uploads of tables
    (host-to-device copies: a new layout, new addresses, or Python-int step counts)."""

    launches: int = 0
    uploads: int = 0
    in_launch: bool = False  # a kernel is running (under the interpreter: its host copies are not the step's)


_COUNTS: list[Counts] = []


@contextlib.contextmanager
def counting() -> Iterator[Counts]:
    """Count the launches and uploads of the steps run inside the ``with`` block (bench, tests)."""
    c = Counts()
    _COUNTS.append(c)
    try:
        yield c
    finally:
        _COUNTS.remove(c)


def _count(what: str) -> None:
    for c in _COUNTS:
        setattr(c, what, getattr(c, what) + 1)


# -- which tensors the kernels take (metadata only) ------------------------------------------------------


class Entry(NamedTuple):
    """One tensor as the kernels take it: torch tensors (a CuPy array's through DLPack, zero copy), its
    step count (an int64 0-d tensor, a Python int, or None for SGDP) and its group key."""

    param: Any
    grad: Any
    buffers: tuple[Any, ...]
    step: Any
    key: tuple[Any, ...]  # (device, storage kinds of param and state): one launch set per key


_KINDS: dict[Any, int] = {}  # torch dtype -> the kernels' storage kind (filled when torch is first seen)


def _kinds(torch: Any) -> dict[Any, int]:
    if not _KINDS:
        _KINDS.update({torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3})
    return _KINDS


def supports_hyperparams(hp: Any) -> bool:
    """Whether the kernels take ``hp``: every numeric hyperparameter a Python number (array ones, which a
    kernel argument cannot hold without a sync, take the array-API paths)."""
    values = [v for k, v in hp._asdict().items() if k not in ("nesterov", "caution", "project_buffer")]
    flat = [x for v in values for x in (v if isinstance(v, tuple) else (v,))]
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat)


def _rows_dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether memory holds the array densely with dim 0 outermost (contiguous, channels_last, ...): then
    row r of the channel view is the block ``[r L, (r + 1) L)``, its entries in some fixed order that
    arrays of equal strides share (sums do not depend on it)."""
    dims = sorted((s, n, d) for d, (n, s) in enumerate(zip(shape, stride, strict=True)) if n > 1)
    expected = 1
    for s, n, _ in dims:
        if s != expected:
            return False
        expected *= n
    return not dims or len(shape) < 2 or shape[0] <= 1 or dims[-1][2] == 0


def _as_torch(arrays: list[Any]) -> list[Any] | None:
    """CuPy arrays as torch tensors over the same memory (DLPack), when torch is installed; else None."""
    if type(arrays[0]).__module__.split(".")[0] != "cupy" or importlib.util.find_spec("torch") is None:
        return None
    import torch

    try:
        return [torch.from_dlpack(x) for x in arrays]
    except (RuntimeError, TypeError, ValueError, BufferError):  # pragma: no cover - needs CuPy
        return None


def entry(spec: Any, param: Any, grad: Any, state: Any, interpret: bool | None = None) -> Entry | None:
    """``param`` and its grad and state as the kernels take them, or None where they cannot: plain torch
    tensors (or CuPy arrays, through DLPack) on a CUDA device (on the CPU only under the interpreter:
    ``interpret``, default :func:`interpreting`), float32/float64/float16/bfloat16, the grad in the param's
    dtype, equal shapes and strides with rows dense in memory, a step count that is a Python int or a 0-d
    int64 tensor on the device. Metadata only, and cheap: it runs for every tensor of every step."""
    torch = sys.modules.get("torch")
    layout = _STATE_LAYOUT.get(spec.name)
    if layout is None:  # once per optimizer (spec.buffers and spec.has_step are computed on every access)
        fields = spec.state._fields
        layout = _STATE_LAYOUT[spec.name] = (spec.has_step, [fields.index(f) for f in spec.buffers])
    has_step, where = layout
    bufs = tuple([state[k] for k in where])
    if torch is None or not isinstance(param, torch.Tensor):
        arrays = _as_torch([param, grad, *bufs])
        if arrays is None:
            return None
        torch = sys.modules["torch"]
        param, grad, bufs = arrays[0], arrays[1], tuple(arrays[2:])
    p = param
    if not p.is_cuda and not (p.is_cpu and (interpreting() if interpret is None else interpret)):
        return None
    kinds = _KINDS or _kinds(torch)
    dtype = p.dtype
    kind = kinds.get(dtype)
    plain = _PLAIN[0] or _plain(torch)
    if kind is None or type(p) not in plain or p.is_neg() or grad.dtype is not dtype:
        return None
    dev, shape, stride = p.device, p.shape, p.stride()
    if not p.is_contiguous() and not _rows_dense(tuple(shape), tuple(stride)):
        return None
    for x in (grad, *bufs):  # every array the kernels address: same device, shape and strides as the param
        if type(x) not in plain or x.device != dev or x.stride() != stride or x.shape != shape or x.is_neg():
            return None
    key = (dev, kind, *[kinds.get(b.dtype) for b in bufs])
    if None in key:
        return None
    step = None
    if has_step:
        step = state.step
        if type(step) is int:
            if step < 0:
                return None
        elif type(step) is not torch.Tensor or step.dtype is not torch.int64 or step.dim() or step.device != dev:
            return None
    return tuple.__new__(Entry, (p, grad, bufs, step, key))


def _plain(torch: Any) -> tuple[Any, ...]:
    _PLAIN[0] = (torch.Tensor, torch.nn.Parameter)
    return _PLAIN[0]


_STATE_LAYOUT: dict[str, tuple[bool, tuple[int, ...]]] = {}  # spec name -> (has a step count, its arrays)


# -- the layout of a group: metadata and tiles, built once per list of shapes -----------------------------


class _Plan(NamedTuple):
    meta: Any  # int64 (n, NMETA) on the device
    tiles: Any  # int64 (n_tiles, NTILE) on the device
    n_tiles: int
    n_parts: int
    n_rows: int


def _efficiency(rows: int, length: int, block_rows: int, block_cols: int) -> float:
    """The fraction of a tile's block that holds entries, for rows of ``length`` in blocks of that shape."""
    return min(rows, block_rows) / block_rows * length / (block_cols * -(-length // block_cols))


def _layout(shapes: Sequence[tuple[int, ...]], iters: int) -> tuple[Any, Any, int, int]:
    """The metadata rows and the tiles (NumPy int64) of tensors of ``shapes``: columns as in
    :mod:`adamp_core.paths._triton_kernels` (``M_*``, ``T_*``). A tile is up to ``TILE_R`` rows (narrow) or one
    row (wide, where that fills the blocks better: few long rows) and up to ``iters`` blocks of columns."""
    import numpy as np

    meta = np.zeros((len(shapes), 7), dtype=np.int64)
    tiles = []
    n_parts = n_rows = 0
    for i, shape in enumerate(shapes):
        rows, length = channel_shape(shape)
        if rows * length == 0:
            rows = 0
        wide = rows > 0 and _efficiency(rows, length, 1, WIDE_C) > _efficiency(rows, length, TILE_R, TILE_C)
        block_rows, span = (1, iters * WIDE_C) if wide else (TILE_R, iters * TILE_C)
        nchunk = -(-length // span) if rows else 0
        meta[i] = (rows, length, n_parts, nchunk, n_rows, int(wide), int(len(shape) > 1 and rows > 0))
        if rows:
            r0 = np.arange(0, rows, block_rows, dtype=np.int64)
            c0 = np.arange(nchunk, dtype=np.int64)
            r, c = np.repeat(r0, nchunk), np.tile(c0, len(r0))
            tiles.append(np.stack([np.full_like(r, i), r, np.minimum(block_rows, rows - r), c * span,
                                   np.minimum((c + 1) * span, length), c], 1))
        n_parts += rows * nchunk
        n_rows += rows
    table = np.concatenate(tiles) if tiles else np.zeros((0, 6), dtype=np.int64)
    return meta, table, n_parts, n_rows


_PLANS: OrderedDict[Any, _Plan] = OrderedDict()


def _remember(cache: OrderedDict[Any, Any], key: Any, make: Any) -> Any:
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = cache[key] = make()
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _upload(torch: Any, values: Any, dev: Any) -> Any:
    """An int64 host array on ``dev``: pinned and copied without blocking the host (no sync), counted."""
    import numpy as np

    host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    _count("uploads")
    if dev.type == "cpu":
        return host
    return host.pin_memory().to(dev, non_blocking=True)


def _plan(torch: Any, shapes: tuple[tuple[int, ...], ...], dev: Any, iters: int) -> _Plan:
    def make() -> _Plan:
        meta, tiles, n_parts, n_rows = _layout(shapes, iters)
        return _Plan(_upload(torch, meta, dev), _upload(torch, tiles, dev), len(tiles), n_parts, n_rows)

    return _remember(_PLANS, (dev, iters, shapes), make)


# -- one step of one group ----------------------------------------------------------------------------------

_BUILT: dict[bool, Any] = {}


def _kernels(interpret: bool) -> Any:
    if interpret not in _BUILT:
        from . import _triton_kernels as kt

        assert (kt.TILE_R.value, kt.TILE_C.value, kt.WIDE_C.value) == (TILE_R, TILE_C, WIDE_C)
        _BUILT[interpret] = kt.build(interpret)
    return _BUILT[interpret]


def _launch(kernel: Any, grid: tuple[int], *args: Any, **meta: Any) -> None:
    _count("launches")
    if _STUBBED[0]:
        return
    for c in _COUNTS:
        c.in_launch = True
    try:
        kernel[grid](*args, **meta)
    finally:
        for c in _COUNTS:
            c.in_launch = False


def _bits(x: float) -> int:
    """A Python float as the int64 of its IEEE bits (the kernels' float64 arguments)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # 1 - 0^t = 1 (host_bias_correction)


class _Scratch(NamedTuple):
    """A group's device buffers, allocated once per plan (the kernels run in stream order: one set serves
    every step)."""

    parts: Any  # float64 per row part: the stats
    coef: Any  # float64 per row: the coefficients
    scal: Any  # float64 per tensor: the decisions' scalars
    ok: Any  # bool per tensor
    skips: Any  # int64 per tensor
    cparts: Any  # float64 per row part: caution's stats (None until caution runs)


class GroupPlan(NamedTuple):
    """One launch set: tensors of one key (device, storage kinds), their layout, address table and buffers."""

    idx: list[int]  # the tensors' indices in the dispatcher's list
    entries: list[Entry]  # as claimed (their grads: those of the step the plan was built on)
    grads: list[Any]  # this step's grads (regrad_group swaps them)
    strides: list[tuple[int, ...]]  # the params' strides (a new grad must have them)
    layout: _Plan
    rows: tuple[int, ...] | None  # the address table's values (None: Python-int counts, rebuilt per step)
    ptrs: Any  # the address table on the device (None with Python-int counts)
    scratch: _Scratch
    dev: Any
    iters: int
    adamp: bool  # AdamP's kernels (else SGDP's)
    dlpack: bool  # the caller's arrays are not torch tensors (CuPy's, taken through DLPack)


def _address_rows(entries: Sequence[Entry], grads: Sequence[Any], adamp: bool, counts: Any = None) -> list[int]:
    """The address table: per tensor param, grad, the two state arrays (SGDP: its one, twice), the step
    count (SGDP: 0; a Python int: its slot in ``counts``, a device copy)."""
    rows: list[int] = []
    if not adamp:
        for e, g in zip(entries, grads, strict=True):
            b = e.buffers[0].data_ptr()
            rows += (e.param.data_ptr(), g.data_ptr(), b, b, 0)
        return rows
    for j, (e, g) in enumerate(zip(entries, grads, strict=True)):
        b = e.buffers
        step = counts.data_ptr() + 8 * j if type(e.step) is int else e.step.data_ptr()
        rows += (e.param.data_ptr(), g.data_ptr(), b[0].data_ptr(), b[1].data_ptr(), step)
    return rows


def plan_group(spec: Any, idx: list[int], entries: Sequence[Entry], iters: int = ITERS,
               dlpack: bool = False) -> GroupPlan:
    """Everything a launch set needs that does not change from step to step: the layout (metadata and tiles,
    uploaded once), the address table (uploaded once, unless counts are Python ints) and the scratch
    buffers."""
    import torch

    from . import _triton_kernels as kt

    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"Invalid iters: {iters!r} (expected a positive int)")
    n, dev = len(entries), entries[0].param.device
    layout = _plan(torch, tuple(tuple(e.param.shape) for e in entries), dev, iters)
    host_counts = spec.has_step and any(type(e.step) is int for e in entries)
    grads = [e.grad for e in entries]
    rows = None if host_counts else tuple(_address_rows(entries, grads, spec.key == "adamp"))
    ptrs = None if rows is None else _upload(torch, rows, dev)
    f64 = torch.float64
    scratch = _Scratch(torch.empty(max(layout.n_parts, 1) * kt.NSTAT.value, dtype=f64, device=dev),
                       torch.empty(max(layout.n_rows, 1) * kt.NCOEF.value, dtype=f64, device=dev),
                       torch.empty(n * kt.NV.value, dtype=f64, device=dev),
                       torch.empty(n, dtype=torch.bool, device=dev),
                       torch.empty(n, dtype=torch.int64, device=dev), None)
    return GroupPlan(list(idx), list(entries), grads, [e.param.stride() for e in entries], layout, rows, ptrs,
                     scratch, dev, iters, spec.key == "adamp", dlpack)


def regrad_group(g: GroupPlan, grads: Sequence[Any]) -> GroupPlan | None:
    """``g`` with new grad tensors (one per entry, in order; checked against their params by the adapter:
    dtype, shape, device), each checked for what only these kernels need (a plain tensor with the param's
    strides); the address table uploaded again only where an address changed."""
    plain = _PLAIN[0]
    for stride, grad in zip(g.strides, grads, strict=True):  # no object per tensor: a warm step makes no garbage
        if type(grad) not in plain or grad.stride() != stride or grad.is_neg():
            return None
    grads = list(grads)
    if g.rows is None:
        return g._replace(grads=grads)
    rows = list(g.rows)
    rows[1::5] = [grad.data_ptr() for grad in grads]  # the grad column (_address_rows)
    rows = tuple(rows)
    if rows == g.rows:
        return g._replace(grads=grads)
    import torch

    return g._replace(grads=grads, rows=rows, ptrs=_upload(torch, rows, g.dev))


_PLAIN: list[Any] = [()]  # (torch.Tensor, torch.nn.Parameter), once torch is seen by entry()

_PACKED: OrderedDict[Any, Any] = OrderedDict()  # hyperparameters -> the kernels' arguments (packed once)


def _packed(spec: Any, hp: Any) -> tuple[dict[str, int], bool, bool, bool]:
    """The kernels' float64 arguments (IEEE bits) and flags for ``hp``: computed once per value of the
    hyperparameters (an LR schedule packs once per new lr), not once per step."""
    key = (spec.key, hp)
    hit = _PACKED.get(key)
    if hit is not None:
        return hit
    if spec.key == "adamp":
        b1, b2 = (float(b) for b in hp.betas)
        mom, c1, c2, lb1, lb2, mu = b1, 1.0 - b1, 1.0 - b2, _log(b1), _log(b2), 0.0
        store_q = False
    else:
        mom = mu = float(hp.momentum)
        c1, b2, c2, lb1, lb2 = 1.0 - float(hp.dampening), 0.0, 0.0, 0.0, 0.0
        store_q = not hp.nesterov and getattr(hp, "project_buffer", True)
    x = {name: _bits(v) for name, v in dict(lr=hp.lr, mom=mom, c1=c1, b2=b2, c2=c2, lb1=lb1, lb2=lb2, eps=hp.eps,
                                             wd=hp.weight_decay, delta=hp.delta, ratio=hp.wd_ratio, mu=mu).items()}
    value = (x, bool(store_q), bool(getattr(hp, "caution", False)), bool(hp.nesterov))
    return _remember(_PACKED, key, lambda: value)


def run_group(spec: Any, g: GroupPlan, hp: Any, skip_nonfinite: bool = False,
              steps: Sequence[Any] | None = None) -> tuple[list[Any] | None, list[Any] | None]:
    """One step of a planned launch set, written in place; array step counts advanced in place where
    written. ``steps``: this step's counts where some are Python ints (default: the entries'). Returns
    ``(ok, skips)`` as :func:`step_group`."""
    import torch

    entries, layout, sc, dev = g.entries, g.layout, g.scratch, g.dev
    k = _kernels(dev.type == "cpu")
    import triton.language as tl

    from . import _triton_kernels as kt

    counts, ptrs = None, g.ptrs
    if ptrs is None:  # host counts (adamp_array's) are read from a copy on the device, which decide advances
        steps = [e.step for e in entries] if steps is None else steps
        counts = _upload(torch, [t if type(t) is int else 0 for t in steps], dev)
        ptrs = _upload(torch, _address_rows(entries, g.grads, True, counts), dev)
    kinds = entries[0].key[1:]
    wk, s1k, s2k = kinds[0], kinds[1], kinds[-1]
    cdt = tl.float64 if wk == 1 else tl.float32
    x, store_q, caution, nesterov = _packed(spec, hp)
    options = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
    common = dict(OPT=0 if spec.key == "adamp" else 1, CDT=cdt, **options)
    tile = dict(NESTEROV=nesterov, WK=wk, S1K=s1k, S2K=s2k, **common)
    elementwise = (x["mom"], x["c1"], x["b2"], x["c2"], x["eps"])
    grid_t, grid_n = (layout.n_tiles,), (len(entries),)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        if layout.n_tiles:
            _launch(k.stats, grid_t, layout.tiles, layout.meta, ptrs, sc.parts, x["lr"], x["mom"], x["c1"], x["b2"],
                    x["c2"], x["lb1"], x["lb2"], x["eps"], **tile)
        _launch(k.decide, grid_n, layout.meta, ptrs, sc.parts, sc.coef, sc.scal, sc.ok, sc.skips, x["lr"], x["wd"],
                x["delta"], x["ratio"], x["eps"], x["lb1"], x["lb2"], x["mu"], SKIP=bool(skip_nonfinite),
                RB=ROW_BLOCK, **common)
        if caution:
            cparts = torch.empty(max(layout.n_parts, 1) * kt.NCSTAT.value, dtype=torch.float64, device=dev)
            if layout.n_tiles:
                _launch(k.cstats, grid_t, layout.tiles, layout.meta, ptrs, sc.parts, cparts, sc.coef, sc.scal,
                        *elementwise, **tile)
            _launch(k.cdecide, grid_n, layout.meta, cparts, sc.parts, sc.coef, sc.scal, RB=ROW_BLOCK, **options)
        if layout.n_tiles:
            _launch(k.update, grid_t, layout.tiles, layout.meta, ptrs, sc.coef, sc.scal, *elementwise,
                    STORE_Q=store_q, CAUTION=caution, **tile)
    del counts  # a copy of host step counts lives until here (the kernels are queued on its stream)
    if not skip_nonfinite:
        return None, None
    # The flags are copied out of the reused buffers: the next step overwrites them.
    return list(sc.ok.clone().unbind()), list(sc.skips.clone().unbind())


def step_group(spec: Any, entries: Sequence[Entry], hp: Any, skip_nonfinite: bool = False,
               iters: int = ITERS) -> tuple[list[Any] | None, list[Any] | None]:
    """One AdamP (``spec.key == "adamp"``) or SGDP step of ``entries`` (one key: see :func:`entry`),
    written in place; array step counts advanced in place where written. ``hp``: checked hyperparameters
    of Python numbers (:func:`supports_hyperparams`). ``iters``: blocks per tile along its rows (tests use 1
    to cut short rows into parts). A plan built and run once (the dispatcher keeps its plans).

    Returns ``(ok, skips)``: None, None without ``skip_nonfinite``; else per tensor a 0-d bool device
    tensor (the grad was finite: the tensor was written) and a 0-d int64 one (1 where it was skipped)."""
    return run_group(spec, plan_group(spec, list(range(len(entries))), entries, iters), hp, skip_nonfinite)


# -- the path (adamp_core.paths): claim, plan, regrad, run ------------------------------------------------


class Plan(NamedTuple):
    groups: list[GroupPlan]


def offered(options: Any) -> bool:
    """Only with ``fused="triton"`` (opt-in), Triton installed; inside a tracer only once
    :func:`prepare_traced` registered the kernels as a torch operator (a compiled torch step)."""
    return options.fused == "triton" and AVAILABLE and (not options.traced or _TORCH_OP[0] is not None)


_TORCH_OP: list[Any] = [None]  # adamp_core.paths._torch_ops once loaded (prepare_traced)


def prepare_traced(spec: Any, fused: Any) -> None:
    """Before a torch step is traced (torch.compile): register the kernels as a torch operator
    (``torch.ops.adamp_xp.triton_step``, :mod:`adamp_core.paths._torch_ops`), so that the traced step calls
    them (and a CUDA graph captures their launches). Only with ``fused="triton"``; triton itself loads on
    the operator's first real call."""
    if AVAILABLE and fused == "triton" and _TORCH_OP[0] is None:
        from . import _torch_ops

        _torch_ops.bind("triton", sys.modules[__name__])
        _TORCH_OP[0] = _torch_ops
    _TRACED_INTERPRET[0] = interpreting()  # read here, eagerly: no environment lookup inside the trace
    torch = sys.modules.get("torch")
    if torch is not None:
        _kinds(torch)  # filled here, not inside the trace


_TRACED_INTERPRET = [False]


def _traced_key(spec: Any, t: Any) -> Any:
    """Inside a torch trace (metadata of fake tensors only, simpler than :func:`entry`): the launch-set key
    (device, dtypes) of plain, contiguous tensors of one device, shape and dtype (state buffers of a kernel
    dtype), a 0-d int64 count on the device; None where the kernels do not take it."""
    torch = sys.modules["torch"]
    if not t.writable or t.alone or t.rows is not None:
        return None
    p, plain = t.param, (torch.Tensor, torch.nn.Parameter)
    kinds = _KINDS or _kinds(torch)
    if type(p) not in plain or p.dtype not in kinds or not (p.is_cuda or (p.is_cpu and _TRACED_INTERPRET[0])):
        return None
    bufs = [getattr(t.state, f) for f in spec.buffers]
    for x in (p, t.grad, *bufs):
        if type(x) not in plain or x.device != p.device or x.shape != p.shape or not x.is_contiguous() \
                or x.dtype not in kinds:
            return None
    if t.grad.dtype != p.dtype:
        return None
    if spec.has_step:
        s = t.state.step
        if type(s) is not torch.Tensor or s.dtype != torch.int64 or s.dim() != 0 or s.device != p.device:
            return None
    return (p.device, p.dtype, *(b.dtype for b in bufs))


class TracedPlan(NamedTuple):
    """Inside a torch trace: the tensors of each key (device, storage kinds), one operator call each."""

    groups: list[list[int]]


def claim(spec: Any, tensors: Any, idx: list[int], hp: Any, options: Any) -> list[int]:
    """The tensors :func:`entry` accepts (writable, rows all here, not ``alone``), when every numeric
    hyperparameter is a Python number (:func:`supports_hyperparams`)."""
    if not supports_hyperparams(hp):
        return []
    if options.traced:
        return [i for i in idx if _traced_key(spec, tensors[i]) is not None]
    interpret = interpreting()
    return [i for i in idx if tensors[i].writable and not tensors[i].alone and tensors[i].rows is None
            and entry(spec, tensors[i].param, tensors[i].grad, tensors[i].state, interpret) is not None]


def plan(spec: Any, tensors: Any, taken: list[int], hp: Any, options: Any) -> Plan | TracedPlan:
    """One :class:`GroupPlan` per key (device and storage kinds); inside a torch trace, the indices per key."""
    if options.traced:
        keys: dict[Any, list[int]] = {}
        for i in taken:
            keys.setdefault(_traced_key(spec, tensors[i]), []).append(i)
        return TracedPlan(list(keys.values()))
    interpret = interpreting()
    by_key: dict[Any, list[tuple[int, Entry]]] = {}
    for i in taken:
        t = tensors[i]
        e = entry(spec, t.param, t.grad, t.state, interpret)
        by_key.setdefault(e.key, []).append((i, e))
    torch = sys.modules["torch"]
    return Plan([plan_group(spec, [i for i, _ in m], [e for _, e in m],
                            dlpack=not isinstance(tensors[m[0][0]].param, torch.Tensor)) for m in by_key.values()])


def regrad(plan: Plan, grads: Any) -> Plan | None:
    """The plan with new grads (``grads``, index-aligned with the group's tensors; see :func:`regrad_group`),
    or None."""
    groups = []
    for g in plan.groups:
        mine = [grads[i] for i in g.idx]
        if g.dlpack:  # CuPy arrays: their torch tensors
            mine = [_as_torch_grad(x) for x in mine]
            if any(x is None for x in mine):
                return None
        new = regrad_group(g, mine)
        if new is None:
            return None
        groups.append(new)
    return Plan(groups)


def _as_torch_grad(grad: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(grad, torch.Tensor):
        return grad
    arrays = _as_torch([grad])
    return None if arrays is None else arrays[0]


def run(plan: Plan, spec: Any, tensors: Any, grads: Any, hp: Any, options: Any, sink: Any) -> list[int]:
    """One step of every launch set: in place on the device; a Python-int count comes back advanced in the
    outcome's state (where written: read the ``ok`` flag)."""
    from . import TRITON, Outcome, written

    skip = options.skip_nonfinite
    if type(plan) is TracedPlan:  # inside a torch trace: one operator call per key (a node of the graph)
        for idx in plan.groups:
            skipped = _TORCH_OP[0].call("triton", spec, tensors, idx, grads, hp, skip)
            sink(idx, [Outcome(TRITON, skips=skipped[j]) for j in range(len(idx))] if skip else
                 [written(TRITON)] * len(idx))
        return []
    for g in plan.groups:
        ok, skips = run_group(spec, g, hp, skip, None if g.rows is not None else
                              [tensors[i].state.step for i in g.idx])
        if ok is None and g.rows is not None:  # no flags, no Python-int counts: all written
            sink(g.idx, [written(TRITON)] * len(g.idx))
            continue
        outcomes = []
        for j, i in enumerate(g.idx):
            state = tensors[i].state
            new_state = state._replace(step=state.step + 1) if type(g.entries[j].step) is int else None
            if ok is None and new_state is None:
                outcomes.append(written(TRITON))
            else:
                outcomes.append(Outcome(TRITON, state=new_state, ok=None if ok is None else ok[j],
                                        skips=None if skips is None else skips[j]))
        sink(g.idx, outcomes)
    return []
