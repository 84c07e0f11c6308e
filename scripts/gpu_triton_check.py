"""The fused Triton step on a real GPU (scripts/gpu_check.sh, step ``triton``; README "GPU check").

One process, in this order, each part timed and kept in the JSON even when a later one fails:

1. ``bench`` (its warm-up steps compile the kernels: seconds per variant, cached on disk by Triton): one
   AdamP and one SGDP step, ms/step (median of interleaved runs after warm-up) and the peak device memory
   one step adds, for ResNet-50's 161 parameter shapes and 2,000 small tensors:
   ``adamp_torch.AdamP(fused="triton")`` against ``torch.optim.AdamW(fused=True)`` (SGDP:
   ``SGD(fused=True)``), the official ``adamp`` 0.3.0 and the multi-tensor array-API step
   (``fused=False``), each with its GPU kernels and copies per step (torch profiler).
2. ``graph``: ``optimizer.step()`` of the Triton path captured in a CUDA graph with static grads, replayed;
   the same result as eager steps, bit for bit, and the replayed step's time.

    python scripts/gpu_triton_check.py OUT.json [--quick]

Exit status 0 when every part ran and the graph replayed to the eager result; 2 without a CUDA device.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "adapters")]

IMPLS = ("torch-fused", "official", "adamp_torch-foreach", "adamp_torch-triton")
WORKLOADS = ("resnet50", "small")


def _timed(runner: Any, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    runner.sync()
    return (time.perf_counter() - t0) / steps


def bench(quick: bool) -> list[dict[str, Any]]:
    """Every implementation on each workload, interleaved round by round (as adamp-xp bench)."""
    from adamp_xp.bench.measure import cuda_launches, extra_peak_bytes, launches
    from adamp_xp.bench.runners import GradCache, Unavailable, build_runner
    from adamp_xp.bench.workloads import get_workload

    rows = []
    for name in WORKLOADS:
        w = get_workload(name, 0.05 if quick else 1.0)
        cache = GradCache(w)
        for optimizer in ("adamp", "sgdp"):
            runners = {}
            for impl in IMPLS:
                try:
                    runners[impl] = build_runner(impl, optimizer, "torch:cuda", cache)
                    for _ in range(2):
                        runners[impl].step()
                    runners[impl].sync()
                except Unavailable as exc:
                    rows.append(dict(workload=name, optimizer=optimizer, impl=impl, status="skip", note=str(exc)))
            times: dict[str, list[float]] = {k: [] for k in runners}
            steps = {k: max(1, min(200, int(0.05 / max(_timed(r, 1), 1e-6)))) for k, r in runners.items()}
            for rnd in range(3 if quick else 5):
                order = list(runners)[rnd % len(runners):] + list(runners)[:rnd % len(runners)]
                for k in order:
                    times[k].append(_timed(runners[k], steps[k]))
            base = statistics.median(times["torch-fused"]) if "torch-fused" in times else None
            for k, r in runners.items():
                ms = statistics.median(times[k]) * 1e3
                row = dict(workload=name, optimizer=optimizer, impl=k, label=r.label, status="ok",
                           n_tensors=w.n_tensors, n_elements=w.n_elements, ms_per_step=ms,
                           runs_ms=[t * 1e3 for t in times[k]], steps_per_run=steps[k],
                           ratio_fused=None if base is None else ms / (base * 1e3))
                row["extra_peak_bytes"] = extra_peak_bytes(r.step, r.sync, "torch:cuda")
                row["cuda_launches"] = cuda_launches(r.step, r.sync)
                if k == "adamp_torch-triton":
                    row.update(launches(r.step))
                    r.sync()
                rows.append(row)
                print(f"{name:9s} {optimizer:5s} {r.label:48s} {ms:8.3f} ms  x{row['ratio_fused'] or 0:5.2f}  "
                      f"+{row['extra_peak_bytes'] / 2**20:7.1f} MiB  {row['cuda_launches']} GPU launches", flush=True)
            runners.clear()
    return rows


def graph(quick: bool) -> dict[str, Any]:
    """Capture AdamP(fused="triton").step() on ResNet-50's shapes with static grads; replay = eager."""
    import torch

    import adamp_torch
    from adamp_xp.bench.workloads import get_workload, host_data

    params, grads = host_data(get_workload("resnet50", 0.05 if quick else 1.0))
    twins = []
    for _ in range(2):
        ps = [torch.nn.Parameter(torch.from_numpy(p).cuda()) for p in params]
        for p, g in zip(ps, grads, strict=True):
            p.grad = torch.from_numpy(g).cuda()
        twins.append((ps, adamp_torch.AdamP(ps, lr=1e-3, weight_decay=1e-2, fused="triton")))
    (gp, ga), (ep, eb) = twins
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            ga.step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ga.step()
    for _ in range(3):
        eb.step()
    replays = 20
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        g.replay()
    torch.cuda.synchronize()
    replay_ms = (time.perf_counter() - t0) / replays * 1e3
    t0 = time.perf_counter()
    for _ in range(replays):
        eb.step()
    torch.cuda.synchronize()
    eager_ms = (time.perf_counter() - t0) / replays * 1e3
    same = all(torch.equal(a, b) for a, b in zip(gp, ep, strict=True))
    steps = (int(ga.state[gp[0]]["step"]), int(eb.state[ep[0]]["step"]))
    return dict(same_result=same and steps[0] == steps[1], steps=steps, replay_ms=replay_ms, eager_ms=eager_ms)


def main(argv: list[str]) -> int:
    out = argv[0] if argv and not argv[0].startswith("-") else "gpu-triton-check.json"
    quick = "--quick" in argv
    import torch

    if not torch.cuda.is_available():
        print("gpu_triton_check: no CUDA device")
        return 2
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError as exc:
        result["triton"] = f"absent: {exc}"
    ok = True
    for part, fn in (("bench", bench), ("graph", graph)):
        t0 = time.perf_counter()
        try:
            result[part] = fn(quick)
        except Exception:  # recorded, and the next part still runs
            result[part] = {"error": traceback.format_exc()[-3000:]}
            ok = False
            print(result[part]["error"], flush=True)
        result[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    g = result.get("graph", {})
    print(f"graph: same result {g.get('same_result')}, replay {g.get('replay_ms', 0):.3f} ms, eager "
          f"{g.get('eager_ms', 0):.3f} ms")
    return 0 if ok and g.get("same_result") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
