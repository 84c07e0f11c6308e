"""Moving arrays between libraries and devices, and the flat ``numpy.savez`` layout of a state dict.

Nothing here is on the hot path: it runs when a state dict is saved or loaded.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from adamp_core.arrays import namespace_name

__all__ = ["flatten_state_dict", "to_like", "to_numpy", "unflatten_state_dict"]


SEP = "/"


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy (or view) of an array of any library; 16-bit brain floats become float32
    (NumPy has no bfloat16), which is exact."""
    lib = namespace_name(x)
    if lib == "numpy" or isinstance(x, np.generic):
        out = np.asarray(x)
    elif lib == "torch":
        t = x.detach().cpu()
        out = (t.float() if t.dtype == sys.modules["torch"].bfloat16 else t).numpy()
    elif lib == "cupy":
        out = x.get()
    elif lib == "jax":
        out = np.asarray(x)
    else:  # array_api_strict and any other DLPack-capable CPU array
        try:
            out = np.from_dlpack(x)
        except (TypeError, ValueError, RuntimeError, BufferError, AttributeError):
            out = np.asarray(x)
    ml_dtypes = sys.modules.get("ml_dtypes")  # loaded wherever a NumPy bfloat16 array exists
    if ml_dtypes is not None and out.dtype == ml_dtypes.bfloat16:  # JAX's: not understood by other libraries
        out = out.astype(np.float32)
    return out


def to_like(x: Any, like: Any, what: str) -> Any:
    """A copy of ``x`` in ``like``'s library, dtype and device; ``x`` may come from any library.

    The shape must already match ``like``'s; raises ``ValueError`` naming ``what`` otherwise.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        if isinstance(x, (bool, str, bytes)) or x is None:
            raise TypeError(f"{what} must be an array, got {type(x).__name__}")
        x = np.asarray(x, dtype=np.float64)
    if _shape(x) != _shape(like):
        raise ValueError(f"{what} has shape {_shape(x)} but the param has shape {_shape(like)}")
    xp = array_namespace(like)
    if namespace_name(x) == namespace_name(like):
        src, floating = x, xp.isdtype(x.dtype, "real floating")
    else:  # another library (or device): through a host NumPy copy
        src = to_numpy(x)
        floating = np.issubdtype(src.dtype, np.floating)
    if not floating:
        raise TypeError(f"{what} must have a real floating dtype, got {src.dtype}")
    return xp.asarray(src, dtype=like.dtype, device=device(like), copy=True)


def plain_int(value: Any, what: str) -> int:
    """A step count as a Python int (0-d integer arrays from any library are read back to the host)."""
    if isinstance(value, bool):
        raise TypeError(f"Invalid {what}: {value!r} (expected a non-negative integer)")
    if hasattr(value, "shape"):
        if _shape(value) != ():
            raise ValueError(f"Invalid {what}: expected a scalar, got shape {_shape(value)}")
        arr = to_numpy(value)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"Invalid {what} dtype: {arr.dtype} (expected an integer)")
        value = int(arr)
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {what}: {value!r} (expected a non-negative integer)")
    if value < 0:
        raise ValueError(f"Invalid {what}: {value} (expected a non-negative integer)")
    return int(value)


def plain_hyperparam(name: str, value: Any) -> Any:
    """A saved group entry back as the Python value the optimizer keeps (numbers, bools, tuples, lists).

    0-d arrays (what ``numpy.savez`` gives back) become Python numbers; anything else is left for
    the hyperparameter check to accept or reject with its own message.
    """
    if name == "params":
        return [plain_int(i, "param index") for i in (to_numpy(value).tolist() if hasattr(value, "shape") else value)]
    if name == "param_names":
        return [str(s) for s in (to_numpy(value).tolist() if hasattr(value, "shape") else value)]
    if name == "betas" and hasattr(value, "shape") and _shape(value) == (2,):
        return tuple(float(b) for b in to_numpy(value).tolist())
    if name == "betas" and isinstance(value, (tuple, list)):
        return tuple(plain_hyperparam("beta", b) for b in value)
    if hasattr(value, "shape") and hasattr(value, "dtype") and _shape(value) == ():
        arr = to_numpy(value)
        if arr.dtype == np.bool_:
            return bool(arr)
        if np.issubdtype(arr.dtype, np.integer):
            return int(arr)
        if np.issubdtype(arr.dtype, np.floating):
            return float(arr)
    if isinstance(value, np.generic):
        return value.item()
    return value


def flatten_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flatten an optimizer state dict into ``{"state/<i>/<name>": array, "param_groups/<j>/<key>": array}``
    of host NumPy arrays, so that ``numpy.savez(f, **flatten_state_dict(opt.state_dict()))`` saves it
    (no pickling) whatever library or device the state lives on.

    ``opt.load_state_dict(numpy.load(f))`` (or :func:`unflatten_state_dict`) reads it back.
    """
    flat: dict[str, np.ndarray] = {}
    for i, entry in state_dict["state"].items():
        for name, value in entry.items():
            key = f"state{SEP}{int(i)}{SEP}{name}"
            if name == "step":
                flat[key] = np.asarray(plain_int(value, "state.step"), dtype=np.int64)
            else:
                flat[key] = np.array(to_numpy(value), copy=True)
    for j, group in enumerate(state_dict["param_groups"]):
        for name, value in group.items():
            key = f"param_groups{SEP}{j}{SEP}{name}"
            if name == "params":
                flat[key] = np.asarray([int(i) for i in value], dtype=np.int64)
            elif name == "param_names":
                flat[key] = np.asarray([str(s) for s in value], dtype=np.str_)
            elif hasattr(value, "shape"):
                flat[key] = np.array(to_numpy(value), copy=True)
            elif name == "betas":
                flat[key] = np.asarray([float(to_numpy(b)) if hasattr(b, "shape") else float(b) for b in value])
            else:
                flat[key] = np.asarray(value)
    return flat


def unflatten_state_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_state_dict` (accepts the ``NpzFile`` of ``numpy.load``): numbers come
    back as Python numbers, ``betas`` as a tuple, arrays as NumPy arrays."""
    state: dict[int, dict[str, Any]] = {}
    groups: dict[int, dict[str, Any]] = {}
    for key in flat.keys():
        parts = str(key).split(SEP)
        if len(parts) != 3 or parts[0] not in ("state", "param_groups") or not parts[1].isdigit():
            raise ValueError(
                f"Invalid flat state dict key: {key!r} "
                "(expected 'state/<index>/<name>' or 'param_groups/<index>/<key>')"
            )
        section, index, name = parts[0], int(parts[1]), parts[2]
        value = flat[key]
        if section == "state":
            state.setdefault(index, {})[name] = plain_int(value, "state.step") if name == "step" else value
        else:
            groups.setdefault(index, {})[name] = plain_hyperparam(name, value)
    if sorted(groups) != list(range(len(groups))):
        raise ValueError(f"Invalid flat state dict: param group indices {sorted(groups)} are not 0..{len(groups) - 1}")
    return {"state": state, "param_groups": [groups[j] for j in range(len(groups))]}
