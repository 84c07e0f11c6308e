"""Torch operators dispatched by one warm ``optimizer.step()``: what a GPU step launches, counted on a CPU.

On a GPU each dispatched aten operator is (about) one kernel launch, so a step of hundreds of small tensors
costs its operator count in launch latency whatever the arithmetic. Here one warm step (state and plans
built by two earlier steps) runs under a :class:`torch.utils._python_dispatch.TorchDispatchMode` that counts
the top-level aten operators (a ``_foreach_*`` operator counts once: on a GPU it launches one kernel per chunk
of tensors), on tiny tensors (every dimension of the workload's shapes capped at
:data:`adamp_xp.bench.host.DIM_CAP`) with new grads every step (``zero_grad(set_to_none=True)``) and every
tensor in a multi-tensor group (``foreach=True``, as on a GPU). View operators (``view``, ``slice``,
``select``...) launch nothing on a GPU; they are counted apart.

``python -m adamp_xp.bench.ops`` prints the table; :func:`op_rows` returns its rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["OPS_ROWS", "count_step_ops", "format_ops", "main", "op_rows"]

OPS_ROWS = ("AdamW(foreach=True)", "AdamP(fused=False, foreach=True)", "SGD(foreach=True, momentum=0.9)",
            "SGDP(fused=False, foreach=True, momentum=0.9)")


def _factories(torch: Any) -> dict[str, Callable[[list[Any]], Any]]:
    import adamp_torch

    return {
        "AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "AdamP(fused=False, foreach=True)": lambda ps: adamp_torch.AdamP(ps, lr=1e-3, weight_decay=1e-2,
                                                                         fused=False, foreach=True),
        "SGD(foreach=True, momentum=0.9)": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
        "SGDP(fused=False, foreach=True, momentum=0.9)": lambda ps: adamp_torch.SGDP(
            ps, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=False, foreach=True),
    }


def _is_view(func: Any) -> bool:
    schema = func._schema
    return bool(schema.returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                        for r in schema.returns)


def count_step_ops(make: Callable[[list[Any]], Any], shapes: list[tuple[int, ...]], seed: int = 0,
                   warm_steps: int = 2) -> dict[str, Any]:
    """``ops`` (aten operators other than views), ``views`` and ``by_op`` (a :class:`collections.Counter`
    of operator names) dispatched by one step of ``make(params)`` after ``warm_steps`` steps, new grads
    before every step."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()
    views = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if _is_view(func):
                views[0] += 1
            else:
                counts[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = make(params)
    for k in range(warm_steps + 1):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if k < warm_steps:
            opt.step()
            continue
        with Count():
            opt.step()
    return {"ops": sum(counts.values()), "views": views[0], "by_op": counts}


def op_rows(workloads: tuple[str, ...] = ("resnet50", "small"), rows: tuple[str, ...] = OPS_ROWS,
            cap: int | None = None) -> list[dict[str, Any]]:
    """One dict per (workload, optimizer): ``workload``, ``n_tensors``, ``row``, ``ops``, ``views`` and
    ``ratio`` (all operators, views included, over those of torch's foreach optimizer of the family: AdamW for
    Adam rows, SGD for SGD rows). Tiny tensors: every dimension capped at ``cap`` (default
    :data:`adamp_xp.bench.host.DIM_CAP`)."""
    import torch

    from .host import DIM_CAP
    from .workloads import get_workload

    cap = DIM_CAP if cap is None else cap
    table = _factories(torch)
    out = []
    for name in workloads:
        w = get_workload(name, scale=1.0)
        shapes = [tuple(min(d, cap) for d in s) for s in w.shapes]
        got = {r: count_step_ops(table[r], shapes) for r in rows}
        for r in rows:
            ref = got.get("AdamW(foreach=True)" if "Adam" in r else "SGD(foreach=True, momentum=0.9)")
            total = got[r]["ops"] + got[r]["views"]
            out.append(dict(workload=name, n_tensors=len(shapes), row=r, ops=got[r]["ops"], views=got[r]["views"],
                            ratio=None if ref is None else total / (ref["ops"] + ref["views"])))
    return out


def format_ops(results: list[dict[str, Any]]) -> str:
    """A markdown table: ops (and views) per step, one column per workload."""
    cols = list(dict.fromkeys((r["workload"], r["n_tensors"]) for r in results))
    names = list(dict.fromkeys(r["row"] for r in results))
    cell = {(r["row"], r["workload"]): r for r in results}
    head = ["aten ops per warm step: all (of which views)"] + [f"{w} ({n:,} tiny tensors)" for w, n in cols]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(cols) + "|"]
    for name in names:
        cells = [name]
        for w, _ in cols:
            r = cell.get((name, w))
            ratio = "" if r is None or r["ratio"] is None else f" ({r['ratio']:.2f}x)"
            cells.append("-" if r is None else f"{r['ops'] + r['views']:,} ({r['views']:,}){ratio}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    import torch

    print(f"aten operators dispatched by one warm step, torch {torch.__version__}, new grads, every dimension "
          "capped at 4")
    print(format_ops(op_rows()))


if __name__ == "__main__":
    main()
