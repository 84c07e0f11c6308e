"""Record the machine a GPU check ran on: Python, package versions, and what each library sees of the GPU.

    python3 scripts/gpu_machine_info.py OUT_DIR/machine.json     # also prints the same as text

Every probe is guarded: a missing library or a broken driver is recorded, never raised. The JSON is
rewritten after each probe. Exit status 1 when this tree's packages or the wheels it needs do not import.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import platform
import sys
import traceback

# (import name, distributions that may provide it: the first one installed gives the version)
PACKAGES = [
    ("torch", ["torch"]),
    ("triton", ["triton", "pytorch-triton"]),
    ("cupy", ["cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x", "cupy"]),
    ("jax", ["jax"]),
    ("jaxlib", ["jaxlib"]),
    ("jax_cuda_plugin", ["jax-cuda12-plugin", "jax-cuda13-plugin"]),
    ("numba", ["numba"]),
    ("numpy", ["numpy"]),
    ("optax", ["optax"]),
    ("array_api_compat", ["array-api-compat"]),
    ("array_api_strict", ["array-api-strict"]),
    ("adamp", ["adamp"]),
    ("pytest", ["pytest"]),
    ("hypothesis", ["hypothesis"]),
    ("adamp_xp", ["adamp-xp"]),
]


# What the checks cannot run without (adamp_optax also needs optax, which a GPU machine may lack).
REQUIRED = ("adamp_core", "adamp_torch", "adamp_array", "adamp_xp", "adamp", "array_api_compat", "array_api_strict")


def _version(dists: list[str]) -> str | None:
    for d in dists:
        try:
            return f"{md.version(d)} ({d})"
        except md.PackageNotFoundError:
            continue
    return None


def _probe(name: str, fn) -> object:
    try:
        return fn()
    except Exception as exc:  # record, never raise: this runs first on an unknown machine
        return f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]


def _torch() -> dict:
    import torch

    out = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if out["cuda_available"]:
        out["device_count"] = torch.cuda.device_count()
        out["device"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
    return out


def _cupy() -> dict:
    import cupy

    out = {"version": cupy.__version__, "available": bool(cupy.is_available())}
    if out["available"]:
        out["runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        out["driver"] = cupy.cuda.runtime.driverGetVersion()
        out["device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return out


def _jax() -> dict:
    import jax

    out = {"version": jax.__version__, "default_backend": jax.default_backend()}
    out["gpu_devices"] = _probe("jax.devices", lambda: [str(d) for d in jax.devices("gpu")])
    return out


def _numba() -> dict:
    import numba

    out = {"version": numba.__version__}
    out["cuda_available"] = _probe("numba.cuda", lambda: bool(importlib.import_module("numba.cuda").is_available()))
    return out


def _triton() -> dict:
    import triton

    return {"version": triton.__version__}


def _ours() -> dict:
    out = {}
    for mod in (*REQUIRED, "adamp_optax"):
        out[mod] = _probe(mod, lambda mod=mod: getattr(importlib.import_module(mod), "__file__", None))
    return out


def main(argv: list[str]) -> int:
    info = {
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "distributions": {name: _version(dists) for name, dists in PACKAGES},
        "runtime": {},
    }

    def save() -> str:  # after every probe: a step stopped at its time limit still leaves what it found
        text = json.dumps(info, indent=2, default=str)
        if argv:
            with open(argv[0], "w") as f:
                f.write(text + "\n")
        return text

    save()
    for name, fn in (("torch", _torch), ("cupy", _cupy), ("jax", _jax), ("numba", _numba), ("triton", _triton)):
        info["runtime"][name] = _probe(name, fn)
        save()
    info["imports"] = _ours()
    print(save())
    missing = [m for m in REQUIRED if str(info["imports"].get(m, "error")).startswith("error")]
    if missing:
        print(f"gpu_machine_info: cannot import {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception:  # pragma: no cover - the last resort of a machine probe
        traceback.print_exc()
        sys.exit(1)
