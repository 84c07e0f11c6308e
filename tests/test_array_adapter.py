"""adamp_array: stateful AdamP/SGDP over NumPy, torch, JAX, array-api-strict (and CuPy on a GPU).

The reference is the official ``adamp==0.3.0`` (torch, CPU): trajectories from
``adamp_xp.testing.oracle.reference_run`` or our own loop over the official optimizer.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

import adamp_array
from adamp_core.arrays import namespace_name as library
from adamp_xp.testing.adapters_conformance import run_array_adapter
from adamp_xp.testing.backends import BACKENDS, Backend
from adamp_xp.testing.oracle import REGIMES, make_grad, reference_run, rel_error

STEPS = 30  # shares oracle.reference_run's cache with the core's oracle tests
TOL64 = 1e-10
FEW_SHAPES = ("conv4d", "linear2d", "vector1d", "scalar0d")
# Eager JAX compiles every op for every new shape: the JAX tests share these two shapes (and _init's).
JAX_SHAPES = ("linear2d", "vector1d")
NUMPY = Backend("numpy", "cpu")
CUPY = Backend("cupy", "cuda")
CASES = [
    ("adamp", "lr_wd"),
    ("adamp", "nesterov_wd"),
    ("adamp", "betas_eps_ratio"),
    ("sgdp", "momentum_wd"),
    ("sgdp", "nesterov_wd"),
    ("sgdp", "dampening_ratio"),
]


def _opt(optimizer, params, **hp):
    return adamp_array.AdamP(params, **hp) if optimizer == "adamp" else adamp_array.SGDP(params, **hp)


# ---------------------------------------------------------------------------------------------
# Against the official optimizer


def _oracle_params():
    """Every backend (skipped with its reason when absent) x CASES; JAX runs one case on a few shapes
    (eager JAX compiles every op for every new shape; the optax tests cover JAX at length)."""
    out = []
    for b in BACKENDS:
        marks = [pytest.mark.skip(reason=b.skip_reason())] if b.skip_reason() else []
        for optimizer, case in CASES:
            if b.library == "jax" and (optimizer, case) != ("adamp", "nesterov_wd"):
                continue
            out.append(pytest.param(b, optimizer, case, id=f"{b.id}-{optimizer}-{case}", marks=marks))
    return out


@pytest.mark.parametrize(("backend", "optimizer", "case"), _oracle_params())
def test_matches_official_float64(backend, optimizer, case):
    shapes = JAX_SHAPES if backend.library == "jax" else None
    err = run_array_adapter(backend, optimizer, case, "float64", STEPS, shapes=shapes)
    assert err < TOL64, f"{backend} {optimizer}/{case}: max relative error {err:.3e}"


@pytest.mark.parametrize("optimizer,case", [("adamp", "lr_wd"), ("sgdp", "momentum_wd")])
def test_matches_official_float32_numpy(optimizer, case):
    err = run_array_adapter(NUMPY, optimizer, case, "float32", STEPS, shapes=FEW_SHAPES)
    assert err < 1e-5, f"{optimizer}/{case}: max relative error {err:.3e}"


def _official_groups(optimizer, groups, **defaults):
    import adamp

    cls = adamp.AdamP if optimizer == "adamp" else adamp.SGDP
    return cls(groups, **defaults)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_param_groups_and_edits_match_official(optimizer):
    """Two groups (a dict and a list) with their own hyperparameters, edited half-way through, as
    ``param_groups[i][key] = value`` on both optimizers."""
    import torch

    rng = np.random.default_rng(1)
    shapes = {"conv": (6, 3, 3, 3), "fc": (5, 12), "bias": (7,)}
    init = {k: rng.standard_normal(s) for k, s in shapes.items()}
    ours = {k: v.copy() for k, v in init.items()}
    ref = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    if optimizer == "adamp":
        defaults, g0, g1 = dict(lr=1e-2, weight_decay=0.1), dict(wd_ratio=0.3), dict(lr=3e-2, weight_decay=0.0)
        edits = dict(lr=5e-3, nesterov=True, betas=(0.8, 0.99))
    else:  # lr given only by the groups, as the official SGDP allows
        defaults, g0, g1 = dict(momentum=0.9, weight_decay=1e-2), dict(lr=0.05), dict(lr=0.1, momentum=0.5)
        edits = dict(lr=0.02, nesterov=True, dampening=0.0)
    opt = _opt(
        optimizer,
        [{"params": {"conv": ours["conv"], "fc": ours["fc"]}, **g0}, {"params": [ours["bias"]], **g1}],
        **defaults,
    )
    official = _official_groups(
        optimizer, [{"params": [ref["conv"], ref["fc"]], **g0}, {"params": [ref["bias"]], **g1}], **defaults
    )
    traj = {k: ([], []) for k in shapes}
    for t in range(18):
        if t == 9:
            for group in (opt.param_groups[0], official.param_groups[0]):
                group.update(edits)
        grads = {k: make_grad(ref[k].detach().numpy(), REGIMES[t % 3], rng) for k in shapes}
        opt.step([{"conv": grads["conv"], "fc": grads["fc"]}, [grads["bias"]]])
        for k, g in grads.items():
            ref[k].grad = torch.from_numpy(g.copy())
        official.step()
        for k in shapes:
            traj[k][0].append(ours[k].copy())  # updated in place: the dict's arrays are the params
            traj[k][1].append(ref[k].detach().numpy().copy())
    for k, (o, r) in traj.items():
        assert rel_error(o, r) < TOL64, k


# ---------------------------------------------------------------------------------------------
# In place or held


def _grads(params, seed=3):
    rng = np.random.default_rng(seed)
    return {k: 0.1 * rng.standard_normal(np.shape(v)) for k, v in params.items()}


def _init(seed=2):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((5, 12)), "b": rng.standard_normal(7)}  # JAX_SHAPES


def _twin_numpy(optimizer, init, grads_list, **hp):
    """The same run on writeable NumPy arrays through the array-API step (what the other libraries must
    reproduce; the fused kernels are tested against it in test_fused.py)."""
    ps = {k: v.copy() for k, v in init.items()}
    opt = _opt(optimizer, ps, fused=False, **hp)
    for g in grads_list:
        opt.step(g)
    return ps


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_numpy_params_are_updated_in_place(optimizer):
    model = _init()  # a "model" holding references to its arrays
    opt = _opt(optimizer, model, lr=0.1, weight_decay=0.1)
    before = {k: v.copy() for k, v in model.items()}
    ids = {k: id(v) for k, v in model.items()}
    out = opt.step(_grads(model))
    for k in model:
        assert id(model[k]) == ids[k] and out[k] is model[k] and opt.params[k] is model[k]
        assert not np.array_equal(model[k], before[k])


def test_read_only_numpy_params_are_held_and_never_rewritten():
    init = _init()
    user = {k: v.copy() for k, v in init.items()}
    for v in user.values():
        v.flags.writeable = False
    opt = adamp_array.AdamP(user, lr=0.1)
    g1, g2 = _grads(init, 3), _grads(init, 4)
    out1 = opt.step(g1)
    snap = {k: v.copy() for k, v in out1.items()}
    out2 = opt.step(g2)
    expected = _twin_numpy("adamp", init, [g1, g2], lr=0.1)
    for k in init:
        np.testing.assert_array_equal(user[k], init[k])  # the user's read-only arrays are untouched
        assert out2[k] is opt.params[k] and out2[k] is not user[k]
        np.testing.assert_array_equal(out1[k], snap[k])  # arrays handed out earlier never change
        np.testing.assert_array_equal(out2[k], expected[k])


def test_jax_params_are_held():
    jnp = pytest.importorskip("jax.numpy")
    init = _init()
    user = {k: jnp.asarray(v) for k, v in init.items()}
    opt = adamp_array.AdamP(user, lr=0.1, weight_decay=1e-2)
    grads = [_grads(init, s) for s in (3, 4)]
    for g in grads:
        out = opt.step({k: jnp.asarray(v) for k, v in g.items()})
    expected = _twin_numpy("adamp", init, grads, lr=0.1, weight_decay=1e-2)
    for k in init:
        np.testing.assert_array_equal(np.asarray(user[k]), init[k])
        assert library(out[k]) == "jax" and out[k] is opt.params[k]
        np.testing.assert_allclose(np.asarray(out[k]), expected[k], rtol=1e-13, atol=1e-15)


def test_torch_tensors_used_as_arrays_update_in_place_without_autograd():
    torch = pytest.importorskip("torch")
    init = _init()
    model = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    ids = {k: id(v) for k, v in model.items()}
    opt = adamp_array.AdamP(model, lr=0.1, weight_decay=0.1)
    grads = [_grads(init, s) for s in (3, 4)]
    for g in grads:
        out = opt.step({k: torch.from_numpy(v) for k, v in g.items()})
    expected = _twin_numpy("adamp", init, grads, lr=0.1, weight_decay=0.1)
    for k, p in model.items():
        assert id(p) == ids[k] and out[k] is p and p.requires_grad and p.grad_fn is None
        state = opt.states[k]
        assert not state.exp_avg.requires_grad and not state.exp_avg_sq.requires_grad
        np.testing.assert_allclose(p.detach().numpy(), expected[k], rtol=1e-13, atol=1e-15)


def test_array_api_strict_params_update_in_place():
    xs = pytest.importorskip("array_api_strict")
    init = _init()
    model = {k: xs.asarray(v.copy()) for k, v in init.items()}
    ids = {k: id(v) for k, v in model.items()}
    opt = adamp_array.AdamP(model, lr=0.1)
    g = _grads(init)
    out = opt.step({k: xs.asarray(v) for k, v in g.items()})
    expected = _twin_numpy("adamp", init, [g], lr=0.1)
    for k in init:
        assert id(model[k]) == ids[k] and out[k] is model[k]
        np.testing.assert_allclose(np.from_dlpack(model[k]), expected[k], rtol=1e-13, atol=1e-15)


def test_none_grad_skips_param_and_state():
    model = _init()
    before = model["b"].copy()
    opt = adamp_array.AdamP(model, lr=0.1)
    g = _grads(model)
    opt.step({"w": g["w"], "b": None})
    np.testing.assert_array_equal(model["b"], before)
    assert opt.states["b"].step == 0 and opt.states["w"].step == 1
    assert not np.any(opt.states["b"].exp_avg)


def test_structures_are_kept():
    a, b = np.ones((2, 3)), np.ones(3)
    assert isinstance(adamp_array.AdamP((a, b)).step((None, np.ones(3))), tuple)
    assert isinstance(adamp_array.AdamP([a, b]).params, list)
    groups = adamp_array.SGDP([{"params": [a]}, {"params": {"b": b}, "lr": 0.5}], lr=0.1)
    out = groups.step([[np.ones((2, 3))], {"params": {"b": np.ones(3)}}])  # bare or group-dict form
    assert out[0]["params"][0] is a and out[1]["params"]["b"] is b and out[1]["lr"] == 0.5
    assert groups.param_groups[0]["lr"] == 0.1 and groups.param_groups[0]["momentum"] == 0.0


def test_state_dtype_keeps_float16_params_with_float32_state():
    w16 = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float16)
    w32 = w16.astype(np.float32)
    g = _grads({"w": w32})["w"].astype(np.float32)
    opt16 = adamp_array.AdamP([w16], lr=1e-2, state_dtype="float32")
    opt32 = adamp_array.AdamP([w32], lr=1e-2)
    for _ in range(3):
        opt16.step([g.astype(np.float16)])
        opt32.step([g])
    s = opt16.states[0]
    assert w16.dtype == np.float16 and s.exp_avg.dtype == np.float32 and s.exp_avg_sq.dtype == np.float32
    np.testing.assert_allclose(w16.astype(np.float32), w32, rtol=0, atol=4 * float(np.finfo(np.float16).eps))


# ---------------------------------------------------------------------------------------------
# Atomicity


def _two_groups():
    rng = np.random.default_rng(5)
    a, b, c = rng.standard_normal((4, 6)), rng.standard_normal(4), rng.standard_normal((3, 5))
    opt = adamp_array.AdamP([{"params": [a, b]}, {"params": {"c": c}, "lr": 0.05}], lr=0.1, weight_decay=0.1)
    good = lambda: [
        [0.1 * rng.standard_normal((4, 6)), 0.1 * rng.standard_normal(4)],  # noqa: E731
        {"c": 0.1 * rng.standard_normal((3, 5))},
    ]
    opt.step(good())
    opt.step(good())
    return opt, good


def _snapshot(opt):
    params = [
        (id(p), p.copy())
        for g in opt.param_groups
        for p in (g["params"].values() if isinstance(g["params"], dict) else g["params"])
    ]
    states = [
        {n: (np.copy(v) if hasattr(v, "shape") else v) for n, v in s._asdict().items()}
        for st in opt._states
        for s in st.values()
    ]
    hps = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return params, states, hps


def _assert_unchanged(opt, snap):
    params, states, hps = _snapshot(opt)
    for (i0, p0), (i1, p1) in zip(snap[0], params, strict=True):
        assert i0 == i1
        np.testing.assert_array_equal(p0, p1)
    for s0, s1 in zip(snap[1], states, strict=True):
        for n in s0:
            np.testing.assert_array_equal(s0[n], s1[n])
    assert snap[2] == hps


def _torch_grad(shape):
    torch = pytest.importorskip("torch")
    return torch.zeros(shape, dtype=torch.float64)


BAD_LAST_GRAD = [
    ("wrong_shape", lambda: np.zeros((5, 3)), ValueError, r"grads\[1\]\['c'\] shape \(5, 3\) differs"),
    ("int_dtype", lambda: np.zeros((3, 5), dtype=np.int64), TypeError, r"grads\[1\]\['c'\] dtype int64"),
    ("other_library", lambda: _torch_grad((3, 5)), TypeError, r"grads\[1\]\['c'\] comes from array library 'torch'"),
    ("not_an_array", lambda: [[0.0] * 5] * 3, TypeError, r"grads\[1\]\['c'\] must be an array"),
]


@pytest.mark.parametrize(("name", "make", "error", "match"), BAD_LAST_GRAD, ids=[b[0] for b in BAD_LAST_GRAD])
def test_bad_last_grad_changes_nothing(name, make, error, match):
    opt, good = _two_groups()
    grads = good()
    grads[1]["c"] = make()
    snap = _snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(grads)
    _assert_unchanged(opt, snap)
    opt.step(good())  # and the optimizer still works


def test_bad_last_group_hyperparameter_changes_nothing():
    opt, good = _two_groups()
    opt.param_groups[1]["lr"] = -1.0
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1.0 \(param_groups\[1\]\)"):
        opt.step(good())
    _assert_unchanged(opt, snap)


# ---------------------------------------------------------------------------------------------
# state_dict


def _backend_params(backend, names, current):
    return {n: backend.asarray(current[n], "float64") for n in names}


ROUND_TRIP = [("adamp", "nesterov_wd"), ("sgdp", "momentum_wd")]


@pytest.mark.parametrize(("optimizer", "case"), ROUND_TRIP, ids=[o for o, _ in ROUND_TRIP])
def test_state_dict_round_trip_across_libraries_matches_official(optimizer, case):
    """Ten steps on NumPy, ten on torch (state handed over as a dict of NumPy arrays), five on
    array-api-strict (through numpy.savez), five back on NumPy (a dict of strict arrays): the
    stitched trajectory is the official one."""
    pytest.importorskip("torch")
    pytest.importorskip("array_api_strict")
    from adamp_xp.testing.oracle import ADAMP_CASES, SGDP_CASES

    hp = (ADAMP_CASES if optimizer == "adamp" else SGDP_CASES)[case]
    names = ("conv4d", "linear2d", "vector1d", "scalar0d")
    refs = {n: reference_run(optimizer, case, n, "float64", STEPS) for n in names}
    current = {n: refs[n].init for n in names}
    stages = [
        (NUMPY, 10, None),
        (Backend("torch", "cpu"), 10, "dict"),
        (Backend("array_api_strict", "cpu"), 5, "savez"),
        (NUMPY, 5, "dict"),
    ]
    ours = {n: {"param": [], **{f: [] for f in refs[n].states[0]}} for n in names}
    sd, t = None, 0
    for backend, steps, how in stages:
        params = _backend_params(backend, names, current)
        opt = _opt(optimizer, params, **hp)
        if how == "dict":
            opt.load_state_dict(sd)
        elif how == "savez":
            buf = io.BytesIO()
            np.savez(buf, **adamp_array.flatten_state_dict(sd))
            buf.seek(0)
            with np.load(buf, allow_pickle=False) as npz:
                opt.load_state_dict(npz)
        for st in opt.states.values():  # moved to this backend, in the param's dtype
            for f in st._fields:
                v = getattr(st, f)
                assert isinstance(v, int) if f == "step" else (library(v) == backend.library)
        for _ in range(steps):
            out = opt.step({n: backend.asarray(refs[n].grads[t], "float64") for n in names})
            for n in names:
                ours[n]["param"].append(np.array(backend.to_numpy(out[n]), copy=True))
                for f in refs[n].states[t]:
                    ours[n][f].append(np.array(backend.to_numpy(getattr(opt.states[n], f)), copy=True))
            t += 1
        current = {n: ours[n]["param"][-1] for n in names}
        sd = opt.state_dict()
    assert t == STEPS
    for n in names:
        assert rel_error(ours[n]["param"], refs[n].params) < TOL64, n
        for f in refs[n].states[0]:
            assert rel_error(ours[n][f], [s[f] for s in refs[n].states]) < TOL64, (n, f)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_loads_official_state_dict(optimizer):
    """A checkpoint of adamp==0.3.0 (torch tensors) continues on NumPy arrays."""
    import adamp
    import torch

    case, names = ("lr_wd", ("conv4d", "vector1d")) if optimizer == "adamp" else ("momentum_wd", ("linear2d",))
    from adamp_xp.testing.oracle import ADAMP_CASES, SGDP_CASES

    hp = (ADAMP_CASES if optimizer == "adamp" else SGDP_CASES)[case]
    refs = {n: reference_run(optimizer, case, n, "float64", STEPS) for n in names}
    tparams = [torch.nn.Parameter(torch.from_numpy(refs[n].init.copy())) for n in names]
    official = (adamp.AdamP if optimizer == "adamp" else adamp.SGDP)(tparams, **hp)
    for t in range(10):
        for p, n in zip(tparams, names, strict=True):
            p.grad = torch.from_numpy(refs[n].grads[t].copy())
        official.step()
    params = [p.detach().numpy().copy() for p in tparams]
    opt = _opt(optimizer, params, **hp)
    opt.load_state_dict(official.state_dict())
    traj = {n: [] for n in names}
    for t in range(10, STEPS):
        opt.step([refs[n].grads[t] for n in names])
        for p, n in zip(params, names, strict=True):
            traj[n].append(p.copy())
    for n in names:
        assert rel_error(traj[n], refs[n].params[10:]) < TOL64, n


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(
            CUPY, marks=pytest.mark.skipif(CUPY.skip_reason() is not None, reason=str(CUPY.skip_reason())), id="cupy"
        ),
        pytest.param(Backend("torch", "cpu"), id="torch"),
        pytest.param(Backend("jax", "cpu"), id="jax"),
    ],
)
def test_state_dict_moves_between_libraries_and_back(target):
    """NumPy state -> target library (on the params' device) -> NumPy again, bit for bit, and the
    target optimizer's next step equals NumPy's."""
    if target.skip_reason():
        pytest.skip(target.skip_reason())
    init = _init()
    ps = {k: v.copy() for k, v in init.items()}
    src = adamp_array.AdamP(ps, lr=0.1, weight_decay=0.1)
    for s in (3, 4):
        src.step(_grads(init, s))
    sd = src.state_dict()
    dst = adamp_array.AdamP({k: target.asarray(v) for k, v in ps.items()}, lr=1.0)
    dst.load_state_dict(sd)
    assert dst.param_groups[0]["lr"] == 0.1 and dst.param_groups[0]["weight_decay"] == 0.1
    for k in ps:
        for f in ("exp_avg", "exp_avg_sq"):
            v = getattr(dst.states[k], f)
            assert library(v) == target.library
            np.testing.assert_array_equal(target.to_numpy(v), getattr(src.states[k], f))
    back = adamp_array.AdamP({k: v.copy() for k, v in ps.items()})
    back.load_state_dict(dst.state_dict())
    for k in ps:
        for f in ("step", "exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(getattr(back.states[k], f), getattr(src.states[k], f))
    g = _grads(init, 5)
    out = dst.step({k: target.asarray(v) for k, v in g.items()})
    src.step(g)
    for k in ps:
        np.testing.assert_allclose(target.to_numpy(out[k]), ps[k], rtol=1e-13, atol=1e-15)


def test_load_casts_state_to_the_state_dtype():
    w32 = np.ones((3, 4), dtype=np.float32)
    src = adamp_array.AdamP([w32], lr=0.1)
    src.step([np.full((3, 4), 0.1, dtype=np.float32)])
    dst = adamp_array.AdamP([np.ones((3, 4))])
    dst.load_state_dict(src.state_dict())
    assert dst.states[0].exp_avg.dtype == np.float64
    np.testing.assert_array_equal(dst.states[0].exp_avg, src.states[0].exp_avg.astype(np.float64))


def test_flatten_layout_is_plain():
    opt = adamp_array.AdamP({"w": np.ones((2, 3)), "b": np.ones(3)}, lr=0.1)
    flat = adamp_array.flatten_state_dict(opt.state_dict())
    assert set(flat) == {f"state/{i}/{f}" for i in (0, 1) for f in ("step", "exp_avg", "exp_avg_sq")} | {
        f"param_groups/0/{k}"
        for k in ("lr", "betas", "eps", "weight_decay", "delta", "wd_ratio", "nesterov", "caution", "params",
                  "param_names")
    }
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in flat.values())
    sd = adamp_array.unflatten_state_dict(flat)
    group = sd["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["nesterov"] is False and group["params"] == [0, 1]
    assert group["param_names"] == ["w", "b"] and sd["state"][1]["step"] == 0


# ---------------------------------------------------------------------------------------------
# Bad input: (kwargs, error, message regex)

A = np.ones((3, 4))
BAD_ADAMP = [
    (dict(lr=-1.0), ValueError, r"Invalid learning rate: -1.0"),
    (dict(lr=math.nan), ValueError, r"Invalid learning rate: nan"),
    (dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1: -0.1"),
    (dict(betas=0.9), ValueError, r"Invalid betas: 0.9"),
    (dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08"),
    (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0.1"),
    (dict(delta=-0.1), ValueError, r"Invalid delta value: -0.1"),
    (dict(wd_ratio=-0.1), ValueError, r"Invalid wd_ratio value: -0.1"),
    (dict(nesterov=1), TypeError, r"Invalid nesterov value: 1"),
    (dict(lr="0.1"), TypeError, r"Invalid learning rate: '0.1'"),
    (dict(params=[]), ValueError, r"empty parameter list"),
    (dict(params=A), TypeError, r"params must be a list or dict of arrays"),
    (dict(params=[A, A]), ValueError, r"params\[1\] is the same array as params\[0\]"),
    (dict(params=[np.arange(3)]), TypeError, r"params\[0\] must have a real floating dtype, got int64"),
    (dict(params=[[1.0, 2.0]]), TypeError, r"params\[0\] must be an array, got list"),
    (dict(params=[{"params": [A]}, A]), TypeError, r"all arrays or all param-group dicts"),
    (dict(params=[{"lr": 0.1}]), ValueError, r"param_groups\[0\] has no 'params' entry"),
    (
        dict(params=[{"params": [A], "weight_dacay": 0.1}]),
        ValueError,
        r"Invalid param group key\(s\) \['weight_dacay'\]",
    ),
    (
        dict(params=[{"params": [A]}, {"params": [np.ones(2)], "lr": -2.0}]),
        ValueError,
        r"Invalid learning rate: -2.0 \(param_groups\[1\]\)",
    ),
    (dict(params=[A], state_dtype="int32"), ValueError, r"Invalid state_dtype: 'int32'"),
]
BAD_SGDP = [
    (dict(), ValueError, r"SGDP: lr is required"),
    (
        dict(params=[{"params": [A], "lr": 0.1}, {"params": [np.ones(2)]}]),
        ValueError,
        r"lr is required .*param_groups\[1\]",
    ),
    (dict(lr=-0.1), ValueError, r"Invalid learning rate: -0.1"),
    (dict(lr=0.1, momentum=-0.9), ValueError, r"Invalid momentum value: -0.9"),
    (dict(lr=0.1, momentum=1.5), ValueError, r"Invalid momentum value: 1.5"),
    (dict(lr=0.1, momentum=0.9, dampening=-0.1, nesterov=True), ValueError, r"Invalid dampening value: -0.1"),
    (dict(lr=0.1, momentum=1.0, weight_decay=0.1), ValueError, r"Invalid momentum value: 1.0"),
    (dict(lr=0.1, weight_decay=-1.0), ValueError, r"Invalid weight_decay value: -1.0"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ADAMP, ids=[m for _, _, m in BAD_ADAMP])
def test_adamp_bad_construction(kwargs, error, match):
    kwargs = {"params": [A], **kwargs}
    with pytest.raises(error, match=match):
        adamp_array.AdamP(**kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_SGDP, ids=[m for _, _, m in BAD_SGDP])
def test_sgdp_bad_construction(kwargs, error, match):
    kwargs = {"params": [A], **kwargs}
    with pytest.raises(error, match=match):
        adamp_array.SGDP(**kwargs)


def _fresh():
    return adamp_array.AdamP({"w": np.ones((3, 4)), "b": np.ones(3)}, lr=0.1)


BAD_STEP = [
    ({"w": np.ones((3, 4))}, ValueError, r"grads keys differ from the params' keys \(missing \['b'\]"),
    ({"w": np.ones((3, 4)), "b": np.ones(3), "x": None}, ValueError, r"unexpected \['x'\]"),
    ([np.ones((3, 4)), np.ones(3)], TypeError, r"grads must be a dict with the params' keys, got list"),
    (np.ones(3), TypeError, r"grads must be a dict with the params' keys, got ndarray"),
    ({"w": np.ones((4, 3)), "b": np.ones(3)}, ValueError, r"grads\['w'\] shape \(4, 3\) differs"),
]


@pytest.mark.parametrize(("grads", "error", "match"), BAD_STEP, ids=[m for _, _, m in BAD_STEP])
def test_bad_step(grads, error, match):
    opt = _fresh()
    with pytest.raises(error, match=match):
        opt.step(grads)


def test_bad_step_grouped_structure():
    opt = adamp_array.AdamP([{"params": [np.ones(3)]}, {"params": [np.ones(2)]}])
    with pytest.raises(ValueError, match=r"grads has 1 entries but there are 2 param groups"):
        opt.step([[np.ones(3)]])
    with pytest.raises(TypeError, match=r"grads must be a list with one entry per param group"):
        opt.step({"a": np.ones(3)})
    with pytest.raises(ValueError, match=r"grads\[1\] has 2 entries but there are 1 params"):
        opt.step([[np.ones(3)], [np.ones(2), np.ones(2)]])


def _saved():
    opt = _fresh()
    opt.step({"w": np.full((3, 4), 0.1), "b": np.full(3, 0.1)})
    return opt.state_dict()


def _edit(fn):
    sd = _saved()
    fn(sd)
    return sd


BAD_LOAD = [
    (
        lambda: _edit(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))),
        ValueError,
        r"loaded state dict has 2 parameter groups, the optimizer 1",
    ),
    (
        lambda: _edit(lambda sd: sd["param_groups"][0].update(params=[0])),
        ValueError,
        r"loaded param_groups\[0\] has 1 params but the optimizer's group has 2",
    ),
    (
        lambda: _edit(lambda sd: sd["param_groups"][0].update(param_names=["b", "w"])),
        ValueError,
        r"names params \['b', 'w'\], the optimizer \['w', 'b'\]",
    ),
    (
        lambda: _edit(lambda sd: sd["param_groups"][0].update(momentum=0.9)),
        ValueError,
        r"unexpected key\(s\) \['momentum'\]: not a AdamP state dict",
    ),
    (lambda: _edit(lambda sd: sd["param_groups"][0].pop("delta")), ValueError, r"is missing \['delta'\]"),
    (lambda: _edit(lambda sd: sd["param_groups"][0].update(lr=-1.0)), ValueError, r"Invalid learning rate: -1.0"),
    (
        lambda: _edit(lambda sd: sd["state"][0].update(exp_avg=np.ones((4, 3)))),
        ValueError,
        r"state\[0\].exp_avg has shape \(4, 3\) but the param has shape \(3, 4\)",
    ),
    (lambda: _edit(lambda sd: sd["state"][1].update(step=-1)), ValueError, r"Invalid state\[1\].step: -1"),
    (
        lambda: _edit(lambda sd: sd["state"][1].update(momentum=np.ones(3))),
        ValueError,
        r"state\[1\] has keys .*a AdamP state has \['step', 'exp_avg', 'exp_avg_sq'\]",
    ),
    (lambda: {"nonsense": 1}, ValueError, r"Invalid flat state dict key: 'nonsense'"),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD_LOAD, ids=[m for _, _, m in BAD_LOAD])
def test_bad_load_changes_nothing(make, error, match):
    opt = _fresh()
    opt.step({"w": np.full((3, 4), 0.2), "b": np.full(3, 0.2)})
    snap = _snapshot(opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(make())
    _assert_unchanged(opt, snap)


def test_conformance_rows_for_the_array_adapter():
    from adamp_xp.testing.adapters_conformance import adapter_rows

    rows = adapter_rows(
        dtypes=("float64",), steps=STEPS, backends=[NUMPY], cases={"adamp": ["lr_wd"], "sgdp": ["momentum_wd"]}
    )
    assert rows == [
        dict(
            backend="numpy",
            device="cpu",
            dtype="float64",
            target="adamp_array",
            max_rel_error=rows[0]["max_rel_error"],
            passed=True,
        )
    ]
    assert 0.0 <= rows[0]["max_rel_error"] < TOL64
