"""The rows of ``adamp-xp conformance``: every entry point, on every execution path, against ``adamp==0.3.0``.

A :class:`Row` is one (target, backend, dtype, options). Running it replays the official optimizer's
gradients (:func:`~adamp_xp.testing.oracle.reference_run`) through the target over the oracle's shape
table and hyperparameter cases and compares the params and every state array after every step,
normwise over the trajectory (:func:`~adamp_xp.testing.oracle.rel_error`). While it runs, a recorder
(:func:`record_paths`) counts which execution path :func:`adamp_core.dispatch.step` gave each tensor
at each step (the fused kernels, the multi-tensor step or the per-tensor step), so the row reports
the path that actually ran on this machine, next to the one the dispatcher's documented policy
predicts (:attr:`Row.expected`).

:func:`run_rows` runs rows in ``spawn``-ed worker processes (torch, JAX and numba start no threads in
the parent, and each worker runs single-threaded, so two workers use two cores), in bundles that
share compiled JAX programs, longest first. Every library (torch, JAX, optax, numba, the official
package) is imported lazily, in the worker that needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .adapters_conformance import _compare, _host
from .backends import BACKENDS, Backend, get_backend
from .oracle import (
    ADAMP_CASES,
    SGDP_CASES,
    SHAPES,
    TIMM_ADAMP_CASES,
    TIMM_SGDP_CASES,
    case_table,
    reference_run,
    tolerance,
)

__all__ = [
    "ADAPTER_CASES",
    "ALL_CAUTIOUS_CASES",
    "CAUTIOUS_CASES",
    "DEFAULT_STEPS",
    "EAGER_JAX_CASES",
    "FULL_STEPS",
    "FUSED",
    "JAX_JIT_SHAPES",
    "JAX_SHAPES",
    "LIGHT_ADAPTER_CASES",
    "MULTI",
    "PER_TENSOR",
    "TARGETS",
    "Row",
    "machine",
    "path_label",
    "plan",
    "record_paths",
    "reference_missing",
    "run_row",
    "run_rows",
    "row_tolerance",
    "versions",
]

# --target name -> the entry point a row checks
TARGETS: dict[str, str] = {
    "core": "adamp_core",
    "tree": "adamp_core.tree",
    "adamp_torch": "adamp_torch",
    "adamp_array": "adamp_array",
    "adamp_optax": "adamp_optax",
}

FUSED, MULTI, PER_TENSOR = "fused kernels", "multi-tensor", "per-tensor"
JIT = "jax.jit"

# Steps per run. 12 = every gradient regime (channel view, layer view, neither) four times: the view
# decision is checked in each regime, the bias corrections over their steepest part (t = 1..12) and the
# state recurrences over a dozen updates; --full runs the oracle's 30.
DEFAULT_STEPS, FULL_STEPS = 12, 30

# What each row runs (the cases and shapes of adamp_xp/testing/oracle.py). --full: every case on every shape
# in every row. The default run checks the maths on every case and shape where nothing compiles (the core on
# numpy and torch) and on every case compiled (the core under jax.jit in float32). The other rows check wiring
# (the adapters and the tree hold no maths: every update is adamp_core's) or the same Python code on another
# namespace; where each operation costs a Python round trip (array_api_strict, eager JAX) or a compilation
# (JAX) they take fewer cases, and on JAX fewer shapes.
#
# Adapters on numpy and torch: one nesterov and one non-default case per optimizer (betas/eps/wd_ratio
# renamed to optax's names, dampening, weight decay).
ADAPTER_CASES: dict[str, tuple[str, ...]] = {
    "adamp": ("betas_eps_ratio", "nesterov_wd"),
    "sgdp": ("dampening_ratio", "nesterov_wd"),
}
# The core and the tree on array_api_strict and eager JAX (~0.3 ms of dispatch per operation, ~100 operations
# in a step of one tensor): one case per optimizer, the one that exercises most branches (nesterov, weight
# decay, SGDP's momentum).
EAGER_JAX_CASES: dict[str, tuple[str, ...]] = {"adamp": ("nesterov_wd",), "sgdp": ("nesterov_wd",)}
# The adapters there (adamp_array on array_api_strict and JAX, adamp_optax): one case per optimizer, AdamP's
# with every name optax renames (betas -> b1/b2, eps, wd_ratio, weight decay) and SGDP's nesterov one.
LIGHT_ADAPTER_CASES: dict[str, tuple[str, ...]] = {"adamp": ("betas_eps_ratio",), "sgdp": ("nesterov_wd",)}
# Cautious rows (caution=True, and SGDP as Algorithm 1 prints it): against timm 1.0.31's own AdamP/SGDP (the
# oracle's timm cases), one case per optimizer that also exercises nesterov / weight decay; --full: all of them.
CAUTIOUS_CASES: dict[str, tuple[str, ...]] = {"adamp": ("cautious_nesterov",), "sgdp": ("cautious_alg1",)}
ALL_CAUTIOUS_CASES: dict[str, tuple[str, ...]] = {"adamp": tuple(TIMM_ADAMP_CASES), "sgdp": tuple(TIMM_SGDP_CASES)}
# JAX compiles every operation of an eager row once per shape and dtype (~50 ms each on a small CPU, ~40 of
# them per shape that projects) and each jax.jit program once per shape (~0.8 s of CPU per shape that
# projects, with an empty persistent cache). Its rows step a 4-d tensor (the projection: channel and layer
# views, the reshapes) and a 0-d one (no projection): every branch of the code. The other shapes run the
# same code on other numbers, which the numpy and torch rows check; the core under jax.jit in float32 runs
# every case on JAX_JIT_SHAPES, which adds rows of length 1 (reductions over a dimension of size 1, which
# XLA simplifies away).
JAX_SHAPES: tuple[str, ...] = ("conv4d", "scalar0d")
JAX_JIT_SHAPES: tuple[str, ...] = ("conv4d", "row_len1", "scalar0d")

# Spacing of the 16-bit dtypes' numbers relative to their magnitude (an ulp: 2**(1 - p), p significant bits).
_ULP = {"bfloat16": 2.0**-7, "float16": 2.0**-10}
HALF_DTYPES = tuple(_ULP)


def row_tolerance(dtype: str, steps: int) -> float:
    """The largest normwise relative error a row of ``dtype`` may show over ``steps`` steps.

    float64 and float32: the oracle's (1e-12, 1e-5). bfloat16/float16 params (``state_dtype=float32``: float32
    maths and state) are compared with the official optimizer run in float32 on the float32 upcast of the
    16-bit param, whose result is rounded to 16 bits after every step, as a 16-bit param stores it (same
    init and gradients, both 16-bit values). Our float32 maths and the official's round to the same 16-bit
    number except where the float32 result lies within float32 rounding (~1e-7) of a halfway point between
    two 16-bit numbers; there the stored params differ by one 16-bit ulp (2**-7 of the value for bfloat16,
    2**-10 for float16), which changes the later updates only by O(lr * ulp). Two ulps of the largest param
    bound that with room for one more such flip of the same entry: 2**-6 (bfloat16), 2**-9 (float16),
    whatever the number of steps. (Against the float32 run without the rounding, the difference would
    grow by up to an ulp per step and, near the view thresholds, flip the projection decision: not a
    usable oracle.)"""
    if dtype in _ULP:
        return 2 * _ULP[dtype]
    return tolerance(dtype)


# -- the rows ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of the table: ``target`` (a key of :data:`TARGETS`) on ``backend`` (a backend id) in
    ``dtype`` with ``options`` (what a user writes: ``"fused=False"``, ``"jax.jit"``, ``"channels_last"``),
    whose tensors the dispatcher's documented policy sends to ``expected`` (a path label)."""

    target: str
    backend: str
    dtype: str
    options: tuple[str, ...] = ()
    expected: str = PER_TENSOR
    all_cases: bool = False  # every case of the oracle table (else the row's few: see cases)
    shapes_of: str = "all"  # the shapes it steps: "all" (the oracle's SHAPES), "jax" (JAX_SHAPES), "jax.jit"
    cautious: bool = False  # the cautious cases (caution=True), against timm 1.0.31 instead of adamp 0.3.0

    @property
    def name(self) -> str:
        return TARGETS[self.target]

    @property
    def jit(self) -> bool:
        return JIT in self.options

    @property
    def kwargs(self) -> dict[str, Any]:
        """The ``key=value`` options as keyword arguments of the target's optimizer."""
        out: dict[str, Any] = {}
        for opt in self.options:
            if "=" in opt:
                key, value = opt.split("=", 1)
                out[key] = {"True": True, "False": False, "None": None}.get(value, value)
        return out

    @property
    def cases(self) -> dict[str, tuple[str, ...] | None]:
        """The oracle cases the row runs, per optimizer (None: every case of its table)."""
        if self.cautious:
            return dict(ALL_CAUTIOUS_CASES if self.all_cases else CAUTIOUS_CASES)
        if self.all_cases:
            return {"adamp": None, "sgdp": None}
        library = get_backend(self.backend).library
        light = library in ("array_api_strict", "jax")
        if self.target in ("core", "tree"):
            return dict(EAGER_JAX_CASES if light else ADAPTER_CASES)
        return dict(LIGHT_ADAPTER_CASES if light else ADAPTER_CASES)

    @property
    def shapes(self) -> tuple[str, ...]:
        """The shapes (names of the oracle's ``SHAPES``) the row steps."""
        chosen = {"jax": JAX_SHAPES, "jax.jit": JAX_JIT_SHAPES}.get(self.shapes_of)
        return tuple(SHAPES) if chosen is None else tuple(s for s in chosen if s in SHAPES)

    @property
    def label(self) -> str:
        options = [*self.options, "caution (vs timm)"] if self.cautious else list(self.options)
        return ", ".join(options) if options else "defaults"

    def describe(self) -> dict[str, Any]:
        b = get_backend(self.backend)
        return dict(target=self.name, backend=self.backend, device=b.device, dtype=self.dtype,
                    options=self.label, expected_path=self.expected,
                    reference="timm 1.0.31" if self.cautious else "adamp 0.3.0")


