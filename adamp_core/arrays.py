"""Array checks and dtype rules shared by every step.

All checks look at static metadata only (namespace, shape, dtype, device), never at
values, so they cost no device sync and run before anything is computed.
"""

from __future__ import annotations

import sys
from typing import Any

from array_api_compat import (
    array_namespace,
    is_array_api_obj,
    is_cupy_array,
    is_dask_array,
    is_jax_array,
    is_numpy_array,
    is_torch_array,
)
from array_api_compat import device as _compat_device

__all__ = ["check_array", "check_grad", "check_hyper_arrays", "compute_dtype", "device", "dtype_is", "is_host",
           "is_jax_traced", "is_numpy", "namespace_name"]


def _torch_tensor() -> Any:
    """``torch.Tensor`` when torch is loaded (this module does not import it), else None.

    Torch tensors are recognised with a plain ``isinstance`` rather than array-api-compat's
    ``is_torch_array``/``array_namespace``: those go through ``functools.lru_cache``-wrapped helpers,
    which ``torch.compile`` cannot trace without a warning per call (a compiled user loop that calls
    the core would print dozens)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def _is_torch(x: Any) -> bool:
    tensor = _torch_tensor()
    return tensor is not None and isinstance(x, tensor)


def is_host(x: Any) -> bool:
    """Whether ``x`` lives in host memory (a CPU device): NumPy, CPU torch tensors, JAX arrays on CPU
    devices (a tracer: JAX's default backend), array-api-strict's CPU device. Metadata only."""
    if type(x) is _ndarray() or _is_torch(x):
        return type(x) is _ndarray() or x.device.type == "cpu"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        return jax.default_backend() == "cpu"
    if jax is not None and isinstance(x, jax.Array):
        return all(d.platform == "cpu" for d in x.devices())
    if is_cupy_array(x):
        return False
    return "cpu" in str(device(x)).lower()  # array-api-strict's CPU_DEVICE; other libraries name theirs so


def is_numpy(x: Any) -> bool:
    """Whether ``x`` is a NumPy array (without array-api-compat's dispatch)."""
    return type(x) is _ndarray()


def is_jax_traced(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer (inside ``jax.jit``, ``vmap``, ``grad``): where XLA compiles the whole step,
    so a formulation that fuses pays (:func:`adamp_core.rows.fused_reduce`); op by op it only compiles more.
    A torch tensor is answered first and JAX is only looked at once loaded (array-api-compat's
    ``is_jax_array`` goes through an ``lru_cache``, which ``torch.compile`` warns about in a traced step)."""
    if _is_torch(x):
        return False
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


_NAMESPACES: dict[str, Any] = {}  # array-api-compat's wrapped namespaces, imported once (a dict, not a cache)


def _compat_namespace(name: str) -> Any:
    xp = _NAMESPACES.get(name)
    if xp is None:  # only once an array of that library was seen: the library is loaded already
        import importlib

        xp = _NAMESPACES[name] = importlib.import_module(f"array_api_compat.{name}")
    return xp


def device(x: Any) -> Any:
    """The device of ``x``: torch's own attribute for tensors (cheap, and traceable by
    torch.compile without warnings), array-api-compat's lookup otherwise."""
    if _is_torch(x):
        return x.device
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        # A tracer has no device, and reading ``.device`` raises an error whose message
        # renders the whole jaxpr: tracing an n-tensor step would cost O(n^2).
        return None
    if jax is not None and isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
        # Sharded over several devices: there is no one device to put a constant on (a 0-d array
        # given that sharding is refused); JAX places it, and lays the results out like the inputs.
        return None
    return _compat_device(x)


_LIBRARIES = (("numpy", is_numpy_array), ("torch", is_torch_array), ("jax", is_jax_array),
              ("cupy", is_cupy_array), ("dask", is_dask_array))


def namespace_name(x: Any) -> str:
    """Name of the array library of ``x`` ('numpy', 'torch', 'jax', 'cupy', 'array_api_strict', ...)."""
    if _is_torch(x):
        return "torch"
    for name, test in _LIBRARIES:
        if test(x):
            return name
    return type(x).__module__.split(".")[0]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _ndarray() -> Any:
    """``numpy.ndarray`` when NumPy is loaded (this module does not import it), else None."""
    np = sys.modules.get("numpy")
    return None if np is None else np.ndarray


def check_array(param: Any, what: str = "param") -> Any:
    """Check that ``param`` is a real floating array; return its array-API namespace."""
    if type(param) is _ndarray():  # the same checks, without array-api-compat's dispatch (per param, per step)
        if param.dtype.kind != "f":
            raise TypeError(f"{what} must have a real floating dtype, got {param.dtype}")
        return _compat_namespace("numpy")
    if _is_torch(param):  # torch: no array-api-compat dispatch, so nothing for torch.compile to warn about
        if not param.is_floating_point():
            raise TypeError(f"{what} must have a real floating dtype, got {param.dtype}")
        return _compat_namespace("torch")
    if not is_array_api_obj(param):
        raise TypeError(f"{what} must be an array, got {type(param).__name__}")
    xp = array_namespace(param)
    if not xp.isdtype(param.dtype, "real floating"):
        raise TypeError(f"{what} must have a real floating dtype, got {param.dtype}")
    return xp


def check_grad(param: Any, grad: Any, what: str = "grad") -> None:
    """Check that ``grad`` can update ``param``: same library, device and shape, floating dtype."""
    if grad is None:
        raise TypeError(f"{what} is None; a gradient is required")
    ndarray = _ndarray()
    if type(grad) is ndarray and type(param) is ndarray:  # NumPy: one library, one device
        if grad.shape != param.shape:
            raise ValueError(f"{what} shape {_shape(grad)} differs from param shape {_shape(param)}")
        if grad.dtype.kind != "f":
            raise TypeError(f"{what} dtype {grad.dtype} is not real floating (param dtype {param.dtype})")
        return
    if _is_torch(grad) and _is_torch(param):  # torch: the same checks without array-api-compat's dispatch
        if grad.shape != param.shape:
            raise ValueError(f"{what} shape {_shape(grad)} differs from param shape {_shape(param)}")
        if not grad.is_floating_point():
            raise TypeError(f"{what} dtype {grad.dtype} is not real floating (param dtype {param.dtype})")
        if grad.device != param.device:
            raise ValueError(f"{what} is on device {grad.device} but param on {param.device}")
        return
    if not is_array_api_obj(grad):
        raise TypeError(f"{what} must be an array, got {type(grad).__name__}")
    if namespace_name(grad) != namespace_name(param):
        raise TypeError(
            f"{what} comes from array library {namespace_name(grad)!r} but param from {namespace_name(param)!r}"
        )
    if _shape(grad) != _shape(param):
        raise ValueError(f"{what} shape {_shape(grad)} differs from param shape {_shape(param)}")
    xp = array_namespace(grad)
    if not xp.isdtype(grad.dtype, "real floating"):
        raise TypeError(f"{what} dtype {grad.dtype} is not real floating (param dtype {param.dtype})")
    dev_g, dev_p = device(grad), device(param)
    # None: a tracer (jax.jit, vmap) or an array sharded over several devices has no one device, and the
    # tracer's computation puts a concrete operand where it runs: nothing to compare
    if dev_g != dev_p and dev_g is not None and dev_p is not None:
        raise ValueError(f"{what} is on device {dev_g} but param on {dev_p}")


_HYPER_LABELS = {
    "lr": "learning rate",
    "eps": "epsilon value",
    "weight_decay": "weight_decay value",
    "delta": "delta value",
    "wd_ratio": "wd_ratio value",
    "momentum": "momentum value",
    "dampening": "dampening value",
}


def _is_builtin_number(value: Any) -> bool:
    """A Python ``float``/``int``/``bool`` (what a checked hyperparameter is when it is not an array): an
    exact type test, cheaper than ``numbers.Real`` on the per-param path."""
    return type(value) in (float, int, bool)


def check_hyper_arrays(param: Any, hp: Any) -> None:
    """Hyperparameters given as 0-d arrays (in the validated NamedTuple ``hp``) must be usable with ``param``:
    the param's array library (or NumPy for JAX params, which JAX converts) and its device (or, for torch, a
    CPU scalar tensor, which torch uses on any device). Metadata only: no sync."""
    items = []
    for name, value in zip(hp._fields, hp, strict=True):
        if name == "betas":
            items += [(f"beta parameter at index {i}", b) for i, b in enumerate(value) if not _is_builtin_number(b)]
        elif name in _HYPER_LABELS and not _is_builtin_number(value):
            items.append((_HYPER_LABELS[name], value))
    if not items:  # the common case, once per param: Python numbers only
        return
    lib_p = namespace_name(param)
    for label, value in items:
        if not is_array_api_obj(value):
            continue
        lib_v = namespace_name(value)
        if lib_v != lib_p and not (lib_v == "numpy" and lib_p == "jax"):
            raise TypeError(f"Invalid {label}: a 0-d array from library {lib_v!r} but param from {lib_p!r}")
        if lib_v == lib_p and device(value) != device(param):
            if lib_v == "torch" and value.device.type == "cpu":
                continue
            raise ValueError(f"Invalid {label}: on device {device(value)} but param on {device(param)}")


def dtype_is(x: Any, kind: str | tuple[str, ...]) -> bool:
    """Whether ``x`` is an array (of any array-API library, NumPy scalars included) whose dtype is of the
    array-API ``kind`` (``"integral"``, ``("bool", "complex floating")``, ...: ``isdtype``'s kinds).
    Metadata only; NumPy arrays and torch tensors without array-api-compat's dispatch."""
    if type(x) is _ndarray():
        xp = _compat_namespace("numpy")
    elif _is_torch(x):
        xp = _compat_namespace("torch")
    elif is_array_api_obj(x):
        xp = array_namespace(x)
    else:
        return False
    return xp.isdtype(x.dtype, kind)


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """Dtype the maths runs in: float32 for 16-bit floats (float16, bfloat16: reductions are never
    done in half precision), otherwise the param's own (real floating) dtype."""
    if xp.finfo(dtype).bits == 16:
        return xp.float32
    return dtype
