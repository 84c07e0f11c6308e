"""``adamp-xp bench``: every installed backend and the reference optimizers on the same workload.

This module is the command: its arguments, its settings and the printed tables. The measurement
itself (rows built once, then timed round-robin, interleaved) is :mod:`adamp_xp.bench.measure`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import time
from typing import Any

from .measure import configure_threads, measure
from .runners import (
    ENV_JAX_CACHE,
    HYPERPARAMS,
    IMPLS,
    OFFICIAL,
    OPTIMIZERS,
    GradCache,
    device_backends,
    enable_jax_compilation_cache,
    impl_rows,
)
from .workloads import ENV_SCALE, WORKLOAD_NAMES, bench_scale, get_workload

__all__ = ["add_arguments", "format_table", "run", "run_compiled", "run_host", "run_launches", "run_ops", "run_xla"]

QUICK_SCALE = 0.05
# --quick's scale per workload where it differs: 40 of the 2,000 small tensors (still 40 tensors' worth of
# per-tensor overhead; XLA's compilation of a step grows with the tensor count: ~25 s for 100 on 2 cores).
QUICK_SCALES = {"small": 0.02}
# Left out by --quick unless named with --backend: array_api_strict is the conformance backend (it checks
# that adamp_core uses nothing beyond the standard), not a way to run an optimizer fast, and it is the
# slowest row by far.
QUICK_SKIP_BACKENDS = ("array_api_strict",)
# Also left out by --quick unless named with --impl: the fused=False rows (the per-tensor "before" of the
# fast paths and the multi-tensor array-API step forced on the CPU, for the full-size tables).
QUICK_SKIP_IMPLS = ("adamp_torch-unfused", "adamp_array-unfused", "adamp_torch-foreach", "adamp_array-foreach",
                    "adamp_torch-unfused+caution", "adamp_torch-foreach+caution")
# --launches on a CPU runs the Triton kernels in Triton's interpreter (Python): every dimension of the
# workload's shapes is capped at this, which keeps the tensor count and kinds (and so the launches).
LAUNCH_DIM_CAP = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: numpy, array_api_strict, torch:cpu, jax:cpu; cuda: torch:cuda, cupy, jax:gpu")
    p.add_argument("--workload", action="append", choices=[*WORKLOAD_NAMES, "all"],
                   help="repeatable; default: all (" + ", ".join(WORKLOAD_NAMES) + ")")
    p.add_argument("--optimizer", choices=[*OPTIMIZERS, "all"], default="adamp", help="default: adamp")
    p.add_argument("--impl", action="append", choices=list(IMPLS), help="only these rows (repeatable); default: all")
    backends = [*device_backends("cpu"), *device_backends("cuda")]
    p.add_argument("--backend", action="append", choices=[*backends, "all"],
                   help=f"only these backends of --device (repeatable); default: all, except "
                   f"{', '.join(QUICK_SKIP_BACKENDS)} with --quick")
    scales = ", ".join(f"{k} {v:g}" for k, v in QUICK_SCALES.items())
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes (scale {QUICK_SCALE}; {scales}), 5 runs of >= 20 ms, single-threaded, no "
                   f"{', '.join(QUICK_SKIP_BACKENDS)} rows: a table in about a minute")
    p.add_argument("--scale", type=float, default=None, help=f"workload size factor (default: ${ENV_SCALE}, else "
                   f"{QUICK_SCALE} with --quick (see there), else 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 7; 5 with --quick)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timed run; sets the steps per run (default 0.2; 0.02 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 also turns XLA's Eigen pool "
                   "off); default: the libraries' own, 1 with --quick")
    p.add_argument("--jax-cache", metavar="DIR", default=None,
                   help=f"JAX persistent compilation cache (default: ${ENV_JAX_CACHE}, else ~/.cache/adamp-xp/jax; "
                   "'none': off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the params and grads (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--host", action="store_true",
                   help="no device work: the host time of one step on tiny tensors (1 thread; the Triton path's "
                        "launches stubbed), every path of ours beside AdamW/SGD(fused=True), AdamW(foreach=True) "
                        "and adamp 0.3.0, with persistent and with new grads (default workloads: resnet50, small)")
    p.add_argument("--launches", action="store_true",
                   help="no timing: count the kernel launches of one step of adamp_torch's fused='triton' path "
                   "(on a CPU under Triton's interpreter, every dimension capped at "
                   f"{LAUNCH_DIM_CAP}: the count does not depend on sizes; default workloads: resnet50, small)")
    p.add_argument("--ops", action="store_true",
                   help="no timing: the torch operators one warm step dispatches (what a GPU step launches), "
                   "AdamP/SGDP(fused=False, foreach=True) beside AdamW/SGD(foreach=True), tiny tensors "
                   "(default workloads: resnet50, small)")
    p.add_argument("--xla", action="store_true",
                   help="what XLA makes of one jax.jit step: bytes and flops per param element, fusions, compile "
                   "and step times of adamp_optax.adamp/sgdp beside optax.adamw/sgd (default workload: resnet50)")
    p.add_argument("--compiled", action="store_true",
                   help="torch.compile(optimizer.step) of AdamP/SGDP on each path beside compiled AdamW/SGD and "
                   "the eager rows, with the compile time (default workload: resnet50; --scale, --threads)")


def _positive(value: Any, name: str, kind: type) -> Any:
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a positive {kind.__name__})")
    return value


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    _positive(args.scale, "--scale", float)
    _positive(args.repeats, "--repeats", int)
    _positive(args.min_time, "--min-time", float)
    _positive(args.threads, "--threads", int)
    if args.scale is not None:
        scale = bench_scale(args.scale)
    elif os.environ.get(ENV_SCALE, "").strip():
        scale = bench_scale()
    else:
        scale = None if args.quick else 1.0  # None: QUICK_SCALE, or QUICK_SCALES[workload]
    names = args.workload or ["all"]
    workloads = list(WORKLOAD_NAMES) if "all" in names else list(dict.fromkeys(names))
    allowed = device_backends(args.device)
    if not args.backend:
        backends = [b for b in allowed if not (args.quick and b in QUICK_SKIP_BACKENDS)]
    elif "all" in args.backend:
        backends = list(allowed)
    else:
        for b in args.backend:
            if b not in allowed:
                raise ValueError(
                    f"Invalid --backend: {b!r} for --device {args.device} (choose from {', '.join(allowed)})"
                )
        backends = list(dict.fromkeys(args.backend))
    return dict(
        device=args.device,
        scale=scale,
        scales={w: (QUICK_SCALES.get(w, QUICK_SCALE) if scale is None else scale) for w in workloads},
        workloads=workloads,
        optimizers=list(OPTIMIZERS) if args.optimizer == "all" else [args.optimizer],
        impls=list(dict.fromkeys(args.impl))
        if args.impl
        else ([k for k in IMPLS if k not in QUICK_SKIP_IMPLS] if args.quick else None),
        backends=backends,
        skipped_backends=[b for b in allowed if b not in backends],
        repeats=args.repeats or (5 if args.quick else 7),
        min_time=args.min_time if args.min_time is not None else (0.02 if args.quick else 0.2),
        # --quick is a smoke test on possibly shared machines: single-threaded unless told otherwise (two
        # OpenMP threads on two busy cores make torch's small ops 10x slower and very noisy).
        threads=args.threads if args.threads is not None else (1 if args.quick else None),
        seed=args.seed,
    )


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_table(results: list[dict[str, Any]]) -> str:
    """The rows of one workload and optimizer as a Markdown table (skips and errors listed below it)."""
    ran = [r for r in results if "ms_per_step" in r]
    base = next((r["baseline"] for r in ran if "baseline" in r), None)
    off = next((r for r in results if r["impl"] == OFFICIAL and "ms_per_step" in r), None)
    head = ["implementation", "backend", "ms/step", "IQR", "runs x steps"]
    if base:
        head.append(
            f"x {base.split('(')[0].replace('torch.optim.', '')}({base.split('(')[1]}" if "(" in base else f"x {base}"
        )
    if off:
        head.append("x adamp 0.3.0")
    cautious = any("ratio_plain" in r for r in ran)
    if cautious:  # a +caution row over its plain row (same path, backend and run)
        head.append("x plain")
    mem = any("extra_peak_bytes" in r for r in ran)
    if mem:
        head.append("extra MiB (x params)")
    ops = any("torch_ops" in r for r in ran)
    if ops:
        head.append("torch ops")
    kernels = any("cuda_launches" in r or "launches" in r for r in ran)
    if kernels:  # GPU kernels and copies per step (profiler), or the Triton row's launches + torch ops
        head.append("launches")
    body = []
    for r in ran:
        cells = [
            r["label"],
            r["backend"],
            _fmt_ms(r["ms_per_step"]),
            f"{r['iqr_pct']:.0f}%",
            f"{r['repeats']} x {r['steps_per_run']}",
        ]
        if base:
            cells.append(f"{r['ratio_baseline']:.2f}")
        if off:
            cells.append(f"{r['ratio_official']:.2f}")
        if cautious:
            cells.append(f"{r['ratio_plain']:.2f}" if "ratio_plain" in r else "-")
        if mem:
            extra = r.get("extra_peak_bytes")
            cells.append("-" if extra is None else f"{extra / 2**20:.1f} ({r['extra_peak_x_params']:.2f})")
        if ops:
            cells.append(f"{r['torch_ops']:,}" if "torch_ops" in r else "-")
        if kernels:
            n = r.get("cuda_launches", r.get("launches"))
            cells.append("-" if n is None else f"{n:,}")
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=False)]
    right = set(range(2, len(head)))
    line = lambda cells: (
        "| "
        + " | ".join(
            (str(c).rjust(w) if i in right else str(c).ljust(w))
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        + " |"
    )
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    lines = [line(head), sep, *map(line, body)]
    for r in results:
        if "ms_per_step" not in r:
            lines.append(f"  {r['status']}: {r['label']} [{r['backend']}]: {r.get('note', '')}")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("adamp-xp", "numpy", "array-api-strict", "torch", "jax", "optax", "cupy-cuda12x", "cupy", "adamp"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "?"


def _hyper_text(optimizer: str) -> str:
    """The hyperparameters every row of ``optimizer`` shares, e.g. ``lr 0.01, Nesterov momentum 0.9, ...``."""
    hp = HYPERPARAMS[optimizer]
    if optimizer == "adamp":
        parts = [f"lr {hp['lr']:g}", f"betas {hp['betas']}", f"eps {hp['eps']:g}"]
    else:
        parts = [f"lr {hp['lr']:g}", f"{'Nesterov ' if hp['nesterov'] else ''}momentum {hp['momentum']:g}"]
    parts.append(f"weight decay {hp['weight_decay']:g}")
    return ", ".join(parts)


def _scales_text(scales: dict[str, float]) -> str:
    values = list(dict.fromkeys(scales.values()))
    if len(values) <= 1:
        return f"{values[0]:g}" if values else "-"
    common = max(values, key=list(scales.values()).count)
    rest = ", ".join(f"{k} {v:g}" for k, v in scales.items() if v != common)
    return f"{common:g} ({rest})"


def run_launches(args: argparse.Namespace) -> int:
    """``adamp-xp bench --launches``: per workload and optimizer, the launches of one step (after a warm-up
    step) of ``adamp_torch``'s ``fused="triton"`` path: its Triton kernels, its table uploads and the other
    torch operators with a kernel. On ``--device cpu`` the kernels run in Triton's interpreter."""
    from .measure import launches
    from .runners import INTERPRETER_ROWS, Unavailable, build_runner
    from .workloads import Workload

    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels run (adamp_core.paths.triton_fused.interpreting)
        INTERPRETER_ROWS["allowed"] = True
    names = args.workload or ["resnet50", "small"]
    names = list(WORKLOAD_NAMES) if "all" in names else list(dict.fromkeys(names))
    optimizers = list(OPTIMIZERS) if args.optimizer == "all" else [args.optimizer]
    backend = "torch:cpu" if args.device == "cpu" else "torch:cuda"
    rows, failed = [], False
    print(f"adamp-xp bench --launches: adamp_torch fused='triton' on {backend}"
          + (f" (Triton's interpreter; every dimension capped at {LAUNCH_DIM_CAP})" if args.device == "cpu" else ""))
    head = ("workload", "optimizer", "tensors", "Triton launches", "table uploads", "other torch ops", "total")
    print("| " + " | ".join(head) + " |\n|" + "|".join("---:" if i > 1 else "---" for i in range(len(head))) + "|")
    for name in names:
        w = get_workload(name, args.scale if args.scale is not None else 1.0)
        if args.device == "cpu":
            w = Workload(w.name, w.scale, w.description, tuple(tuple(min(d, LAUNCH_DIM_CAP) for d in s)
                                                                for s in w.shapes), w.invariant)
        cache = GradCache(w, seed=args.seed)
        for optimizer in optimizers:
            try:
                runner = build_runner("adamp_torch-triton", optimizer, backend, cache)
                runner.step()  # warm-up: compilation, lazy state, the tables
                runner.sync()
                n = launches(runner.step)
                runner.sync()
            except Unavailable as exc:
                print(f"  skip: {name} / {optimizer}: {exc}")
                continue
            except Exception as exc:  # reported, and the exit status says so
                print(f"  error: {name} / {optimizer}: {type(exc).__name__}: {exc}")
                failed = True
                continue
            others = n["torch_ops"] - n["uploads"]
            rows.append(dict(workload=name, optimizer=optimizer, n_tensors=w.n_tensors, backend=backend, **n))
            print(f"| {name} | {optimizer} | {w.n_tensors:,} | {n['triton_launches']} | {n['uploads']} | {others} "
                  f"| {n['triton_launches'] + n['torch_ops']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"device": args.device, "versions": _versions(), "dim_cap": LAUNCH_DIM_CAP
                                if args.device == "cpu" else None}, "results": rows}, f, indent=2)
    return 0 if rows and not failed else 1


