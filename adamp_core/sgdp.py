r"""SGDP: SGD with momentum and the radial projection (Heo et al., ICLR 2021, Algorithm 1).

.. math::

    b_t &= \mu b_{t-1} + (1-\tau) g_t \\
    p_t &= g_t + \mu b_t \text{ (nesterov) or } b_t \\
    q_t &= \Pi_{w_t}(p_t) \text{ if } w_t \text{ is scale-invariant, else } p_t \\
    w_{t+1} &= w_t \Big(1 - \frac{\eta\lambda r}{1-\mu}\Big) - \eta q_t,
           \qquad r = \text{wd\_ratio if projected else } 1

with momentum :math:`\mu`, dampening :math:`\tau`, weight decay :math:`\lambda`, exactly as
``adamp.SGDP`` 0.3.0. Without nesterov the official code projects ``p_t`` *in place*, and since
``p_t`` is then the momentum buffer itself, the stored buffer is the projected one,
:math:`b_t \leftarrow q_t`. We reproduce that (it is what the published results used) by default;
``project_buffer=False`` keeps :math:`b_t` as Algorithm 1 prints it (timm's SGDP).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._common import check_state_arrays, checked_step, reread, scalar, state_zeros
from .arrays import check_array, compute_dtype, device
from .caution import cautious
from .hyperparams import SGDPHyperparams, check_sgdp
from .projection import RowReduce, per_row, project_update_parts, projects

__all__ = ["SGDPState", "sgdp_init", "sgdp_step"]


class SGDPState(NamedTuple):
    """State of one SGDP param: the momentum buffer."""

    momentum: Any


def sgdp_init(param: Any, *, state_dtype: Any = None) -> SGDPState:
    """Fresh state for ``param``: a zero momentum buffer in ``state_dtype`` (default: the param's)."""
    xp = check_array(param)
    return SGDPState(state_zeros(xp, param, state_dtype))


def check_sgdp_state(param: Any, state: Any) -> None:
    if not isinstance(state, SGDPState):
        raise TypeError(f"state must be an SGDPState (from sgdp_init), got {type(state).__name__}")
    check_state_arrays(param, momentum=state.momentum)


def sgdp_step(param: Any, grad: Any, state: SGDPState, lr: Any, momentum: Any = 0.0, dampening: Any = 0.0,
              weight_decay: Any = 0.0, nesterov: bool = False, eps: Any = 1e-8, delta: Any = 0.1, wd_ratio: Any = 0.1,
              caution: bool = False, project_buffer: bool = True, *,
              skip_nonfinite: bool = False) -> tuple[Any, SGDPState]:
    r"""One SGDP step (Heo et al., ICLR 2021, Algorithm 1); returns ``(new_param, new_state)``.

    .. math::

        b_t = \mu b_{t-1} + (1-\tau) g_t, \qquad
        w_{t+1} = w_t \Big(1 - \frac{\eta\lambda r}{1-\mu}\Big) - \eta\, \Pi_{w_t}(p_t)

    with :math:`p_t = b_t` (or :math:`g_t + \mu b_t` with nesterov), :math:`\Pi_{w}` the radial
    projection on the first scale-invariant view (identity otherwise) and :math:`r` = ``wd_ratio``
    when projected, else 1. Without nesterov the stored buffer is the projected :math:`p_t`, as in
    adamp 0.3.0; ``project_buffer=False`` keeps the unprojected :math:`b_t`, as Algorithm 1 is printed
    (and as timm 1.0.31's SGDP does). ``caution=True``: Cautious SGDP (timm's ``caution``; see
    :mod:`adamp_core.caution`; the buffer is never masked). Never writes its inputs; sync-free.
    Params with ``ndim <= 1`` take the plain SGD step with full weight decay.
    Raises ``ValueError``/``TypeError`` before computing anything if a hyperparameter,
    the grad or the state does not fit the param.

    Non-finite gradients: by default NaN/inf propagate into the param and the state exactly as the
    arithmetic gives (as in ``adamp==0.3.0`` and ``torch.optim``). With ``skip_nonfinite=True`` a
    gradient with any NaN/inf entry leaves ``param`` and ``state`` as they are; the test is
    :func:`adamp_core.all_finite` and the choice an ``xp.where`` (sync-free).
    """
    hp = check_sgdp(lr, momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio, caution, project_buffer)
    return checked_step(param, grad, state, hp, check_sgdp_state, sgdp_update, skip_nonfinite)


def sgdp_update(
    xp: Any, param: Any, grad: Any, state: SGDPState, hp: SGDPHyperparams, rows: RowReduce | None = None
) -> tuple[Any, SGDPState]:
    """:func:`sgdp_step` without the checks (callers have validated everything). ``rows``: see
    :class:`adamp_core.projection.RowReduce` (for a param whose rows are sharded across processes)."""
    cdt = compute_dtype(xp, param.dtype)
    lr, mu = scalar(xp, hp.lr, cdt), scalar(xp, hp.momentum, cdt)
    # Half-precision params and state are promoted: all maths and reductions in float32.
    w = xp.astype(param, cdt, copy=False)
    g = xp.astype(grad, cdt, copy=False)
    old_buf = xp.astype(state.momentum, cdt, copy=False)
    no_damping = isinstance(hp.dampening, float) and hp.dampening == 0.0

    def momentum(g: Any, buf: Any) -> Any:
        # Alg. 1 line 2 (torch SGD form); without dampening (the default) 1 * g == g exactly: skip that pass.
        return mu * buf + (g if no_damping else (1 - scalar(xp, hp.dampening, cdt)) * g)

    def direction(g: Any, buf: Any) -> Any:
        return g + mu * buf if hp.nesterov else buf

    buf = momentum(g, old_buf)
    d_p = direction(g, buf)

    ratio: Any = 1.0
    if projects(rows, param.ndim):  # static: projection only for ndim > 1 (Alg. 1 lines 3-7)
        # JAX: d_p computed again inside the reductions, not stored: from the new buffer where it is stored as it
        # is, from the old one where the stored buffer is the projected d_p (which the reductions decide).
        stored_as_is = hp.nesterov or not hp.project_buffer
        again = reread(xp, g, buf if stored_as_is else old_buf)
        u_stats = None
        if again is not None:
            g_again, buf_again = again if stored_as_is else (again[0], momentum(*again))
            u_stats = direction(g_again, buf_again)
        q, d_p, projected, _ = project_update_parts(xp, w, g, d_p, hp.delta, scalar(xp, hp.eps, cdt), rows,
                                                    caution=hp.caution, u_stats=u_stats)
        ratio = xp.where(projected, xp.asarray(hp.wd_ratio, dtype=cdt, device=device(w)),
                         xp.asarray(1.0, dtype=cdt, device=device(w)))
        ratio = per_row(xp, ratio, w)  # one ratio per tensor, or per row for a group (adamp_core.paths.multi_tensor)
        if not hp.nesterov and hp.project_buffer:
            buf = q  # adamp 0.3.0 projects the buffer itself in place (unmasked: caution masks the step only)
    elif hp.caution:  # a param the projection does not handle: masked against g itself (adamp_core.caution)
        d_p = cautious(xp, d_p, g, rows, w)
    if not (isinstance(hp.weight_decay, float) and hp.weight_decay == 0.0):
        # Decoupled decay scaled by 1 / (1 - momentum), before the step (official sgdp.py).
        w = w * (1 - lr * scalar(xp, hp.weight_decay, cdt) * ratio / (1 - mu))
    w = w + (-lr) * d_p

    new_state = SGDPState(xp.astype(buf, state.momentum.dtype, copy=False))
    return xp.astype(w, param.dtype, copy=False), new_state
