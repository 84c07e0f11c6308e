"""Benchmark base classes, following scipy's ``XPBenchmark`` (scipy/benchmarks/benchmarks/common.py).

Backends are ``adamp_xp.testing.backends`` ids. A backend that cannot run here (library not
installed, no GPU) raises ``NotImplementedError`` in ``setup``, which asv reports as skipped.
Lazy and asynchronous backends are synchronized (``torch.cuda.synchronize``, CuPy's stream,
``jax.block_until_ready``) before a timed call returns, and JIT backends are compiled and warmed
up in ``setup`` so that compilation is never timed.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

ENV_THREADS = "ADAMP_BENCH_THREADS"


def tools(module: str, before: str | None = None) -> Any:
    """``adamp_xp.<module>``, the tools package; on a commit from before the tools left the core
    (``asv continuous`` against an old base), ``adamp_core.<before or module>``. ImportError when the
    commit has neither."""
    try:
        return importlib.import_module(f"adamp_xp.{module}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("adamp_xp", f"adamp_xp.{module}"):
            raise
    return importlib.import_module(f"adamp_core.{before or module}")


def apply_threads() -> None:
    """``$ADAMP_BENCH_THREADS`` (unset: the libraries' defaults) as torch's intra-op thread count and, when
    1, XLA's CPU thread pool off (before JAX is imported). On a small or shared machine one thread gives
    stable numbers: two OpenMP threads on two busy cores make torch's small ops many times slower.
    Called at import and again after each warm-up: numba's ``omp`` threading layer (the adapters' fused
    CPU kernels) resets the OpenMP thread count torch reads when it starts."""
    raw = os.environ.get(ENV_THREADS, "").strip()
    if not raw:
        return
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"Invalid {ENV_THREADS}: {raw!r} (expected a positive integer)")
    if n == 1 and "--xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    try:
        import torch
    except ImportError:
        return
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def enable_jax_compilation_cache() -> None:
    """JAX's persistent compilation cache (``$ADAMP_BENCH_JAX_CACHE``, else ``~/.cache/adamp-xp/jax``;
    ``none``: off): asv runs every benchmark in a fresh process, so ``time_step`` and ``peakmem_step``
    would each compile the step again. Compilation is never timed."""
    try:
        enable = tools("bench.runners").enable_jax_compilation_cache
    except ImportError:  # a commit from before adamp_core.bench
        return
    enable()


class Benchmark:
    """Base class with sensible options: full-size workloads (a 64M-element tensor on NumPy) take
    seconds per step, so the timeout is generous; set ``ADAMP_BENCH_SCALE`` (e.g. 0.05) for quick runs
    and ``ADAMP_BENCH_THREADS`` (e.g. 1) for stable numbers on a small or shared machine."""

    timeout = 900.0


class XPBenchmark(Benchmark):
    """Base class for benchmarks run on every array-API backend and device.

    Subclasses extend ``param_names``/``params`` and call ``super().setup(backend)`` first::

        class MyStep(XPBenchmark):
            param_names = (*XPBenchmark.param_names, "workload")
            params = (*XPBenchmark.params, ["small"])

            def setup(self, backend, workload):
                super().setup(backend)
                ...
                if self.warmup:
                    run_once()                  # compile before anything is timed

            def time_step(self, backend, workload):
                self.synchronize(run_once())
    """

    backends = ["numpy", "array_api_strict", "torch:cpu", "torch:cuda", "cupy", "jax:cpu", "jax:gpu"]

    param_names: tuple[str, ...] = ("backend",)
    params: tuple[list[Any], ...] = (backends,)

    def setup(self, backend: str, *args: Any) -> None:
        """Skip (``NotImplementedError``) when ``backend`` cannot run here; set ``backend``,
        ``library``, ``device``, ``xp`` and ``warmup`` (True for the JIT backends)."""
        get_backend = tools("testing.backends").get_backend

        if backend == "cupy" or backend == "jax:gpu":
            # Several libraries may share the GPU in one asv process: no 75% up-front JAX allocation.
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        b = get_backend(backend)
        reason = b.skip_reason()
        if reason:
            raise NotImplementedError(reason)
        from array_api_compat import array_namespace

        self.backend = backend
        self.library = b.library
        self.device = b.device
        self.xp = array_namespace(b.asarray([0.0], "float32"))
        self.warmup = b.library == "jax"
        if self.warmup:
            enable_jax_compilation_cache()

    def synchronize(self, *arrays: Any) -> Any:
        """Wait until ``arrays`` are computed (and the device idle); return them."""
        tools("bench.runners").synchronize(self.backend, arrays)
        return arrays[0] if len(arrays) == 1 else arrays