def _cpu(backend: Backend) -> bool:
    return backend.device == "cpu"


def _rows_for(b: Backend, targets: Sequence[str], dtypes: Sequence[str], full: bool, every_backend: bool,
              every_dtype: bool) -> list[Row]:
    """Every row of ``targets`` on backend ``b`` (see README "Conformance" for what each one means). The
    default run leaves out the tree on array_api_strict (``every_backend``), JAX's float64 tree and adapter
    rows and the float64 rows of the fused kernels (``every_dtype``); naming the backend or the dtype brings
    them back, as does ``full``."""
    rows: list[Row] = []
    half = [d for d in dtypes if d in HALF_DTYPES]
    host = _cpu(b)
    # Writable host buffers: the kernels' arrays. numba compiles the kernels once per dtype, ~17 s of CPU on a
    # small machine (with empty caches, the largest cost of the default run): float32's, the dtype of training,
    # by default; float64's (the same source) in --full, or when the dtype is named.
    fused_here = host and b.library in ("numpy", "torch")

    def kernels(d: str) -> bool:
        return fused_here and (d != "float64" or full or not every_dtype)

    jit_tag = f"{PER_TENSOR} (jit)"
    slow = b.library in ("array_api_strict", "jax")  # a Python round trip per operation
    for d in [d for d in dtypes if d in ("float64", "float32")]:
        if "core" in targets:
            rows.append(Row("core", b.id, d, all_cases=full or not slow))
            if b.library == "jax":
                rows.append(Row("core", b.id, d, (JIT,), jit_tag, all_cases=True))
        if b.library == "jax" and d == "float64" and every_dtype and not full:
            continue  # JAX computes in float32 unless jax_enable_x64 is set: its adapters' float64 rows are --full's
        if "tree" in targets and (full or not every_backend or b.library != "array_api_strict"):
            rows.append(Row("tree", b.id, d))  # the same structure code for every library but JAX's pytrees
        if "adamp_torch" in targets and b.library == "torch":
            if fused_here:
                rows += [Row("adamp_torch", b.id, d, (), FUSED)] if kernels(d) else []
                rows += [Row("adamp_torch", b.id, d, ("fused=False",), MULTI),
                         Row("adamp_torch", b.id, d, ("fused=False", "foreach=False"), PER_TENSOR)]
                rows += [Row("adamp_torch", b.id, d, ("channels_last",), f"{FUSED} + {MULTI}")] if kernels(d) else []
            else:  # no fused kernels off the host: the multi-tensor step is the default
                rows += [Row("adamp_torch", b.id, d, (), MULTI),
                         Row("adamp_torch", b.id, d, ("foreach=False",), PER_TENSOR),
                         Row("adamp_torch", b.id, d, ("channels_last",), MULTI)]
        if "adamp_array" in targets:
            if fused_here:
                rows += [Row("adamp_array", b.id, d, (), FUSED)] if kernels(d) else []
                rows += [Row("adamp_array", b.id, d, ("fused=False",), MULTI),
                         Row("adamp_array", b.id, d, ("fused=False", "foreach=False"), PER_TENSOR)]
            else:  # immutable (JAX) or non-NumPy arrays: fused=False changes nothing
                rows += [Row("adamp_array", b.id, d, (), MULTI),
                         Row("adamp_array", b.id, d, ("foreach=False",), PER_TENSOR)]
        if "adamp_optax" in targets and b.library == "jax":
            rows += [Row("adamp_optax", b.id, d, (JIT,), jit_tag),
                     Row("adamp_optax", b.id, d, (JIT, "foreach=True"), f"{MULTI} (jit)")]
    if "adamp_torch" in targets and b.library == "torch":
        for d in half:
            rows.append(Row("adamp_torch", b.id, d, ("state_dtype=float32",), MULTI))
    rows += _cautious_rows(b, targets, dtypes, fused_here, kernels)
    if full:
        return [dataclasses.replace(r, all_cases=True) for r in rows]
    if b.library == "jax":  # fewer shapes: the compilations (see JAX_SHAPES)
        rows = [dataclasses.replace(r, shapes_of="jax.jit" if r.target == "core" and r.jit and r.dtype == "float32"
                                    else "jax") for r in rows]
    return rows


