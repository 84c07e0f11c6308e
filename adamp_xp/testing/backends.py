"""Every array library the project runs on, each with how to move NumPy data in and out.

A :class:`Backend` is one (library, device) pair. ``skip_reason()`` says why it cannot run
here (library missing, no GPU), so tests skip with that reason and the conformance command
lists it instead of failing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "Backend", "available_backends", "get_backend"]


@dataclass(frozen=True)
class Backend:
    library: str  # numpy | array_api_strict | torch | jax | cupy
    device: str  # cpu | cuda | gpu

    @property
    def id(self) -> str:
        single = self.library in ("numpy", "array_api_strict", "cupy")
        return self.library if single else f"{self.library}:{self.device}"

    def __str__(self) -> str:
        return self.id

    def skip_reason(self) -> str | None:
        """None when this backend can run here, else why not."""
        try:
            mod = importlib.import_module("jax" if self.library == "jax" else self.library)
        except Exception as exc:  # ImportError, or a broken install
            return f"{self.library} is not installed ({type(exc).__name__})"
        if self.library == "torch" and self.device == "cuda" and not mod.cuda.is_available():
            return "torch: no CUDA device"
        if self.library == "cupy":
            try:
                ok = bool(mod.is_available())
            except Exception:  # pragma: no cover - depends on the driver
                ok = False
            if not ok:
                return "cupy: cupy.is_available() is False (no GPU)"
        if self.library == "jax":
            try:
                mod.devices(self.device)
            except RuntimeError:
                return f"jax: no {self.device} device"
        return None

    @property
    def native(self) -> Any:
        """The library's own module (``numpy``, ``torch``, ``jax.numpy``, ...)."""
        return importlib.import_module("jax.numpy" if self.library == "jax" else self.library)

    def dtype(self, name: str) -> Any:
        return getattr(self.native, name)

    def supports(self, dtype: str) -> bool:
        if self.library == "jax" and dtype == "float64":
            import jax

            return bool(jax.config.jax_enable_x64)
        if dtype in ("bfloat16",):
            return self.library in ("torch", "jax")
        return True

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """A copy of NumPy array ``a`` on this backend, in ``dtype`` (default: ``a``'s)."""
        a = np.asarray(a)
        name = dtype or str(a.dtype)
        if self.library == "torch":
            import torch

            t = torch.from_numpy(np.array(a, dtype=np.float64 if name == "bfloat16" else a.dtype, copy=True))
            return t.to(device=self.device, dtype=getattr(torch, name))
        if self.library == "jax":
            import jax
            import jax.numpy as jnp

            if name == "float64" and not jax.config.jax_enable_x64:
                raise RuntimeError("JAX float64 needs jax_enable_x64")
            dev = jax.devices(self.device)[0]
            return jax.device_put(jnp.asarray(a, dtype=getattr(jnp, name)), dev)
        if self.library == "cupy":
            import cupy

            return cupy.asarray(a, dtype=name)
        if self.library == "array_api_strict":
            import array_api_strict as xs

            return xs.asarray(np.array(a, dtype=name, copy=True), dtype=getattr(xs, name))
        return np.array(a, dtype=name, copy=True)

    def to_numpy(self, x: Any) -> np.ndarray:
        """Host float64 copy of a backend array (integers stay integers); never shares memory."""
        if self.library == "torch":
            import torch

            x = x.detach().to("cpu")
            out = x.to(torch.float64 if x.dtype.is_floating_point else x.dtype).numpy()
            return np.array(out, copy=True)
        if self.library == "cupy":
            import cupy

            out = cupy.asnumpy(x)
        elif self.library == "jax":
            import jax.numpy as jnp

            out = np.asarray(x.astype("float32") if x.dtype == jnp.bfloat16 else x)
        else:
            out = np.asarray(x)
        return np.array(out, dtype=np.float64 if np.issubdtype(out.dtype, np.floating) else out.dtype, copy=True)


BACKENDS: tuple[Backend, ...] = (
    Backend("numpy", "cpu"),
    Backend("array_api_strict", "cpu"),
    Backend("torch", "cpu"),
    Backend("torch", "cuda"),
    Backend("jax", "cpu"),
    Backend("jax", "gpu"),
    Backend("cupy", "cuda"),
)


def available_backends() -> list[Backend]:
    return [b for b in BACKENDS if b.skip_reason() is None]


def get_backend(backend_id: str) -> Backend:
    for b in BACKENDS:
        if b.id == backend_id:
            return b
    raise ValueError(f"Unknown backend: {backend_id!r} (choose from {', '.join(b.id for b in BACKENDS)})")
