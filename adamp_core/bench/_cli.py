"""``adamp-xp bench``: every installed backend and the reference optimizers on the same workload.

All rows of a workload are built once and then timed round-robin (the order rotates every
round), so machine drift (thermal, other processes) hits every row alike; each row's figure
is the median over rounds of the mean step time of one run of ``n`` steps, after warm-up
(JIT compilation, lazy optimizer state). GPU rows synchronize before the clock stops.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .runners import (
    BASELINES,
    ENV_JAX_CACHE,
    HYPERPARAMS,
    IMPLS,
    OFFICIAL,
    OPTIMIZERS,
    GradCache,
    Unavailable,
    build_runner,
    device_backends,
    enable_jax_compilation_cache,
    impl_rows,
)
from .workloads import ENV_SCALE, WORKLOAD_NAMES, bench_scale, get_workload

__all__ = ["add_arguments", "extra_peak_bytes", "run", "torch_ops"]

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
QUICK_SKIP_IMPLS = ("adamp_torch-unfused", "adamp_array-unfused", "adamp_torch-foreach", "adamp_array-foreach")
_STATE_ARRAYS = {"adamp": 2, "sgdp": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: numpy, array_api_strict, torch:cpu, jax:cpu; cuda: torch:cuda, cupy, jax:gpu",
    )
    p.add_argument(
        "--workload",
        action="append",
        choices=[*WORKLOAD_NAMES, "all"],
        help="repeatable; default: all (" + ", ".join(WORKLOAD_NAMES) + ")",
    )
    p.add_argument("--optimizer", choices=[*OPTIMIZERS, "all"], default="adamp", help="default: adamp")
    p.add_argument("--impl", action="append", choices=list(IMPLS), help="only these rows (repeatable); default: all")
    backends = [*device_backends("cpu"), *device_backends("cuda")]
    p.add_argument(
        "--backend",
        action="append",
        choices=[*backends, "all"],
        help="only these backends of --device (repeatable); default: all, except "
        + ", ".join(QUICK_SKIP_BACKENDS)
        + " with --quick",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes (scale {QUICK_SCALE}; "
        + ", ".join(f"{k} {v:g}" for k, v in QUICK_SCALES.items())
        + "), 5 runs of >= 20 ms, single-threaded, no "
        + ", ".join(QUICK_SKIP_BACKENDS)
        + " rows: a table in about a minute",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help=f"workload size factor (default: ${ENV_SCALE}, else {QUICK_SCALE} with --quick (see there), else 1)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 7; 5 with --quick)")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds per timed run; sets the steps per run (default 0.2; 0.02 with --quick)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (1 also turns XLA's Eigen pool off); default: the libraries' own, 1 with --quick",
    )
    p.add_argument(
        "--jax-cache",
        metavar="DIR",
        default=None,
        help=f"JAX persistent compilation cache (default: ${ENV_JAX_CACHE}, else ~/.cache/adamp-xp/jax; 'none': off)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the params and grads (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


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


_TORCH_THREADS: list[int] = []  # the count --threads asked for, re-applied by _keep_threads()


def _configure_threads(device: str, threads: int | None) -> None:
    # Must happen before jax is imported to take effect (bench imports it lazily, after this).
    if device == "cuda":  # several libraries share the GPU: no JAX up-front preallocation of 75% of it
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    _TORCH_THREADS.clear()
    if threads is None:
        return
    if threads == 1 and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    try:
        import torch

        torch.set_num_threads(threads)
        _TORCH_THREADS.append(threads)
    except ImportError:
        pass


def _keep_threads() -> None:
    """Re-apply ``--threads``: a library that starts its own OpenMP pool in the same process (numba's
    ``omp`` threading layer does, on its first parallel kernel) resets the libgomp thread count torch
    reads, and torch's rows would then run with a different number of threads than asked for."""
    if _TORCH_THREADS and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.get_num_threads() != _TORCH_THREADS[0]:
            torch.set_num_threads(_TORCH_THREADS[0])


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _device_free(device: str) -> int | None:
    if device == "cpu":
        return _mem_available()
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except ImportError:
        pass
    return None


def _fits(rows: list[tuple[str, str]], optimizer: str, n_bytes: int, device: str) -> bool:
    """Whether every row's params + state (plus one backend's grads each, and step temporaries) fit
    in 60% of the free memory at once; else rows are rebuilt one at a time every round."""
    free = _device_free(device)
    if free is None:
        return True
    backends = {b for _, b in rows}
    need = n_bytes * (len(rows) * (1 + _STATE_ARRAYS[optimizer]) + len(backends) + 2 + 8)
    return need < 0.6 * free


