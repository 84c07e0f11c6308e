"""Non-finite gradients (issue 9): one policy on every backend and entry point.

* Default: NaN/inf propagate into the param and the state exactly as the arithmetic gives, as in
  adamp 0.3.0 (and torch.optim). Tested against adamp 0.3.0 itself: after a NaN, +inf or -inf entry
  (or a whole NaN gradient), every later param and state is non-finite at exactly the official
  positions, with equal finite values elsewhere, and NaN vs +-inf exactly as official as long as the
  weight entering the step is finite (see the test for the one exception).
* ``skip_nonfinite=True``: a param whose gradient has a non-finite entry is left as it was, param
  and state, and its step count does not advance; the run then equals the official run *without*
  that step. Each adapter counts the skips (torch: ``state["nonfinite_skips"]``, adamp_array:
  ``opt.nonfinite_skips``, optax: ``state.nonfinite_skips``).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import adamp_core as ac

adamp = pytest.importorskip("adamp", reason="the oracle adamp==0.3.0 is not installed")
torch = pytest.importorskip("torch")

STEPS = 5
BAD_STEP = 1  # 0-based: the second step gets the bad gradient
HP = {
    "adamp": dict(lr=1e-2, weight_decay=0.1),
    "adamp-nesterov": dict(lr=1e-2, weight_decay=0.05, nesterov=True),
    "sgdp": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgdp-plain": dict(lr=0.1),
    "sgdp-nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
}
SHAPES = {"conv4d": (4, 2, 3, 3), "linear2d": (5, 12), "vector1d": (7,), "scalar0d": ()}
BADS = ("nan", "inf", "-inf", "all-nan")
ENTRY_POINTS = (
    "core:numpy",
    "core:torch",
    "core:jax",
    "core:array_api_strict",
    "tree:numpy",
    "torch",
    "array",
    "optax",
)


def _has_fused_option() -> bool:
    import adamp_array
    import adamp_torch

    return all("fused" in inspect.signature(c).parameters for c in (adamp_torch.AdamP, adamp_array.AdamP))


# The stateful adapters' default on CPU may be their fused kernels; ":unfused" runs their pure step (fused=False).
if _has_fused_option():
    ENTRY_POINTS += ("torch:unfused", "array:unfused")


def _opt(case: str) -> str:
    return case.split("-")[0]


def _grads(shape, bad, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(STEPS):
        g = rng.standard_normal(shape)
        if t == BAD_STEP and bad is not None:
            g = np.array(g)
            if bad == "all-nan":
                g[...] = np.nan
            else:
                g.reshape(-1)[0] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[bad]
        out.append(g)
    return out


def official_run(case, w0, grads):
    """adamp 0.3.0 in float64: [(param, {state})] after each step."""
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = (adamp.AdamP if _opt(case) == "adamp" else adamp.SGDP)([p], **HP[case])
    out = []
    for g in grads:
        p.grad = torch.from_numpy(np.array(g))
        opt.step()
        st = {k: v.numpy().copy() for k, v in opt.state[p].items() if torch.is_tensor(v)}
        out.append((p.detach().numpy().copy(), st))
    return out


def _to_np(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy().copy()
    return np.array(x, dtype=np.float64, copy=True)


def run_entry(entry, case, w0, grads, skip=False):
    """[(param, {state arrays})] after each step, as float64 NumPy; plus the skip counts where reported."""
    optimizer = _opt(case)
    hp = HP[case]
    kind, _, lib = entry.partition(":")
    out, skips = [], None
    if kind in ("core", "tree"):
        from adamp_xp.testing.backends import Backend

        be = Backend(lib, "cpu")
        if be.skip_reason():
            pytest.skip(be.skip_reason())
        init, step = (ac.adamp_init, ac.adamp_step) if optimizer == "adamp" else (ac.sgdp_init, ac.sgdp_step)
        w = be.asarray(w0, "float64")
        state = init(w)
        for g in grads:
            g = be.asarray(g, "float64")
            if kind == "core":
                w, state = step(w, g, state, **hp, skip_nonfinite=skip)
            else:
                tree_step = ac.tree.adamp_step if optimizer == "adamp" else ac.tree.sgdp_step
                (w,), (state,) = tree_step([w], [g], [state], **hp, skip_nonfinite=skip)
            out.append((be.to_numpy(w), {k: be.to_numpy(v) for k, v in state._asdict().items() if k != "step"}))
        if optimizer == "adamp":
            skips = STEPS - int(be.to_numpy(state.step))
    elif kind == "torch":
        import adamp_torch

        p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
        path = {"fused": False} if lib == "unfused" else {}
        opt = (adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP)([p], **hp, skip_nonfinite=skip, **path)
        for g in grads:
            p.grad = torch.from_numpy(np.array(g))
            opt.step()
            st = {k: _to_np(v) for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq", "momentum")}
            out.append((_to_np(p), st))
        if skip:
            skips = int(opt.state[p]["nonfinite_skips"])
            if optimizer == "adamp":
                assert int(opt.state[p]["step"]) == STEPS - skips
    elif kind == "array":
        import adamp_array

        w = np.array(w0)
        path = {"fused": False} if lib == "unfused" else {}
        opt = (adamp_array.AdamP if optimizer == "adamp" else adamp_array.SGDP)([w], **hp, skip_nonfinite=skip, **path)
        for g in grads:
            opt.step([np.array(g)])
            st = {k: _to_np(v) for k, v in opt.states[0]._asdict().items() if k != "step"}
            out.append((_to_np(opt.params[0]), st))
        if skip:
            skips = opt.nonfinite_skips[0]
    else:  # optax, under jax.jit
        jax = pytest.importorskip("jax")
        import optax

        import adamp_optax

        kw = {("learning_rate" if k == "lr" else k): v for k, v in hp.items()}
        tx = (adamp_optax.adamp if optimizer == "adamp" else adamp_optax.sgdp)(**kw, skip_nonfinite=skip)
        params = {"w": jax.numpy.asarray(w0)}
        state = tx.init(params)

        @jax.jit
        def step(params, state, g):
            updates, state = tx.update({"w": g}, state, params)
            return optax.apply_updates(params, updates), state

        for g in grads:
            params, state = step(params, state, jax.numpy.asarray(g))
            core = {k: getattr(state, k)["w"] for k in ("exp_avg", "exp_avg_sq", "momentum") if k in state._fields}
            out.append((_to_np(params["w"]), {k: _to_np(v) for k, v in core.items()}))
        if skip:
            skips = int(state.nonfinite_skips["w"])
    return out, skips


def _same_nonfinite(ours, ref, what, exact_inf=True):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, what
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref), err_msg=what)
    if exact_inf:
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg=what)
        np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(ref), err_msg=what)
        np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref), err_msg=what)
    fin = np.isfinite(ref)
    scale = max(float(np.max(np.abs(ref[fin]), initial=0.0)), 1e-300)
    assert np.max(np.abs(ours[fin] - ref[fin]), initial=0.0) <= 1e-12 * scale, what


def _runs_on(entry, bad, keep):
    """JAX compiles each new program (slow): there, only the ``keep`` kinds of bad gradient run."""
    return entry not in ("core:jax", "optax") or bad in keep


# Every shape and case on core:numpy and the torch adapter; the other entry points run linear2d with the
# plain AdamP and SGDP cases.
PROPAGATE_CASES = [
    pytest.param(case, shape, bad, entry, id=f"{case}-{shape}-{bad}-{entry}")
    for case in HP
    for shape in SHAPES
    for bad in BADS
    for entry in ENTRY_POINTS
    if (entry in ("core:numpy", "torch") or (shape == "linear2d" and case in ("adamp", "sgdp")))
    and _runs_on(entry, bad, ("nan", "-inf"))
]


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
@pytest.mark.parametrize("case,shape,bad,entry", PROPAGATE_CASES)
def test_default_propagates_like_adamp_0_3_0(case, shape, bad, entry):
    w0 = np.random.default_rng(1).standard_normal(SHAPES[shape])
    grads = _grads(SHAPES[shape], bad)
    ref = official_run(case, w0, grads)
    ours, _ = run_entry(entry, case, w0, grads)
    for t, ((w, st), (rw, rst)) in enumerate(zip(ours, ref, strict=True)):
        # NaN vs +-inf exactly as adamp 0.3.0 while the weight going into the step is finite. Once a weight
        # entry is itself +-inf (SGDP: an inf gradient enters the buffer, then the weight), adamp 0.3.0 keeps
        # it +-inf and we may give NaN (u - w * 0 with w = inf where nothing is projected); and optax adds
        # new - old, which is NaN for an infinite param. Non-finite at exactly the same places in all cases.
        exact = entry != "optax" and (t == 0 or bool(np.all(np.isfinite(ref[t - 1][0]))))
        _same_nonfinite(w, rw, f"{entry} step {t}: param", exact)
        for k in st:
            _same_nonfinite(st[k], rst[k], f"{entry} step {t}: {k}", exact)
    assert not np.all(np.isfinite(ours[-1][0])), "the bad gradient should have reached the param"


SKIP_CASES = [
    pytest.param(case, bad, entry, id=f"{case}-{bad}-{entry}")
    for case in ("adamp", "sgdp", "sgdp-nesterov")
    for bad in BADS
    for entry in ENTRY_POINTS
    if _runs_on(entry, bad, ("nan",))
]


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
@pytest.mark.parametrize("case,bad,entry", SKIP_CASES)
def test_skip_nonfinite_equals_a_run_without_that_step(case, bad, entry):
    shape = SHAPES["linear2d" if entry != "core:numpy" else "conv4d"]
    w0 = np.random.default_rng(2).standard_normal(shape)
    grads = _grads(shape, bad)
    ref = official_run(case, w0, grads[:BAD_STEP] + grads[BAD_STEP + 1 :])
    ours, skips = run_entry(entry, case, w0, grads, skip=True)
    np.testing.assert_array_equal(ours[BAD_STEP][0], ours[BAD_STEP - 1][0])  # param untouched, bit for bit
    for k in ours[BAD_STEP][1]:
        np.testing.assert_array_equal(ours[BAD_STEP][1][k], ours[BAD_STEP - 1][1][k])
    del ours[BAD_STEP]
    for t, ((w, st), (rw, rst)) in enumerate(zip(ours, ref, strict=True)):
        np.testing.assert_allclose(w, rw, rtol=1e-12, atol=1e-14, err_msg=f"step {t}")
        for k in st:
            np.testing.assert_allclose(st[k], rst[k], rtol=1e-12, atol=1e-14, err_msg=f"step {t}: {k}")
    if skips is not None:
        assert skips == 1


def test_skip_nonfinite_is_per_param_in_a_tree():
    """One bad grad among several params: only that param (and its state) is held back."""
    rng = np.random.default_rng(3)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = {"a": rng.standard_normal((3, 4)), "b": np.array([1.0, np.nan, 0.0, 2.0])}
    states = ac.tree.adamp_init(params)
    new_p, new_s = ac.tree.adamp_step(params, grads, states, lr=0.1, skip_nonfinite=True)
    ref_p, ref_s = ac.adamp_step(params["a"], grads["a"], states["a"], lr=0.1)
    np.testing.assert_array_equal(new_p["a"], ref_p)
    assert int(new_s["a"].step) == 1 and int(new_s["b"].step) == 0
    np.testing.assert_array_equal(new_p["b"], params["b"])


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_skip_nonfinite_with_a_python_int_step_and_under_jit():
    """A Python-int step count (adamp 0.3.0's host count) is skipped on the host; a 0-d array one under
    jax.jit, traced once, with no host sync."""
    jax = pytest.importorskip("jax")
    w = np.ones((3, 4))
    g_bad = np.full((3, 4), np.inf)
    st = ac.adamp_init(w)._replace(step=0)
    new_w, new_st = ac.adamp_step(w, g_bad, st, skip_nonfinite=True)
    assert new_w is w and new_st is st
    new_w, new_st = ac.adamp_step(w, np.ones((3, 4)), st, skip_nonfinite=True)
    assert new_st.step == 1 and not np.array_equal(new_w, w)

    traces = []

    @jax.jit
    def step(w, g, st):
        traces.append(1)
        return ac.sgdp_step(w, g, st, lr=0.1, momentum=0.9, skip_nonfinite=True)

    wj = jax.numpy.asarray(w)
    stj = ac.sgdp_init(wj)
    w1, st1 = step(wj, jax.numpy.asarray(g_bad), stj)
    w2, st2 = step(w1, jax.numpy.ones((3, 4)), st1)
    np.testing.assert_array_equal(np.asarray(w1), w)
    assert not np.array_equal(np.asarray(w2), w) and len(traces) == 1


def test_torch_skip_counter_survives_a_checkpoint():
    import adamp_torch

    p = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
    opt = adamp_torch.AdamP([p], lr=0.1, skip_nonfinite=True)
    for g in (torch.full((3, 4), float("nan")), torch.ones(3, 4), torch.full((3, 4), float("inf"))):
        p.grad = g.to(torch.float64)
        opt.step()
    assert int(opt.state[p]["nonfinite_skips"]) == 2 and int(opt.state[p]["step"]) == 1
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    other = adamp_torch.AdamP([q], lr=0.1, skip_nonfinite=True)
    other.load_state_dict(sd)
    skips = other.state[q]["nonfinite_skips"]
    assert skips.dtype == torch.int64 and int(skips) == 2
    # an official adamp 0.3.0 optimizer loads it too (it ignores the extra key)
    official = adamp.AdamP([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    official.load_state_dict(sd)
