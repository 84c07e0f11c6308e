r"""What the paper measures, per parameter and per step: weight norm, effective step size, and the
scale-invariance test (Heo et al., ICLR 2021, Sec. 2 and 3.2).

For a weight :math:`w_t` updated to :math:`w_{t+1}` the *effective step size* is the distance the
direction moved,

.. math::

    \lVert\Delta\hat w_{t+1}\rVert = \Big\lVert \frac{w_{t+1}}{\lVert w_{t+1}\rVert}
        - \frac{w_t}{\lVert w_t\rVert} \Big\rVert \approx \frac{\lVert\Delta w_t\rVert}{\lVert w_t\rVert},

so a growing :math:`\lVert w\rVert` shrinks it (Lemma 2.1 for GD, far faster with momentum by Lemma 2.2).
:func:`scale_invariance` reports the statistics of the test that decides whether AdamP/SGDP project
(the largest row :math:`\lvert\cos(g_r, w_r)\rvert` of the channel view, the layer's
:math:`\lvert\cos(g, w)\rvert`, their thresholds :math:`\delta/\sqrt{\text{row length}}`) and the view
chosen; it calls the very functions the steps use (:mod:`adamp_core.projection`), so it reports what
the step did, not a re-derivation.

Every function is pure and sync-free like the steps: results are 0-d arrays of the param's library
and device (thresholds, which depend on the shape only, are Python floats), so recording them costs
no device-to-host copy and works under ``jax.jit``. :func:`to_host` converts a record to Python
floats (that one syncs; call it outside the hot loop). Half-precision inputs are measured in float32.

Typical use inside an optimizer, with ``new_p`` the result of ``adamp_step``/``sgdp_step`` and
``p`` still holding :math:`w_t`::

    d = step_diagnostics(p, new_p, grad, delta=delta, eps=eps)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from array_api_compat import device

from .arrays import check_array, check_grad, compute_dtype
from .hyperparams import check_sgdp
from .projection import VIEW_CHANNEL, VIEW_LAYER, VIEW_NONE, decide_view, row_stats

__all__ = [
    "ScaleInvariance",
    "StepDiagnostics",
    "effective_step_size",
    "scale_invariance",
    "step_diagnostics",
    "to_host",
    "weight_norm",
]


class ScaleInvariance(NamedTuple):
    """The scale-invariance test of AdamP/SGDP for one param and grad (see :func:`scale_invariance`)."""

    cos_channel: Any  # 0-d: max over rows r of |cos(g_r, w_r)|, channel view (shape[0], -1); NaN if not tested
    cos_layer: Any  # 0-d: |cos(g, w)| of the whole tensor (layer view); NaN if not tested
    threshold_channel: float  # delta / sqrt(row length); NaN if not tested
    threshold_layer: float  # delta / sqrt(size); NaN if not tested
    view: Any  # 0-d int32: VIEW_NONE (0), VIEW_CHANNEL (1) or VIEW_LAYER (2), as adamp_core.projected_view


class StepDiagnostics(NamedTuple):
    """Everything :func:`step_diagnostics` measures for one param and one step."""

    weight_norm: Any  # 0-d: |w_t|
    new_weight_norm: Any  # 0-d: |w_{t+1}|
    effective_step: Any  # 0-d: |w_{t+1}/|w_{t+1}| - w_t/|w_t||
    cos_channel: Any
    cos_layer: Any
    threshold_channel: float
    threshold_layer: float
    view: Any


def _flat(xp: Any, x: Any, dtype: Any) -> Any:
    return xp.reshape(xp.astype(x, dtype, copy=False), (-1,))


def _norm(xp: Any, x: Any) -> Any:
    return xp.sqrt(xp.vecdot(x, x))


def _check_delta_eps(delta: Any, eps: Any) -> None:
    # Same checks and messages as the steps ("Invalid delta value: -1.0").
    check_sgdp(0.0, eps=eps, delta=delta)


def weight_norm(param: Any) -> Any:
    r""":math:`\lVert w\rVert_2` over the whole tensor, a 0-d array (float32 for 16-bit params)."""
    xp = check_array(param)
    return _norm(xp, _flat(xp, param, compute_dtype(xp, param.dtype)))


def _effective_step(xp: Any, w: Any, w1: Any) -> tuple[Any, Any, Any]:
    """``(|w|, |w1|, |w1/|w1| - w/|w||)`` for flat arrays ``w``, ``w1`` of the compute dtype."""
    dev = device(w)
    d = w1 - w  # exact where w1_i, w_i are within a factor 2 of each other (Sterbenz), else to rounding
    n, n1 = _norm(xp, w), _norm(xp, w1)
    ok = xp.logical_and(n > 0, n1 > 0)
    one = xp.ones((), dtype=w.dtype, device=dev)
    ns, n1s = xp.where(ok, n, one), xp.where(ok, n1, one)
    # w1/|w1| - w/|w| = d/|w1| - w (|w1| - |w|)/(|w| |w1|), and |w1| - |w| = (2 w.d + d.d)/(|w| + |w1|):
    # no difference of two nearly equal unit vectors, so small steps keep their relative accuracy
    # (the naive formula loses everything below ~1e-4 in float32).
    coef = (2 * xp.vecdot(w, d) + xp.vecdot(d, d)) / (ns * n1s * (ns + n1s))
    step = _norm(xp, d / n1s - w * coef)
    nan = xp.full((), math.nan, dtype=w.dtype, device=dev)
    return n, n1, xp.where(ok, step, nan)


def effective_step_size(param: Any, new_param: Any) -> Any:
    r"""The paper's effective step size :math:`\lVert w_{t+1}/\lVert w_{t+1}\rVert - w_t/\lVert w_t\rVert\rVert`
    of the whole tensor, a 0-d array; NaN when either norm is 0 (the direction is undefined).

    ``param`` is :math:`w_t`, ``new_param`` is :math:`w_{t+1}`; both must have the same shape,
    library and device. Accurate to rounding of the result even for tiny steps.
    """
    xp = check_array(param)
    check_grad(param, new_param, "new_param")
    cdt = compute_dtype(xp, param.dtype)
    return _effective_step(xp, _flat(xp, param, cdt), _flat(xp, new_param, cdt))[2]


def _scale_invariance(xp: Any, w: Any, g: Any, delta: Any, eps: Any) -> ScaleInvariance:
    dev = device(w)
    if w.ndim <= 1 or math.prod(w.shape) == 0:
        # Never tested: the steps take the plain Adam/SGD update for these params.
        nan = xp.full((), math.nan, dtype=w.dtype, device=dev)
        return ScaleInvariance(nan, nan, math.nan, math.nan, xp.asarray(VIEW_NONE, dtype=xp.int32, device=dev))
    dec = decide_view(xp, w, row_stats(xp, w, g), delta, xp.asarray(eps, dtype=w.dtype, device=dev))
    one = xp.asarray(VIEW_CHANNEL, dtype=xp.int32, device=dev)
    two = xp.asarray(VIEW_LAYER, dtype=xp.int32, device=dev)
    zero = xp.asarray(VIEW_NONE, dtype=xp.int32, device=dev)
    view = xp.where(dec.channel, one, xp.where(dec.layer, two, zero))
    return ScaleInvariance(dec.cos_channel, dec.cos_layer, dec.threshold_channel, dec.threshold_layer, view)


def scale_invariance(param: Any, grad: Any, delta: Any = 0.1, eps: Any = 1e-8) -> ScaleInvariance:
    r"""The statistics of the scale-invariance test that :func:`adamp_core.adamp_step` and
    :func:`adamp_core.sgdp_step` run on ``param`` with ``grad`` (same ``delta``, ``eps``):

    .. math::

        c_{\text{channel}} = \max_r \lvert\cos(g_r, w_r)\rvert \text{ on } (\text{shape}[0], -1),\quad
        c_{\text{layer}} = \lvert\cos(g, w)\rvert,\quad
        \cos(a, b) = \frac{a\cdot b}{\max(\lVert a\rVert,\epsilon)\max(\lVert b\rVert,\epsilon)}

    with thresholds :math:`\delta/\sqrt{\text{row length}}` and :math:`\delta/\sqrt{\text{size}}`; the
    channel view is projected if :math:`c_{\text{channel}}` is below its threshold, else the layer view
    if :math:`c_{\text{layer}}` is, else none (``view`` equals :func:`adamp_core.projected_view`).
    Params with ``ndim <= 1`` (and empty ones) are never tested: cosines and thresholds are NaN and
    ``view`` is ``VIEW_NONE``.
    """
    _check_delta_eps(delta, eps)
    xp = check_array(param)
    check_grad(param, grad)
    cdt = compute_dtype(xp, param.dtype)
    w, g = xp.astype(param, cdt, copy=False), xp.astype(grad, cdt, copy=False)
    return _scale_invariance(xp, w, g, delta, eps)


def step_diagnostics(param: Any, new_param: Any, grad: Any, delta: Any = 0.1, eps: Any = 1e-8) -> StepDiagnostics:
    r"""Weight norms before and after, effective step size and the scale-invariance test of one step
    :math:`w_t \to w_{t+1}` taken with gradient ``grad`` (see :func:`effective_step_size` and
    :func:`scale_invariance`). Sync-free; all checks run before anything is computed."""
    _check_delta_eps(delta, eps)
    xp = check_array(param)
    check_grad(param, new_param, "new_param")
    check_grad(param, grad)
    cdt = compute_dtype(xp, param.dtype)
    w, w1 = xp.astype(param, cdt, copy=False), xp.astype(new_param, cdt, copy=False)
    n, n1, step = _effective_step(xp, xp.reshape(w, (-1,)), xp.reshape(w1, (-1,)))
    si = _scale_invariance(xp, w, xp.astype(grad, cdt, copy=False), delta, eps)
    return StepDiagnostics(n, n1, step, *si)


def to_host(record: ScaleInvariance | StepDiagnostics) -> dict[str, float | int]:
    """A diagnostics record as a dict of Python numbers (``view`` an int). This copies every value
    to the host (a sync per value): call it when you read the numbers, not inside the step."""
    out: dict[str, float | int] = {}
    for name, value in record._asdict().items():
        out[name] = int(value) if name == "view" else float(value)
    return out
