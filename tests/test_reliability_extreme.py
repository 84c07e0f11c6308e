"""Extreme values (issue 9): weights and gradients whose naive sums of squares overflow or underflow,
zero weights, empty arrays, 0-d params, rows of length 1.

The reference is adamp 0.3.0's update written out here in NumPy in a wider type, where nothing
overflows or underflows: float64 for float32 inputs (1e19**2 and 1e-20**2 are ordinary float64
numbers) and x87 extended precision (``np.longdouble``, exponent range 1e+-4932) for float64 inputs.
Each step starts from our own previous state, so every step is compared on identical inputs; the
scale-invariance decision must be the same, everything must stay finite, and params and states must
agree to the dtype's precision: ``|ours - ref| <= rtol * max|ref| + 2 * smallest_normal`` (the second
term only admits values below the normal range, which float32 state cannot hold exactly, e.g. the
second moment of a 1e-20 gradient; some backends flush those to zero).

Before the power-of-two scaling in ``adamp_core/projection.py``, the float32 cases at 1e19 gave
``inf``/``nan`` cosines (no projection where the reference projects, or NaN updates) and the 1e-20
cases with a small ``eps`` projected with the wrong norm.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

import adamp_core as ac
from adamp_xp.testing.backends import BACKENDS
from adamp_xp.testing.oracle import make_grad

RTOL = {"float32": 1e-5, "float64": 1e-12}
STEPS = 3
# (optimizer, hyperparameters); eps is set per case
HP = {
    "adamp": dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, delta=0.1, wd_ratio=0.1, nesterov=False),
    "sgdp": dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False, delta=0.1, wd_ratio=0.1),
}
# float32: squares of 1e19 (1e38) fit, a sum of 27 of them does not; squares of 1e-20 are below the
# normal range. float64: the same at 5e153 (27 squares > 1.8e308) and 1e-170 (square < 1e-308).
BIG = {"float32": 1e19, "float64": 5e153}
TINY = {"float32": 1e-20, "float64": 1e-170}
WIDE = {"float32": np.float64, "float64": np.longdouble}
LONGDOUBLE_OK = np.finfo(np.longdouble).maxexp > 1024  # x87 extended (Linux x86-64); not on every platform


# ---------------------------------------------------------------------------------------------
# The reference: adamp 0.3.0's step, written out independently, in a wide type.


def _cos(x, y, eps):
    """torch.nn.functional.cosine_similarity row by row (each norm clamped at eps)."""
    nx = np.sqrt(np.sum(x * x, axis=1))
    ny = np.sqrt(np.sum(y * y, axis=1))
    return np.abs(np.sum(x * y, axis=1)) / (np.maximum(nx, eps) * np.maximum(ny, eps))


def _project(w, g, u, delta, eps):
    """adamp 0.3.0's _projection: (u, view, wd factor)."""
    if w.ndim <= 1 or w.size == 0:
        return u, 0, 1.0
    for view, shape in ((1, (w.shape[0], -1)), (2, (1, -1))):
        wv, gv, uv = w.reshape(shape), g.reshape(shape), u.reshape(shape)
        if np.max(_cos(gv, wv, eps)) < delta / math.sqrt(wv.shape[1]):
            wn = wv / (np.sqrt(np.sum(wv * wv, axis=1, keepdims=True)) + eps)
            return (uv - wn * np.sum(wn * uv, axis=1, keepdims=True)).reshape(w.shape), view, None
    return u, 0, 1.0


def reference_step(optimizer, w, g, state, hp, t, wide):
    """One step in the wide type; returns (w, state arrays dict, view)."""
    w, g = w.astype(wide), g.astype(wide)
    eps = wide(hp["eps"])
    lr, wd = wide(hp["lr"]), wide(hp["weight_decay"])
    if optimizer == "adamp":
        b1, b2 = (wide(b) for b in hp["betas"])
        m = b1 * state["exp_avg"].astype(wide) + (1 - b1) * g
        v = b2 * state["exp_avg_sq"].astype(wide) + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        u = m / (np.sqrt(v) / np.sqrt(bc2) + eps)
        u, view, r = _project(w, g, u, hp["delta"], eps)
        r = wide(hp["wd_ratio"]) if r is None else wide(r)
        w = w * (1 - lr * wd * r) - lr / bc1 * u
        return w, {"exp_avg": m, "exp_avg_sq": v}, view
    mu = wide(hp["momentum"])
    buf = mu * state["momentum"].astype(wide) + g
    u, view, r = _project(w, g, buf, hp["delta"], eps)
    r = wide(hp["wd_ratio"]) if r is None else wide(r)
    w = w * (1 - lr * wd * r / (1 - mu)) - lr * u
    return w, {"momentum": u}, view  # the stored buffer is the projected one (adamp 0.3.0)


