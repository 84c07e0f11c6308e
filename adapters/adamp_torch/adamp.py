r"""``torch.optim`` AdamP: a drop-in for ``adamp.AdamP`` (0.3.0) whose maths is :mod:`adamp_core`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from adamp_core.optimizers import ADAMP

from ._base import ProjectedOptimizer

__all__ = ["AdamP"]


class AdamP(ProjectedOptimizer):
    r"""AdamP: Adam with decoupled weight decay and the radial projection of Heo et al.,
    "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
    ICLR 2021 (`arXiv:2006.08217 <https://arxiv.org/abs/2006.08217>`_), Algorithm 2.

    For each param :math:`w` with gradient :math:`g` (negated when ``maximize``), at step :math:`t`:

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        p_t &= \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}
            \quad\Big(\text{nesterov: }
            \frac{\beta_1 m_t + (1-\beta_1) g_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t}+\epsilon}\Big) \\
        q_t &= \begin{cases} \Pi_{w_t}(p_t) = p_t - (\hat w_t \cdot p_t)\,\hat w_t,
            \ \hat w_t = \frac{w_t}{\lVert w_t\rVert + \epsilon}
            & \text{if } \max_r \lvert\cos(g_{t,r}, w_{t,r})\rvert < \delta/\sqrt{\dim r} \\
            p_t & \text{otherwise} \end{cases} \\
        w_{t+1} &= w_t\,(1 - \eta\lambda\rho) - \frac{\eta}{1-\beta_1^t}\, q_t,
            \qquad \rho = \texttt{wd\_ratio} \text{ if projected, else } 1

    The scale-invariance test is tried on the channel view (rows ``w[i]``) and then on the layer
    view (the whole tensor); params with ``ndim <= 1`` are never projected. This is exactly
    ``adamp.AdamP`` 0.3.0, step for step, but without its two host syncs per param per step.

    Args:
        params: iterable of params or of dicts defining param groups.
        lr: learning rate :math:`\eta` (a float, or a 0-d tensor to avoid recompiles under
            ``torch.compile`` when a scheduler changes it).
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`, added to the denominator and to the norms in the projection.
        weight_decay: decoupled weight decay :math:`\lambda`.
        delta: threshold :math:`\delta` of the scale-invariance test.
        wd_ratio: :math:`\rho`, weight-decay multiplier for projected params.
        nesterov: use the Nesterov-style momentum above.
        caution: Cautious AdamP, as timm 1.0.31's ``caution=True`` (Liang et al., "Cautious Optimizers",
            arXiv:2411.16085): the update keeps only the entries whose sign agrees with the gradient's (with
            its radial part removed when projected), rescaled by the inverse of the kept fraction (at most
            1000x), and is projected again; see :mod:`adamp_core.caution`. Default False: adamp 0.3.0.
        maximize: maximize the objective (the update uses :math:`-g`).
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq`` (default: the param's); e.g. ``torch.float32``
            for bfloat16/float16 params. The maths of 16-bit params always runs in float32.
        skip_nonfinite: if True, a param whose grad has a NaN/inf entry is left as it was, param and
            state (``step`` does not advance), and ``state["nonfinite_skips"]`` (a 0-d int64 tensor) counts it; read it
            with ``int(opt.state[p]["nonfinite_skips"])`` (one sync) when you want to know. Default:
            NaN/inf flow into param and state as the arithmetic gives, as in adamp 0.3.0.
        fused: None (default) updates plain contiguous float32/float64 CPU tensors with the fused kernels
            of :mod:`adamp_core.paths.numba_fused` (two passes over memory, tested against the array-API step) when
            numba is installed, and everything else with the array-API step; False always takes the
            array-API step; True is None but requires numba. Inside ``torch.compile(opt.step)`` a CPU
            step calls the same kernels as one operator (``torch.ops.adamp_xp.numba_step``; faster than
            inductor's code for the array-API step, adamp_xp/bench/compiled.py); False lets inductor
            compile the array-API step; ``"triton"`` calls the Triton kernels' operator.
        foreach: None (default) or True updates the tensors that take the array-API step (CUDA, 16-bit,
            non-contiguous, ``fused=False``) together with :mod:`adamp_core.paths.multi_tensor`: a fixed number of
            operators per group of one dtype and device, whatever its number of tensors (the GPU path); False
            steps them one at a time. Not inside ``torch.compile`` or with diagnostics on.
        capturable: torch's name and meaning: the step can be captured in a CUDA graph
            (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``). Step counts always stay on the
            param's device and no path reads a device value on the host, so the step is the same either way;
            True also requires a tensor ``lr`` to be on the params' device (a CPU tensor would be read at
            capture). Capture after one eager step (state, plans and kernel tables are made then) with grads
            kept in the same tensors, as for ``torch.optim.AdamW(capturable=True)``.

    State per param: ``step`` (0-d int64 tensor on the param's device; a Python int in
    :meth:`state_dict`, as adamp 0.3.0 stores it), ``exp_avg``, ``exp_avg_sq``.
    """

    _spec = ADAMP

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False, caution: bool = False, *,
                 maximize: bool = False,
                 state_dtype: torch.dtype | str | None = None, skip_nonfinite: bool = False, fused: bool | None = None,
                 foreach: bool | None = None, capturable: bool = False) -> None:
        super().__init__(params, locals())
