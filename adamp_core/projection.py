r"""Scale-invariance test and radial projection (Heo et al., ICLR 2021, Sec. 3.2).

For a weight :math:`w` with gradient :math:`g` and update :math:`u`, the paper projects

.. math::

    \Pi_w(u) = u - (\hat w \cdot u)\,\hat w, \qquad \hat w = \frac{w}{\lVert w\rVert + \epsilon},

when :math:`w` looks scale-invariant, i.e. when the gradient is almost orthogonal to the
weight. As in ``adamp==0.3.0`` the test is tried on two views of the tensor, first the
*channel view* (one row per output channel, ``(shape[0], -1)``) and then the *layer view*
(one row, ``(1, -1)``); the first view whose largest row cosine satisfies

.. math::

    \max_{\text{rows } r} \lvert\cos(g_r, w_r)\rvert < \frac{\delta}{\sqrt{\text{row length}}}

is projected row by row. Cosines follow ``torch.nn.functional.cosine_similarity``:
:math:`w\cdot g / (\max(\lVert w\rVert, \epsilon)\max(\lVert g\rVert, \epsilon))`.

Everything is computed from one set of per-row reductions of the channel view
(:math:`w\cdot g`, :math:`\lVert w\rVert^2`, :math:`\lVert g\rVert^2`, :math:`w\cdot u`); the
layer view's statistics are their sums over rows, so the tensor is read once and never
reshaped to ``(1, -1)``. The decision is a 0-d boolean array (``xp.where``), never a
Python ``if``, so there is no device-to-host sync and the step traces under ``jax.jit``.

No sum of squares overflows or underflows where the true norm fits the dtype: before the
reductions each row of :math:`w` and :math:`g` is multiplied by a power of two
:math:`s_r = 2^{-k_r}`, :math:`2^{k_r} \le \max_i |x_{ri}| < 2^{k_r+1}` (so its largest entry is in
:math:`[1, 2)`), and every formula is rewritten in the scaled quantities (:math:`\epsilon` becomes
:math:`\epsilon s_r`). Scaling by a power of two is exact, so in the normal range the results are
bit for bit those of the unscaled formulas (and of ``adamp==0.3.0``); float32 weights or gradients
near :math:`10^{19}` or :math:`10^{-20}` keep exact cosines and projections instead of ``inf``/``nan``.

Under JAX each group of reductions is one variadic XLA reduction (:func:`adamp_core.rows.fused_reduce`):
the max-abs of ``w`` and ``g`` in one pass, the four row dot products (``u`` computed inside) in a second,
then the update in one elementwise pass; the scaled rows are never written to memory. The results are
those of the separate reductions (tests/test_xla_step.py), which every other library runs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .arrays import device, is_jax_traced, is_numpy
from .caution import caution_factor
from .rows import RowReduce, channel_shape, fused_reduce, per_row
from .rows import rows_of as _rows

__all__ = ["RowStats", "ViewDecision", "RowReduce", "channel_shape", "row_stats", "decide_view", "project_update",
           "project_update_parts", "projected_view", "VIEW_NONE", "VIEW_CHANNEL", "VIEW_LAYER"]

VIEW_NONE, VIEW_CHANNEL, VIEW_LAYER = 0, 1, 2


class RowStats(NamedTuple):
    r"""Per-row statistics of the channel view, each of shape ``(shape[0],)``, computed on the rows
    scaled by exact powers of two, :math:`\tilde w_r = s_r w_r` and :math:`\tilde g_r = t_r g_r`
    (``sw``, ``sg``; see the module docstring), so that none of them overflows or underflows."""

    wg: Any  # ~w_r . ~g_r  = s_r t_r (w_r . g_r)
    ww: Any  # |~w_r|^2     = s_r^2 |w_r|^2
    gg: Any  # |~g_r|^2     = t_r^2 |g_r|^2
    wu: Any  # ~w_r . u_r   = s_r (w_r . u_r)  (None when only the test is needed)
    sw: Any = None  # s_r = 2^-k_r, max |w_r| in [2^k_r, 2^(k_r+1)) (None: s_r = 1, unscaled stats)
    sg: Any = None  # t_r, the same for g
    w_scaled: Any = None  # ~w, the rows of w times s (what the projection subtracts from)


class ViewDecision(NamedTuple):
    """Outcome of the scale-invariance test; all fields are arrays (no sync)."""

    channel: Any  # 0-d bool: channel view projected
    layer: Any  # 0-d bool: layer view projected (channel view was not)
    cos_channel: Any  # 0-d: max over rows of |cos(g_r, w_r)|
    cos_layer: Any  # 0-d: |cos(g, w)| of the whole tensor
    threshold_channel: float  # delta / sqrt(row length)
    threshold_layer: float  # delta / sqrt(size)


_LOCAL_ROWS = RowReduce()


def projects(rows: RowReduce | None, ndim: int) -> bool:
    """Whether a param of ``ndim`` gets the test, as its layout ``rows`` says (static: no array is read)."""
    return (_LOCAL_ROWS if rows is None else rows).projects(ndim)


def _pow2_scale(xp: Any, rows: Any) -> Any:
    """Per row, the power of two ``s_r = 2**-k_r``, ``2**k_r <= max|x_r| < 2**(k_r+1)`` (so ``s_r x_r`` has its
    largest entry in [1, 2)), kept within the normal range (``s_r`` and ``1/s_r`` normal numbers); 1 for a row
    that is all zero, subnormal or NaN (a NaN row is never projected: its statistics are NaN)."""
    return _pow2_of(xp, _row_absmax(xp, rows)[0])


def _pow2_of(xp: Any, m: Any) -> Any:
    """:func:`_pow2_scale` from the rows' largest magnitudes ``m`` (shape ``(rows,)``)."""
    tiny = float(xp.finfo(m.dtype).smallest_normal)  # 2**-126 (float32), 2**-1022 (float64)
    # Python scalars only in operators and where(): torch.compile traces them without recompiling.
    m = xp.where(m >= tiny, m, 1.0)
    m = xp.where(m <= 1.0 / tiny, m, 1.0 / tiny)  # inf and the top binade: s = 2**-126 (float32)
    if is_jax_traced(m):
        return _pow2_from_exponent(m)
    # Exact: an integer power of two, in the normal range. (log2 may round up just below a power of two, giving
    # s_r x_r in [1/2, 1): every formula scales exactly, so the results are the same.)
    return 0.5 ** xp.floor(xp.log2(m))