def _cautious_rows(b: Backend, targets: Sequence[str], dtypes: Sequence[str], fused_here: bool,
                   kernels: Callable[[str], bool]) -> list[Row]:
    """``caution=True`` (and SGDP's ``project_buffer=False``) against timm 1.0.31: the core where nothing
    compiles, ``adamp_torch`` on each of its paths, ``adamp_array``'s default path and ``adamp_optax`` under
    ``jax.jit`` (float32: one more compile per optimizer). ``kernels(dtype)``: whether the fused kernels' rows
    of that dtype are in the run."""
    rows: list[Row] = []
    for d in [d for d in dtypes if d in ("float64", "float32")]:
        if "core" in targets and b.library in ("numpy", "torch"):
            rows.append(Row("core", b.id, d, cautious=True))
        if "adamp_torch" in targets and b.library == "torch":
            if fused_here:
                rows += [Row("adamp_torch", b.id, d, (), FUSED, cautious=True)] if kernels(d) else []
                rows += [Row("adamp_torch", b.id, d, ("fused=False",), MULTI, cautious=True),
                         Row("adamp_torch", b.id, d, ("fused=False", "foreach=False"), PER_TENSOR, cautious=True)]
            else:
                rows += [Row("adamp_torch", b.id, d, (), MULTI, cautious=True),
                         Row("adamp_torch", b.id, d, ("foreach=False",), PER_TENSOR, cautious=True)]
        if "adamp_array" in targets and b.library == "numpy" and (kernels(d) or not fused_here):
            rows.append(Row("adamp_array", b.id, d, (), FUSED if fused_here else MULTI, cautious=True))
        if "adamp_optax" in targets and b.library == "jax" and d == "float32":
            rows.append(Row("adamp_optax", b.id, d, (JIT,), f"{PER_TENSOR} (jit)", cautious=True))
    return rows


def plan(targets: Sequence[str] | None = None, backends: Sequence[str] | None = None, device: str = "all",
         dtypes: Sequence[str] | None = None, full: bool = False) -> list[Row]:
    """The rows to run: ``targets`` (keys of :data:`TARGETS`, default all) on ``backends`` (ids, default
    every one of ``device``: ``cpu``, ``cuda`` or ``all``) in ``dtypes`` (default float64, float32 and,
    for adamp_torch, bfloat16 and float16). ``full``: every case in every row, and JAX's adapter and tree
    rows in float64 too."""
    targets = list(TARGETS) if not targets else list(targets)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"Unknown target: {t!r} (choose from {', '.join(TARGETS)})")
    every_backend, every_dtype = not backends, not dtypes
    chosen = [get_backend(b) for b in backends] if backends else list(BACKENDS)
    if device != "all":
        chosen = [b for b in chosen if _cpu(b) == (device == "cpu")]
    dtypes = list(dtypes) if dtypes else ["float64", "float32", *HALF_DTYPES]
    rows = []
    for b in chosen:
        rows += _rows_for(b, targets, dtypes, full, every_backend, every_dtype)
    return rows


# -- which path ran --------------------------------------------------------------------------------


