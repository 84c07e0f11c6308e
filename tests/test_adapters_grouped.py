"""The adapters' multi-tensor path (``foreach``, :mod:`adamp_core.paths.multi_tensor`) against their per-tensor
array-API step (``foreach=False``), step by step: float64 within 1e-12, float32 within 1e-5 (normwise),
with maximize, skip_nonfinite, 16-bit params, non-contiguous params, several groups and devices. A spy
asserts that the groups were really stepped together."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import adamp_core.paths.multi_tensor as grouped

TOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 0.0}
# Row length 6 three times (unequal row counts), 27 twice (equal), 1-d length 5 three times, loners.
SHAPES = [(4, 6), (3, 2, 3), (2, 3, 3, 3), (5,), (2, 6), (5,), (4, 3, 3, 3), (7, 2), (5,), ()]


def _spy(monkeypatch, optimizer, *modules):
    """Record the size of every group the adapters step together."""
    sizes: list[int] = []
    real = getattr(grouped, f"{optimizer}_update_group")

    def spy(xp, params, *a, **k):
        sizes.append(len(params))
        return real(xp, params, *a, **k)

    monkeypatch.setitem(grouped._UPDATE_GROUP, optimizer, spy)  # the multi-tensor path's group step
    if "torch" in sys.modules:
        from adamp_core.paths import _multi_tensor_torch as native  # torch's own group step (issue 26)

        run = native.TorchGroup.run

        def spy_native(self, *a, **k):
            sizes.append(self.k)
            return run(self, *a, **k)

        monkeypatch.setattr(native.TorchGroup, "run", spy_native)
    return sizes


# The groups above as torch's own multi-tensor step forms them (any row lengths together; a lone tensor
# too): per step 5 projected and 2 1-d tensors of the first param group, 1 projected and 2 1-d of the second.
NATIVE_SIZES = [5, 2, 1, 2]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0)) / max(float(np.max(np.abs(b), initial=0.0)), 1e-30)


def _step_twins(params, opts, grads):
    """Give both twin param lists the same grads, then step both optimizers."""
    for pair in params:
        for p, g in zip(pair, grads, strict=True):
            p.grad = g.clone()
    for o in opts:
        o.step()


def _kw(optimizer):
    if optimizer == "adamp":
        return dict(lr=1e-2, weight_decay=1e-2, nesterov=True)
    return dict(lr=0.1, momentum=0.9, weight_decay=1e-2)


def _grads(rng, shapes, t):
    """Generic grads (made orthogonal by :func:`_orthogonalize`), an inf in param 1's at step 3."""
    out = [rng.standard_normal(s) for s in shapes]
    if t == 3:
        out[1].flat[0] = np.inf
    return out


def _orthogonalize(ws, gs, t):
    for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
        if w.ndim > 1 and np.all(np.isfinite(g)):
            wr, gr = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
            kind = (t + i) % 3
            if kind == 0:
                gr -= wr * ((wr * gr).sum(1, keepdims=True) / (wr * wr).sum(1, keepdims=True))
            elif kind == 1:
                gr -= wr * ((wr * gr).sum() / (wr * wr).sum())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_foreach_equals_per_tensor_step(optimizer, dtype, monkeypatch):
    torch = pytest.importorskip("torch")
    import adamp_torch

    dt = getattr(torch, dtype)
    rng = np.random.default_rng(1)
    w0 = [rng.standard_normal(s) for s in SHAPES]
    cls = getattr(adamp_torch, optimizer.replace("adamp", "AdamP").replace("sgdp", "SGDP"))
    ps = [[torch.nn.Parameter(torch.tensor(w, dtype=dt)) for w in w0] for _ in range(2)]
    # A transposed (non-contiguous) param joins its group through a copy and is written back in place.
    for pair in ps:
        pair[7] = torch.nn.Parameter(torch.tensor(w0[7].T.copy(), dtype=dt).T)
    groups = lambda p: [{"params": p[:7]}, {"params": p[7:], "weight_decay": 0.0}]  # noqa: E731
    opts = [cls(groups(ps[i]), fused=False, foreach=f, maximize=True, skip_nonfinite=True, **_kw(optimizer))
            for i, f in enumerate((None, False))]
    sizes = _spy(monkeypatch, optimizer, adamp_torch)
    for t in range(6):
        ws = [p.detach().numpy() for p in ps[1]]
        gs = _grads(rng, SHAPES, t)
        _orthogonalize(ws, gs, t)
        _step_twins(ps, opts, [torch.tensor(g, dtype=dt) for g in gs])
        for a, b in zip(*ps, strict=True):
            assert _rel(a.detach(), b.detach()) <= TOL[dtype], f"step {t}"
    assert not ps[0][7].is_contiguous()
    for a, b in zip(*ps, strict=True):
        sa, sb = opts[0].state[a], opts[1].state[b]
        assert set(sa) == set(sb)
        for k in sa:
            if sa[k].ndim == 0:
                assert int(sa[k]) == int(sb[k]), k
                assert sa[k].dtype == sb[k].dtype
            else:
                assert _rel(sa[k], sb[k]) <= TOL[dtype], k
    assert int(opts[0].state[ps[0][1]]["nonfinite_skips"]) == 1
    # torch's own group step (adamp_core.paths._multi_tensor_torch): see NATIVE_SIZES
    assert sorted(sizes) == sorted(NATIVE_SIZES * 6)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_bfloat16_params_are_stepped_together(optimizer, monkeypatch):
    """16-bit params never take the fused kernels: by default they are grouped, with float32 state,
    and get exactly what the per-tensor step gives them (both round the same float32 result once)."""
    torch = pytest.importorskip("torch")
    import adamp_torch

    rng = np.random.default_rng(2)
    cls = getattr(adamp_torch, optimizer.replace("adamp", "AdamP").replace("sgdp", "SGDP"))
    w0 = [torch.tensor(rng.standard_normal(s), dtype=torch.bfloat16) for s in SHAPES[:6]]
    ps = [[torch.nn.Parameter(w.clone()) for w in w0] for _ in range(2)]
    opts = [cls(ps[i], foreach=f, state_dtype=torch.float32, **_kw(optimizer)) for i, f in enumerate((None, False))]
    sizes = _spy(monkeypatch, optimizer, adamp_torch)
    for t in range(4):
        gs = [torch.tensor(rng.standard_normal(s), dtype=torch.bfloat16) for s in SHAPES[:6]]
        _step_twins(ps, opts, gs)
        for a, b in zip(*ps, strict=True):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b), f"step {t}"
    assert sizes and max(sizes) >= 2


