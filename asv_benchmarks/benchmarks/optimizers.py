"""One AdamP/SGDP step: adamp_core on every backend, the adapters, and the reference optimizers.

Workloads (``adamp_xp.bench.workloads``, scaled by ``ADAMP_BENCH_SCALE``): ResNet-50's 161
parameter tensors (25.6M elements), one transformer block with LayerNorm, 2,000 small tensors,
one 64M-element tensor. Every step is built by ``adamp_xp.bench.runners``, the code behind
``adamp-xp bench``.

Every row of an optimizer runs the same hyperparameters (``adamp_xp.bench.runners.HYPERPARAMS``):
AdamP and AdamW lr 1e-3, weight decay 1e-2; SGDP and ``SGD(foreach=True)`` lr 1e-2 with Nesterov
momentum 0.9, weight decay 1e-4.

* ``time_step``: one optimizer step, synchronized.
* ``peakmem_step``: the process's peak host memory (workload data, optimizer state, step temporaries).
* ``track_peak_gpu_memory``: peak device memory of one step (GPU backends only; bytes).
* ``track_torch_ops``: torch operators with a kernel that one step of a torch adapter dispatches.
"""

from __future__ import annotations

from typing import Any

from .common import Benchmark, XPBenchmark, apply_threads, enable_jax_compilation_cache, tools

apply_threads()  # $ADAMP_BENCH_THREADS, before JAX is imported

# Import the libraries once here: asv forks every benchmark from a process that imported this module,
# so each one does not pay for the imports again (importing JAX starts no backend: fork-safe).
for _module in ("numpy", "torch", "jax", "optax", "array_api_strict", "adamp"):
    try:
        __import__(_module)
    except ImportError:
        pass

try:
    WORKLOAD_NAMES = tools("bench.workloads").WORKLOAD_NAMES
except ImportError:  # benchmarking a commit from before adamp_core.bench existed
    WORKLOAD_NAMES = ("resnet50", "transformer", "small", "large")

OPTIMIZERS = ["AdamP", "SGDP"]
DEVICES = ["cpu", "cuda"]


def _build(impl: str, optimizer: str, backend: str, workload: str) -> Any:
    """A warmed-up runner; NotImplementedError (asv: skipped) when it cannot run here."""
    try:
        runners, workloads = tools("bench.runners"), tools("bench.workloads")
    except ImportError as exc:  # a commit from before adamp_core.bench (asv continuous against an old base)
        raise NotImplementedError(f"adamp_xp.bench is not in this version of adamp-xp ({exc})") from None

    try:
        runner = runners.build_runner(impl, optimizer, backend, runners.GradCache(workloads.get_workload(workload)))
    except runners.Unavailable as exc:
        raise NotImplementedError(str(exc)) from None
    # Warm-up: JIT compilation (twice: the first call's outputs are committed to the device), lazy state.
    for _ in range(2):
        runner.step()
        runner.sync()
    apply_threads()
    return runner


class _Step:
    """``time_step`` and ``peakmem_step`` over ``self.runner`` (built by the subclass's setup)."""

    runner: Any

    def time_step(self, *params: Any) -> None:
        self.runner.step()
        self.runner.sync()

    def peakmem_step(self, *params: Any) -> None:
        self.runner.step()
        self.runner.sync()


class _GPUMemory:
    """``track_peak_gpu_memory``; its setup skips CPU devices."""

    runner: Any

    def track_peak_gpu_memory(self, *params: Any) -> int:
        self.runner.reset_peak_device_bytes()
        self.runner.step()
        self.runner.sync()
        peak = self.runner.peak_device_bytes()
        if peak is None:
            raise NotImplementedError(f"no device memory statistics for {self.runner.backend}")
        return peak

    track_peak_gpu_memory.unit = "bytes"


# -- adamp_core -------------------------------------------------------------------------------


