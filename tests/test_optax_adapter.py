"""adamp_optax: AdamP/SGDP as optax GradientTransformations, against ``adamp==0.3.0``.

Runs with JAX x64 enabled (tests/conftest.py) so the float64 comparisons are real float64; the
optax path is compiled with ``jax.jit`` unless a test says otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import adamp_core as ac  # noqa: E402
import adamp_optax  # noqa: E402
from adamp_xp.testing.adapters_conformance import optax_kwargs, run_optax_adapter  # noqa: E402
from adamp_xp.testing.backends import Backend  # noqa: E402
from adamp_xp.testing.oracle import ADAMP_CASES, REGIMES, make_grad, rel_error  # noqa: E402

STEPS = 30  # shares oracle.reference_run's cache with the other oracle tests
TOL64 = 1e-10
FEW_SHAPES = ("conv4d", "row_len1", "vector1d", "scalar0d")
JAX_BACKENDS = [
    pytest.param(b, id=b.id, marks=[pytest.mark.skip(reason=b.skip_reason())] if b.skip_reason() else [])
    for b in (Backend("jax", "cpu"), Backend("jax", "gpu"))
]
# (optimizer, case, shapes): every oracle shape for each optimizer, over one or two cases (each case
# is one XLA compilation of the whole pytree step, which costs seconds per handful of leaves).
OTHER_SHAPES = ("linear2d", "single_row", "zero_init", "conv3d")  # with FEW_SHAPES: every oracle shape
ORACLE = [
    ("adamp", "nesterov_wd", None),
    ("adamp", "betas_eps_ratio", FEW_SHAPES),
    ("sgdp", "dampening_ratio", OTHER_SHAPES),
    ("sgdp", "nesterov_wd", FEW_SHAPES),
]


def _tx(optimizer, **hp):
    return adamp_optax.adamp(**hp) if optimizer == "adamp" else adamp_optax.sgdp(**hp)


@pytest.mark.parametrize("backend", JAX_BACKENDS)
@pytest.mark.parametrize(("optimizer", "case", "shapes"), ORACLE, ids=[f"{o}-{c}" for o, c, _ in ORACLE])
def test_matches_official_float64_under_jit(backend, optimizer, case, shapes):
    err = run_optax_adapter(backend, optimizer, case, "float64", STEPS, shapes=shapes, jit=True)
    assert err < TOL64, f"{optimizer}/{case}: max relative error {err:.3e}"


def test_matches_official_float32_under_jit():
    err = run_optax_adapter(Backend("jax", "cpu"), "adamp", "lr_wd", "float32", STEPS, shapes=("conv4d", "vector1d"))
    assert err < 1e-5, f"max relative error {err:.3e}"


def test_matches_official_eagerly():
    err = run_optax_adapter(
        Backend("jax", "cpu"), "sgdp", "momentum", "float64", STEPS, shapes=("vector1d",), jit=False
    )
    assert err < TOL64


# ---------------------------------------------------------------------------------------------
# Our own loops over the official optimizer: schedules, chains, injected hyperparameters


def _official_loop(optimizer, init, steps, hp, *, lr_at=None, transform=None, seed=7):
    """The official optimizer on ``init`` (dict of float64 arrays); gradients from its own weights.
    Returns the raw gradients fed to ours, and the official params after every step."""
    import adamp
    import torch

    rng = np.random.default_rng(seed)
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    opt = (adamp.AdamP if optimizer == "adamp" else adamp.SGDP)(list(tp.values()), **hp)
    grads, params = [], []
    for t in range(steps):
        g = {k: make_grad(p.detach().numpy(), REGIMES[t % 3], rng) for k, p in tp.items()}
        grads.append(g)
        fed = transform(g) if transform else g
        for k, p in tp.items():
            p.grad = torch.from_numpy(fed[k].copy())
        if lr_at is not None:
            opt.param_groups[0]["lr"] = lr_at(t)
        opt.step()
        params.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    return grads, params


def _init(seed=11):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((6, 3, 3, 3)), "b": rng.standard_normal(6)}


def _run_ours(tx, init, grads):
    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)
    out = []
    for g in grads:
        params, state = step(params, state, {k: jnp.asarray(v) for k, v in g.items()})
        out.append({k: np.asarray(v) for k, v in params.items()})
    return out, state


def _assert_close(ours, ref):
    for k in ref[0]:
        err = rel_error([o[k] for o in ours], [r[k] for r in ref])
        assert err < TOL64, f"{k}: {err:.3e}"


def test_schedule_matches_official_with_the_same_learning_rates():
    """The schedule is called with the update count (0 first, as in optax); the official optimizer
    gets the same values through param_groups[0]['lr']. (A float64 schedule: float32 ones, such as
    the warmup and linear schedules, round differently under jit than eagerly, ~1e-7 relative.)"""
    schedule = optax.cosine_decay_schedule(1e-2, decay_steps=12, alpha=0.05)
    hp = dict(betas=(0.9, 0.99), weight_decay=0.1)
    init = _init()
    # The schedule's value for the int32 count the transformation passes (float64 maths here).
    lr_at = lambda t: float(schedule(jnp.asarray(t, jnp.int32)))  # noqa: E731
    grads, ref = _official_loop("adamp", init, 18, dict(lr=1e-3, **hp), lr_at=lr_at)
    ours, state = _run_ours(adamp_optax.adamp(schedule, b1=0.9, b2=0.99, weight_decay=0.1), init, grads)
    _assert_close(ours, ref)
    assert int(state.count) == 18 and lr_at(0) == 1e-2 and lr_at(17) == 5e-4 and lr_at(6) < lr_at(5)


def test_chain_after_clip_by_global_norm_matches_official_on_clipped_grads():
    max_norm = 2.5  # the "layer" and "none" regimes exceed it, the "channel" one does not
    clipped = []

    def clip(g):  # the clipping, in NumPy: g * max_norm / |g| when the global norm reaches max_norm
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
        clipped.append(norm >= max_norm)
        return g if norm < max_norm else {k: v / norm * max_norm for k, v in g.items()}

    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    init = _init()
    grads, ref = _official_loop("sgdp", init, 18, hp, transform=clip)
    assert any(clipped) and not all(clipped)  # both branches of the clip are exercised
    tx = optax.chain(optax.clip_by_global_norm(max_norm), adamp_optax.sgdp(0.05, momentum=0.9, weight_decay=1e-2))
    ours, _ = _run_ours(tx, init, grads)
    _assert_close(ours, ref)


def test_inject_hyperparams_matches_official():
    """Hyperparameters as (float64) arrays in the state: the core's array path, one compilation."""
    hp = ADAMP_CASES["betas_eps_ratio"]
    init = _init()
    grads, ref = _official_loop("adamp", init, 15, hp)
    tx = optax.inject_hyperparams(adamp_optax.adamp, static_args=("nesterov",))(**optax_kwargs("adamp", hp))
    ours, state = _run_ours(tx, init, grads)
    _assert_close(ours, ref)
    assert state.hyperparams["learning_rate"].dtype == jnp.float64


