"""Compiled optimizer steps (issue 24): ``torch.compile(optimizer.step)`` of AdamP and SGDP on each path,
beside compiled ``torch.optim.AdamW`` / ``SGD`` and the eager rows, in one run, with the compile time.

Every row steps the same workload (``adamp_xp.bench.workloads``: params and grads made once; each optimizer
gets fresh copies). A compiled row's first call compiles (its time is ``compile_s``: the first step, state
creation included); then ``steps`` warm steps are timed (median of ``repeats`` rounds, the rows of one
optimizer interleaved), with the grads kept (as after ``loss.backward()`` into existing ``.grad``). Rows:

- ``adamp_torch.AdamP()`` compiled: on a CPU its default (``fused=None``) calls the numba kernels as one
  operator (``torch.ops.adamp_xp.numba_step``); ``fused=False`` lets inductor generate the array-API step.
- ``torch.optim.AdamW(foreach=True)`` compiled (torch's recipe), ``AdamW(fused=True)`` eager and our eager
  default; the same for SGDP beside ``torch.optim.SGD``.

``python -m adamp_xp.bench.compiled [--workload resnet50] [--steps 20] [--optimizer adamp,sgdp]
[--backend inductor] [--threads N] [--warm-cache]`` prints the table (compile times cold: a fresh inductor
cache folder, unless ``--warm-cache``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any, NamedTuple

__all__ = ["Row", "main", "run"]


class Row(NamedTuple):
    name: str  # what ran
    compiled: bool
    compile_s: float | None  # the first (compiling) call, seconds; None for eager rows
    step_ms: float  # median warm step, milliseconds
    path: str  # the path of ours the step took ("numba op", "inductor", ...), or "torch"


def _rows_for(optimizer: str) -> list[tuple[str, bool, Any, str]]:
    import torch

    import adamp_torch

    if optimizer == "adamp":
        ours = adamp_torch.AdamP
        kw: dict[str, Any] = dict(lr=1e-3, weight_decay=1e-2)
        return [
            ("AdamP() compiled", True, lambda p: ours(p, **kw), "numba op"),
            ("AdamP(fused=False) compiled", True, lambda p: ours(p, fused=False, **kw), "inductor"),
            ("AdamW(foreach=True) compiled", True, lambda p: torch.optim.AdamW(p, foreach=True, **kw), "torch"),
            ("AdamP() eager", False, lambda p: ours(p, **kw), "numba"),
            ("AdamW(fused=True) eager", False, lambda p: torch.optim.AdamW(p, fused=True, **kw), "torch"),
        ]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    return [
        ("SGDP() compiled", True, lambda p: adamp_torch.SGDP(p, **kw), "numba op"),
        ("SGDP(fused=False) compiled", True, lambda p: adamp_torch.SGDP(p, fused=False, **kw), "inductor"),
        ("SGD(foreach=True) compiled", True, lambda p: torch.optim.SGD(p, foreach=True, **kw), "torch"),
        ("SGDP() eager", False, lambda p: adamp_torch.SGDP(p, **kw), "numba"),
        ("SGD(fused=True) eager", False, lambda p: torch.optim.SGD(p, fused=True, **kw), "torch"),
    ]


def run(workload: str = "resnet50", optimizers: tuple[str, ...] = ("adamp", "sgdp"), steps: int = 20,
        repeats: int = 3, backend: str = "inductor", scale: float | None = None) -> list[Row]:
    """Time every row (see the module docstring) on ``workload``; returns the rows. An optimizer's rows are
    built (and compiled) first, then timed in interleaved rounds (``repeats`` rounds of ``steps`` steps of
    each row, the median round kept), so that a busy machine slows every row alike."""
    import torch
    import torch._dynamo

    from .workloads import get_workload, host_data

    wl = get_workload(workload, scale)
    params_np, grads_np = host_data(wl)
    rows = []
    for optimizer in optimizers:
        built = []
        for name, compiled, make, path in _rows_for(optimizer):
            params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params_np]
            for p, g in zip(params, grads_np, strict=True):
                p.grad = torch.from_numpy(g.copy())
            opt = make(params)
            step = torch.compile(opt.step, backend=backend) if compiled else opt.step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                step()
                first = time.perf_counter() - t0
                step()
            built.append((name, compiled, first, path, step, []))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(repeats):
                for *_, step, times in built:
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        step()
                    times.append((time.perf_counter() - t0) / steps)
        rows += [Row(name, compiled, first if compiled else None, 1e3 * statistics.median(times), path)
                 for name, compiled, first, path, _, times in built]
        del built
    torch._dynamo.reset()
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'optimizer':<32} {'path':<10} {'compile s':>9} {'ms/step':>9}"]
    for r in rows:
        c = f"{r.compile_s:9.1f}" if r.compile_s is not None else f"{'-':>9}"
        lines.append(f"{r.name:<32} {r.path:<10} {c} {r.step_ms:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adamp_xp.bench.compiled", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="resnet50")
    ap.add_argument("--optimizer", default="adamp,sgdp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep inductor's on-disk caches (default: a fresh cache folder, so compile_s is cold)")
    args = ap.parse_args(argv)
    if not args.warm_cache:  # before torch._inductor reads it
        import os
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="adamp-xp-bench-inductor-")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    rows = run(args.workload, tuple(args.optimizer.split(",")), args.steps, args.repeats, args.backend, args.scale)
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
