"""The bad-input table shared by every entry point (issue 9).

Each case says *what* is wrong, the exact error type, and a regex for the value part of the
message; ``tests/test_reliability_bad_input.py`` feeds every case to every entry point that can
receive it (``adamp_core`` step, ``adamp_core.tree`` step, ``adamp_torch``, ``adamp_array``,
``adamp_optax``) and also checks that the message names the offending parameter *where it is*
(``grad``, ``grads[1]``, ``param_groups[0]['params'][1]``, ``leaf ['z']``), and that nothing changed.

Cases are data, not code: a grad/param/state is described by how it differs from a good one
(:class:`Bad`), and each entry point builds it in its own array library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The good param every array case starts from (the bad entry is always the *last* param), and
# the shape used for "wrong shape" cases.
SHAPE = (3, 5)
WRONG_SHAPE = (5, 3)
DTYPE = "float64"


@dataclass(frozen=True)
class BadHyper:
    """An invalid hyperparameter: ``kwargs`` use the core's names (``lr``, ``betas``, ...)."""

    optimizer: str  # "adamp" | "sgdp"
    kwargs: dict[str, Any]
    error: type[Exception]
    match: str  # names the hyperparameter and its value

    @property
    def id(self) -> str:
        return f"{self.optimizer}-" + ",".join(
            f"{k}={v!r}" for k, v in self.kwargs.items() if k != "lr" or len(self.kwargs) == 1
        )


def _a(error: type[Exception], match: str, **kwargs: Any) -> BadHyper:
    return BadHyper("adamp", kwargs, error, match)


def _s(error: type[Exception], match: str, **kwargs: Any) -> BadHyper:
    return BadHyper("sgdp", {"lr": 0.1, **kwargs}, error, match)


HYPER: list[BadHyper] = [
    # AdamP: negative, NaN, infinite, wrong type, betas outside [0, 1)
    _a(ValueError, r"Invalid learning rate: -1\.0", lr=-1.0),
    _a(ValueError, r"Invalid learning rate: nan", lr=math.nan),
    _a(ValueError, r"Invalid learning rate: inf", lr=math.inf),
    _a(TypeError, r"Invalid learning rate: '0\.1'", lr="0.1"),
    _a(TypeError, r"Invalid learning rate: None", lr=None),
    _a(TypeError, r"Invalid learning rate: True", lr=True),
    _a(ValueError, r"Invalid epsilon value: -1e-08", eps=-1e-8),
    _a(ValueError, r"Invalid epsilon value: nan", eps=math.nan),
    _a(ValueError, r"Invalid beta parameter at index 0: 1\.0", betas=(1.0, 0.999)),
    _a(ValueError, r"Invalid beta parameter at index 0: -0\.1", betas=(-0.1, 0.999)),
    _a(ValueError, r"Invalid beta parameter at index 1: 1\.5", betas=(0.9, 1.5)),
    _a(ValueError, r"Invalid beta parameter at index 1: nan", betas=(0.9, math.nan)),
    _a(ValueError, r"Invalid betas: \(0\.9,\)", betas=(0.9,)),
    _a(ValueError, r"Invalid weight_decay value: -0\.1", weight_decay=-0.1),
    _a(ValueError, r"Invalid weight_decay value: nan", weight_decay=math.nan),
    _a(ValueError, r"Invalid delta value: -0\.1", delta=-0.1),
    _a(ValueError, r"Invalid delta value: nan", delta=math.nan),
    _a(ValueError, r"Invalid wd_ratio value: -1\.0", wd_ratio=-1.0),
    _a(ValueError, r"Invalid wd_ratio value: nan", wd_ratio=math.nan),
    _a(TypeError, r"Invalid nesterov value: 1", nesterov=1),
    _a(TypeError, r"Invalid caution value: 1", caution=1),
    _a(TypeError, r"Invalid skip_nonfinite value: 'yes'", skip_nonfinite="yes"),
    # SGDP: the same, plus momentum/dampening and nesterov's requirements
    _s(ValueError, r"Invalid learning rate: -0\.1", lr=-0.1),
    _s(ValueError, r"Invalid learning rate: nan", lr=math.nan),
    _s(ValueError, r"Invalid momentum value: -0\.9", momentum=-0.9),
    _s(ValueError, r"Invalid momentum value: nan", momentum=math.nan),
    _s(ValueError, r"Invalid momentum value: 1\.0 .*momentum must be < 1", momentum=1.0, weight_decay=0.1),
    _s(ValueError, r"Invalid dampening value: nan", dampening=math.nan),
    _s(ValueError, r"Invalid dampening value: inf", dampening=math.inf),
    _s(ValueError, r"Invalid dampening value: -0\.1 \(expected a number in \[0, 1\]\)", dampening=-0.1),
    _s(ValueError, r"Invalid momentum value: 1\.5 \(expected a number in \[0, 1\]\)", momentum=1.5),
    _s(ValueError, r"Invalid weight_decay value: -1\.0", weight_decay=-1.0),
    _s(ValueError, r"Invalid epsilon value: -1\.0", eps=-1.0),
    _s(ValueError, r"Invalid delta value: nan", delta=math.nan),
    _s(ValueError, r"Invalid wd_ratio value: -0\.5", wd_ratio=-0.5),
    _s(TypeError, r"Invalid nesterov value: 'no'", nesterov="no"),
    _s(TypeError, r"Invalid caution value: 'yes'", caution="yes"),
    _s(TypeError, r"Invalid project_buffer value: None", project_buffer=None),
    _s(TypeError, r"Invalid skip_nonfinite value: 0", skip_nonfinite=0),
]


