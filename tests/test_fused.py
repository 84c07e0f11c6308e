"""The fused CPU kernels (adamp_core.paths.numba_fused) against the array-API step, step by step, and their use in the
adapters: float64 within 1e-12 and float32 within 1e-5 (normwise per step), both views fired, the
fallbacks (out-of-range float64, non-contiguous tensors, torch.compile) and the ``fused`` option."""

from __future__ import annotations

import numpy as np
import pytest

import adamp_core as ac
from adamp_core.diagnostics import step_diagnostics, to_host
from adamp_core.hyperparams import check_adamp, check_sgdp

pytest.importorskip("numba", reason="numba is not installed (the 'fast' extra): no fused kernels to test")
from adamp_core.paths import numba_fused as fused  # noqa: E402

TOL = {np.float64: 1e-12, np.float32: 1e-5}
SHAPES = {
    "conv4d": (8, 3, 3, 3),
    "linear2d": (6, 10),
    "vector": (7,),
    "scalar": (),
    "empty": (0, 4),
    "rowlen1": (5, 1),
    "onerow": (1, 9),
    "wide": (3, 70000),
}  # "wide": the parallel kernel
STEPS = 12


def _grad(rng, w, t, dtype):
    """Alternate scale-invariant grads (each row orthogonal to w's row: the channel view fires), grads
    orthogonal to w as a whole only (the layer view can fire) and generic ones (no projection)."""
    g = rng.standard_normal(w.shape)
    if w.ndim >= 2 and w.size:
        wr, gr = w.reshape(w.shape[0], -1).astype(np.float64), g.reshape(w.shape[0], -1)
        if t % 3 == 0:
            gr -= wr * ((wr * gr).sum(1, keepdims=True) / (wr * wr).sum(1, keepdims=True))
        elif t % 3 == 1:
            gr -= wr * ((wr * gr).sum() / (wr * wr).sum())
    return g.astype(dtype)


def _rel(a, b):
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b), initial=0.0)) / scale


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_kernel_equals_array_api_step(optimizer, nesterov, shape, dtype):
    rng = np.random.default_rng(sum(map(ord, optimizer + str(shape))) + nesterov)
    w0 = rng.standard_normal(SHAPES[shape]).astype(dtype)
    if optimizer == "adamp":
        kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, delta=0.1, wd_ratio=0.1, nesterov=nesterov)
        hp, state = check_adamp(**kw), ac.adamp_init(w0)
    else:
        kw = dict(
            lr=0.1,
            momentum=0.9,
            dampening=0.0 if nesterov else 0.2,
            weight_decay=1e-2,
            nesterov=nesterov,
            eps=1e-8,
            delta=0.1,
            wd_ratio=0.1,
        )
        hp, state = check_sgdp(**kw), ac.sgdp_init(w0)
    w, wf = w0.copy(), w0.copy()
    bufs = [np.zeros_like(w0) for _ in range(2 if optimizer == "adamp" else 1)]
    fired = set()
    # Normwise over the trajectory (max_t |diff| / max_t |ref|), as the oracle tests: right after a fully
    # projected SGDP step the stored buffer is rounding noise, so a per-step scale is ill-conditioned.
    diff, ref = np.zeros(1 + len(bufs)), np.zeros(1 + len(bufs))
    for t in range(1, STEPS + 1):
        g = _grad(rng, w, t, dtype)
        if optimizer == "adamp":
            w, state = ac.adamp_step(w, g, state, **kw)
            status, projected = fused.adamp_inplace(wf, g, *bufs, t, hp)
            ref_state = (state.exp_avg, state.exp_avg_sq)
        else:
            w, state = ac.sgdp_step(w, g, state, **kw)
            status, projected = fused.sgdp_inplace(wf, g, *bufs, hp)
            ref_state = (state.momentum,)
        if status == fused.FALLBACK:  # float64 rows with all-zero grads: nothing written; the caller falls back
            assert dtype == np.float64 and shape == "rowlen1"
            wf[...] = w
            for b, r in zip(bufs, ref_state, strict=True):
                b[...] = r
            continue
        assert status == fused.OK
        fired.add(bool(projected))
        for i, (got, want) in enumerate(zip((wf, *bufs), (w, *ref_state), strict=True)):
            want = np.asarray(want, np.float64)
            diff[i] = max(diff[i], float(np.max(np.abs(got - want), initial=0.0)))
            ref[i] = max(ref[i], float(np.max(np.abs(want), initial=0.0)))
            assert diff[i] <= TOL[dtype] * max(ref[i], 1e-30), f"step {t}: {'param' if i == 0 else 'state'}"
        assert wf.dtype == w0.dtype and wf.shape == w0.shape
    if len(SHAPES[shape]) >= 2 and 0 not in SHAPES[shape] and shape != "rowlen1":
        assert fired == {True, False}, "the test grads must make the kernel project on some steps and not others"


