r"""The multi-tensor step for torch tensors in a constant number of operators per group (Heo et al., ICLR 2021,
Algorithms 1 and 2; the maths of :mod:`adamp_core.adamp`, :mod:`adamp_core.sgdp` and
:mod:`adamp_core.projection`, unchanged).

:mod:`adamp_core.paths.multi_tensor` concatenates a group's tensors into a padded ``(R, L)`` array at every
step with a few operators per tensor. Where the array API lacks what torch needs for that to be cheap (a
copy of many tensors into one buffer, reductions over rows of different lengths), this module uses torch's
own operators, as array-api-extra delegates to a library's native function:

- the group's tensors (one dtype, device, state dtypes and kind of step count; all projected or none) are
  laid out back to back, unpadded: the grads are copied with one ``torch._foreach_copy_`` into a flat buffer
  the plan owns (views of it shaped like each tensor, built once); params and state arrays are read with one
  ``torch.cat`` of their flat views (built once) and written back in place with one
  ``torch.split_with_sizes_copy`` each (``written``). (A group with a non-contiguous param or state array
  keeps a flat buffer for each array instead, read and written with one ``_foreach_copy_``.)
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

Memory (measured, float32, ResNet-50 shapes): between steps the plan holds the grads' flat buffer and an
int32 row index per entry (2x the params); a step allocates at most 3 flat temporaries more (params, one
state array or the update, one product or broadcast; 4.3 with ``caution``), each freed as soon as it is
written back.
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
    """The plan of one group: its flat layout, segment offsets and indices, the grads' buffer.

    Every flat array holds tensor ``i`` at ``[off_i, off_i + size_i)`` in its logical (row-major) order; its
    channel view's rows are ``C_i`` consecutive segments of ``L_i`` entries. ``buf`` (compute dtype) is
    ``(1, N)``, the grads, when every param and state array is contiguous (``lean``: they are read with
    ``torch.cat`` of flat views and written with ``split_with_sizes_copy``), else ``(2 + len(state), N)``:
    row 0 the params, row 1 the grads, then the state arrays."""

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
        self.params = params
        self.state_arrays = [[getattr(t.state, f) for t in tensors] for f in self.fields]
        arrays = [params, *self.state_arrays]
        # Contiguous params and state (the usual case): the plan holds only the grads' buffer; a step reads
        # params and state with one torch.cat of their flat views each, and writes them back with one
        # split_with_sizes_copy. Otherwise it holds a buffer for each (row 0 params, 1 grads, then the state).
        self.lean = all(x.is_contiguous() for arrs in arrays for x in arrs)
        self.sizes_list = sizes
        self.flat = [[x.view(-1) for x in arrs] for arrs in arrays] if self.lean else None
        self.buf = torch.empty((1 if self.lean else 2 + len(self.fields), self.n), dtype=self.cdt, device=dev)
        views = []
        for row in range(self.buf.shape[0]):
            start, vs = 0, []
            for shape, size in zip(self.shapes, sizes, strict=True):
                vs.append(self.buf[row, start: start + size].view(shape))
                start += size
            views.append(vs)
        self.views = views
        if self.lean:
            self.grad_dst, self.in_dst, self.in_src = views[0], [], []
        else:  # what one _foreach_copy_ reads in (grads apart: new objects every step) and writes back
            self.in_dst = views[0] + [v for vs in views[2:] for v in vs]
            self.in_src = params + [a for arrs in self.state_arrays for a in arrs]
            self.grad_dst = views[1]
        self.all_dst = self.in_dst + self.grad_dst
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

    def load(self, j: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Array ``j`` (0: the params, 1...: the state arrays) of every tensor, flat, in the compute dtype: a new
        array (lean plans: one ``cat``), or the plan's row (read in at the start of the step)."""
        if not self.lean:
            if out is not None:  # read in again
                torch._foreach_copy_(self.views[0 if j == 0 else j + 1], [self.params, *self.state_arrays][j])
            return self.buf[0 if j == 0 else j + 1]
        if out is None and self.flat[j][0].dtype == self.cdt:
            return torch.cat(self.flat[j])
        if out is None:
            out = torch.empty(self.n, dtype=self.cdt, device=self.dev)
        return torch.cat(self.flat[j], out=out)

    def store(self, j: int, x: torch.Tensor) -> None:
        """Write the flat ``x`` (what :meth:`load` gave, changed) into array ``j`` of every tensor: one
        ``split_with_sizes_copy`` (lean plans) or one ``_foreach_copy_`` from the plan's row. ``x`` may be
        overwritten afterwards."""
        if self.lean:
            dtype = self.flat[j][0].dtype
            torch.split_with_sizes_copy(x if x.dtype == dtype else x.to(dtype), self.sizes_list, out=self.flat[j])
        else:
            torch._foreach_copy_([self.params, *self.state_arrays][j], self.views[0 if j == 0 else j + 1])

    def grad_row(self) -> torch.Tensor:
        return self.buf[0 if self.lean else 1]

    # -- one step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, tensors: Sequence[Any], grads: Sequence[Any], hp: Any, skip: bool) -> list[Outcome]:
        """One step of every tensor of the group, written in place (no autograd record of the writes); the
        outcomes in the group's order."""
        torch._foreach_copy_(self.all_dst, self.in_src + list(grads))
        g = self.grad_row()
        ok = ok_e = None
        if skip:  # per tensor: every grad entry finite (rows, then tensors); nothing else reads the flags
            fin = self.tensor_reduce(self.row_sum(torch.isfinite(g).to(self.cdt)), "sum")
            ok = fin == self.sizes
            ok_e = self.per_entry(self.per_row(ok))
        counts = None
        if self.spec.has_step:
            if self.python_steps:
                counts = [t.state.step for t in tensors]
            w, new_w = self._adamp(g, hp, ok_e, counts, grads)
        else:
            w, new_w = self._sgdp(g, hp, ok_e, grads)
        if ok_e is not None:  # else written in the param row already
            w.copy_(torch.where(ok_e, new_w, w))
        del new_w
        self.store(0, w)
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

    def _adamp(self, g: torch.Tensor, hp: Any, ok_e: Any, counts: list[int] | None, grads: Sequence[Any]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(params, new params)``, flat: the moments written, the params not yet (``run`` does)."""
        cdt = self.cdt
        m, v = self.load(1), self.load(2)
        eps = _sc(hp.eps, cdt)
        beta1, beta2 = (_sc(b, cdt) for b in hp.betas)
        step_size, sqrt_bc2 = self._bias(hp, counts)
        # In place, rounded as the lone step rounds them (no fused multiply-add: a 16-bit param would round
        # differently now and then).
        if ok_e is None:
            m.mul_(beta1).add_((1 - beta1) * g)  # Alg. 2 line 2
            t = (1 - beta2) * g
            v.mul_(beta2).add_(t.mul_(g))  # Alg. 2 line 3
            del t
        else:  # a skipped tensor keeps its moments
            m.copy_(torch.where(ok_e, beta1 * m + (1 - beta1) * g, m))
            v.copy_(torch.where(ok_e, beta2 * v + (1 - beta2) * g * g, v))
        self.store(1, m)
        self.store(2, v)
        # Alg. 2 line 4, bias-corrected as adamp 0.3.0 (per tensor: its own count)
        denom = v.sqrt_()  # (v is written: its buffer is free)
        denom.div_(self.per_entry(self.per_row(sqrt_bc2))).add_(eps)
        if hp.nesterov:
            num = beta1 * m
            num.add_((1 - beta1) * g)
            u = torch.div(num, denom, out=denom)
            del num
        else:
            u = torch.div(m, denom, out=denom)
        del m, v  # (lean plans: freed before the params are read)
        w = self.load(0)
        if self.projected:
            _, u, ratio = self._project_parts(w, g, u, hp, grads)
        else:
            u, ratio = self._caution_plain(u, g, hp), 1.0
        decay = None
        if not (isinstance(hp.weight_decay, float) and hp.weight_decay == 0.0):
            decay = 1 - _sc(hp.lr, cdt) * _sc(hp.weight_decay, cdt) * ratio  # decoupled, before the step
        return w, self._apply(w, decay, -step_size, u, ok_e)

    def _sgdp(self, g: torch.Tensor, hp: Any, ok_e: Any, grads: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(params, new params)``, flat: the buffers written, the params not yet (``run`` does)."""
        cdt = self.cdt
        buf = self.load(1)
        lr, mu = _sc(hp.lr, cdt), _sc(hp.momentum, cdt)
        # Alg. 1 line 2 (torch SGD form); without dampening 1 * g == g exactly
        damped = g if isinstance(hp.dampening, float) and hp.dampening == 0.0 else (1 - _sc(hp.dampening, cdt)) * g
        new_b = buf.mul_(mu).add_(damped) if ok_e is None else mu * buf + damped  # (skip: the old one kept)
        del damped
        d_p = g + mu * new_b if hp.nesterov else new_b
        store = new_b
        w = self.load(0)
        if self.projected:
            if d_p is new_b and not hp.project_buffer:  # the projection writes d_p: keep the buffer apart
                d_p = new_b.clone()
            q, d_p, ratio = self._project_parts(w, g, d_p, hp, grads)
            if not hp.nesterov and hp.project_buffer:
                store = q  # adamp 0.3.0 projects the buffer itself (unmasked)
        else:
            d_p, ratio = self._caution_plain(d_p, g, hp), 1.0
        if ok_e is not None:
            store = torch.where(ok_e, store, buf)
        if store is not buf:
            buf.copy_(store)
        self.store(1, buf)
        del store, new_b, buf
        decay = None
        if not (isinstance(hp.weight_decay, float) and hp.weight_decay == 0.0):
            # decoupled decay scaled by 1 / (1 - momentum), before the step (official sgdp.py)
            decay = 1 - lr * _sc(hp.weight_decay, cdt) * ratio / (1 - mu)
        return w, self._apply(w, decay, -lr, d_p, ok_e)

    def _apply(self, w: torch.Tensor, decay: Any, neg_step: Any, d: torch.Tensor, ok_e: Any) -> torch.Tensor:
        """``w * decay + neg_step * d`` (decay and step size per tensor, or one for all): in the param row
        itself, or with ``skip_nonfinite`` in a copy (the row keeps the old params for the skipped tensors)."""
        out = w if ok_e is None else w.clone()
        if decay is not None:
            out.mul_(self.per_entry(self.per_row(decay)))
        # the product rounded, then the sum (as the lone step; no fused multiply-add)
        if isinstance(neg_step, numbers.Real) or neg_step.ndim == 0:
            return out.add_(neg_step * d)
        return out.add_(self.per_entry(self.per_row(neg_step)).mul_(d))

    # -- the projection (adamp_core.projection, per tensor through the segments) ----------------------------
    def _caution_plain(self, u: torch.Tensor, g: torch.Tensor, hp: Any) -> torch.Tensor:
        """A param the projection does not handle: masked against ``g`` (:func:`adamp_core.caution.cautious`)."""
        if not hp.caution:
            return u
        return self._caution_factor(u, g).mul_(u)

    def _caution_factor(self, q: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """:func:`adamp_core.caution.caution_factor` per tensor: ``[q ref > 0] / max(mean, 1e-3)``."""
        agree = q * ref > 0
        mean = self.tensor_reduce(self.row_sum(agree.to(q.dtype)), "sum") / self.sizes
        scale = self.per_entry(self.per_row(1.0 / torch.clamp(mean, min=CAUTION_MIN_FRACTION)))
        return torch.where(agree, scale, 0.0)

    def _pow2(self, x: torch.Tensor) -> torch.Tensor:
        """Per row ``2**-floor(log2(max|x_r|))`` in the normal range (:func:`adamp_core.projection._pow2_scale`)."""
        tiny = float(torch.finfo(x.dtype).smallest_normal)
        m = torch.maximum(torch.segment_reduce(x, "max", offsets=self.row_offsets, unsafe=True),
                          -torch.segment_reduce(x, "min", offsets=self.row_offsets, unsafe=True))
        m = torch.where(m >= tiny, m, 1.0)
        m = torch.where(m <= 1.0 / tiny, m, 1.0 / tiny)
        return 0.5 ** torch.floor(torch.log2(m))

    def _project_parts(self, w: torch.Tensor, g: torch.Tensor, u: torch.Tensor, hp: Any, grads: Sequence[Any]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Pi(u), update, wd ratio (K,))`` as :func:`adamp_core.projection.project_update_parts` gives them
        tensor by tensor: the scale-invariance test on the channel view, then the layer view. Works in place:
        ``u`` becomes ``Pi(u)``, the plan's param and grad rows their scaled rows; the param row is read in
        again at the end (and the grad row with ``caution``), so no flat temporary outlives a line."""
        cdt = self.cdt
        eps = _sc(hp.eps, cdt)
        sw, sg = self._pow2(w), self._pow2(g)  # per-row powers of two: exact scaling, no overflow
        ws = w.mul_(self.per_entry(sw))  # ~w = s w, exact
        gs = g.mul_(self.per_entry(sg))
        # per-row statistics of the channel view (one product at a time: one flat temporary)
        wg, ww, gg, wu = (self.row_sum(a * b) for a, b in ((ws, gs), (ws, ws), (gs, gs), (ws, u)))
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

        def remove_radial(x: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
            """``x`` minus its radial part on the chosen view (0 where none is), from the per-row ``~w_r . x_r``;
            in place."""
            wx_l = self.per_row(self.tensor_reduce(wx * rho, "sum"))
            coef_l = rho * (wx_l / n_l / n_l)
            coef = torch.where(channel_r, wx / n_c / n_c, torch.where(layer_r, coef_l, zero))
            return x.sub_(self.per_entry(coef).mul_(ws))  # the product rounded, then the difference

        projected = torch.logical_or(channel, layer)
        ratio = torch.where(projected, self.const(hp.wd_ratio), self.const(1.0))
        if not hp.caution:
            q = remove_radial(u, wu)
            self.load(0, out=w)  # the params unscaled again
            return q, q, ratio
        q = remove_radial(u, wu)
        torch._foreach_copy_(self.grad_dst, list(grads))  # the grad row unscaled again: Pi(g)
        # ~w_r . g_r = (~w_r . ~g_r) / t_r exactly: Pi(g) without another pass over g
        ref = remove_radial(g, wg / sg)
        masked = self._caution_factor(q, ref).mul_(q)
        # projected again (timm): the mask breaks the orthogonality to w
        update = remove_radial(masked, self.row_sum(ws * masked))
        self.load(0, out=w)
        return q, update, ratio
