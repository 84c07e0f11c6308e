"""Cautious AdamP/SGDP (``caution=True``) and SGDP's ``project_buffer=False`` against timm 1.0.31's own
``timm/optim/adamp.py`` and ``sgdp.py`` (loaded by path: :mod:`adamp_xp.testing.timm_reference`), on every
backend and every execution path, step for step.

The trajectories are the oracle's (:func:`adamp_xp.testing.oracle.reference_run` with the timm cases): every
shape of the oracle table, gradients cycling through the regimes where the channel view, the layer view and
neither view are scale-invariant, 20 steps; params and every state array agree normwise within 1e-12
(float64) and 1e-5 (float32). Two more scenarios pin the mask's extremes: a flipped gradient that keeps one
entry in 1,200 (the 1e-3 clamp decides the rescaling) and a first step where every entry agrees.
"""

from __future__ import annotations

import numpy as np
import pytest

import adamp_core as ac
from adamp_core.paths import numba_fused
from adamp_xp.testing.backends import Backend
from adamp_xp.testing.conformance import FUSED, MULTI, PER_TENSOR, record_paths
from adamp_xp.testing.oracle import (
    PARTNERS,
    SHAPES,
    TIMM_ADAMP_CASES,
    TIMM_SGDP_CASES,
    case_table,
    reference_run,
    rel_error,
    run_core,
    tolerance,
)

pytest.importorskip("adamp", reason="the oracle adamp==0.3.0 is not installed")
timm_reference = pytest.importorskip("adamp_xp.testing.timm_reference")
try:
    TimmAdamP, TimmSGDP = timm_reference.timm_optimizers()
except ImportError as exc:  # pragma: no cover - CI installs timm
    pytest.skip(f"timm is not installed: {exc}", allow_module_level=True)

STEPS = 20
CASES = [("adamp", c) for c in TIMM_ADAMP_CASES] + [("sgdp", c) for c in TIMM_SGDP_CASES]
IDS = [f"{o}-{c}" for o, c in CASES]


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("optimizer,case", CASES, ids=IDS)
def test_core_matches_timm(backend, dtype, optimizer, case, shape_name):
    """``adamp_step``/``sgdp_step`` on every backend: the same views as timm at every step, same trajectory."""
    if not backend.supports(dtype):
        pytest.skip(f"{backend} has no {dtype}")
    result = run_core(backend, optimizer, case, shape_name, dtype, STEPS)
    assert result.views == result.ref_views, "scale-invariance decision differs from timm's"
    assert result.max_rel_error <= tolerance(dtype), result.max_rel_error


def test_the_reference_is_timm_and_differs_from_the_official():
    """The timm cases really run timm's classes, and caution / Algorithm 1 really change the trajectory
    (else the tests above would hold for any implementation of the official step)."""
    assert TimmAdamP.__module__.endswith(".adamp") and "caution" in TimmAdamP.__init__.__code__.co_varnames
    import adamp

    for opt, case in CASES:
        hp = {k: v for k, v in case_table(opt, case).items() if k not in ("caution", "project_buffer")}
        ref = reference_run(opt, case, "conv4d", "float64", STEPS)
        torch = pytest.importorskip("torch")
        p = torch.nn.Parameter(torch.tensor(ref.init))
        official = (adamp.AdamP if opt == "adamp" else adamp.SGDP)([p], **hp)
        for g in ref.grads:
            p.grad = torch.tensor(g)
            official.step()
        assert rel_error(p.detach().numpy(), ref.params[-1]) > 1e-6, (opt, case)


# -- every execution path ----------------------------------------------------------------------------------

NAMES = [*SHAPES, *PARTNERS]  # partners: tensors in the same row bucket, so the multi-tensor step forms groups


def _refs(optimizer, case, dtype):
    return {n: reference_run(optimizer, case, n, dtype, STEPS) for n in NAMES}


def _compare(refs, ours, dtype):
    worst = 0.0
    for n, ref in refs.items():
        worst = max(worst, rel_error(ours[n]["param"], ref.params))
        for f in ref.states[0]:
            worst = max(worst, rel_error(ours[n][f], [s[f] for s in ref.states]))
    assert worst <= tolerance(dtype), worst