def _pow2_from_exponent(m: Any) -> Any:
    """Under JAX, :func:`_pow2_of` from the exponent bits of ``m`` (normal numbers): integer operations that XLA
    fuses into the kernels reading ``s``, where ``log2`` and ``pow`` are kernels of their own (4 per projected
    tensor, each compiled apart)."""
    import jax.numpy as jnp
    from jax import lax

    bits, mantissa, bias = (jnp.uint32, 23, 127) if m.dtype == jnp.float32 else (jnp.uint64, 52, 1023)
    exponent = lax.shift_right_logical(lax.bitcast_convert_type(m, bits), bits(mantissa))  # k + bias
    return lax.bitcast_convert_type(lax.shift_left(bits(2 * bias) - exponent, bits(mantissa)), m.dtype)  # 2**-k


def _row_absmax(xp: Any, *rows: Any) -> tuple[Any, ...]:
    """``max_i |x_ri|`` of each ``(rows, length)`` array, per row (NaN where a row holds one)."""
    if rows and is_jax_traced(rows[0]):
        return fused_reduce(xp, ("max",) * len(rows), tuple(xp.abs(r) for r in rows), 1)
    return tuple(xp.maximum(xp.max(r, axis=1), -xp.min(r, axis=1)) for r in rows)  # no |x| temporary