def run_host(args: argparse.Namespace) -> int:
    """``adamp-xp bench --host``: the host time of a step on tiny tensors, every row in one run
    (:mod:`adamp_xp.bench.host`)."""
    from .host import DIM_CAP, format_host, host_rows

    names = args.workload or ["resnet50", "small"]
    names = list(WORKLOAD_NAMES) if "all" in names else list(dict.fromkeys(names))
    workloads = [get_workload(n, 1.0) for n in names]
    repeats = args.repeats or (3 if args.quick else 5)
    print(f"adamp-xp bench --host: torch {_versions().get('torch', '?')}, 1 thread, every dimension capped at "
          f"{DIM_CAP}; the fastest of {repeats} repeats of 30 steps per row, rows interleaved; load average "
          f"{_load()}", flush=True)
    t0 = time.perf_counter()
    results = host_rows(workloads, repeats=repeats)
    print(format_host(results))
    print(f"({time.perf_counter() - t0:.0f} s; ratios: to AdamW(fused=True) for AdamW/AdamP rows, to "
          "SGD(fused=True) for SGD/SGDP rows, measured in this run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"versions": _versions(), "dim_cap": DIM_CAP, "repeats": repeats},
                       "results": results}, f, indent=2)
    return 0 if results else 1


def _named_workloads(args: argparse.Namespace, default: list[str]) -> list[str]:
    names = args.workload or default
    return list(WORKLOAD_NAMES) if "all" in names else list(dict.fromkeys(names))


