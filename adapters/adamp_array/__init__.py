r"""adamp_array: AdamP and SGDP (Heo et al., ICLR 2021) as stateful optimizers over NumPy, CuPy,
PyTorch (tensors used as plain arrays), JAX, array-api-strict or any array-API arrays.

>>> import numpy as np, adamp_array
>>> w = np.ones((4, 3)); b = np.zeros(4)
>>> opt = adamp_array.AdamP([w, b], lr=1e-2, weight_decay=1e-2)
>>> _ = opt.step([np.full((4, 3), 0.1), np.full(4, 0.1)])   # w and b are updated in place

Thin adapters: every update is ``adamp_core``'s (paper Algorithms 1 and 2, matching
``adamp==0.3.0``); this package only keeps param groups and states and writes results back.

* ``params``: a list, tuple or dict of arrays, or a list of param-group dicts
  ``{"params": [...], "lr": ...}`` whose hyperparameters override the defaults.
* ``opt.step(grads)``: grads in the same structure (for groups, a list with one container per
  group); a ``None`` grad skips its param. Arrays whose library allows writing (NumPy, CuPy, torch,
  array-api-strict over writeable memory) are updated **in place**; immutable ones (JAX, read-only
  NumPy) are replaced by new arrays that the optimizer holds: read them from ``opt.params`` (also
  returned by ``step``).
* Every group's hyperparameters and every grad are checked before any param or state changes.
* ``opt.param_groups[i]["lr"] = ...`` edits a group's hyperparameters (checked at the next step).
* Non-finite grads: NaN/inf flow into params and state as the arithmetic gives (as ``adamp==0.3.0``).
  With ``skip_nonfinite=True`` (keyword only) a param whose grad has a NaN/inf entry is left as it
  was, param and state (the step count does not advance), and ``opt.nonfinite_skips`` counts it.
* ``fused`` (keyword only, default None): writeable C-contiguous float32/float64 NumPy params with
  state of their dtype are updated by the two-pass kernels of :mod:`adamp_core.paths.numba_fused` when numba is
  installed, params and state in place (tested against the array-API step); False: always the
  array-API step; True: as None, and numba is required.
* ``foreach`` (keyword only, default None): the arrays that take the array-API step (CuPy, torch,
  JAX, ``fused=False``, ...) are updated together with :mod:`adamp_core.paths.multi_tensor`, one set of array
  operations per group of equal row length, library, dtype and device instead of per array (the GPU
  path); False: one array at a time.
* ``state_dict()`` / ``load_state_dict()``: the ``torch.optim`` layout (state keys ``step``,
  ``exp_avg``, ``exp_avg_sq`` / ``momentum`` as in ``adamp==0.3.0``), loadable onto another library
  or device; ``numpy.savez(f, **flatten_state_dict(sd))`` saves it and
  ``opt.load_state_dict(numpy.load(f))`` restores it.
"""

from __future__ import annotations

from typing import Any

from adamp_core.optimizers import ADAMP, REQUIRED
from adamp_core.optimizers import SGDP as SGDP_SPEC

from ._convert import flatten_state_dict, unflatten_state_dict
from ._optimizer import ArrayOptimizer

__all__ = ["AdamP", "SGDP", "flatten_state_dict", "unflatten_state_dict"]


class AdamP(ArrayOptimizer):
    r"""AdamP (paper Algorithm 2) over arrays of any array-API library.

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        p_t = \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon},

    .. math::

        w_{t+1} = w_t (1 - \eta\lambda r) - \frac{\eta}{1-\beta_1^t}\,\Pi_{w_t}(p_t),

    where :math:`\Pi_{w_t}` removes the radial part of the update when :math:`w_t` looks scale-invariant
    (and :math:`r` is then ``wd_ratio``, else 1). Keyword names and defaults are ``adamp.AdamP``'s;
    ``caution=True`` is Cautious AdamP as in timm 1.0.31 (:mod:`adamp_core.caution`).

    ``state_dtype`` (keyword only, default the param's dtype) keeps the moments in another floating
    dtype, e.g. ``"float32"`` for float16 params.
    """

    _spec = ADAMP

    def __init__(self, params: Any, lr: Any = 1e-3, betas: tuple[Any, Any] = (0.9, 0.999), eps: Any = 1e-8,
                 weight_decay: Any = 0.0, delta: Any = 0.1, wd_ratio: Any = 0.1, nesterov: bool = False,
                 caution: bool = False, *, state_dtype: Any = None, skip_nonfinite: bool = False,
                 fused: bool | None = None, foreach: bool | None = None) -> None:
        super().__init__(params, locals())


class SGDP(ArrayOptimizer):
    r"""SGDP (paper Algorithm 1) over arrays of any array-API library.

    .. math::

        b_t = \mu b_{t-1} + (1-\tau) g_t,\quad p_t = g_t + \mu b_t \text{ (nesterov) or } b_t,\quad
        w_{t+1} = w_t\Big(1 - \frac{\eta\lambda r}{1-\mu}\Big) - \eta\,\Pi_{w_t}(p_t).

    Keyword names and defaults are ``adamp.SGDP``'s; ``lr`` is required (as a keyword or in every
    param group). Without nesterov the stored buffer is the projected one, as in ``adamp==0.3.0``;
    ``project_buffer=False`` keeps it unprojected (Algorithm 1 as printed, timm's SGDP). ``caution=True``:
    Cautious SGDP as in timm 1.0.31 (:mod:`adamp_core.caution`).
    ``state_dtype`` (keyword only) keeps the momentum buffer in another floating dtype.
    """

    _spec = SGDP_SPEC

    def __init__(self, params: Any, lr: Any = REQUIRED, momentum: Any = 0.0, dampening: Any = 0.0,
                 weight_decay: Any = 0.0, nesterov: bool = False, eps: Any = 1e-8, delta: Any = 0.1,
                 wd_ratio: Any = 0.1, caution: bool = False, project_buffer: bool = True, *,
                 state_dtype: Any = None, skip_nonfinite: bool = False, fused: bool | None = None,
                 foreach: bool | None = None) -> None:
        super().__init__(params, locals())
