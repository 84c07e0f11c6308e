r"""The multi-tensor step for torch tensors in a constant number of operators per group (Heo et al., ICLR 2021,
Algorithms 1 and 2; the maths of :mod:`adamp_core.adamp`, :mod:`adamp_core.sgdp` and
:mod:`adamp_core.projection`, unchanged).

:mod:`adamp_core.paths.multi_tensor` concatenates a group's tensors into a padded ``(R, L)`` array at every
step with a few operators per tensor. Where the array API lacks what torch needs for that to be cheap (a
copy of many tensors into one buffer, reductions over rows of different lengths), this module uses torch's
own operators, as array-api-extra delegates to a library's native function:

- the group's tensors (one dtype, device, state dtypes and kind of step count; all projected or none) are
  laid out back to back, unpadded, in one flat buffer per array (param, grad, each state array) owned by
  the plan, with a view of it shaped like each tensor built once; a step copies them in with one
  ``torch._foreach_copy_`` and writes params and state back with another (in place: ``written``);
- a tensor owns ``C_i`` consecutive rows of ``L_i`` entries (its channel view); per-row sums, maxima and
  minima are ``torch.segment_reduce`` over element offsets, per-tensor ones (the layer view, the max row
  cosine, the min row scale) ``segment_reduce`` over row offsets, and a per-row (per-tensor) value reaches
  its entries (rows) through an index built once (``index_select``);
- the step counts are stacked once (``(K,)``), the bias corrections computed as vectors, and array counts
  advanced in place with one ``torch._foreach_add_``.

So a step is a fixed number of operators per group (about 60 for AdamP, 100 with the projection), whatever
the number of tensors; no value is read on the host (Python-int counts with ``skip_nonfinite`` read the
flags once per group, as the per-tensor step reads them). Every formula is the per-tensor step's, in the
same order: the per-row power-of-two scaling of :mod:`adamp_core.projection` (sums stay exact at extreme
magnitudes), torch's cosine clamping of each norm at ``eps``, the channel then layer view, weight decay before
the step with ``wd_ratio`` when projected, nesterov, SGDP's dampening and projected buffer, ``caution`` and
``skip_nonfinite``; results agree with it up to the order of the sums (tested).

Memory: the plan holds ``2 + len(state)`` flat buffers of the group's size in the compute dtype (param,
grad, state) and an int32 index per entry; a step allocates about four more flat temporaries.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from .._common import bias_correction, is_python_int
from ..caution import CAUTION_MIN_FRACTION
from ..rows import channel_shape
from . import MULTI_TENSOR, Outcome, written

__all__ = ["MAX_ELEMENTS", "TorchGroup", "group_tensors"]

# Elements per group: bounds the plan's flat buffers and a step's temporaries (a larger tensor is stepped
# alone); on a GPU, 16M elements are large enough that a group's launches no longer matter.
MAX_ELEMENTS = 1 << 24


def group_tensors(keys: Sequence[Any], shapes: Sequence[tuple[int, ...]], *, on_host: bool,
                  host_max_elements: int, max_elements: int = MAX_ELEMENTS) -> list[list[int]]:
    """Indices of the tensors to step together, in order of first appearance: equal ``keys[i]`` and both
    projected (``ndim > 1``) or both not, up to ``max_elements`` elements per group. Empty tensors, tensors
    above ``max_elements`` and, on a host, above ``host_max_elements``, get groups of one."""
    largest = min(max_elements, host_max_elements) if on_host else max_elements
    open_: dict[Any, list[int]] = {}
    filled: dict[Any, int] = {}
    order: list[list[int]] = []
    for i, (key, shape) in enumerate(zip(keys, shapes, strict=True)):
        size = math.prod(shape)
        if size == 0 or size > largest:
            order.append([i])
            continue
        k = (key, len(shape) > 1)
        if k in open_ and filled[k] + size <= max_elements:
            open_[k].append(i)
            filled[k] += size
        else:
            open_[k] = [i]
            filled[k] = size
            order.append(open_[k])
    return order


def _cdt(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype: float32 for 16-bit floats, else the param's (:func:`adamp_core.arrays.compute_dtype`)."""
    return torch.float32 if torch.finfo(dtype).bits == 16 else dtype


def _sc(value: Any, cdt: torch.dtype) -> Any:
    """A hyperparameter as the maths uses it (:func:`adamp_core._common.scalar`): Python numbers stay, arrays
    are cast to the compute dtype."""
    return value if isinstance(value, numbers.Real) else value.to(cdt)


