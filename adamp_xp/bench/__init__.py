"""Benchmarks of AdamP/SGDP across backends: workloads, runners and the ``adamp-xp bench`` command.

* :mod:`adamp_xp.bench.workloads`: parameter shapes (ResNet-50, a transformer block,
  2,000 small tensors, one 64M-element tensor), scaled by ``ADAMP_BENCH_SCALE``.
* :mod:`adamp_xp.bench.runners`: one optimizer step of an implementation (ours, the adapters,
  ``torch.optim``, the official ``adamp``, optax) on a backend, with device synchronization.
* :mod:`adamp_xp.bench.measure`: every row built, warmed up and timed round-robin, then the extra
  memory and torch ops of one more step.
* ``adamp-xp bench``: all rows on the same workload, interleaved; prints ms/step and the ratio
  to ``torch.optim.AdamW(fused=True)`` (SGDP: ``SGD(momentum=0.9, nesterov=True, foreach=True)``)
  and to ``adamp==0.3.0``.

The asv suite in ``asv_benchmarks/`` uses the same workloads and runners. Importing this
package imports neither torch nor jax.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    from ._cli import add_arguments, run

    p = subparsers.add_parser(
        "bench",
        help="time one optimizer step on every installed backend against torch.optim and adamp==0.3.0",
        description="Time one AdamP/SGDP step of every implementation on every installed backend. All rows "
        "run on the same workload in one process, interleaved round by round; the table gives the median "
        "ms/step and the ratio to torch.optim.AdamW(fused=True) (for SGDP: SGD(momentum=0.9, nesterov=True, "
        "foreach=True)) and to the official adamp 0.3.0.",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p
