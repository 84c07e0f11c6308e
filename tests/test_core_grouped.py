"""The multi-tensor step (adamp_core.paths.multi_tensor) against the plain per-tensor step, on every backend: each
tensor of a group must get what it would get alone (float64 within 1e-12, float32 within 1e-5,
normwise per step), with its own view decision, step count, non-finite skip and scale; and the group
step must stay sync-free (it traces under ``jax.jit``)."""

from __future__ import annotations

import numpy as np
import pytest

from adamp_core.adamp import AdamPState, adamp_update
from adamp_core.hyperparams import check_adamp, check_sgdp
from adamp_core.paths.multi_tensor import (
    GROUP_MAX_ELEMENTS,
    HOST_TENSOR_MAX_ELEMENTS,
    SegmentRows,
    adamp_update_group,
    group_indices,
    row_bucket,
    sgdp_update_group,
)
from adamp_core.projection import VIEW_CHANNEL, VIEW_LAYER, VIEW_NONE, projected_view
from adamp_core.sgdp import SGDPState, sgdp_update

TOL = {"float64": 1e-12, "float32": 1e-5}
# One row length (6) with unequal row counts (the gather path), one with equal counts (the reshape
# path), a 1-d group of equal lengths, row lengths 37, 38 and 40 padded to 40 (2-d and 1-d), and loners.
SHAPES = [(4, 6), (3, 2, 3), (5, 6), (1, 6), (2, 4), (2, 2, 2), (2, 4), (6,), (6,), (7,), (3, 5),
          (2, 40), (3, 37), (38,), (2, 2, 19), (40,)]
STEPS = 9


def _grad(rng, w, kind):
    """A grad whose rows are orthogonal to w's rows (channel view fires), orthogonal to w as a whole
    only (layer view can fire), or generic (neither)."""
    g = rng.standard_normal(w.shape)
    if w.ndim >= 2:
        wr, gr = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
        if kind == 0:
            gr -= wr * ((wr * gr).sum(1, keepdims=True) / (wr * wr).sum(1, keepdims=True))
        elif kind == 1:
            gr -= wr * ((wr * gr).sum() / (wr * wr).sum())
    return g


def _hyper(optimizer, nesterov, arrays=None):
    if optimizer == "adamp":
        kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, delta=0.1, wd_ratio=0.1, nesterov=nesterov)
    else:
        kw = dict(lr=0.1, momentum=0.9, dampening=0.0 if nesterov else 0.2, weight_decay=1e-2, nesterov=nesterov,
                  eps=1e-8, delta=0.1, wd_ratio=0.1)
    if arrays is not None:  # 0-d array hyperparameters (what a scheduler on a device passes)
        kw.update(lr=arrays(kw["lr"]), delta=arrays(kw["delta"]))
    return (check_adamp if optimizer == "adamp" else check_sgdp)(**kw)


def _states(backend, xp, optimizer, params, dtype, first_steps):
    if optimizer == "adamp":
        return [AdamPState(xp.asarray(t, dtype=xp.int32), backend.asarray(np.zeros(p.shape), dtype),
                           backend.asarray(np.zeros(p.shape), dtype)) for p, t in zip(params, first_steps, strict=True)]
    return [SGDPState(backend.asarray(np.zeros(p.shape), dtype)) for p in params]


def _check(backend, got, want, dtype, what):
    got, want = backend.to_numpy(got), backend.to_numpy(want)
    assert got.shape == want.shape, what
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
    assert float(np.max(np.abs(got - want), initial=0.0)) <= TOL[dtype] * scale, what


