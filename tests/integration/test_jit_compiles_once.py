"""A jitted training step with ``adamp_optax`` compiles once, as one with ``optax.adamw`` does (issue 15).

``jax.jit`` keys its cache on the inputs' placements: a state committed to a device next to uncommitted
params (what ``jnp.zeros(..., device=d)`` makes) gives a first call with mixed inputs and committed
outputs, so the second call compiled again. Counted with the jitted function's ``_cache_size()`` after
three steps; ``optax.adamw`` in the same harness is the control that the harness itself compiles once.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = pytest.importorskip("jax.numpy")

import adamp_core as ac  # noqa: E402
import adamp_optax  # noqa: E402

STEPS = 3


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
    params = {"W": jnp.asarray(0.1 * rng.standard_normal((4, 8)), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    return params, x, y


def _loss(params, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ params["W"].T + params["b"] - y) ** 2)


def _compiles(tx, params, x, y, *, init=None):
    """The README's step (chain with clipping, a schedule), run STEPS times; returns (cache size, params)."""
    opt_state = (init or tx.init)(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for t in range(STEPS):
        params, opt_state, _ = train_step(params, opt_state, (x[8 * t : 8 * t + 8], y[8 * t : 8 * t + 8]))
    return train_step._cache_size(), params


def _tx(optimizer, skip):
    schedule = optax.cosine_decay_schedule(0.05, 500)
    inner = (
        adamp_optax.adamp(schedule, weight_decay=1e-4, skip_nonfinite=skip)
        if optimizer == "adamp"
        else adamp_optax.sgdp(schedule, momentum=0.9, weight_decay=1e-4, skip_nonfinite=skip)
    )
    return optax.chain(optax.clip_by_global_norm(1.0), inner)


def test_the_control_compiles_once():
    params, x, y = _data()
    assert _compiles(optax.adamw(1e-2), params, x, y)[0] == 1


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip_nonfinite"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_readme_step_compiles_once(optimizer, skip):
    params, x, y = _data()
    size, new = _compiles(_tx(optimizer, skip), params, x, y)
    assert size == 1
    assert not np.array_equal(np.asarray(new["W"]), np.asarray(params["W"]))


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_compiles_once_with_params_committed_to_a_device_or_a_jitted_init(optimizer):
    """Params placed with ``jax.device_put(params, device)`` (committed): the counts and steps are then
    committed to that device too, so even this compiles once (``optax.adamw``'s own count does not: it
    compiles twice here). A state made by a jitted ``init`` is uncommitted like the params."""
    params, x, y = _data()
    committed = jax.device_put(params, jax.devices()[0])
    assert _compiles(_tx(optimizer, True), committed, x, y)[0] == 1
    tx = _tx(optimizer, False)
    assert _compiles(tx, params, x, y, init=jax.jit(tx.init))[0] == 1


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_core_tree_step_compiles_once(optimizer):
    """The functional core under jit: ``ac.tree.*_init`` states are placed like the params (zeros_like,
    an uncommitted step), so the step compiles once too."""
    params, x, y = _data()
    init, step = (ac.tree.adamp_init, ac.tree.adamp_step) if optimizer == "adamp" else (ac.tree.sgdp_init,
                                                                                         ac.tree.sgdp_step)
    states = init(params)

    @jax.jit
    def train_step(params, states, batch):
        grads = jax.grad(_loss)(params, batch)
        return step(params, grads, states, lr=1e-2, weight_decay=1e-4)

    for t in range(STEPS):
        params, states = train_step(params, states, (x[8 * t : 8 * t + 8], y[8 * t : 8 * t + 8]))
    assert train_step._cache_size() == 1