def _no_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


@pytest.mark.skipif(_no_cuda(), reason="torch: no CUDA device")
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_cuda_default_path_equals_per_tensor_step(optimizer):  # pragma: no cover - needs a GPU
    import torch

    import adamp_torch

    rng = np.random.default_rng(3)
    cls = getattr(adamp_torch, optimizer.replace("adamp", "AdamP").replace("sgdp", "SGDP"))
    w0 = [torch.tensor(rng.standard_normal(s), dtype=torch.float32, device="cuda") for s in SHAPES]
    ps = [[torch.nn.Parameter(w.clone()) for w in w0] for _ in range(2)]
    opts = [cls(ps[i], foreach=f, skip_nonfinite=True, **_kw(optimizer)) for i, f in enumerate((None, False))]
    for t in range(5):
        gs = _grads(rng, SHAPES, t)
        _orthogonalize([p.detach().cpu().numpy() for p in ps[1]], gs, t)
        _step_twins(ps, opts, [torch.tensor(g, dtype=torch.float32, device="cuda") for g in gs])
        for a, b in zip(*ps, strict=True):
            assert _rel(a.detach().cpu(), b.detach().cpu()) <= 1e-5, f"step {t}"


def _array_backends():
    from adamp_xp.testing.backends import BACKENDS

    out = []
    for b in BACKENDS:
        reason = b.skip_reason()
        out.append(pytest.param(b, id=b.id, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return out


def _flat(opt):
    return [p for group in opt.params for p in group["params"]]


@pytest.mark.parametrize("backend", _array_backends())
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_array_foreach_equals_per_array_step(optimizer, backend, monkeypatch):
    """adamp_array on every library: the default (grouped where the fused kernels do not apply; on NumPy
    with fused=False) against foreach=False, two param groups, skip_nonfinite; JAX arrays are replaced,
    the others written in place."""
    import adamp_array

    rng = np.random.default_rng(4)
    w0 = [rng.standard_normal(s) for s in SHAPES]
    cls = getattr(adamp_array, optimizer.replace("adamp", "AdamP").replace("sgdp", "SGDP"))
    ps = [[backend.asarray(w, "float32") for w in w0] for _ in range(2)]
    groups = lambda p: [{"params": p[:7]}, {"params": p[7:], "weight_decay": 0.0}]  # noqa: E731
    opts = [cls(groups(ps[i]), fused=False, foreach=f, skip_nonfinite=True, **_kw(optimizer))
            for i, f in enumerate((None, False))]
    sizes = _spy(monkeypatch, optimizer, adamp_array)
    for t in range(5):
        gs = _grads(rng, SHAPES, t)
        _orthogonalize([backend.to_numpy(p) for p in _flat(opts[1])], gs, t)
        gs = [backend.asarray(g, "float32") for g in gs]
        for o in opts:
            o.step([gs[:7], gs[7:]])
        for a, b in zip(_flat(opts[0]), _flat(opts[1]), strict=True):
            assert _rel(backend.to_numpy(a), backend.to_numpy(b)) <= 1e-5, f"step {t}"
    assert opts[0].nonfinite_skips == opts[1].nonfinite_skips
    # Group 0: row length 6 x3 (params 0, 1, 4), 27 x2 (2, 6), 1-d length 5 x2 (3, 5); group 1: loners.
    # (torch arrays: torch's own group step, NATIVE_SIZES)
    assert sorted(sizes) == sorted((NATIVE_SIZES if backend.library == "torch" else [3, 2, 2]) * 5)
    sd = [o.state_dict()["state"] for o in opts]
    for i, st in sd[1].items():
        for k, v in st.items():
            if k == "step":
                assert int(sd[0][i][k]) == int(v)
            else:
                assert _rel(backend.to_numpy(sd[0][i][k]), backend.to_numpy(v)) <= 1e-5, (i, k)


def test_foreach_option_is_checked():
    torch = pytest.importorskip("torch")
    import adamp_array
    import adamp_torch

    p = torch.nn.Parameter(torch.ones(2, 2))
    for cls in (adamp_torch.AdamP, adamp_torch.SGDP):
        with pytest.raises(TypeError, match=r"Invalid foreach value: 'yes' \(expected None, True or False\)"):
            cls([p], lr=0.1, foreach="yes")
    opt = adamp_torch.AdamP([p], foreach=False)
    opt.param_groups[0]["foreach"] = 1
    p.grad = torch.ones(2, 2)
    before = p.detach().clone()
    with pytest.raises(TypeError, match=r"Invalid foreach value: 1 .*\(param_groups\[0\]\)"):
        opt.step()
    assert torch.equal(p.detach(), before)
    for cls in (adamp_array.AdamP, adamp_array.SGDP):
        with pytest.raises(TypeError, match=r"Invalid foreach value: 'yes'"):
            cls([np.ones(3)], lr=0.1, foreach="yes")


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_optax_foreach_equals_per_leaf_step_under_jit(optimizer, monkeypatch):
    """adamp_optax under jax.jit: foreach=True (leaves stepped together) against the default (one step per
    leaf), with a schedule, skip_nonfinite (per-leaf skip counts) and a dict of mixed shapes; both trace
    once."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    import adamp_optax

    rng = np.random.default_rng(6)
    names = [f"p{i}" for i in range(len(SHAPES))]
    params = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in zip(names, SHAPES, strict=True)}
    schedule = optax.linear_schedule(1e-2, 1e-3, 10)
    kw = dict(weight_decay=1e-2, skip_nonfinite=True)
    if optimizer == "sgdp":
        kw.update(momentum=0.9, nesterov=True)
    make = getattr(adamp_optax, optimizer)
    sizes: list[int] = []  # group sizes seen while tracing
    real = getattr(grouped, f"{optimizer}_update_group")
    monkeypatch.setitem(grouped._UPDATE_GROUP, optimizer,
                        lambda xp, ps, *a, **k: sizes.append(len(ps)) or real(xp, ps, *a, **k))
    txs = [make(schedule, foreach=f, **kw) for f in (True, None)]
    traces = [0, 0]
    runs = []
    for j, tx in enumerate(txs):

        def step(p, s, g, tx=tx, j=j):
            traces[j] += 1
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        runs.append([jax.jit(step), dict(params), tx.init(params)])
    for t in range(5):
        gs = _grads(rng, SHAPES, t)
        _orthogonalize([np.asarray(runs[1][1][n]) for n in names], gs, t)
        grads = {n: jnp.asarray(g, jnp.float32) for n, g in zip(names, gs, strict=True)}
        for run in runs:
            run[1], run[2] = run[0](run[1], run[2], grads)
        for n in names:
            assert _rel(np.asarray(runs[0][1][n]), np.asarray(runs[1][1][n])) <= 1e-5, f"step {t}: {n}"
    assert traces == [1, 1]
    assert sorted(s for s in sizes if s > 1) == [2, 3, 3]  # row lengths 6 (x3), 27 (x2), 1-d length 5 (x3)
    skips = [jax.tree.map(int, run[2].nonfinite_skips) for run in runs]
    assert skips[0] == skips[1] and skips[0]["p1"] == 1
    if optimizer == "adamp":  # a skipped leaf's step count does not advance
        steps = [{n: int(s) for n, s in run[2].step.items()} for run in runs]
        assert steps[0] == steps[1] and steps[0]["p1"] == 4
    with pytest.raises(TypeError, match=r"Invalid foreach value: 'yes'"):
        make(0.1, foreach="yes")
