"""No step reads a device value on the host: the paths a GPU takes (the Triton kernels, the multi-tensor and
per-tensor array-API steps), cold and warm, with ``skip_nonfinite``, ``caution`` and ``capturable``, eager and
compiled (``torch.compile(opt.step)``), run under a dispatch mode
that fails on every operator that hands a tensor's value to Python (``item``, ``bool``, ``tolist``, an
``if`` on a tensor). On a CPU the numba kernels read CPU memory by design (it is the host's); a GPU never
runs them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import adamp_torch  # noqa: E402
from adamp_core.paths import triton_fused  # noqa: E402

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
         torch.ops.aten.equal.default}


class NoHostRead(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            raise AssertionError(f"a host read during step(): {func}")
        return func(*args, **(kwargs or {}))


PATHS = {
    "multi-tensor, tensor lr": dict(fused=False),
    "capturable, multi-tensor, tensor lr": dict(fused=False, capturable=True),
    "capturable, per-tensor, skip_nonfinite": dict(fused=False, foreach=False, capturable=True, skip_nonfinite=True),
    "capturable, triton": dict(fused="triton", capturable=True),
    "per-tensor, tensor lr": dict(fused=False, foreach=False),
    "multi-tensor, skip_nonfinite, caution": dict(fused=False, skip_nonfinite=True, caution=True),
    "triton": dict(fused="triton"),
    "triton, skip_nonfinite, caution": dict(fused="triton", skip_nonfinite=True, caution=True),
}


@pytest.mark.parametrize("kw", list(PATHS.values()), ids=list(PATHS))
@pytest.mark.parametrize("cls", [adamp_torch.AdamP, adamp_torch.SGDP], ids=["adamp", "sgdp"])
def test_a_step_reads_no_device_value(cls, kw, monkeypatch):
    if kw["fused"] == "triton":
        if not triton_fused.AVAILABLE:
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors through Triton's interpreter
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3, 2), (4,), (5, 6), ()]]
    # the Triton kernels take Python-number hyperparameters; the array-API paths a 0-d tensor lr too
    lr = 0.01 if kw["fused"] == "triton" else torch.tensor(0.01)
    extra = {"momentum": 0.9} if cls is adamp_torch.SGDP else {}
    opt = cls(params, lr=lr, **kw, **extra)
    before = [p.detach().clone() for p in params]
    for _ in range(2):  # the first step builds state and plans, the second reuses them
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with NoHostRead():
            opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params[:3], before[:3], strict=True))


def test_the_mode_sees_a_host_read():
    """The check itself: an ``item`` (what a sync would be on a GPU) fails."""
    with pytest.raises(AssertionError, match="host read"), NoHostRead():
        torch.ones(()).item()


COMPILED = {
    "array-API step, tensor lr": dict(fused=False),
    "capturable, skip_nonfinite, caution": dict(fused=False, capturable=True, skip_nonfinite=True, caution=True),
    "maximize, nesterov": dict(fused=False, maximize=True, nesterov=True),
}


@pytest.mark.parametrize("kw", list(COMPILED.values()), ids=list(COMPILED))
@pytest.mark.parametrize("cls", [adamp_torch.AdamP, adamp_torch.SGDP], ids=["adamp", "sgdp"])
def test_a_compiled_step_reads_no_device_value(cls, kw):
    """torch.compile(opt.step) (compiled, then warm steps run under the mode): the graph holds no host read,
    and running it reads none."""
    import torch._dynamo

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3, 2), (4,), (5, 6), ()]]
    extra = {"momentum": 0.9} if cls is adamp_torch.SGDP else {}
    opt = cls(params, lr=torch.tensor(0.01), **kw, **extra)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(opt.step, backend=backend)
    for k in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if k == 0:
            step()  # compiles
            continue
        with NoHostRead(), torch._dynamo.config.patch(error_on_recompile=True):
            step()
    code = "".join(g.code for g in graphs)
    assert graphs and ".item()" not in code and "tolist" not in code
    torch._dynamo.reset()
