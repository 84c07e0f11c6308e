"""Conformance machinery: the backend registry, the oracle runs against ``adamp==0.3.0`` and the rows of
``adamp-xp conformance`` (:mod:`adamp_xp.testing.conformance`).

Used by the test suite and by ``adamp-xp conformance``. Importing this package needs only
NumPy; each backend and the official package are imported lazily when used.
"""

from .backends import BACKENDS, Backend, available_backends

__all__ = ["BACKENDS", "Backend", "available_backends"]
