r"""AdamP: Adam with the radial projection (Heo et al., ICLR 2021, Algorithm 2).

.. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    p_t &= \frac{\tilde m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}, \qquad
           \tilde m_t = m_t \text{ or, with nesterov, } \beta_1 m_t + (1-\beta_1) g_t \\
    q_t &= \Pi_{w_t}(p_t) \text{ if } w_t \text{ is scale-invariant, else } p_t \\
    w_{t+1} &= w_t (1 - \eta\lambda r) - \frac{\eta}{1-\beta_1^t} q_t,
           \qquad r = \text{wd\_ratio if projected else } 1

exactly as ``adamp.AdamP`` 0.3.0 computes it (decoupled weight decay applied first).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._common import (
    bias_correction,
    check_state_arrays,
    check_step_count,
    checked_step,
    is_python_int,
    reread,
    scalar,
    state_zeros,
)
from .arrays import check_array, compute_dtype, device, namespace_name
from .caution import cautious
from .hyperparams import AdamPHyperparams, check_adamp
from .projection import RowReduce, per_row, project_update, projects

__all__ = ["AdamPState", "adamp_init", "adamp_step"]


class AdamPState(NamedTuple):
    """State of one AdamP param: step count (int or 0-d integer array) and the two moments."""

    step: Any
    exp_avg: Any
    exp_avg_sq: Any


def adamp_init(param: Any, *, state_dtype: Any = None) -> AdamPState:
    """Fresh state for ``param``: step 0 (a 0-d int32 array on the param's device, so
    ``jax.jit`` traces once) and zero moments placed like the param, in ``state_dtype`` (default:
    the param's dtype; pass ``float32`` to keep bfloat16/float16 params' state in float32)."""
    xp = check_array(param)
    zeros = state_zeros(xp, param, state_dtype)
    # JAX: no device= for the step. A sharded param's device is a sharding of the param's rank (no
    # use for a 0-d array), and an explicit device commits the step, which next to uncommitted
    # params makes jax.jit compile twice; uncommitted, jit places it (as optax's count).
    step = xp.zeros((), dtype=xp.int32, device=None if namespace_name(param) == "jax" else device(param))
    return AdamPState(step, zeros, xp.zeros_like(zeros))


def check_adamp_state(param: Any, state: Any) -> None:
    if not isinstance(state, AdamPState):
        raise TypeError(f"state must be an AdamPState (from adamp_init), got {type(state).__name__}")
    check_step_count(state.step)
    check_state_arrays(param, exp_avg=state.exp_avg, exp_avg_sq=state.exp_avg_sq)


def adamp_step(param: Any, grad: Any, state: AdamPState, lr: Any = 1e-3, betas: tuple[Any, Any] = (0.9, 0.999),
               eps: Any = 1e-8, weight_decay: Any = 0.0, delta: Any = 0.1, wd_ratio: Any = 0.1, nesterov: bool = False,
               caution: bool = False, *, skip_nonfinite: bool = False) -> tuple[Any, AdamPState]:
    r"""One AdamP step (Heo et al., ICLR 2021, Algorithm 2); returns ``(new_param, new_state)``.

    .. math::

        w_{t+1} = w_t (1 - \eta\lambda r) - \frac{\eta}{1-\beta_1^t}\,
                  \Pi_{w_t}\!\Big(\frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}\Big)

    where :math:`\Pi_{w}` removes the radial component on the first scale-invariant view
    (channel, then layer; see :mod:`adamp_core.projection`) and is the identity otherwise, and
    :math:`r` is ``wd_ratio`` when projected, else 1. Never writes its inputs; sync-free.
    Params with ``ndim <= 1`` take the plain AdamW-style step with full weight decay.
    ``caution=True``: Cautious AdamP (timm 1.0.31's ``caution``): the update keeps the entries whose sign
    agrees with the gradient (its radial part removed when projected), rescaled, and is projected again;
    see :mod:`adamp_core.caution`.
    Raises ``ValueError``/``TypeError`` before computing anything if a hyperparameter,
    the grad or the state does not fit the param.

    Non-finite gradients: by default NaN/inf propagate into the param and the state exactly as the
    arithmetic gives (as in ``adamp==0.3.0`` and ``torch.optim``). With ``skip_nonfinite=True`` a
    gradient with any NaN/inf entry leaves ``param`` and ``state`` as they are (the step count does
    not advance); the test is :func:`adamp_core.all_finite` and the choice an ``xp.where``
    (sync-free, except with a Python-int ``state.step``, where the flag is read on the host).
    """
    hp = check_adamp(lr, betas, eps, weight_decay, delta, wd_ratio, nesterov, caution)
    return checked_step(param, grad, state, hp, check_adamp_state, adamp_update, skip_nonfinite)


def adamp_update(
    xp: Any, param: Any, grad: Any, state: AdamPState, hp: AdamPHyperparams, rows: RowReduce | None = None
) -> tuple[Any, AdamPState]:
    """:func:`adamp_step` without the checks (callers have validated everything). ``rows``: see
    :class:`adamp_core.projection.RowReduce` (for a param whose rows are sharded across processes)."""
    cdt = compute_dtype(xp, param.dtype)
    lr, eps = scalar(xp, hp.lr, cdt), scalar(xp, hp.eps, cdt)
    beta1, beta2 = (scalar(xp, b, cdt) for b in hp.betas)
    # Half-precision params and state are promoted: all maths and reductions in float32.
    w = xp.astype(param, cdt, copy=False)
    g = xp.astype(grad, cdt, copy=False)
    m = xp.astype(state.exp_avg, cdt, copy=False)
    v = xp.astype(state.exp_avg_sq, cdt, copy=False)

    step = state.step + 1
    bc1 = bias_correction(xp, beta1, step, cdt)
    bc2 = bias_correction(xp, beta2, step, cdt)

    sqrt_bc2 = math.sqrt(bc2) if isinstance(bc2, float) else xp.sqrt(bc2)

    m = beta1 * m + (1 - beta1) * g  # Alg. 2 line 2
    v = beta2 * v + (1 - beta2) * g * g  # Alg. 2 line 3

    def direction(g: Any, m: Any, v: Any) -> Any:
        denom = xp.sqrt(v) / sqrt_bc2 + eps  # Alg. 2 line 4, bias-corrected as adamp 0.3.0
        return ((beta1 * m + (1 - beta1) * g) if hp.nesterov else m) / denom

    u = direction(g, m, v)
    step_size = lr / bc1

    ratio: Any = 1.0
    if projects(rows, param.ndim):  # static: projection only for ndim > 1 (Alg. 2 lines 5-9)
        again = reread(xp, g, m, v)  # JAX: u computed again inside the reductions, not stored
        u, projected, _ = project_update(xp, w, g, u, hp.delta, eps, rows, caution=hp.caution,
                                         u_stats=None if again is None else direction(*again))
        ratio = xp.where(projected, xp.asarray(hp.wd_ratio, dtype=cdt, device=device(w)),
                         xp.asarray(1.0, dtype=cdt, device=device(w)))
        ratio = per_row(xp, ratio, w)  # one ratio per tensor, or per row for a group (adamp_core.paths.multi_tensor)
    elif hp.caution:  # a param the projection does not handle: masked against g itself (adamp_core.caution)
        u = cautious(xp, u, g, rows, w)
    if not (isinstance(hp.weight_decay, float) and hp.weight_decay == 0.0):
        w = w * (1 - lr * scalar(xp, hp.weight_decay, cdt) * ratio)  # decoupled decay, before the step
    w = w + (-step_size) * u

    new_state = AdamPState(
        step if not is_python_int(state.step) else int(step),
        xp.astype(m, state.exp_avg.dtype, copy=False),
        xp.astype(v, state.exp_avg_sq.dtype, copy=False),
    )
    return xp.astype(w, param.dtype, copy=False), new_state
