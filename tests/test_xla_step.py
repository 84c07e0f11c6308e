"""The XLA formulation of the per-tensor step (issue 26) against the generic one, and what XLA makes of it.

Under JAX the step's reductions over rows run as variadic XLA reductions
(:func:`adamp_core.rows.fused_reduce`: the max-abs of ``w`` and ``g`` in one, the four row dot products in
another, each row-to-tensor reduction of several arrays in one); every other library reduces array by
array. Checked here: the fused reductions equal the separate ones (NaN included), the row statistics and
whole steps under ``jax.jit`` equal the NumPy step (the ground truth, not fused) step by step, in float64
within 1e-12 and in float32 within 1e-5, at ordinary and extreme magnitudes; and XLA's cost analysis of
one jitted step reads and writes fewer bytes per element than before (a count, not a time).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import adamp_core as ac  # noqa: E402
from adamp_core.projection import _LOCAL_ROWS, _decide, _row_absmax, _rowdots, row_stats  # noqa: E402
from adamp_core.rows import RowReduce, fused_reduce  # noqa: E402


def _np(x):
    return np.asarray(x)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_reduce_equals_separate_reductions(dtype):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((7, 33)).astype(dtype) for _ in range(3)]
    xs[1][2, 5] = np.nan  # a NaN propagates through max and min as jnp.max does
    assert fused_reduce(jnp, ("+",), (jnp.asarray(xs[0]),), 1) is None  # op by op: the separate reductions
    got = jax.jit(lambda *a: fused_reduce(jnp, ("+", "max", "min"), a, 1))(*(jnp.asarray(x) for x in xs))
    np.testing.assert_allclose(_np(got[0]), xs[0].sum(axis=1), rtol=1e-12 if dtype == "float64" else 1e-5)
    np.testing.assert_array_equal(_np(got[1]), xs[1].max(axis=1))
    np.testing.assert_array_equal(_np(got[2]), xs[2].min(axis=1))
    assert all(r.dtype == jnp.dtype(dtype) and r.shape == (7,) for r in got)
    # Over a 1-d axis to 0-d, as RowReduce reduces per-row arrays.
    v = tuple(jnp.asarray(x[:, 0]) for x in xs)
    s, mx, mn = jax.jit(lambda *a: fused_reduce(jnp, ("+", "max", "min"), a, 0))(*v)
    assert s.shape == () and float(mx) == xs[1][:, 0].max() and float(mn) == xs[2][:, 0].min()
    assert fused_reduce(np, ("+",), (xs[0],), 1) is None  # other libraries: the caller reduces


def test_row_reduce_several_arrays_at_once_under_jax():
    rows = RowReduce()
    a, b = jnp.asarray([1.0, -3.0, 2.0]), jnp.asarray([0.5, 4.0, -1.0])
    assert [float(x) for x in rows.sum(jnp, a, b)] == [0.0, 3.5]
    assert [float(x) for x in rows.max(jnp, a, b)] == [2.0, 4.0]
    assert [float(x) for x in rows.min(jnp, a, b)] == [-3.0, -1.0]
    assert [float(x) for x in rows.sum(jnp, a)] == [0.0]  # one array: jnp.sum itself


def _rows_of_magnitudes(rng, shape, dtype, scales):
    x = rng.standard_normal(shape)
    x *= np.asarray(scales, dtype=np.float64).reshape((-1,) + (1,) * (len(shape) - 1))
    return x.astype(dtype)


STAT_CASES = [
    ("float64", [1.0, 1e-3, 1e3, 2.0]),
    ("float64", [1e150, 1e-150, 1.0, 1e300]),
    ("float32", [1.0, 0.25, 8.0, 1e2]),
    ("float32", [1e19, 1e-20, 1.0, 1e-30]),
]


@pytest.mark.parametrize(("dtype", "scales"), STAT_CASES)
def test_row_stats_fused_equal_generic(dtype, scales):
    rng = np.random.default_rng(1)
    w = _rows_of_magnitudes(rng, (4, 3, 5), dtype, scales)
    g = _rows_of_magnitudes(rng, (4, 3, 5), dtype, scales[::-1])
    u = rng.standard_normal((4, 3, 5)).astype(dtype)
    ref = row_stats(np, w, g, u)
    got = jax.jit(lambda w, g, u: tuple(row_stats(jnp, w, g, u)[:6]))(jnp.asarray(w), jnp.asarray(g), jnp.asarray(u))
    tol = 1e-12 if dtype == "float64" else 1e-5
    for name, r, x in zip(("wg", "ww", "gg", "wu"), ref[:4], got[:4], strict=True):
        np.testing.assert_allclose(_np(x), r, rtol=tol, atol=0, err_msg=name)
        assert np.all(np.isfinite(_np(x))), name  # scaled: no overflow or underflow at these magnitudes
    np.testing.assert_array_equal(_np(got[4]), ref.sw)  # the same powers of two
    np.testing.assert_array_equal(_np(got[5]), ref.sg)
    # The per-row max-abs and dot products, fused, against the generic functions on the same rows.
    wr, gr = w.reshape(4, -1), g.reshape(4, -1)
    wr, gr = wr * ref.sw[:, None], gr * ref.sg[:, None]  # the scaled rows: their dot products stay finite
    for a, b in zip(_row_absmax(jnp, jnp.asarray(wr), jnp.asarray(gr)), _row_absmax(np, wr, gr), strict=True):
        np.testing.assert_array_equal(_np(a), b)
    for a, b in zip(_rowdots(jnp, (jnp.asarray(wr), jnp.asarray(gr))), _rowdots(np, (wr, gr)), strict=True):
        np.testing.assert_allclose(_np(a), b, rtol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_decision_and_layer_sums_equal_generic(dtype):
    """_decide reduces over rows twice (a max of three arrays, then the layer sums with w.u): the same
    decision and layer statistics as the NumPy step, on a tensor whose rows differ by 2**40."""
    rng = np.random.default_rng(2)
    w = _rows_of_magnitudes(rng, (5, 8), dtype, [1.0, 2.0**40, 2.0**-40, 3.0, 1e-3])
    g = rng.standard_normal((5, 8)).astype(dtype)
    g -= w * (np.sum(w * g, axis=1, keepdims=True) / np.sum(w * w, axis=1, keepdims=True))  # orthogonal rows
    u = rng.standard_normal((5, 8)).astype(dtype)
    eps = 1e-8

    def run(xp, w, g, u):
        st = row_stats(xp, w, g, u)
        dec, lay = _decide(xp, w, st, 0.1, xp.asarray(eps, dtype=w.dtype), _LOCAL_ROWS, (st.wu,))
        return dec.channel, dec.layer, dec.cos_channel, dec.cos_layer, lay.ww, lay.wg, lay.gg, lay.sw, lay.sg, lay.wx[0]

    ref = run(np, w, g, u)
    got = jax.jit(lambda w, g, u: run(jnp, w, g, u))(jnp.asarray(w), jnp.asarray(g), jnp.asarray(u))
    assert bool(ref[0]) and bool(got[0])  # the channel view (the case exercises every sum anyway)
    assert bool(got[1]) == bool(ref[1])
    tol = 1e-12 if dtype == "float64" else 1e-5
    # Cosines of orthogonal rows and w.g are rounding noise: compared against their scale (1, |w||g|).
    scale = {2: 1.0, 3: 1.0, 5: float(np.sqrt(_np(ref[4]) * _np(ref[6])))}
    for i, (r, x) in enumerate(zip(ref, got, strict=True)):
        if i >= 2:
            np.testing.assert_allclose(_np(x), _np(r), rtol=tol, atol=tol * scale.get(i, 0.0), err_msg=str(i))


def _steps(xp, opt, hp, w, gs, state_dtype=None):
    init, step = (ac.adamp_init, ac.adamp_step) if opt == "adamp" else (ac.sgdp_init, ac.sgdp_step)
    p, s = xp.asarray(w), init(xp.asarray(w))
    out = []
    fn = jax.jit(lambda p, g, s: step(p, g, s, **hp)) if xp is jnp else (lambda p, g, s: step(p, g, s, **hp))
    for g in gs:
        p, s = fn(p, xp.asarray(g), s)
        out.append((np.array(p), [np.array(x) for x in s if getattr(x, "ndim", 0)]))
    return out


STEP_HP = {
    "adamp": [dict(lr=1e-2, weight_decay=1e-2), dict(lr=1e-2, nesterov=True, caution=True, weight_decay=0.1)],
    "sgdp": [dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True),
             dict(lr=0.1, momentum=0.9, weight_decay=1e-2, caution=True),
             dict(lr=0.1, momentum=0.9, dampening=0.5, project_buffer=False),
             dict(lr=0.1, momentum=0.9, dampening=0.2)],  # the stored buffer projected, its reductions from the old
}
SHAPES = [(6, 3, 2, 2), (5, 7), (9,), (4, 1)]


@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1.0, 1e19, 1e-20])
def test_jitted_steps_equal_generic_step_by_step(opt, dtype, scale):
    """jax.jit of the core's step (fused reductions) against the NumPy step (the ground truth), 8 steps, every
    hyperparameter case and shape; weights at ``scale`` (float32 near 1e19 and 1e-20: only the per-row
    power-of-two scaling keeps the norms finite there)."""
    rng = np.random.default_rng(3)
    tol = 1e-12 if dtype == "float64" else 1e-5
    views = set()
    for hp in STEP_HP[opt]:
        for shape in SHAPES:
            w = (rng.standard_normal(shape) * scale).astype(dtype)
            gs = []
            for t in range(8):
                g = rng.standard_normal(shape)
                # Every other step orthogonal to w row by row, projected (a row of length 1 would leave noise).
                if len(shape) > 1 and shape[1] > 1 and t % 2 == 0:
                    w2, g2 = w.reshape(shape[0], -1).astype(np.float64), g.reshape(shape[0], -1)
                    g2 -= w2 * (np.sum(w2 * g2, axis=1, keepdims=True) / np.sum(w2 * w2, axis=1, keepdims=True))
                gs.append((g * 1e-2).astype(dtype))
                if len(shape) > 1:
                    views.add(int(ac.projected_view(w, gs[-1])))
            ref = _steps(np, opt, hp, w, gs)
            got = _steps(jnp, opt, hp, w, gs)
            for t, ((rp, rs), (gp, gst)) in enumerate(zip(ref, got, strict=True)):
                what = f"{opt} {hp} {shape} step {t}"
                assert gp.dtype == rp.dtype, what
                # An entry crossing zero has no relative precision: compared at the tensor's scale too.
                np.testing.assert_allclose(gp, rp, rtol=tol, atol=tol * np.max(np.abs(rp)), err_msg=what)
                for a, b in zip(gst, rs, strict=True):  # XLA on CPU flushes subnormals (a g**2 of 1e-40) to 0
                    atol = max(tol * np.max(np.abs(b)), np.finfo(b.dtype).smallest_normal)
                    np.testing.assert_allclose(a, b, rtol=tol, atol=atol, err_msg=what)
    # Weights below eps (1e-20) always look scale-invariant: cos = w.g / (eps |g|) (torch's clamp).
    assert ac.VIEW_CHANNEL in views and (ac.VIEW_NONE in views or scale < 1e-8), views


def _bytes_per_element(tx, shape):
    import optax

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p = [jnp.ones(shape, jnp.float32)]
    cost = jax.jit(step).lower(p, tx.init(p), p).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost or "bytes accessed" not in cost:
        pytest.skip("this JAX gives no cost analysis")
    return cost["bytes accessed"] / p[0].size


def test_xla_bytes_per_element_near_optax():
    """XLA's cost analysis of one jitted step of a (256, 2304) float32 weight (a count, deterministic for a
    JAX version): before issue 26 AdamP read and wrote 104 B per element, 2.6x optax.adamw's 40, and SGDP
    92, 2.3x its optax reference; now two fused passes over w and g and one elementwise pass."""
    optax = pytest.importorskip("optax")
    adamp_optax = pytest.importorskip("adamp_optax")
    shape = (256, 2304)
    ratio_adamp = _bytes_per_element(adamp_optax.adamp(1e-3, weight_decay=1e-2), shape) / _bytes_per_element(
        optax.adamw(1e-3, weight_decay=1e-2), shape)
    sgd = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(1e-2, momentum=0.9, nesterov=True))
    ratio_sgdp = _bytes_per_element(adamp_optax.sgdp(1e-2, momentum=0.9, weight_decay=1e-4, nesterov=True),
                                    shape) / _bytes_per_element(sgd, shape)
    assert ratio_adamp <= 1.75, ratio_adamp
    assert ratio_sgdp <= 1.5, ratio_sgdp
    # SGDP's defaults (the stored buffer is the projected one) against plain momentum SGD: 2.34x before the
    # reductions read the old buffer (the new one was written, then read twice), 2.0x now (absmax 8 B, row dots
    # 12, the projected buffer 16, the param 12; optax: 24).
    plain = _bytes_per_element(adamp_optax.sgdp(1e-2, momentum=0.9), shape) / _bytes_per_element(
        optax.sgd(1e-2, momentum=0.9), shape)
    assert plain <= 2.05, plain


# -- one trace per tensor signature (adamp_core.paths._jax_once) ---------------------------------------

_SHARED_SHAPES = [(8, 3, 3, 3), (16,), (8, 3, 3, 3), (16,), (12, 8), (8, 3, 3, 3)]


def _optax_step(tx):
    import optax

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _leaves(seed, dtype="float32"):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s).astype(dtype)) for s in _SHARED_SHAPES]


def _inner_steps(jaxpr, name):
    """The nested-jit equations of ``jaxpr`` named ``name`` (the shared per-tensor steps)."""
    return [e for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit") and e.params.get("name") == name]


@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
def test_jitted_step_traces_each_signature_once(opt):
    """Under jax.jit each leaf's step is a call of a nested jit, traced once per (shape, dtype): 6 leaves of 3
    shapes record 6 calls of 3 jaxprs (the tracing time of a model's step follows its shapes, not its leaves)."""
    adamp_optax = pytest.importorskip("adamp_optax")
    tx = adamp_optax.adamp(1e-2, weight_decay=1e-2) if opt == "adamp" else adamp_optax.sgdp(0.1, momentum=0.9)
    params, grads = _leaves(0), _leaves(1)
    closed = jax.make_jaxpr(_optax_step(tx))(params, tx.init(params), grads)
    calls = _inner_steps(closed.jaxpr, f"{opt}_step")
    assert len(calls) == len(_SHARED_SHAPES)
    assert len({id(e.params["jaxpr"]) for e in calls}) == len(set(_SHARED_SHAPES))


@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
def test_shared_traces_compile_to_the_per_leaf_program(opt, monkeypatch):
    """XLA inlines the nested calls: the compiled step, its results (bit for bit, 3 steps, a scheduled lr
    among the hyperparameters) and its cost are those of the step traced leaf by leaf."""
    import optax

    adamp_optax = pytest.importorskip("adamp_optax")
    from adamp_core.paths import _jax_once

    lr = optax.exponential_decay(1e-2, 1, 0.5)
    tx = adamp_optax.adamp(lr, weight_decay=1e-2, nesterov=True) if opt == "adamp" else adamp_optax.sgdp(
        lr, momentum=0.9, weight_decay=1e-4, nesterov=True)

    def run():
        step = jax.jit(_optax_step(tx))
        params, state = _leaves(2), tx.init(_leaves(2))
        for t in range(3):
            params, state = step(params, state, _leaves(10 + t))
        cost = step.lower(params, state, params).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return params, state, (cost or {}).get("bytes accessed")

    shared = run()
    monkeypatch.setattr(_jax_once, "shared", lambda t: False)  # the step traced leaf by leaf
    alone = run()
    for a, b in zip(jax.tree_util.tree_leaves(shared[:2]), jax.tree_util.tree_leaves(alone[:2]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert shared[2] == alone[2]


def test_shared_traces_keep_each_hyperparameter_value():
    """A trace is reused only for the same hyperparameter values (types and signs included): two learning
    rates, and 0.0 against -0.0, each step as the eager NumPy step does."""
    from adamp_core.paths import _jax_once

    w = np.random.default_rng(4).standard_normal((6, 5)).astype(np.float32)
    g = np.random.default_rng(5).standard_normal((6, 5)).astype(np.float32)
    for lr in (0.1, 0.2, 0.1):
        want, _ = ac.sgdp_step(w, g, ac.sgdp_init(w), lr=lr, momentum=0.9)
        adamp_optax = pytest.importorskip("adamp_optax")
        tx = adamp_optax.sgdp(lr, momentum=0.9)
        got, _ = jax.jit(_optax_step(tx))([jnp.asarray(w)], tx.init([jnp.asarray(w)]), [jnp.asarray(g)])
        np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-6, atol=1e-7)
    from adamp_core.optimizers import ADAMP

    def fn(**hp):  # past the checks (which make every number a float): the cache itself
        return _jax_once.traced_step(ADAMP, ADAMP.checked(ADAMP.all_defaults)._replace(**hp), False,
                                     _jax_once.shared)[0]

    assert fn(weight_decay=0.0) is fn(weight_decay=0.0)
    assert fn(weight_decay=0.0) is not fn(weight_decay=-0.0)
    assert fn(lr=1) is not fn(lr=1.0)


def test_only_whole_tensors_with_array_counts_share_a_trace():
    """A shard's layout (rows spanning processes) or a Python-int step count (advanced on the host) keep the
    step traced where it is."""
    from adamp_core.paths import Tensor, _jax_once

    w = jnp.zeros((2, 3))
    state = ac.adamp_init(w)
    assert _jax_once.shared(Tensor(w, w, state))
    assert not _jax_once.shared(Tensor(w, w, state._replace(step=3)))
    assert not _jax_once.shared(Tensor(w, w, state, rows=RowReduce((4, 3))))
