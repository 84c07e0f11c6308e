"""The measurement behind ``adamp-xp bench``: build, warm up and time every ``(impl, backend)`` row of
one workload and optimizer, then the extra memory and torch ops of one more step.

All rows are built once and then timed round-robin (the order rotates every round), so machine drift
(thermal, other processes) hits every row alike; each row's figure is the median over rounds of the
mean step time of one run of ``n`` steps, after warm-up (JIT compilation, lazy optimizer state). GPU
rows synchronize before the clock stops. When the rows do not fit in memory together, each is rebuilt
for every run instead.

:func:`measure` is the entry point; it is made of the steps below, in this order:

* :func:`prepare_resident` / :func:`prepare_one_at_a_time`: :func:`build_row`, :func:`warm_up` and
  :func:`calibrate_row` (steps per timed run) for every row;
* :func:`time_rounds`: the interleaved timed runs;
* :func:`measure_memory_and_ops`: :func:`extra_peak_bytes`, :func:`torch_ops` and, on CUDA,
  :func:`cuda_launches` of one more step (the Triton row: also its kernel launches, :func:`launches`);
* :func:`timing_summary` and :func:`add_ratios`: the figures of each row's result dict.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .runners import BASELINES, IMPLS, OFFICIAL, GradCache, Unavailable, build_runner, plain_impl

__all__ = [
    "add_ratios",
    "build_row",
    "calibrate_row",
    "configure_threads",
    "cuda_launches",
    "extra_peak_bytes",
    "keep_threads",
    "launches",
    "measure",
    "measure_memory_and_ops",
    "prepare_one_at_a_time",
    "prepare_resident",
    "time_rounds",
    "timing_summary",
    "torch_ops",
    "warm_up",
]

Row = tuple[str, str]  # (impl, backend)
Log = Callable[[str], Any] | None

_STATE_ARRAYS = {"adamp": 2, "sgdp": 1}

# -- threads -------------------------------------------------------------------------------------------------

_TORCH_THREADS: list[int] = []  # the count --threads asked for, re-applied by keep_threads()


def configure_threads(device: str, threads: int | None) -> None:
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


def keep_threads() -> None:
    """Re-apply ``--threads``: a library that starts its own OpenMP pool in the same process (numba's
    ``omp`` threading layer does, on its first parallel kernel) resets the libgomp thread count torch
    reads, and torch's rows would then run with a different number of threads than asked for."""
    if _TORCH_THREADS and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.get_num_threads() != _TORCH_THREADS[0]:
            torch.set_num_threads(_TORCH_THREADS[0])


# -- memory: every row at once, or one at a time -------------------------------------------------------------


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


# -- timing --------------------------------------------------------------------------------------------------


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


# -- peak memory and torch ops of one step -------------------------------------------------------------------


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


# torch ops that run no kernel on the device either: allocations and the profiler's records.
_NO_KERNEL_OPS = frozenset("empty empty_strided new_empty _record_function_enter_new _record_function_exit".split())


def torch_ops(step: Any, skip: Callable[[], bool] = lambda: False, ignore: frozenset[str] = frozenset()) -> int:
    """How many torch operators that run a kernel (views left out) one call of ``step`` dispatches: on a
    GPU, about the kernel launches of a step, which bound a launch-bound step's time from below. A
    ``torch._foreach_*`` call counts once. ``skip()`` true: not counted (Triton's interpreter at work);
    ``ignore``: more operator names left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            name = func.overloadpacket.__name__
            if name not in _VIEW_OPS and name not in ignore and not skip():
                _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        step()
    return _Count.n


def launches(step: Any) -> dict[str, int]:
    """What one call of ``step`` launches: the Triton kernels of :mod:`adamp_core.paths.triton_fused` and its table
    uploads (counted where they are launched), and the other torch operators with a kernel (:func:`torch_ops`,
    the uploads among them; allocations and profiler records left out: they run no kernel)."""
    from adamp_core.paths import triton_fused

    with triton_fused.counting() as counts:  # not the interpreter's own copies of the arguments
        ops = torch_ops(step, lambda: counts.in_launch, _NO_KERNEL_OPS)
    return {"triton_launches": counts.launches, "uploads": counts.uploads, "torch_ops": ops,
            "launches": counts.launches + ops}


def cuda_launches(step: Any, sync: Any) -> int | None:
    """GPU kernels and memory copies one call of ``step`` puts on the device, as the torch profiler records
    them (Triton's and torch's alike); None where the profiler sees no CUDA activity."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    events = [e for e in prof.events() if getattr(e.device_type, "name", str(e.device_type)).upper().endswith("CUDA")]
    return len(events) or None


# -- one row: build, warm up, calibrate ----------------------------------------------------------------------


