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
import math
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np

try:
    import numba
    import numba.core.cgutils
    import numba.extending
except ImportError:  # pragma: no cover - exercised when the extra is absent
    numba = None

from ._common import host_bias_correction
from .projection import channel_shape

__all__ = [
    "AVAILABLE",
    "BATCH_MAX_SIZE",
    "FALLBACK",
    "OK",
    "SKIPPED",
    "adamp_batch",
    "adamp_inplace",
    "check_fused",
    "host_addresses",
    "host_views",
    "run_batch",
    "run_inplace",
    "sgdp_batch",
    "sgdp_inplace",
    "supports",
]

AVAILABLE = numba is not None

OK, SKIPPED, FALLBACK = 0, 1, 2  # kernel results: written; non-finite grad, nothing written; out of range
_PARALLEL_MIN = 1 << 16  # elements: below this, thread start-up costs more than it saves
# Tensors below this size are best updated together by adamp_batch/sgdp_batch (threads share out the
# tensors); above it, one parallel kernel per tensor (threads share out the rows).
BATCH_MAX_SIZE = _PARALLEL_MIN
_BIG, _SMALL = 2.0**968, 2.0**-968  # float64 row sums of squares outside: the pure step's scaling
_CAUTION_MIN = 1e-3  # adamp_core.caution.CAUTION_MIN_FRACTION (a numba global: a plain float)


def check_fused(value: Any) -> None:
    """The adapters' ``fused`` option: None (these kernels where they apply, else the array-API step),
    True (the same, and numba must be installed), False (always the array-API step) or ``"triton"`` (the
    Triton kernels of :mod:`adamp_core.triton_fused` for every torch tensor they take, opt-in; Triton must
    be installed)."""
    if value == "triton" and isinstance(value, str):
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ValueError("Invalid fused value: 'triton' (the Triton kernels need triton: pip install "
                             "-e '.[triton]')")
        return
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid fused value: {value!r} (expected None, True, False or 'triton')")
    if value is True and not AVAILABLE:
        raise ValueError("Invalid fused value: True (the fused kernels need numba: pip install -e '.[fast]')")


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