class CoreSetup(XPBenchmark):
    """``adamp_core.tree.adamp_step`` / ``sgdp_step``; on JAX the pure step under ``jax.jit``."""

    param_names = (*XPBenchmark.param_names, "workload", "optimizer")
    params = (*XPBenchmark.params, list(WORKLOAD_NAMES), OPTIMIZERS)

    def setup(self, backend: str, workload: str, optimizer: str) -> None:
        super().setup(backend)
        impl = "core+jit" if self.warmup else "core"
        self.runner = _build(impl, optimizer.lower(), backend, workload)


class Core(_Step, CoreSetup):
    pass


class CoreGPUMemory(_GPUMemory, CoreSetup):
    def setup(self, backend: str, workload: str, optimizer: str) -> None:
        if not backend.startswith(("torch:cuda", "cupy", "jax:gpu")):
            raise NotImplementedError("GPU memory: CPU backend")
        super().setup(backend, workload, optimizer)


# -- reference optimizers ------------------------------------------------------------------------

_REFERENCES = {
    "AdamW(fused=True)": ("torch-fused", "adamp"),
    "AdamW(foreach=True)": ("torch-foreach", "adamp"),
    "SGD(foreach=True)": ("torch-foreach", "sgdp"),
    "adamp.AdamP==0.3.0": ("official", "adamp"),
    "adamp.SGDP==0.3.0": ("official", "sgdp"),
}


class ReferenceSetup(Benchmark):
    """torch.optim and the official ``adamp==0.3.0`` on the same workloads (the baselines)."""

    param_names = ("device", "workload", "reference")
    params = (DEVICES, list(WORKLOAD_NAMES), list(_REFERENCES))

    def setup(self, device: str, workload: str, reference: str) -> None:
        impl, optimizer = _REFERENCES[reference]
        self.runner = _build(impl, optimizer, f"torch:{device}", workload)


class Reference(_Step, ReferenceSetup):
    pass


class ReferenceGPUMemory(_GPUMemory, ReferenceSetup):
    def setup(self, device: str, workload: str, reference: str) -> None:
        if device == "cpu":
            raise NotImplementedError("GPU memory: CPU device")
        super().setup(device, workload, reference)


# -- adapters ---------------------------------------------------------------------------------------

_ADAPTERS = {
    "adamp_torch.AdamP": ("adamp_torch", "adamp", {"cpu": "torch:cpu", "cuda": "torch:cuda"}),
    "adamp_torch.SGDP": ("adamp_torch", "sgdp", {"cpu": "torch:cpu", "cuda": "torch:cuda"}),
    "adamp_array.AdamP": ("adamp_array", "adamp", {"cpu": "numpy", "cuda": "cupy"}),
    "adamp_array.SGDP": ("adamp_array", "sgdp", {"cpu": "numpy", "cuda": "cupy"}),
    # The per-tensor array-API step (issue 7's "before"), and the multi-tensor one that a GPU runs by
    # default, forced on the CPU.
    "adamp_torch.AdamP(fused=False,foreach=False)": (
        "adamp_torch-unfused", "adamp", {"cpu": "torch:cpu", "cuda": "torch:cuda"}
    ),
    "adamp_array.AdamP(fused=False,foreach=False)": ("adamp_array-unfused", "adamp", {"cpu": "numpy", "cuda": "cupy"}),
    "adamp_torch.AdamP(fused=False)": ("adamp_torch-foreach", "adamp", {"cpu": "torch:cpu", "cuda": "torch:cuda"}),
    "adamp_array.AdamP(fused=False)": ("adamp_array-foreach", "adamp", {"cpu": "numpy", "cuda": "cupy"}),
    "adamp_optax.adamp": ("adamp_optax+jit", "adamp", {"cpu": "jax:cpu", "cuda": "jax:gpu"}),
    "adamp_optax.sgdp": ("adamp_optax+jit", "sgdp", {"cpu": "jax:cpu", "cuda": "jax:gpu"}),
}


class AdapterSetup(Benchmark):
    """The framework adapters (torch.optim drop-ins, the stateful array optimizer, optax under jax.jit)."""

    param_names = ("device", "workload", "adapter")
    params = (DEVICES, list(WORKLOAD_NAMES), list(_ADAPTERS))

    def setup(self, device: str, workload: str, adapter: str) -> None:
        impl, optimizer, backends = _ADAPTERS[adapter]
        if impl.endswith("+jit"):
            enable_jax_compilation_cache()
        self.runner = _build(impl, optimizer, backends[device], workload)


