r"""``torch.optim`` SGDP: a drop-in for ``adamp.SGDP`` (0.3.0) whose maths is :mod:`adamp_core`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from adamp_core import fused as _fused
from adamp_core.grouped import sgdp_update_group
from adamp_core.hyperparams import SGDP_DEFAULTS, SGDPHyperparams, check_sgdp
from adamp_core.sgdp import SGDPState, sgdp_update

from ._base import XP, ProjectedOptimizer, no_grad_step, normalize_state_dtype, required
from ._distributed import local_shards

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
    *projected* one, :math:`b_t \leftarrow q_t` (the official code projects the buffer in place).

    Args:
        params: iterable of params or of dicts defining param groups.
        lr: learning rate :math:`\eta` (required, as in adamp 0.3.0; may instead be given by
            every param group).
        momentum: :math:`\mu`. dampening: :math:`\tau`. weight_decay: :math:`\lambda`.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        eps, delta, wd_ratio: as in :class:`adamp_torch.AdamP`.
        maximize: maximize the objective (the update uses :math:`-g`).
        state_dtype: dtype of the ``momentum`` buffer (default: the param's).
        skip_nonfinite: if True, a param whose grad has a NaN/inf entry is left as it was, param and
            state, and ``state["nonfinite_skips"]`` (a 0-d int64 tensor) counts it; read it
            with ``int(opt.state[p]["nonfinite_skips"])`` (one sync) when you want to know. Default:
            NaN/inf flow into param and state as the arithmetic gives, as in adamp 0.3.0.
        fused: the fused CPU kernels of :mod:`adamp_core.fused` where they apply, as in
            :class:`adamp_torch.AdamP`.
        foreach: the multi-tensor step of :mod:`adamp_core.grouped` for the rest, as in
            :class:`adamp_torch.AdamP`.

    State per param: ``momentum``, as adamp 0.3.0 names it.
    """

    _name = "SGDP"
    _state_keys = ("momentum",)
    _has_step = False
    _group_keys = tuple(dict.fromkeys(("lr", *SGDP_DEFAULTS)))  # what a saved group must have (adamp 0.3.0's keys)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = required,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        maximize: bool = False,
        state_dtype: torch.dtype | str | None = None,
        skip_nonfinite: bool = False,
        fused: bool | None = None,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            maximize=maximize,
            state_dtype=normalize_state_dtype(state_dtype),
            skip_nonfinite=skip_nonfinite,
            fused=fused,
            foreach=foreach,
        )
        # lr may be left to the param groups (adamp 0.3.0 uses torch's `required` too).
        self._check_hyper({**defaults, "lr": 0.0} if lr is required else defaults)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> SGDPHyperparams:
        self._check_flags(group)
        return check_sgdp(
            group["lr"],
            group["momentum"],
            group["dampening"],
            group["weight_decay"],
            group["nesterov"],
            group["eps"],
            group["delta"],
            group["wd_ratio"],
        )

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        momentum_buffers: list[torch.Tensor],
    ) -> None:
        """Collect the group's params that have a grad, creating their state on first use."""
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state.update(self._new_state(group, p))
            params.append(p)
            grads.append(p.grad)
            momentum_buffers.append(state["momentum"])

    @no_grad_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` runs with grad enabled. Returns its loss or
        ``None``. Every grad and hyperparameter is checked before any param or state is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hypers = self._check_grads()
        for group, hp in zip(self.param_groups, hypers, strict=True):
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            maximize, skip = group["maximize"], group["skip_nonfinite"]
            use_fused, use_foreach = self._fused_group(group), self._foreach_group(group)
            batch: list[tuple[Any, ...]] = []  # small fusable tensors: one kernel call for all of them
            together: list[tuple[Any, ...]] = []  # the rest: the multi-tensor array-API step
            for p, g, b in zip(params, grads, bufs, strict=True):
                counter = self._skip_counter(p) if skip else None
                # DTensor (FSDP2): the core runs on the local rows; `rows` reduces over all of them.
                param, (p, g, (b,), rows) = p, local_shards(p, g, b)
                gs = torch.neg(g) if maximize else g
                if use_fused and rows is None:
                    if self._batchable(p, gs, b):
                        batch.append((param, p, gs, (b,), None, counter))
                        continue
                    if self._fused_step(param, p, gs, b, hp, skip, counter):
                        continue
                if use_foreach and rows is None:
                    together.append((param, p, gs, (b,), None, counter))
                    continue
                self._array_api_step(param, p, gs, b, hp, skip, counter, rows)
            if batch:
                for param, p, gs, (b,), _, counter in self._fused_batch(batch, hp, skip):
                    self._array_api_step(param, p, gs, b, hp, skip, counter, None)
            if together:
                self._grouped_steps(together, hp, skip)
        return loss

    _update_group = staticmethod(sgdp_update_group)

    @staticmethod
    def _core_state(t: Any, bufs: tuple[Any, ...]) -> SGDPState:
        return SGDPState(*bufs)

    def _entry_step(self, entry: tuple[Any, ...], hp: Any, skip: bool) -> None:
        param, p, g, (b,), _, counter = entry
        self._array_api_step(param, p, g, b, hp, skip, counter, None)

    def _array_api_step(self, param: Any, p: Any, g: Any, b: Any, hp: Any, skip: bool, counter: Any, rows: Any) -> None:
        """The step of ``p`` by :func:`adamp_core.sgdp.sgdp_update`, written back in place."""
        new_p, new = sgdp_update(XP, p, g, SGDPState(b), hp, rows)
        if skip:  # a non-finite grad leaves param and buffer as they were
            new_p, new = self._keep_if_finite(counter, g, new_p, new, p, SGDPState(b), rows)
        if self._diagnostics is not None:
            self._record(param, p, new_p, g, hp)
        b.copy_(new.momentum)
        p.copy_(new_p)

    def _fused_step(self, param: Any, p: Any, g: Any, b: Any, hp: Any, skip: bool, counter: Any) -> bool:
        """The step of ``p`` by :func:`adamp_core.fused.sgdp_inplace` when it applies (see
        :meth:`adamp_torch.AdamP._fused_step`); False when the array-API step must run instead."""
        arrays = self._fused_views(p, g, b)
        if arrays is None:
            return False
        old = p.clone() if self._diagnostics is not None else None
        status, _ = _fused.sgdp_inplace(*arrays, hp, skip)
        if status == _fused.FALLBACK:
            return False
        if status == _fused.SKIPPED:
            counter.add_(1)
        elif old is not None:
            self._record(param, old, p, g, hp)
        return True