# ---------------------------------------------------------------------------------------------
# Pytrees, state, jit, precision


# Eager JAX compiles every primitive for every new shape: these tests share two shapes.
W, B = (5, 12), (7,)
ULPS = 4


def test_any_pytree_and_state_layout():
    rng = np.random.default_rng(0)
    params = {"conv": (jnp.asarray(rng.standard_normal(W)), jnp.zeros(B)), "head": [jnp.ones(W)]}
    grads = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape)), params)
    for optimizer, state_cls, core_cls in (
        ("adamp", adamp_optax.ScaleByAdamPState, ac.AdamPState),
        ("sgdp", adamp_optax.ScaleBySGDPState, ac.SGDPState),
    ):
        tx = _tx(optimizer, learning_rate=0.1)
        state = tx.init(params)
        assert isinstance(state, state_cls) and state.count.dtype == jnp.int32
        # optax's layout (cf. ScaleByAdamState(count, mu, nu)): one tree like the params per core field
        assert state_cls._fields == ("count", *core_cls._fields, "nonfinite_skips")
        for field in core_cls._fields:
            assert jax.tree.structure(getattr(state, field)) == jax.tree.structure(params), field
        assert optax.tree_utils.tree_get(state, core_cls._fields[-1]) is getattr(state, core_cls._fields[-1])
        core_step = ac.adamp_step if optimizer == "adamp" else ac.sgdp_step
        core_init = ac.adamp_init if optimizer == "adamp" else ac.sgdp_init

        @jax.jit
        def both(params, grads, state, tx=tx, core_step=core_step, core_init=core_init):
            new = jax.tree.map(lambda w, g: core_step(w, g, core_init(w), lr=0.1)[0], params, grads)
            return new, tx.update(grads, state, params)

        new, (updates, state) = both(params, grads, state)
        assert jax.tree.structure(updates) == jax.tree.structure(params) and int(state.count) == 1
        # Each leaf's update is the core's step, new_param - param, up to a few ulps: XLA compiles the
        # two computations separately and may fuse differently (e.g. into fused multiply-adds).
        for u, n, p in zip(jax.tree.leaves(updates), jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
            u, n, p = np.asarray(u), np.asarray(n), np.asarray(p)
            assert np.all(np.abs(u - (n - p)) <= ULPS * np.spacing(np.maximum(np.abs(n), np.abs(p))))
            assert np.any(u != 0)


def test_masked_leaves_are_stepped_and_others_pass_through():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal(W)), "b": jnp.asarray(rng.standard_normal(B))}
    grads = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape)), params)
    tx = optax.masked(adamp_optax.adamp(0.1, weight_decay=0.1), {"w": True, "b": False})
    alone = adamp_optax.adamp(0.1, weight_decay=0.1)

    @jax.jit
    def both(params, grads):
        w = {"w": params["w"]}
        return tx.update(grads, tx.init(params), params)[0], alone.update({"w": grads["w"]}, alone.init(w), w)[0]

    updates, ref = both(params, grads)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(ref["w"]))
    np.testing.assert_array_equal(np.asarray(updates["b"]), np.asarray(grads["b"]))


