"""Captured and compiled optimizer steps on a real GPU (scripts/gpu_check.sh, step ``capture``; issue 24).

For AdamP and SGDP with ``capturable=True`` on each CUDA path (the default multi-tensor step, the Triton
kernels with ``fused="triton"``, the per-tensor step with ``foreach=False``), on ResNet-50's parameter shapes
(float32), with grads kept in the same tensors (copied in before each step, as a captured training step does):

1. ``graph``: ``optimizer.step()`` captured with ``torch.cuda.graph`` after warm-up steps on a side stream,
   replayed; params and state compared with an eager twin's, bit for bit, and ms per replay.
2. ``compiled``: ``torch.compile(optimizer.step, mode="reduce-overhead")`` (inductor + CUDA graphs); the same
   comparison (bit for bit recorded; within 1e-5 relative required: inductor generates its own arithmetic
   for the array-API paths), compile seconds and ms per step.
3. ``reference``: ``torch.optim.AdamW(fused=True, capturable=True)`` (SGDP: ``SGD(fused=True)``) eager and
   captured, ms per step, and the GPU kernel launches per step of every row (torch profiler).

    python scripts/gpu_capture_check.py OUT.json [--quick]

Exit status 0 when every row ran and matched, or without a CUDA device (skipped: the JSON says so).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "adapters")]

PATHS = {"multi_tensor": {}, "triton": {"fused": "triton"}, "per_tensor": {"foreach": False}}
KW = {"adamp": dict(lr=1e-3, weight_decay=1e-2), "sgdp": dict(lr=0.1, momentum=0.9, weight_decay=1e-4)}
STEPS, WARM = 6, 3


def _setup(make: Any, params_np: list[Any], grads_np: list[Any]) -> tuple[list[Any], list[Any], Any]:
    import torch

    ps = [torch.nn.Parameter(torch.from_numpy(p).cuda()) for p in params_np]
    gs = [torch.from_numpy(g).cuda() for g in grads_np]
    for p, g in zip(ps, gs, strict=True):
        p.grad = g.clone()
    return ps, gs, make(ps)


def _set_grads(ps: list[Any], gs: list[Any], k: int) -> None:
    import torch

    scale = 1.0 + 0.1 * k  # a different grad at each step, written into the same grad tensors
    torch._foreach_copy_([p.grad for p in ps], torch._foreach_mul(gs, scale))


def _compare(a: list[Any], b: list[Any], opt_a: Any, opt_b: Any) -> dict[str, Any]:
    import torch

    bitwise, worst = True, 0.0
    for p, q in zip(a, b, strict=True):
        pairs = [(p, q)] + [(v, opt_b.state[q][k]) for k, v in opt_a.state[p].items()]
        for x, y in pairs:
            bitwise &= bool(torch.equal(x, y))
            if x.dtype.is_floating_point:
                worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)))
    return dict(bitwise=bitwise, max_rel=worst)


def _ms(fn: Any, n: int = 20) -> float:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def _launches(fn: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        import torch

        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def _captured(opt: Any, ps: list[Any], gs: list[Any]) -> Any:
    """Warm-up steps on a side stream (state, plans, kernel tables made), then the step captured."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(WARM):
            _set_grads(ps, gs, k)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        opt.step()
    return g


def graph_row(make: Any, params_np: list[Any], grads_np: list[Any]) -> dict[str, Any]:
    """Captured vs eager: the eager twin takes the same steps (WARM warm-up, then STEPS replays)."""
    ps, gs, opt = _setup(make, params_np, grads_np)
    eps, egs, eopt = _setup(make, params_np, grads_np)
    g = _captured(opt, ps, gs)  # the capture itself does not run the step
    for k in range(WARM):
        _set_grads(eps, egs, k)
        eopt.step()
    for k in range(STEPS):
        _set_grads(ps, gs, WARM + k)
        g.replay()
        _set_grads(eps, egs, WARM + k)
        eopt.step()
    out = _compare(eps, ps, eopt, opt)
    out.update(replay_ms=_ms(g.replay), eager_ms=_ms(eopt.step), replay_launches=_launches(g.replay),
               eager_launches=_launches(eopt.step))
    return out