def _rowdot(xp: Any, a: Any, b: Any) -> Any:
    """Per-row dot products of two ``(rows, length)`` arrays: NumPy's ``vecdot`` (one fused pass), elsewhere
    a product and a sum, which torch and XLA fuse. (array-api-compat's torch ``vecdot`` moves axes, which
    ``torch.func.vmap`` cannot batch; JAX's is a ``dot_general`` that an explicitly sharded mesh refuses
    when the rows are split along their length.)"""
    if is_numpy(a):
        return xp.vecdot(a, b)
    return xp.sum(a * b, axis=-1)


def _rowdots(xp: Any, *pairs: tuple[Any, Any]) -> tuple[Any, ...]:
    """:func:`_rowdot` of each pair; under JAX all in one reduction (:func:`adamp_core.rows.fused_reduce`)."""
    if pairs and is_jax_traced(pairs[0][0]):
        return fused_reduce(xp, ("+",) * len(pairs), tuple(a * b for a, b in pairs), 1)
    return tuple(_rowdot(xp, a, b) for a, b in pairs)


def row_stats(xp: Any, w: Any, g: Any, u: Any | None = None) -> RowStats:
    """One set of reductions over the rows of the channel view of ``w``, ``g`` (and ``u``), on the
    rows scaled by powers of two (one max-abs reduction of both arrays first)."""
    wr, gr = _rows(xp, w), _rows(xp, g)
    sw, sg = (_pow2_of(xp, m) for m in _row_absmax(xp, wr, gr))
    # Exact scaling: the largest entry of each row is in [1, 2), so |~w_r|^2 <= 4 * row length.
    wr, gr = wr * xp.reshape(sw, (-1, 1)), gr * xp.reshape(sg, (-1, 1))
    pairs = ((wr, gr), (wr, wr), (gr, gr)) + (() if u is None else ((wr, _rows(xp, u)),))
    wg, ww, gg, *wu = _rowdots(xp, *pairs)
    return RowStats(wg, ww, gg, wu[0] if wu else None, sw, sg, wr)


def _cosine(xp: Any, wg: Any, ww: Any, gg: Any, eps_w: Any, eps_g: Any) -> Any:
    # torch's cosine_similarity clamps each norm at eps separately (here eps times the row's scale).
    return xp.abs(wg) / (xp.maximum(xp.sqrt(ww), eps_w) * xp.maximum(xp.sqrt(gg), eps_g))


class _Layer(NamedTuple):
    """Layer-view statistics: the channel-view ones rescaled to the tensor's largest row, summed."""

    ww: Any  # S^2 |w|^2
    wg: Any  # S T (w . g)
    gg: Any  # T^2 |g|^2
    rho: Any  # per row s_r -> S: S / s_r (<= 1, a power of two)
    sw: Any  # S = min_r s_r
    sg: Any  # T = min_r t_r
    wx: tuple[Any, ...] = ()  # S (w . x) for each per-row ~w_r . x_r asked of _decide (radial parts)


