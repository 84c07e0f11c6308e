"""One spec per optimizer: what differs between AdamP and SGDP, in one place.

Every entry point takes its hyperparameters from here (names, order, defaults, the check that gives the
exact error messages), and the dispatcher (:mod:`adamp_core.dispatch`) its functions: the state's
fields, the init, the unchecked step of one tensor, the step of a group of tensors and the fused kernels.
The core functions, :mod:`adamp_core.tree` and the adapters spell their signatures out (for readers and
IDEs); ``tests/test_spec.py`` checks each against its spec.

>>> from adamp_core.optimizers import ADAMP
>>> ADAMP.names
('lr', 'betas', 'eps', 'weight_decay', 'delta', 'wd_ratio', 'nesterov')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import hyperparams
from .adamp import AdamPState, adamp_init, adamp_update, check_adamp_state
from .grouped import adamp_update_group, sgdp_update_group
from .sgdp import SGDPState, check_sgdp_state, sgdp_init, sgdp_update

__all__ = ["ADAMP", "REQUIRED", "SGDP", "OptimizerSpec"]


class _Required:
    """The default of a hyperparameter that has none (SGDP's ``lr``, as in ``adamp==0.3.0``)."""

    def __repr__(self) -> str:
        return "<required parameter>"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class OptimizerSpec:
    """What an entry point needs to know of one optimizer (see the module docstring)."""

    name: str  # "AdamP" / "SGDP": the class name of the official package
    defaults: dict[str, Any]  # every hyperparameter in the official signature's order; REQUIRED: no default
    check: Callable[..., Any]  # keyword hyperparameters -> the validated NamedTuple (or raises)
    state: type  # AdamPState / SGDPState: the per-param state, a NamedTuple of arrays (and a step count)
    init: Callable[..., Any]  # param, *, state_dtype -> fresh state
    check_state: Callable[[Any, Any], None]  # param, state -> None or raises
    update: Callable[..., Any]  # xp, param, grad, state, hp, rows=None -> (new param, new state); unchecked
    update_group: Callable[..., Any]  # adamp_core.grouped: xp, params, grads, states, hp, skip -> (ps, ss, ok)
    kernel: str  # the fused kernels' name in adamp_core.fused ("adamp" -> adamp_inplace / adamp_batch)

    @property
    def names(self) -> tuple[str, ...]:
        """The hyperparameters, in the official signature's order."""
        return tuple(self.defaults)

    @property
    def has_step(self) -> bool:
        """Whether the state counts steps (AdamP's bias corrections); its other fields are arrays."""
        return "step" in self.state._fields

    @property
    def buffers(self) -> tuple[str, ...]:
        """The state's arrays, shaped like the param (``exp_avg``, ``exp_avg_sq``; ``momentum``)."""
        return tuple(f for f in self.state._fields if f != "step")

    def checked(self, values: dict[str, Any]) -> Any:
        """The validated hyperparameters of ``values`` (a dict holding every name)."""
        return self.check(**{n: values[n] for n in self.names})


# Name, hyperparameters with their defaults (the official signature), check, state, init, state check, the
# per-tensor step, the group step, the fused kernels' name.
ADAMP = OptimizerSpec("AdamP", dict(hyperparams.ADAMP_DEFAULTS), hyperparams.check_adamp, AdamPState, adamp_init,
                      check_adamp_state, adamp_update, adamp_update_group, "adamp")
SGDP = OptimizerSpec("SGDP", {"lr": REQUIRED, **hyperparams.SGDP_DEFAULTS}, hyperparams.check_sgdp, SGDPState,
                     sgdp_init, check_sgdp_state, sgdp_update, sgdp_update_group, "sgdp")