def compiled_row(make: Any, params_np: list[Any], grads_np: list[Any]) -> dict[str, Any]:
    import torch

    torch._dynamo.reset()
    ps, gs, opt = _setup(make, params_np, grads_np)
    eps, egs, eopt = _setup(make, params_np, grads_np)
    step = torch.compile(opt.step, mode="reduce-overhead")
    t0 = time.perf_counter()
    _set_grads(ps, gs, 0)
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    _set_grads(eps, egs, 0)
    eopt.step()
    for k in range(1, STEPS):
        _set_grads(ps, gs, k)
        step()
        _set_grads(eps, egs, k)
        eopt.step()
    out = _compare(eps, ps, eopt, opt)
    out.update(compile_s=compile_s, step_ms=_ms(step), launches=_launches(step))
    torch._dynamo.reset()
    return out


def reference_rows(optimizer: str, params_np: list[Any], grads_np: list[Any]) -> dict[str, Any]:
    import torch

    if optimizer == "adamp":
        def make(p):
            return torch.optim.AdamW(p, fused=True, capturable=True, **KW["adamp"])
    else:
        def make(p):
            return torch.optim.SGD(p, fused=True, **KW["sgdp"])
    ps, gs, opt = _setup(make, params_np, grads_np)
    g = _captured(opt, ps, gs)
    return dict(eager_ms=_ms(opt.step), replay_ms=_ms(g.replay), eager_launches=_launches(opt.step),
                replay_launches=_launches(g.replay))


def main(argv: list[str]) -> int:
    out = argv[0] if argv and not argv[0].startswith("-") else "gpu-capture-check.json"
    quick = "--quick" in argv
    import torch

    if not torch.cuda.is_available():  # a CPU machine: nothing to check, said so in the JSON
        print("gpu_capture_check: no CUDA device: skipped")
        with open(out, "w") as f:
            json.dump({"skipped": "no CUDA device"}, f)
        return 0
    import adamp_torch
    from adamp_core.paths import triton_fused
    from adamp_xp.bench.workloads import get_workload, host_data

    params_np, grads_np = host_data(get_workload("resnet50", 0.05 if quick else 1.0))
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    ok = True
    classes = {"adamp": adamp_torch.AdamP, "sgdp": adamp_torch.SGDP}
    for optimizer, cls in classes.items():
        for path, options in PATHS.items():
            if path == "triton" and not triton_fused.AVAILABLE:
                result["rows"][f"{optimizer}/{path}"] = {"skipped": "triton is not installed"}
                continue

            def make(p, cls=cls, options=options, optimizer=optimizer):
                return cls(p, capturable=True, **options, **KW[optimizer])

            for part, fn in (("graph", graph_row), ("compiled", compiled_row)):
                key = f"{optimizer}/{path}/{part}"
                t0 = time.perf_counter()
                try:
                    row = fn(make, params_np, grads_np)
                    row["ok"] = row["bitwise"] if part == "graph" else row["max_rel"] <= 1e-5
                except Exception:  # recorded, and the next row still runs
                    row = {"ok": False, "error": traceback.format_exc()[-3000:]}
                    print(row["error"], flush=True)
                row["seconds"] = round(time.perf_counter() - t0, 1)
                ok &= bool(row["ok"])
                result["rows"][key] = row
                print(f"{key}: {json.dumps(row)[:300]}", flush=True)
                with open(out, "w") as f:
                    json.dump(result, f, indent=2)
        try:
            result["rows"][f"{optimizer}/torch-reference"] = reference_rows(optimizer, params_np, grads_np)
        except Exception:
            result["rows"][f"{optimizer}/torch-reference"] = {"error": traceback.format_exc()[-3000:]}
            ok = False
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
