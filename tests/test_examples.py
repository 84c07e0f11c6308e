"""The runnable examples in examples/ run as their docstrings say (a few steps each)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_torch_training_runs(optimizer, tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    example = load("torch_training")
    checkpoint = tmp_path / "checkpoint.pt"
    result = example.main(["--steps", "8", "--optimizer", optimizer, "--checkpoint", str(checkpoint)])
    out = capsys.readouterr().out
    assert math.isfinite(result["loss"]) and 0.0 <= result["accuracy"] <= 1.0
    assert "saved a checkpoint at step 4" in out and "test accuracy" in out
    assert checkpoint.exists()


def test_torch_training_resume_is_exact(tmp_path):
    """The checkpoint holds everything: resuming from it gives what the uninterrupted run gives."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    example = load("torch_training")
    torch.manual_seed(0)
    data, _ = example.load_data(0)
    model = example.make_model()
    optimizer = example.make_optimizer("adamp", model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
    example.train(model, optimizer, scheduler, data, 0, 8, 16, 0, 100)
    torch.manual_seed(0)
    resumed = example.make_model()
    opt = example.make_optimizer("adamp", resumed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    example.train(resumed, opt, sched, data, 0, 4, 16, 0, 100)
    state = {"model": resumed.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    torch.save(state, tmp_path / "c.pt")
    resumed = example.make_model()
    opt = example.make_optimizer("adamp", resumed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    example.train(resumed, opt, sched, data, 4, 8, 16, 0, 100)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
