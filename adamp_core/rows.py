"""The row layout of a tensor's channel view, and the reductions over its rows (the seam for layouts whose
rows are not all in one array: FSDP2 shards, concatenated groups). Imported by the projection
(:mod:`adamp_core.projection`), the cautious mask (:mod:`adamp_core.caution`) and the execution paths;
imports only :mod:`adamp_core.arrays` (a leaf) of the core."""

from __future__ import annotations

import math
from typing import Any

from .arrays import is_jax_traced

__all__ = ["RowReduce", "channel_shape", "fused_reduce", "per_row", "rows_of"]

_IDENTITY = {"+": 0.0, "max": -math.inf, "min": math.inf}


def fused_reduce(xp: Any, kinds: tuple[str, ...], xs: tuple[Any, ...], axis: int) -> tuple[Any, ...] | None:
    """Under ``jax.jit`` (tracers), every array of ``xs`` (one shape, one dtype) reduced along ``axis`` in one
    variadic XLA reduction, ``kinds[i]`` (``"+"``, ``"max"``, ``"min"``) saying how: one loop that reads each input
    once, with the elementwise work that makes the inputs fused into it, where separate ``jnp.sum`` /
    ``jnp.max`` calls are separate reductions (on CPU, library kernels whose inputs are materialized
    first), each a pass over memory and a launch. Maxima and minima propagate NaN as ``jnp.max`` does.
    None for every other library (and for no arrays): the caller reduces them one by one."""
    if not xs or not is_jax_traced(xs[0]):
        return None
    from jax import lax

    ops = {"+": lax.add, "max": lax.max, "min": lax.min}

    def combine(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(ops[k](x, y) for k, x, y in zip(kinds, a, b, strict=True))

    inits = tuple(xp.asarray(_IDENTITY[k], dtype=x.dtype) for k, x in zip(kinds, xs, strict=True))
    return tuple(lax.reduce(tuple(xs), inits, combine, (axis,)))


def channel_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, row length)`` of the channel view of an array of ``shape``: ``(shape[0], -1)`` for
    ``ndim >= 2``, one row for a 1-d or 0-d array (never projected). The row length is explicit, not
    -1: a shard may hold no rows, and ``(0, -1)`` is ambiguous."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


class RowReduce:
    """Reductions over all rows of the channel view, and the shape of the whole tensor.

    Every statistic of the layer view and the max over rows goes through ``sum``/``max``/``min``
    (each takes per-row arrays of shape ``(rows,)``, several at once, and returns a tuple of 0-d
    arrays); per-row statistics never leave their row. This default holds all rows in one array.
    When the rows are split across processes (FSDP2 shards dim 0), pass an instance whose ``shape``
    is the whole tensor's and whose reductions also combine the shards (local rows may be empty):
    the step then runs on the local rows alone and is the same as on the whole tensor. A group of
    tensors concatenated row-wise reduces each tensor's rows apart (:class:`adamp_core.paths.multi_tensor.SegmentRows`,
    whose reductions return per-row arrays instead of 0-d ones).
    """

    def __init__(self, shape: tuple[int, ...] | None = None) -> None:
        self.shape = None if shape is None else tuple(int(s) for s in shape)  # None: the local array's

    def projects(self, ndim: int) -> bool:
        """Whether a param of (local) ``ndim`` gets the scale-invariance test (paper: ``ndim > 1``)."""
        return ndim > 1

    def thresholds(self, xp: Any, w: Any, delta: Any, dtype: Any) -> tuple[Any, Any]:
        r"""The test's thresholds :math:`\delta/\sqrt{\text{row length}}` (channel view) and
        :math:`\delta/\sqrt{\text{size}}` (layer view) of the whole tensor (``w`` may be a shard)."""
        rows, length = channel_shape(w.shape if self.shape is None else self.shape)
        return delta / math.sqrt(length), delta / math.sqrt(rows * length)

    # Under JAX the arrays of one call are reduced together (one XLA reduction: fused_reduce).
    def sum(self, xp: Any, *xs: Any) -> tuple[Any, ...]:
        return _together(xp, "+", xs) or tuple(xp.sum(x) for x in xs)

    def max(self, xp: Any, *xs: Any) -> tuple[Any, ...]:
        return _together(xp, "max", xs) or tuple(xp.max(x) for x in xs)

    def min(self, xp: Any, *xs: Any) -> tuple[Any, ...]:
        return _together(xp, "min", xs) or tuple(xp.min(x) for x in xs)

    def tensor_mean(self, xp: Any, row_sums: Any, w: Any) -> Any:
        """The mean over the whole tensor of an entrywise quantity, from its per-row sums ``(rows,)``
        (through :meth:`sum`, so shards combine theirs): a 0-d array."""
        (total,) = self.sum(xp, row_sums)
        return total / math.prod(w.shape if self.shape is None else self.shape)


def _together(xp: Any, kind: str, xs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """:func:`fused_reduce` of several 1-d arrays of one shape and dtype to 0-d ones (None otherwise)."""
    if len(xs) < 2 or any(x.ndim != 1 or x.shape != xs[0].shape or x.dtype != xs[0].dtype for x in xs):
        return None
    return fused_reduce(xp, (kind,) * len(xs), xs, 0)


def per_row(xp: Any, x: Any, w: Any) -> Any:
    """``x`` shaped to multiply ``w``: a per-row array ``(rows,)`` becomes ``(rows, 1, ...)``; a number or a
    0-d array (one value for the whole tensor, the usual case) is returned as it is."""
    if getattr(x, "ndim", 0) == 0:
        return x
    return xp.reshape(x, (x.shape[0],) + (1,) * (w.ndim - 1))


def rows_of(xp: Any, x: Any) -> Any:
    """``x`` as its channel view ``(rows, row length)``."""
    return xp.reshape(x, channel_shape(x.shape))
