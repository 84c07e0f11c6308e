"""The Triton kernels behind :mod:`adamp_core.paths.triton_fused` (imported only from there, once triton is needed).

Three kernels step one group of tensors (one param dtype and state dtypes, one device) in place, in a
constant number of launches (the maths and the data layout are in :mod:`adamp_core.paths.triton_fused`):

1. ``stats`` (one program per tile: up to TILE_R rows of one tensor and a range of their columns, looped
   over in blocks): per row part, in float64, w.g, |w|^2, |g|^2 and w.u (u from the new moments);
   float64 params on rows scaled by powers of two, with the two exponents.
2. ``decide`` (one program per tensor): combines a row's parts and the rows' sums, takes the view
   decision, writes the per-row coefficients, the per-tensor scalars and flags, advances the step count.
3. ``update`` (one program per tile): the state update, the projection, the decay and the step, written.

Caution (timm's cautious AdamP/SGDP) adds ``cstats`` (per row: how many entries keep their sign, w.q on
them) and ``cdecide`` (per tensor: the mean, the scale, the coefficient of the second projection).

A tile's block is (TILE_R, TILE_C) (narrow: many rows of one tensor at once) or (1, WIDE_C) (wide: one
long row), chosen per tensor; so a kernel holds two copies of its block code, whatever the shapes.

Written once as plain functions and decorated by :func:`build`, for the GPU (compiled) or for Triton's
interpreter (CPU tensors, ``TRITON_INTERPRET=1``), both in one process. This module deliberately has no
``from __future__ import annotations``: Triton reads the ``tl.constexpr`` annotations as objects.
"""

import os
import types

import triton
import triton.language as tl

# Storage kinds of params and state (a constexpr of the kernels): bfloat16 is loaded and stored as its
# bits, rounded to nearest-even by hand (Triton's interpreter truncates a float32 -> bfloat16 cast).
F32 = tl.constexpr(0)
F64 = tl.constexpr(1)
F16 = tl.constexpr(2)
BF16 = tl.constexpr(3)

# The two block shapes of a tile: narrow (TILE_R rows x TILE_C columns) and wide (one row x WIDE_C).
TILE_R = tl.constexpr(16)
TILE_C = tl.constexpr(32)
WIDE_C = tl.constexpr(512)

# Columns of the int64 tables (kept in step with adamp_core.paths.triton_fused, which builds them).
# meta: one row per tensor
M_ROWS = tl.constexpr(0)  # rows of the channel view (0 for an empty tensor)
M_LEN = tl.constexpr(1)  # row length
M_PART0 = tl.constexpr(2)  # index of the tensor's first row part
M_NCHUNK = tl.constexpr(3)  # parts per row (tiles along a row)
M_ROW0 = tl.constexpr(4)  # index of the tensor's first row in the per-row buffers
M_WIDE = tl.constexpr(5)  # 1: its tiles are wide (one row each)
M_PROJECT = tl.constexpr(6)  # 1: ndim > 1 and not empty (the test and the projection apply)
NMETA = tl.constexpr(7)
# pointers: one row per tensor
P_W = tl.constexpr(0)
P_G = tl.constexpr(1)
P_S1 = tl.constexpr(2)  # exp_avg / momentum
P_S2 = tl.constexpr(3)  # exp_avg_sq (SGDP: the momentum again)
P_STEP = tl.constexpr(4)  # int64 step count (AdamP)
NPTR = tl.constexpr(5)
# tiles: one row per program of stats/update
T_TENSOR = tl.constexpr(0)
T_ROW = tl.constexpr(1)  # first row
T_NROWS = tl.constexpr(2)  # rows in the tile
T_COL = tl.constexpr(3)  # first column
T_COLEND = tl.constexpr(4)  # one past the last column
T_CHUNK = tl.constexpr(5)  # which part of its rows the tile makes
NTILE = tl.constexpr(6)
# float64 statistics of one row part
S_WG = tl.constexpr(0)
S_WW = tl.constexpr(1)
S_GG = tl.constexpr(2)  # not finite exactly where a grad entry is not (scaled or float64 sums cannot overflow)
S_WU = tl.constexpr(3)
S_KW = tl.constexpr(4)  # the part's w was scaled by 2^-S_KW (0: float32 and 16-bit params, never scaled)
S_KG = tl.constexpr(5)
NSTAT = tl.constexpr(6)
# float64 scalars of one tensor (decide -> update)
V_DECAY = tl.constexpr(0)  # the decoupled weight decay factor
V_STEP = tl.constexpr(1)  # the step size
V_SBC2 = tl.constexpr(2)  # sqrt(1 - beta2^t) (AdamP)
V_OK = tl.constexpr(3)  # 1: write this tensor; 0: skipped (non-finite grad under skip_nonfinite)
V_CSCALE = tl.constexpr(4)  # caution: 1 / max(mean of the mask, 1e-3)
V_CHANNEL = tl.constexpr(5)  # 1: projected on the channel view
V_LAYER = tl.constexpr(6)  # 1: projected on the layer view
V_KWL = tl.constexpr(7)  # the layer view's power of two (w scaled by 2^-V_KWL)
V_NL = tl.constexpr(8)  # |~w| + eps S of the layer view
NV = tl.constexpr(9)
# float64 per row: the projection's coefficient, and caution's second one
C_PROJ = tl.constexpr(0)
C_CAUTION = tl.constexpr(1)  # of the re-projection (caution)
C_GRAD = tl.constexpr(2)  # of g's radial part (caution's g_perp)
C_KW = tl.constexpr(3)  # the row's power of two
C_NC = tl.constexpr(4)  # |~w_r| + eps s_r
NCOEF = tl.constexpr(5)
# caution statistics of one row part: kept entries, sum of w*q over them (on the part's scaled w)
K_COUNT = tl.constexpr(0)
K_WQ = tl.constexpr(1)
NCSTAT = tl.constexpr(2)

