"""One ``backend`` fixture over every array library, skipped with a reason when absent.

``backend`` is an :class:`adamp_xp.testing.Backend` (library + device) with ``asarray``
and ``to_numpy``; ``xp`` is its array-API namespace. JAX runs with x64 enabled so the
float64 cases are real float64; float32 cases ask for float32 explicitly.
"""

from __future__ import annotations

import os

import pytest

from adamp_xp.testing.backends import BACKENDS

try:  # float64 on JAX needs x64, and it must be set before any JAX array exists.
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - jax is optional
    pass

os.environ.setdefault("MPLBACKEND", "Agg")


def _backend_param(b):
    reason = b.skip_reason()
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(b, id=b.id, marks=marks)


@pytest.fixture(params=[_backend_param(b) for b in BACKENDS])
def backend(request):
    """Every backend: numpy, array_api_strict, torch:cpu, torch:cuda, jax:cpu, jax:gpu, cupy."""
    return request.param


@pytest.fixture
def xp(backend):
    """The array-API namespace of ``backend`` (via array-api-compat)."""
    from array_api_compat import array_namespace

    return array_namespace(backend.asarray([0.0], "float32"))


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param