def _run(backend, xp, optimizer, dtype, hp, params, grads_of, skip=False, first_steps=None):
    """Step the group path and the per-tensor path side by side for STEPS steps; return the views seen."""
    update = adamp_update if optimizer == "adamp" else sgdp_update
    update_group = adamp_update_group if optimizer == "adamp" else sgdp_update_group
    first_steps = first_steps or [0] * len(params)
    ref_p, ref_s = list(params), _states(backend, xp, optimizer, params, dtype, first_steps)
    grp_p, grp_s = list(params), list(ref_s)
    groups = group_indices([None] * len(params), [tuple(p.shape) for p in params])
    assert any(len(g) > 1 for g in groups)
    views = []
    for t in range(STEPS):
        grads = grads_of(t, [backend.to_numpy(p) for p in ref_p])
        views.append([int(backend.to_numpy(projected_view(p, g, hp.delta, hp.eps))) if p.ndim > 1 else VIEW_NONE
                      for p, g in zip(ref_p, grads, strict=True)])
        for i, (p, g, s) in enumerate(zip(ref_p, grads, ref_s, strict=True)):
            new_p, new_s = update(xp, p, g, s, hp)
            if skip and not np.all(np.isfinite(backend.to_numpy(g))):
                new_p, new_s = p, s
            ref_p[i], ref_s[i] = new_p, new_s
        for idx in groups:
            new_p, new_s, ok = update_group(xp, [grp_p[i] for i in idx], [grads[i] for i in idx],
                                            [grp_s[i] for i in idx], hp, skip)
            assert (ok is None) == (not skip)
            for j, i in enumerate(idx):
                grp_p[i], grp_s[i] = new_p[j], new_s[j]
        for i in range(len(params)):
            _check(backend, grp_p[i], ref_p[i], dtype, f"step {t}, param {i} {tuple(params[i].shape)}")
            for name, a, b in zip(ref_s[i]._fields, grp_s[i], ref_s[i], strict=True):
                if name == "step":
                    assert int(backend.to_numpy(a)) == int(backend.to_numpy(b)), f"step {t}, param {i}: step"
                    assert a.dtype == b.dtype
                else:
                    _check(backend, a, b, dtype, f"step {t}, param {i}: {name}")
            assert grp_p[i].dtype == params[i].dtype and grp_s[i][-1].dtype == ref_s[i][-1].dtype
    return views


@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_group_step_equals_per_tensor_step(backend, xp, dtype, optimizer, nesterov):
    if not backend.supports(dtype):
        pytest.skip(f"{backend} has no {dtype}")
    rng = np.random.default_rng(7 + nesterov)
    params = [backend.asarray(rng.standard_normal(s), dtype) for s in SHAPES]

    def grads_of(t, ws):  # each tensor gets its own kind of grad, changing with the step
        return [backend.asarray(_grad(rng, w, (t + i) % 3), dtype) for i, w in enumerate(ws)]

    # Different step counts per tensor: the bias corrections are per row.
    views = _run(backend, xp, optimizer, dtype, _hyper(optimizer, nesterov), params, grads_of,
                 first_steps=[3 * i for i in range(len(SHAPES))])
    seen = {v for step in views for v in step}
    assert {VIEW_NONE, VIEW_CHANNEL, VIEW_LAYER} <= seen, "the grads must fire both views and neither"
    assert any(len({step[i] for i in (0, 1, 2, 3)}) > 1 for step in views), "one group, different decisions"


def test_group_step_with_array_hyperparameters(backend, xp, dtype):
    if not backend.supports(dtype):
        pytest.skip(f"{backend} has no {dtype}")
    rng = np.random.default_rng(11)
    params = [backend.asarray(rng.standard_normal(s), dtype) for s in SHAPES]
    hp = _hyper("adamp", False, arrays=lambda v: backend.asarray(np.asarray(v), dtype))
    _run(backend, xp, "adamp", dtype, hp, params,
         lambda t, ws: [backend.asarray(_grad(rng, w, t % 3), dtype) for w in ws])


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_group_step_keeps_each_tensors_scale(backend, xp, optimizer):
    """float32 tensors near 1e-19 and 1e+18 in one group: the power-of-two row scaling and the layer
    view's common scale are per tensor (a group-wide min would underflow the small tensor's sums)."""
    rng = np.random.default_rng(5)
    scales = [1e-19, 1e18, 1.0, 3e-20]
    params = [backend.asarray(rng.standard_normal((4, 6)) * s, "float32") for s in scales]
    _run(backend, xp, optimizer, "float32", _hyper(optimizer, False), params,
         lambda t, ws: [backend.asarray(_grad(rng, w, t % 3) * s, "float32") for w, s in zip(ws, scales, strict=True)])


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_group_step_skips_only_the_tensor_with_a_nonfinite_grad(backend, xp, optimizer):
    rng = np.random.default_rng(9)
    params = [backend.asarray(rng.standard_normal(s), "float32") for s in SHAPES]

    def grads_of(t, ws):
        gs = [_grad(rng, w, t % 3) for w in ws]
        gs[(2 * t) % len(gs)].flat[t % 4] = (np.nan, np.inf, -np.inf)[t % 3]
        return [backend.asarray(g, "float32") for g in gs]

    _run(backend, xp, optimizer, "float32", _hyper(optimizer, True), params, grads_of, skip=True)