@contextlib.contextmanager
def record_paths() -> Iterator[Counter[str]]:
    """Count, per tensor and step, the path :func:`adamp_core.dispatch.step` took, as its outcomes name it
    (``Outcome.path``: the numba or Triton kernels count as fused kernels; a group of one, or a tensor the
    kernels handed back, as the per-tensor step). Under ``jax.jit`` the dispatcher runs once, while tracing,
    and what it chose is what the compiled program runs."""
    from adamp_core import dispatch, paths

    label = {paths.NUMBA: FUSED, paths.TRITON: FUSED, paths.MULTI_TENSOR: MULTI, paths.PER_TENSOR: PER_TENSOR}
    counts: Counter[str] = Counter()

    def tally(outcomes: Sequence[Any]) -> None:
        for o in outcomes:
            counts[label[o.path]] += 1

    with dispatch.observing(tally):
        yield counts


def path_label(counts: Counter[str], jit: bool = False) -> str:
    """``"fused kernels"``, ``"fused kernels + per-tensor 3%"``, ``"per-tensor (jit)"``: the paths that ran,
    the main one first, the others with their share of tensor steps."""
    total = sum(counts.values())
    if not total:
        return "-"
    ran = sorted(((n, k) for k, n in counts.items() if n), reverse=True)
    parts = [ran[0][1]] + [f"{k} {max(1, round(100 * n / total))}%" for n, k in ran[1:]]
    return " + ".join(parts) + (" (jit)" if jit else "")


# -- shared pieces of the runs -----------------------------------------------------------------------


def _cases(optimizer: str, names: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """The named cases (adamp 0.3.0's or timm's; None: every official one) with their hyperparameters."""
    table = ADAMP_CASES if optimizer == "adamp" else SGDP_CASES
    return {n: case_table(optimizer, n) for n in (names if names is not None else table)}


def _perturbed(hp: dict[str, Any], perturb: bool) -> dict[str, Any]:
    """The hyperparameters the implementation under test gets: ``hp``, or with ``perturb`` (a deliberately
    wrong step, for the test that a FAIL exits with status 1) a learning rate 0.1% too large."""
    if not perturb:
        return hp
    from adamp_core.optimizers import ADAMP

    lr = hp.get("lr", ADAMP.defaults["lr"])
    return {**hp, "lr": lr * 1.001}


@dataclass(frozen=True)
class _Job:
    """What a row's run takes: ``steps`` per trajectory, the ``cases`` per optimizer (None: all), the
    ``shapes`` (names of the oracle's SHAPES) and whether its steps are ``perturb``-ed."""

    steps: int
    cases: dict[str, tuple[str, ...] | None]
    shapes: tuple[str, ...]
    perturb: bool = False

    def each_case(self, optimizer: str) -> dict[str, dict[str, Any]]:
        """``{case name: the hyperparameters the implementation under test gets}``."""
        return {n: _perturbed(hp, self.perturb) for n, hp in _cases(optimizer, self.cases.get(optimizer)).items()}

    def names(self, copies: int = 1) -> list[str]:
        """The trajectories of a run holding every shape, and with ``copies=2`` each shape's partner too
        (:data:`~adamp_xp.testing.oracle.PARTNERS`: rows in the same bucket, so that the multi-tensor step
        has groups of two different tensors to form)."""
        return [*self.shapes, *(f"{s}+" for s in self.shapes)] if copies > 1 else list(self.shapes)

    def refs(self, optimizer: str, case: str, dtype: str, copies: int = 1) -> dict[str, Any]:
        """The official trajectories of :meth:`names` (16-bit dtypes: float32 maths, rounded params)."""
        ref_dtype, rounded = ("float32", dtype) if dtype in HALF_DTYPES else (dtype, None)
        return {n: _reference(optimizer, case, n, ref_dtype, self.steps, rounded) for n in self.names(copies)}


def _reference(optimizer: str, case: str, name: str, dtype: str, steps: int, rounded: str | None) -> Any:
    """:func:`~adamp_xp.testing.oracle.reference_run` (cached in this process), shared with the other workers
    of this run through the run's folder of references (``_SETTINGS["refs"]``, when there is one): a
    trajectory one worker computed, the others read instead of running the official optimizer again."""
    folder = _SETTINGS.get("refs")
    if not folder:
        return reference_run(optimizer, case, name, dtype, steps, 0, rounded=rounded)
    key = (optimizer, case, name, dtype, steps, rounded)
    got = _REFERENCES.get(key)
    if got is not None:
        return got
    path = os.path.join(folder, "_".join(map(str, key)) + ".pickle")
    try:
        with open(path, "rb") as f:
            got = pickle.load(f)  # written by a worker of this run, in a folder of this run
    except (OSError, EOFError, pickle.UnpicklingError):
        got = reference_run(optimizer, case, name, dtype, steps, 0, rounded=rounded)
        partial = f"{path}.{os.getpid()}"
        with open(partial, "wb") as f:
            pickle.dump(got, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, path)  # whole or absent: another worker never reads half a file
    _REFERENCES[key] = got
    return got


_REFERENCES: dict[Any, Any] = {}


class _Result:
    """What a row accumulates: the worst error, the views (core rows), the trajectories run, problems."""

    def __init__(self) -> None:
        self.error = 0.0
        self.views: Counter[int] | None = None
        self.views_agree = True
        self.runs = 0
        self.problems: list[str] = []

    def add(self, error: float, runs: int) -> None:
        self.error = max(self.error, error)
        self.runs += runs

    def add_views(self, ours: Sequence[int], ref: Sequence[int]) -> None:
        self.views = self.views if self.views is not None else Counter()
        self.views.update(int(v) for v in ours)
        self.views_agree &= [int(v) for v in ours] == [int(v) for v in ref]


def _trajectories(b: Backend, refs: dict[str, Any], step: Callable[[int], tuple[dict[str, Any], Any]]) -> Any:
    """Our trajectories of an entry point that steps every param at once: ``step(t)`` runs step ``t`` and
    returns ``(params, get)``, ``get(name, field)`` a state array of param ``name``; the params and the
    state fields the official state has, on the host, after every step."""
    ours: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in refs}
    for t in range(len(next(iter(refs.values())).grads)):
        params, get = step(t)
        for n, ref in refs.items():
            ours[n].setdefault("param", []).append(_host(b, params[n]))
            for f in ref.states[t]:
                ours[n].setdefault(f, []).append(_host(b, get(n, f)))
    return ours


