"""Run the official ``adamp==0.3.0`` optimizers and ours side by side on the same gradients.

The reference trajectory is computed once per (optimizer, case, shape, dtype) with the
official torch optimizer on CPU. Gradients are drawn from the *reference* weights each step,
in one of three regimes that make the channel view, the layer view or neither view
scale-invariant (cycled over steps), and the very same gradients are then fed to the
implementation under test. Errors are normwise over the trajectory: for the param and each state array,
``max_t max|ours_t - ref_t| / max_t max|ref_t|``, and the worst of those is reported. (A
per-step scale would be ill-conditioned: SGDP's stored buffer is pure rounding noise right
after a step whose gradient was projected away entirely.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import Backend

__all__ = [
    "ADAMP_CASES",
    "PARTNERS",
    "SGDP_CASES",
    "SHAPES",
    "REGIMES",
    "TIMM_ADAMP_CASES",
    "TIMM_SGDP_CASES",
    "case_table",
    "is_timm_case",
    "Reference",
    "RunResult",
    "official_view",
    "reference_run",
    "run_core",
    "rel_error",
    "tolerance",
]

# name -> (shape, zero-initialised)
SHAPES: dict[str, tuple[tuple[int, ...], bool]] = {
    "conv4d": ((6, 3, 3, 3), False),
    "linear2d": ((5, 12), False),
    "conv3d": ((4, 2, 5), False),
    "vector1d": ((7,), False),
    "scalar0d": ((), False),
    "row_len1": ((6, 1), False),
    "single_row": ((1, 16), False),
    "zero_init": ((4, 9), True),
}

# A second tensor for each shape of SHAPES (same name + "+"), whose rows fall in the same row bucket of the
# multi-tensor step (adamp_core.paths.multi_tensor.row_bucket: row lengths 27 and 28 share one, padded), so that the
# conformance rows of that path step groups of two different tensors. Its init and gradients come from
# another seed than its partner's.
PARTNERS: dict[str, tuple[tuple[int, ...], bool]] = {
    "conv4d+": ((4, 2, 2, 7), False),
    "linear2d+": ((3, 4, 3), False),
    "conv3d+": ((7, 10), False),
    "vector1d+": ((7,), False),
    "scalar0d+": ((1,), False),
    "row_len1+": ((3, 1), False),
    "single_row+": ((2, 4, 4), False),
    "zero_init+": ((5, 9), True),
}

ADAMP_CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "lr_wd": dict(lr=1e-2, weight_decay=0.1),
    "nesterov_wd": dict(lr=1e-2, weight_decay=0.05, nesterov=True),
    "betas_eps_ratio": dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.2, wd_ratio=0.5),
    "delta_large": dict(lr=1e-2, delta=1.0, weight_decay=0.01),
}

SGDP_CASES: dict[str, dict[str, Any]] = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "momentum_wd": dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    "nesterov_wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening_ratio": dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=0.05, wd_ratio=0.3),
}

# Cases whose reference is timm 1.0.31's own AdamP/SGDP (adamp_xp.testing.timm_reference) instead of
# adamp==0.3.0: Cautious AdamP/SGDP (caution=True) and SGDP as Algorithm 1 prints it (project_buffer=False,
# timm's buffer; timm has no such argument: it is dropped for the reference).
TIMM_ADAMP_CASES: dict[str, dict[str, Any]] = {
    "cautious_wd": dict(lr=1e-2, weight_decay=0.1, caution=True),
    "cautious_nesterov": dict(lr=5e-3, betas=(0.8, 0.99), nesterov=True, wd_ratio=0.5, weight_decay=0.05, caution=True),
}
TIMM_SGDP_CASES: dict[str, dict[str, Any]] = {
    "alg1_momentum_wd": dict(lr=0.05, momentum=0.9, weight_decay=1e-2, project_buffer=False),
    "cautious_alg1": dict(lr=0.05, momentum=0.9, weight_decay=1e-2, caution=True, project_buffer=False),
    "cautious_nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, dampening=0.0, caution=True),
}


def case_table(optimizer: str, case: str) -> dict[str, Any]:
    """The hyperparameters of ``case`` (an official or a timm case) of ``optimizer``."""
    if optimizer == "adamp":
        return ADAMP_CASES[case] if case in ADAMP_CASES else TIMM_ADAMP_CASES[case]
    return SGDP_CASES[case] if case in SGDP_CASES else TIMM_SGDP_CASES[case]


def is_timm_case(optimizer: str, case: str) -> bool:
    """Whether ``case``'s reference is timm's optimizer (else adamp 0.3.0's)."""
    return case in (TIMM_ADAMP_CASES if optimizer == "adamp" else TIMM_SGDP_CASES)


REGIMES = ("channel", "layer", "none")

TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


def tolerance(dtype: str) -> float:
    return TOLERANCE[dtype]


def make_grad(w: np.ndarray, regime: str, rng: np.random.Generator) -> np.ndarray:
    """A float64 gradient for weight ``w`` in the given regime (see module docstring)."""
    r = np.asarray(0.1 * rng.standard_normal(w.shape))
    if w.ndim <= 1 or w.size == 0:
        return r
    rows = w.reshape(w.shape[0], -1)
    rr = r.reshape(rows.shape)
    sq = np.sum(rows * rows, axis=1, keepdims=True)
    safe = np.where(sq > 0, sq, 1.0)
    if regime == "channel":  # orthogonal to every row: channel view scale-invariant
        g = rr - np.sum(rows * rr, axis=1, keepdims=True) / safe * rows
    elif regime == "layer":  # rows strongly (anti)aligned, whole tensor orthogonal
        sign = np.where(np.arange(rows.shape[0]) % 2 == 0, 1.0, -1.0)[:, None]
        scale = np.sqrt(np.sum(rr * rr, axis=1, keepdims=True) / safe)
        g = rr + 3.0 * sign * scale * rows
        total = float(np.sum(rows * rows))
        if total > 0:
            g = g - float(np.sum(rows * g)) / total * rows
    elif regime == "none":  # aligned with w: neither view scale-invariant
        scale = np.sqrt(np.sum(rr * rr) / max(float(np.sum(rows * rows)), 1e-300))
        g = rr + 3.0 * scale * rows
    else:
        raise ValueError(f"unknown regime {regime!r}")
    return g.reshape(w.shape)


def official_view(p: Any, grad: Any, delta: float, eps: float) -> int:
    """The view adamp 0.3.0 projects (0 none, 1 channel, 2 layer), by its own test:
    ``F.cosine_similarity(...).abs().max() < delta / sqrt(row length)``, channel view first."""
    import torch.nn.functional as F

    if p.dim() <= 1:
        return 0
    for view, shape in ((1, (p.shape[0], -1)), (2, (1, -1))):
        w2, g2 = p.reshape(shape), grad.reshape(shape)
        if F.cosine_similarity(g2, w2, dim=1, eps=eps).abs().max() < delta / math.sqrt(w2.shape[1]):
            return view
    return 0


@dataclass
class Reference:
    init: np.ndarray
    grads: list[np.ndarray]  # in the run's dtype, as float64 arrays
    params: list[np.ndarray]  # after each step
    states: list[dict[str, np.ndarray]]  # after each step
    views: list[int]  # view the official code projected at each step


def reference_run(optimizer: str, case: str, shape_name: str, dtype: str, steps: int = 30, seed: int = 0,
                  rounded: str | None = None) -> Reference:
    """The official optimizer's trajectory (cached): adamp 0.3.0's, or timm's for a timm case.

    ``seed`` draws another init and other gradients for the same shape (a second param of that shape).
    ``rounded`` (``"bfloat16"``/``"float16"``): a param stored in that dtype with its maths and state in
    ``dtype``: the init, every gradient and the param after every official step (in ``dtype``, from the
    upcast param) are rounded to it (see ``adamp_xp.testing.conformance.row_tolerance``)."""
    return _reference_run(optimizer, case, shape_name, dtype, steps, seed, rounded)


@functools.lru_cache(maxsize=2048)
def _reference_run(optimizer: str, case: str, shape_name: str, dtype: str, steps: int, seed: int,
                   rounded: str | None) -> Reference:
    import torch

    shape, zero = SHAPES[shape_name] if shape_name in SHAPES else PARTNERS[shape_name]
    hp = case_table(optimizer, case)
    if is_timm_case(optimizer, case):
        from .timm_reference import timm_optimizers

        adamp_cls, sgdp_cls = timm_optimizers()
        hp = {k: v for k, v in hp.items() if k != "project_buffer"}  # timm's SGDP is project_buffer=False
    else:
        import adamp

        adamp_cls, sgdp_cls = adamp.AdamP, adamp.SGDP
    rng = np.random.default_rng(seed + 1000 * len(shape) + sum(shape) + (7919 if shape_name in PARTNERS else 0))
    init = np.zeros(shape) if zero else np.asarray(rng.standard_normal(shape))
    tdt = getattr(torch, dtype)

    def rounding(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return (t.to(getattr(torch, rounded)) if rounded else t).to(tdt)

    p = torch.nn.Parameter(rounding(init.copy()))
    init = p.detach().double().numpy().copy()
    opt = adamp_cls([p], **hp) if optimizer == "adamp" else sgdp_cls([p], **hp)
    delta, eps = hp.get("delta", 0.1), hp.get("eps", 1e-8)
    ref = Reference(init, [], [], [], [])
    for t in range(steps):
        g = make_grad(p.detach().double().numpy(), REGIMES[t % len(REGIMES)], rng)
        p.grad = rounding(g)
        ref.grads.append(p.grad.double().numpy().copy())
        ref.views.append(official_view(p.detach(), p.grad, delta, eps))
        opt.step()
        if rounded:  # the param is stored in 16 bits: what the official maths gave, rounded to nearest
            with torch.no_grad():
                p.copy_(rounding(p.detach().double().numpy()))
        ref.params.append(p.detach().double().numpy().copy())
        ref.states.append({k: v.double().numpy().copy() for k, v in opt.state[p].items() if torch.is_tensor(v)})
    return ref


def rel_error(ours: list[np.ndarray] | np.ndarray, ref: list[np.ndarray] | np.ndarray) -> float:
    """Normwise relative error over a trajectory (or one array):
    ``max_t max|ours_t - ref_t| / max_t max|ref_t|`` (absolute when ``ref`` is all zero)."""
    ours_l = ours if isinstance(ours, list) else [ours]
    ref_l = ref if isinstance(ref, list) else [ref]
    err, scale = 0.0, 0.0
    for o, r in zip(ours_l, ref_l, strict=True):
        o, r = np.asarray(o), np.asarray(r)
        if o.shape != r.shape:
            return math.inf
        if r.size == 0:
            continue
        diff = float(np.max(np.abs(o - r)))
        if math.isnan(diff):
            return math.inf
        err, scale = max(err, diff), max(scale, float(np.max(np.abs(r))))
    return err / scale if scale > 0 else err


@dataclass
class RunResult:
    max_rel_error: float
    views: list[int] = field(default_factory=list)  # view our code projected at each step
    ref_views: list[int] = field(default_factory=list)

    @property
    def views_agree(self) -> bool:
        return self.views == self.ref_views


StepFn = Callable[..., tuple[Any, Any]]


def run_core(
    backend: Backend,
    optimizer: str,
    case: str,
    shape_name: str,
    dtype: str,
    steps: int = 30,
    step_fn: StepFn | None = None,
    init_fn: Callable[[Any], Any] | None = None,
) -> RunResult:
    """Replay the reference gradients through ``adamp_core`` on ``backend``; compare every step.

    ``step_fn(param, grad, state) -> (param, state)`` defaults to the core step with the
    case's hyperparameters (pass e.g. a ``jax.jit``-compiled one); ``init_fn`` to the core init.
    """
    import adamp_core as ac

    ref = reference_run(optimizer, case, shape_name, dtype, steps)
    hp = case_table(optimizer, case)
    if step_fn is None:
        core = ac.adamp_step if optimizer == "adamp" else ac.sgdp_step
        step_fn = functools.partial(core, **hp)
    if init_fn is None:
        init_fn = ac.adamp_init if optimizer == "adamp" else ac.sgdp_init
    delta, eps = hp.get("delta", 0.1), hp.get("eps", 1e-8)
    param = backend.asarray(ref.init, dtype)
    state = init_fn(param)
    result = RunResult(0.0, ref_views=list(ref.views))
    ours: dict[str, list[np.ndarray]] = {"param": []}
    for t in range(steps):
        grad = backend.asarray(ref.grads[t], dtype)
        result.views.append(int(backend.to_numpy(ac.projected_view(param, grad, delta, eps))))
        param, state = step_fn(param, grad, state)
        ours["param"].append(backend.to_numpy(param))
        for name in ref.states[t]:
            ours.setdefault(name, []).append(backend.to_numpy(getattr(state, name)))
    refs = {"param": ref.params, **{name: [s[name] for s in ref.states] for name in ref.states[0]}}
    result.max_rel_error = max(rel_error(ours[name], refs[name]) for name in refs)
    return result
