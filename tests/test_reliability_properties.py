"""Property tests across backends (issue 9), with hypothesis: random shapes (0-d to 4-d, empty
ones included), hyperparameters and values over a wide range of magnitudes.

* Outputs keep the param's dtype, shape, library and device; the state keeps its own.
* Finite input gives finite output (eps > 0): no NaN or inf from zero weights, zero gradients,
  empty arrays or magnitudes from 1e-20 to 1e18 (float32) / 1e-160 to 1e153 (float64), where the
  naive sums of squares overflow or underflow.
* A projected update is orthogonal to the weight, row by row for the channel view and as a whole
  for the layer view (eps = 0, where the projection is exact), at every magnitude.

Example counts are per backend (eager JAX compiles every new shape, so it gets few).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import adamp_core as ac
from adamp_xp.testing.oracle import make_grad

EXAMPLES = {"numpy": 100, "array_api_strict": 40, "torch": 60, "jax": 6, "cupy": 30}
# Eager JAX compiles every operation for every new shape: it draws from a few fixed shapes.
JAX_SHAPES = st.sampled_from([(3, 4), (2, 1, 3)])
# Past where the naive |x|^2 of a row overflows (3e18 ** 2 * 125 > 3.4e38) or underflows (1e-20 ** 2),
# but not so far that g ** 2 (Adam's second moment) itself overflows.
DECADES = {"float32": (-20, 18), "float64": (-160, 153)}


def _settings(backend):
    return settings(
        max_examples=EXAMPLES.get(backend.library, 10),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,  # a fixed set of examples: the suite is reproducible
    )


shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
nonempty_nd = hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5)


@st.composite
def magnitudes(draw, dtype):
    lo, hi = DECADES[dtype]
    # the extremes half of the time, any decade otherwise
    decade = st.one_of(st.sampled_from([lo, lo + 1, hi - 1, hi]), st.integers(lo, hi))
    return 10.0 ** draw(decade), 10.0 ** draw(decade)


@st.composite
def adamp_hp(draw):
    return dict(
        lr=draw(st.floats(0.0, 1.0)),
        betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.floats(0.0, 1.0)),
        delta=draw(st.floats(0.0, 2.0)),
        wd_ratio=draw(st.floats(0.0, 1.0)),
        nesterov=draw(st.booleans()),
    )


@st.composite
def sgdp_hp(draw):
    momentum = draw(st.floats(0.0, 0.99))
    nesterov = draw(st.booleans()) and momentum > 0
    return dict(
        lr=draw(st.floats(0.0, 1.0)),
        momentum=momentum,
        dampening=0.0 if nesterov else draw(st.floats(0.0, 1.0)),
        weight_decay=draw(st.floats(0.0, 0.5)),
        nesterov=nesterov,
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        delta=draw(st.floats(0.0, 2.0)),
        wd_ratio=draw(st.floats(0.0, 1.0)),
    )


def _same_place(x, like, backend, dtype=None):
    """x is an array of like's library and device, with the given dtype (default like's) and shape."""
    from array_api_compat import array_namespace
    from array_api_compat import device as dev

    assert type(array_namespace(x)) is type(array_namespace(like)) or array_namespace(x) is array_namespace(like)
    assert str(x.dtype) == str(like.dtype if dtype is None else dtype)
    assert tuple(x.shape) == tuple(like.shape)
    assert str(dev(x)) == str(dev(like))


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:underflow encountered")
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_dtype_shape_device_kept_and_finite_in_finite_out(backend, dtype, optimizer, record_property):
    if not backend.supports(dtype):
        pytest.skip(f"{backend} has no {dtype}")
    ran = []

    @_settings(backend)
    @given(
        shape=JAX_SHAPES if backend.library == "jax" else shapes,
        mags=magnitudes(dtype),
        hp=adamp_hp() if optimizer == "adamp" else sgdp_hp(),
        seed=st.integers(0, 2**32 - 1),
        zero_w=st.booleans(),
        zero_g=st.booleans(),
        regime=st.sampled_from(["channel", "layer", "none", "random"]),
    )
    def check(shape, mags, hp, seed, zero_w, zero_g, regime):
        rng = np.random.default_rng(seed)
        w_unit = np.zeros(shape) if zero_w else rng.standard_normal(shape)
        init, step = (ac.adamp_init, ac.adamp_step) if optimizer == "adamp" else (ac.sgdp_init, ac.sgdp_step)
        w = backend.asarray(w_unit * mags[0], dtype)
        state = init(w)
        for _ in range(2):
            wn = backend.to_numpy(w)
            top = float(np.max(np.abs(wn), initial=0.0))
            if zero_g:
                g = np.zeros(shape)
            elif regime == "random" or top == 0.0:
                g = rng.standard_normal(shape)
            else:
                g = make_grad(wn / top, regime, rng)
            g = backend.asarray(g * mags[1], dtype)
            new_w, new_state = step(w, g, state, **hp)
            _same_place(new_w, w, backend)
            for new, old in zip(new_state, state, strict=True):
                if hasattr(old, "dtype"):
                    _same_place(new, old, backend)
            assert np.all(np.isfinite(backend.to_numpy(new_w))), (hp, mags)
            for x in new_state:
                assert np.all(np.isfinite(np.asarray(backend.to_numpy(x) if hasattr(x, "dtype") else x)))
            w, state = new_w, new_state
        ran.append(shape)

    check()
    # hypothesis runs max_examples distinct examples unless the space is smaller (JAX: few shapes)
    record_property("hypothesis_examples", len(ran))
    assert len(ran) >= min(EXAMPLES.get(backend.library, 10), 6), len(ran)


@pytest.mark.filterwarnings(
    "ignore:overflow encountered",
    "ignore:underflow encountered",
    "ignore:invalid value encountered",
    "ignore:divide by zero encountered",  # eps = 0 and a zero gradient row (rows of length 1): cos is 0/0
)
def test_projected_update_is_orthogonal_to_the_weight(backend, dtype, record_property):
    """SGDP without momentum or decay, eps = 0: w_{t+1} - w_t = -lr * Pi_w(g), and Pi_w removes the radial
    part exactly. |w_r . dw_r| must be rounding-small relative to |w_r| |dw_r| at every magnitude."""
    if not backend.supports(dtype):
        pytest.skip(f"{backend} has no {dtype}")
    unit = float(np.finfo(dtype).eps)
    views = []

    @_settings(backend)
    @given(
        shape=JAX_SHAPES if backend.library == "jax" else nonempty_nd,
        mags=magnitudes(dtype),
        regime=st.sampled_from(["channel", "layer"]),
        seed=st.integers(0, 2**32 - 1),
    )
    def check(shape, mags, regime, seed):
        rng = np.random.default_rng(seed)
        w_unit = rng.standard_normal(shape)
        rows = w_unit.reshape(shape[0], -1)
        if np.min(np.linalg.norm(rows, axis=1)) < 1e-3:
            return  # a (near-)zero row has no direction to be orthogonal to
        g_unit = make_grad(w_unit, regime, rng)
        w = backend.asarray(w_unit * mags[0], dtype)
        g = backend.asarray(g_unit * mags[1], dtype)
        view = int(backend.to_numpy(ac.projected_view(w, g, 0.1, 0.0)))
        # an update as large as the weight, so that a radial part would show (capped to a finite lr)
        lr = min(0.5 * mags[0] / mags[1], 1e30 if dtype == "float32" else 1e300)
        new_w, _ = ac.sgdp_step(w, g, ac.sgdp_init(w), lr=lr, eps=0.0)
        wn = backend.to_numpy(w).reshape(shape[0], -1) / mags[0]
        w1 = backend.to_numpy(new_w).reshape(wn.shape) / mags[0]
        dw = w1 - wn  # exact in float64
        n = wn.shape[1]

        def bound(axis):
            # rounding of the projection (n products) plus that of w + dw itself (unit |w_{t+1}| per entry)
            nw, ndw, nw1 = (np.linalg.norm(x, axis=axis) for x in (wn, dw, w1))
            return 8 * n * unit * nw * ndw + 2 * unit * nw * nw1

        views.append(view)
        if view == ac.VIEW_CHANNEL:
            dots = np.abs(np.sum(wn * dw, axis=1))
            assert np.all(dots <= bound(1)), (dots, bound(1))
        elif view == ac.VIEW_LAYER:
            assert abs(float(np.sum(wn * dw))) <= bound(None) * shape[0]
        # the regime decides the view, whatever the magnitudes (the scaling is exact); rows of length 1
        # have no direction orthogonal to them (the channel regime's gradient is 0 there: cos is 0/0)
        if n > 1:
            expected = ac.VIEW_CHANNEL if regime == "channel" or shape[0] == 1 else ac.VIEW_LAYER
            assert view == expected, (view, regime, shape, mags)

    check()
    record_property("hypothesis_examples", len(views))
    # the orthogonality was checked on both views (not every example skipped as degenerate)
    assert views.count(ac.VIEW_CHANNEL) >= 1 and views.count(ac.VIEW_LAYER) >= 1, views