def _decide(
    xp: Any, w: Any, stats: RowStats, delta: Any, eps: Any, rows: RowReduce = _LOCAL_ROWS, wx: tuple[Any, ...] = ()
) -> tuple[ViewDecision, _Layer]:
    """The test on both views, and the layer view's sums (with those of the per-row ``wx``, ~w_r . x_r):
    two reductions over rows in all (a max, then sums), each of several arrays at once."""
    thr_c, thr_l = rows.thresholds(xp, w, delta, stats.ww.dtype)
    if stats.sw is None:
        (cos_c,) = rows.max(xp, _cosine(xp, stats.wg, stats.ww, stats.gg, eps, eps))
        one = xp.ones((), dtype=stats.ww.dtype, device=device(stats.ww))
        ww, wg, gg, *wx_l = rows.sum(xp, stats.ww, stats.wg, stats.gg, *wx)
        lay = _Layer(ww, wg, gg, one, one, one, tuple(wx_l))
    else:
        cos_r = _cosine(xp, stats.wg, stats.ww, stats.gg, eps * stats.sw, eps * stats.sg)
        # S = min_r s_r as -max_r (-s_r): one max for all three, and no division (XLA: no kernels of their own).
        cos_c, neg_sw, neg_sg = rows.max(xp, cos_r, -stats.sw, -stats.sg)
        sw, sg = -neg_sw, -neg_sg
        rho, sig = sw / stats.sw, sg / stats.sg  # exact powers of two <= 1: rows far below the largest vanish
        ww, wg, gg, *wx_l = rows.sum(xp, stats.ww * (rho * rho), stats.wg * (rho * sig), stats.gg * (sig * sig),
                                     *(x * rho for x in wx))
        lay = _Layer(ww, wg, gg, rho, sw, sg, tuple(wx_l))
    cos_l = _cosine(xp, lay.wg, lay.ww, lay.gg, eps * lay.sw, eps * lay.sg)
    channel = cos_c < thr_c
    layer = xp.logical_and(xp.logical_not(channel), cos_l < thr_l)
    return ViewDecision(channel, layer, cos_c, cos_l, thr_c, thr_l), lay


def decide_view(xp: Any, w: Any, stats: RowStats, delta: Any, eps: Any, rows: RowReduce | None = None) -> ViewDecision:
    r"""The scale-invariance test of ``adamp==0.3.0`` on both views, from channel-view ``stats``.

    ``w`` must have ``ndim > 1`` and ``size > 0``; only its shape is read. With scaled stats the
    cosines are computed as :math:`|\tilde w_r\cdot\tilde g_r| / (\max(|\tilde w_r|, \epsilon s_r)
    \max(|\tilde g_r|, \epsilon t_r))`, which equals the unscaled formula exactly.
    """
    return _decide(xp, w, stats, delta, eps, _LOCAL_ROWS if rows is None else rows)[0]


def project_update(
    xp: Any, w: Any, g: Any, u: Any, delta: Any, eps: Any, rows: RowReduce | None = None, *, caution: bool = False,
    u_stats: Any = None
) -> tuple[Any, Any, ViewDecision | None]:
    """Return ``(Pi(u), projected, decision)`` for a weight ``w`` with ``ndim > 1``.

    ``Pi(u) = u - w_n * sum_row(w_n * u)`` with ``w_n = w / (|w_row| + eps)`` on the view chosen
    by :func:`decide_view`, and ``u`` itself when neither view is scale-invariant. ``projected`` is a
    0-d boolean array. Arrays of size 0 are returned unchanged (the official code fails on them).
    ``rows`` (default: ``w`` holds every row) says how to reduce over rows when ``w``, ``g`` and ``u``
    hold only some of them; see :class:`RowReduce`. ``caution``: the cautious update instead
    (:mod:`adamp_core.caution`), masked against ``Pi(g)`` and projected again. ``u_stats``: the same
    ``u`` as the reductions read it (default ``u``); see :func:`adamp_core._common.reread`.
    """
    return project_update_parts(xp, w, g, u, delta, eps, rows, caution=caution, u_stats=u_stats)[1:]