class Adapter(_Step, AdapterSetup):
    pass


class AdapterOps(AdapterSetup):
    """Kernels a torch adapter's step dispatches (``adamp_xp.bench.measure.torch_ops``): on a GPU the
    launches that bound a launch-bound step, e.g. the multi-tensor step against the per-tensor one."""

    def setup(self, device: str, workload: str, adapter: str) -> None:
        if not _ADAPTERS[adapter][0].startswith("adamp_torch"):
            raise NotImplementedError("torch ops: not a torch adapter")
        super().setup(device, workload, adapter)

    def track_torch_ops(self, *params: Any) -> int:
        return tools("bench.measure", before="bench._cli").torch_ops(self.runner.step)

    track_torch_ops.unit = "ops"


class AdapterGPUMemory(_GPUMemory, AdapterSetup):
    def setup(self, device: str, workload: str, adapter: str) -> None:
        if device == "cpu":
            raise NotImplementedError("GPU memory: CPU device")
        super().setup(device, workload, adapter)


# -- operators per step and XLA's view of a jitted step (issue 26) -------------------------------------------


class OpsPerStep(Benchmark):
    """aten operators one warm step dispatches on tiny tensors, every tensor in a multi-tensor group (what a
    GPU step launches; ``adamp_xp.bench.ops``, ``adamp-xp bench --ops``), beside torch's foreach optimizers."""

    param_names = ("workload", "row")
    params = (["resnet50", "small"], ["AdamW(foreach=True)", "AdamP(fused=False, foreach=True)",
                                      "SGD(foreach=True, momentum=0.9)",
                                      "SGDP(fused=False, foreach=True, momentum=0.9)"])

    def setup(self, workload: str, row: str) -> None:
        try:
            self.ops = tools("bench.ops")
        except ImportError as exc:
            raise NotImplementedError(f"adamp_xp.bench.ops is not in this version of adamp-xp ({exc})") from None
        try:
            import torch  # noqa: F401
        except ImportError:
            raise NotImplementedError("torch is not installed") from None

    def track_ops(self, workload: str, row: str) -> int:
        (result,) = self.ops.op_rows((workload,), (row,))
        return result["ops"] + result["views"]

    track_ops.unit = "ops"


class XLAStep(Benchmark):
    """What XLA makes of one ``jax.jit`` step (``adamp_xp.bench.xla``, ``adamp-xp bench --xla``): bytes accessed
    per param element (XLA's cost analysis) and lowering + compile time, ours beside optax's."""

    param_names = ("workload", "row")
    params = (["resnet50", "small"], ["adamp_optax.adamp", "optax.adamw", "adamp_optax.sgdp", "optax.sgd(momentum)",
                                      "adamp_optax.sgdp()", "optax.sgd(momentum=0.9)"])
    timeout = 1800.0

    def setup(self, workload: str, row: str) -> None:
        try:
            xla = tools("bench.xla")
        except ImportError as exc:
            raise NotImplementedError(f"adamp_xp.bench.xla is not in this version of adamp-xp ({exc})") from None
        # the row's optimizer (xla.ROWS; versions without it had only the adamp and sgdp pairs)
        optimizer = {label: opt for label, opt, _ in getattr(xla, "ROWS", ())}.get(row) or (
            "adamp" if "adam" in row else "sgdp")
        try:
            rows = xla.measure(workload, optimizers=(optimizer,), repeats=1)
        except ImportError as exc:
            raise NotImplementedError(f"jax or optax is not installed ({exc})") from None
        (self.row,) = [r for r in rows if r.label == row]

    def track_bytes_per_element(self, workload: str, row: str) -> float:
        return self.row.bytes_per_element

    track_bytes_per_element.unit = "bytes"

    def track_compile_seconds(self, workload: str, row: str) -> float:
        return self.row.lower_s + self.row.compile_s

    track_compile_seconds.unit = "seconds"