def run_ops(args: argparse.Namespace) -> int:
    """``adamp-xp bench --ops``: torch operators per warm step (:mod:`adamp_xp.bench.ops`)."""
    from .host import DIM_CAP
    from .ops import format_ops, op_rows

    print(f"adamp-xp bench --ops: aten operators dispatched by one warm step, torch "
          f"{_versions().get('torch', '?')}, new grads, every dimension capped at {DIM_CAP}", flush=True)
    results = op_rows(tuple(_named_workloads(args, ["resnet50", "small"])))
    print(format_ops(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"versions": _versions(), "dim_cap": DIM_CAP}, "results": results}, f, indent=2)
    return 0 if results else 1


def run_xla(args: argparse.Namespace) -> int:
    """``adamp-xp bench --xla``: XLA's cost analysis and times of a jitted step (:mod:`adamp_xp.bench.xla`)."""
    configure_threads("cpu", _positive(args.threads, "--threads", int))  # before JAX is imported
    from .xla import format_table as format_xla
    from .xla import measure as xla_rows

    from .xla import OPTIMIZERS as XLA_OPTIMIZERS

    # all: with the pair of SGDP's defaults beside plain momentum SGD; sgdp: that pair too
    optimizers = XLA_OPTIMIZERS if args.optimizer == "all" else tuple(o for o in XLA_OPTIMIZERS
                                                                       if o.split("-")[0] == args.optimizer)
    results: list[dict[str, Any]] = []
    for name in _named_workloads(args, ["resnet50"]):
        print(f"adamp-xp bench --xla: {name}, jax {_versions().get('jax', '?')}, float32, params and state "
              f"donated, load average {_load()}", flush=True)
        rows = xla_rows(name, optimizers=optimizers, repeats=args.repeats or 5,
                        scale=_positive(args.scale, "--scale", float))
        print(format_xla(rows), flush=True)
        results += [dict(dataclasses.asdict(r), compile_plus_first_s=r.compile_plus_first_s, workload=name)
                    for r in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"versions": _versions()}, "results": results}, f, indent=2)
    return 0 if results else 1