def test_kernel_fires_both_views_like_the_array_api_step():
    """The kernel's projected flag agrees with adamp_core.projected_view for channel, layer and none."""
    rng = np.random.default_rng(3)
    hp = check_adamp(1e-2, (0.9, 0.999), 1e-8, 0.0, 0.1, 0.1, False)
    views = set()
    for t in range(30):
        w = rng.standard_normal((6, 40))
        g = _grad(rng, w, t, np.float64)
        view = int(ac.projected_view(w, g))
        views.add(view)
        _, projected = fused.adamp_inplace(w.copy(), g, np.zeros_like(w), np.zeros_like(w), 1, hp)
        assert projected == (view != ac.VIEW_NONE)
    assert views == {ac.VIEW_NONE, ac.VIEW_CHANNEL, ac.VIEW_LAYER}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the pure step's eps * tiny scale
def test_out_of_range_float64_writes_nothing_and_adapters_fall_back():
    """float64 rows whose sums of squares leave [2**-968, 2**968]: the kernel reports FALLBACK untouched,
    and adamp_array then takes the array-API step (whose scaled sums are exact there)."""
    import adamp_array

    w = np.full((4, 5), 1e-300)
    g = np.full((4, 5), 1e-300)
    m, v = np.zeros_like(w), np.zeros_like(w)
    before = [x.copy() for x in (w, g, m, v)]
    hp = check_adamp(1e-2, (0.9, 0.999), 1e-8, 0.0, 0.1, 0.1, False)
    assert fused.adamp_inplace(w, g, m, v, 1, hp)[0] == fused.FALLBACK
    for x, b in zip((w, g, m, v), before, strict=True):
        np.testing.assert_array_equal(x, b)
    ours, pure = w.copy(), w.copy()
    adamp_array.AdamP([ours], lr=1e-2).step([g])
    adamp_array.AdamP([pure], lr=1e-2, fused=False).step([g])
    np.testing.assert_array_equal(ours, pure)
    assert np.all(np.isfinite(ours)) and not np.array_equal(ours, w)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_skip_nonfinite_in_the_kernel(optimizer):
    w, g = np.ones((3, 4)), np.ones((3, 4))
    g[2, 1] = np.nan
    bufs = [np.zeros_like(w) for _ in range(2 if optimizer == "adamp" else 1)]
    if optimizer == "adamp":
        status, _ = fused.adamp_inplace(w, g, *bufs, 1, check_adamp(1e-2, (0.9, 0.999), 1e-8, 0, 0.1, 0.1, False), True)
    else:
        status, _ = fused.sgdp_inplace(w, g, *bufs, check_sgdp(0.1, 0.9, 0, 0, False, 1e-8, 0.1, 0.1), True)
    assert status == fused.SKIPPED
    np.testing.assert_array_equal(w, np.ones((3, 4)))
    assert all(not b.any() for b in bufs)


