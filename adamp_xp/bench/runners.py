"""What is timed: one optimizer step of an implementation on a backend, ready to call.

A :class:`Runner` owns its params and state (copies of the workload's host data) and the
grads of its backend (shared with the other runners on that backend, never written), and
exposes ``step()`` (may return before the device is done) and ``sync()`` (waits for it).
``adamp-xp bench`` and the asv suite both build their runners here, so every number comes
from the same code.

Implementations (``IMPLS``; the key is what ``--impl`` and JSON use):

==================  ==============================================  ====================================
key                 AdamP / SGDP row                                backends
==================  ==============================================  ====================================
torch-fused         ``torch.optim.AdamW(fused=True)`` / ``SGD(..)``  torch (the AdamP baseline)
torch-foreach       ``torch.optim.AdamW(foreach=True)`` / ``SGD(..)`` torch (the SGDP baseline)
official            ``adamp.AdamP`` / ``adamp.SGDP`` 0.3.0            torch
optax+jit           ``optax.adamw`` / ``optax.sgd`` under ``jax.jit``  jax
core                ``adamp_core.tree.adamp_step`` / ``sgdp_step``   numpy, array_api_strict, torch, cupy
core+jit            the same, ``jax.jit``-compiled (buffers donated) jax
adamp_torch         ``adamp_torch.AdamP`` / ``SGDP``                 torch
adamp_torch-unfused ``fused=False, foreach=False`` (per-tensor step) torch
adamp_torch-foreach ``fused=False`` (multi-tensor array-API step)    torch
adamp_torch-triton  ``fused="triton"`` (adamp_core.paths.triton_fused)     torch:cuda (torch:cpu: interpreter only)
adamp_array         ``adamp_array.AdamP`` / ``SGDP``                 numpy, cupy
adamp_array-unfused ``fused=False, foreach=False`` (per-array step)  numpy, cupy
adamp_array-foreach ``fused=False`` (multi-tensor array-API step)    numpy, cupy
adamp_optax+jit     ``adamp_optax.adamp`` / ``sgdp`` under ``jax.jit`` jax
KEY+caution         KEY with ``caution=True`` (Cautious AdamP/SGDP)   as KEY: adamp_torch (every path),
                                                                    adamp_optax+jit
==================  ==============================================  ====================================

A ``+caution`` row's ``x plain`` column is its time over the same path's plain row on the same backend, in
the same run: what the option costs on that path.

JAX rows run under ``jax.jit`` only: eager JAX compiles every primitive for every new shape (thousands
of compilations for the ``small`` workload), which is not how an optimizer step is run in JAX.

Baselines (:data:`BASELINES`, the ``x ...`` ratio column): ``AdamW(fused=True)`` for AdamP, and
``SGD(momentum=0.9, nesterov=True, foreach=True)`` for SGDP, the reference the fast-path goals are
stated against; ``SGD(fused=True)`` is a row of the SGDP table like any other. Every row of an
optimizer uses the same hyperparameters (:data:`HYPERPARAMS`; SGD with Nesterov momentum 0.9).

To add an implementation (a fused or compiled variant, say): one :class:`Impl` entry in ``IMPLS`` and
one builder in ``_BUILDERS`` returning ``(step, sync, extra)``; ``adamp-xp bench --impl KEY`` and the
JSON pick it up, and an asv class can name it.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .workloads import Workload, host_data

__all__ = [
    "BASELINES",
    "HYPERPARAMS",
    "IMPLS",
    "OPTIMIZERS",
    "Impl",
    "Runner",
    "Unavailable",
    "build_runner",
    "device_backends",
    "enable_jax_compilation_cache",
    "impl_rows",
    "plain_impl",
    "synchronize",
]

OPTIMIZERS = ("adamp", "sgdp")
ENV_JAX_CACHE = "ADAMP_BENCH_JAX_CACHE"

# Same hyperparameters for every row of an optimizer (decoupled decay in AdamW/AdamP alike).
HYPERPARAMS: dict[str, dict[str, Any]] = {
    "adamp": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, delta=0.1, wd_ratio=0.1, nesterov=False),
    "sgdp": dict(
        lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, eps=1e-8, delta=0.1, wd_ratio=0.1
    ),
}


def enable_jax_compilation_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default ``$ADAMP_BENCH_JAX_CACHE``, else
    ``~/.cache/adamp-xp/jax``; ``"none"`` leaves it off); return the directory, or None.

    Compilation is never timed; the cache only saves wall-clock time across processes (asv runs every
    benchmark in its own process, and XLA takes tens of seconds for the step of ResNet-50's 161 tensors
    on a small CPU).
    """
    if path is None or path == "":
        path = os.environ.get(ENV_JAX_CACHE) or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "adamp-xp", "jax"
        )
    if path.lower() == "none":
        return None
    try:
        import jax
    except ImportError:
        return None
    path = os.path.abspath(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


class Unavailable(Exception):
    """This row cannot run here (library not installed, no GPU, unsupported combination)."""


@dataclass(frozen=True)
class Impl:
    key: str
    labels: tuple[str, str]  # (AdamP row, SGDP row)
    reference: bool  # a baseline we compare with, not our code
    libraries: tuple[str, ...]  # backend libraries it runs on

    def label(self, optimizer: str) -> str:
        return self.labels[OPTIMIZERS.index(optimizer)]


IMPLS: dict[str, Impl] = {
    i.key: i
    for i in (
        Impl("torch-fused", ("torch.optim.AdamW(fused=True)", "torch.optim.SGD(fused=True)"), True, ("torch",)),
        Impl("torch-foreach", ("torch.optim.AdamW(foreach=True)", "torch.optim.SGD(foreach=True)"), True, ("torch",)),
        Impl("official", ("adamp.AdamP 0.3.0 (official)", "adamp.SGDP 0.3.0 (official)"), True, ("torch",)),
        Impl("optax+jit", ("optax.adamw + jax.jit", "optax.sgd + jax.jit"), True, ("jax",)),
        Impl(
            "core",
            ("adamp_core.tree.adamp_step", "adamp_core.tree.sgdp_step"),
            False,
            ("numpy", "array_api_strict", "torch", "cupy"),
        ),
        Impl(
            "core+jit", ("adamp_core.tree.adamp_step + jax.jit", "adamp_core.tree.sgdp_step + jax.jit"), False, ("jax",)
        ),
        Impl("adamp_torch", ("adamp_torch.AdamP", "adamp_torch.SGDP"), False, ("torch",)),
        Impl(
            "adamp_torch-unfused",
            ("adamp_torch.AdamP(fused=False, foreach=False)", "adamp_torch.SGDP(fused=False, foreach=False)"),
            False,
            ("torch",),
        ),
        Impl(
            "adamp_torch-foreach",
            ("adamp_torch.AdamP(fused=False)", "adamp_torch.SGDP(fused=False)"),
            False,
            ("torch",),
        ),
        Impl(
            "adamp_torch-triton",
            ("adamp_torch.AdamP(fused='triton')", "adamp_torch.SGDP(fused='triton')"),
            False,
            ("torch",),
        ),
        Impl("adamp_array", ("adamp_array.AdamP", "adamp_array.SGDP"), False, ("numpy", "cupy")),
        Impl(
            "adamp_array-unfused",
            ("adamp_array.AdamP(fused=False, foreach=False)", "adamp_array.SGDP(fused=False, foreach=False)"),
            False,
            ("numpy", "cupy"),
        ),
        Impl(
            "adamp_array-foreach",
            ("adamp_array.AdamP(fused=False)", "adamp_array.SGDP(fused=False)"),
            False,
            ("numpy", "cupy"),
        ),
        Impl("adamp_optax+jit", ("adamp_optax.adamp + jax.jit", "adamp_optax.sgdp + jax.jit"), False, ("jax",)),
    )
}
CAUTION = "+caution"  # the suffix of a cautious row (caution=True), one per path of the plain rows below


def _cautious_label(label: str) -> str:
    """``adamp_torch.AdamP(fused=False)`` -> ``adamp_torch.AdamP(fused=False, caution=True)``."""
    if " + " in label:
        head, tail = label.split(" + ", 1)
        return f"{_cautious_label(head)} + {tail}"
    return label[:-1] + ", caution=True)" if label.endswith(")") else label + "(caution=True)"


for _key in ("adamp_torch", "adamp_torch-unfused", "adamp_torch-foreach", "adamp_torch-triton", "adamp_optax+jit"):
    _plain = IMPLS[_key]
    IMPLS[_key + CAUTION] = Impl(_key + CAUTION, tuple(map(_cautious_label, _plain.labels)), False, _plain.libraries)
# Each cautious row right after its plain row (the table's order).
IMPLS = {k: IMPLS[k] for plain in IMPLS if not plain.endswith(CAUTION) for k in (plain, plain + CAUTION) if k in IMPLS}


def plain_impl(impl: str) -> str:
    """The plain row of a ``+caution`` row (``impl`` itself otherwise)."""
    return impl.removesuffix(CAUTION)


def _hyper(impl: str, optimizer: str) -> dict[str, Any]:
    """The row's hyperparameters: :data:`HYPERPARAMS`, with ``caution=True`` for a ``+caution`` row."""
    return {**HYPERPARAMS[optimizer], **({"caution": True} if impl.endswith(CAUTION) else {})}

# The ratio column of each optimizer's table (the first one that ran), and the official implementation's row.
BASELINES: dict[str, tuple[str, ...]] = {"adamp": ("torch-fused", "torch-foreach"), "sgdp": ("torch-foreach",)}
OFFICIAL = "official"

_DEVICE_BACKENDS = {
    "cpu": ("numpy", "array_api_strict", "torch:cpu", "jax:cpu"),
    "cuda": ("cupy", "torch:cuda", "jax:gpu"),
}


def device_backends(device: str) -> tuple[str, ...]:
    """The backend ids of ``device`` ("cpu" or "cuda")."""
    if device not in _DEVICE_BACKENDS:
        raise ValueError(f"Invalid device: {device!r} (expected 'cpu' or 'cuda')")
    return _DEVICE_BACKENDS[device]


def impl_rows(device: str, impls: list[str] | None = None, backends: list[str] | None = None) -> list[tuple[str, str]]:
    """``(impl key, backend id)`` pairs to run for ``device`` ("cpu" or "cuda"), references first;
    only the ``impls`` and ``backends`` given (default: all of them)."""
    allowed = device_backends(device)
    for k in impls or ():
        if k not in IMPLS:
            raise ValueError(f"Unknown impl: {k!r} (choose from {', '.join(IMPLS)})")
    for b in backends or ():
        if b not in allowed:
            raise ValueError(f"Invalid backend for device {device!r}: {b!r} (choose from {', '.join(allowed)})")
    keys = [k for k in IMPLS if impls is None or k in impls]  # always in IMPLS order
    rows = []
    for k in keys:
        for b in allowed:
            if b.split(":")[0] in IMPLS[k].libraries and (backends is None or b in backends):
                rows.append((k, b))
    return rows


def _library(backend: str) -> str:
    return backend.split(":")[0]


def synchronize(backend: str, tree: Any = None) -> None:
    """Wait until the device work queued on ``backend`` (and producing ``tree``) is finished."""
    lib = _library(backend)
    if backend == "torch:cuda":
        import torch

        torch.cuda.synchronize()
    elif lib == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    elif lib == "jax":
        import jax

        jax.block_until_ready(tree)
    # numpy, array_api_strict, torch:cpu compute synchronously


def peak_device_bytes(backend: str) -> int | None:
    """Peak device memory in bytes since :func:`reset_peak_device_bytes` (None on CPU backends)."""
    if backend == "torch:cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    if _library(backend) == "cupy":
        import cupy

        # The pool keeps freed blocks, so after free_all_blocks() its total is the step's peak (block-rounded).
        return int(cupy.get_default_memory_pool().total_bytes())
    if backend == "jax:gpu":
        import jax

        stats = jax.devices("gpu")[0].memory_stats() or {}
        return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None
    return None


def reset_peak_device_bytes(backend: str) -> None:
    if backend == "torch:cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    elif _library(backend) == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
        cupy.get_default_memory_pool().free_all_blocks()
    # jax exposes no reset: its peak_bytes_in_use is the process's peak


@dataclass
class Runner:
    """One implementation on one backend with its own params/state; ``step()`` then ``sync()``."""

    impl: str
    optimizer: str
    backend: str
    label: str
    _step: Callable[[], None]
    _sync: Callable[[], None]
    _extra: dict[str, Any] = field(default_factory=dict)

    def step(self) -> None:
        self._step()

    def sync(self) -> None:
        self._sync()

    def peak_device_bytes(self) -> int | None:
        return peak_device_bytes(self.backend)

    def reset_peak_device_bytes(self) -> None:
        reset_peak_device_bytes(self.backend)


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{module} is not installed ({exc})") from None


def _backend(backend: str) -> Any:
    from ..testing.backends import get_backend

    b = get_backend(backend)
    reason = b.skip_reason()
    if reason:
        raise Unavailable(reason)
    return b


class GradCache:
    """Grads of one workload, converted once per backend and shared (read-only) by its runners."""

    def __init__(self, workload: Workload, seed: int = 0) -> None:
        self.workload = workload
        self.params, self.grads = host_data(workload, seed)
        self._by_backend: dict[str, list[Any]] = {}

    def grads_on(self, backend: str) -> list[Any]:
        if backend not in self._by_backend:
            if backend == "numpy":
                self._by_backend[backend] = list(self.grads)
            elif backend == "torch:cpu":
                import torch

                self._by_backend[backend] = [torch.from_numpy(g) for g in self.grads]  # shares host memory
            else:
                b = _backend(backend)
                self._by_backend[backend] = [b.asarray(g) for g in self.grads]
        return self._by_backend[backend]

    def params_on(self, backend: str) -> list[Any]:
        """Fresh copies of the initial params on ``backend`` (each runner owns its own)."""
        b = _backend(backend)
        return [b.asarray(p) for p in self.params]


# jax.jit caches compilations per function object: keep one jitted step per (impl, optimizer) so a
# rebuilt runner (or a second workload of the same shapes) does not recompile.
_JIT: dict[tuple[str, str], Any] = {}


def _jitted(key: tuple[str, str], make: Callable[[], Any]) -> Any:
    if key not in _JIT:
        _JIT[key] = make()
    return _JIT[key]


def _committed(jax: Any, backend: str, tree: Any) -> Any:
    """``tree`` placed explicitly on the backend's device. Arrays made without a device (optax's
    ``count``) are uncommitted, the step's outputs are committed, and jit compiles once per
    combination: without this the second step compiles the whole update again."""
    return jax.device_put(tree, jax.devices(backend.split(":")[1])[0])


def _path_options(impl: str) -> dict[str, Any]:
    """The adapters' path options of a row: ``*-unfused``, the plain per-tensor array-API step (the
    before of the fast paths); ``*-foreach``, the multi-tensor array-API step (:mod:`adamp_core.paths.multi_tensor`,
    what a GPU runs) forced on the CPU; ``*-triton``, the fused Triton kernels (:mod:`adamp_core.paths.triton_fused`);
    else the default (the fused kernels where they apply). A ``+caution`` row: its plain row's."""
    impl = plain_impl(impl)
    if impl.endswith("-unfused"):
        return {"fused": False, "foreach": False}
    if impl.endswith("-triton"):
        return {"fused": "triton"}
    return {"fused": False} if impl.endswith("-foreach") else {}


INTERPRETER_ROWS = {"allowed": False}  # set by ``adamp-xp bench --launches`` (counts, never timings)


def _require_triton(backend: str) -> None:
    """The Triton row runs on CUDA tensors; on a CPU only under Triton's interpreter (TRITON_INTERPRET=1),
    for the launch counts of ``adamp-xp bench --launches``, never for timing."""
    from adamp_core.paths import triton_fused

    if not triton_fused.AVAILABLE:
        raise Unavailable("triton is not installed (pip install -e '.[triton]')")
    if backend == "torch:cpu" and not (INTERPRETER_ROWS["allowed"] and triton_fused.interpreting()):
        raise Unavailable("the Triton kernels run on CUDA tensors (on a CPU only under TRITON_INTERPRET=1, "
                          "Triton's interpreter: adamp-xp bench --launches)")


def _torch_runner(impl: str, optimizer: str, backend: str, cache: GradCache) -> tuple[Callable, Callable, dict]:
    torch = _require("torch")
    _backend(backend)
    hp = _hyper(impl, optimizer)
    dev = backend.split(":")[1]
    params = cache.params_on(backend)
    for p, g in zip(params, cache.grads_on(backend), strict=True):
        p.grad = g
    if impl in ("torch-fused", "torch-foreach"):
        flag = {"fused": True} if impl == "torch-fused" else {"foreach": True}
        if optimizer == "adamp":
            opt = torch.optim.AdamW(
                params, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"], **flag
            )
        else:
            try:
                opt = torch.optim.SGD(
                    params,
                    lr=hp["lr"],
                    momentum=hp["momentum"],
                    dampening=hp["dampening"],
                    weight_decay=hp["weight_decay"],
                    nesterov=hp["nesterov"],
                    **flag,
                )
            except (RuntimeError, ValueError) as exc:  # older torch: no fused SGD on this device
                raise Unavailable(f"torch.optim.SGD({next(iter(flag))}=True): {exc}") from None
    elif impl == "official":
        mod = _require("adamp")
        opt = (mod.AdamP if optimizer == "adamp" else mod.SGDP)(params, **hp)
    else:  # adamp_torch: the fused CPU kernels where they apply (fused=None), or the array-API step
        if plain_impl(impl).endswith("-triton"):
            _require_triton(backend)
        mod = _require("adamp_torch")
        opt = (mod.AdamP if optimizer == "adamp" else mod.SGDP)(params, **hp, **_path_options(impl))
    if dev == "cuda":
        sync = torch.cuda.synchronize
    else:
        sync = lambda: None
    return opt.step, sync, {"optimizer": opt, "params": params}


def _core_runner(impl: str, optimizer: str, backend: str, cache: GradCache) -> tuple[Callable, Callable, dict]:
    from adamp_core import tree

    hp = HYPERPARAMS[optimizer]
    init, step_fn = (tree.adamp_init, tree.adamp_step) if optimizer == "adamp" else (tree.sgdp_init, tree.sgdp_step)
    grads = cache.grads_on(backend)
    box: dict[str, Any] = {"params": cache.params_on(backend)}
    box["state"] = init(box["params"])
    if impl == "core+jit":
        jax = _require("jax")
        box["state"] = _committed(jax, backend, box["state"])
        # params and state are donated: XLA updates them in place, as a training loop would.
        fn = _jitted((impl, optimizer), lambda: jax.jit(functools.partial(step_fn, **hp), donate_argnums=(0, 2)))
    else:
        fn = functools.partial(step_fn, **hp)

    def step() -> None:
        box["params"], box["state"] = fn(box["params"], grads, box["state"])

    return step, lambda: synchronize(backend, (box["params"], box["state"])), box


def _array_runner(impl: str, optimizer: str, backend: str, cache: GradCache) -> tuple[Callable, Callable, dict]:
    mod = _require("adamp_array")
    hp = HYPERPARAMS[optimizer]
    params = cache.params_on(backend)
    grads = cache.grads_on(backend)
    opt = (mod.AdamP if optimizer == "adamp" else mod.SGDP)(params, **hp, **_path_options(impl))
    return (lambda: opt.step(grads)), (lambda: synchronize(backend, None)), {"optimizer": opt, "params": params}


def _optax_runner(impl: str, optimizer: str, backend: str, cache: GradCache) -> tuple[Callable, Callable, dict]:
    jax = _require("jax")
    optax = _require("optax")
    hp = _hyper(impl, optimizer)

    def make_tx() -> Any:
        if plain_impl(impl) == "adamp_optax+jit":
            mod = _require("adamp_optax")
            caution = hp.get("caution", False)
            if optimizer == "adamp":
                return mod.adamp(learning_rate=hp["lr"], b1=hp["betas"][0], b2=hp["betas"][1], eps=hp["eps"],
                                 weight_decay=hp["weight_decay"], delta=hp["delta"], wd_ratio=hp["wd_ratio"],
                                 nesterov=hp["nesterov"], caution=caution)
            return mod.sgdp(learning_rate=hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
                            weight_decay=hp["weight_decay"], nesterov=hp["nesterov"], eps=hp["eps"], delta=hp["delta"],
                            wd_ratio=hp["wd_ratio"], caution=caution)
        if optimizer == "adamp":
            return optax.adamw(learning_rate=hp["lr"], b1=hp["betas"][0], b2=hp["betas"][1], eps=hp["eps"],
                               weight_decay=hp["weight_decay"])
        return optax.chain(
            optax.add_decayed_weights(hp["weight_decay"]),
            optax.sgd(learning_rate=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"]),
        )

    def make_step() -> Any:
        tx = make_tx()

        def update(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return tx, jax.jit(update, donate_argnums=(0, 1))

    tx, fn = _jitted((impl, optimizer), make_step)
    grads = cache.grads_on(backend)
    box: dict[str, Any] = {"params": cache.params_on(backend)}
    # Eager init on purpose: JAX compiles one zeros kernel per distinct shape, shared by every row, which
    # is cheaper than one jitted init per row (XLA on a small CPU takes seconds for hundreds of outputs).
    box["state"] = _committed(jax, backend, tx.init(box["params"]))

    def step() -> None:
        box["params"], box["state"] = fn(box["params"], box["state"], grads)

    return step, lambda: synchronize(backend, (box["params"], box["state"])), box


_BUILDERS = {
    "torch-fused": _torch_runner,
    "torch-foreach": _torch_runner,
    "official": _torch_runner,
    "adamp_torch": _torch_runner,
    "adamp_torch-unfused": _torch_runner,
    "adamp_torch-foreach": _torch_runner,
    "adamp_torch-triton": _torch_runner,
    "core": _core_runner,
    "core+jit": _core_runner,
    "adamp_array": _array_runner,
    "adamp_array-unfused": _array_runner,
    "adamp_array-foreach": _array_runner,
    "optax+jit": _optax_runner,
    "adamp_optax+jit": _optax_runner,
}
_BUILDERS.update({k: _BUILDERS[plain_impl(k)] for k in IMPLS if k.endswith(CAUTION)})


def build_runner(impl: str, optimizer: str, backend: str, cache: GradCache) -> Runner:
    """A ready :class:`Runner` (not yet warmed up); raises :class:`Unavailable` when it cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl: {impl!r} (choose from {', '.join(IMPLS)})")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer: {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if _library(backend) not in IMPLS[impl].libraries:
        raise Unavailable(f"{impl} does not run on {backend}")
    _backend(backend)
    step, sync, extra = _BUILDERS[impl](impl, optimizer, backend, cache)
    return Runner(impl, optimizer, backend, IMPLS[impl].label(optimizer), step, sync, extra)
