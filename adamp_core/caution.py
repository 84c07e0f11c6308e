r"""Cautious AdamP and SGDP (``caution=True``): keep only the update entries that agree with the gradient.

"Cautious Optimizers" (Liang et al., arXiv:2411.16085) mask an optimizer's update :math:`q` with the
entries whose sign agrees with the gradient's and rescale the rest by the inverse of the kept fraction;
timm 1.0.31's AdamP and SGDP (``caution=True``, registered as ``cadamp``/``csgdp``) combine that with the
projection, in its spherical variant for the params the projection handles:

.. math::

    \phi &= \frac{[q \odot r > 0]}{\max(\operatorname{mean}[q \odot r > 0],\ 10^{-3})}, \qquad
    \text{the mean over the whole tensor} \\
    q' &= \begin{cases}
        \Pi_w(q \odot \phi),\ r = \Pi_w(g) = g - \hat w\,(\hat w\cdot g)
            & \text{projected (} q = \Pi_w(p) \text{; } \hat w = w / (\lVert w\rVert + \epsilon)
              \text{ on the chosen view)} \\
        q \odot \phi,\ r = g & \text{otherwise (1-d, 0-d, or neither view scale-invariant)}
    \end{cases}

The second projection of the masked update is timm's ("enhance the numerical stability"): masking breaks
the orthogonality to :math:`w` that the projection made. Weight decay is unchanged (``wd_ratio`` still
applies when projected), and so is the optimizer's state: the moments (AdamP) and SGDP's buffer never see
the mask (a stored buffer rescaled by up to :math:`10^3` at every step would compound).

The mean is a 0-d array (no host sync), computed through the row layout, so a group of concatenated
tensors (:class:`adamp_core.paths.multi_tensor.SegmentRows`) takes one mean per tensor and FSDP2 shards
(``adamp_torch._distributed.ShardedRows``) combine theirs: every rank masks alike.
"""

from __future__ import annotations

import math
from typing import Any

from .rows import RowReduce, channel_shape, per_row

__all__ = ["CAUTION_MIN_FRACTION", "cautious", "caution_factor"]

CAUTION_MIN_FRACTION = 1e-3  # the clamp of the kept fraction (timm's mask.mean().clamp_(min=1e-3))


def caution_factor(xp: Any, q: Any, ref: Any, rows: RowReduce, w: Any) -> Any:
    r""":math:`\phi = [q\odot r > 0] / \max(\operatorname{mean}[q\odot r > 0], 10^{-3})` shaped like ``q``:
    ``1/kept fraction`` where the signs agree, 0 elsewhere. ``rows`` gives the mean's layout (one per
    tensor of a group, combined across the shards of a split tensor); ``w``: the (local) param."""
    agree = q * ref > 0
    counts = xp.sum(xp.astype(xp.reshape(agree, channel_shape(q.shape)), q.dtype), axis=1)  # per row
    mean = rows.tensor_mean(xp, counts, w)
    scale = per_row(xp, 1.0 / xp.clip(mean, min=CAUTION_MIN_FRACTION), q)  # 1/c once, as timm's mask.div_
    return xp.where(agree, scale, xp.zeros_like(scale))


def cautious(xp: Any, u: Any, ref: Any, rows: RowReduce | None, w: Any) -> Any:
    """``u`` masked and rescaled by :func:`caution_factor` against ``ref`` (the gradient): the update of a
    param the projection does not handle. An empty tensor is returned as it is."""
    rows = RowReduce() if rows is None else rows
    if math.prod(w.shape if rows.shape is None else rows.shape) == 0:  # static; every shard agrees
        return u
    return u * caution_factor(xp, u, ref, rows, w)