def test_serial_and_parallel_kernels_have_their_own_cache_entries():
    """numba's on-disk cache keys a function by name and line only: a serial and a parallel compilation
    under one name loaded each other's machine code (measured: the parallel kernel 4x slower)."""
    names = [k.py_func.__qualname__ for pair in fused._compiled().KERNELS.values() for k in pair]
    assert len(set(names)) == len(names) == 4


def test_supports():
    a = np.zeros((3, 4), np.float32)
    assert fused.supports(a, a.copy(), a.copy())
    assert not fused.supports(a, a.astype(np.float64))  # mixed dtypes
    assert not fused.supports(a.T, a.T.copy(), a.T.copy())  # not C-contiguous
    assert not fused.supports(a.astype(np.float16), a.astype(np.float16))  # half precision: array-API step
    ro = a.copy()
    ro.flags.writeable = False
    assert not fused.supports(ro, a)


# -- the adapters -------------------------------------------------------------------------------


def _net(torch, seed):
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_adapter_fused_equals_array_api_step(optimizer, dtype):
    torch = pytest.importorskip("torch")
    import adamp_torch

    dt = getattr(torch, dtype)
    cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    kw = dict(lr=1e-2, weight_decay=1e-2) if optimizer == "adamp" else dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    nets = [_net(torch, 0).to(dt), _net(torch, 0).to(dt)]
    opts = [cls(nets[0].parameters(), fused=True, **kw), cls(nets[1].parameters(), fused=False, **kw)]
    gen = torch.Generator().manual_seed(1)
    for t in range(8):
        x = torch.randn(16, 3, 8, 8, generator=gen, dtype=dt)
        y = torch.randint(0, 5, (16,), generator=gen)
        # One backward, the same grads for both (conv biases before BatchNorm have rounding-noise grads,
        # which a second backward need not reproduce bit for bit).
        opts[0].zero_grad()
        torch.nn.functional.cross_entropy(nets[0](x), y).backward()
        for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            q.grad = p.grad.clone()
        for o in opts:
            o.step()
        for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            ref = q.detach().numpy()
            assert _rel(p.detach().numpy(), ref) <= TOL[np.dtype(dtype).type], f"step {t}"
            for k, v in opts[1].state[q].items():
                got = opts[0].state[p][k]
                if k == "step":
                    assert int(got) == int(v)
                else:
                    assert _rel(got.numpy(), v.numpy()) <= TOL[np.dtype(dtype).type], f"step {t}: {k}"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_batch_kernel_equals_one_kernel_per_tensor(optimizer, dtype):
    """adamp_batch/sgdp_batch (many tensors, one call) write bit for bit what adamp_inplace/sgdp_inplace
    write tensor by tensor, and report the same statuses: every shape of SHAPES but the wide one, step
    counts that differ per tensor, a non-finite grad (skipped) and a float64 row out of range (FALLBACK)."""
    rng = np.random.default_rng(3)
    shapes = [s for k, s in SHAPES.items() if k != "wide"] + [(4, 2, 5)]
    n_state = 2 if optimizer == "adamp" else 1
    arrays = []
    for i, shape in enumerate(shapes):
        w = np.asarray(rng.standard_normal(shape), dtype=dtype)
        g = _grad(rng, w, i, dtype)
        state = [np.asarray(np.abs(rng.standard_normal(shape)) * 0.1, dtype=dtype) for _ in range(n_state)]
        arrays.append([w, g, *state])
    arrays[1][1][0, 0] = np.inf  # skipped
    if dtype == np.float64:
        arrays[-1][0][:] = 1e-300  # |w|^2 underflows: FALLBACK
    steps = np.arange(1, len(shapes) + 1) % 4 + 1
    hp = (
        check_adamp(1e-2, (0.9, 0.999), 1e-8, 1e-2, 0.1, 0.1, True)
        if optimizer == "adamp"
        else check_sgdp(0.1, 0.9, 0.0, 1e-2, True, 1e-8, 0.1, 0.1)
    )
    single = [[x.copy() for x in a] for a in arrays]
    addresses = np.array([[x.ctypes.data for x in a] for a in arrays], dtype=np.int64)
    if optimizer == "adamp":
        status = fused.adamp_batch(addresses, shapes, dtype, steps, hp, skip_nonfinite=True)
        want = [fused.adamp_inplace(*a, int(t), hp, True)[0] for a, t in zip(single, steps, strict=True)]
    else:
        status = fused.sgdp_batch(addresses, shapes, dtype, hp, skip_nonfinite=True)
        want = [fused.sgdp_inplace(*a, hp, True)[0] for a in single]
    assert list(status) == want
    assert want[1] == fused.SKIPPED and (want[-1] == fused.FALLBACK) == (dtype == np.float64)
    assert want.count(fused.OK) >= len(shapes) - 2
    for a, b in zip(arrays, single, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def _count_batched_calls(monkeypatch: pytest.MonkeyPatch, optimizer: str) -> list[int]:
    """Spy on ``fused.adamp_batch``/``sgdp_batch``: the returned list gets the tensor count of every call."""
    batched: list[int] = []
    kernel = getattr(fused, f"{optimizer}_batch")
    monkeypatch.setattr(
        fused,
        f"{optimizer}_batch",
        lambda addresses, *a, **k: batched.append(len(addresses)) or kernel(addresses, *a, **k),
    )
    return batched


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_batched_group_equals_array_api_step(optimizer, monkeypatch):
    """One group of many small params (float32 and float64, 0-d to 4-d, one whose float64 sums fall back)
    and one above the batch size: the batched kernel call, the per-tensor kernel and the fallback against
    fused=False, with maximize and skip_nonfinite (an inf grad in a small param at step 3)."""
    torch = pytest.importorskip("torch")
    import adamp_torch

    gen = torch.Generator().manual_seed(5)
    shapes = [(8, 3, 3, 3), (6, 10), (7,), (), (5, 1), (1, 9), (0, 4), (4, 2, 5), (2, fused.BATCH_MAX_SIZE)]
    dtypes = [torch.float32, torch.float64] * 4 + [torch.float32]
    w0 = [torch.randn(s, generator=gen, dtype=d) for s, d in zip(shapes, dtypes, strict=True)]
    w0[7] = torch.full((4, 2, 5), 1e-300, dtype=torch.float64)  # float64 sums underflow: the fallback
    cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    kw = dict(lr=1e-2, weight_decay=1e-2) if optimizer == "adamp" else dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    ps = [[torch.nn.Parameter(w.clone()) for w in w0] for _ in range(2)]
    opts = [cls(ps[i], maximize=True, skip_nonfinite=True, fused=f, **kw) for i, f in enumerate((None, False))]
    batched = _count_batched_calls(monkeypatch, optimizer)
    for t in range(5):
        grads = [torch.randn(s, generator=gen, dtype=d) for s, d in zip(shapes, dtypes, strict=True)]
        if t == 3:
            grads[1][2, 2] = float("inf")
        for pair in ps:
            for p, g in zip(pair, grads, strict=True):
                p.grad = g.clone()
        for o in opts:
            o.step()
        for a, b in zip(*ps, strict=True):
            assert _rel(a.detach().numpy(), b.detach().numpy()) <= TOL[a.detach().numpy().dtype.type], f"step {t}"
    for a, b in zip(*ps, strict=True):
        sa, sb = opts[0].state[a], opts[1].state[b]
        assert set(sa) == set(sb)
        assert int(sa["nonfinite_skips"]) == int(sb["nonfinite_skips"]) == (1 if a.shape == (6, 10) else 0)
        if "step" in sa:
            assert int(sa["step"]) == int(sb["step"]) == (4 if a.shape == (6, 10) else 5)
    assert sorted(batched) == [4, 4] * 5


def test_torch_adapter_fused_paths_and_fallbacks():
    """maximize, skip_nonfinite and non-contiguous (channels_last) params through the fused option, each
    against fused=False; the non-contiguous param takes the array-API step, so it is bit-identical."""
    torch = pytest.importorskip("torch")
    import adamp_torch

    torch.manual_seed(0)
    w0 = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    cl0 = w0.clone().to(memory_format=torch.channels_last)
    ps = [[torch.nn.Parameter(w0.clone()), torch.nn.Parameter(cl0.clone())] for _ in range(2)]
    opts = [
        adamp_torch.AdamP(ps[0], lr=1e-2, maximize=True, skip_nonfinite=True, fused=None),
        adamp_torch.AdamP(ps[1], lr=1e-2, maximize=True, skip_nonfinite=True, fused=False),
    ]
    for t in range(4):
        g = torch.randn(6, 4, 3, 3, dtype=torch.float64)
        if t == 2:
            g[0, 0, 0, 0] = float("inf")
        for pair in ps:
            pair[0].grad = g.clone()
            pair[1].grad = g.clone().to(memory_format=torch.channels_last)
        for o in opts:
            o.step()
        assert _rel(ps[0][0].detach().numpy(), ps[1][0].detach().numpy()) <= 1e-12
        assert torch.equal(ps[0][1], ps[1][1])  # channels_last: the array-API step in both
    for a, b in zip(ps[0], ps[1], strict=True):
        assert int(opts[0].state[a]["nonfinite_skips"]) == int(opts[1].state[b]["nonfinite_skips"]) == 1
        assert int(opts[0].state[a]["step"]) == int(opts[1].state[b]["step"]) == 3


def test_torch_thread_count_survives_the_parallel_kernels():
    """numba's OpenMP pool shares libgomp with torch; starting it and launching a parallel kernel reset
    the count ``torch.get_num_threads()`` reports. A fresh process (the pool starts once) checks that a
    user's ``torch.set_num_threads(1)`` is still 1 after fused steps on a tensor above the parallel size."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    code = (
        "import torch, adamp_torch\n"
        "torch.set_num_threads(1)\n"
        "p = torch.nn.Parameter(torch.randn(4, 70000))\n"
        "o = adamp_torch.AdamP([p], lr=1e-3, fused=True)\n"
        "for _ in range(2):\n"
        "    p.grad = torch.randn(4, 70000)\n"
        "    o.step()\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1", out.stdout + out.stderr


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_array_adapter_fused_equals_array_api_step(optimizer):
    import adamp_array

    rng = np.random.default_rng(0)
    init = {
        "conv": rng.standard_normal((4, 3, 3, 3)),
        "fc": rng.standard_normal((5, 7)).astype(np.float32),
        "bias": rng.standard_normal(5),
    }
    cls = adamp_array.AdamP if optimizer == "adamp" else adamp_array.SGDP
    kw = dict(lr=1e-2, weight_decay=1e-2) if optimizer == "adamp" else dict(lr=0.1, momentum=0.9, nesterov=True)
    a, b = ({k: v.copy() for k, v in init.items()} for _ in range(2))
    fast, pure = cls(a, fused=True, **kw), cls(b, fused=False, **kw)
    for t in range(8):
        grads = {k: _grad(rng, a[k], t, v.dtype) for k, v in init.items()}
        fast.step(grads)
        pure.step(grads)
        for k, v in init.items():
            assert a[k].dtype == v.dtype
            assert _rel(a[k], b[k]) <= TOL[v.dtype.type], f"step {t}: {k}"
    sd_fast, sd_pure = fast.state_dict(), pure.state_dict()
    for i, st in sd_pure["state"].items():
        for k, v in st.items():
            if k == "step":
                assert int(sd_fast["state"][i][k]) == int(v)
            else:
                assert _rel(np.asarray(sd_fast["state"][i][k]), np.asarray(v)) <= 1e-5


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_array_batched_groups_equal_array_api_step(optimizer, monkeypatch):
    """adamp_array: two param groups of small arrays (float32 and float64, 0-d to 4-d, one whose float64
    sums fall back) and one above the batch size, with skip_nonfinite (an inf grad at step 3): one batched
    kernel call per group and dtype, against fused=False."""
    import adamp_array

    rng = np.random.default_rng(7)
    shapes = [(8, 3, 3, 3), (6, 10), (7,), (), (5, 1), (1, 9), (4, 2, 5), (2, fused.BATCH_MAX_SIZE)]
    dtypes = [np.float32, np.float64] * 4
    w0 = [np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(shapes, dtypes, strict=True)]
    w0[5] = np.full((1, 9), 1e-300)  # float64 sums underflow: the fallback
    cls = adamp_array.AdamP if optimizer == "adamp" else adamp_array.SGDP
    kw = dict(lr=1e-2, weight_decay=1e-2) if optimizer == "adamp" else dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    ps = [[w.copy() for w in w0] for _ in range(2)]
    groups = lambda p: [{"params": p[:4]}, {"params": p[4:], "weight_decay": 0.0}]  # noqa: E731
    opts = [cls(groups(ps[i]), skip_nonfinite=True, fused=f, **kw) for i, f in enumerate((None, False))]
    batched = _count_batched_calls(monkeypatch, optimizer)
    for t in range(5):
        grads = [np.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(shapes, dtypes, strict=True)]
        if t == 3:
            grads[1][2, 2] = np.inf
        for o in opts:
            o.step([grads[:4], grads[4:]])
        for a, b in zip(*ps, strict=True):
            assert a.dtype == b.dtype and _rel(a, b) <= TOL[a.dtype.type], f"step {t}"
    assert sorted(batched) == sorted([2, 2, 2, 1] * 5)  # group 0: 2 + 2; group 1: 2 float32, 1 float64
    assert opts[0].nonfinite_skips == opts[1].nonfinite_skips
    sd = [o.state_dict()["state"] for o in opts]
    for i, st in sd[1].items():
        for k, v in st.items():
            want = np.asarray(v)
            assert _rel(np.asarray(sd[0][i][k]), want) <= 1e-5 * max(1.0, float(np.max(np.abs(want), initial=0)))


def test_fused_option_is_checked(monkeypatch):
    torch = pytest.importorskip("torch")
    import adamp_array
    import adamp_torch

    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="Invalid fused value: 'yes'"):
        adamp_torch.AdamP([p], fused="yes")
    with pytest.raises(TypeError, match="Invalid fused value: 1"):
        adamp_array.SGDP([np.zeros(3)], lr=0.1, fused=1)
    from adamp_core import hyperparams

    monkeypatch.setattr(hyperparams, "_installed", lambda name: name != "numba")
    with pytest.raises(ValueError, match="Invalid fused value: True .*numba"):
        adamp_torch.SGDP([p], lr=0.1, fused=True)
    with pytest.raises(ValueError, match="Invalid fused value: True .*numba"):
        adamp_array.AdamP([np.zeros(3)], fused=True)


# -- torch adapter diagnostics (recorded per step when asked) ------------------------------------


@pytest.mark.parametrize("use_fused", [None, False], ids=["fused", "array-api"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_records_diagnostics_only_when_asked(optimizer, use_fused):
    torch = pytest.importorskip("torch")
    import adamp_torch

    net = _net(torch, 0).double()
    cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    opt = (
        cls(net.parameters(), lr=0.1, momentum=0.9, fused=use_fused)
        if optimizer == "sgdp"
        else cls(net.parameters(), lr=0.1, fused=use_fused)
    )
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (8,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        before = {p: p.detach().clone() for p in net.parameters()}
        opt.step()
        return before

    step()
    assert opt.diagnostics == {}  # off by default
    opt.record_diagnostics()
    before = step()
    assert set(opt.diagnostics) == set(net.parameters())
    for p in net.parameters():
        got = to_host(opt.diagnostics[p])
        want = to_host(step_diagnostics(before[p].numpy(), p.detach().numpy(), p.grad.numpy(), 0.1, 1e-8))
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), k
    opt.record_diagnostics(False)
    step()
    assert opt.diagnostics == {}