def test_jit_traces_once_with_a_schedule():
    traces = []
    tx = adamp_optax.adamp(optax.exponential_decay(1e-2, 10, 0.5), weight_decay=0.1)

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.ones(W)}
    state = tx.init(params)
    for _ in range(5):
        params, state = step(params, state, {"w": jnp.full(W, 0.1)})
    assert len(traces) == 1 and int(state.count) == 5 and int(state.step["w"]) == 5


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_apply_updates_gives_the_core_result_within_one_rounding(dtype):
    """optax adds the update back: p + (new - p) differs from the core's new p by about one ulp of
    max(|p|, |new p|) (two roundings of half an ulp; a few ulps allowed for XLA's fusion choices)."""
    rng = np.random.default_rng(2)
    p = jnp.asarray(rng.standard_normal(W), dtype=dtype)
    g = jnp.asarray(0.1 * rng.standard_normal(W), dtype=dtype)
    tx = adamp_optax.adamp(0.5, weight_decay=0.1)

    @jax.jit
    def both(p, g):  # one program, so the core's new p is the very value the update was made from
        new, _ = ac.adamp_step(p, g, ac.adamp_init(p), lr=0.5, weight_decay=0.1)
        updates, _ = tx.update(g, tx.init(p), p)
        return new, updates

    new, updates = both(p, g)
    applied = np.asarray(optax.apply_updates(p, updates))
    new = np.asarray(new)
    bound = ULPS * np.spacing(np.maximum(np.abs(np.asarray(p)), np.abs(new)))
    assert np.all(np.abs(applied - new) <= bound)
    assert not np.array_equal(applied, np.asarray(p))


def test_state_dtype_keeps_bfloat16_params_with_float32_state():
    p = {"w": jnp.ones(W, dtype=jnp.bfloat16)}
    tx = adamp_optax.adamp(1e-2, state_dtype=jnp.float32)
    state = tx.init(p)
    updates, state = jax.jit(tx.update)({"w": jnp.full(W, 0.1, dtype=jnp.bfloat16)}, state, p)
    new = optax.apply_updates(p, updates)
    assert state.exp_avg["w"].dtype == jnp.float32 and state.exp_avg_sq["w"].dtype == jnp.float32
    # One Adam step moves every weight by lr (g is parallel to w: no projection): 1 - 0.01 in bfloat16.
    np.testing.assert_array_equal(np.asarray(new["w"].astype(jnp.float32)), np.full(W, float(jnp.bfloat16(0.99))))
    assert new["w"].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# Bad input: (kwargs, error, message regex)

