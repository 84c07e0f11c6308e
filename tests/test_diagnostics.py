"""adamp_core.diagnostics against independent float64 NumPy computations, on every backend.

* weight norm and the paper's effective step size |w1/|w1| - w/|w|| (also for tiny steps in float32,
  where the naive formula loses all its digits);
* the scale-invariance statistics (max row |cos| of the channel view, layer |cos|, thresholds) and the
  view, against a NumPy re-derivation of the rule, ``adamp_core.projected_view`` and the official
  ``adamp==0.3.0`` test, and against what ``sgdp_step`` actually did;
* purity, jax.jit, bad input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import adamp_core as ac
from adamp_core import diagnostics as D
from adamp_xp.testing.oracle import make_grad

SHAPES = [(6, 3, 3, 3), (5, 12), (1, 16), (6, 1), (7,)]


def _naive_step(w, w1):
    w, w1 = np.asarray(w, np.float64).ravel(), np.asarray(w1, np.float64).ravel()
    return float(np.linalg.norm(w1 / np.linalg.norm(w1) - w / np.linalg.norm(w)))


def _rtol(dtype):
    return 1e-12 if dtype == "float64" else 2e-6


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=str)
def test_weight_norm_and_effective_step_match_float64_numpy(backend, dtype, shape):
    if not backend.supports(dtype):
        pytest.skip(f"{backend} has no {dtype}")
    rng = np.random.default_rng(sum(shape))
    for rel in (0.3, 1e-3):
        w = rng.standard_normal(shape).astype(dtype)
        w1 = (w + rel * rng.standard_normal(shape)).astype(dtype)  # the values the backend sees, exactly
        d = D.step_diagnostics(backend.asarray(w), backend.asarray(w1), backend.asarray(w1 - w))
        assert float(d.weight_norm) == pytest.approx(np.linalg.norm(w.astype(np.float64)), rel=_rtol(dtype))
        assert float(d.new_weight_norm) == pytest.approx(np.linalg.norm(w1.astype(np.float64)), rel=_rtol(dtype))
        # float64 naive formula: its own error is ~1e-16 absolute, far below the tolerance at these sizes
        ref = _naive_step(w, w1)
        assert float(d.effective_step) == pytest.approx(ref, rel=1e-10 if dtype == "float64" else 1e-5)
        assert float(D.effective_step_size(backend.asarray(w), backend.asarray(w1))) == float(d.effective_step)
        assert float(D.weight_norm(backend.asarray(w))) == float(d.weight_norm)


def test_effective_step_keeps_relative_accuracy_for_tiny_float32_steps():
    """Steps of relative size 1e-6..1e-7: the reference is float64 maths on the very same float32 values
    (error ~1e-16/1e-7 = 1e-9 relative); the naive float32 formula is off by tens of percent here."""
    rng = np.random.default_rng(1)
    worst_ours, worst_naive = 0.0, 0.0
    for rel in (1e-6, 3e-7, 1e-7):
        w = rng.standard_normal((64, 32)).astype(np.float32)
        w1 = (w + rel * rng.standard_normal(w.shape)).astype(np.float32)
        assert np.any(w1 != w)
        ref = _naive_step(w, w1)
        ours = float(D.effective_step_size(w, w1))
        naive32 = float(np.linalg.norm(w1 / np.linalg.norm(w1) - w / np.linalg.norm(w)))
        worst_ours = max(worst_ours, abs(ours - ref) / ref)
        worst_naive = max(worst_naive, abs(naive32 - ref) / ref)
    assert worst_ours < 1e-5
    assert worst_naive > 1e-2  # the test would catch the naive formula


def test_effective_step_special_cases():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 5))
    dw = 1e-2 * rng.standard_normal((4, 5))
    assert float(D.effective_step_size(w, w)) == 0.0
    assert float(D.effective_step_size(w, 3.0 * w)) <= 1e-16  # pure radial move: direction unchanged
    # scale invariance of the measure itself
    assert float(D.effective_step_size(7.0 * w, 7.0 * (w + dw))) == pytest.approx(
        float(D.effective_step_size(w, w + dw)), rel=1e-13
    )
    # the paper's approximation |dw| / |w| for a small tangential step
    t = dw.ravel() - (dw.ravel() @ w.ravel()) / (w.ravel() @ w.ravel()) * w.ravel()
    step = 1e-4 * t.reshape(w.shape) / np.linalg.norm(t)
    assert float(D.effective_step_size(w, w + step)) == pytest.approx(1e-4 / np.linalg.norm(w), rel=1e-7)
    # undefined direction: NaN, without warnings
    with np.errstate(all="raise"):
        assert math.isnan(float(D.effective_step_size(np.zeros(3), np.ones(3))))
        assert math.isnan(float(D.effective_step_size(np.ones(3), np.zeros(3))))
        assert math.isnan(float(D.effective_step_size(np.zeros((0, 3)), np.zeros((0, 3)))))


def _numpy_scale_invariance(w, g, delta, eps):
    """The rule of adamp 0.3.0 re-derived in float64 NumPy, per row with torch's cosine_similarity clamps."""
    rows, grows = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
    cos = np.abs(np.sum(rows * grows, axis=1)) / (
        np.maximum(np.linalg.norm(rows, axis=1), eps) * np.maximum(np.linalg.norm(grows, axis=1), eps)
    )
    cos_l = abs(np.sum(w * g)) / (max(np.linalg.norm(w), eps) * max(np.linalg.norm(g), eps))
    thr_c, thr_l = delta / math.sqrt(rows.shape[1]), delta / math.sqrt(w.size)
    view = ac.VIEW_CHANNEL if cos.max() < thr_c else ac.VIEW_LAYER if cos_l < thr_l else ac.VIEW_NONE
    return cos.max(), cos_l, thr_c, thr_l, view


