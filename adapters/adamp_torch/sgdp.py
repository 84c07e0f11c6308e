r"""``torch.optim`` SGDP: a drop-in for ``adamp.SGDP`` (0.3.0) whose maths is :mod:`adamp_core`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from adamp_core.optimizers import SGDP as SGDP_SPEC

from ._base import ProjectedOptimizer, required

__all__ = ["SGDP"]


class SGDP(ProjectedOptimizer):
    r"""SGDP: SGD with momentum, decoupled weight decay and the radial projection of Heo et al.,
    "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
    ICLR 2021 (`arXiv:2006.08217 <https://arxiv.org/abs/2006.08217>`_), Algorithm 1.

    For each param :math:`w` with gradient :math:`g` (negated when ``maximize``), momentum
    :math:`\mu` and dampening :math:`\tau`:

    .. math::

        b_t &= \mu b_{t-1} + (1-\tau) g_t, \qquad
        p_t = \begin{cases} g_t + \mu b_t & \text{nesterov} \\ b_t & \text{otherwise} \end{cases} \\
        q_t &= \begin{cases} \Pi_{w_t}(p_t) = p_t - (\hat w_t \cdot p_t)\,\hat w_t,
            \ \hat w_t = \frac{w_t}{\lVert w_t\rVert + \epsilon}
            & \text{if } \max_r \lvert\cos(g_{t,r}, w_{t,r})\rvert < \delta/\sqrt{\dim r} \\
            p_t & \text{otherwise} \end{cases} \\
        w_{t+1} &= w_t \Big(1 - \frac{\eta\lambda\rho}{1-\mu}\Big) - \eta\, q_t,
            \qquad \rho = \texttt{wd\_ratio} \text{ if projected, else } 1

    The test is tried on the channel view, then on the layer view; params with ``ndim <= 1`` are
    never projected. As in ``adamp.SGDP`` 0.3.0, without nesterov the stored buffer is the
    *projected* one, :math:`b_t \leftarrow q_t` (the official code projects the buffer in place);
    ``project_buffer=False`` keeps :math:`b_t` (Algorithm 1 as printed, timm's SGDP).

    Args:
        params: iterable of params or of dicts defining param groups.
        lr: learning rate :math:`\eta` (required, as in adamp 0.3.0; may instead be given by
            every param group).
        momentum: :math:`\mu`. dampening: :math:`\tau`. weight_decay: :math:`\lambda`.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        eps, delta, wd_ratio: as in :class:`adamp_torch.AdamP`.
        caution: Cautious SGDP, as timm 1.0.31's ``caution=True``; see :class:`adamp_torch.AdamP`. The
            momentum buffer is never masked.
        project_buffer: True (default, adamp 0.3.0): without nesterov the stored buffer is the projected
            update. False: the buffer keeps its radial part, as Algorithm 1 is printed and as timm's SGDP
            does (``SGDP(..., project_buffer=False)`` steps as ``timm.optim.SGDP``).
        maximize: maximize the objective (the update uses :math:`-g`).
        state_dtype: dtype of the ``momentum`` buffer (default: the param's).
        skip_nonfinite: if True, a param whose grad has a NaN/inf entry is left as it was, param and
            state, and ``state["nonfinite_skips"]`` (a 0-d int64 tensor) counts it; read it
            with ``int(opt.state[p]["nonfinite_skips"])`` (one sync) when you want to know. Default:
            NaN/inf flow into param and state as the arithmetic gives, as in adamp 0.3.0.
        fused: the fused CPU kernels of :mod:`adamp_core.paths.numba_fused` where they apply, as in
            :class:`adamp_torch.AdamP`.
        foreach: the multi-tensor step of :mod:`adamp_core.paths.multi_tensor` for the rest, as in
            :class:`adamp_torch.AdamP`.
        capturable: the step can be captured in a CUDA graph, as in :class:`adamp_torch.AdamP`.

    State per param: ``momentum``, as adamp 0.3.0 names it.
    """

    _spec = SGDP_SPEC

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = required, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, eps: float = 1e-8,
                 delta: float = 0.1, wd_ratio: float = 0.1, caution: bool = False, project_buffer: bool = True, *,
                 maximize: bool = False,
                 state_dtype: torch.dtype | str | None = None, skip_nonfinite: bool = False, fused: bool | None = None,
                 foreach: bool | None = None, capturable: bool = False) -> None:
        super().__init__(params, locals())