NEG = tl.constexpr(-2000.0)  # an exponent below any: 2^NEG counts as 0
F64_MAX = tl.constexpr(1.7976931348623157e308)
TINY = tl.constexpr(2.2250738585072014e-308)  # 2^-1022, float64's smallest normal number


# -- scalar and element helpers ---------------------------------------------------------------------------


def _sum(x, axis):
    """Reductions through ``tl.reduce`` and the standard library's combine functions, never ``tl.sum`` and
    the like: those are themselves jitted functions, which Triton's interpreter can only call if
    TRITON_INTERPRET was set when triton was first imported (and it runs these combines with NumPy)."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


def _max(x, axis):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


def _min(x, axis):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


def _f64(bits):
    """A float64 the host passed as its IEEE bits (an int64): every Triton version then gets it exactly (a
    Python float argument would be a float32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


def _pow2(k):
    """2^k for a float64 holding an integer, built from its bits (exact), k clamped to [-1022, 1023]."""
    k = tl.where(k < -1022.0, -1022.0, tl.where(k > 1023.0, 1023.0, k))  # where, not minimum: cheaper in
    e = k.to(tl.int64)  # Triton's interpreter, and k is never NaN
    return ((e + 1023) << 52).to(tl.float64, bitcast=True)


def _exponent(m):
    """The power of two that scales ``m >= 0`` (float64) into [1, 2): k with 2^k <= m < 2^(k+1), kept in
    [-1022, 1022] as the array-API step keeps it (``projection._pow2_scale``); 0 for 0 and subnormals."""
    e = ((m.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
    return tl.where(m >= TINY, tl.where(e > 1022, 1022, e), 0).to(tl.float64)


def _expm1(x):
    """exp(x) - 1 without cancellation (Kahan's formula; exp and log only, which every backend has)."""
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(u)))


def _sqrt(x, CDT: tl.constexpr):
    if CDT == tl.float32:
        return tl.sqrt_rn(x)  # IEEE, as torch (tl.sqrt may be approximate in float32)
    return tl.sqrt(x)


def _div(a, b, CDT: tl.constexpr):
    if CDT == tl.float32:
        return tl.div_rn(a, b)  # IEEE, as torch
    return a / b


def _load(address, offs, mask, KIND: tl.constexpr, CDT: tl.constexpr):
    """Elements ``offs`` of the array at ``address`` (an int64) of storage ``KIND``, in ``CDT``."""
    if KIND == BF16:
        bits = tl.load(address.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == F16:
        x = tl.load(address.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    elif KIND == F32:
        x = tl.load(address.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    else:
        x = tl.load(address.to(tl.pointer_type(tl.float64)) + offs, mask=mask, other=0.0)
    return x.to(CDT)


def _store(address, offs, x, mask, KIND: tl.constexpr):
    """``x`` rounded once to storage ``KIND`` (to nearest even; float64 -> bfloat16 through float32, as
    torch) and written."""
    if KIND == BF16:
        f = x.to(tl.float32)
        b = f.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(f != f, 0x7FC0, r)  # NaN: torch's quiet NaN
        tl.store(address.to(tl.pointer_type(tl.uint16)) + offs, r.to(tl.uint16), mask=mask)
    elif KIND == F16:
        tl.store(address.to(tl.pointer_type(tl.float16)) + offs, x.to(tl.float16), mask=mask)
    elif KIND == F32:
        tl.store(address.to(tl.pointer_type(tl.float32)) + offs, x.to(tl.float32), mask=mask)
    else:
        tl.store(address.to(tl.pointer_type(tl.float64)) + offs, x.to(tl.float64), mask=mask)


def _adamp_scalars(t, lr, lb1, lb2):
    """AdamP's step size lr / (1 - beta1^t) and sqrt(1 - beta2^t), float64 (``-expm1(t log beta)``, as
    ``_common.bias_correction``; ``lb = log beta``, -inf for beta = 0)."""
    tf = t.to(tl.float64)
    bc1 = -_expm1(tf * lb1)
    bc2 = -_expm1(tf * lb2)
    return lr / bc1, tl.sqrt(bc2)


def _direction(g, s1, s2, mom, c1, b2, c2, sbc2, eps, OPT: tl.constexpr, NESTEROV: tl.constexpr,
               CDT: tl.constexpr):
    """The new state and the unprojected update u, elementwise in the compute dtype, in the array-API
    step's order of operations. AdamP (OPT 0): ``mom`` = beta1, ``c1`` = 1 - beta1, ``c2`` = 1 - beta2;
    SGDP (OPT 1): ``mom`` = momentum, ``c1`` = 1 - dampening (state ``s1`` = the buffer)."""
    if OPT == 0:
        m = mom * s1 + c1 * g  # Alg. 2 line 2
        v = b2 * s2 + (c2 * g) * g  # Alg. 2 line 3
        den = _div(_sqrt(v, CDT), sbc2, CDT) + eps  # Alg. 2 line 4, bias-corrected as adamp 0.3.0
        if NESTEROV:
            u = _div(mom * m + c1 * g, den, CDT)
        else:
            u = _div(m, den, CDT)
        return m, v, u
    else:
        b = mom * s1 + c1 * g  # Alg. 1 line 2 (1 * g == g exactly without dampening)
        if NESTEROV:
            u = g + mom * b
        else:
            u = b
        return b, b, u


def _combine(ka, kga, wwa, wga, gga, wua, wxa, kb, kgb, wwb, wgb, ggb, wub, wxb):
    """Two sets of scaled sums (w scaled by 2^-ka, g by 2^-kga; and by 2^-kb, 2^-kgb) as one, scaled by
    the larger exponents: the exact powers of two ``projection._layer`` uses (rho, sigma). ``wu`` and
    ``wx`` are scaled by w's power only."""
    kw = tl.where(ka > kb, ka, kb)
    kg = tl.where(kga > kgb, kga, kgb)
    ra = _pow2(ka - kw)
    rb = _pow2(kb - kw)
    sa = _pow2(kga - kg)
    sb = _pow2(kgb - kg)
    return (kw, kg, wwa * (ra * ra) + wwb * (rb * rb), wga * (ra * sa) + wgb * (rb * sb),
            gga * (sa * sa) + ggb * (sb * sb), wua * ra + wub * rb, wxa * ra + wxb * rb)


def _row(parts, first, nchunk, rm):
    """The statistics of the rows whose first part is ``first`` (a vector, masked by ``rm``): their
    ``nchunk`` parts combined (one part unless a row is longer than a tile). The last one, ``wgx``, is
    ~w.g with w alone scaled (caution's radial part of g: ``projection.project_update_parts``)."""
    p = first * NSTAT
    kw = tl.load(parts + p + S_KW, mask=rm, other=0.0)
    kg = tl.load(parts + p + S_KG, mask=rm, other=0.0)
    ww = tl.load(parts + p + S_WW, mask=rm, other=0.0)
    wg = tl.load(parts + p + S_WG, mask=rm, other=0.0)
    gg = tl.load(parts + p + S_GG, mask=rm, other=0.0)
    wu = tl.load(parts + p + S_WU, mask=rm, other=0.0)
    wgx = wg * _pow2(kg)
    for j in range(1, nchunk):
        q = p + j * NSTAT
        kgj = tl.load(parts + q + S_KG, mask=rm, other=0.0)
        wgj = tl.load(parts + q + S_WG, mask=rm, other=0.0)
        kw, kg, ww, wg, gg, wu, wgx = _combine(
            kw, kg, ww, wg, gg, wu, wgx,
            tl.load(parts + q + S_KW, mask=rm, other=0.0), kgj, tl.load(parts + q + S_WW, mask=rm, other=0.0),
            wgj, tl.load(parts + q + S_GG, mask=rm, other=0.0), tl.load(parts + q + S_WU, mask=rm, other=0.0),
            wgj * _pow2(kgj))
    return kw, kg, ww, wg, gg, wu, wgx


def _cosine(wg, ww, gg, eps_w, eps_g):
    # torch's cosine_similarity clamps each norm at eps separately (eps times the scale of the sums)
    return tl.abs(wg) / (tl.maximum(tl.sqrt(ww), eps_w) * tl.maximum(tl.sqrt(gg), eps_g))


# -- the tiles -------------------------------------------------------------------------------------------


def _tile_info(tiles, meta, ptrs, tid):
    """Tile ``tid``: its tensor, rows, columns and part, the tensor's layout and addresses (scalars)."""
    t = tiles + tid * NTILE
    i = tl.load(t + T_TENSOR)
    m = meta + i * NMETA
    pt = ptrs + i * NPTR
    return (i, tl.load(t + T_ROW), tl.load(t + T_NROWS), tl.load(t + T_COL), tl.load(t + T_COLEND),
            tl.load(t + T_CHUNK), tl.load(m + M_LEN), tl.load(m + M_NCHUNK), tl.load(m + M_PART0),
            tl.load(m + M_ROW0), tl.load(m + M_PROJECT) != 0, tl.load(m + M_WIDE) != 0, tl.load(pt + P_W),
            tl.load(pt + P_G), tl.load(pt + P_S1), tl.load(pt + P_S2), tl.load(pt + P_STEP))


def _block(row0, nrows, c, col_end, length, R: tl.constexpr, C: tl.constexpr):
    """The (R, C) block of a tile at column ``c``: row indices, the row mask, the element mask, the offsets."""
    j = tl.arange(0, R)
    rows = row0 + j
    rmask = j < nrows
    col = c + tl.arange(0, C)
    mask = rmask[:, None] & (col < col_end)[None, :]
    return rows, rmask, mask, rows[:, None] * length + col[None, :]


def _inputs(pw, pg, ps1, ps2, offs, mask, mom, c1, b2, c2, sbc2, eps, OPT: tl.constexpr, NESTEROV: tl.constexpr,
            WK: tl.constexpr, S1K: tl.constexpr, S2K: tl.constexpr, CDT: tl.constexpr):
    """w, g, the new state and u on one block (masked entries 0)."""
    g = _load(pg, offs, mask, WK, CDT)
    w = _load(pw, offs, mask, WK, CDT)
    s1 = _load(ps1, offs, mask, S1K, CDT)
    if OPT == 0:
        s2 = _load(ps2, offs, mask, S2K, CDT)
    else:
        s2 = s1
    n1, n2, u = _direction(g, s1, s2, mom, c1, b2, c2, sbc2, eps, OPT, NESTEROV, CDT)
    return w, g, n1, n2, u


def _stats_tile(parts, row0, nrows, col0, col_end, chunk, length, nchunk, part0, pw, pg, ps1, ps2, mom, c1, b2,
                c2, sbc2, eps, OPT: tl.constexpr, NESTEROV: tl.constexpr, WK: tl.constexpr, S1K: tl.constexpr,
                S2K: tl.constexpr, CDT: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    j = tl.arange(0, R)
    rmask = j < nrows
    kw = tl.full((R,), 0.0, tl.float64)
    kg = tl.full((R,), 0.0, tl.float64)
    if WK == F64:
        # Float64 params: sums on the rows scaled by powers of two (exact; projection.row_stats), so that
        # they are finite wherever the true norms are: the largest finite |entry| of each row part first.
        mw = tl.full((R, C), 0.0, tl.float64)
        mg = tl.full((R, C), 0.0, tl.float64)
        for c in range(col0, col_end, C):
            rows, rmask, mask, offs = _block(row0, nrows, c, col_end, length, R, C)
            aw = tl.abs(_load(pw, offs, mask, WK, CDT))
            ag = tl.abs(_load(pg, offs, mask, WK, CDT))
            mw = tl.where((aw > mw) & (aw <= F64_MAX), aw, mw)
            mg = tl.where((ag > mg) & (ag <= F64_MAX), ag, mg)
        kw = _exponent(_max(mw, axis=1))
        kg = _exponent(_max(mg, axis=1))
    sw = _pow2(-kw)[:, None]
    sg = _pow2(-kg)[:, None]
    # Float32 and 16-bit params: float64 sums of their products are exact enough and cannot overflow or
    # underflow (|x|^2 <= 2^256), so no scaling (kw = kg = 0, s = 1).
    acc_wg = tl.full((R, C), 0.0, tl.float64)
    acc_ww = tl.full((R, C), 0.0, tl.float64)
    acc_gg = tl.full((R, C), 0.0, tl.float64)
    acc_wu = tl.full((R, C), 0.0, tl.float64)
    for c in range(col0, col_end, C):
        rows, rmask, mask, offs = _block(row0, nrows, c, col_end, length, R, C)
        w, g, n1, n2, u = _inputs(pw, pg, ps1, ps2, offs, mask, mom, c1, b2, c2, sbc2, eps, OPT, NESTEROV, WK,
                                  S1K, S2K, CDT)
        ws = tl.where(mask, w.to(tl.float64) * sw, 0.0)
        gs = tl.where(mask, g.to(tl.float64) * sg, 0.0)
        acc_wg += ws * gs
        acc_ww += ws * ws
        acc_gg += gs * gs
        acc_wu += ws * tl.where(mask, u.to(tl.float64), 0.0)
    p = parts + (part0 + (row0 + j) * nchunk + chunk) * NSTAT
    tl.store(p + S_WG, _sum(acc_wg, axis=1), mask=rmask)
    tl.store(p + S_WW, _sum(acc_ww, axis=1), mask=rmask)
    tl.store(p + S_GG, _sum(acc_gg, axis=1), mask=rmask)
    tl.store(p + S_WU, _sum(acc_wu, axis=1), mask=rmask)
    tl.store(p + S_KW, kw, mask=rmask)
    tl.store(p + S_KG, kg, mask=rmask)


def stats(tiles, meta, ptrs, parts, lr_b, mom_b, c1_b, b2_b, c2_b, lb1_b, lb2_b, eps_b, OPT: tl.constexpr,
          NESTEROV: tl.constexpr, WK: tl.constexpr, S1K: tl.constexpr, S2K: tl.constexpr, CDT: tl.constexpr):
    """Pass 1 (one program per tile): the statistics of its row parts."""
    i, row0, nrows, col0, col_end, chunk, length, nchunk, part0, crow0, project, wide, pw, pg, ps1, ps2, pstep = \
        _tile_info(tiles, meta, ptrs, tl.program_id(0))
    sbc2 = tl.full((), 1.0, CDT)
    if OPT == 0:  # the new step count's bias correction (decide computes the same value)
        t = tl.load(pstep.to(tl.pointer_type(tl.int64))) + 1
        sbc2 = _adamp_scalars(t, _f64(lr_b), _f64(lb1_b), _f64(lb2_b))[1].to(CDT)
    mom = _f64(mom_b).to(CDT)
    c1 = _f64(c1_b).to(CDT)
    b2 = _f64(b2_b).to(CDT)
    c2 = _f64(c2_b).to(CDT)
    eps = _f64(eps_b).to(CDT)
    if wide:
        _stats_tile(parts, row0, nrows, col0, col_end, chunk, length, nchunk, part0, pw, pg, ps1, ps2, mom, c1, b2,
                    c2, sbc2, eps, OPT, NESTEROV, WK, S1K, S2K, CDT, 1, WIDE_C)
    else:
        _stats_tile(parts, row0, nrows, col0, col_end, chunk, length, nchunk, part0, pw, pg, ps1, ps2, mom, c1, b2,
                    c2, sbc2, eps, OPT, NESTEROV, WK, S1K, S2K, CDT, TILE_R, TILE_C)


def decide(meta, ptrs, parts, coef, scal, okout, skipout, lr_b, wd_b, delta_b, ratio_b, eps_b, lb1_b, lb2_b,
           mu_b, OPT: tl.constexpr, SKIP: tl.constexpr, CDT: tl.constexpr, RB: tl.constexpr):
    """Pass 2: one program per tensor. The scale-invariance test on the channel view, then on the layer
    view from the rows' sums (Alg. 2 lines 5-9, Alg. 1 lines 3-7), the per-row coefficients of the
    projection, the decay, the step size; the step count advanced where the tensor is written."""
    i = tl.program_id(0)
    m = meta + i * NMETA
    n_rows = tl.load(m + M_ROWS)
    length = tl.load(m + M_LEN)
    nchunk = tl.load(m + M_NCHUNK)
    first = tl.load(m + M_PART0)
    row0 = tl.load(m + M_ROW0)
    project = tl.load(m + M_PROJECT) != 0
    eps = _f64(eps_b).to(CDT).to(tl.float64)  # eps as the compute dtype holds it (projection.py: eps_a)
    delta = _f64(delta_b)
    thr_c = delta / tl.sqrt(length.to(tl.float64))  # delta / sqrt(row length)
    thr_l = delta / tl.sqrt((n_rows * length).to(tl.float64))  # delta / sqrt(size)
    channel = n_rows > 0
    kw_l = tl.full((), NEG, tl.float64)  # loop-carried float64 scalars (the layer view's running sums)
    kg_l = tl.full((), NEG, tl.float64)
    ww_l = tl.full((), 0.0, tl.float64)
    wg_l = tl.full((), 0.0, tl.float64)
    gg_l = tl.full((), 0.0, tl.float64)
    wu_l = tl.full((), 0.0, tl.float64)
    wgx_l = tl.full((), 0.0, tl.float64)
    n_bad = tl.full((), 0.0, tl.float64)
    for r0 in range(0, n_rows, RB):
        r = r0 + tl.arange(0, RB)
        rm = r < n_rows
        kw, kg, ww, wg, gg, wu, wgx = _row(parts, first + r * nchunk, nchunk, rm)
        cos = _cosine(wg, ww, gg, eps * _pow2(-kw), eps * _pow2(-kg))
        channel = channel & (_min(tl.where(rm & ~(cos < thr_c), 0, 1), axis=0) == 1)  # NaN never passes
        kwb = _max(tl.where(rm, kw, NEG), axis=0)
        kgb = _max(tl.where(rm, kg, NEG), axis=0)
        rho = tl.where(rm, _pow2(kw - kwb), 0.0)
        sig = tl.where(rm, _pow2(kg - kgb), 0.0)
        kw_l, kg_l, ww_l, wg_l, gg_l, wu_l, wgx_l = _combine(
            kw_l, kg_l, ww_l, wg_l, gg_l, wu_l, wgx_l, kwb, kgb,
            _sum(tl.where(rm, ww * (rho * rho), 0.0), axis=0), _sum(tl.where(rm, wg * (rho * sig), 0.0), axis=0),
            _sum(tl.where(rm, gg * (sig * sig), 0.0), axis=0), _sum(tl.where(rm, wu * rho, 0.0), axis=0),
            _sum(tl.where(rm, wgx * rho, 0.0), axis=0))
        n_bad += _sum(tl.where(rm & ~(gg <= F64_MAX), 1.0, 0.0), axis=0)  # rows with a NaN/inf grad entry
    s_l = _pow2(-kw_l)
    cos_l = _cosine(wg_l, ww_l, gg_l, eps * s_l, eps * _pow2(-kg_l))
    channel = channel & project
    layer = project & ~channel & (cos_l < thr_l)
    ok = n_bad >= 0.0  # true: the count is never NaN
    if SKIP:
        ok = n_bad == 0.0
    # The per-tensor scalars: ratio = wd_ratio where projected (Alg. 2 line 10), decay before the step.
    lr = _f64(lr_b)
    wd = _f64(wd_b)
    ratio = tl.where(channel | layer, _f64(ratio_b), 1.0)
    sv = scal + i * NV
    if OPT == 0:
        step_ptr = tl.load(ptrs + i * NPTR + P_STEP).to(tl.pointer_type(tl.int64))
        t0 = tl.load(step_ptr)
        step_size, sbc2 = _adamp_scalars(t0 + 1, lr, _f64(lb1_b), _f64(lb2_b))
        decay = tl.where(wd == 0.0, 1.0, 1.0 - lr * wd * ratio)
        tl.store(step_ptr, t0 + ok.to(tl.int64))  # the step count, advanced where written (sync-free)
    else:
        step_size = lr
        sbc2 = tl.full((), 1.0, tl.float64)
        decay = tl.where(wd == 0.0, 1.0, 1.0 - lr * wd * ratio / (1.0 - _f64(mu_b)))  # official sgdp.py
    n_l = tl.sqrt(ww_l) + eps * s_l
    tl.store(sv + V_DECAY, decay)
    tl.store(sv + V_STEP, step_size)
    tl.store(sv + V_SBC2, sbc2)
    tl.store(sv + V_OK, ok.to(tl.float64))
    tl.store(sv + V_CHANNEL, channel.to(tl.float64))
    tl.store(sv + V_LAYER, layer.to(tl.float64))
    tl.store(sv + V_KWL, kw_l)
    tl.store(sv + V_NL, n_l)
    tl.store(okout + i, ok.to(tl.int8))
    tl.store(skipout + i, 1 - ok.to(tl.int64))
    # sum_row(w_n x) w_n = w (w.x) / (|w| + eps)^2 per row (channel) or for the tensor (layer); as a
    # multiple of the unscaled w: s_r ~w.x / (|~w| + eps s_r)^2 (projection.project_update_parts), for
    # x = u (the projection) and x = g (caution's tangential gradient).
    coef_l = s_l * (wu_l / n_l / n_l)
    coefg_l = s_l * (wgx_l / n_l / n_l)
    for r0 in range(0, n_rows, RB):
        r = r0 + tl.arange(0, RB)
        rm = r < n_rows
        kw, kg, ww, wg, gg, wu, wgx = _row(parts, first + r * nchunk, nchunk, rm)
        s = _pow2(-kw)
        n_c = tl.sqrt(ww) + eps * s
        cr = coef + (row0 + r) * NCOEF
        tl.store(cr + C_PROJ, tl.where(channel, s * (wu / n_c / n_c), tl.where(layer, coef_l, 0.0)), mask=rm)
        tl.store(cr + C_GRAD, tl.where(channel, s * (wgx / n_c / n_c), tl.where(layer, coefg_l, 0.0)), mask=rm)
        tl.store(cr + C_KW, kw, mask=rm)
        tl.store(cr + C_NC, n_c, mask=rm)


def _caution_tile(parts, cparts, coef, row0, nrows, col0, col_end, chunk, length, nchunk, part0, crow0, project,
                  pw, pg, ps1, ps2, mom, c1, b2, c2, sbc2, eps, OPT: tl.constexpr, NESTEROV: tl.constexpr,
                  WK: tl.constexpr, S1K: tl.constexpr, S2K: tl.constexpr, CDT: tl.constexpr, R: tl.constexpr,
                  C: tl.constexpr):
    j = tl.arange(0, R)
    rmask = j < nrows
    crow = (crow0 + row0 + j) * NCOEF
    c_u = tl.load(coef + crow + C_PROJ, mask=rmask, other=0.0).to(CDT)[:, None]
    c_g = tl.load(coef + crow + C_GRAD, mask=rmask, other=0.0).to(CDT)[:, None]
    part = part0 + (row0 + j) * nchunk + chunk
    sw = _pow2(-tl.load(parts + part * NSTAT + S_KW, mask=rmask, other=0.0))[:, None]  # the part's scale
    acc_n = tl.full((R, C), 0.0, tl.float64)
    acc_wq = tl.full((R, C), 0.0, tl.float64)
    for c in range(col0, col_end, C):
        rows, rmask, mask, offs = _block(row0, nrows, c, col_end, length, R, C)
        w, g, n1, n2, u = _inputs(pw, pg, ps1, ps2, offs, mask, mom, c1, b2, c2, sbc2, eps, OPT, NESTEROV, WK,
                                  S1K, S2K, CDT)
        q = tl.where(project, u - w * c_u, u)
        keep = mask & ((q * tl.where(project, g - w * c_g, g)) > 0)
        acc_n += keep.to(tl.float64)
        acc_wq += tl.where(keep, (w.to(tl.float64) * sw) * q.to(tl.float64), 0.0)
    tl.store(cparts + part * NCSTAT + K_COUNT, _sum(acc_n, axis=1), mask=rmask)
    tl.store(cparts + part * NCSTAT + K_WQ, _sum(acc_wq, axis=1), mask=rmask)


def cstats(tiles, meta, ptrs, parts, cparts, coef, scal, mom_b, c1_b, b2_b, c2_b, eps_b, OPT: tl.constexpr,
           NESTEROV: tl.constexpr, WK: tl.constexpr, S1K: tl.constexpr, S2K: tl.constexpr, CDT: tl.constexpr):
    """Caution, pass 3 (one program per tile): per row part, the entries of q = Pi(u) that agree in sign
    with g's tangential part Pi(g) (g itself where nothing is projected), and ~w.q over them."""
    i, row0, nrows, col0, col_end, chunk, length, nchunk, part0, crow0, project, wide, pw, pg, ps1, ps2, pstep = \
        _tile_info(tiles, meta, ptrs, tl.program_id(0))
    sbc2 = tl.load(scal + i * NV + V_SBC2).to(CDT)
    mom = _f64(mom_b).to(CDT)
    c1 = _f64(c1_b).to(CDT)
    b2 = _f64(b2_b).to(CDT)
    c2 = _f64(c2_b).to(CDT)
    eps = _f64(eps_b).to(CDT)
    if wide:
        _caution_tile(parts, cparts, coef, row0, nrows, col0, col_end, chunk, length, nchunk, part0, crow0, project,
                      pw, pg, ps1, ps2, mom, c1, b2, c2, sbc2, eps, OPT, NESTEROV, WK, S1K, S2K, CDT, 1, WIDE_C)
    else:
        _caution_tile(parts, cparts, coef, row0, nrows, col0, col_end, chunk, length, nchunk, part0, crow0, project,
                      pw, pg, ps1, ps2, mom, c1, b2, c2, sbc2, eps, OPT, NESTEROV, WK, S1K, S2K, CDT, TILE_R, TILE_C)


def _crow(parts, cparts, coef, first, nchunk, crow, rm, RB: tl.constexpr):
    """A row's kept count and ~w.q (the parts' sums rescaled to the row's power of two)."""
    kw = tl.load(coef + crow + C_KW, mask=rm, other=0.0)
    count = tl.full((RB,), 0.0, tl.float64)
    wq = tl.full((RB,), 0.0, tl.float64)
    for j in range(0, nchunk):
        q = first + j
        count += tl.load(cparts + q * NCSTAT + K_COUNT, mask=rm, other=0.0)
        r = _pow2(tl.load(parts + q * NSTAT + S_KW, mask=rm, other=0.0) - kw)
        wq += tl.load(cparts + q * NCSTAT + K_WQ, mask=rm, other=0.0) * r
    return kw, count, wq


def cdecide(meta, cparts, parts, coef, scal, RB: tl.constexpr):
    """Caution, pass 4 (one program per tensor): the kept fraction over the whole tensor, its scale
    1 / max(fraction, 1e-3) (timm's mask.mean().clamp_(min=1e-3)), and per row the coefficient of the
    second projection of the masked update (where the tensor is projected)."""
    i = tl.program_id(0)
    m = meta + i * NMETA
    n_rows = tl.load(m + M_ROWS)
    length = tl.load(m + M_LEN)
    nchunk = tl.load(m + M_NCHUNK)
    first = tl.load(m + M_PART0)
    row0 = tl.load(m + M_ROW0)
    sv = scal + i * NV
    channel = tl.load(sv + V_CHANNEL) != 0.0
    layer = tl.load(sv + V_LAYER) != 0.0
    kw_l = tl.load(sv + V_KWL)
    total = tl.full((), 0.0, tl.float64)
    wq_l = tl.full((), 0.0, tl.float64)
    for r0 in range(0, n_rows, RB):
        r = r0 + tl.arange(0, RB)
        rm = r < n_rows
        kw, count, wq = _crow(parts, cparts, coef, first + r * nchunk, nchunk, (row0 + r) * NCOEF, rm, RB)
        total += _sum(count, axis=0)
        wq_l += _sum(tl.where(rm, wq * _pow2(kw - kw_l), 0.0), axis=0)
    mean = total / tl.maximum(n_rows * length, 1).to(tl.float64)
    scale = 1.0 / tl.maximum(mean, 1e-3)
    tl.store(sv + V_CSCALE, scale)
    n_l = tl.load(sv + V_NL)
    coef_l = scale * (_pow2(-kw_l) * (wq_l / n_l / n_l))
    for r0 in range(0, n_rows, RB):
        r = r0 + tl.arange(0, RB)
        rm = r < n_rows
        kw, count, wq = _crow(parts, cparts, coef, first + r * nchunk, nchunk, (row0 + r) * NCOEF, rm, RB)
        cr = coef + (row0 + r) * NCOEF
        n_c = tl.load(cr + C_NC, mask=rm, other=1.0)
        c = tl.where(channel, scale * (_pow2(-kw) * (wq / n_c / n_c)), tl.where(layer, coef_l, 0.0))
        tl.store(cr + C_CAUTION, c, mask=rm)


def _update_tile(coef, row0, nrows, col0, col_end, length, crow0, project, pw, pg, ps1, ps2, mom, c1, b2, c2,
                 sbc2, eps, ok, decay, step, cscale, OPT: tl.constexpr, NESTEROV: tl.constexpr,
                 STORE_Q: tl.constexpr, CAUTION: tl.constexpr, WK: tl.constexpr, S1K: tl.constexpr,
                 S2K: tl.constexpr, CDT: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    j = tl.arange(0, R)
    rmask = j < nrows
    crow = (crow0 + row0 + j) * NCOEF
    c_u = tl.load(coef + crow + C_PROJ, mask=rmask, other=0.0).to(CDT)[:, None]
    if CAUTION:
        c_g = tl.load(coef + crow + C_GRAD, mask=rmask, other=0.0).to(CDT)[:, None]
        c_q = tl.load(coef + crow + C_CAUTION, mask=rmask, other=0.0).to(CDT)[:, None]
    for c in range(col0, col_end, C):
        rows, rmask, mask, offs = _block(row0, nrows, c, col_end, length, R, C)
        mask = tl.where(ok, mask, False)  # a skipped tensor: nothing read or written
        w, g, n1, n2, u = _inputs(pw, pg, ps1, ps2, offs, mask, mom, c1, b2, c2, sbc2, eps, OPT, NESTEROV, WK,
                                  S1K, S2K, CDT)
        # Alg. 2 line 8, Alg. 1 line 6: the radial part removed (c_u = 0 where neither view is projected; a
        # 1-d or 0-d param keeps u itself, as the array-API step, which never forms u - w * 0 for it)
        q = tl.where(project, u - w * c_u, u)
        upd = q
        if CAUTION:
            # timm's cautious step (adamp_core.caution): keep the entries where q agrees in sign with g's
            # tangential part (g itself where not projected), rescale by the kept fraction, project again.
            keep = (q * tl.where(project, g - w * c_g, g)) > 0
            qc = q * tl.where(keep, cscale, 0.0)  # q * phi (caution.caution_factor)
            upd = tl.where(project, qc - w * c_q, qc)  # c_q = 0 where not projected: qc itself
        if OPT == 0:
            _store(ps1, offs, n1, mask, S1K)
            _store(ps2, offs, n2, mask, S2K)
        elif STORE_Q:
            # adamp 0.3.0 projects the momentum buffer itself in place: the stored buffer is q (sgdp.py)
            _store(ps1, offs, tl.where(project, q, n1), mask, S1K)
        else:
            _store(ps1, offs, n1, mask, S1K)
        _store(pw, offs, w * decay + (-step) * upd, mask, WK)  # Alg. 2 lines 10-11: decay, then the step


def update(tiles, meta, ptrs, coef, scal, mom_b, c1_b, b2_b, c2_b, eps_b, OPT: tl.constexpr,
           NESTEROV: tl.constexpr, STORE_Q: tl.constexpr, CAUTION: tl.constexpr, WK: tl.constexpr,
           S1K: tl.constexpr, S2K: tl.constexpr, CDT: tl.constexpr):
    """Pass 3 (one program per tile): the state update, the projection, the decay and the step, in place."""
    i, row0, nrows, col0, col_end, chunk, length, nchunk, part0, crow0, project, wide, pw, pg, ps1, ps2, pstep = \
        _tile_info(tiles, meta, ptrs, tl.program_id(0))
    sv = scal + i * NV
    ok = tl.load(sv + V_OK) != 0.0
    sbc2 = tl.load(sv + V_SBC2).to(CDT)
    decay = tl.load(sv + V_DECAY).to(CDT)
    step = tl.load(sv + V_STEP).to(CDT)
    cscale = tl.full((), 1.0, CDT)
    if CAUTION:
        cscale = tl.load(sv + V_CSCALE).to(CDT)
    mom = _f64(mom_b).to(CDT)
    c1 = _f64(c1_b).to(CDT)
    b2 = _f64(b2_b).to(CDT)
    c2 = _f64(c2_b).to(CDT)
    eps = _f64(eps_b).to(CDT)
    if wide:
        _update_tile(coef, row0, nrows, col0, col_end, length, crow0, project, pw, pg, ps1, ps2, mom, c1, b2, c2,
                     sbc2, eps, ok, decay, step, cscale, OPT, NESTEROV, STORE_Q, CAUTION, WK, S1K, S2K, CDT, 1,
                     WIDE_C)
    else:
        _update_tile(coef, row0, nrows, col0, col_end, length, crow0, project, pw, pg, ps1, ps2, mom, c1, b2, c2,
                     sbc2, eps, ok, decay, step, cscale, OPT, NESTEROV, STORE_Q, CAUTION, WK, S1K, S2K, CDT,
                     TILE_R, TILE_C)


# -- build -----------------------------------------------------------------------------------------------

_HELPERS = ("_sum", "_max", "_min", "_f64", "_pow2", "_exponent", "_expm1", "_sqrt", "_div", "_load", "_store",
            "_adamp_scalars", "_direction", "_combine", "_row", "_cosine", "_tile_info", "_block", "_inputs",
            "_stats_tile", "_caution_tile", "_update_tile", "_crow")
KERNELS = ("stats", "decide", "cstats", "cdecide", "update")


def build(interpret: bool) -> types.SimpleNamespace:
    """The kernels decorated with ``triton.jit`` for Triton's interpreter (``interpret``: CPU tensors) or for
    the GPU. Each build is a copy of these functions with its own globals, so both can live in one
    process (the decoration reads ``TRITON_INTERPRET``, set here for its duration)."""
    names = (*_HELPERS, *KERNELS)
    env = dict(globals())
    for name in names:
        env[name] = types.FunctionType(globals()[name].__code__, env, name)
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        # Under the interpreter the helpers stay plain Python functions, which it runs as they are: a call to
        # a decorated one costs milliseconds there (it patches triton.language anew for every call).
        for name in KERNELS if interpret else names:
            # Hyperparameters (float64 bits, "*_b") are not specialized on their value: a bit pattern equal to
            # 1 would become a constant (and every new value a recompilation).
            bits = [a for a in env[name].__code__.co_varnames[:env[name].__code__.co_argcount] if a.endswith("_b")]
            env[name] = triton.jit(env[name], do_not_specialize=bits) if name in KERNELS else triton.jit(env[name])
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return types.SimpleNamespace(**{k: env[k] for k in KERNELS}, interpret=interpret)