def test_reference_is_adamp_0_3_0():
    """The written-out reference agrees with the official package (so it is a fair judge)."""
    adamp = pytest.importorskip("adamp")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for optimizer in ("adamp", "sgdp"):
        for regime in ("channel", "layer", "none"):
            hp = {**HP[optimizer], "eps": 1e-8}
            w = rng.standard_normal((4, 2, 3))
            p = torch.nn.Parameter(torch.from_numpy(w.copy()))
            cls = adamp.AdamP if optimizer == "adamp" else adamp.SGDP
            official = cls([p], **hp)
            state = (
                {"exp_avg": np.zeros_like(w), "exp_avg_sq": np.zeros_like(w)}
                if optimizer == "adamp"
                else {"momentum": np.zeros_like(w)}
            )
            for t in range(1, 4):
                g = make_grad(w, regime, rng)
                p.grad = torch.from_numpy(g.copy())
                official.step()
                w, state, _ = reference_step(optimizer, w, g, state, hp, t, np.float64)
                np.testing.assert_allclose(w, p.detach().numpy(), rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Our steps on every backend


def _tolerance_check(ours, ref, dtype, what):
    ours = np.asarray(ours, dtype=np.float64)
    ref64 = np.asarray(ref, dtype=np.float64)  # the wide value, rounded (as a float32 result would be) to float64
    assert ours.shape == ref64.shape, what
    assert np.all(np.isfinite(ours)), f"{what}: not finite: {ours}"
    if ours.size == 0:
        return
    # Differences in the wide type (float64 may not hold |ref| at 1e160 squared, but holds the difference).
    scale = float(np.max(np.abs(ref64)))
    err = float(np.max(np.abs(ours.astype(ref.dtype) - ref)))
    bound = RTOL[dtype] * scale + 2 * float(np.finfo(dtype).smallest_normal)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (max |ref| {scale:.3g})"


def _run(backend, optimizer, dtype, w0, grads, eps, views=None):
    """STEPS steps of ours from w0; each compared with the reference started from our previous state.
    ``grads``: a list, or a function of (current weights as float64, step) giving the gradient."""
    hp = {**HP[optimizer], "eps": eps}
    wide = WIDE[dtype]
    w = backend.asarray(w0, dtype)
    init, step = (ac.adamp_init, ac.adamp_step) if optimizer == "adamp" else (ac.sgdp_init, ac.sgdp_step)
    state = init(w)
    seen = []
    for t in range(1, STEPS + 1):
        w_np = np.asarray(backend.to_numpy(w)).astype(dtype)
        g = backend.asarray(grads(w_np.astype(np.float64), t) if callable(grads) else grads[t - 1], dtype)
        st_np = {k: np.asarray(backend.to_numpy(v)).astype(dtype) for k, v in state._asdict().items() if k != "step"}
        g_np = np.asarray(backend.to_numpy(g)).astype(dtype)
        ref_w, ref_state, ref_view = reference_step(optimizer, w_np, g_np, st_np, hp, t, wide)
        if w_np.ndim > 1 and w_np.size:
            assert int(backend.to_numpy(ac.projected_view(w, g, hp["delta"], eps))) == ref_view, f"step {t}: view"
        seen.append(ref_view)
        w, state = step(w, g, state, **hp)
        assert str(w.dtype).endswith(dtype) and tuple(w.shape) == tuple(w0.shape)
        _tolerance_check(backend.to_numpy(w), ref_w, dtype, f"step {t}: param")
        for k, v in ref_state.items():
            _tolerance_check(backend.to_numpy(getattr(state, k)), v, dtype, f"step {t}: {k}")
    if views is not None:
        assert set(seen) == views, seen


def _grads(regime, g_scale, seed):
    """Gradients in ``regime`` for the current weights (normalised first: make_grad squares them), of size
    ``g_scale``; like the oracle, so the regime holds at every step."""
    rng = np.random.default_rng(seed)

    def grad(w, t):
        top = np.max(np.abs(w))
        return make_grad(w / top, regime, rng) * g_scale

    return grad


SHAPES = {"conv4d": (6, 3, 3, 3), "linear2d": (5, 12)}
SCALES = ("big", "tiny", "one")
REGIME_VIEWS = {"channel": {1}, "layer": {2}, "none": {0}}


def _value(dtype, which):
    return {"big": BIG[dtype], "tiny": TINY[dtype], "one": 1.0}[which]


def _cases():
    out = []
    for optimizer in ("adamp", "sgdp"):
        for w_s in SCALES:
            for g_s in SCALES:
                if w_s == g_s == "one":
                    continue
                for eps in (1e-8, 1e-30):
                    # AdamP stores v = (1 - b2) g^2: for a 1e-20 float32 gradient that is ~1e-43, below the
                    # normal range, so v itself has only a few bits. eps = 1e-8 hides it in the update
                    # (sqrt(v) ~ 1e-20 << eps); a tiny eps would expose a float32 storage limit, not a bug.
                    if optimizer == "adamp" and g_s == "tiny" and eps < 1e-20:
                        continue
                    out.append((optimizer, w_s, g_s, eps))
    return out


CASES = _cases()


def _over_backends(cases, runs_on):
    """``(backend, *case)`` params for the cases ``(id, values)`` that ``runs_on(backend, values)`` on each
    backend; an absent backend gets one skipped entry with its reason (reported, not hidden)."""
    out = []
    for b in BACKENDS:
        reason = b.skip_reason()
        if reason:
            out.append(pytest.param(b, *cases[0][1], id=f"{b.id}-absent", marks=pytest.mark.skip(reason=reason)))
            continue
        out += [pytest.param(b, *values, id=f"{b.id}-{cid}") for cid, values in cases if runs_on(b, values)]
    return out


FULL_GRID = ("numpy", "torch")  # eager JAX compiles every new op (slow): other libraries run a column
MAGNITUDE_CASES = [
    (f"{o}-w{w}-g{g}-eps{e:g}-{regime}", (o, w, g, e, regime))
    for regime in ("channel", "layer", "none")
    for o, w, g, e in CASES
]


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:underflow encountered")
@pytest.mark.parametrize(
    "backend,optimizer,w_s,g_s,eps,regime",
    _over_backends(
        MAGNITUDE_CASES,
        lambda b, c: b.library in FULL_GRID or (c[4] == "channel" and c[3] == 1e-30 and c[2] == "one"),
    ),
)
def test_extreme_magnitudes_float32(backend, optimizer, w_s, g_s, eps, regime):
    """float32 weights/grads near 1e19 and 1e-20: the naive |w|^2 overflows or underflows; ours does not."""
    shape = SHAPES["conv4d" if regime != "none" else "linear2d"]
    rng = np.random.default_rng(zlib.crc32(f"{w_s}{g_s}{regime}".encode()))
    w_unit = rng.standard_normal(shape)
    w0 = w_unit * _value("float32", w_s)
    # The regime fixes the view unless a norm is below eps (then torch's cosine clamps it at eps).
    views = REGIME_VIEWS[regime] if eps < 1e-20 or "tiny" not in (w_s, g_s) else None
    _run(backend, optimizer, "float32", w0, _grads(regime, _value("float32", g_s), 7), eps, views=views)


@pytest.mark.skipif(not LONGDOUBLE_OK, reason="np.longdouble is not wider than float64 on this platform")
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:underflow encountered")
@pytest.mark.parametrize("regime", ["channel", "layer"])
@pytest.mark.parametrize("optimizer,w_s,g_s,eps", CASES, ids=[f"{o}-w{w}-g{g}-eps{e:g}" for o, w, g, e in CASES])
def test_extreme_magnitudes_float64(optimizer, w_s, g_s, eps, regime):
    """The same in float64 at 5e153 and 1e-170 (NumPy), against an x87 extended-precision reference."""
    from adamp_xp.testing.backends import Backend

    if eps < 1e-20:
        eps = 1e-200  # below every |w| and |g| here except the tiny ones, as 1e-30 is for float32
    rng = np.random.default_rng(11)
    w_unit = rng.standard_normal(SHAPES["conv4d"])
    w0 = w_unit * _value("float64", w_s)
    views = REGIME_VIEWS[regime] if eps < 1e-20 or "tiny" not in (w_s, g_s) else None
    _run(Backend("numpy", "cpu"), optimizer, "float64", w0, _grads(regime, _value("float64", g_s), 5), eps, views=views)


def test_rows_of_very_different_magnitude():
    """Rows 1e-30 ... 1e30 in one float32 tensor, eps = 0: each row's cosine and projection are exact,
    because each row is scaled by its own power of two (a tensor-wide scale would underflow the small rows)."""
    rng = np.random.default_rng(5)
    rows = 7
    w = rng.standard_normal((rows, 9)) * np.logspace(-30, 30, rows)[:, None]
    g = make_grad(w / np.logspace(-30, 30, rows)[:, None], "channel", rng) * np.logspace(25, -25, rows)[:, None]
    w32, g32 = w.astype(np.float32), g.astype(np.float32)
    assert int(ac.projected_view(w32, g32, 0.1, 0.0)) == ac.VIEW_CHANNEL
    ref, _, view = reference_step(
        "sgdp", w32, g32, {"momentum": np.zeros_like(w32)}, {**HP["sgdp"], "eps": 0.0}, 1, np.float64
    )
    new, _ = ac.sgdp_step(w32, g32, ac.sgdp_init(w32), **{**HP["sgdp"], "eps": 0.0})
    assert view == 1
    # row by row: each row has its own scale, so compare each to its reference relatively
    for r in range(rows):
        err = np.max(np.abs(new[r].astype(np.float64) - ref[r])) / np.max(np.abs(ref[r]))
        assert err < 1e-5, (r, err)


# ---------------------------------------------------------------------------------------------
# Degenerate shapes and zero weights, at ordinary and extreme magnitudes


DEGENERATE = {
    "zero_weights": ((6, 3, 3, 3), "zero"),
    "zero_weights_zero_grads": ((5, 12), "zero-both"),
    "row_length_1": ((6, 1), "random"),
    "single_row": ((1, 16), "random"),
    "vector_1d": ((7,), "random"),
    "scalar_0d": ((), "random"),
    "empty_rows": ((0, 3), "random"),
    "empty_cols": ((3, 0), "random"),
    "empty_1d": ((0,), "random"),
    "empty_4d": ((2, 0, 3, 3), "random"),
}


JAX_DEGENERATE = ("zero_weights", "row_length_1", "scalar_0d", "empty_cols")


DEGENERATE_CASES = [
    (f"{name}-{optimizer}-{scale}", (name, optimizer, scale))
    for name in DEGENERATE
    for optimizer in ("adamp", "sgdp")
    for scale in ("one", "big", "tiny")
]


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:underflow encountered")
@pytest.mark.parametrize(
    "backend,name,optimizer,scale",
    _over_backends(DEGENERATE_CASES, lambda b, c: b.library in FULL_GRID or (c[2] == "one" and c[0] in JAX_DEGENERATE)),
)
def test_degenerate_shapes(backend, name, optimizer, scale):
    """Every degenerate shape at every magnitude on numpy and torch; a few at magnitude 1 elsewhere."""
    shape, kind = DEGENERATE[name]
    rng = np.random.default_rng(2)
    v = _value("float32", scale)
    w0 = np.zeros(shape) if kind.startswith("zero") else rng.standard_normal(shape) * v
    gs = [np.zeros(shape) if kind == "zero-both" else rng.standard_normal(shape) * v for _ in range(STEPS)]
    _run(backend, optimizer, "float32", w0, gs, 1e-8)


# ---------------------------------------------------------------------------------------------
# The adapters at extreme magnitudes: each runs its own bookkeeping (and may get a faster multi-tensor
# path), so each is held to the same wide reference, step by step, from its own previous state.

ADAPTER_CASES = [c for c in CASES if c[3] == 1e-30 or c[2] == "tiny"]  # per (w, g) scale: one eps, tiny if allowed
OPTAX_CASES = [c for c in ADAPTER_CASES if c[1:3] in (("big", "one"), ("tiny", "big"))]  # JAX compiles per case


def _adapter_run(entry, optimizer, dtype, w0, grads, eps):
    """STEPS steps of ``entry`` on one param of ``dtype``; yields (step, w before, grad, state before, w after,
    state after) as NumPy arrays, the states as dicts of the core's field names."""
    hp = {**HP[optimizer], "eps": eps}
    names = ("exp_avg", "exp_avg_sq") if optimizer == "adamp" else ("momentum",)
    dt = np.dtype(dtype)
    if entry == "torch":
        torch = pytest.importorskip("torch")
        import adamp_torch

        p = torch.nn.Parameter(torch.from_numpy(w0.astype(dt)))
        opt = (adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP)([p], **hp)

        def read():
            st = opt.state[p]
            return p.detach().numpy().copy(), {
                k: (st[k].numpy().copy() if k in st else np.zeros_like(w0, dt)) for k in names
            }

        def apply(g):
            p.grad = torch.from_numpy(g)
            opt.step()
    elif entry == "array":
        import adamp_array

        opt = (adamp_array.AdamP if optimizer == "adamp" else adamp_array.SGDP)([w0.astype(dt)], **hp)

        def read():
            st = opt.states[0]._asdict()
            return np.array(opt.params[0]), {k: np.array(st[k]) for k in names}

        def apply(g):
            opt.step([g])
    else:
        jax = pytest.importorskip("jax")
        import optax

        import adamp_optax

        kw = {("learning_rate" if k == "lr" else k): v for k, v in hp.items()}
        if optimizer == "adamp":
            kw["b1"], kw["b2"] = kw.pop("betas")
        tx = (adamp_optax.adamp if optimizer == "adamp" else adamp_optax.sgdp)(**kw)
        box = {"params": {"w": jax.numpy.asarray(w0.astype(dt))}}
        box["state"] = tx.init(box["params"])

        @jax.jit
        def update(params, state, g):
            updates, state = tx.update({"w": g}, state, params)
            return optax.apply_updates(params, updates), state

        def read():
            st = {k: getattr(box["state"], k)["w"] for k in names}
            return np.asarray(box["params"]["w"]).copy(), {k: np.asarray(st[k]).copy() for k in names}

        def apply(g):
            box["params"], box["state"] = update(box["params"], box["state"], jax.numpy.asarray(g))

    for t in range(1, STEPS + 1):
        w, st = read()
        g = np.asarray(grads(w.astype(np.float64), t)).astype(dt)
        apply(g)
        yield t, w, g, st, *read()


def _adapter_params():
    out = []
    for dtype in ("float32", "float64"):
        for entry in ("torch", "array", "optax"):
            for c in OPTAX_CASES if entry == "optax" else ADAPTER_CASES:
                if dtype == "float64" and (entry == "optax" or not LONGDOUBLE_OK):
                    continue
                out.append(pytest.param(entry, dtype, *c, id=f"{entry}-{dtype}-{c[0]}-w{c[1]}-g{c[2]}-eps{c[3]:g}"))
    return out


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:underflow encountered")
@pytest.mark.parametrize("entry,dtype,optimizer,w_s,g_s,eps", _adapter_params())
def test_adapters_at_extreme_magnitudes(entry, dtype, optimizer, w_s, g_s, eps):
    """float32 near 1e19 / 1e-20 and float64 near 5e153 / 1e-170 (where a fast path must fall back to the
    scaled step), through each adapter, against the wide reference from the adapter's own previous state."""
    if dtype == "float64" and eps < 1e-20:
        eps = 1e-200
    rng = np.random.default_rng(zlib.crc32(f"{w_s}{g_s}adapter".encode()))
    w0 = rng.standard_normal(SHAPES["conv4d"]) * _value(dtype, w_s)
    hp = {**HP[optimizer], "eps": eps}
    views = []
    grads = _grads("channel", _value(dtype, g_s), 9)
    for t, w, g, st, new_w, new_st in _adapter_run(entry, optimizer, dtype, w0, grads, eps):
        ref_w, ref_st, view = reference_step(optimizer, w, g, st, hp, t, WIDE[dtype])
        views.append(view)
        # optax returns new - old, added back by apply_updates: one more rounding of the param (relative 1e-7)
        _tolerance_check(new_w, ref_w, dtype, f"{entry} step {t}: param")
        for k, v in ref_st.items():
            _tolerance_check(new_st[k], v, dtype, f"{entry} step {t}: {k}")
    if eps < 1e-20 or "tiny" not in (w_s, g_s):
        assert views == [1] * STEPS, views  # the channel regime is seen at every magnitude