# Hyperparameters given as 0-d arrays (a learning rate held as a tensor for torch.compile, or computed by a
# NumPy schedule). Their values are not checked (that would be a device sync), but their metadata can be:
# a bool or complex dtype is never a learning rate, and an array the param's library cannot use (another
# library, another device) must be refused before anything changes -- or, for another library, converted
# so that the results stay in the param's library, dtype and device (``convertible``).


@dataclass(frozen=True)
class BadHyperArray:
    """A 0-d array hyperparameter (core name ``name``) that does not fit the params of the entry point."""

    id: str
    name: str
    dtype: str
    error: type[Exception]
    match: str  # names the hyperparameter, then what is wrong with the array
    library: str = "same"  # "same" | "other"
    device: str = "same"  # "same" | "other" (torch only here: the meta device)
    convertible: bool = False  # converting it (results in the param's library/dtype/device) is also fine


HYPER_ARRAYS: list[BadHyperArray] = [
    BadHyperArray("lr-0d-bool", "lr", "bool", TypeError, r"Invalid learning rate: .*bool"),
    BadHyperArray("lr-0d-complex128", "lr", "complex128", TypeError, r"Invalid learning rate: .*complex128"),
    BadHyperArray(
        "lr-0d-other-library",
        "lr",
        "float64",
        TypeError,
        r"Invalid learning rate: .*(numpy|torch|jax).*(numpy|torch|jax)",
        library="other",
        convertible=True,
    ),
    BadHyperArray(
        "lr-0d-other-device", "lr", "float64", ValueError, r"Invalid learning rate: .*meta.*cpu", device="other"
    ),
]


# ---------------------------------------------------------------------------------------------
# Arrays: what is wrong with the last param, its grad or its state.


@dataclass(frozen=True)
class Bad:
    """A bad entry, relative to a good float64 param of shape :data:`SHAPE` in the entry point's library.

    ``target``: ``grad`` (the last param's grad is replaced), ``param`` (the last param is),
    ``state`` (the state object handed to a functional step), ``state_dict`` (a checkpoint loaded
    into a stateful optimizer) or ``missing_grad`` (no grad where one is required).
    """

    id: str
    target: str
    error: type[Exception]
    match: str  # the value part of the message
    shape: tuple[int, ...] = SHAPE
    dtype: str = DTYPE
    library: str = "same"  # "same" | "other"
    device: str = "same"  # "same" | "other"
    not_array: bool = False
    other_optimizer: bool = False
    only: tuple[str, ...] = field(default_factory=tuple)  # entry points it applies to (empty: all)


ARRAYS: list[Bad] = [
    Bad("grad-wrong-shape", "grad", ValueError, r"shape \(5, 3\).*\(3, 5\)", shape=WRONG_SHAPE),
    Bad("grad-int64", "grad", TypeError, r"int64.*float64", dtype="int64"),
    Bad("grad-bool", "grad", TypeError, r"bool.*float64", dtype="bool"),
    Bad("grad-complex128", "grad", TypeError, r"complex128.*float64", dtype="complex128"),
    Bad(
        "grad-other-library", "grad", TypeError, r"comes from array library '\w+' but param from '\w+'", library="other"
    ),
    Bad("grad-other-device", "grad", ValueError, r"meta.* but (the )?param (is )?on cpu", device="other"),
    Bad("grad-not-an-array", "grad", TypeError, r"must be an array, got list", not_array=True),
    Bad("param-int32", "param", TypeError, r"real floating.*int32", dtype="int32"),
    Bad("param-bool", "param", TypeError, r"real floating.*bool", dtype="bool"),
    Bad("param-not-an-array", "param", TypeError, r"must be an array, got list", not_array=True),
    Bad(
        "state-of-the-other-optimizer",
        "state",
        TypeError,
        r"state must be an? \w*(AdamP|SGDP)State .*got \w*(SGDP|AdamP)State",
        other_optimizer=True,
    ),
    Bad(
        "state-of-another-shape",
        "state",
        ValueError,
        r"(exp_avg|momentum) shape \(5, 3\) differs from param shape \(3, 5\)",
        shape=WRONG_SHAPE,
    ),
    Bad(
        "state-dict-of-the-other-optimizer",
        "state_dict",
        ValueError,
        r"not an? \w+ state dict.*another optimizer",
        other_optimizer=True,
    ),
    Bad(
        "state-dict-of-another-shape",
        "state_dict",
        ValueError,
        r"(exp_avg|momentum).* shape \(5, 3\) but .*shape \(3, 5\)",
        shape=WRONG_SHAPE,
    ),
    Bad("missing-grad", "missing_grad", TypeError, r"is None; a gradient is required"),
]


def good_values(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first param, its grad, last param, its grad) as float64 NumPy arrays: a 1-d and a 2-d param."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)


def bad_numpy_value(bad: Bad) -> np.ndarray:
    """The bad array's values (before it is moved to a library), in the bad dtype."""
    value = np.linspace(-1.0, 1.0, math.prod(bad.shape)).reshape(bad.shape)
    return value.astype(bad.dtype)
