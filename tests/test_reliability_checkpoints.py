"""Checkpoints (issue 9): save, load and resume is bit-exact on every backend and entry point, and
a state moved between backends (NumPy, torch, JAX; float64) and adapters continues to the same result
as adamp 0.3.0 run without interruption.

Every checkpoint goes through bytes (``numpy.savez`` / ``torch.save`` into a buffer), so nothing is
shared between the saved and the restored optimizer.
"""

from __future__ import annotations

import importlib.util
import inspect
import io

import numpy as np
import pytest

import adamp_core as ac
from adamp_xp.testing.oracle import make_grad

HP = {"adamp": dict(lr=1e-2, weight_decay=0.1, nesterov=True), "sgdp": dict(lr=0.1, momentum=0.9, weight_decay=1e-2)}
SHAPES = [(4, 3, 3), (6,), ()]
REGIMES = ("channel", "layer", "none")


def _grads(steps, seed=0):
    """Per step, one gradient per param of SHAPES (regimes cycle so every view is used)."""
    rng = np.random.default_rng(seed)
    w_for_regimes = [rng.standard_normal(s) for s in SHAPES]
    return [[make_grad(w, REGIMES[t % 3], rng) for w in w_for_regimes] for t in range(steps)]


def _params(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in SHAPES]


def _host(backend, x) -> np.ndarray:
    """A host copy of ``x`` in its own dtype (Backend.to_numpy widens floats to float64)."""
    name = str(x.dtype).split(".")[-1]
    return np.asarray(backend.to_numpy(x)).astype(name)


def _savez(arrays: dict) -> dict:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf) as f:
        return {k: f[k] for k in f.files}


# ---------------------------------------------------------------------------------------------
# Core, every backend: state -> bytes -> state, resume bit-exact


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_core_state_round_trip_is_bit_exact(backend, dtype, optimizer):
    if not backend.supports(dtype):
        pytest.skip(f"{backend} has no {dtype}")
    init, step = (ac.adamp_init, ac.adamp_step) if optimizer == "adamp" else (ac.sgdp_init, ac.sgdp_step)
    grads = _grads(6)
    ws = [backend.asarray(w, dtype) for w in _params()]
    states = [init(w) for w in ws]
    for t in range(3):
        ws, states = zip(
            *[
                step(w, backend.asarray(g, dtype), s, **HP[optimizer])
                for w, g, s in zip(ws, grads[t], states, strict=True)
            ],
            strict=True,
        )
    # save: every array to host NumPy in its own dtype; load: back onto the backend
    saved = _savez(
        {f"{i}/{k}": _host(backend, v) for i, s in enumerate(states) for k, v in s._asdict().items()}
        | {f"{i}/param": _host(backend, w) for i, w in enumerate(ws)}
    )
    cls = type(states[0])
    restored_w = [backend.asarray(saved[f"{i}/param"]) for i in range(len(ws))]
    restored_s = [cls(*(backend.asarray(saved[f"{i}/{k}"]) for k in cls._fields)) for i in range(len(states))]
    a = (list(ws), list(states))
    b = (restored_w, restored_s)
    for t in range(3, 6):
        a = tuple(
            map(
                list,
                zip(
                    *[
                        step(w, backend.asarray(g, dtype), s, **HP[optimizer])
                        for w, g, s in zip(a[0], grads[t], a[1], strict=True)
                    ],
                    strict=True,
                ),
            )
        )
        b = tuple(
            map(
                list,
                zip(
                    *[
                        step(w, backend.asarray(g, dtype), s, **HP[optimizer])
                        for w, g, s in zip(b[0], grads[t], b[1], strict=True)
                    ],
                    strict=True,
                ),
            )
        )
    for wa, wb in zip(a[0], b[0], strict=True):
        np.testing.assert_array_equal(backend.to_numpy(wa), backend.to_numpy(wb))
    for sa, sb in zip(a[1], b[1], strict=True):
        for x, y in zip(sa, sb, strict=True):
            np.testing.assert_array_equal(backend.to_numpy(x), backend.to_numpy(y))