def _offsets(sizes: Sequence[int], dev: torch.device) -> torch.Tensor:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return torch.tensor(out, dtype=torch.int64, device=dev)


class TorchGroup:
    """The plan of one group: flat buffers and their per-tensor views, segment offsets and indices.

    ``buf`` is ``(2 + len(state), N)`` in the compute dtype: row 0 the params, row 1 the grads, then the
    state arrays, each tensor ``i`` at ``[off_i, off_i + size_i)`` in its logical (row-major) order; its
    channel view's rows are ``C_i`` consecutive segments of ``L_i`` entries."""

    native = True  # what multi_tensor.run tells apart from its generic layouts

    def __init__(self, spec: Any, xp: Any, tensors: Sequence[Any], projected: bool) -> None:
        params = [t.param for t in tensors]
        self.spec, self.xp, self.projected = spec, xp, projected
        dev = params[0].device
        self.dev, self.dtype, self.cdt = dev, params[0].dtype, _cdt(params[0].dtype)
        self.shapes = [tuple(p.shape) for p in params]
        layouts = [channel_shape(s) for s in self.shapes]
        self.counts = [c for c, _ in layouts]
        self.lengths = [n for _, n in layouts]
        sizes = [c * n for c, n in layouts]
        self.k, self.r, self.n = len(params), sum(self.counts), sum(sizes)
        self.fields = spec.buffers
        self.buf = torch.empty((2 + len(self.fields), self.n), dtype=self.cdt, device=dev)
        views = []
        for row in range(self.buf.shape[0]):
            start, vs = 0, []
            for shape, size in zip(self.shapes, sizes, strict=True):
                vs.append(self.buf[row, start: start + size].view(shape))
                start += size
            views.append(vs)
        self.views = views
        self.params = params
        self.state_arrays = [[getattr(t.state, f) for t in tensors] for f in self.fields]
        # what one _foreach_copy_ reads in (grads apart: new objects every step) and writes back
        self.in_dst = views[0] + [v for vs in views[2:] for v in vs]
        self.in_src = params + [a for arrs in self.state_arrays for a in arrs]
        self.out_dst = self.in_src
        self.out_src = self.in_dst
        self.grad_dst = views[1]
        self.python_steps = spec.has_step and is_python_int(tensors[0].state.step)
        self.steps = [t.state.step for t in tensors] if spec.has_step and not self.python_steps else None
        rows_per_entry = [n for c, n in layouts for _ in range(c)]
        self.row_offsets = _offsets(rows_per_entry, dev)  # entries -> rows
        self.tensor_offsets = _offsets(self.counts, dev)  # rows -> tensors
        self.entry_row = torch.repeat_interleave(torch.arange(self.r, dtype=torch.int32, device=dev),
                                                 torch.tensor(rows_per_entry, device=dev), output_size=self.n)
        self.row_tensor = torch.repeat_interleave(torch.arange(self.k, dtype=torch.int32, device=dev),
                                                  torch.tensor(self.counts, device=dev), output_size=self.r)
        self.sizes = torch.tensor([float(s) for s in sizes], dtype=self.cdt, device=dev)
        self._thresholds: dict[Any, tuple[Any, Any]] = {}
        self._consts: dict[Any, torch.Tensor] = {}

    # -- segment layout ------------------------------------------------------------------------------
    def row_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row sums ``(R, ...)`` of per-entry values ``(N, ...)``."""
        return torch.segment_reduce(x, "sum", offsets=self.row_offsets, unsafe=True)

    def tensor_reduce(self, x: torch.Tensor, how: str) -> torch.Tensor:
        """Per-tensor ``how`` (sum, max, min) ``(K, ...)`` of per-row values ``(R, ...)``."""
        return torch.segment_reduce(x, how, offsets=self.tensor_offsets, unsafe=True)

    def per_entry(self, x: Any) -> Any:
        """A per-row ``(R,)`` value on each of the row's entries ``(N,)`` (a scalar as it is)."""
        return x if getattr(x, "ndim", 0) == 0 else torch.index_select(x, 0, self.entry_row)

    def per_row(self, x: Any) -> Any:
        """A per-tensor ``(K,)`` value on each of the tensor's rows ``(R,)`` (a scalar as it is)."""
        return x if getattr(x, "ndim", 0) == 0 else torch.index_select(x, 0, self.row_tensor)

    def thresholds(self, delta: Any) -> tuple[Any, Any]:
        r"""Per tensor :math:`\delta/\sqrt{L_i}` and :math:`\delta/\sqrt{C_i L_i}` ``(K,)``, rounded as the
        lone step rounds them (Python-float maths, then the dtype); kept per value of a Python ``delta``."""
        roots_c = [math.sqrt(n) for n in self.lengths]
        roots_l = [math.sqrt(c * n) for c, n in zip(self.counts, self.lengths, strict=True)]
        if not isinstance(delta, numbers.Real):
            roots = self._thresholds.get("roots")
            if roots is None:
                roots = self._thresholds["roots"] = (torch.tensor(roots_c, dtype=self.cdt, device=self.dev),
                                                     torch.tensor(roots_l, dtype=self.cdt, device=self.dev))
            d = delta.to(self.cdt)
            return d / roots[0], d / roots[1]
        hit = self._thresholds.get(delta)
        if hit is None:
            hit = (torch.tensor([delta / r for r in roots_c], dtype=self.cdt, device=self.dev),
                   torch.tensor([delta / r for r in roots_l], dtype=self.cdt, device=self.dev))
            self._thresholds = {k: x for k, x in self._thresholds.items() if k == "roots"}
            self._thresholds[delta] = hit
        return hit

    def const(self, value: Any) -> torch.Tensor:
        """A 0-d tensor of ``value`` in the compute dtype on the group's device (a Python number: made once)."""
        if not isinstance(value, numbers.Real):
            return value.to(self.cdt)
        hit = self._consts.get(value)
        if hit is None:
            if len(self._consts) > 8:  # a schedule of Python values: keep only the latest
                self._consts.clear()
            hit = self._consts[value] = torch.full((), value, dtype=self.cdt, device=self.dev)
        return hit

    # -- one step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, tensors: Sequence[Any], grads: Sequence[Any], hp: Any, skip: bool) -> list[Outcome]:
        """One step of every tensor of the group, written in place (no autograd record of the writes); the
        outcomes in the group's order."""
        torch._foreach_copy_(self.in_dst + self.grad_dst, self.in_src + list(grads))
        w, g = self.buf[0], self.buf[1]
        ok = ok_e = None
        if skip:  # per tensor: every grad entry finite (rows, then tensors); nothing else reads the flags
            fin = self.tensor_reduce(self.row_sum(torch.isfinite(g).to(self.cdt)), "sum")
            ok = fin == self.sizes
            ok_e = self.per_entry(self.per_row(ok))
        counts = None
        if self.spec.has_step:
            if self.python_steps:
                counts = [t.state.step for t in tensors]
            new_w = self._adamp(w, g, hp, ok_e, counts)
        else:
            new_w = self._sgdp(w, g, hp, ok_e)
        if ok_e is not None:
            new_w = torch.where(ok_e, new_w, w)
        w.copy_(new_w)
        torch._foreach_copy_(self.out_dst, self.out_src)
        return self._outcomes(tensors, ok, counts)

    def _outcomes(self, tensors: Sequence[Any], ok: Any, counts: list[int] | None) -> list[Outcome]:
        if counts is not None:  # Python-int counts: advanced in the returned states (a skip read on the host)
            adv = [1] * self.k if ok is None else [int(x) for x in ok.tolist()]
            return [Outcome(MULTI_TENSOR, None, t.state._replace(step=s + a), None if ok is None else o)
                    for t, s, a, o in zip(tensors, counts, adv, ok.unbind() if ok is not None else [None] * self.k,
                                          strict=True)]
        if self.steps is not None:
            if ok is None:
                torch._foreach_add_(self.steps, 1)
            else:
                torch._foreach_add_(self.steps, ok.to(self.steps[0].dtype).unbind())
        if ok is None:
            return [written(MULTI_TENSOR)] * self.k
        skips = torch.logical_not(ok).to(torch.int64)
        return [Outcome(MULTI_TENSOR, None, None, o, s) for o, s in zip(ok.unbind(), skips.unbind(), strict=True)]

    def _bias(self, hp: Any, counts: list[int] | None) -> tuple[Any, Any]:
        """``(step_size, sqrt(1 - beta2^t))``: per tensor ``(K,)``, or one value for every tensor (Python-int
        counts all equal), computed as :func:`adamp_core.adamp.adamp_update` computes them."""
        xp, cdt = self.xp, self.cdt
        lr = _sc(hp.lr, cdt)
        beta1, beta2 = (_sc(b, cdt) for b in hp.betas)
        if counts is None:  # array counts: the new counts as a vector
            t = torch.stack(self.steps).to(self.dev) + 1
            bc1, bc2 = bias_correction(xp, beta1, t, cdt), bias_correction(xp, beta2, t, cdt)
            return lr / bc1, torch.sqrt(bc2)
        values = {}
        for s in dict.fromkeys(counts):
            bc1, bc2 = bias_correction(xp, beta1, s + 1, cdt), bias_correction(xp, beta2, s + 1, cdt)
            values[s] = (lr / bc1, math.sqrt(bc2) if isinstance(bc2, float) else torch.sqrt(bc2))
        if len(values) == 1:
            return next(iter(values.values()))
        pairs = [values[s] for s in counts]
        return tuple(torch.stack([torch.as_tensor(p[j], dtype=cdt, device=self.dev) for p in pairs])
                     for j in range(2))

    def _adamp(self, w: torch.Tensor, g: torch.Tensor, hp: Any, ok_e: Any, counts: list[int] | None) -> torch.Tensor:
        cdt = self.cdt
        m, v = self.buf[2], self.buf[3]
        eps = _sc(hp.eps, cdt)
        beta1, beta2 = (_sc(b, cdt) for b in hp.betas)
        step_size, sqrt_bc2 = self._bias(hp, counts)
        if ok_e is None:  # in the plan's buffers
            m.mul_(beta1).add_((1 - beta1) * g)  # Alg. 2 line 2
            v.mul_(beta2).add_((1 - beta2) * g * g)  # Alg. 2 line 3
        else:  # a skipped tensor keeps its moments
            m.copy_(torch.where(ok_e, beta1 * m + (1 - beta1) * g, m))
            v.copy_(torch.where(ok_e, beta2 * v + (1 - beta2) * g * g, v))
        # Alg. 2 line 4, bias-corrected as adamp 0.3.0 (per tensor: its own count)
        denom = torch.sqrt(v) / self.per_entry(self.per_row(sqrt_bc2)) + eps
        u = (beta1 * m + (1 - beta1) * g) / denom if hp.nesterov else m / denom
        del denom
        u, ratio = self._project(w, g, u, hp)
        if not (isinstance(hp.weight_decay, float) and hp.weight_decay == 0.0):
            decay = 1 - _sc(hp.lr, cdt) * _sc(hp.weight_decay, cdt) * ratio  # decoupled, before the step
            w = w * self.per_entry(self.per_row(decay))
        return w + self.per_entry(self.per_row(-step_size)) * u

    def _sgdp(self, w: torch.Tensor, g: torch.Tensor, hp: Any, ok_e: Any) -> torch.Tensor:
        cdt = self.cdt
        buf = self.buf[2]
        lr, mu = _sc(hp.lr, cdt), _sc(hp.momentum, cdt)
        # Alg. 1 line 2 (torch SGD form); without dampening 1 * g == g exactly
        damped = g if isinstance(hp.dampening, float) and hp.dampening == 0.0 else (1 - _sc(hp.dampening, cdt)) * g
        new_b = mu * buf + damped
        d_p = g + mu * new_b if hp.nesterov else new_b
        store = new_b
        if self.projected:
            q, d_p, ratio = self._project_parts(w, g, d_p, hp)
            if not hp.nesterov and hp.project_buffer:
                store = q  # adamp 0.3.0 projects the buffer itself (unmasked)
        else:
            d_p, ratio = self._caution_plain(d_p, g, hp), 1.0
        if ok_e is not None:
            store = torch.where(ok_e, store, buf)
        buf.copy_(store)
        del store, new_b
        if not (isinstance(hp.weight_decay, float) and hp.weight_decay == 0.0):
            # decoupled decay scaled by 1 / (1 - momentum), before the step (official sgdp.py)
            decay = 1 - lr * _sc(hp.weight_decay, cdt) * ratio / (1 - mu)
            w = w * self.per_entry(self.per_row(decay))
        return w + (-lr) * d_p

    # -- the projection (adamp_core.projection, per tensor through the segments) ----------------------------
    def _project(self, w: torch.Tensor, g: torch.Tensor, u: torch.Tensor, hp: Any) -> tuple[torch.Tensor, Any]:
        if not self.projected:
            return self._caution_plain(u, g, hp), 1.0
        _, u, ratio = self._project_parts(w, g, u, hp)
        return u, ratio

    def _caution_plain(self, u: torch.Tensor, g: torch.Tensor, hp: Any) -> torch.Tensor:
        """A param the projection does not handle: masked against ``g`` (:func:`adamp_core.caution.cautious`)."""
        if not hp.caution:
            return u
        return u * self._caution_factor(u, g)

    def _caution_factor(self, q: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """:func:`adamp_core.caution.caution_factor` per tensor: ``[q ref > 0] / max(mean, 1e-3)``."""
        agree = q * ref > 0
        mean = self.tensor_reduce(self.row_sum(agree.to(q.dtype)), "sum") / self.sizes
        scale = self.per_entry(self.per_row(1.0 / torch.clamp(mean, min=CAUTION_MIN_FRACTION)))
        return torch.where(agree, scale, torch.zeros_like(scale))

    def _pow2(self, x: torch.Tensor) -> torch.Tensor:
        """Per row ``2**-floor(log2(max|x_r|))`` in the normal range (:func:`adamp_core.projection._pow2_scale`)."""
        tiny = float(torch.finfo(x.dtype).smallest_normal)
        m = torch.maximum(torch.segment_reduce(x, "max", offsets=self.row_offsets, unsafe=True),
                          -torch.segment_reduce(x, "min", offsets=self.row_offsets, unsafe=True))
        m = torch.where(m >= tiny, m, 1.0)
        m = torch.where(m <= 1.0 / tiny, m, 1.0 / tiny)
        return 0.5 ** torch.floor(torch.log2(m))

    def _project_parts(self, w: torch.Tensor, g: torch.Tensor, u: torch.Tensor, hp: Any
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Pi(u), update, wd ratio (K,))`` as :func:`adamp_core.projection.project_update_parts` gives them
        tensor by tensor: the scale-invariance test on the channel view, then the layer view."""
        cdt = self.cdt
        eps = _sc(hp.eps, cdt)
        sw, sg = self._pow2(w), self._pow2(g)  # per-row powers of two: exact scaling, no overflow
        ws = w * self.per_entry(sw)
        gs = g * self.per_entry(sg)
        # per-row statistics of the channel view (one product at a time: one flat temporary)
        wg, ww, gg, wu = (self.row_sum(a * b) for a, b in ((ws, gs), (ws, ws), (gs, gs), (ws, u)))
        del gs
        # layer view: the rows rescaled to the tensor's smallest scale (rho, sig: exact powers of two <= 1)
        mins = self.tensor_reduce(torch.stack([sw, sg], 1), "min")
        s_l, t_l = mins[:, 0], mins[:, 1]
        rho, sig = self.per_row(s_l) / sw, self.per_row(t_l) / sg
        lay = self.tensor_reduce(torch.stack([ww * (rho * rho), wg * (rho * sig), gg * (sig * sig)], 1), "sum")
        ww_l, wg_l, gg_l = lay.unbind(1)
        thr_c, thr_l = self.thresholds(hp.delta)
        # torch's cosine_similarity clamps each norm at eps (times the row's scale) separately
        cos_c = torch.abs(wg) / (torch.maximum(torch.sqrt(ww), eps * sw) * torch.maximum(torch.sqrt(gg), eps * sg))
        cos_l = torch.abs(wg_l) / (torch.maximum(torch.sqrt(ww_l), eps * s_l) * torch.maximum(torch.sqrt(gg_l),
                                                                                              eps * t_l))
        channel = self.tensor_reduce(cos_c, "max") < thr_c
        layer = torch.logical_and(torch.logical_not(channel), cos_l < thr_l)
        channel_r, layer_r = self.per_row(channel), self.per_row(layer)
        n_c = torch.sqrt(ww) + eps * sw
        n_l = self.per_row(torch.sqrt(ww_l) + eps * s_l)
        zero = self.const(0.0)

        def radial(wx: torch.Tensor) -> torch.Tensor:
            """The radial part on the chosen view, from the per-row ``~w_r . x_r``."""
            wx_l = self.per_row(self.tensor_reduce(wx * rho, "sum"))
            coef_l = rho * (wx_l / n_l / n_l)
            coef = torch.where(channel_r, wx / n_c / n_c, torch.where(layer_r, coef_l, zero))
            return ws * self.per_entry(coef)

        q = u - radial(wu)
        projected = torch.logical_or(channel, layer)
        ratio = torch.where(projected, self.const(hp.wd_ratio), self.const(1.0))
        if not hp.caution:
            return q, q, ratio
        # ~w_r . g_r = (~w_r . ~g_r) / t_r exactly: Pi(g) without another pass over g
        ref = g - radial(wg / sg)
        masked = q * self._caution_factor(q, ref)
        del ref
        # projected again (timm): the mask breaks the orthogonality to w
        return q, masked - radial(self.row_sum(ws * masked)), ratio
