"""One spec per optimizer: what differs between AdamP and SGDP, in one place.

Every entry point takes its hyperparameters from here (names, order, defaults, the check that gives the
exact error messages) and its state's layout (fields, init, check); the execution paths
(:mod:`adamp_core.paths`) take the unchecked step of one tensor (the ground truth) and pick their kernels
by ``key``. A leaf: it imports the maths and the checks, no execution path.
The core functions, :mod:`adamp_core.tree` and the adapters spell their signatures out (for readers and
IDEs); ``tests/test_spec.py`` checks each against its spec.

>>> from adamp_core.optimizers import ADAMP
>>> ADAMP.names
('lr', 'betas', 'eps', 'weight_decay', 'delta', 'wd_ratio', 'nesterov', 'caution')
>>> ADAMP.official
('lr', 'betas', 'eps', 'weight_decay', 'delta', 'wd_ratio', 'nesterov')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import hyperparams
from .adamp import AdamPState, adamp_init, adamp_update, check_adamp_state
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
    defaults: dict[str, Any]  # the official signature's hyperparameters, in its order; REQUIRED: no default
    check: Callable[..., Any]  # keyword hyperparameters -> the validated NamedTuple (or raises)
    state: type  # AdamPState / SGDPState: the per-param state, a NamedTuple of arrays (and a step count)
    init: Callable[..., Any]  # param, *, state_dtype -> fresh state
    check_state: Callable[[Any, Any], None]  # param, state -> None or raises
    update: Callable[..., Any]  # xp, param, grad, state, hp, rows=None -> (new param, new state); unchecked
    key: str  # "adamp" / "sgdp": how each execution path names its kernels for this optimizer
    options: dict[str, Any]  # hyperparameters beyond the official signature (caution...), with their defaults

    # Derived once here, as plain attributes: Python 3.11's cached_property takes a lock, which a compiled
    # step's trace (torch.compile) cannot enter, and a failed trace runs the whole frame eagerly.
    official: tuple[str, ...] = field(init=False, compare=False)  # adamp 0.3.0's hyperparameters, in its order
    names: tuple[str, ...] = field(init=False, compare=False)  # every hyperparameter: official, then options
    all_defaults: dict[str, Any] = field(init=False, compare=False)  # {name: default} of names, in order
    has_step: bool = field(init=False, compare=False)  # the state counts steps (AdamP's bias corrections)
    buffers: tuple[str, ...] = field(init=False, compare=False)  # the state's arrays, shaped like the param

    def __post_init__(self) -> None:
        derived = {
            "official": tuple(self.defaults),
            "names": (*self.defaults, *self.options),
            "all_defaults": {**self.defaults, **self.options},
            "has_step": "step" in self.state._fields,
            "buffers": tuple(f for f in self.state._fields if f != "step"),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def checked(self, values: dict[str, Any]) -> Any:
        """The validated hyperparameters of ``values`` (a dict holding every official name; an absent option
        takes its default). Python numbers checked before are not checked again: a param group's
        hyperparameters are validated once per change (an LR schedule: once per new lr), not once per step.
        The key holds each value's type (``True`` and ``1`` are not the same flag); a group with an array or
        any other object among its values is checked at every call."""
        kwargs = {n: values[n] for n in self.defaults} | {n: values.get(n, d) for n, d in self.options.items()}
        key = tuple(map(_typed, kwargs.values()))
        if None in key:
            return self.check(**kwargs)
        hit = _CHECKED.get((self.name, key))
        if hit is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hit = self.check(**kwargs)
            for w in caught:  # passed on as raised; values that warn are checked (and warn) at every call
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            if not caught:
                if len(_CHECKED) >= 256:
                    _CHECKED.clear()
                _CHECKED[(self.name, key)] = hit
        return hit


_CHECKED: dict[Any, Any] = {}  # (optimizer, typed values) -> validated hyperparameters


def _typed(v: Any) -> Any:
    """``(type, value)`` of a plain Python value (a tuple of them: the same, nested); None for anything else."""
    if type(v) is tuple:
        items = tuple(map(_typed, v))
        return None if None in items else (tuple, items)
    if type(v) in (float, int, bool, str, type(None)):
        return (type(v), v)
    return None


# Name, hyperparameters with their defaults (the official signature), check, state, init, state check, the
# per-tensor step, the key of its kernels, the options beyond the official signature.
ADAMP = OptimizerSpec("AdamP", dict(hyperparams.ADAMP_DEFAULTS), hyperparams.check_adamp, AdamPState, adamp_init,
                      check_adamp_state, adamp_update, "adamp", dict(hyperparams.ADAMP_OPTIONS))
SGDP = OptimizerSpec("SGDP", {"lr": REQUIRED, **hyperparams.SGDP_DEFAULTS}, hyperparams.check_sgdp, SGDPState,
                     sgdp_init, check_sgdp_state, sgdp_update, "sgdp",
                     dict(hyperparams.SGDP_OPTIONS))
