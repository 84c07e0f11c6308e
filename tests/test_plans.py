"""Plans cached per param group (adamp_core.dispatch.Plans, adamp_torch's views): reused while the group holds,
refreshed for new grads, built again on every change that matters, and never a different result. Each case
runs twice, once keeping the plans and once dropping them before every step (what a run without plans does),
and the two runs must agree bit for bit, params and state, on each execution path."""

from __future__ import annotations

import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import adamp_torch  # noqa: E402
from adamp_core import dispatch  # noqa: E402
from adamp_core.optimizers import ADAMP  # noqa: E402
from adamp_core.paths import numba_fused, triton_fused  # noqa: E402

SHAPES = [(6, 3, 3, 3), (6,), (5, 8), (5,)]
BIG = (260, 260)  # above numba's batch size: its row-parallel kernel (numba runs only: the interpreter is slow)
PATHS = {
    "numba": dict(),
    "multi-tensor": dict(fused=False),
    "per-tensor": dict(fused=False, foreach=False),
    "triton": dict(fused="triton"),
}


def _params(seed=0, dtype=torch.float64, big=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES + [BIG] * big]


def _grads(params, t):
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _path_kw(name, monkeypatch):
    if name == "numba" and not numba_fused.AVAILABLE:
        pytest.skip("numba is not installed")
    if name == "triton":
        if not triton_fused.AVAILABLE:
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors through Triton's interpreter
    return PATHS[name]


def _twins(cls, kw, **extra):
    """Two optimizers over equal params: ``kept`` keeps its plans, ``fresh`` drops them before every step."""
    runs = []
    for _ in range(2):
        params = _params(big=not kw)
        runs.append((params, cls(params, lr=1e-2, weight_decay=1e-2, **kw, **extra)))
    return runs


def _step(runs, t, *, set_to_none=True, edit=None):
    """One step of both twins with the same grads; ``edit(params, opt)`` first changes both alike."""
    for k, (params, opt) in enumerate(runs):
        if edit is not None:
            edit(params, opt)
        grads = _grads(params, t)
        for p, g in zip(params, grads, strict=True):
            if set_to_none or p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)  # the same grad objects, new values (zero_grad(set_to_none=False))
        if k == 1:
            opt._views.clear()  # no plan survives: every step builds its own
        opt.step()


def _same(runs):
    (pa, a), (pb, b) = runs
    for p, q in zip(pa, pb, strict=True):
        assert torch.equal(p, q)
        sa, sb = a.state[p], b.state[q]
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def _builds(opt):
    return sum(v.plans.builds for v in opt._views.values())


@pytest.mark.parametrize("set_to_none", [True, False], ids=["new-grads", "same-grads"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("cls", [adamp_torch.AdamP, adamp_torch.SGDP], ids=["adamp", "sgdp"])
def test_kept_plans_equal_fresh_ones_and_are_reused(cls, path, set_to_none, monkeypatch):
    kw = _path_kw(path, monkeypatch)
    runs = _twins(cls, kw, **({"momentum": 0.9} if cls is adamp_torch.SGDP else {}))
    for t in range(4):
        _step(runs, t, set_to_none=set_to_none)
        _same(runs)
    assert _builds(runs[0][1]) == 1  # built once, then reused (refreshed for new grads)


def _replace_param(params, opt):
    new = torch.nn.Parameter(params[2].detach().clone())
    opt.state[new] = opt.state.pop(params[2])
    opt.param_groups[0]["params"][2] = params[2] = new


def _replace_state_tensor(params, opt):
    st = opt.state[params[0]]
    key = "momentum" if "momentum" in st else "exp_avg"
    st[key] = st[key].clone()


def _replace_state_dict(params, opt):
    opt.state[params[3]] = {k: v.clone() for k, v in opt.state[params[3]].items()}


def _new_grad_address(params, opt):
    if params[1].grad is not None:
        params[1].grad = params[1].grad.clone()


def _to_float32(params, opt):  # model.float(): p.data replaced, the param object kept
    for p in params:
        p.data = p.data.float()
        if p.grad is not None:
            p.grad = None
    for st in opt.state.values():
        for k, v in list(st.items()):
            if v.is_floating_point():
                st[k] = v.float()


def _load_state_dict(params, opt):
    opt.load_state_dict(opt.state_dict())


def _lr_schedule(params, opt):
    for g in opt.param_groups:
        g["lr"] *= 0.5


def _tensor_lr(params, opt):
    for g in opt.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64)


def _toggle(name):
    def edit(params, opt):
        for g in opt.param_groups:
            g[name] = not g[name]
    edit.__name__ = f"_toggle_{name}"
    return edit


def _add_group(params, opt):
    extra = torch.nn.Parameter(torch.ones(4, 2, dtype=params[0].dtype))
    opt.add_param_group({"params": [extra]})
    params.append(extra)


def _diagnostics(params, opt):
    opt.record_diagnostics(True)


EDITS = [_replace_param, _replace_state_tensor, _replace_state_dict, _new_grad_address, _to_float32,
         _load_state_dict, _lr_schedule, _tensor_lr, _toggle("maximize"), _toggle("skip_nonfinite"), _add_group,
         _diagnostics]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__.strip("_") for e in EDITS])
