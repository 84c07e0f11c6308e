"""adamp_torch in torch's own checkpoint and mixed-precision machinery.

- ``torch.save`` / ``torch.load(weights_only=True)`` (torch >= 2.6's default) of AdamP and SGDP with a
  ``state_dtype=torch.float32`` group over bfloat16 params and a ``skip_nonfinite=True`` group that has
  skipped a step: the restored optimizer continues exactly as the uninterrupted one.
- ``torch.amp.GradScaler``: a step with an inf gradient is skipped leaving params and optimizer state
  bit-identical, the scale backs off, and the next finite step proceeds: as torch's own optimizer (AdamW,
  SGD) under the same scaler, and as adamp 0.3.0 under it.
"""

from __future__ import annotations

import copy

import adamp
import pytest
import torch

import adamp_torch

HP = {
    "adamp": dict(lr=1e-2, weight_decay=1e-2, nesterov=True),
    "sgdp": dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
}
OURS = {"adamp": adamp_torch.AdamP, "sgdp": adamp_torch.SGDP}
OFFICIAL = {"adamp": adamp.AdamP, "sgdp": adamp.SGDP}
TORCH = {"adamp": torch.optim.AdamW, "sgdp": torch.optim.SGD}


# ---------------------------------------------------------------------------------------------
# torch.save / torch.load(weights_only=True)


def _params():
    g = torch.Generator().manual_seed(0)
    return {
        "conv": torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=g)),
        "bias": torch.nn.Parameter(torch.randn(4, generator=g)),
        "emb": torch.nn.Parameter(torch.randn(6, 5, generator=g).to(torch.bfloat16)),
        "scale": torch.nn.Parameter(torch.randn(5, generator=g).to(torch.bfloat16)),
    }


def _optimizer(name, ps):
    return OURS[name](
        [
            {"params": [ps["conv"], ps["bias"]], "skip_nonfinite": True},
            {"params": [ps["emb"], ps["scale"]], "state_dtype": torch.float32},
        ],
        **HP[name],
    )


def _grads(t):
    """The gradients of step ``t``; step 2 has an inf in the conv's (a skip_nonfinite group)."""
    g = torch.Generator().manual_seed(100 + t)
    out = {k: torch.randn(p.shape, generator=g).to(p.dtype) for k, p in _params().items()}
    if t == 2:
        out["conv"][1, 0, 0, 0] = float("inf")
    return out


def _run(ps, opt, steps):
    for t in steps:
        for k, g in _grads(t).items():
            ps[k].grad = g
        opt.step()


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_weights_only_checkpoint_resumes_exactly(name, tmp_path):
    ps, opt = _params(), None
    opt = _optimizer(name, ps)
    _run(ps, opt, range(4))
    path = tmp_path / "ckpt.pt"
    torch.save({"params": {k: p.detach() for k, p in ps.items()}, "optimizer": opt.state_dict()}, path)

    ckpt = torch.load(path, weights_only=True)  # the safe unpickler: plain types, tensors and dtypes only
    assert ckpt["optimizer"]["param_groups"][1]["state_dtype"] is torch.float32
    ps2 = _params()
    with torch.no_grad():
        for k, v in ckpt["params"].items():
            ps2[k].copy_(v)
    opt2 = _optimizer(name, ps2)
    opt2.load_state_dict(ckpt["optimizer"])

    _run(ps, opt, range(4, 8))
    _run(ps2, opt2, range(4, 8))
    for k in ps:
        assert torch.equal(ps[k], ps2[k]) and ps2[k].dtype == ps[k].dtype, k
        st, st2 = opt.state[ps[k]], opt2.state[ps2[k]]
        assert st.keys() == st2.keys(), k
        for key, v in st.items():
            assert torch.equal(v, st2[key]) and v.dtype == st2[key].dtype, (k, key)
    buf = "exp_avg" if name == "adamp" else "momentum"
    assert opt2.state[ps2["emb"]][buf].dtype == torch.float32  # state_dtype kept over bfloat16 params
    assert int(opt2.state[ps2["conv"]]["nonfinite_skips"]) == 1  # the skip of step 2, carried over
    if name == "adamp":  # the skipped step is not counted; torch.load gave back a 0-d int64 tensor
        assert opt2.state[ps2["conv"]]["step"].dtype == torch.int64
        assert int(opt2.state[ps2["conv"]]["step"]) == 7 and int(opt2.state[ps2["bias"]]["step"]) == 8


# ---------------------------------------------------------------------------------------------
# torch.amp.GradScaler


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16, bias=False),
        torch.nn.LayerNorm(16),  # the first weight is scale-invariant: AdamP/SGDP project its update
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )


def _loss(model, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def _same(a, b) -> bool:
    pa, sa = a
    pb, sb = b
    if not all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True)) or sa.keys() != sb.keys():
        return False
    return all(
        sa[i].keys() == sb[i].keys()
        and all(torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][k])) for k, v in sa[i].items())
        for i in sa
    )


def _scaled_run(cls, name, steps=(0, 1, 2), inf_at=1):
    """Steps through a GradScaler; at ``inf_at`` one grad entry is inf. Returns the model, optimizer,
    scaler, and the snapshots before and after the inf step (or None without one)."""
    model = _model()
    kwargs = HP[name] if cls is not torch.optim.AdamW else {k: v for k, v in HP[name].items() if k != "nesterov"}
    opt = cls(model.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = after = None
    for t in steps:
        opt.zero_grad()
        scaler.scale(_loss(model, t)).backward()
        if t == inf_at:
            model[0].weight.grad[2, 3] = float("inf")
            before = _snapshot(model, opt)
        scaler.step(opt)
        if t == inf_at:
            after = _snapshot(model, opt)
        scaler.update()
    return model, opt, scaler, before, after


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_grad_scaler_skips_an_inf_step_as_torch_optim(name):
    ours = _scaled_run(OURS[name], name)
    ref = _scaled_run(TORCH[name], name)
    # the inf step: skipped, params and state untouched (bit-identical), as for torch's optimizer
    assert _same(ref[3], ref[4])
    assert _same(ours[3], ours[4])
    assert ours[2].get_scale() == ref[2].get_scale() == 2.0**9  # backed off once, for both
    # the finite steps around it: as if the inf step had never happened (power-of-two scales are exact),
    # held to what torch's optimizer achieves under the same scaler
    ours_plain = _scaled_run(OURS[name], name, steps=(0, 2), inf_at=None)
    ref_plain = _scaled_run(TORCH[name], name, steps=(0, 2), inf_at=None)
    torch_exact = all(torch.equal(p, q) for p, q in zip(ref[0].parameters(), ref_plain[0].parameters(), strict=True))
    for p, q in zip(ours[0].parameters(), ours_plain[0].parameters(), strict=True):
        if torch_exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if name == "adamp":  # the skipped step is not counted, as in AdamW's state
        assert (
            {int(s["step"]) for s in ours[1].state.values()} == {int(s["step"]) for s in ref[1].state.values()} == {2}
        )
    # and adamp 0.3.0 under the same scaler: the same trajectory (float32 rounding apart)
    official = _scaled_run(OFFICIAL[name], name)
    assert _same(official[3], official[4])
    for p, q in zip(ours[0].parameters(), official[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[0][0].weight, _model()[0].weight)  # it trained