def run_compiled(args: argparse.Namespace) -> int:
    """``adamp-xp bench --compiled``: compiled steps beside eager ones, with compile time
    (:mod:`adamp_xp.bench.compiled`)."""
    from .compiled import format_rows
    from .compiled import run as compiled_rows

    if args.threads is not None:
        configure_threads("cpu", _positive(args.threads, "--threads", int))
    optimizers = ("adamp", "sgdp") if args.optimizer == "all" else (args.optimizer,)
    scale = _positive(args.scale, "--scale", float)
    results: list[dict[str, Any]] = []
    for name in _named_workloads(args, ["resnet50"]):
        print(f"adamp-xp bench --compiled: {name}, torch {_versions().get('torch', '?')}, inductor, float32, "
              f"load average {_load()}", flush=True)
        rows = compiled_rows(name, optimizers, repeats=args.repeats or 3, scale=scale)
        print(format_rows(rows), flush=True)
        results += [dict(r._asdict(), workload=name) for r in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"versions": _versions()}, "results": results}, f, indent=2)
    return 0 if results else 1


def run(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand: print one table per workload and optimizer; 0 when rows ran."""
    if getattr(args, "host", False):
        return run_host(args)
    if getattr(args, "launches", False):
        return run_launches(args)
    if getattr(args, "ops", False):
        return run_ops(args)
    if getattr(args, "compiled", False):
        return run_compiled(args)
    if getattr(args, "xla", False):
        return run_xla(args)
    s = _settings(args)
    configure_threads(s["device"], s["threads"])
    rows = impl_rows(s["device"], s["impls"], s["backends"])
    t_start = time.perf_counter()
    jax_cache = None
    if any(b.startswith("jax") for _, b in rows):
        jax_cache = enable_jax_compilation_cache(args.jax_cache)
    load0 = _load()
    print(
        f"adamp-xp bench: device {s['device']}, {os.cpu_count()} CPU cores, load average {load0}; "
        f"scale {_scales_text(s['scales'])}; median of {s['repeats']} interleaved runs per row after warm-up "
        f"(each run >= {s['min_time'] * 1e3:.0f} ms: 'runs x steps'); float32; IQR = interquartile range / median",
        flush=True,
    )
    if jax_cache:
        print(f"JAX compilation cache: {jax_cache} (compilation is never timed; --jax-cache none to turn off)")
    if s["skipped_backends"]:
        print(f"backends left out: {', '.join(s['skipped_backends'])} (--backend all to include)")
    if args.quick and not args.impl:
        print(f"rows left out: {', '.join(QUICK_SKIP_IMPLS)} (--impl to include)")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        if os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5:
            print(
                f"warning: load average {load0} with {os.cpu_count()} cores: other processes share the CPUs; "
                "interleaving spreads their effect over all rows, but multi-threaded rows suffer most",
                flush=True,
            )
    except OSError:  # pragma: no cover
        pass
    all_results: list[dict[str, Any]] = []
    for name in s["workloads"]:
        w = get_workload(name, s["scales"][name])
        cache = GradCache(w, seed=s["seed"])
        for optimizer in s["optimizers"]:
            log(f"{w.name} / {optimizer}: building and warming up {len(rows)} rows")
            res = measure(rows, optimizer, cache, s["repeats"], s["min_time"], s["device"], log=log)
            for r in res:
                r.update(
                    workload=w.name, optimizer=optimizer, n_tensors=w.n_tensors, n_elements=w.n_elements, scale=w.scale
                )
            all_results.extend(res)
            interleaved = all(r.get("interleaved", True) for r in res)
            print(
                f"\n{w.summary()} | {'AdamP' if optimizer == 'adamp' else 'SGDP'} ({_hyper_text(optimizer)})"
                + ("" if interleaved else " | not enough memory for all rows at once: each row rebuilt per round")
            )
            print(format_table(res), flush=True)
        del cache
        gc.collect()
    torch_threads = None
    if "torch" in sys.modules:
        torch_threads = sys.modules["torch"].get_num_threads()
    meta = dict(
        device=s["device"],
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        machine=platform.machine(),
        processor=platform.processor(),
        torch_threads=torch_threads,
        load_start=load0,
        load_end=_load(),
        scale=s["scale"] if s["scale"] is not None else s["scales"],
        backends=s["backends"],
        repeats=s["repeats"],
        min_time=s["min_time"],
        seed=s["seed"],
        jax_cache=jax_cache,
        versions=_versions(),
        seconds=round(time.perf_counter() - t_start, 1),
        command="adamp-xp " + " ".join(sys.argv[1:]) if sys.argv and "adamp" in sys.argv[0] else None,
    )
    print(
        f"\n{meta['seconds']:.0f} s; load average at the end {meta['load_end']}; torch threads {torch_threads}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": all_results}, f, indent=2)
    ran = [r for r in all_results if r["status"] == "ok"]
    errors = [r for r in all_results if r["status"] == "error"]
    return 0 if ran and not errors else 1