@pytest.mark.parametrize("path", ["numba", "multi-tensor", "triton"])
def test_every_change_is_seen(path, edit, monkeypatch):
    """A change between steps (of a param, a state entry, a grad's memory, a dtype, the hyperparameters or
    options, the groups) gives exactly the result of a run that plans every step afresh."""
    kw = _path_kw(path, monkeypatch)
    runs = _twins(adamp_torch.AdamP, kw)
    _step(runs, 0)
    _step(runs, 1)
    _step(runs, 2, edit=edit)
    _same(runs)
    _step(runs, 3)
    _same(runs)


def test_a_param_listed_twice_steps_twice_as_adamp_does():
    """A param listed twice (torch.optim warns) steps twice per step, the second time on the state the first
    left: adamp 0.3.0's (and torch.optim's) result, never a third one."""
    official = pytest.importorskip("adamp")
    results = []
    for make in (lambda ps: adamp_torch.AdamP(ps, lr=0.1), lambda ps: adamp_torch.AdamP(ps, lr=0.1, fused=False),
                 lambda ps: official.AdamP(ps, lr=0.1)):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = make([w, w])
        for t in range(3):
            w.grad = torch.full_like(w, 0.1 * (t + 1))
            opt.step()
        results.append((w.detach().clone(), int(opt.state[w]["step"])))
    for w, step in results[:2]:
        assert step == 6 == results[2][1]
        assert torch.allclose(w, results[2][0], rtol=1e-12, atol=0)


def test_dispatch_plans_refresh_for_new_grads_and_rebuild_for_new_kinds():
    """The core alone: the same tensors with new grad arrays refresh the plan (no new build); a
    hyperparameter that turns from a float into an array builds again."""
    if not numba_fused.AVAILABLE:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) for s in [(4, 3), (5,), (2, 2, 2)]]
    states = [ADAMP.init(p) for p in params]
    tensors = [dispatch.Tensor(p, np.zeros_like(p), s) for p, s in zip(params, states, strict=True)]
    plans = dispatch.Plans()
    hp = ADAMP.checked(dict(ADAMP.defaults))
    for _ in range(3):
        grads = [rng.standard_normal(p.shape) for p in params]
        out = dispatch.step(ADAMP, tensors, hp, plans=plans, grads=grads)
        assert {o.path for o in out} == {"numba"}
    assert plans.builds == 1 and [int(s.step) for s in states] == [3, 3, 3]
    hp_array = hp._replace(lr=np.asarray(1e-3))
    dispatch.step(ADAMP, tensors, hp_array, plans=plans, grads=grads)
    assert plans.builds == 2


@pytest.mark.parametrize("path", ["numba", "triton"])
def test_a_warm_step_allocates_nothing_per_tensor(path, monkeypatch):
    """2,000 tiny tensors, persistent grads: a warm step creates no Python objects per tensor, so the
    garbage collector (which runs after every 700 new container objects) stays idle; a step that allocated
    even one tuple per tensor would trigger it about three times."""
    kw = _path_kw(path, monkeypatch)
    if path == "triton":
        monkeypatch.setattr(triton_fused, "_STUBBED", [True])  # the host's work only: no interpreter
    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(2000)]
    opt = adamp_torch.AdamP(params, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()
    collections = [0]

    def count(phase, info):
        if phase == "start":
            collections[0] += 1

    gc.callbacks.append(count)
    try:
        steps = 20
        for _ in range(steps):
            opt.step()
    finally:
        gc.callbacks.remove(count)
    assert collections[0] <= 2, f"{collections[0]} collections in {steps} warm steps"


@pytest.mark.parametrize("path", ["numba", "multi-tensor", "triton"])
def test_array_adapter_keeps_its_plans_across_host_counts(path, monkeypatch):
    """adamp_array keeps Python-int step counts (adamp 0.3.0's host maths): a state whose count moved on is
    the same state for the plans, which read the counts at every step; kept plans equal fresh ones. (torch's
    own multi-tensor step writes params and state in place and hands the advanced counts: its plans are kept
    too.)"""
    import adamp_array

    kw = _path_kw(path, monkeypatch)
    runs = []
    for _ in range(2):
        params = [p.detach().clone() for p in _params()]
        runs.append((params, adamp_array.AdamP(params, lr=1e-2, weight_decay=1e-2, **kw)))
    for t in range(3):
        for k, (params, opt) in enumerate(runs):
            if k == 1:
                opt._plans.clear()
            opt.step(_grads(params, t))
    (pa, a), (pb, b) = runs
    for p, q in zip(a.params, b.params, strict=True):
        assert torch.equal(p, q)
    assert a.state_dict()["state"][0]["step"] == 3
    assert sum(p.builds for p in a._plans.values()) == 1