# ---------------------------------------------------------------------------------------------
# Adapters: checkpoint through bytes, resume bit-exact


def _paths(module_name):
    """Constructor options for each code path of a stateful adapter: its default (fused kernels on CPU where it
    has them) and, where it has the option, ``fused=False`` (the pure array-API step)."""
    module = pytest.importorskip(module_name)
    has = "fused" in inspect.signature(module.AdamP).parameters
    return [pytest.param({}, id="default")] + ([pytest.param({"fused": False}, id="unfused")] if has else [])


@pytest.mark.parametrize("path", _paths("adamp_torch") if importlib.util.find_spec("torch") else [{}])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip_nonfinite"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_checkpoint_resume_is_bit_exact(optimizer, skip, path):
    torch = pytest.importorskip("torch")
    import adamp_torch

    cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    grads = _grads(6)

    def make():
        ps = [torch.nn.Parameter(torch.from_numpy(w)) for w in _params()]
        return ps, cls(ps, **HP[optimizer], skip_nonfinite=skip, **path)

    def run(ps, opt, ts):
        for t in ts:
            for p, g in zip(ps, grads[t], strict=True):
                p.grad = torch.from_numpy(g.copy())
            opt.step()

    ps_a, opt_a = make()
    run(ps_a, opt_a, range(3))
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps_a], "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    ps_b, opt_b = make()
    with torch.no_grad():
        for p, v in zip(ps_b, ckpt["params"], strict=True):
            p.copy_(v)
    opt_b.load_state_dict(ckpt["opt"])
    run(ps_a, opt_a, range(3, 6))
    run(ps_b, opt_b, range(3, 6))
    for pa, pb in zip(ps_a, ps_b, strict=True):
        assert torch.equal(pa, pb)
        for k, v in opt_a.state[pa].items():
            assert torch.equal(v, opt_b.state[pb][k]) and v.dtype == opt_b.state[pb][k].dtype, k


