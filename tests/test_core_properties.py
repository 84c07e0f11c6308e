"""Property tests (hypothesis) of the core step against the paper's definitions.

* A projected update is orthogonal to the weight: row by row for the channel view, as a whole
  for the layer view (the projection Pi_w of Sec. 3.2; tested with eps = 0, where Pi_w is exact).
* An unprojected update (1-d params, or gradients far from orthogonal) equals plain Adam / SGD
  with decoupled weight decay, written here independently in float64 NumPy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import adamp_core as ac
from adamp_xp.testing.oracle import make_grad

finite = st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False)
shapes = hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6)


@st.composite
def weight_and_grad(draw):
    shape = draw(shapes)
    w = draw(hnp.arrays(np.float64, shape, elements=finite))
    rows = w.reshape(shape[0], -1)
    assume(np.all(np.linalg.norm(rows, axis=1) > 1e-2))
    regime = draw(st.sampled_from(["channel", "layer", "none"]))
    g = make_grad(w, regime, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    buf = draw(hnp.arrays(np.float64, shape, elements=finite))
    return w, g, buf


def _assert_orthogonal(view, w, dw, u_bound):
    """|w_r . dw_r| within rounding of 0: n * 1e-14 * |w_r| * |u_r| (u_bound bounds |u_r| * lr)."""
    rows = w.reshape(w.shape[0], -1)
    dw = dw.reshape(rows.shape)
    n = rows.shape[1]
    if view == ac.VIEW_CHANNEL:
        dots = np.abs(np.sum(rows * dw, axis=1))
        assert np.all(dots <= 1e-14 * n * np.linalg.norm(rows, axis=1) * u_bound), dots
    elif view == ac.VIEW_LAYER:
        assert abs(np.sum(rows * dw)) <= 1e-14 * rows.size * np.linalg.norm(rows) * u_bound


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@settings(max_examples=150, deadline=None)
@given(weight_and_grad(), st.floats(0.0, 0.99), st.booleans())
def test_projected_sgdp_update_is_orthogonal_to_weight(wgb, momentum, nesterov):
    w, g, buf = wgb
    nesterov = nesterov and momentum > 0
    view = int(ac.projected_view(w, g, 0.1, 0.0))
    new_w, _ = ac.sgdp_step(w, g, ac.SGDPState(buf), lr=0.1, momentum=momentum, nesterov=nesterov, eps=0.0)
    b = momentum * buf + g
    d = g + momentum * b if nesterov else b
    if view == ac.VIEW_NONE:  # not projected: exactly the plain SGD step
        np.testing.assert_allclose(new_w, w - 0.1 * d, rtol=1e-14, atol=1e-14)
    else:
        _assert_orthogonal(view, w, new_w - w, 0.1 * 10 * (np.linalg.norm(d) + 1))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@settings(max_examples=150, deadline=None)
@given(weight_and_grad(), st.integers(1, 5))
def test_projected_adamp_update_is_orthogonal_to_weight(wgb, steps):
    w, g, _ = wgb
    state = ac.adamp_init(w)
    rng = np.random.default_rng(steps)
    for _ in range(steps - 1):  # moments that are not orthogonal to w
        state = ac.adamp_step(w, rng.standard_normal(w.shape), state, eps=0.0)[1]
    assume(np.all(np.asarray(state.exp_avg_sq) * 0.999 + 0.001 * g * g > 0))
    view = int(ac.projected_view(w, g, 0.1, 0.0))
    new_w, _ = ac.adamp_step(w, g, state, lr=0.01, eps=0.0)
    # |Adam update| <= sqrt(size) * (1 - b1) / sqrt(1 - b2) * sqrt(1 - b2^t) / (1 - b1^t) < 10 sqrt(size) here.
    _assert_orthogonal(view, w, new_w - w, 0.01 * 10 * 10 * math.sqrt(w.size))


def plain_adamw(w, g, m, v, t, lr, b1, b2, eps, wd):
    """Textbook AdamW with adamp 0.3.0's eps placement (eps added after the bias-corrected sqrt), float64."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return w * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), elements=finite),
       st.floats(1e-4, 0.1), st.floats(0.0, 0.5), st.integers(1, 4))
def test_unprojected_adamp_equals_plain_adamw(w, lr, wd, steps):
    assume(w.size > 0 and np.linalg.norm(w) > 1e-2)
    rng = np.random.default_rng(0)
    state = ac.AdamPState(0, np.zeros_like(w), np.zeros_like(w))
    ref_w, m, v = w.copy(), np.zeros_like(w), np.zeros_like(w)
    ours = w
    for t in range(1, steps + 1):
        g = make_grad(ref_w, "none", rng) if w.ndim > 1 else rng.standard_normal(w.shape)
        if w.ndim > 1:
            assume(int(ac.projected_view(ours, g)) == ac.VIEW_NONE)
        ours, state = ac.adamp_step(ours, g, state, lr=lr, weight_decay=wd)
        ref_w, m, v = plain_adamw(ref_w, g, m, v, t, lr, 0.9, 0.999, 1e-8, wd)
    np.testing.assert_allclose(ours, ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state.exp_avg, m, rtol=1e-13, atol=1e-16)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), elements=finite),
       st.floats(1e-3, 0.5), st.floats(0.0, 0.95), st.floats(0.0, 0.1), st.integers(1, 4))
def test_unprojected_sgdp_equals_plain_sgd(w, lr, momentum, wd, steps):
    assume(w.size > 0 and np.linalg.norm(w) > 1e-2)
    rng = np.random.default_rng(1)
    state = ac.sgdp_init(w)
    ref_w, buf, ours = w.copy(), np.zeros_like(w), w
    for _ in range(steps):
        g = make_grad(ref_w, "none", rng) if w.ndim > 1 else rng.standard_normal(w.shape)
        if w.ndim > 1:
            assume(int(ac.projected_view(ours, g)) == ac.VIEW_NONE)
        ours, state = ac.sgdp_step(ours, g, state, lr=lr, momentum=momentum, weight_decay=wd)
        buf = momentum * buf + g
        ref_w = ref_w * (1 - lr * wd / (1 - momentum)) - lr * buf  # decoupled decay / (1 - momentum)
    np.testing.assert_allclose(ours, ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state.momentum, buf, rtol=1e-13, atol=1e-15)
