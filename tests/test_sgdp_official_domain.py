"""A drop-in never refuses what the package it replaces runs and means: ``adamp==0.3.0`` runs SGDP with
``nesterov=True`` and the default ``momentum=0`` (then plain SGD) and with a dampening (its own formula).
Every entry point runs them too, with a warning, and matches the official results; values outside the
mathematical domain stay refused (the bad-input tables)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
adamp = pytest.importorskip("adamp")

import adamp_array  # noqa: E402
import adamp_core as ac  # noqa: E402
import adamp_torch  # noqa: E402

CASES = [
    ("nesterov_momentum0", dict(lr=0.1, nesterov=True, weight_decay=1e-2)),
    ("nesterov_dampening", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, weight_decay=1e-2)),
]
SHAPES = [(6, 4, 3, 3), (5, 7), (5,)]
STEPS = 8


def _data():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) for s in SHAPES]
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def _official(hp):
    params, grads = _data()
    ps = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    opt = adamp.SGDP(ps, **hp)
    for gs in grads:
        for p, g in zip(ps, gs, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in ps]


@pytest.mark.parametrize("name,hp", CASES, ids=[c[0] for c in CASES])
def test_every_entry_point_runs_what_adamp_runs(name, hp):
    want = _official(hp)
    params, grads = _data()

    with pytest.warns(UserWarning, match=r"nesterov=True.*stepping as adamp 0\.3\.0 does"):
        ps = [torch.tensor(p, requires_grad=True) for p in params]
        opt = adamp_torch.SGDP(ps, **hp)
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = torch.tensor(g)
            opt.step()
    got = {"adamp_torch": [p.detach().numpy() for p in ps]}

    with pytest.warns(UserWarning, match=r"nesterov=True"):
        ws, ss = list(params), ac.tree.sgdp_init(list(params))
        for gs in grads:
            ws, ss = ac.tree.sgdp_step(ws, gs, ss, **hp)
    got["adamp_core.tree"] = ws

    with pytest.warns(UserWarning, match=r"nesterov=True"):
        arrays = [p.copy() for p in params]
        aopt = adamp_array.SGDP(arrays, **hp)
        for gs in grads:
            aopt.step(gs)
    got["adamp_array"] = aopt.params

    for entry, values in got.items():
        for w, v in zip(want, values, strict=True):
            np.testing.assert_allclose(np.asarray(v), w, rtol=1e-12, atol=1e-14, err_msg=entry)


def test_optax_runs_it_too():
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    import adamp_optax

    hp = dict(CASES[0][1])
    want = _official(hp)
    params, grads = _data()
    with pytest.warns(UserWarning, match=r"nesterov=True"):
        tx = adamp_optax.sgdp(hp.pop("lr"), **hp)
    ps = [jnp.asarray(p) for p in params]
    state = tx.init(ps)
    for gs in grads:
        updates, state = tx.update([jnp.asarray(g) for g in gs], state, ps)
        ps = optax.apply_updates(ps, updates)
    for w, v in zip(want, ps, strict=True):
        np.testing.assert_allclose(np.asarray(v), w, rtol=1e-10, atol=1e-12)