BAD_ADAMP = [
    (dict(learning_rate=-1.0), ValueError, r"Invalid learning rate: -1.0"),
    (dict(learning_rate=None), TypeError, r"Invalid learning rate: None"),
    (dict(learning_rate="1e-3"), TypeError, r"Invalid learning rate: '1e-3'"),
    (dict(learning_rate=True), TypeError, r"Invalid learning rate: True"),
    (dict(b1=1.0), ValueError, r"Invalid beta parameter at index 0: 1.0"),
    (dict(b2=-0.5), ValueError, r"Invalid beta parameter at index 1: -0.5"),
    (dict(eps=-1.0), ValueError, r"Invalid epsilon value: -1.0"),
    (dict(weight_decay=-1e-2), ValueError, r"Invalid weight_decay value: -0.01"),
    (dict(delta=-0.1), ValueError, r"Invalid delta value: -0.1"),
    (dict(wd_ratio=math.inf), ValueError, r"Invalid wd_ratio value: inf"),
    (dict(nesterov="yes"), TypeError, r"Invalid nesterov value: 'yes'"),
    (dict(state_dtype=jnp.int32), ValueError, r"Invalid state_dtype"),
]
BAD_SGDP = [
    (dict(learning_rate=-0.1), ValueError, r"Invalid learning rate: -0.1"),
    (dict(learning_rate=0.1, momentum=-0.9), ValueError, r"Invalid momentum value: -0.9"),
    (dict(learning_rate=0.1, momentum=1.5), ValueError, r"Invalid momentum value: 1.5"),
    (dict(learning_rate=0.1, momentum=1.0, weight_decay=0.1), ValueError, r"Invalid momentum value: 1.0"),
    (dict(learning_rate=0.1, dampening=math.inf), ValueError, r"Invalid dampening value: inf"),
    (dict(), TypeError, r"learning_rate"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ADAMP, ids=[m for _, _, m in BAD_ADAMP])
def test_adamp_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        tx = adamp_optax.adamp(**kwargs)
        tx.init({"w": jnp.ones(W)})  # state_dtype is checked by the core's init


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_SGDP, ids=[m for _, _, m in BAD_SGDP])
def test_sgdp_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        adamp_optax.sgdp(**kwargs)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_update_requires_params(optimizer):
    tx = _tx(optimizer, learning_rate=0.1)
    params = {"w": jnp.ones(W)}
    with pytest.raises(ValueError, match=rf"{optimizer} requires the current params"):
        tx.update(params, tx.init(params))


def test_bad_grad_is_named():
    tx = adamp_optax.adamp()
    params = {"w": jnp.ones(W)}
    with pytest.raises(ValueError, match=r"grad shape \(12, 5\) differs from param shape \(5, 12\)"):
        tx.update({"w": jnp.ones((12, 5))}, tx.init(params), params)


@pytest.mark.parametrize("transform", ["jit", "vmap", "nnx.jit"])
@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_concrete_grads_beside_traced_params(name, transform):
    """A grad that is a concrete array (a closure constant) beside traced params, and the reverse: a tracer
    has no device of its own, so there is no device mismatch to refuse (optax.adamw takes both); the
    update equals the eager one."""
    make = {"adamp": lambda: adamp_optax.adamp(1e-2, weight_decay=1e-2),
            "sgdp": lambda: adamp_optax.sgdp(1e-2, momentum=0.9, weight_decay=1e-2)}[name]
    tx = make()
    w = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    g = jnp.full((4, 3), 0.1).at[0, 0].set(-0.3)
    eager, _ = tx.update({"W": g}, tx.init({"W": w}), {"W": w})

    def with_constant_grad(p):
        return tx.update({"W": g}, tx.init({"W": p}), {"W": p})[0]["W"]

    def with_constant_param(grad):
        return tx.update({"W": grad}, tx.init({"W": w}), {"W": w})[0]["W"]

    if transform == "jit":
        got = [jax.jit(with_constant_grad)(w), jax.jit(with_constant_param)(g)]
    elif transform == "vmap":
        got = [jax.vmap(with_constant_grad)(w[None])[0], jax.vmap(with_constant_param)(g[None])[0]]
    else:
        nnx = pytest.importorskip("flax.nnx")
        got = [nnx.jit(with_constant_grad)(w), nnx.jit(with_constant_param)(g)]
    for u in got:
        assert float(jnp.max(jnp.abs(u - eager["W"]))) <= 1e-6 * float(jnp.max(jnp.abs(eager["W"])))