def _timed(runner: Any, steps: int) -> float:
    """Mean seconds per step over ``steps`` steps, the device synchronized before the clock stops."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        runner.sync()
        return (time.perf_counter() - t0) / steps
    finally:
        if gc_was:
            gc.enable()


def _calibrate(runner: Any, min_time: float, estimate: float | None = None) -> int:
    """Steps per timed run so that one run lasts about ``min_time``: one step when the warm-up step
    already took that long; else from the median of 3 timed runs of ``k`` steps, ``k`` such that they
    last about ``min_time / 10`` each by the warm-up estimate (which a single short step overstates)."""
    if estimate is not None and estimate >= min_time:
        return 1
    k = 1 if estimate is None else max(1, min(1_000, int(min_time / 10 / max(estimate, 1e-9))))
    one = statistics.median(_timed(runner, k) for _ in range(3))
    return max(1, min(10_000, math.ceil(min_time / max(one, 1e-9))))


def _error_note(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {os.path.basename(last.filename)}:{last.lineno}" if last else ""
    return f"error: {type(exc).__name__}: {exc}"[:200] + where


def _proc_status_bytes(field: str) -> int | None:
    """``VmRSS``/``VmHWM`` of this process from ``/proc/self/status``, in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def _release_free_heap() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that a step's
    temporaries need fresh pages and show in the peak resident set instead of reusing pages that an
    earlier step freed but the allocator kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _reset_host_peak() -> bool:
    """Reset the process's peak resident set (``VmHWM``) to its current size (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover - not Linux, or not permitted
        return False
    return True


def extra_peak_bytes(step: Any, sync: Any, backend: str) -> int | None:
    """Memory one call of ``step`` (then ``sync``) needs beyond what is live before it: on a CPU backend
    the growth of the process's peak resident set (Linux; the allocator's free pages are released first,
    so temporaries count even where an earlier step's freed memory would have been reused), on
    torch:cuda and CuPy the growth of allocated device memory.
    None where it cannot be measured (JAX, which has no peak reset; not Linux)."""
    gc.collect()
    sync()
    if backend == "torch:cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        return max(0, int(torch.cuda.max_memory_allocated()) - int(before))
    if backend == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        before = pool.used_bytes()
        step()
        sync()
        return max(0, int(pool.total_bytes()) - int(before))  # the pool kept every block the step used
    if backend.startswith("jax"):
        return None
    _release_free_heap()
    before = _proc_status_bytes("VmRSS")
    if before is None or not _reset_host_peak():
        return None
    step()
    sync()
    peak = _proc_status_bytes("VmHWM")
    return None if peak is None else max(0, peak - before)


# torch ops that only make a new view of existing memory: no kernel runs for them.
_VIEW_OPS = frozenset(
    "view _unsafe_view reshape slice select expand permute transpose t unsqueeze squeeze alias as_strided detach"
    " unbind split split_with_sizes lift_fresh".split()
)


def torch_ops(step: Any) -> int:
    """How many torch operators that run a kernel (views left out) one call of ``step`` dispatches: on a
    GPU, about the kernel launches of a step, which bound a launch-bound step's time from below. A
    ``torch._foreach_*`` call counts once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func.overloadpacket.__name__ not in _VIEW_OPS:
                _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        step()
    return _Count.n