def _new_result(row: Row, optimizer: str) -> dict[str, Any]:
    return {
        "impl": row[0],
        "label": IMPLS[row[0]].label(optimizer),
        "backend": row[1],
        "reference": IMPLS[row[0]].reference,
        "status": "ok",
    }


def _record_error(result: dict[str, Any], exc: BaseException) -> None:
    result.update(status="error", note=_error_note(exc))


def build_row(row: Row, optimizer: str, cache: GradCache, result: dict[str, Any]) -> Any:
    """The row's runner, or None with the reason in ``result`` (``skip``: cannot run here; ``error``)."""
    try:
        return build_runner(row[0], optimizer, row[1], cache)
    except Unavailable as exc:
        result.update(status="skip", note=str(exc))
    except Exception as exc:  # an adapter in progress must not take the whole table down
        _record_error(result, exc)
    return None


def warm_up(runner: Any, result: dict[str, Any]) -> float | None:
    """Two warm-up steps (JIT compilation, lazy optimizer state, first-touch allocation); the second
    one's seconds, a first estimate for the calibration (not a result). None on error (in ``result``)."""
    try:
        runner.step()
        runner.sync()
        t0 = time.perf_counter()  # no gc toggling here: JIT rows warm up in threads
        runner.step()
        runner.sync()
        return time.perf_counter() - t0
    except Exception as exc:
        _record_error(result, exc)
        return None


def calibrate_row(runner: Any, min_time: float, estimate: float | None, result: dict[str, Any], log: Log) -> int | None:
    """Steps per timed run (:func:`_calibrate`); None on error (in ``result``)."""
    try:
        steps = _calibrate(runner, min_time, estimate)
    except Exception as exc:
        _record_error(result, exc)
        return None
    if log:
        log(f"  ready: {result['label']} [{result['backend']}], {steps} steps/run")
    return steps


def _fresh_runner(row: Row, optimizer: str, cache: GradCache) -> Any:
    """A newly built runner after one warm-up step (rows rebuilt for every run)."""
    runner = build_runner(row[0], optimizer, row[1], cache)
    runner.step()
    runner.sync()
    return runner


# -- every row -----------------------------------------------------------------------------------------------


def prepare_resident(rows: list[Row], optimizer: str, cache: GradCache, min_time: float,
                     results: dict[Row, dict[str, Any]], log: Log) -> tuple[dict[Row, Any], dict[Row, int]]:
    """Build every row, then warm them up; the JIT rows compile in background threads (XLA compiles
    outside the GIL) while the other rows warm up. Then calibrate, timed, one row at a time in row
    order. Nothing is timed until all are ready. The runners and steps per run of the rows that are."""
    t0 = time.perf_counter()
    built = {row: build_row(row, optimizer, cache, results[row]) for row in rows}
    estimates: dict[Row, float | None] = {}

    def warm(row: Row) -> None:
        estimates[row] = warm_up(built[row], results[row])

    jit_rows = [row for row in rows if built[row] is not None and row[0].endswith("+jit")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(warm, row) for row in jit_rows]
        for row, r in built.items():
            if r is not None and row not in jit_rows:
                warm(row)
        for f in futures:
            f.result()
    if log:
        log(f"  built and warmed up in {time.perf_counter() - t0:.1f} s")
    keep_threads()
    runners: dict[Row, Any] = {}
    steps: dict[Row, int] = {}
    for row in rows:
        if estimates.get(row) is None:
            continue
        n = calibrate_row(built[row], min_time, estimates[row], results[row], log)
        if n is not None:
            runners[row], steps[row] = built[row], n
    return runners, steps


def prepare_one_at_a_time(rows: list[Row], optimizer: str, cache: GradCache, min_time: float,
                          results: dict[Row, dict[str, Any]], log: Log) -> dict[Row, int]:
    """Not enough memory for every row at once: build, warm up and calibrate one row at a time, each
    released before the next. The steps per run of the rows that are ready."""
    steps: dict[Row, int] = {}
    for row in rows:
        r = build_row(row, optimizer, cache, results[row])
        if r is not None and (estimate := warm_up(r, results[row])) is not None:
            keep_threads()
            n = calibrate_row(r, min_time, estimate, results[row], log)
            if n is not None:
                steps[row] = n
        r = None
        gc.collect()
    return steps