@pytest.mark.parametrize("regime", ["channel", "layer", "none"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_scale_invariance_matches_numpy_rule(backend, dtype, shape, regime):
    if not backend.supports(dtype):
        pytest.skip(f"{backend} has no {dtype}")
    rng = np.random.default_rng(3 + sum(shape))
    w = rng.standard_normal(shape)
    g = make_grad(w, regime, rng)
    w, g = w.astype(dtype), g.astype(dtype)
    delta, eps = 0.1, 1e-8
    si = D.scale_invariance(backend.asarray(w), backend.asarray(g), delta, eps)
    cos_c, cos_l, thr_c, thr_l, view = _numpy_scale_invariance(w.astype(np.float64), g.astype(np.float64), delta, eps)
    atol = 1e-12 if dtype == "float64" else 1e-5  # cosines of orthogonal pairs are rounding noise
    assert float(si.cos_channel) == pytest.approx(cos_c, rel=1e-6, abs=atol)
    assert float(si.cos_layer) == pytest.approx(cos_l, rel=1e-6, abs=atol)
    assert si.threshold_channel == pytest.approx(thr_c, rel=1e-15)
    assert si.threshold_layer == pytest.approx(thr_l, rel=1e-15)
    # make_grad puts the cosines far from the thresholds, so the decision is not a rounding coin-flip
    assert int(si.view) == view
    assert int(si.view) == int(ac.projected_view(backend.asarray(w), backend.asarray(g), delta, eps))
    expected = {"channel": ac.VIEW_CHANNEL, "layer": ac.VIEW_LAYER, "none": ac.VIEW_NONE}[regime]
    if shape[0] > 1 or regime != "layer":  # one row: the layer view is the channel view
        assert int(si.view) == expected


@pytest.mark.parametrize("regime", ["channel", "layer", "none"])
def test_view_matches_official_adamp(regime):
    torch = pytest.importorskip("torch")
    pytest.importorskip("adamp", reason="the oracle adamp==0.3.0 is not installed")
    from adamp_xp.testing.oracle import official_view

    rng = np.random.default_rng(4)
    for shape in SHAPES[:4]:
        w = rng.standard_normal(shape)
        g = make_grad(w, regime, rng)
        si = D.scale_invariance(torch.from_numpy(w), torch.from_numpy(g))
        assert int(si.view) == official_view(torch.from_numpy(w), torch.from_numpy(g), 0.1, 1e-8)


@pytest.mark.parametrize("regime", ["channel", "layer", "none"])
def test_view_reports_what_sgdp_step_did(regime):
    """The recorded view is the step's: channel -> update rows orthogonal to w's rows; layer -> the whole
    update orthogonal to w; none -> the plain momentum update, bit for bit."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((5, 12))
    g = make_grad(w, regime, rng)
    buf = rng.standard_normal(w.shape)  # has a radial part: projection visibly changes the update
    new_w, _ = ac.sgdp_step(w, g, ac.SGDPState(buf), lr=0.1, momentum=0.9, eps=0.0)
    d = D.step_diagnostics(w, new_w, g, eps=0.0)
    dw = new_w - w
    row_dots = np.abs(np.sum(w * dw, axis=1)) / (np.linalg.norm(w, axis=1) * np.linalg.norm(dw, axis=1))
    if int(d.view) == ac.VIEW_CHANNEL:
        assert row_dots.max() < 1e-13
    elif int(d.view) == ac.VIEW_LAYER:
        assert abs(np.sum(w * dw)) / (np.linalg.norm(w) * np.linalg.norm(dw)) < 1e-13
        assert row_dots.max() > 1e-3
    else:
        np.testing.assert_array_equal(new_w, w - 0.1 * (0.9 * buf + g))
    assert int(d.view) == {"channel": 1, "layer": 2, "none": 0}[regime]
    assert float(d.effective_step) == pytest.approx(_naive_step(w, new_w), rel=1e-10)


def test_one_dim_and_empty_params_are_not_tested(backend):
    for shape in [(7,), (), (0, 3)]:
        w = backend.asarray(np.ones(shape))
        si = D.scale_invariance(w, w)
        assert int(si.view) == ac.VIEW_NONE
        assert math.isnan(float(si.cos_channel)) and math.isnan(float(si.cos_layer))
        assert math.isnan(si.threshold_channel) and math.isnan(si.threshold_layer)


def test_half_precision_is_measured_in_float32():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 16))
    w1 = w + 0.05 * rng.standard_normal(w.shape)
    for dt in (torch.float16, torch.bfloat16):
        tw, tw1 = torch.from_numpy(w).to(dt), torch.from_numpy(w1).to(dt)
        d = D.step_diagnostics(tw, tw1, tw1 - tw)
        assert d.effective_step.dtype == torch.float32 and d.weight_norm.dtype == torch.float32
        ref = _naive_step(tw.double().numpy(), tw1.double().numpy())
        assert float(d.effective_step) == pytest.approx(ref, rel=1e-5)


def test_pure_and_sync_free_under_jit():
    rng = np.random.default_rng(7)
    w, w1, g = (rng.standard_normal((4, 6)) for _ in range(3))
    for a in (w, w1, g):
        a.flags.writeable = False
    eager = D.to_host(D.step_diagnostics(w, w1, g))
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    jitted = D.to_host(jax.jit(D.step_diagnostics)(jnp.asarray(w), jnp.asarray(w1), jnp.asarray(g)))
    assert set(eager) == set(D.StepDiagnostics._fields)
    assert isinstance(eager["view"], int) and all(isinstance(v, float) for k, v in eager.items() if k != "view")
    for k in eager:
        assert jitted[k] == pytest.approx(eager[k], rel=1e-12), k


BAD = [
    (dict(new_param=np.ones((3, 4))), ValueError, r"new_param shape \(3, 4\) differs from param shape \(4, 3\)"),
    (dict(grad=np.ones((4,))), ValueError, r"grad shape \(4,\) differs"),
    (dict(grad=None), TypeError, r"grad is None"),
    (dict(param=[[1.0, 2.0]]), TypeError, r"param must be an array, got list"),
    (dict(param=np.ones((4, 3), dtype=np.int64)), TypeError, r"param must have a real floating dtype, got int64"),
    (dict(delta=-1.0), ValueError, r"Invalid delta value: -1.0"),
    (dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises_with_the_name_and_value(kwargs, error, message):
    args = dict(param=np.ones((4, 3)), new_param=np.ones((4, 3)), grad=np.ones((4, 3)), delta=0.1, eps=1e-8)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        D.step_diagnostics(**args)
