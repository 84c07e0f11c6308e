"""torch.func and torch.compile around the functional core: an ensemble stepped with ``vmap`` (params of
2 and 4 dims, projected) against the official ``adamp`` package model by model, and a compiled user
loop that traces the core without a warning."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
adamp = pytest.importorskip("adamp")

import adamp_core as ac  # noqa: E402


def _official_run(model, x, y, steps, **hp):
    opt = adamp.AdamP(model.parameters(), **hp)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {name: p.detach() for name, p in model.named_parameters()}


def test_vmap_ensemble_matches_official_per_model(run_recipe):
    ns = run_recipe("torch_func")
    originals = [copy.deepcopy(m) for m in ns["models"]]  # the recipe steps stacked copies: these hold the init
    params, states = ns["params"], ns["states"]
    assert params["0.weight"].shape == (4, 8, 3, 3, 3) and params["4.weight"].shape == (4, 10, 288)
    assert torch.equal(states["0.weight"].step, torch.full((4,), 5, dtype=torch.int32))
    for i, model in enumerate(originals):
        ref = _official_run(model, ns["x"], ns["y"], 5, lr=1e-2, weight_decay=1e-2)
        for name, want in ref.items():
            np.testing.assert_allclose(params[name][i].numpy(), want.numpy(), rtol=2e-5, atol=2e-6, err_msg=name)


def test_vmap_projects_per_member():
    """Each ensemble member takes its own view decision inside vmap: one member's weight is
    scale-invariant (grad orthogonal to it), the other's is not, and each equals its own unbatched step."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 6, 5, generator=g)
    grad = torch.randn(2, 6, 5, generator=g)
    grad[0] -= (grad[0] * w[0]).sum(1, keepdim=True) / (w[0] * w[0]).sum(1, keepdim=True) * w[0]  # orthogonal rows
    grad[1] = w[1] * 3.0  # radial: never projected
    state = torch.func.vmap(ac.adamp_init)(w)
    step = torch.func.vmap(lambda p, g, s: ac.adamp_step(p, g, s, lr=0.1, weight_decay=0.1))
    new_w, new_s = step(w, grad, state)
    views = [int(ac.projected_view(w[i], grad[i])) for i in range(2)]
    assert views == [ac.VIEW_CHANNEL, ac.VIEW_NONE]
    for i in range(2):
        want, _ = ac.adamp_step(w[i], grad[i], ac.adamp_init(w[i]), lr=0.1, weight_decay=0.1)
        torch.testing.assert_close(new_w[i], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_compiled_core_loop_is_quiet_and_exact(optimizer):
    """torch.compile(fullgraph=True) of a user step calling the core: no warning from the core or from
    array-api-compat (dynamo warned once per lru_cache-wrapped helper it traced: 28 in 4 steps), one
    graph for every step, the eager results."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    w0, grads = torch.randn(6, 4, 3, generator=g), torch.randn(4, 6, 4, 3, generator=g)
    if optimizer == "adamp":
        init, fn = ac.adamp_init, lambda p, gr, s: ac.adamp_step(p, gr, s, lr=0.01, weight_decay=0.1)
    else:
        init, fn = ac.sgdp_init, lambda p, gr, s: ac.sgdp_step(p, gr, s, lr=0.1, momentum=0.9, weight_decay=0.1)
    compiled = torch.compile(fn, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w, s = w0, init(w0)
        for gr in grads:
            w, s = compiled(w, gr, s)
    ours = [str(c.message) for c in caught if "lru_cache" in str(c.message) or "array_api_compat" in c.filename
            or "adamp_core" in c.filename]
    assert ours == []
    we, se = w0, init(w0)
    for gr in grads:
        we, se = fn(we, gr, se)
    torch.testing.assert_close(w, we, rtol=1e-5, atol=1e-6)
