"""transformers' Trainer (with accelerate) and adamp_torch: `optimizers=(AdamP(...), scheduler)` trains
as the official adamp 0.3.0 does in the same Trainer, and `train(resume_from_checkpoint=...)` from a
mid-run checkpoint, in a new Trainer with a fresh model and optimizer, ends where the uninterrupted run
ends. (Before the fix of issue 15 the resume raised: accelerate loads the optimizer's state dict once
when it wraps it, and the checkpoint's load was the second.)"""

from __future__ import annotations

import adamp
import pytest
import torch
from transformers import Trainer  # noqa: F401  (the real client, imported here: fail loudly when absent)

import adamp_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HP = {
    "adamp": dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2),
    "sgdp": dict(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True),
}


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def _optimizer(trainer):
    """The user's optimizer under accelerate's AcceleratedOptimizer."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _resume_is_exact(run_recipe, tmp_path, ours, official):
    ns = run_recipe("transformers_trainer")
    ns["make_optimizer"] = lambda model: ours(model.parameters(), **HP[ours.__name__.lower()])
    full = ns["train"](str(tmp_path / "full"))
    resumed = ns["train"](str(tmp_path / "resumed"), resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert full.state.global_step == resumed.state.global_step == 8
    assert type(_optimizer(resumed)) is ours
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exact: same data order, dropout RNG and scheduler
    sa, sb = _optimizer(full).state_dict()["state"], _optimizer(resumed).state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key, v in sa[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][key])), (i, key)
    # The independent reference: adamp 0.3.0 in the same Trainer, uninterrupted (float32 rounding apart)
    ns["make_optimizer"] = lambda model: official(model.parameters(), **HP[ours.__name__.lower()])
    ref = _params(ns["train"](str(tmp_path / "official"), max_steps=8))
    init = dict(ns["make_model"]().named_parameters())
    for k in a:
        torch.testing.assert_close(a[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(not torch.equal(a[k], init[k]) for k in a if "encoder" in k)  # it trained


def test_trainer_adamp_resumes_exactly(run_recipe, tmp_path):
    _resume_is_exact(run_recipe, tmp_path, adamp_torch.AdamP, adamp.AdamP)


def test_trainer_sgdp_resumes_exactly(run_recipe, tmp_path):
    _resume_is_exact(run_recipe, tmp_path, adamp_torch.SGDP, adamp.SGDP)