if AVAILABLE:
    # "reassoc" lets LLVM vectorize the row sums (a different summation order, as any BLAS has);
    # "contract" allows FMA. No nnan/ninf: NaN and inf must propagate as in the pure step.
    _FLAGS = {"reassoc", "contract", "afn"}
    _jit = numba.njit(cache=True, fastmath=_FLAGS, nogil=True, error_model="numpy")
    _pjit = numba.njit(cache=True, fastmath=_FLAGS, nogil=True, parallel=True, error_model="numpy")
    prange = numba.prange

    def _radial(stats, view, dots, eps, out):  # pragma: no cover - compiled
        """``out[r]``: the coefficient of row ``r`` in the radial part ``w (w.x)/(|w|+eps)^2`` of a vector ``x``
        whose per-row ``w_r . x_r`` are ``dots``, on ``view`` (1 channel, 2 layer; 0: none, all 0)."""
        n_rows = stats.shape[0]
        if view == 1:
            for r in range(n_rows):
                n = math.sqrt(stats[r, 1]) + eps
                out[r] = dots[r] / n / n
            return
        c = 0.0
        if view == 2:
            ww_l = dot_l = 0.0
            for r in range(n_rows):
                ww_l += stats[r, 1]
                dot_l += dots[r]
            n = math.sqrt(ww_l) + eps
            c = dot_l / n / n
        for r in range(n_rows):
            out[r] = c

    def _decide(stats, project, n_cols, delta, eps):  # pragma: no cover - compiled
        """The view ``stats`` (rows x [w.g, |w|^2, |g|^2, w.p]) projects: 1 channel, 2 layer, 0 none."""
        n_rows = stats.shape[0]
        if not project or n_rows * n_cols == 0:
            return 0
        thr_c = delta / math.sqrt(n_cols)
        channel = True
        wg_l = ww_l = gg_l = 0.0
        for r in range(n_rows):
            wg, ww, gg = stats[r, 0], stats[r, 1], stats[r, 2]
            cos = abs(wg) / (max(math.sqrt(ww), eps) * max(math.sqrt(gg), eps))
            if not (cos < thr_c):  # NaN never passes
                channel = False
            wg_l += wg
            ww_l += ww
            gg_l += gg
        if channel:
            return 1
        cos_l = abs(wg_l) / (max(math.sqrt(ww_l), eps) * max(math.sqrt(gg_l), eps))
        return 2 if cos_l < delta / math.sqrt(n_rows * n_cols) else 0

    def _screen(stats, bad, skip, check_range):  # pragma: no cover - compiled
        """SKIPPED if ``skip`` and a grad entry is not finite; FALLBACK if ``check_range`` (float64) and a
        row's |w|^2 or |g|^2 is outside [2**-968, 2**968] (overflowed, underflowed, all zero, or NaN: the
        pure step's scaled sums are exact there); else OK."""
        nonfinite = 0.0
        out = False
        for r in range(stats.shape[0]):
            nonfinite += bad[r]
            if not (_SMALL <= stats[r, 1] <= _BIG and _SMALL <= stats[r, 2] <= _BIG):
                out = True
        if skip and nonfinite > 0:
            return SKIPPED
        if check_range and out:
            return FALLBACK
        return OK

    # What differs between AdamP and SGDP, bound in each copy of the generic kernels (see _compile): the
    # scalars (a tuple, from the array ``sc`` of the param's dtype), the state maths of one entry (``(new s1,
    # new s2, unprojected update p)`` from the old state ``s1, s2`` and the grad ``gj``) and how the new state
    # is stored once ``p`` is projected (``qj``). AdamP's state is ``(m, v)``; SGDP's is its momentum buffer,
    # passed as both ``s1`` and ``s2``.
    _scalars = _entry = _store = _serial = None

    def _adamp_scalars(sc):  # pragma: no cover - compiled
        return sc[0], sc[1], sc[2], sc[3], sc[4], sc[5]

    def _adamp_entry(sc, nesterov, mj, vj, gj):  # pragma: no cover - compiled
        b1, b2, c1, c2, inv_sbc2, eps = sc
        mj = b1 * mj + c1 * gj  # Alg. 2 line 2
        vj = b2 * vj + c2 * gj * gj  # Alg. 2 line 3
        den = np.sqrt(vj) * inv_sbc2 + eps  # Alg. 2 line 4
        return mj, vj, (b1 * mj + c1 * gj) / den if nesterov else mj / den

    def _adamp_store(m, v, r, j, mj, vj, qj, keep):  # pragma: no cover - compiled
        m[r, j] = mj
        v[r, j] = vj

    def _sgdp_scalars(sc):  # pragma: no cover - compiled
        return sc[0], sc[1]

    def _sgdp_entry(sc, nesterov, bj, unused, gj):  # pragma: no cover - compiled
        mu, c1 = sc
        bj = mu * bj + c1 * gj  # Alg. 1 line 2
        return bj, unused, gj + mu * bj if nesterov else bj

    def _sgdp_store(b, unused, r, j, bj, unused_j, qj, keep):  # pragma: no cover - compiled
        # adamp 0.3.0 projects the buffer itself in place; ``keep`` (nesterov, or project_buffer=False: Alg. 1
        # as printed) stores the unprojected one. Never the cautious mask (adamp_core.caution).
        b[r, j] = bj if keep else qj

    def _kernel(
        w, g, s1, s2, sc, step, project, nesterov, keep, caution, delta, eps64, decay, skip, check_range
    ):  # pragma: no cover - compiled
        # One step of the optimizer whose ``_scalars``, ``_entry`` and ``_store`` this copy calls (see
        # _compile). The scalars ``sc`` (an array) and ``step`` come in the param's dtype (elementwise maths in
        # it, as the pure step); sums in float64.
        k = _scalars(sc)
        n_rows, n_cols = w.shape
        stats = np.empty((n_rows, 4))
        bad = np.zeros(n_rows)
        for r in prange(n_rows):
            wg = ww = gg = wp = 0.0
            nb = 0.0
            for j in range(n_cols):
                wj, gj = w[r, j], g[r, j]
                pj = _entry(k, nesterov, s1[r, j], s2[r, j], gj)[2]
                wd, gd = np.float64(wj), np.float64(gj)
                wg += wd * gd
                ww += wd * wd
                gg += gd * gd
                wp += wd * np.float64(pj)
                nb += gj * 0.0  # NaN iff some g entry is NaN or inf (no branch: the loop vectorizes)
            stats[r, 0], stats[r, 1], stats[r, 2], stats[r, 3] = wg, ww, gg, wp
            bad[r] = 0.0 if nb == 0.0 else 1.0
        status = _screen(stats, bad, skip, check_range)
        if status != OK:
            return status, False
        view = _decide(stats, project, n_cols, delta, eps64)
        coef = np.empty(n_rows)
        _radial(stats, view, stats[:, 3], eps64, coef)  # Pi(p) = p - w * coef_r
        coefs = coef.astype(w.dtype)
        dec = decay[1] if view != 0 else decay[0]
        if caution and n_rows * n_cols > 0:
            _cautious_update(w, g, s1, s2, k, nesterov, keep, stats, view, coefs, eps64, dec, step)
            return OK, view != 0
        for r in prange(n_rows):
            c = coefs[r]
            for j in range(n_cols):
                wj, gj = w[r, j], g[r, j]
                s1j, s2j, pj = _entry(k, nesterov, s1[r, j], s2[r, j], gj)
                qj = pj - wj * c  # Alg. 2 line 8, Alg. 1 line 6: the radial part removed (c = 0: not projected)
                _store(s1, s2, r, j, s1j, s2j, qj, keep)
                w[r, j] = wj * dec - step * qj  # Alg. 2 lines 10-11: decoupled decay, then the step
        return OK, view != 0

    def _cautious_update(w, g, s1, s2, k, nesterov, keep, stats, view, coefs, eps64, dec, step):  # pragma: no cover
        # caution=True (adamp_core.caution): one more pass counts the entries where the projected update q
        # agrees in sign with Pi(g) (g itself where nothing is projected) and sums w.q over them per row;
        # then the update pass masks, rescales by 1 / max(kept fraction, 1e-3) and projects again.
        n_rows, n_cols = w.shape
        gcoef = np.empty(n_rows)
        _radial(stats, view, stats[:, 0], eps64, gcoef)  # Pi(g) = g - w * gcoef_r
        gcoefs = gcoef.astype(w.dtype)
        kept = np.zeros(n_rows)
        wq = np.zeros(n_rows)
        for r in prange(n_rows):
            c, cg = coefs[r], gcoefs[r]
            n = s = 0.0
            for j in range(n_cols):
                wj, gj = w[r, j], g[r, j]
                qj = _entry(k, nesterov, s1[r, j], s2[r, j], gj)[2] - wj * c
                if qj * (gj - wj * cg) > 0:
                    n += 1.0
                    s += np.float64(wj) * np.float64(qj)
            kept[r], wq[r] = n, s
        scale = 1.0 / max(kept.sum() / (n_rows * n_cols), _CAUTION_MIN)
        for r in range(n_rows):
            wq[r] *= scale
        coef2 = np.empty(n_rows)
        _radial(stats, view, wq, eps64, coef2)  # the masked update projected again
        coefs2 = coef2.astype(w.dtype)
        sc = np.full(1, scale).astype(w.dtype)[0]  # rounded once to the param's dtype
        for r in prange(n_rows):
            c, cg, c2 = coefs[r], gcoefs[r], coefs2[r]
            for j in range(n_cols):
                wj, gj = w[r, j], g[r, j]
                s1j, s2j, pj = _entry(k, nesterov, s1[r, j], s2[r, j], gj)
                qj = pj - wj * c
                mj = qj * sc if qj * (gj - wj * cg) > 0 else qj * 0
                _store(s1, s2, r, j, s1j, s2j, qj, keep)  # the state never sees the mask
                w[r, j] = wj * dec - step * (mj - wj * c2)

    _radial = _jit(_radial)
    _decide = _jit(_decide)
    _screen = _jit(_screen)

    def _variant(func, suffix, **names):
        """A copy of ``func`` under another name, its globals ``names`` bound as given. numba's on-disk
        cache keys a function by its name and line, not by its options or globals: a serial and a parallel
        compilation of one function (or an AdamP and an SGDP one) would load each other's machine code (a
        parallel kernel run serially, threads started for a tiny tensor, or the other optimizer)."""
        copy = types.FunctionType(func.__code__, {**func.__globals__, **names}, func.__name__ + suffix)
        copy.__qualname__ = func.__qualname__ + suffix
        return copy

    @numba.extending.intrinsic
    def _pointer(typingctx, address):  # pragma: no cover - compiled
        """An int64 address as a ``void*`` (for ``numba.carray``)."""

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], numba.core.cgutils.voidptr_t)

        return numba.types.voidptr(address), codegen

    def _view(address, shape, like):  # pragma: no cover - compiled
        return numba.carray(_pointer(address), (shape[0], shape[1]), like.dtype)

    def _batch(
        like, addr, shapes, project, sc, steps, out, nesterov, keep, caution, delta, eps64, decay, skip, check_range
    ):  # pragma: no cover - compiled
        # One tensor per iteration, each by the serial kernel: threads share out the tensors. ``addr``: the
        # addresses of param, grad and state (one state array: SGDP's buffer, passed as s1 and s2).
        last = addr.shape[1] - 1
        for i in prange(addr.shape[0]):
            w, g = _view(addr[i, 0], shapes[i], like), _view(addr[i, 1], shapes[i], like)
            s1, s2 = _view(addr[i, 2], shapes[i], like), _view(addr[i, last], shapes[i], like)
            status, _ = _serial(
                w, g, s1, s2, sc[i], steps[i], project[i], nesterov, keep, caution, delta, eps64, decay, skip,
                check_range
            )
            out[i] = status

    _view = _jit(_view)

    def _compile(name, scalars, entry, store):
        """The serial and parallel kernels of one optimizer (its ``scalars``, ``entry`` and ``store``), and
        its batch."""
        ops = {"_scalars": _jit(scalars), "_entry": _jit(entry), "_store": _jit(store)}
        cautious = {"serial": _jit, "parallel": _pjit}
        serial, parallel = (
            jit(_variant(_kernel, f"_{name}_{kind}", **ops,
                         _cautious_update=cautious[kind](_variant(_cautious_update, f"_{name}_{kind}", **ops))))
            for kind, jit in (("serial", _jit), ("parallel", _pjit)))
        return (serial, parallel), _pjit(_variant(_batch, f"_{name}", _serial=serial))

    _KERNELS, _BATCH = {}, {}
    _KERNELS["adamp"], _BATCH["adamp"] = _compile("adamp", _adamp_scalars, _adamp_entry, _adamp_store)
    _KERNELS["sgdp"], _BATCH["sgdp"] = _compile("sgdp", _sgdp_scalars, _sgdp_entry, _sgdp_store)


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
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    with _keeping_torch_threads():  # reading numba's count starts its pool, too
        if n != numba.get_num_threads():
            numba.set_num_threads(n)