def test_group_step_traces_under_jax_jit():
    """Sync-free: the whole group step traces once under jax.jit (a host read would raise) and equals
    the eager one."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from array_api_compat import array_namespace

    rng = np.random.default_rng(2)
    params = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(4, 6), (3, 2, 3), (6,), (6,)]]
    grads = [jnp.asarray(_grad(rng, np.asarray(p), i % 3), jnp.float32) for i, p in enumerate(params)]
    states = [AdamPState(jnp.zeros((), jnp.int32), jnp.zeros_like(p), jnp.zeros_like(p)) for p in params]
    hp = _hyper("adamp", False)
    xp = array_namespace(params[0])
    traces = []

    def step(ps, gs, ss):
        traces.append(1)
        out_p, out_s = [], []
        for idx in group_indices([None] * len(ps), [tuple(p.shape) for p in ps]):
            new_p, new_s, _ = adamp_update_group(xp, [ps[i] for i in idx], [gs[i] for i in idx],
                                                 [ss[i] for i in idx], hp, True)
            out_p += new_p
            out_s += new_s
        return out_p, out_s

    jitted = jax.jit(step)
    for _ in range(3):
        got_p, got_s = jitted(params, grads, states)
    eager_p, _ = step(params, grads, states)
    assert len(traces) == 2  # one trace for jit, one eager call
    for a, b in zip(got_p, eager_p, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert [int(s.step) for s in got_s] == [1, 1, 1, 1]


def test_group_indices():
    shapes = [(4, 6), (6,), (2, 3, 2), (0, 6), (5, 6), (6,), (7,), (4, 6), (100, 6)]
    keys = ["a", "a", "a", "a", "a", "a", "a", "b", "a"]
    # Row length 6 with ndim > 1 ("a"), 1-d length 6, the empty one alone, 7 alone, key "b" apart, and
    # (100, 6) over max_elements=70 alone.
    assert group_indices(keys, shapes, max_elements=70) == [[0, 2, 4], [1, 5], [3], [6], [7], [8]]
    # The cap splits a group in order of appearance.
    assert group_indices(["a"] * 3, [(4, 6)] * 3, max_elements=48) == [[0, 1], [2]]
    # Row lengths 37 and 40 share the bucket 40 (padding < 1/8), 1-d and 2-d apart; 33 is in bucket 36.
    assert group_indices([0] * 5, [(2, 40), (3, 37), (37,), (2, 33), (40,)]) == [[0, 1], [2, 4], [3]]
    assert [row_bucket(n) for n in (1, 15, 16, 17, 33, 37, 40, 1000, 1025)] == [1, 15, 16, 18, 36, 40, 40, 1024, 1152]
    # The CPU's per-tensor cap leaves the larger tensors alone but still groups the small ones.
    big = [(300, 300), (4, 300), (300, 300), (2, 300)]  # 90,000 elements: grouped for a GPU, alone on a CPU
    assert group_indices([0] * 4, big) == [[0, 1, 2, 3]]
    assert group_indices([0] * 4, big, on_host=True) == [[0], [1, 3], [2]]
    assert GROUP_MAX_ELEMENTS >= 1 << 20 and HOST_TENSOR_MAX_ELEMENTS <= GROUP_MAX_ELEMENTS


def test_group_of_mismatched_tensors_is_refused():
    import array_api_compat.numpy as xp

    hp = _hyper("sgdp", False)
    ws = [np.ones((2, 3)), np.ones((3,))]
    with pytest.raises(ValueError, match=r"Invalid group: shapes \[\(2, 3\), \(3,\)\]"):
        sgdp_update_group(xp, ws, ws, [SGDPState(np.zeros_like(w)) for w in ws], hp)


def test_segment_reductions_against_numpy():
    """SegmentRows' sums/max/min per tensor, put back on each row, against a plain loop (gather and
    reshape paths)."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(0)
    for counts in [(3, 1, 4), (2, 2, 2)]:
        rows = SegmentRows(xp, counts, [5] * len(counts), None, True)
        x, y = rng.standard_normal(sum(counts)), rng.standard_normal(sum(counts))
        bounds = np.cumsum((0,) + counts)
        for op, ref in [(rows.sum, np.sum), (rows.max, np.max), (rows.min, np.min)]:
            gx, gy = op(xp, x, y)
            for a, b in ((gx, x), (gy, y)):
                spans = zip(counts, bounds[:-1], bounds[1:], strict=True)
                want = np.concatenate([np.full(c, ref(b[s:e])) for c, s, e in spans])
                np.testing.assert_allclose(a, want, rtol=1e-15)
