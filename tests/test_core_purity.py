"""Purity, dtype/device preservation, low precision and edge shapes of the core step."""

from __future__ import annotations

import numpy as np
import pytest

import adamp_core as ac

STEPS = {
    "adamp": (ac.adamp_init, lambda p, g, s: ac.adamp_step(p, g, s, lr=0.01, weight_decay=0.1, nesterov=True)),
    "sgdp": (ac.sgdp_init, lambda p, g, s: ac.sgdp_step(p, g, s, lr=0.1, momentum=0.9, weight_decay=0.1)),
}


def _readonly(a):
    a = np.array(a)
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("shape", [(4, 3, 2), (5,), ()])
def test_step_never_writes_its_inputs(name, shape):
    """Read-only NumPy inputs: any in-place write would raise; values are checked unchanged too."""
    init, step = STEPS[name]
    rng = np.random.default_rng(0)
    p = _readonly(rng.standard_normal(shape))
    g = _readonly(rng.standard_normal(shape))
    state = init(p)
    state = type(state)(*(_readonly(x) if isinstance(x, np.ndarray) else x for x in state))
    copies = [np.array(x) for x in (p, g, *state)]
    for _ in range(3):
        new_p, new_state = step(p, g, state)
    for before, after in zip(copies, (p, g, *state), strict=True):
        np.testing.assert_array_equal(before, after)
    assert not np.shares_memory(new_p, p)
    assert not np.array_equal(new_p, p)


@pytest.mark.parametrize("name", list(STEPS))
def test_outputs_keep_namespace_dtype_device(backend, dtype, name):
    if not backend.supports(dtype):
        pytest.skip(f"{backend} has no {dtype}")
    from array_api_compat import array_namespace, device

    init, step = STEPS[name]
    rng = np.random.default_rng(1)
    p = backend.asarray(rng.standard_normal((3, 4)), dtype)
    g = backend.asarray(rng.standard_normal((3, 4)), dtype)
    new_p, new_state = step(p, g, init(p))
    for out in (new_p, *[x for x in new_state if hasattr(x, "shape") and x.shape != ()]):
        assert array_namespace(out) is array_namespace(p)
        assert out.dtype == p.dtype and tuple(out.shape) == tuple(p.shape)
        assert device(out) == device(p)


LOW = [("torch", "float16"), ("torch", "bfloat16"), ("jax", "bfloat16"), ("jax", "float16")]


@pytest.mark.parametrize("library,low", LOW)
@pytest.mark.parametrize("name", list(STEPS))
def test_low_precision_computes_in_float32(library, low, name):
    """A half-precision param with float32 state is updated exactly as its float32 upcast would be,
    then rounded once: the maths and the reductions never run in half precision."""
    from adamp_xp.testing.backends import Backend

    backend = Backend(library, "cpu")
    if backend.skip_reason():
        pytest.skip(backend.skip_reason())
    init, step = STEPS[name]
    rng = np.random.default_rng(2)
    p_low = backend.asarray(rng.standard_normal((6, 8)), low)
    p32 = backend.asarray(backend.to_numpy(p_low), "float32")  # exact upcast
    s_low = init(p_low, state_dtype="float32")
    s32 = init(p32)
    for _ in range(5):
        g = backend.asarray(rng.standard_normal((6, 8)) * 1e-3, "float32")
        g_low = backend.asarray(backend.to_numpy(g), low)
        g32 = backend.asarray(backend.to_numpy(g_low), "float32")
        p_low, s_low = step(p_low, g_low, s_low)
        p32, s32 = step(p32, g32, s32)
        assert p_low.dtype == backend.dtype(low)
        # float32 state: after each step, the float32 run and the half run's state agree exactly ...
        for a, b in zip(s_low[1:] if name == "adamp" else s_low, s32[1:] if name == "adamp" else s32, strict=True):
            assert str(a.dtype) == "float32" or a.dtype == backend.dtype("float32")
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
        # ... and the half param is the float32 result rounded once; re-sync the float32 run to it.
        rounded = backend.asarray(backend.to_numpy(p32), low)
        np.testing.assert_array_equal(backend.to_numpy(p_low), backend.to_numpy(rounded))
        p32 = backend.asarray(backend.to_numpy(p_low), "float32")


def test_low_precision_default_state_keeps_param_dtype():
    torch = pytest.importorskip("torch")
    p = torch.randn(4, 4, dtype=torch.bfloat16)
    s = ac.adamp_init(p)
    p2, s2 = ac.adamp_step(p, torch.randn(4, 4, dtype=torch.bfloat16), s)
    assert p2.dtype == s2.exp_avg.dtype == s2.exp_avg_sq.dtype == torch.bfloat16
    assert torch.isfinite(p2.float()).all()


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)])
def test_empty_arrays_are_a_no_op(backend, name, shape):
    """Our documented answer for size-0 params (the official code raises): nothing to update."""
    init, step = STEPS[name]
    p = backend.asarray(np.zeros(shape), "float32")
    new_p, new_state = step(p, backend.asarray(np.zeros(shape), "float32"), init(p))
    assert tuple(new_p.shape) == shape


@pytest.mark.parametrize("name", list(STEPS))
def test_zero_weights_are_projected_without_nan(name):
    """Zero-initialised weights: cos = 0, so the channel view fires, the projection removes 0 * w,
    and the update is the plain one with weight decay scaled by wd_ratio (as adamp 0.3.0)."""
    p = np.zeros((3, 4))
    g = np.arange(12.0).reshape(3, 4)
    assert int(ac.projected_view(p, g)) == ac.VIEW_CHANNEL
    init, step = STEPS[name]
    new_p, _ = step(p, g, init(p))
    assert np.isfinite(new_p).all() and not np.array_equal(new_p, p)
