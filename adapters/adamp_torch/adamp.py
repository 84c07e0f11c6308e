r"""``torch.optim`` AdamP: a drop-in for ``adamp.AdamP`` (0.3.0) whose maths is :mod:`adamp_core`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from adamp_core import fused as _fused
from adamp_core.adamp import AdamPState, adamp_update
from adamp_core.grouped import adamp_update_group
from adamp_core.hyperparams import ADAMP_DEFAULTS, AdamPHyperparams, check_adamp

from ._base import XP, ProjectedOptimizer, no_grad_step, normalize_state_dtype
from ._distributed import local_shards

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
        maximize: maximize the objective (the update uses :math:`-g`).
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq`` (default: the param's); e.g. ``torch.float32``
            for bfloat16/float16 params. The maths of 16-bit params always runs in float32.
        skip_nonfinite: if True, a param whose grad has a NaN/inf entry is left as it was, param and
            state (``step`` does not advance), and ``state["nonfinite_skips"]`` (a 0-d int64 tensor) counts it; read it
            with ``int(opt.state[p]["nonfinite_skips"])`` (one sync) when you want to know. Default:
            NaN/inf flow into param and state as the arithmetic gives, as in adamp 0.3.0.
        fused: None (default) updates plain contiguous float32/float64 CPU tensors with the fused kernels
            of :mod:`adamp_core.fused` (two passes over memory, tested against the array-API step) when
            numba is installed, and everything else with the array-API step; False always takes the
            array-API step; True is None but requires numba. Inside ``torch.compile`` the array-API
            step always runs (it traces into one graph).
        foreach: None (default) or True updates the tensors that take the array-API step (CUDA, 16-bit,
            non-contiguous, ``fused=False``) together with :mod:`adamp_core.grouped`: one set of kernels
            per group of equal row length, dtype and device instead of per tensor (the GPU path); False
            steps them one at a time. Not inside ``torch.compile`` or with diagnostics on.

    State per param: ``step`` (0-d int64 tensor on the param's device; a Python int in
    :meth:`state_dict`, as adamp 0.3.0 stores it), ``exp_avg``, ``exp_avg_sq``.
    """

    _name = "AdamP"
    _state_keys = ("exp_avg", "exp_avg_sq")
    _has_step = True
    _group_keys = tuple(dict.fromkeys(("lr", *ADAMP_DEFAULTS)))  # what a saved group must have (adamp 0.3.0's keys)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        state_dtype: torch.dtype | str | None = None,
        skip_nonfinite: bool = False,
        fused: bool | None = None,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            maximize=maximize,
            state_dtype=normalize_state_dtype(state_dtype),
            skip_nonfinite=skip_nonfinite,
            fused=fused,
            foreach=foreach,
        )
        self._check_hyper(defaults)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> AdamPHyperparams:
        self._check_flags(group)
        return check_adamp(
            group["lr"],
            group["betas"],
            group["eps"],
            group["weight_decay"],
            group["delta"],
            group["wd_ratio"],
            group["nesterov"],
        )

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        steps: list[torch.Tensor],
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
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

    @no_grad_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` (re-evaluating the model and returning the
        loss) runs with grad enabled. Returns the closure's loss, or ``None``.

        Every grad and hyperparameter of every group is checked before any param or state is
        written; a sparse, complex, or mismatched (shape, dtype, device) grad raises.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hypers = self._check_grads()
        for group, hp in zip(self.param_groups, hypers, strict=True):
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            steps: list[torch.Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, steps)
            maximize, skip = group["maximize"], group["skip_nonfinite"]
            use_fused, use_foreach = self._fused_group(group), self._foreach_group(group)
            batch: list[tuple[Any, ...]] = []  # small fusable tensors: one kernel call for all of them
            advanced: list[torch.Tensor] = []  # step counts of the large tensors the kernels updated
            together: list[tuple[Any, ...]] = []  # the rest: the multi-tensor array-API step
            for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
                counter = self._skip_counter(p) if skip else None
                # DTensor (FSDP2): the core runs on the local rows; `rows` reduces over all of them.
                param, (p, g, (m, v), rows) = p, local_shards(p, g, m, v)
                gs = torch.neg(g) if maximize else g
                if use_fused and rows is None:
                    if self._batchable(p, gs, m, v):
                        batch.append((param, p, gs, (m, v), t, counter))
                        continue
                    if self._fused_step(param, p, gs, m, v, t, hp, skip, counter, advanced):
                        continue
                if use_foreach and rows is None:
                    together.append((param, p, gs, (m, v), t, counter))
                    continue
                self._array_api_step(param, p, gs, m, v, t, hp, skip, counter, rows)
            if advanced:
                torch._foreach_add_(advanced, 1)  # one call instead of a tensor op per param
            if batch:
                for param, p, gs, (m, v), t, counter in self._fused_batch(batch, hp, skip):
                    self._array_api_step(param, p, gs, m, v, t, hp, skip, counter, None)
            if together:
                self._grouped_steps(together, hp, skip)
        return loss

    _update_group = staticmethod(adamp_update_group)

    @staticmethod
    def _core_state(t: Any, bufs: tuple[Any, ...]) -> AdamPState:
        return AdamPState(t, *bufs)

    def _entry_step(self, entry: tuple[Any, ...], hp: Any, skip: bool) -> None:
        param, p, g, (m, v), t, counter = entry
        self._array_api_step(param, p, g, m, v, t, hp, skip, counter, None)

    def _array_api_step(
        self, param: Any, p: Any, g: Any, m: Any, v: Any, t: Any, hp: Any, skip: bool, counter: Any, rows: Any
    ) -> None:
        """The step of ``p`` by :func:`adamp_core.adamp.adamp_update` (``g``: the grad, negated for
        ``maximize``), written back in place: params and state keep their identity, device and memory
        format."""
        new_p, new = adamp_update(XP, p, g, AdamPState(t, m, v), hp, rows)
        if skip:  # a non-finite grad leaves param and state (step included) as they were
            new_p, new = self._keep_if_finite(counter, g, new_p, new, p, AdamPState(t, m, v), rows)
        if self._diagnostics is not None:
            self._record(param, p, new_p, g, hp)
        t.copy_(new.step)
        m.copy_(new.exp_avg)
        v.copy_(new.exp_avg_sq)
        p.copy_(new_p)

    def _fused_step(
        self,
        param: Any,
        p: Any,
        g: Any,
        m: Any,
        v: Any,
        t: Any,
        hp: Any,
        skip: bool,
        counter: Any,
        advanced: list[torch.Tensor],
    ) -> bool:
        """The step of ``p`` by :func:`adamp_core.fused.adamp_inplace` when it applies; False when the
        array-API step must run instead (not a plain contiguous float32/float64 CPU tensor, or float64
        sums out of the kernels' range). The step count ``t`` is appended to ``advanced`` (the caller
        advances them all at once)."""
        arrays = self._fused_views(p, g, m, v)
        if arrays is None:
            return False
        old = p.clone() if self._diagnostics is not None else None
        status, _ = _fused.adamp_inplace(*arrays, int(t) + 1, hp, skip)  # a CPU tensor: no sync to read t
        if status == _fused.FALLBACK:
            return False
        if status == _fused.SKIPPED:
            counter.add_(1)
            return True
        advanced.append(t)
        if old is not None:
            self._record(param, old, p, g, hp)
        return True
