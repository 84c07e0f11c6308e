"""adamp_xp: the tools of the ``adamp-xp`` distribution around the core, not part of the library.

* :mod:`adamp_xp.cli`: the ``adamp-xp`` command (``conformance``, ``toy``, ``digits``, ``bench``);
* :mod:`adamp_xp.testing`: the backend registry, the oracle runs against the official ``adamp==0.3.0``,
  the adapters' conformance harness (used by the test suite) and the rows of ``adamp-xp conformance``
  (:mod:`adamp_xp.testing.conformance`: every entry point on each execution path, run in worker processes);
* :mod:`adamp_xp.experiments`: the paper's toy and the digits experiment;
* :mod:`adamp_xp.bench`: the benchmark workloads, runners and measurement (``adamp-xp bench``, asv).

It may import the adapters (``adamp_torch``, ``adamp_array``, ``adamp_optax``) and the official
package; :mod:`adamp_core` never imports it. Importing this package imports no subpackage, and each
imports its optional dependencies (torch, jax, the official package, ...) lazily.
"""

from adamp_core import __version__

__all__ = ["__version__"]