def project_update_parts(
    xp: Any, w: Any, g: Any, u: Any, delta: Any, eps: Any, rows: RowReduce | None = None, *, caution: bool = False,
    u_stats: Any = None
) -> tuple[Any, Any, Any, ViewDecision | None]:
    """:func:`project_update` as ``(Pi(u), update, projected, decision)``: ``update`` is ``Pi(u)`` itself,
    or with ``caution`` the cautious update made from it (SGDP stores ``Pi(u)``, unmasked, as its buffer)."""
    dev = device(w)
    rows = _LOCAL_ROWS if rows is None else rows
    if math.prod(w.shape if rows.shape is None else rows.shape) == 0:  # static; every shard agrees
        return u, u, xp.asarray(False, device=dev), None
    eps_a = xp.asarray(eps, dtype=w.dtype, device=dev)
    stats = row_stats(xp, w, g, u if u_stats is None else u_stats)
    # ~w_r . g_r = (~w_r . ~g_r) / t_r, exactly (t_r a power of two): Pi(g) (caution) needs no other pass.
    wg_r = stats.wg / stats.sg if caution else None
    dec, lay = _decide(xp, w, stats, delta, eps_a, rows, (stats.wu,) + ((wg_r,) if caution else ()))
    # sum_row(w_n * x) * w_n = w * (w.x) / (|w| + eps)^2, per row (channel) or for the whole tensor (layer).
    # In scaled terms (~w = s w): ~w * (~w.x) / (|~w| + eps s)^2, the same number exactly.
    n_c = xp.sqrt(stats.ww) + eps_a * stats.sw
    n_l = xp.sqrt(lay.ww) + eps_a * lay.sw
    zero = xp.zeros((), dtype=w.dtype, device=dev)
    # ~w in w's shape. Under JAX made again inside the final elementwise pass, indexed like w: through the
    # rows view (a reshape) XLA would not write the new param in place of a donated one but copy it.
    w_s = w * per_row(xp, stats.sw, w) if is_jax_traced(w) else xp.reshape(stats.w_scaled, w.shape)

    def radial(wx: Any, wx_l: Any = None) -> Any:
        """The radial part of ``x`` on the chosen view (0 where none is), from its per-row ``~w_r . x_r``
        (and its layer sum ``S w.x``, when known)."""
        if wx_l is None:
            (wx_l,) = rows.sum(xp, wx * lay.rho)
        coef_l = lay.rho * (wx_l / n_l / n_l)  # row r: ~w_r * rho_r = S w_r
        coef = xp.where(dec.channel, wx / n_c / n_c, xp.where(dec.layer, coef_l, zero))
        return w_s * per_row(xp, coef, w)

    projected = xp.logical_or(dec.channel, dec.layer)
    # Where nothing is projected coef is 0 and u - w * 0 == u exactly for finite w. (An infinite weight
    # entry, never projected as its cosines are NaN, gives NaN there where adamp 0.3.0 keeps +-inf: an
    # xp.where on the whole tensor to match that would cost a full pass on every step.)
    q = u - radial(stats.wu, lay.wx[0])
    if not caution:
        return q, q, projected, dec
    ref = g - radial(wg_r, lay.wx[1])
    masked = q * caution_factor(xp, q, ref, rows, w)
    # Projected again (timm): the mask breaks the orthogonality to w. Identity where nothing is projected.
    return q, masked - radial(_rowdot(xp, stats.w_scaled, _rows(xp, masked))), projected, dec


def projected_view(param: Any, grad: Any, delta: Any = 0.1, eps: Any = 1e-8) -> Any:
    """Which view ``adamp_step``/``sgdp_step`` would project for this param and grad:
    a 0-d int32 array, ``VIEW_NONE`` (0), ``VIEW_CHANNEL`` (1) or ``VIEW_LAYER`` (2). Sync-free."""
    from .arrays import check_array, check_grad, compute_dtype

    xp = check_array(param)
    check_grad(param, grad)
    dev = device(param)
    if param.ndim <= 1 or math.prod(param.shape) == 0:
        return xp.asarray(VIEW_NONE, dtype=xp.int32, device=dev)
    cdt = compute_dtype(xp, param.dtype)
    w, g = xp.astype(param, cdt, copy=False), xp.astype(grad, cdt, copy=False)
    dec = decide_view(xp, w, row_stats(xp, w, g), delta, xp.asarray(eps, dtype=cdt, device=dev))
    # The two decisions exclude each other: 1 * channel + 2 * layer (no constant to place on a device,
    # which a sharded JAX array outside jit would refuse).
    return xp.astype(dec.channel, xp.int32) * VIEW_CHANNEL + xp.astype(dec.layer, xp.int32) * VIEW_LAYER
