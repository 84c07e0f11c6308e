"""``torch.compile(optimizer.step)`` in real training loops (issue 24): with an LR scheduler (a 0-d tensor lr),
with ``torch.amp.GradScaler``, and a compiled run saved and resumed from a checkpoint; each against the same
loop with the eager step (float64 within 1e-12, float32 within 1e-5, relative) and with nothing compiled again
once warm. And transformers' ``Trainer(torch_compile=True)``: it compiles the model only (accelerate's
``TorchDynamoPlugin`` wraps the model; the optimizer's step runs eagerly, transformers 5.x), so the check is that
AdamP trains a compiled model as it trains the eager one.

The compiled steps use a counting backend (dynamo's graph run as traced): what is checked is the tracing, the
guards and the write-back; inductor's code is tested in tests/test_torch_compile.py.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import adamp_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


class Graphs:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).to(dtype)


def _data(n, dtype):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 10, (16,), generator=gen))
            for _ in range(n)]


def _close(a, b, dtype):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert ((p - q).abs().max() / p.abs().max().clamp_min(1e-30)).item() <= TOL[dtype]


def _loop(model, opt, step, data, *, sched=None, scaler=None, warm_from=None):
    """A training loop; from step ``warm_from`` on, a recompile raises."""
    for k, (x, y) in enumerate(data):
        if k == warm_from:
            frames = counters["stats"]["unique_graphs"]
        ctx = torch._dynamo.config.patch(error_on_recompile=warm_from is not None and k >= warm_from)
        with ctx:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        if sched is not None:
            sched.step()
    if warm_from is not None:
        assert counters["stats"]["unique_graphs"] == frames, "a frame compiled again once warm"


@pytest.mark.parametrize("cls, kw", [(adamp_torch.AdamP, dict(weight_decay=1e-2)),
                                     (adamp_torch.SGDP, dict(momentum=0.9, nesterov=True, weight_decay=1e-4))],
                         ids=["adamp", "sgdp"])
def test_compiled_step_with_a_scheduler_trains_as_eager(cls, kw):
    dtype = torch.float64
    models = [_model(dtype), _model(dtype)]
    opts = [cls(m.parameters(), lr=torch.tensor(0.05, dtype=dtype), **kw) for m in models]
    # cycle_momentum=False: a cycled momentum is a Python float changed at every step, which recompiles (as it
    # does for torch.optim's own optimizers); the lr, a 0-d tensor, is a graph input
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12, cycle_momentum=False)
              for o in opts]
    data = _data(12, dtype)
    graphs = Graphs()
    _loop(models[0], opts[0], opts[0].step, data, sched=scheds[0])
    _loop(models[1], opts[1], torch.compile(opts[1].step, backend=graphs), data, sched=scheds[1], warm_from=2)
    assert 1 <= len(graphs.graphs) <= 2
    _close(models[0], models[1], dtype)
    assert float(opts[1].param_groups[0]["lr"]) < 0.05 / 10  # the cycle ran down


def test_compiled_step_under_grad_scaler_trains_as_eager():
    """GradScaler (CPU, float32): scaler.step(opt) unscales, checks for infs and calls opt.step(), here the
    compiled one (assigned as torch's recipe does); an inf grad at step 3 skips that step in both runs."""
    dtype = torch.float32
    models = [_model(dtype), _model(dtype)]
    opts = [adamp_torch.AdamP(m.parameters(), lr=1e-2, weight_decay=1e-2) for m in models]
    graphs = Graphs()
    opts[1].step = torch.compile(opts[1].step, backend=graphs)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3) for _ in models]
    data = _data(10, dtype)
    x, y = data[3]
    data[3] = (x.clone().fill_(float("inf")), y)
    for m, o, s in zip(models, opts, scalers, strict=True):
        _loop(m, o, o.step, data, scaler=s)
    # grown after steps 0-2, halved at the inf step 3, grown after 4-6 and 7-9: 2^8 * 2 / 2 * 2 * 2
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**10
    _close(models[0], models[1], dtype)
    assert 1 <= len(graphs.graphs) <= 2  # the compiled step ran
    p = next(models[1].parameters())
    assert int(opts[1].state[p]["step"]) == 9  # the skipped step did not count


def test_a_compiled_run_resumes_from_its_checkpoint():
    """Six compiled steps == three compiled steps, torch.save / torch.load (weights_only) into a new model and
    optimizer, three more compiled steps; and == six eager steps."""
    dtype = torch.float64
    data = _data(6, dtype)
    full = _model(dtype)
    opt = adamp_torch.AdamP(full.parameters(), lr=1e-2, weight_decay=1e-2)
    _loop(full, opt, torch.compile(opt.step, backend=Graphs()), data)

    first = _model(dtype)
    opt1 = adamp_torch.AdamP(first.parameters(), lr=1e-2, weight_decay=1e-2)
    _loop(first, opt1, torch.compile(opt1.step, backend=Graphs()), data[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch._dynamo.reset()
    second = _model(dtype)
    second.load_state_dict(saved["model"])
    opt2 = adamp_torch.AdamP(second.parameters(), lr=1e-2, weight_decay=1e-2)
    opt2.load_state_dict(saved["opt"])
    _loop(second, opt2, torch.compile(opt2.step, backend=Graphs()), data[3:])
    for p, q in zip(full.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)
    eager = _model(dtype)
    opt_e = adamp_torch.AdamP(eager.parameters(), lr=1e-2, weight_decay=1e-2)
    _loop(eager, opt_e, opt_e.step, data)
    _close(eager, second, dtype)


def test_trainer_torch_compile_compiles_the_model_and_adamp_trains_it(run_recipe, tmp_path):
    """transformers' ``torch_compile=True``: the model is compiled (accelerate's dynamo plugin), the optimizer
    is not; AdamP trains the compiled model as it trains the eager one."""
    from transformers import Trainer, TrainingArguments

    ns = run_recipe("transformers_trainer")
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = ns["make_model"]()
        opt = adamp_torch.AdamP(model.parameters(), lr=1e-3, weight_decay=1e-2)
        args = TrainingArguments(output_dir=str(tmp_path / str(compiled)), max_steps=4, per_device_train_batch_size=8,
                                 seed=0, use_cpu=True, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                                 save_strategy="no", torch_compile=compiled,
                                 torch_compile_backend="aot_eager" if compiled else None)
        trainer = Trainer(model=model, args=args, train_dataset=ns["RandomTokens"](), optimizers=(opt, None))
        trainer.train()
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        assert type(inner) is adamp_torch.AdamP and inner.state
        assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule) == compiled
        runs[compiled] = {k: v.detach().clone() for k, v in model.named_parameters()}
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, rtol=1e-5, atol=1e-6, msg=k)