TORCH_PATHS = {"fused": ({}, FUSED), "multi-tensor": ({"fused": False}, MULTI),
               "per-tensor": ({"fused": False, "foreach": False}, PER_TENSOR)}


@pytest.mark.parametrize("path", list(TORCH_PATHS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("optimizer,case", CASES, ids=IDS)
def test_torch_paths_match_timm(optimizer, case, dtype, path):
    """``adamp_torch`` on its default path (the numba kernels), the multi-tensor step and the per-tensor
    step, every shape in one optimizer."""
    torch = pytest.importorskip("torch")
    import adamp_torch

    kwargs, expected = TORCH_PATHS[path]
    if expected == FUSED and not numba_fused.AVAILABLE:
        pytest.skip("numba is not installed")
    refs = _refs(optimizer, case, dtype)
    tdt = getattr(torch, dtype)
    params = {n: torch.nn.Parameter(torch.tensor(r.init, dtype=tdt)) for n, r in refs.items()}
    cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    opt = cls(list(params.values()), **case_table(optimizer, case), **kwargs)
    ours = {n: {} for n in refs}
    with record_paths() as counts:
        for t in range(STEPS):
            for n, p in params.items():
                p.grad = torch.tensor(refs[n].grads[t], dtype=tdt)
            opt.step()
            for n, p in params.items():
                ours[n].setdefault("param", []).append(p.detach().double().numpy().copy())
                for f in refs[n].states[t]:
                    ours[n].setdefault(f, []).append(opt.state[p][f].double().numpy().copy())
    _compare(refs, ours, dtype)
    assert counts.most_common(1)[0][0] == expected, counts


@pytest.mark.parametrize("optimizer,case", [("adamp", "cautious_nesterov"), ("sgdp", "cautious_alg1")])
def test_triton_path_matches_timm(optimizer, case, monkeypatch):
    """``adamp_torch`` with ``fused="triton"`` (Triton's interpreter on CPU tensors), float64, one case per
    optimizer (the interpreter is slow; ``tests/test_triton_fused.py`` holds the kernels to the array-API step
    on every option)."""
    torch = pytest.importorskip("torch")
    from adamp_core.paths import triton_fused

    if not triton_fused.AVAILABLE:
        pytest.skip("triton is not installed")
    import adamp_torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors go to Triton's interpreter
    refs = _refs(optimizer, case, "float64")
    params = {n: torch.nn.Parameter(torch.tensor(r.init)) for n, r in refs.items()}
    cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    opt = cls(list(params.values()), **case_table(optimizer, case), fused="triton")
    ours = {n: {} for n in refs}
    with triton_fused.counting() as launches:
        for t in range(STEPS):
            for n, p in params.items():
                p.grad = torch.tensor(refs[n].grads[t])
            opt.step()
            for n, p in params.items():
                ours[n].setdefault("param", []).append(p.detach().numpy().copy())
                for f in refs[n].states[t]:
                    ours[n].setdefault(f, []).append(opt.state[p][f].double().numpy().copy())
    _compare(refs, ours, "float64")
    assert launches.launches > 0, "the Triton kernels did not run"


ARRAY_PATHS = {"numpy-fused": ("numpy", {}, FUSED), "numpy-multi-tensor": ("numpy", {"fused": False}, MULTI),
               "numpy-per-tensor": ("numpy", {"fused": False, "foreach": False}, PER_TENSOR),
               "jax-multi-tensor": ("jax", {}, MULTI), "array_api_strict": ("array_api_strict", {}, MULTI)}


@pytest.mark.parametrize("path", list(ARRAY_PATHS))
@pytest.mark.parametrize("optimizer,case", CASES, ids=IDS)
def test_array_paths_match_timm(optimizer, case, path):
    """``adamp_array`` on NumPy (kernels, multi-tensor, per-tensor), JAX and array-api-strict, float64."""
    import adamp_array

    name, kwargs, expected = ARRAY_PATHS[path]
    pytest.importorskip(name)
    if expected == FUSED and not numba_fused.AVAILABLE:
        pytest.skip("numba is not installed")
    b = Backend(name, "cpu")
    refs = _refs(optimizer, case, "float64")
    cls = adamp_array.AdamP if optimizer == "adamp" else adamp_array.SGDP
    opt = cls({n: b.asarray(r.init, "float64") for n, r in refs.items()}, **case_table(optimizer, case), **kwargs)
    ours = {n: {} for n in refs}
    with record_paths() as counts:
        for t in range(STEPS):
            current = opt.step({n: b.asarray(r.grads[t], "float64") for n, r in refs.items()})
            for n, ref in refs.items():
                ours[n].setdefault("param", []).append(b.to_numpy(current[n]))
                for f in ref.states[t]:
                    ours[n].setdefault(f, []).append(b.to_numpy(getattr(opt.states[n], f)))
    _compare(refs, ours, "float64")
    assert counts.most_common(1)[0][0] == expected, counts


@pytest.mark.parametrize("foreach", [None, True], ids=["per-leaf", "foreach"])
@pytest.mark.parametrize("optimizer,case", [("adamp", "cautious_nesterov"), ("sgdp", "cautious_alg1")])
def test_optax_under_jit_matches_timm(optimizer, case, foreach):
    """``adamp_optax`` in one ``jax.jit`` program per step, per leaf and with ``foreach=True``, float64 (one
    case per optimizer: the compiles dominate; the core's per-backend test runs every case under JAX)."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import adamp_optax
    from adamp_xp.testing.adapters_conformance import optax_kwargs

    refs = _refs(optimizer, case, "float64")
    tx = getattr(adamp_optax, optimizer)(**optax_kwargs(optimizer, case_table(optimizer, case)), foreach=foreach)
    params = {n: jax.numpy.asarray(r.init) for n, r in refs.items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    ours = {n: {"param": []} for n in refs}
    for t in range(STEPS):
        params, state = step(params, state, {n: jax.numpy.asarray(r.grads[t]) for n, r in refs.items()})
        for n in refs:
            ours[n]["param"].append(np.asarray(params[n]))
    for n, ref in refs.items():
        assert rel_error(ours[n]["param"], ref.params) <= tolerance("float64"), n


# -- the mask's extremes ------------------------------------------------------------------------------------


def _extreme_grads(shape, flip_step):
    """Gradients that repeat one draw ``G`` and then, at ``flip_step``, flip it everywhere but entry 0: the
    momentum still points along ``G``, so the cautious mask keeps one entry of ``G.size``."""
    rng = np.random.default_rng(11)
    g = rng.standard_normal(shape) * 0.1
    out = [g.copy() for _ in range(flip_step)]
    flipped = -g
    flipped.reshape(-1)[0] = g.reshape(-1)[0]
    return [*out, flipped, flipped]


@pytest.mark.parametrize("path", list(TORCH_PATHS))
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_mask_extremes_match_timm(optimizer, path):
    """One kept entry in 1,200 (mean 8.3e-4: the 1e-3 clamp sets the rescaling to 1000, not 1200), and
    steps where every entry agrees (the first: no rescaling), on every torch path, against timm."""
    torch = pytest.importorskip("torch")
    import adamp_torch

    kwargs, _ = TORCH_PATHS[path]
    hp = dict(lr=1e-2, caution=True) if optimizer == "adamp" else dict(lr=0.1, momentum=0.9, caution=True)
    shapes = [(40, 30), (1200,)]  # 1,200 entries: projected-able and 1-d
    rng = np.random.default_rng(5)
    inits = [rng.standard_normal(s) for s in shapes]
    grads = [_extreme_grads(s, 4) for s in shapes]
    theirs = [torch.nn.Parameter(torch.tensor(w)) for w in inits]
    ours = [torch.nn.Parameter(torch.tensor(w)) for w in inits]
    ref = (TimmAdamP if optimizer == "adamp" else TimmSGDP)(theirs, **hp)
    cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    opt = cls(ours, **hp, **({} if optimizer == "adamp" else {"project_buffer": False}), **kwargs)
    kept = []
    for t in range(len(grads[0])):
        before = [p.detach().clone() for p in ours]
        for i, (a, b) in enumerate(zip(theirs, ours, strict=True)):
            a.grad, b.grad = torch.tensor(grads[i][t]), torch.tensor(grads[i][t])
        ref.step()
        opt.step()
        for a, b in zip(theirs, ours, strict=True):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-12)
        kept.append(int((ours[1].detach() != before[1]).sum()))
    assert kept[0] == 1200  # every entry agrees on the first step
    assert kept[4] == 1  # the flip: one entry kept, its update rescaled by 1 / max(1/1200, 1e-3) = 1000


# -- the option itself -----------------------------------------------------------------------------------


def test_caution_false_never_runs_the_mask(monkeypatch):
    """``caution=False`` (the default) takes exactly the code of before the option: the mask is never built
    (bit-identity with the previous release was checked once by hashing trajectories on every torch path,
    see the issue-19 note)."""
    import adamp_core.caution as caution

    def boom(*args, **kwargs):
        raise AssertionError("the caution mask ran with caution=False")

    monkeypatch.setattr(caution, "caution_factor", boom)
    monkeypatch.setattr(caution, "cautious", boom)
    rng = np.random.default_rng(0)
    for shape in ((6, 3, 3, 3), (7,), ()):
        w, g = rng.standard_normal(shape), rng.standard_normal(shape)
        ac.adamp_step(w, g, ac.adamp_init(w), weight_decay=0.1)
        ac.sgdp_step(w, g, ac.sgdp_init(w), lr=0.1, momentum=0.9)
        ac.sgdp_step(w, g, ac.sgdp_init(w), lr=0.1, momentum=0.9, project_buffer=False)


@pytest.mark.parametrize("name,value", [("caution", 1), ("caution", "yes"), ("project_buffer", None)])
def test_flags_are_checked(name, value):
    w = np.zeros((2, 3))
    with pytest.raises(TypeError, match=f"Invalid {name} value: {value!r}"):
        ac.sgdp_step(w, w, ac.sgdp_init(w), lr=0.1, **{name: value})
    if name == "caution":
        with pytest.raises(TypeError, match=f"Invalid caution value: {value!r}"):
            ac.adamp_step(w, w, ac.adamp_init(w), caution=value)


def test_torch_groups_and_checkpoints_carry_the_options():
    """The options live in the param groups and the state dict; a checkpoint without them (adamp 0.3.0's,
    or this package's before the option) loads as ``caution=False``, ``project_buffer=True``."""
    torch = pytest.importorskip("torch")
    import adamp

    import adamp_torch

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = adamp_torch.SGDP([p], lr=0.1, momentum=0.9, caution=True, project_buffer=False)
    assert opt.param_groups[0]["caution"] is True and opt.param_groups[0]["project_buffer"] is False
    sd = opt.state_dict()
    assert sd["param_groups"][0]["caution"] is True
    fresh = adamp_torch.SGDP([p], lr=0.1)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["caution"] is True and fresh.param_groups[0]["project_buffer"] is False

    p.grad = torch.randn(4, 3)
    official = adamp.SGDP([p], lr=0.1, momentum=0.9)
    official.step()
    ours = adamp_torch.SGDP([p], lr=0.1, caution=True)
    ours.load_state_dict(official.state_dict())
    assert ours.param_groups[0]["caution"] is False and ours.param_groups[0]["project_buffer"] is True

    a = adamp_torch.AdamP([p], caution=True)
    a.load_state_dict(adamp.AdamP([p]).state_dict())
    assert a.param_groups[0]["caution"] is False


def test_array_checkpoint_without_the_options_loads_as_default(tmp_path):
    import adamp_array

    w = {"w": np.ones((2, 3))}
    opt = adamp_array.SGDP(w, lr=0.1, caution=True, project_buffer=False)
    opt.step({"w": np.full((2, 3), 0.5)})
    sd = opt.state_dict()
    assert sd["param_groups"][0]["caution"] is True
    for g in sd["param_groups"]:
        del g["caution"], g["project_buffer"]
    other = adamp_array.SGDP({"w": np.ones((2, 3))}, lr=0.1, caution=True)
    other.load_state_dict(sd)
    assert other.param_groups[0]["caution"] is False and other.param_groups[0]["project_buffer"] is True
