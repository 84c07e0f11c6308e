"""Lightning and adamp_torch: a LightningModule whose ``configure_optimizers`` returns AdamP or SGDP with a
per-step scheduler trains as adamp 0.3.0 does in the same module, and ``trainer.fit(model, ckpt_path=...)``
from an epoch-end checkpoint ends where the uninterrupted fit ends.

Lightning resumes exactly only from an epoch boundary with an unshuffled loader (the recipe's), for
``torch.optim`` too: the test measures what torch's own optimizer (AdamW for AdamP, SGD for SGDP) achieves
under the same conditions and holds ours to that.
"""

from __future__ import annotations

import adamp
import lightning as L
import pytest
import torch

import adamp_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The reference optimizer of each recipe class, swapped in for ours (same module, scheduler, data):
# torch's own, and the official package.
CASES = {
    "Classifier": ("AdamP", adamp_torch.AdamP, torch.optim.AdamW, adamp.AdamP),
    "SGDPClassifier": ("SGDP", adamp_torch.SGDP, torch.optim.SGD, adamp.SGDP),
}


def _fit_and_resume(ns, cls_name, root, epochs=3, resume_after=1):
    """An uninterrupted fit of ``epochs`` epochs, and a fresh model resumed from the checkpoint at the end
    of epoch ``resume_after``; returns both modules and their trainers."""
    L.seed_everything(0, verbose=False)
    full = ns[cls_name]()
    t_full = ns["fit"](full, epochs, str(root / "full"))
    ckpts = sorted((root / "full" / "checkpoints").glob(f"epoch={resume_after - 1}-*.ckpt"))
    assert len(ckpts) == 1, ckpts
    L.seed_everything(1, verbose=False)  # a different init: everything must come from the checkpoint
    resumed = ns[cls_name]()
    t_resumed = ns["fit"](resumed, epochs, str(root / "resumed"), ckpt_path=str(ckpts[0]))
    assert t_full.global_step == t_resumed.global_step == epochs * len(ns["train_loader"]())
    return full, resumed, t_full, t_resumed


def _max_diff(a, b) -> float:
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("cls_name", list(CASES))
def test_lightning_resume_is_as_exact_as_torch_optim(run_recipe, tmp_path, cls_name):
    global_name, ours, torch_cls, official = CASES[cls_name]
    # torch's optimizer under the same conditions: what Lightning's resume achieves
    ns = run_recipe("lightning")
    ns[global_name] = torch_cls
    a, b, _, _ = _fit_and_resume(ns, cls_name, tmp_path / "torch")
    baseline = _max_diff(a, b)

    ns = run_recipe("lightning")
    full, resumed, t_full, t_resumed = _fit_and_resume(ns, cls_name, tmp_path / "ours")
    opt_full, opt_resumed = t_full.optimizers[0], t_resumed.optimizers[0]
    assert type(opt_full) is ours and type(opt_resumed) is ours
    assert _max_diff(full, resumed) <= baseline  # exact (0.0) where torch's optimizer resumes exactly
    if baseline == 0.0:
        for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(p, q)
            assert opt_full.state[p].keys() == opt_resumed.state[q].keys()
            for k, v in opt_full.state[p].items():
                assert torch.equal(v, opt_resumed.state[q][k]), k
    assert t_resumed.lr_scheduler_configs[0].scheduler.last_epoch == t_full.global_step  # the per-step scheduler

    # adamp 0.3.0 in the same module, uninterrupted: the same trajectory (float32 rounding apart)
    ns = run_recipe("lightning")
    ns[global_name] = official
    L.seed_everything(0, verbose=False)
    ref = ns[cls_name]()
    ns["fit"](ref, 3, str(tmp_path / "official"))
    L.seed_everything(0, verbose=False)
    init = ns[cls_name]()
    for (name, p), q, p0 in zip(full.named_parameters(), ref.parameters(), init.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p, p0), name  # it trained