def _launch(name: str, size: int, *args: Any) -> tuple[int, bool]:
    """Run the serial kernel below ``_PARALLEL_MIN`` elements, the parallel one above."""
    serial, parallel = _KERNELS[name]
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


def _run_batch(name: str, addresses: np.ndarray, shapes: Any, dtype: Any, sc: np.ndarray, steps: np.ndarray,
               scale: float, hp: Any, skip_nonfinite: bool) -> Any:
    """Many tensors by the batch kernel ``name``: ``sc`` (rows) and ``steps`` per tensor, in ``dtype``."""
    dims = np.array([channel_shape(tuple(s)) for s in shapes], dtype=np.int64).reshape(-1, 2)
    project = np.array([len(s) > 1 for s in shapes], dtype=np.bool_)
    out = np.empty(len(dims), dtype=np.int8)
    with _keeping_torch_threads():
        _BATCH[name](np.empty(0, dtype=dtype), np.ascontiguousarray(addresses, dtype=np.int64), dims, project, sc,
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
    uniq, inverse = np.unique(np.asarray(steps, dtype=np.int64), return_inverse=True)
    host = [_adamp_host(hp, int(t)) for t in uniq]
    sc = np.array([h[0] for h in host], dtype=dtype).reshape(-1, 6)[inverse]
    step_size = np.array([h[1] for h in host], dtype=dtype)[inverse]
    scale = float(hp.lr) * float(hp.weight_decay)  # as _adamp_host
    return _run_batch("adamp", addresses, shapes, dtype, sc, step_size, scale, hp, skip_nonfinite)


def sgdp_batch(addresses: np.ndarray, shapes: Any, dtype: Any, hp: Any, skip_nonfinite: bool = False) -> Any:
    """:func:`sgdp_inplace` for many tensors in one kernel call, as :func:`adamp_batch`; ``addresses``:
    ``(n, 3)``, of ``param``, ``grad`` and ``momentum``."""
    sc, lr, scale = _sgdp_host(hp)
    n = len(shapes)
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
