"""``adamp-xp bench --host``: the host's work of one optimizer step, the figure that decides a GPU step.

On a GPU a step of a fused optimizer is a few kernel launches; the Python around them (checks, grouping,
address tables, argument packing) runs on the host while the device waits, so it is measured apart, on tiny
tensors (every dimension of the workload's shapes capped at :data:`DIM_CAP`: the tensor count and kinds stay,
the arithmetic vanishes), one intra-op thread, and the Triton path with its launches stubbed
(:func:`adamp_core.paths.triton_fused.stubbed`: everything but the kernels runs). Every row of one table is
measured in the same run, round-robin, so the ratios to ``AdamW(fused=True)`` hold under a varying load.

Two grad regimes: ``persistent`` (the same grad tensors every step, as ``zero_grad(set_to_none=False)`` or
gradient accumulation leave them) and ``new`` (new grad tensors every step: torch's default
``zero_grad(set_to_none=True)``; their creation is not timed). ``gc/step``: garbage collections per step
(a step that creates Python objects per tensor triggers the collector every few hundred tensors).
"""

from __future__ import annotations

import gc
import importlib.util
import time
from collections.abc import Callable
from typing import Any

__all__ = ["DIM_CAP", "ROWS", "host_rows", "measure_host"]

DIM_CAP = 4


def _rows(torch: Any) -> dict[str, tuple[str, Callable[[list[Any]], Any]]]:
    """name -> (optimizer family, factory over a param list)."""
    import adamp_torch

    rows: dict[str, tuple[str, Callable[[list[Any]], Any]]] = {
        "AdamW(fused=True)": ("adamp", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        "AdamW(foreach=True)": ("adamp", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        "SGD(fused=True)": ("sgdp", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True)),
        "AdamP (numba, default)": ("adamp", lambda ps: adamp_torch.AdamP(ps, lr=1e-3)),
        "AdamP(fused='triton'), stubbed": ("adamp", lambda ps: adamp_torch.AdamP(ps, lr=1e-3, fused="triton")),
        "AdamP(fused=False) multi-tensor": ("adamp", lambda ps: adamp_torch.AdamP(ps, lr=1e-3, fused=False)),
        "SGDP (numba, default)": ("sgdp", lambda ps: adamp_torch.SGDP(ps, lr=0.1, momentum=0.9)),
        "SGDP(fused='triton'), stubbed": ("sgdp", lambda ps: adamp_torch.SGDP(ps, lr=0.1, momentum=0.9,
                                                                             fused="triton")),
    }
    from adamp_core.paths import triton_fused

    if not triton_fused.AVAILABLE:  # fused="triton" needs triton installed, even stubbed
        rows = {k: v for k, v in rows.items() if "triton" not in k}
    if importlib.util.find_spec("adamp") is not None:
        import adamp

        rows["adamp 0.3.0 AdamP"] = ("adamp", lambda ps: adamp.AdamP(ps, lr=1e-3))
    return rows


ROWS = ("AdamW(fused=True)", "AdamW(foreach=True)", "SGD(fused=True)", "adamp 0.3.0 AdamP", "AdamP (numba, default)",
        "AdamP(fused='triton'), stubbed", "AdamP(fused=False) multi-tensor", "SGDP (numba, default)",
        "SGDP(fused='triton'), stubbed")


def _tiny(shapes: Any) -> list[tuple[int, ...]]:
    return [tuple(min(d, DIM_CAP) for d in s) for s in shapes]


def measure_host(rows: dict[str, Callable[[list[Any]], Any]], shapes: list[tuple[int, ...]], new_grads: bool,
                 steps: int, repeats: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per row: ``ms`` (the fastest repeat's mean host time of a step) and ``gc`` (collections per step),
    all rows interleaved repeat by repeat."""
    import torch

    from adamp_core.paths import triton_fused

    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen) for s in shapes]
    setups = {}
    for name, make in rows.items():
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = make(params)
        setups[name] = (params, opt)
    pool = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]  # new grads alternate between two
    best = {name: float("inf") for name in rows}
    collections = {name: 0 for name in rows}
    count = [0]

    def on_gc(phase: str, info: Any) -> None:
        if phase == "start":
            count[0] += 1

    with triton_fused.stubbed():
        for params, opt in setups.values():  # warm-up: state, plans, compilation
            for p, g in zip(params, pool[0], strict=True):
                p.grad = g.clone()
            for _ in range(3):
                opt.step()
        gc.callbacks.append(on_gc)
        try:
            for _ in range(repeats):
                for name, (params, opt) in setups.items():
                    grads = [[g.clone() for g in pool[k % 2]] for k in range(steps)] if new_grads else None
                    count[0] = 0
                    total = 0.0
                    for k in range(steps):
                        if grads is not None:
                            for p, g in zip(params, grads[k], strict=True):
                                p.grad = g
                        t0 = time.perf_counter()
                        opt.step()
                        total += time.perf_counter() - t0
                    best[name] = min(best[name], total / steps * 1e3)
                    collections[name] += count[0]
        finally:
            gc.callbacks.remove(on_gc)
    return {name: {"ms": best[name], "gc": collections[name] / (steps * repeats)} for name in rows}


def host_rows(workloads: list[Any], steps: int = 30, repeats: int = 5,
              only: list[str] | None = None) -> list[dict[str, Any]]:
    """Every row on each workload's tiny shapes, persistent and new grads: a list of result dicts."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = _rows(torch)
        names = [n for n in ROWS if n in table and (only is None or n in only)]
        out = []
        for w in workloads:
            shapes = _tiny(w.shapes)
            for new_grads in (False, True):
                res = measure_host({n: table[n][1] for n in names}, shapes, new_grads, steps, repeats)
                ref = {"adamp": res.get("AdamW(fused=True)", {}).get("ms"), "sgdp": res.get("SGD(fused=True)",
                                                                                             {}).get("ms")}
                for n in names:
                    r = res[n]
                    base = ref[table[n][0]]
                    out.append(dict(workload=w.name, n_tensors=w.n_tensors, grads="new" if new_grads else "persistent",
                                    row=n, ms=r["ms"], gc_per_step=r["gc"],
                                    ratio=None if not base else r["ms"] / base))
        return out
    finally:
        torch.set_num_threads(threads)


def format_host(results: list[dict[str, Any]]) -> str:
    """A markdown table: one line per row, one column per (workload, grads), ms and the ratio to the fused
    torch optimizer of its family (AdamW for AdamP rows, SGD for SGDP rows)."""
    cols = list(dict.fromkeys((r["workload"], r["n_tensors"], r["grads"]) for r in results))
    names = list(dict.fromkeys(r["row"] for r in results))
    cell = {(r["row"], r["workload"], r["grads"]): r for r in results}
    head = ["step, host time (1 thread)"] + [f"{w} ({n:,} tensors), {g} grads" for w, n, g in cols]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(cols) + "|"]
    for name in names:
        out = [name]
        for w, _, g in cols:
            r = cell.get((name, w, g))
            if r is None:
                out.append("-")
                continue
            ratio = "" if r["ratio"] is None else f" ({r['ratio']:.2f}x)"
            gcs = f", gc {r['gc_per_step']:.2f}" if r["gc_per_step"] >= 0.05 else ""
            out.append(f"{r['ms']:.3f} ms{ratio}{gcs}")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)
