"""Long run (issue 9): 10,000 steps of AdamP and SGDP on a scale-invariant toy: the core in float64 NumPy
(nesterov) and adamp_torch on a float32 param (plain momentum).

The toy: rows ``w_r`` of a weight followed by a normalisation, loss
:math:`L = \\tfrac12\\sum_r \\lVert w_r/\\lVert w_r\\rVert - t_r\\rVert^2` plus noise, so every gradient
is orthogonal to its row (the situation the paper is about). Over 10,000 noisy steps nothing may
become NaN or inf, the weight norms must stay within a factor 2 of where they started (the projection
removes the radial part of the momentum, and decoupled weight decay balances the growth that is left:
for SGDP the balance is near (lr |q|^2 (1 - mu) / (2 wd wd_ratio))^(1/4), about 1.4 times the start
here), and the loss must actually go down.
"""

from __future__ import annotations

import numpy as np
import pytest

import adamp_core as ac

STEPS = 10_000
ROWS, COLS = 8, 16


def _grad(w, targets, rng, noise):
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    n = w / norms
    direction = -(targets + noise * rng.standard_normal(w.shape))
    g = direction - np.sum(direction * n, axis=1, keepdims=True) * n  # (I - n n^T) d: orthogonal to w_r
    return g / norms


def _loss(w, targets):
    n = w / np.linalg.norm(w, axis=1, keepdims=True)
    return 0.5 * float(np.sum((n - targets) ** 2))


HPS = {
    "adamp-nesterov": ("adamp", dict(lr=1e-3, weight_decay=1e-2, nesterov=True)),
    "sgdp-nesterov": ("sgdp", dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "adamp": ("adamp", dict(lr=1e-3, weight_decay=1e-2)),
    "sgdp": ("sgdp", dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
}


def _core_stepper(optimizer, hp, w):
    init, step = (ac.adamp_init, ac.adamp_step) if optimizer == "adamp" else (ac.sgdp_init, ac.sgdp_step)
    box = {"w": w, "s": init(w)}

    def step_fn(g):
        box["w"], box["s"] = step(box["w"], g, box["s"], **hp)
        return box["w"]

    return step_fn, lambda: [np.asarray(x) for x in box["s"]]


def _torch_stepper(optimizer, hp, w):
    """adamp_torch on a float32 param (its fastest path on CPU), fed the float64 toy's gradient in float32."""
    torch = pytest.importorskip("torch")
    import adamp_torch

    p = torch.nn.Parameter(torch.from_numpy(w.astype(np.float32)))
    opt = (adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP)([p], **hp)

    def step_fn(g):
        p.grad = torch.from_numpy(g.astype(np.float32))
        opt.step()
        return p.detach().numpy().astype(np.float64)

    return step_fn, lambda: [v.numpy() for v in opt.state[p].values() if v.ndim > 0]


@pytest.mark.parametrize(
    "entry,case",
    [
        ("core-float64", "adamp-nesterov"),
        ("core-float64", "sgdp-nesterov"),
        ("torch-float32", "adamp"),
        ("torch-float32", "sgdp"),
    ],
)
def test_ten_thousand_steps_stay_finite_and_bounded(entry, case):
    optimizer, hp = HPS[case]
    rng = np.random.default_rng(0)
    targets = rng.standard_normal((ROWS, COLS))
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    w = rng.standard_normal((ROWS, COLS))
    step_fn, state_arrays = (_core_stepper if entry == "core-float64" else _torch_stepper)(optimizer, hp, w)
    norm0 = np.linalg.norm(w, axis=1)
    lo, hi = norm0.copy(), norm0.copy()
    loss0 = _loss(w, targets)
    projected = 0
    for t in range(STEPS):
        gw = _grad(w, targets, rng, noise=0.5)
        if t % 500 == 0:
            projected += int(ac.projected_view(w, gw)) == ac.VIEW_CHANNEL
        w = step_fn(gw)
        if t % 100 == 99:
            assert np.all(np.isfinite(w)), t
            norms = np.linalg.norm(w, axis=1)
            lo, hi = np.minimum(lo, norms), np.maximum(hi, norms)
    for x in state_arrays():
        assert np.all(np.isfinite(x))
    assert np.all(hi <= 2 * norm0) and np.all(lo >= 0.5 * norm0), (lo / norm0, hi / norm0)
    assert projected == STEPS // 500  # the gradients are orthogonal: the channel view is projected
    assert _loss(w, targets) < 0.25 * loss0
