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
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .arrays import device

__all__ = ["RowStats", "ViewDecision", "row_stats", "decide_view", "project_update", "projected_view", "VIEW_NONE",
           "VIEW_CHANNEL", "VIEW_LAYER"]

VIEW_NONE, VIEW_CHANNEL, VIEW_LAYER = 0, 1, 2


class RowStats(NamedTuple):
    """Per-row statistics of the channel view, each of shape ``(shape[0],)``."""

    wg: Any  # w_r . g_r
    ww: Any  # |w_r|^2
    gg: Any  # |g_r|^2
    wu: Any  # w_r . u_r  (None when only the test is needed)


class ViewDecision(NamedTuple):
    """Outcome of the scale-invariance test; all fields are arrays (no sync)."""

    channel: Any  # 0-d bool: channel view projected
    layer: Any  # 0-d bool: layer view projected (channel view was not)
    cos_channel: Any  # 0-d: max over rows of |cos(g_r, w_r)|
    cos_layer: Any  # 0-d: |cos(g, w)| of the whole tensor
    threshold_channel: float  # delta / sqrt(row length)
    threshold_layer: float  # delta / sqrt(size)


def _rows(xp: Any, x: Any) -> Any:
    return xp.reshape(x, (x.shape[0], -1))


def row_stats(xp: Any, w: Any, g: Any, u: Any | None = None) -> RowStats:
    """One set of reductions over the rows of the channel view of ``w``, ``g`` (and ``u``)."""
    wr, gr = _rows(xp, w), _rows(xp, g)
    wu = None if u is None else xp.vecdot(wr, _rows(xp, u))
    return RowStats(xp.vecdot(wr, gr), xp.vecdot(wr, wr), xp.vecdot(gr, gr), wu)


def _cosine(xp: Any, wg: Any, ww: Any, gg: Any, eps: Any) -> Any:
    # torch's cosine_similarity clamps each norm at eps separately.
    return xp.abs(wg) / (xp.maximum(xp.sqrt(ww), eps) * xp.maximum(xp.sqrt(gg), eps))


def decide_view(xp: Any, w: Any, stats: RowStats, delta: Any, eps: Any) -> ViewDecision:
    """The scale-invariance test of ``adamp==0.3.0`` on both views, from channel-view ``stats``.

    ``w`` must have ``ndim > 1`` and ``size > 0``; only its shape is read.
    """
    size = math.prod(w.shape)
    rows = w.shape[0]
    thr_c = delta / math.sqrt(size // rows)
    thr_l = delta / math.sqrt(size)
    cos_c = xp.max(_cosine(xp, stats.wg, stats.ww, stats.gg, eps))
    cos_l = _cosine(xp, xp.sum(stats.wg), xp.sum(stats.ww), xp.sum(stats.gg), eps)
    channel = cos_c < thr_c
    layer = xp.logical_and(xp.logical_not(channel), cos_l < thr_l)
    return ViewDecision(channel, layer, cos_c, cos_l, thr_c, thr_l)


def project_update(xp: Any, w: Any, g: Any, u: Any, delta: Any, eps: Any) -> tuple[Any, Any, ViewDecision | None]:
    """Return ``(Pi(u), projected, decision)`` for a weight ``w`` with ``ndim > 1``.

    ``Pi(u) = u - w_n * sum_row(w_n * u)`` with ``w_n = w / (|w_row| + eps)`` on the view chosen
    by :func:`decide_view`, and ``u`` itself when neither view is scale-invariant. ``projected`` is a
    0-d boolean array. Arrays of size 0 are returned unchanged (the official code fails on them).
    """
    dev = device(w)
    if math.prod(w.shape) == 0:
        return u, xp.asarray(False, device=dev), None
    eps_a = xp.asarray(eps, dtype=w.dtype, device=dev)
    stats = row_stats(xp, w, g, u)
    dec = decide_view(xp, w, stats, delta, eps_a)
    # sum_row(w_n * u) * w_n = w * (w.u) / (|w| + eps)^2, per row (channel) or for the whole tensor (layer).
    n_c = xp.sqrt(stats.ww) + eps_a
    n_l = xp.sqrt(xp.sum(stats.ww)) + eps_a
    coef_c = stats.wu / n_c / n_c
    coef_l = xp.sum(stats.wu) / n_l / n_l
    zero = xp.zeros((), dtype=w.dtype, device=dev)
    coef = xp.where(dec.channel, coef_c, xp.where(dec.layer, coef_l, zero))
    coef = xp.reshape(coef, (w.shape[0],) + (1,) * (w.ndim - 1))
    projected = xp.logical_or(dec.channel, dec.layer)
    # Where nothing is projected coef is 0 and u - w * 0 == u exactly for finite w.
    return u - w * coef, projected, dec


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
    one = xp.asarray(VIEW_CHANNEL, dtype=xp.int32, device=dev)
    two = xp.asarray(VIEW_LAYER, dtype=xp.int32, device=dev)
    zero = xp.asarray(VIEW_NONE, dtype=xp.int32, device=dev)
    return xp.where(dec.channel, one, xp.where(dec.layer, two, zero))