# -- the core ---------------------------------------------------------------------------------------


def _core_eager(row: Row, b: Backend, job: _Job, res: _Result) -> None:
    import functools

    import adamp_core as ac

    from .oracle import run_core

    for opt in ("adamp", "sgdp"):
        core = ac.adamp_step if opt == "adamp" else ac.sgdp_step
        for case, hp in job.each_case(opt).items():
            step_fn = functools.partial(core, **hp)
            for shape in job.shapes:
                r = run_core(b, opt, case, shape, row.dtype, job.steps, step_fn=step_fn)
                res.add(r.max_rel_error, 1)
                res.add_views(r.views, r.ref_views)


def _traced_hp(optimizer: str, hp: dict[str, Any], dtype: str) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """A case's hyperparameters (with every default) split into the ones a compiled program takes as 0-d
    array arguments, so that one program serves every case, and the static ones, a program each: the flags
    (``nesterov``, ``caution``...: Python bools by contract) and, below float64, AdamP's ``betas`` (a float32
    array beta2 = 0.999 is off by 1.3e-8, which moves ``log beta2``, and so ``1 - beta2**t``, by 1.3e-5
    relative: the maths would be right and the comparison off; float64 holds them as a Python float does).
    Returns ``(traced, static)``, ``static`` a sorted tuple of ``(name, value)``."""
    from adamp_core.optimizers import ADAMP, SGDP

    spec = ADAMP if optimizer == "adamp" else SGDP
    full = {**spec.defaults, **hp}
    static = {k: v for k, v in full.items() if isinstance(v, bool)}
    if optimizer == "adamp" and dtype != "float64":
        static["betas"] = tuple(full["betas"])
    return {k: v for k, v in full.items() if k not in static}, tuple(sorted(static.items()))


def _jax_device_put(b: Backend, x: Any, dtype: str) -> Any:
    import jax
    import jax.numpy as jnp

    if isinstance(x, (tuple, list)):  # betas
        return tuple(_jax_device_put(b, v, dtype) for v in x)
    return jax.device_put(jnp.asarray(x, dtype=getattr(jnp, dtype)), jax.devices(b.device)[0])


def _core_jit(row: Row, b: Backend, job: _Job, res: _Result) -> None:
    """``adamp_core.adamp_step``/``sgdp_step`` under ``jax.jit``: one program per optimizer and static
    hyperparameters (:func:`_traced_hp`) that steps every shape through every step (``jax.lax.scan``), the
    other hyperparameters traced, so the cases share it."""
    import jax

    import adamp_core as ac

    programs: dict[Any, Any] = {}
    for opt in ("adamp", "sgdp"):
        step_fn = ac.adamp_step if opt == "adamp" else ac.sgdp_step
        init_fn = ac.adamp_init if opt == "adamp" else ac.sgdp_init
        fields = ("exp_avg", "exp_avg_sq") if opt == "adamp" else ("momentum",)
        for case, hp in job.each_case(opt).items():
            traced, static = _traced_hp(opt, hp, row.dtype)
            key = (opt, static)
            if key not in programs:

                def program(inits: Any, grads: Any, h: Any, static: Any = static, step_fn: Any = step_fn,
                            init_fn: Any = init_fn, fields: Any = fields) -> Any:
                    out = {}
                    for name, w0 in inits.items():
                        def body(carry: Any, g: Any) -> Any:
                            w, s = carry
                            view = ac.projected_view(w, g, h["delta"], h["eps"])
                            w, s = step_fn(w, g, s, **dict(static), **h)
                            return (w, s), (w, tuple(getattr(s, f) for f in fields), view)

                        out[name] = jax.lax.scan(body, (w0, init_fn(w0)), grads[name])[1]
                    return out

                programs[key] = jax.jit(program)
            refs = job.refs(opt, case, row.dtype)
            inits = {n: b.asarray(r.init, row.dtype) for n, r in refs.items()}
            grads = {n: b.asarray(np.stack(r.grads), row.dtype) for n, r in refs.items()}
            h = {k: _jax_device_put(b, v, row.dtype) for k, v in traced.items()}
            out = jax.device_get(programs[key](inits, grads, h))
            for name, ref in refs.items():
                params, states, views = out[name]
                ours = {"param": [_host(b, w) for w in params]}
                for f, arr in zip(fields, states, strict=True):
                    ours[f] = [_host(b, x) for x in arr]
                res.add(_compare({name: ref}, {name: ours}), 1)
                res.add_views(list(np.asarray(views)), ref.views)


def _tree(row: Row, b: Backend, job: _Job, res: _Result) -> None:
    """``adamp_core.tree`` over a dict holding every shape."""
    from adamp_core import tree

    for opt in ("adamp", "sgdp"):
        step_fn = tree.adamp_step if opt == "adamp" else tree.sgdp_step
        init_fn = tree.adamp_init if opt == "adamp" else tree.sgdp_init
        for case, hp in job.each_case(opt).items():
            refs = job.refs(opt, case, row.dtype)
            box = {"params": {n: b.asarray(r.init, row.dtype) for n, r in refs.items()}}
            box["states"] = init_fn(box["params"])

            def step(t: int, refs: Any = refs, box: Any = box, hp: Any = hp, step_fn: Any = step_fn) -> Any:
                grads = {n: b.asarray(r.grads[t], row.dtype) for n, r in refs.items()}
                box["params"], box["states"] = step_fn(box["params"], grads, box["states"], **hp)
                return box["params"], lambda n, f: getattr(box["states"][n], f)

            res.add(_compare(refs, _trajectories(b, refs, step)), len(refs))


