"""The compiled numba kernels of :mod:`adamp_core.paths.numba_fused` (imported from there on first use, so
that importing the core or an adapter never loads numba). The maths is in that module's docstring."""

from __future__ import annotations

import math
import types

import numba
import numba.core.cgutils
import numba.extending
import numpy as np

from ..caution import CAUTION_MIN_FRACTION as _CAUTION_MIN  # a numba global: a plain float
from ._numba_status import _BIG, _SMALL, FALLBACK, OK, SKIPPED

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

def _read_counts(addr):  # pragma: no cover - compiled
    """The int64 step counts at ``addr`` (0-d arrays the plan found), plus one: the new counts."""
    out = np.empty(addr.shape[0], dtype=np.int64)
    for i in range(addr.shape[0]):
        out[i] = numba.carray(_pointer(addr[i]), (1,), np.int64)[0] + 1
    return out

def _advance_counts(addr, status):  # pragma: no cover - compiled
    """Advance by one the int64 step count at ``addr[i]`` of every tensor written (status OK)."""
    for i in range(addr.shape[0]):
        if status[i] == 0:
            c = numba.carray(_pointer(addr[i]), (1,), np.int64)
            c[0] += 1

read_counts = _jit(_read_counts)
advance_counts = _jit(_advance_counts)

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

KERNELS, BATCH = {}, {}
KERNELS["adamp"], BATCH["adamp"] = _compile("adamp", _adamp_scalars, _adamp_entry, _adamp_store)
KERNELS["sgdp"], BATCH["sgdp"] = _compile("sgdp", _sgdp_scalars, _sgdp_entry, _sgdp_store)
