"""Recipe ``flax_nnx``: ``adamp_optax`` inside ``flax.nnx.Optimizer`` (flax's default API) under ``nnx.jit``.

nnx wraps every array of the optimizer state in its own variable types and rebuilds the containers, so a
state holding one ``adamp_core`` NamedTuple per leaf came back as ``nnx.State`` objects and the second
update failed (issue 15). The state is now laid out as optax's own (a count and trees like the params).
The reference is independent of nnx's optimizer, of the adapter and of XLA's compilation of the step:
the same steps with ``adamp_core.tree`` on NumPy copies of the pure params (gradients from JAX, the model
applied with ``nnx.merge``).
"""

from __future__ import annotations

import operator

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

import adamp_core as ac  # noqa: E402
import adamp_optax  # noqa: E402

STEPS = 20
# The recipe's hyperparameters, for the core.
HP = {
    "adamp": (ac.tree.adamp_init, ac.tree.adamp_step, dict(lr=1e-2, weight_decay=1e-2)),
    "sgdp": (ac.tree.sgdp_init, ac.tree.sgdp_step, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)),
}
STATES = {"adamp": (adamp_optax.ScaleByAdamPState, ac.AdamPState), "sgdp": (adamp_optax.ScaleBySGDPState, ac.SGDPState)}


def _core_run(ns, optimizer, value_and_grad):
    """STEPS steps of adamp_core on NumPy copies of a fresh model's params, the gradients from JAX;
    returns (params, states, losses)."""
    init, step, hp = HP[optimizer]
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(ns["MLP"](nnx.Rngs(0)), nnx.Param)))
    states = init(params)
    losses = []
    for _ in range(STEPS):
        loss, grads = value_and_grad(params, ns["x"], ns["y"])
        params, states = step(params, jax.tree.map(np.asarray, grads), states, **hp)
        losses.append(float(loss))
    return params, states, losses


def _pure(tree):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(tree))


def _assert_close(ours, ref, what):
    for path, r in jax.tree_util.tree_leaves_with_path(ref):
        o = ours
        for k in path:
            o = o[k.key]
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=2e-5, atol=1e-6,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def test_nnx_optimizer_trains_like_the_core(run_recipe):
    ns = run_recipe("flax_nnx")
    graphdef = nnx.graphdef(ns["MLP"](nnx.Rngs(0)))
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, x, y: ns["loss_fn"](nnx.merge(graphdef, p), x, y)))
    runs = {"adamp": (ns["model"], ns["optimizer"], ns["losses"]),
            "sgdp": (ns["sgdp_model"], ns["sgdp_optimizer"], ns["sgdp_losses"])}
    for optimizer, (model, opt, losses) in runs.items():
        assert len(losses) == STEPS and losses[-1] < 0.8 * losses[0], (optimizer, losses)
        state = opt.opt_state
        state_cls, core_cls = STATES[optimizer]
        assert isinstance(state, state_cls)
        ref_params, ref_states, ref_losses = _core_run(ns, optimizer, value_and_grad)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=optimizer)
        _assert_close(_pure(nnx.state(model, nnx.Param)), ref_params, f"{optimizer} param ")
        # optax.tree_utils.tree_get finds the moments by name (the recipe's exp_avg): one tree like the
        # params (an nnx.State here)
        field = "exp_avg" if optimizer == "adamp" else "momentum"
        moments = ns["exp_avg"] if optimizer == "adamp" else optax.tree_utils.tree_get(state, field)
        assert jax.tree.structure(_pure(moments)) == jax.tree.structure(ref_params)
        ref_moments = jax.tree.map(
            operator.attrgetter(field), ref_states, is_leaf=lambda s, c=core_cls: isinstance(s, c)
        )
        _assert_close(_pure(moments), ref_moments, f"{optimizer} {field} ")
        assert int(np.asarray(state.count)) == STEPS
        if optimizer == "adamp":  # per-leaf step counts, each STEPS
            assert {int(v) for v in jax.tree.leaves(_pure(state.step))} == {STEPS}
    # One compilation per optimizer (the two states differ in structure), none per step.
    assert ns["train_step"].jitted_fn._cache_size() == 2