# -- the adapters -----------------------------------------------------------------------------------


def _torch_adapter(row: Row, b: Backend, job: _Job, res: _Result) -> None:
    """``adamp_torch.AdamP``/``SGDP`` (``torch.optim`` drop-ins) over ``nn.Parameter``s of every shape."""
    import torch

    import adamp_torch

    kwargs = row.kwargs
    if "state_dtype" in kwargs:
        kwargs["state_dtype"] = getattr(torch, kwargs["state_dtype"])
    channels_last = "channels_last" in row.options
    copies = 2 if MULTI in row.expected else 1

    def fmt(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    for opt in ("adamp", "sgdp"):
        cls = adamp_torch.AdamP if opt == "adamp" else adamp_torch.SGDP
        for case, hp in job.each_case(opt).items():
            refs = job.refs(opt, case, row.dtype, copies)
            params = {n: torch.nn.Parameter(fmt(b.asarray(r.init, row.dtype))) for n, r in refs.items()}
            optimizer = cls(list(params.values()), **hp, **kwargs)

            def step(t: int, refs: Any = refs, params: Any = params, optimizer: Any = optimizer) -> Any:
                for n, p in params.items():
                    p.grad = fmt(b.asarray(refs[n].grads[t], row.dtype))
                optimizer.step()
                return params, lambda n, f: optimizer.state[params[n]][f]

            res.add(_compare(refs, _trajectories(b, refs, step)), len(refs))
            for n, p in params.items():  # the adapter keeps dtype, memory format and state dtype
                want = kwargs.get("state_dtype", p.dtype)
                if p.dtype != getattr(torch, row.dtype) or any(
                        v.dtype != want for k, v in optimizer.state[p].items() if k != "step"):
                    res.problems.append(f"{n}: dtype changed")
                if channels_last and p.dim() == 4 and not all(
                        x.is_contiguous(memory_format=torch.channels_last)
                        for x in (p, *(v for k, v in optimizer.state[p].items() if k != "step"))):
                    res.problems.append(f"{n}: channels_last lost")


def _array_adapter(row: Row, b: Backend, job: _Job, res: _Result) -> None:
    """``adamp_array.AdamP``/``SGDP`` over a dict of arrays of every shape."""
    import adamp_array

    copies = 2 if MULTI in row.expected else 1
    for opt in ("adamp", "sgdp"):
        cls = adamp_array.AdamP if opt == "adamp" else adamp_array.SGDP
        for case, hp in job.each_case(opt).items():
            refs = job.refs(opt, case, row.dtype, copies)
            optimizer = cls({n: b.asarray(r.init, row.dtype) for n, r in refs.items()}, **hp, **row.kwargs)

            def step(t: int, refs: Any = refs, optimizer: Any = optimizer) -> Any:
                current = optimizer.step({n: b.asarray(r.grads[t], row.dtype) for n, r in refs.items()})
                states = optimizer.states
                return current, lambda n, f: getattr(states[n], f)

            res.add(_compare(refs, _trajectories(b, refs, step)), len(refs))


def _optax_adapter(row: Row, b: Backend, job: _Job, res: _Result) -> None:
    """``adamp_optax.adamp``/``sgdp`` (``update`` + ``optax.apply_updates``) under ``jax.jit``: one program
    per optimizer and static hyperparameters (:func:`_traced_hp`) scanning over the steps, the others traced."""
    import jax
    import optax

    import adamp_optax

    from .adapters_conformance import optax_kwargs

    foreach = row.kwargs.get("foreach")
    copies = 2 if foreach else 1
    programs: dict[Any, Any] = {}
    for opt in ("adamp", "sgdp"):
        make = adamp_optax.adamp if opt == "adamp" else adamp_optax.sgdp
        fields = ("exp_avg", "exp_avg_sq") if opt == "adamp" else ("momentum",)
        for case, hp in job.each_case(opt).items():
            traced, static = _traced_hp(opt, hp, row.dtype)
            key = (opt, static)
            if key not in programs:

                def program(params: Any, grads: Any, h: Any, static: Any = static, make: Any = make,
                            fields: Any = fields, opt: str = opt) -> Any:
                    tx = make(**optax_kwargs(opt, {**h, **dict(static)}), foreach=foreach)

                    def body(carry: Any, g: Any) -> Any:
                        p, s = carry
                        updates, s = tx.update(g, s, p)
                        p = optax.apply_updates(p, updates)
                        return (p, s), (p, tuple(getattr(s, f) for f in fields))

                    return jax.lax.scan(body, (params, tx.init(params)), grads)[1]

                programs[key] = jax.jit(program)
            refs = job.refs(opt, case, row.dtype, copies)
            params = {n: b.asarray(r.init, row.dtype) for n, r in refs.items()}
            grads = {n: b.asarray(np.stack(r.grads), row.dtype) for n, r in refs.items()}
            h = {k: _jax_device_put(b, v, row.dtype) for k, v in traced.items()}
            out_params, out_states = jax.device_get(programs[key](params, grads, h))
            ours = {n: {"param": [_host(b, w) for w in out_params[n]]} for n in refs}
            for f, tree in zip(fields, out_states, strict=True):
                for n in refs:
                    ours[n][f] = [_host(b, x) for x in tree[n]]
            res.add(_compare(refs, ours), len(refs))


_RUNNERS = {
    ("core", False): _core_eager,
    ("core", True): _core_jit,
    ("tree", False): _tree,
    ("adamp_torch", False): _torch_adapter,
    ("adamp_array", False): _array_adapter,
    ("adamp_optax", True): _optax_adapter,
}


def _skip_reason(row: Row, b: Backend) -> str | None:
    reason = b.skip_reason()
    if reason:
        return reason
    if row.target == "adamp_optax" and b.library != "jax":
        return "adamp_optax runs on JAX only"
    if row.target == "adamp_torch" and b.library != "torch":
        return "adamp_torch runs on torch only"
    try:
        __import__({"adamp_torch": "adamp_torch", "adamp_array": "adamp_array",
                    "adamp_optax": "adamp_optax"}.get(row.target, "adamp_core"))
    except ImportError as exc:
        return f"{row.name} is not installed ({exc})"
    return reference_missing(row)


def reference_missing(row: Row) -> str | None:
    """Why ``row``'s reference cannot run here because it is not installed, with the install hint (the
    cautious rows without timm); None otherwise. Only a package that cannot be found is a SKIP: a reference
    that is installed but fails to load fails its rows. (adamp 0.3.0 itself is checked by the command.)"""
    if not row.cautious:
        return None
    from .timm_reference import missing

    return missing()


@contextlib.contextmanager
def _jax_x64(dtype: str, backend: Backend) -> Iterator[None]:
    """JAX float64 rows need ``jax_enable_x64``; float32 rows run without it, as JAX runs by default."""
    if backend.library != "jax":
        yield
        return
    import jax

    before = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", dtype == "float64")
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def run_row(row: Row, steps: int = DEFAULT_STEPS, perturb: str | None = None) -> dict[str, Any]:
    """Run one row here (in this process); return its result (the :meth:`Row.describe` fields, ``status``
    PASS/FAIL/SKIP, ``max_rel_error``, ``tolerance``, ``path`` (what ran), ``views``, ``runs``, ``steps``,
    ``cases``, ``shapes``, ``seconds`` (wall), ``cpu_seconds`` (this process's, compilations included),
    ``note``). ``perturb``: a target (or "all") whose rows take a
    deliberately wrong step (tests)."""
    b = get_backend(row.backend)
    out = row.describe()
    reason = _skip_reason(row, b)
    if reason:
        return {**out, "status": "SKIP", "note": reason}
    job = _Job(steps, row.cases, row.shapes, perturb in (row.target, "all"))
    t0, cpu0 = time.perf_counter(), time.process_time()
    res = _Result()
    with _jax_x64(row.dtype, b):
        if not b.supports(row.dtype):
            return {**out, "status": "SKIP", "note": f"{b.id} has no {row.dtype}"}
        try:
            with record_paths() as counts:
                _RUNNERS[(row.target, row.jit)](row, b, job, res)
        except Exception as exc:  # a row that raises fails, with the reason; the others still run
            return {**out, "status": "FAIL", "note": f"{type(exc).__name__}: {exc}"[:300],
                    "seconds": round(time.perf_counter() - t0, 2)}
    if row.target in ("core", "tree"):  # the single-tensor entry points: no dispatcher, per tensor
        counts = Counter({PER_TENSOR: res.runs})
    tol = row_tolerance(row.dtype, steps)
    passed = res.error <= tol and res.views_agree and not res.problems
    note = "; ".join([*([] if res.views_agree else ["views differ from adamp 0.3.0's"]), *res.problems[:3]])
    views = None if res.views is None else {"channel": res.views[1], "layer": res.views[2], "none": res.views[0]}
    return {**out, "path": path_label(counts, row.jit), "paths": dict(counts), "runs": res.runs, "steps": steps,
            "cases": {k: list(_cases(k, v)) for k, v in job.cases.items()}, "shapes": list(job.shapes),
            "max_rel_error": res.error, "tolerance": tol, "views": views, "views_agree": res.views_agree,
            "status": "PASS" if passed else "FAIL", **({"note": note} if note else {}),
            "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - cpu0, 2)}


# -- running many rows ------------------------------------------------------------------------------


def _projecting(shapes: Sequence[str]) -> int:
    """How many of ``shapes`` take the projection (ndim > 1): what JAX's compilations grow with."""
    return sum(len(SHAPES[s][0]) > 1 for s in shapes if s in SHAPES)


# Rough cost of a row in seconds on one core of a small machine with empty caches, where JAX compiles
# every program (~0.9 s per jax.jit program and shape that projects) and every eager operation (~3 s per
# shape that projects): the longest bundles start first, so that both workers stay busy to the end.
def _cost(row: Row) -> float:
    b = get_backend(row.backend)
    n = _projecting(row.shapes)
    if b.library == "jax":
        if row.jit:
            programs = len({(opt, _traced_hp(opt, hp, row.dtype)[1])
                            for opt, names in row.cases.items() for hp in _cases(opt, names).values()})
            return 0.9 * n * programs * (2.2 if "foreach=True" in row.options else 1.0) + 1.0
        return 3.0 * n * (2.0 if row.expected == MULTI else 1.0) + 1.0
    if b.library == "array_api_strict":
        return 1.5
    return 2.5 if row.target == "core" else 1.5 if row.dtype in HALF_DTYPES else 0.8


_KERNELS_COST = 14.0  # numba compiling the fused kernels (AdamP's and SGDP's) of one dtype


def _bundles(rows: Sequence[Row]) -> list[list[Row]]:
    """Rows that share compiled code or imports run in one process, one after the other: every row of one
    JAX backend (one import of JAX and optax; the eager rows of one dtype share XLA's compiled operations,
    one per operation, shape and dtype), and the rows that run the fused kernels (numba compiles them once
    per dtype, and their helpers once; a process loads them from its cache once). Longest first."""
    groups: dict[Any, list[Row]] = {}
    for row in rows:
        if get_backend(row.backend).library == "jax":
            key: Any = row.backend
        elif row.expected.startswith(FUSED):
            key = FUSED
        else:
            key = row
        groups.setdefault(key, []).append(row)

    def cost(bundle: list[Row]) -> float:
        kernels = len({r.dtype for r in bundle if r.expected.startswith(FUSED)}) * _KERNELS_COST
        return kernels + sum(_cost(r) for r in bundle)

    return sorted(groups.values(), key=lambda g: -cost(g))


def _cheap_skip(backend: Backend) -> str | None:
    """Why ``backend`` cannot run here, when that is known without importing its library (not installed);
    None otherwise (the worker that runs the row checks the device, importing the library there)."""
    import importlib.util

    name = "jax" if backend.library == "jax" else backend.library
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{backend.library} is not installed (ModuleNotFoundError)"


_SETTINGS: dict[str, Any] = {}


def _worker_init(settings: dict[str, Any]) -> None:
    """A worker's set-up, before torch, JAX or numba are imported (each is imported by the first row that
    needs it): one thread each (the workers share the cores); JAX's persistent compilation cache, through
    its environment variables (every operation of an eager JAX row and every jax.jit program is loaded from
    it on later runs); the run's folder of references; the queue of results."""
    _SETTINGS.update(settings)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["NUMBA_NUM_THREADS"] = "1"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    cache = settings.get("jax_cache")
    if cache:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if settings.get("queue") is not None:  # each result also comes back with its bundle's: the worker may exit
        settings["queue"].cancel_join_thread()  # without waiting for the parent to read the last ones


def _prepare_here(settings: dict[str, Any]) -> None:
    """This process (``workers=0``), whose threads are the caller's: JAX's persistent compilation cache."""
    cache = settings.get("jax_cache")
    if cache:
        with contextlib.suppress(ImportError):
            import jax

            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _run_bundle(rows: list[Row], steps: int, perturb: str | None) -> list[dict[str, Any]]:
    """Run ``rows`` here, each result also sent to the parent as it finishes (``_SETTINGS["queue"]``)."""
    out = []
    for row in rows:
        out.append(run_row(row, steps, perturb))
        queue = _SETTINGS.get("queue")
        if queue is not None:
            queue.put((row, out[-1]))
    return out


def jax_cache_dir(path: str | None = None) -> str | None:
    """JAX's persistent compilation cache for the workers: ``path``, else ``$ADAMP_XP_JAX_CACHE``, else
    ``~/.cache/adamp-xp/jax`` (the one ``adamp-xp bench`` uses); ``"none"``: off."""
    path = path or os.environ.get("ADAMP_XP_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "adamp-xp", "jax")
    return None if path.lower() == "none" else os.path.abspath(path)


def run_rows(rows: Sequence[Row], steps: int = DEFAULT_STEPS, workers: int = 2,
             jax_cache: str | None = None, perturb: str | None = None,
             on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run ``rows`` (in ``workers`` spawned processes; 0: here, in this process) and return their results in
    the order of ``rows``; ``on_result`` sees each as it finishes. Rows whose library is not installed are
    skipped at once, without a worker; the workers check the devices (this process imports neither torch
    nor JAX, so the workers start at once)."""
    results: dict[Row, dict[str, Any]] = {}

    def done(row: Row, result: dict[str, Any]) -> None:
        results[row] = result
        if on_result is not None:
            on_result(result)

    runnable = []
    for row in rows:
        b = get_backend(row.backend)
        reason = (b.skip_reason() if workers <= 0 else _cheap_skip(b)) or reference_missing(row)
        if reason:
            done(row, {**row.describe(), "status": "SKIP", "note": reason})
        else:
            runnable.append(row)
    settings: dict[str, Any] = {"jax_cache": jax_cache}
    if workers <= 0:  # here, in order; the caller's threads are left alone
        _prepare_here(settings)
        for row in runnable:
            done(row, run_row(row, steps, perturb))
        return [results[r] for r in rows]

    import multiprocessing
    import queue as queues
    import shutil
    import tempfile
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # no fork after torch/JAX started their threads
    settings["refs"] = tempfile.mkdtemp(prefix="adamp-xp-refs-")
    settings["queue"] = finished = ctx.Queue()  # each row's result as it finishes

    def drain(block: float) -> None:
        with contextlib.suppress(queues.Empty):
            while True:
                row, result = finished.get(timeout=block)
                block = 0.0
                if row not in results:
                    done(row, result)

    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, settings["refs"], ignore_errors=True)
        pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                       initializer=_worker_init, initargs=(settings,)))
        futures = {pool.submit(_run_bundle, bundle, steps, perturb): bundle for bundle in _bundles(runnable)}
        while futures:
            drain(0.1)
            finished_now, _ = wait(futures, timeout=0, return_when=FIRST_COMPLETED)
            for future in finished_now:
                bundle = futures.pop(future)
                try:
                    returned = future.result()
                except Exception as exc:  # a worker died (out of memory, a crash in a native library)
                    drain(0.5)  # what it sent before
                    returned = [{**r.describe(), "status": "FAIL", "note": f"worker failed: {exc!r}"[:300]}
                                for r in bundle]
                for row, result in zip(bundle, returned, strict=True):
                    if row not in results:
                        done(row, result)
    return [results[r] for r in rows]


# -- what ran where -------------------------------------------------------------------------------------

_DISTRIBUTIONS = ("adamp-xp", "adamp", "numpy", "array-api-compat", "array-api-strict", "torch", "jax", "jaxlib",
                  "optax", "numba", "cupy", "cupy-cuda12x", "tqdm")


def versions() -> dict[str, str | None]:
    """The installed version of every package a row may use (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in _DISTRIBUTIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    """Platform, CPU count (and the CPUs this process may use), Python."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        usable = os.cpu_count()
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "usable_cpus": usable, "python": sys.version.split()[0],
            "python_implementation": platform.python_implementation()}