def measure(
    rows: list[tuple[str, str]],
    optimizer: str,
    cache: GradCache,
    repeats: int,
    min_time: float,
    device: str,
    log: Any = None,
) -> list[dict[str, Any]]:
    """Time every ``(impl, backend)`` row on ``cache``'s workload, interleaved; one result dict per row."""
    w = cache.workload
    results = {
        row: {
            "impl": row[0],
            "label": IMPLS[row[0]].label(optimizer),
            "backend": row[1],
            "reference": IMPLS[row[0]].reference,
            "status": "ok",
        }
        for row in rows
    }
    itemsize = cache.params[0].dtype.itemsize if cache.params else 4
    resident = _fits(rows, optimizer, w.n_elements * itemsize, device)
    runners: dict[tuple[str, str], Any] = {}
    steps: dict[tuple[str, str], int] = {}
    first: dict[tuple[str, str], float] = {}

    def build(row: tuple[str, str]) -> Any:
        try:
            return build_runner(row[0], optimizer, row[1], cache)
        except Unavailable as exc:
            results[row].update(status="skip", note=str(exc))
        except Exception as exc:  # an adapter in progress must not take the whole table down
            results[row].update(status="error", note=_error_note(exc))
        return None

    def prepare(row: tuple[str, str], r: Any) -> Any:
        """Two warm-up steps (JIT compilation, lazy optimizer state, first-touch allocation); the second
        one's time is a first estimate for the calibration (not a result)."""
        try:
            r.step()
            r.sync()
            t0 = time.perf_counter()  # no gc toggling here: JIT rows warm up in threads
            r.step()
            r.sync()
            first[row] = time.perf_counter() - t0
        except Exception as exc:
            results[row].update(status="error", note=_error_note(exc))
            return None
        return r

    def calibrate(row: tuple[str, str], r: Any) -> bool:
        try:
            steps[row] = _calibrate(r, min_time, first.get(row))
        except Exception as exc:
            results[row].update(status="error", note=_error_note(exc))
            return False
        if log:
            log(f"  ready: {results[row]['label']} [{row[1]}], {steps[row]} steps/run")
        return True

    if resident:
        # Build everything, then warm up; the JIT rows compile in background threads (XLA compiles
        # outside the GIL) while the other rows warm up. Nothing is timed until all are ready.
        t0 = time.perf_counter()
        built = {row: build(row) for row in rows}
        jit_rows = [row for row in rows if built[row] is not None and row[0].endswith("+jit")]
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {row: pool.submit(prepare, row, built[row]) for row in jit_rows}
            ready = {row: prepare(row, r) for row, r in built.items() if r is not None and row not in futures}
            ready.update({row: f.result() for row, f in futures.items()})
        if log:
            log(f"  built and warmed up in {time.perf_counter() - t0:.1f} s")
        _keep_threads()
        for row in rows:  # calibration (timed) one row at a time, in row order
            if ready.get(row) is not None and calibrate(row, ready[row]):
                runners[row] = ready[row]
        ready.clear()
        built.clear()
    else:  # not enough memory for every row at once: one at a time here, rebuilt in every round
        for row in rows:
            r = build(row)
            if r is not None and prepare(row, r) is not None:
                _keep_threads()
                calibrate(row, r)
            r = None
            gc.collect()
    live = [row for row in rows if row in steps]
    times: dict[tuple[str, str], list[float]] = {row: [] for row in live}
    for k in range(repeats):
        _keep_threads()
        order = live[k % len(live) :] + live[: k % len(live)] if live else []
        for row in order:
            if row not in steps:  # failed in an earlier round
                continue
            try:
                if resident:
                    r = runners[row]
                else:
                    r = build_runner(row[0], optimizer, row[1], cache)
                    r.step()
                    r.sync()
                times[row].append(_timed(r, steps[row]))
            except Exception as exc:
                results[row].update(status="error", note=_error_note(exc))
                steps.pop(row)
            finally:
                if not resident:
                    r = None
                    gc.collect()
    param_bytes = w.n_elements * itemsize
    for row in live:  # extra memory of one more step, rows one at a time (after timing: it perturbs nothing)
        if resident and row in steps:
            try:
                extra = extra_peak_bytes(runners[row].step, runners[row].sync, row[1])
            except Exception:  # pragma: no cover - measuring must not take the table down
                extra = None
            if extra is not None:
                results[row].update(extra_peak_bytes=extra, extra_peak_x_params=extra / param_bytes)
            if row[1].startswith("torch"):  # kernels per step: what bounds a launch-bound GPU step
                results[row]["torch_ops"] = torch_ops(runners[row].step)
                runners[row].sync()
    runners.clear()
    gc.collect()
    for row in live:
        if row not in steps or not times[row]:
            continue
        ts = sorted(times[row])
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
        results[row].update(
            ms_per_step=med * 1e3,
            runs_ms=[t * 1e3 for t in times[row]],
            steps_per_run=steps[row],
            repeats=len(ts),
            iqr_pct=(q[2] - q[0]) / med * 100 if med > 0 else 0.0,
            interleaved=resident,
        )
    out = [results[row] for row in rows]
    _add_ratios(out, optimizer)
    return out


def _add_ratios(results: list[dict[str, Any]], optimizer: str) -> None:
    ok = {r["impl"]: r for r in results if r["status"] == "ok" and "ms_per_step" in r}
    base = next((ok[k] for k in BASELINES[optimizer] if k in ok), None)
    official = ok.get(OFFICIAL)
    for r in results:
        if "ms_per_step" not in r:
            continue
        if base:
            r["baseline"] = base["label"]
            r["ratio_baseline"] = r["ms_per_step"] / base["ms_per_step"]
        if official:
            r["ratio_official"] = r["ms_per_step"] / official["ms_per_step"]


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
    mem = any("extra_peak_bytes" in r for r in ran)
    if mem:
        head.append("extra MiB (x params)")
    ops = any("torch_ops" in r for r in ran)
    if ops:
        head.append("torch ops")
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
        if mem:
            extra = r.get("extra_peak_bytes")
            cells.append("-" if extra is None else f"{extra / 2**20:.1f} ({r['extra_peak_x_params']:.2f})")
        if ops:
            cells.append(f"{r['torch_ops']:,}" if "torch_ops" in r else "-")
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


def run(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand: print one table per workload and optimizer; 0 when rows ran."""
    s = _settings(args)
    _configure_threads(s["device"], s["threads"])
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