def time_rounds(live: list[Row], steps: dict[Row, int], repeats: int, results: dict[Row, dict[str, Any]],
                runners: dict[Row, Any] | None, optimizer: str, cache: GradCache) -> dict[Row, list[float]]:
    """``repeats`` rounds of one timed run (:func:`_timed`, ``steps[row]`` steps) per row, the order
    rotating every round. ``runners`` None: each row is rebuilt for every run. A row that fails is
    dropped from ``steps``, with the error in its result. Seconds per step of every run, per row."""
    times: dict[Row, list[float]] = {row: [] for row in live}
    for k in range(repeats):
        keep_threads()
        order = live[k % len(live) :] + live[: k % len(live)] if live else []
        for row in order:
            if row not in steps:  # failed in an earlier round
                continue
            r = None
            try:
                r = runners[row] if runners is not None else _fresh_runner(row, optimizer, cache)
                times[row].append(_timed(r, steps[row]))
            except Exception as exc:
                _record_error(results[row], exc)
                steps.pop(row)
            finally:
                if runners is None:
                    r = None
                    gc.collect()
    return times


def measure_memory_and_ops(
    runners: dict[Row, Any], steps: dict[Row, int], results: dict[Row, dict[str, Any]], param_bytes: int
) -> None:
    """The extra memory of one more step (:func:`extra_peak_bytes`) and, on torch, the operators it
    dispatches (:func:`torch_ops`), rows one at a time; after timing, so it perturbs nothing."""
    for row, runner in runners.items():
        if row not in steps:  # failed while timed
            continue
        try:
            extra = extra_peak_bytes(runner.step, runner.sync, row[1])
        except Exception:  # pragma: no cover - measuring must not take the table down
            extra = None
        if extra is not None:
            results[row].update(extra_peak_bytes=extra, extra_peak_x_params=extra / param_bytes)
        if row[0].endswith("-triton"):  # its own kernels, and the torch ops around them
            results[row].update(launches(runner.step))
            runner.sync()
        elif row[1].startswith("torch"):  # kernels per step: what bounds a launch-bound GPU step
            results[row]["torch_ops"] = torch_ops(runner.step)
            runner.sync()
        if row[1] == "torch:cuda":
            try:
                results[row]["cuda_launches"] = cuda_launches(runner.step, runner.sync)
            except Exception:  # pragma: no cover - the profiler must not take the table down
                pass


def timing_summary(times: list[float], steps_per_run: int, interleaved: bool) -> dict[str, Any]:
    """A row's figures from its runs' seconds per step: the median (ms/step) and the interquartile range."""
    ts = sorted(times)
    med = statistics.median(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
    return dict(
        ms_per_step=med * 1e3,
        runs_ms=[t * 1e3 for t in times],
        steps_per_run=steps_per_run,
        repeats=len(ts),
        iqr_pct=(q[2] - q[0]) / med * 100 if med > 0 else 0.0,
        interleaved=interleaved,
    )


def add_ratios(results: list[dict[str, Any]], optimizer: str) -> None:
    """Each timed row's ratio to the baseline (the first of ``BASELINES[optimizer]`` that ran) and to
    the official ``adamp`` row, where they ran; a ``+caution`` row's also to its plain row on the same
    backend (``ratio_plain``: what ``caution=True`` costs on that path)."""
    ok = {r["impl"]: r for r in results if r["status"] == "ok" and "ms_per_step" in r}
    by_backend = {(r["impl"], r["backend"]): r for r in results if r["status"] == "ok" and "ms_per_step" in r}
    for r in results:
        plain = by_backend.get((plain_impl(r["impl"]), r["backend"]))
        if "ms_per_step" in r and plain is not None and plain is not r:
            r["ratio_plain"] = r["ms_per_step"] / plain["ms_per_step"]
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


def measure(rows: list[Row], optimizer: str, cache: GradCache, repeats: int, min_time: float, device: str,
            log: Log = None) -> list[dict[str, Any]]:
    """Time every ``(impl, backend)`` row on ``cache``'s workload, interleaved; one result dict per row."""
    results = {row: _new_result(row, optimizer) for row in rows}
    itemsize = cache.params[0].dtype.itemsize if cache.params else 4
    param_bytes = cache.workload.n_elements * itemsize
    resident = _fits(rows, optimizer, param_bytes, device)
    runners: dict[Row, Any] | None
    if resident:
        runners, steps = prepare_resident(rows, optimizer, cache, min_time, results, log)
    else:
        runners, steps = None, prepare_one_at_a_time(rows, optimizer, cache, min_time, results, log)
    live = [row for row in rows if row in steps]
    times = time_rounds(live, steps, repeats, results, runners, optimizer, cache)
    if runners is not None:
        measure_memory_and_ops(runners, steps, results, param_bytes)
        runners.clear()
    gc.collect()
    for row in live:
        if row in steps and times[row]:
            results[row].update(timing_summary(times[row], steps[row], interleaved=resident))
    out = [results[row] for row in rows]
    add_ratios(out, optimizer)
    return out