@pytest.mark.parametrize("path", _paths("adamp_array"))
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_array_checkpoint_resume_is_bit_exact(backend, optimizer, path):
    import adamp_array

    if not backend.supports("float64"):
        pytest.skip(f"{backend} has no float64")
    cls = adamp_array.AdamP if optimizer == "adamp" else adamp_array.SGDP
    grads = _grads(6)

    def make():
        return cls([backend.asarray(w, "float64") for w in _params()], **HP[optimizer], **path)

    def run(opt, ts):
        for t in ts:
            opt.step([backend.asarray(g, "float64") for g in grads[t]])

    a = make()
    run(a, range(3))
    saved = _savez(adamp_array.flatten_state_dict(a.state_dict()))
    saved_params = [backend.to_numpy(p) for p in a.params]
    b = cls([backend.asarray(w, "float64") for w in saved_params], **HP[optimizer], **path)
    b.load_state_dict(saved)
    run(a, range(3, 6))
    run(b, range(3, 6))
    for pa, pb in zip(a.params, b.params, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(pa), backend.to_numpy(pb))
    for sa, sb in zip(a.states, b.states, strict=True):
        for x, y in zip(sa, sb, strict=True):
            np.testing.assert_array_equal(
                np.asarray(backend.to_numpy(x) if hasattr(x, "shape") else x),
                np.asarray(backend.to_numpy(y) if hasattr(y, "shape") else y),
            )


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_optax_checkpoint_resume_is_bit_exact(optimizer):
    jax = pytest.importorskip("jax")
    import optax

    import adamp_optax

    kw = {("learning_rate" if k == "lr" else k): v for k, v in HP[optimizer].items()}
    tx = (adamp_optax.adamp if optimizer == "adamp" else adamp_optax.sgdp)(**kw, skip_nonfinite=True)
    grads = _grads(6)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    params = [jax.numpy.asarray(w) for w in _params()]
    state = tx.init(params)
    for t in range(3):
        params, state = step(params, state, [jax.numpy.asarray(g) for g in grads[t]])
    leaves, treedef = jax.tree.flatten((params, state))
    saved = _savez({str(i): np.asarray(x) for i, x in enumerate(leaves)})
    params_b, state_b = jax.tree.unflatten(treedef, [jax.numpy.asarray(saved[str(i)]) for i in range(len(leaves))])
    for t in range(3, 6):
        g = [jax.numpy.asarray(g) for g in grads[t]]
        params, state = step(params, state, g)
        params_b, state_b = step(params_b, state_b, g)
    for x, y in zip(jax.tree.leaves((params, state)), jax.tree.leaves((params_b, state_b)), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# Moving between backends and adapters: the same trajectory as adamp 0.3.0 uninterrupted


def _official(optimizer, steps):
    adamp = pytest.importorskip("adamp")
    torch = pytest.importorskip("torch")
    ps = [torch.nn.Parameter(torch.from_numpy(w)) for w in _params()]
    opt = (adamp.AdamP if optimizer == "adamp" else adamp.SGDP)(ps, **HP[optimizer])
    for t in range(steps):
        for p, g in zip(ps, _grads(steps)[t], strict=True):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    return [p.detach().numpy() for p in ps], [{k: v for k, v in opt.state[p].items()} for p in ps]


def _close(ours, ref, what):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    scale = max(float(np.max(np.abs(ref), initial=0.0)), 1e-300)
    assert np.max(np.abs(ours - ref), initial=0.0) <= 1e-12 * scale, what


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_core_state_moves_between_backends(optimizer):
    """NumPy -> torch -> JAX -> array-api-strict -> NumPy, 3 steps each, float64: as official uninterrupted."""
    from adamp_xp.testing.backends import Backend

    init, step = (ac.adamp_init, ac.adamp_step) if optimizer == "adamp" else (ac.sgdp_init, ac.sgdp_step)
    chain = [Backend(lib, "cpu") for lib in ("numpy", "torch", "jax", "array_api_strict", "numpy")]
    chain = [b for b in chain if b.skip_reason() is None]
    steps = 3 * len(chain)
    grads = _grads(steps)
    ws = [w for w in _params()]
    states = [init(w) for w in ws]
    t = 0
    for be in chain:
        # move: through host NumPy, each array in its own dtype (float64 state, int32 step)
        ws = [be.asarray(np.asarray(w), "float64") for w in ws]
        states = [type(s)(*(be.asarray(np.asarray(x), str(np.asarray(x).dtype)) for x in s)) for s in states]
        for _ in range(3):
            out = [
                step(w, be.asarray(g, "float64"), s, **HP[optimizer])
                for w, g, s in zip(ws, grads[t], states, strict=True)
            ]
            ws, states = [o[0] for o in out], [o[1] for o in out]
            t += 1
        ws = [be.to_numpy(w) for w in ws]
        states = [type(s)(*(_host(be, x) for x in s)) for s in states]
    ref_w, ref_s = _official(optimizer, steps)
    for i, (w, rw) in enumerate(zip(ws, ref_w, strict=True)):
        _close(w, rw, f"param {i}")
        for k, v in ref_s[i].items():
            if k == "step":
                assert int(states[i].step) == v
            else:
                _close(getattr(states[i], k), v.numpy(), f"{k} {i}")


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_state_moves_between_adapters(optimizer):
    """adamp_torch (4 steps) -> state_dict -> adamp_array on NumPy (4 steps) -> its state_dict -> the
    optax state (4 steps, jitted) -> back into adamp_torch (4 steps): as adamp 0.3.0 uninterrupted."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    import optax

    import adamp_array
    import adamp_optax
    import adamp_torch

    steps = 16
    grads = _grads(steps)
    tcls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    ps = [torch.nn.Parameter(torch.from_numpy(w)) for w in _params()]
    topt = tcls(ps, **HP[optimizer])
    for t in range(0, 4):
        for p, g in zip(ps, grads[t], strict=True):
            p.grad = torch.from_numpy(g.copy())
        topt.step()
    # torch -> array (NumPy)
    acls = adamp_array.AdamP if optimizer == "adamp" else adamp_array.SGDP
    aopt = acls([p.detach().numpy().copy() for p in ps], **HP[optimizer])
    aopt.load_state_dict(topt.state_dict())
    for t in range(4, 8):
        aopt.step(grads[t])
    # array -> optax: one core state per leaf, the step count as the optax count
    kw = {("learning_rate" if k == "lr" else k): v for k, v in HP[optimizer].items()}
    tx = (adamp_optax.adamp if optimizer == "adamp" else adamp_optax.sgdp)(**kw)
    params = [jax.numpy.asarray(w) for w in aopt.params]
    state = tx.init(params)
    core_states = []
    for s in aopt.states:
        fields = {
            k: jax.numpy.asarray(np.asarray(v, dtype=np.int32 if k == "step" else None)) for k, v in s._asdict().items()
        }
        core_states.append(type(s)(**fields))
    fields = type(core_states[0])._fields  # the optax state holds one list like the params per field
    state = state._replace(
        count=jax.numpy.asarray(8, dtype=jax.numpy.int32), **{f: [getattr(s, f) for s in core_states] for f in fields}
    )

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(8, 12):
        params, state = step(params, state, [jax.numpy.asarray(g) for g in grads[t]])
    # optax -> torch: a torch.optim-layout state dict built from the core states
    ps2 = [torch.nn.Parameter(torch.from_numpy(np.asarray(p).copy())) for p in params]
    topt2 = tcls(ps2, **HP[optimizer])
    sd = topt2.state_dict()
    per_leaf = [type(core_states[0])(*leaves) for leaves in zip(*(getattr(state, f) for f in fields), strict=True)]
    sd["state"] = {
        i: {k: (int(v) if k == "step" else torch.from_numpy(np.asarray(v).copy())) for k, v in s._asdict().items()}
        for i, s in enumerate(per_leaf)
    }
    topt2.load_state_dict(sd)
    for t in range(12, 16):
        for p, g in zip(ps2, grads[t], strict=True):
            p.grad = torch.from_numpy(g.copy())
        topt2.step()
    ref_w, ref_s = _official(optimizer, steps)
    for i, (p, rw) in enumerate(zip(ps2, ref_w, strict=True)):
        _close(p.detach().numpy(), rw, f"param {i}")
        for k, v in ref_s[i].items():
            got = topt2.state[p][k]
            if k == "step":
                assert int(got) == v
            else:
                # optax applies new - old additively: one extra rounding per step, well inside 1e-12
                _close(got.numpy(), v.numpy(), f"{k} {i}")


# ---------------------------------------------------------------------------------------------
# Loading a state dict more than once (issue 15): torch's __setstate__ adds keys of its own to
# `defaults` (`differentiable`), which a saved group need not have. accelerate loads the optimizer
# state once when it wraps the optimizer, so Trainer(resume_from_checkpoint=...) loads it twice.


def _torch_bytes(obj):
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_load_twice_and_round_trip_resume_exactly(optimizer):
    """Uninterrupted 9 steps == 3 steps, save, load twice into a fresh optimizer, 3 steps, save (a state
    dict of a reloaded optimizer), load twice into another fresh one, 3 steps: params and state bit-equal."""
    torch = pytest.importorskip("torch")
    import adamp_torch

    cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    grads = _grads(9)

    def make(values=None):
        ps = [torch.nn.Parameter(torch.from_numpy(w)) for w in (values if values is not None else _params())]
        return ps, cls(ps, **HP[optimizer])

    def run(ps, opt, ts):
        for t in ts:
            for p, g in zip(ps, grads[t], strict=True):
                p.grad = torch.from_numpy(g.copy())
            opt.step()

    ps_ref, opt_ref = make()
    run(ps_ref, opt_ref, range(9))

    ps, opt = make()
    run(ps, opt, range(3))
    for t0 in (3, 6):
        ckpt = _torch_bytes({"params": [p.detach() for p in ps], "opt": opt.state_dict()})
        ps, opt = make([v.numpy() for v in ckpt["params"]])
        opt.load_state_dict(ckpt["opt"])
        opt.load_state_dict(ckpt["opt"])  # raised "missing ['differentiable']" before the fix
        assert "differentiable" in opt.defaults  # the key torch adds, which made the second load fail
        run(ps, opt, range(t0, t0 + 3))
    for pa, pb in zip(ps_ref, ps, strict=True):
        assert torch.equal(pa, pb)
        assert opt_ref.state[pa].keys() == opt.state[pb].keys()
        for k, v in opt_ref.state[pa].items():
            assert torch.equal(v, opt.state[pb][k]) and v.dtype == opt.state[pb][k].dtype, k
    assert opt.param_groups[0].keys() - {"differentiable"} == opt_ref.param_groups[0].keys()


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_official_checkpoint_loads_twice_and_back(optimizer):
    """A checkpoint of adamp 0.3.0 loads twice into ours; ours, after that reload, loads (twice) into
    adamp 0.3.0 again; the trajectory is adamp 0.3.0's uninterrupted one (float64, 1e-12)."""
    adamp = pytest.importorskip("adamp")
    torch = pytest.importorskip("torch")
    import adamp_torch

    official_cls = adamp.AdamP if optimizer == "adamp" else adamp.SGDP
    ours_cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    grads = _grads(9)

    def run(ps, opt, ts):
        for t in ts:
            for p, g in zip(ps, grads[t], strict=True):
                p.grad = torch.from_numpy(g.copy())
            opt.step()

    ps = [torch.nn.Parameter(torch.from_numpy(w)) for w in _params()]
    opt = official_cls(ps, **HP[optimizer])
    run(ps, opt, range(3))
    for t0, cls in ((3, ours_cls), (6, official_cls)):
        ckpt = _torch_bytes({"params": [p.detach() for p in ps], "opt": opt.state_dict()})
        ps = [torch.nn.Parameter(v.clone()) for v in ckpt["params"]]
        opt = cls(ps, **HP[optimizer])
        opt.load_state_dict(ckpt["opt"])
        opt.load_state_dict(ckpt["opt"])
        run(ps, opt, range(t0, t0 + 3))
    ref_w, ref_s = _official(optimizer, 9)
    for i, (p, rw) in enumerate(zip(ps, ref_w, strict=True)):
        _close(p.detach().numpy(), rw, f"param {i}")
        for k, v in ref_s[i].items():
            got = opt.state[p][k]
            if k == "step":
                assert int(got) == v
            else:
                _close(got.numpy(), v.numpy(), f"{k} {i}")


def test_torch_load_still_refuses_another_optimizers_state_dict():
    """The key check still tells a state dict of another optimizer (torch.optim.Adam: no delta, wd_ratio,
    nesterov; SGD: no delta, wd_ratio, eps) from ours."""
    torch = pytest.importorskip("torch")
    import adamp_torch

    for cls, other in ((adamp_torch.AdamP, torch.optim.Adam), (adamp_torch.SGDP, torch.optim.SGD)):
        p = torch.nn.Parameter(torch.ones(2, 3))
        sd = other([p], lr=0.1).state_dict()
        with pytest.raises(ValueError, match=r"is missing \[.*'delta'.*'wd_ratio'.*\]: not a (AdamP|SGDP) state dict"):
            cls([p], lr=0.1).load_state_dict(sd)
