r"""``adamp-xp toy``: the paper's 2-D toy problem (Heo et al., ICLR 2021, Sec. 2.4 and the project page),

.. math::

    \min_{w\in\mathbb R^2} f(w) = -\frac{w}{\lVert w\rVert}\cdot\frac{w^*}{\lVert w^*\rVert},
    \qquad \nabla f(w) = -\frac{1}{\lVert w\rVert}\Big(\hat w^* - (\hat w\cdot\hat w^*)\,\hat w\Big),

which is scale-invariant (:math:`f(cw) = f(w)`), so :math:`w\cdot\nabla f(w) = 0`. Every update goes
through :mod:`adamp_core`:

* **GD** and **momentum GD**: :func:`adamp_core.sgdp_step` on a 1-d ``w`` of shape ``(2,)``. The core
  never projects 1-d params, so this is exactly torch-style (heavy-ball) SGD,
  :math:`p_t = \beta p_{t-1} + \nabla f(w_t)`, :math:`w_{t+1} = w_t - \eta p_t` (paper Sec. 2.3).
* **SGDP**: :func:`adamp_core.sgdp_step` on the same numbers held as a ``(1, 2)`` array: one row of
  length 2, i.e. the whole vector is one scale-invariant "channel". The channel-view test
  :math:`\lvert\cos(\nabla f, w)\rvert < \delta/\sqrt 2` then passes (the cosine is 0 up to rounding) and
  the update is projected, :math:`w_{t+1} = w_t - \eta\,\Pi_{w_t}(p_t)`. This is ``adamp.SGDP`` 0.3.0,
  which also stores the *projected* buffer (:math:`p_t \leftarrow \Pi_{w_t}(p_t)`).
* **SGDP (Alg. 1)**: the paper's Algorithm 1 as printed, where the momentum buffer keeps its radial part
  and only the update is projected: :func:`adamp_core.sgdp_step` with ``project_buffer=False`` (timm's
  SGDP).
* **Adam** / **AdamP**: :func:`adamp_core.adamp_step` on ``(2,)`` (never projected: Adam) and on
  ``(1, 2)`` (projected: AdamP). AdamP's moments are never projected (Algorithm 2 as printed).

The run also checks Lemma 2.1 (GD: :math:`\lVert w_{t+1}\rVert^2 = \lVert w_t\rVert^2 + \eta^2\lVert\nabla f\rVert^2`)
and Lemma 2.2 (momentum: :math:`\lVert w_{t+1}\rVert^2 = \lVert w_t\rVert^2 + \eta^2\lVert p_t\rVert^2
+ 2\eta^2\sum_{k<t}\beta^{t-k}\lVert p_k\rVert^2`) step by step, and that SGDP's norm grows only by the
second-order term :math:`\lVert w_{t+1}-w_t\rVert^2 = \eta^2\lVert\Pi p_t\rVert^2`.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import DEFAULT_OUT, invalid, out_folder, run_subcommand

__all__ = [
    "METHOD_LABELS",
    "ToyConfig",
    "ToyResult",
    "ToyRun",
    "check_lemmas",
    "format_table",
    "main",
    "plot_curves",
    "plot_trajectories",
    "register",
    "run_toy",
    "toy_grad",
]

# Default budget. lr = 0.04 from w0 at 90 degrees to w* makes momentum 0.9 grow |w| from 1 to ~2.9, the
# value the project page (clovaai.github.io/AdamP) reports without giving its lr or init; the 0.95/0.99
# norms are then predictions, not fits.
DEFAULT_STEPS = 1000
DEFAULT_LR = 0.04
DEFAULT_ADAM_LR = 0.1
DEFAULT_ANGLE = 90.0
DEFAULT_MOMENTA = (0.9, 0.95, 0.99)
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}

METHOD_LABELS = {
    "gd": "GD",
    "momentum": "momentum GD",
    "sgdp": "SGDP",
    "sgdp_alg1": "SGDP (Alg. 1)",
    "adam": "Adam",
    "adamp": "AdamP",
}
_COLORS = {
    "gd": "tab:red",
    "momentum": "tab:orange",
    "sgdp": "tab:green",
    "sgdp_alg1": "tab:blue",
    "adam": "tab:orange",
    "adamp": "tab:green",
}
_STYLES = {"sgdp_alg1": "--"}


@dataclass(frozen=True)
class ToyConfig:
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    adam_lr: float = DEFAULT_ADAM_LR
    angle: float = DEFAULT_ANGLE  # initial angle between w0 and w*, degrees; |w0| = 1
    momenta: tuple[float, ...] = DEFAULT_MOMENTA
    backend: str = "numpy"
    dtype: str = "float64"
    delta: float = 0.1
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"Invalid steps: {self.steps!r} (expected an int >= 1)")
        for name in ("lr", "adam_lr"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"Invalid {name}: {value!r} (expected a finite number > 0)")
        if not (isinstance(self.angle, int | float) and 0.0 < self.angle < 180.0):
            raise ValueError(f"Invalid angle: {self.angle!r} (expected degrees in (0, 180); 180 is a saddle)")
        for m in self.momenta:
            if not (isinstance(m, int | float) and 0.0 < m < 1.0):
                raise ValueError(f"Invalid momentum: {m!r} (expected 0 < momentum < 1)")
        if self.dtype not in TOLERANCE:
            raise ValueError(f"Invalid dtype: {self.dtype!r} (expected float64 or float32)")

    @property
    def w0(self) -> np.ndarray:
        a = math.radians(self.angle)
        return np.array([math.cos(a), math.sin(a)])

    @property
    def w_star(self) -> np.ndarray:
        return np.array([1.0, 0.0])


@dataclass
class ToyRun:
    """One optimizer's trajectory (host float64 copies of what the backend computed)."""

    method: str  # gd | momentum | sgdp | sgdp_alg1 | adam | adamp
    momentum: float  # 0 for GD; beta1 for Adam/AdamP
    lr: float
    w: np.ndarray  # (T+1, 2): w_0 .. w_T
    grad_sq: np.ndarray  # (T,): |grad f(w_t)|^2
    buf_sq: np.ndarray  # (T,): |p_t|^2, p_t = beta p_{t-1} + grad (unprojected); NaN for Adam/AdamP
    effective_step: np.ndarray  # (T,): |w_{t+1}/|w_{t+1}| - w_t/|w_t||, from adamp_core.diagnostics
    cos_channel: np.ndarray  # (T,): |cos(grad, w)| of the scale-invariance test; NaN for 1-d runs
    view: np.ndarray  # (T,): view projected (0 none, 1 channel, 2 layer)
    w_star: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0]))

    @property
    def name(self) -> str:
        label = METHOD_LABELS[self.method]
        return f"{label} {self.momentum:g}" if self.method in ("momentum", "sgdp", "sgdp_alg1") else label

    @property
    def norms(self) -> np.ndarray:
        return np.linalg.norm(self.w, axis=1)

    @property
    def angles(self) -> np.ndarray:
        """Angle between w_t and w* in degrees (atan2: accurate at small angles too)."""
        u = self.w_star / np.linalg.norm(self.w_star)
        cross = self.w[:, 0] * u[1] - self.w[:, 1] * u[0]
        return np.degrees(np.arctan2(np.abs(cross), self.w @ u))

    def first_below(self, degrees: float = 1.0) -> int | None:
        """First step t with angle(w_t, w*) < degrees (None if never)."""
        hit = np.flatnonzero(self.angles < degrees)
        return int(hit[0]) if hit.size else None

    def settled_below(self, degrees: float = 1.0) -> int | None:
        """First step t from which the angle stays below ``degrees`` to the end (None if it does not)."""
        above = np.flatnonzero(self.angles >= degrees)
        if above.size == 0:
            return 0
        t = int(above[-1]) + 1
        return t if t < len(self.w) else None


@dataclass
class ToyResult:
    config: ToyConfig
    runs: list[ToyRun]
    checks: list[dict[str, Any]] = field(default_factory=list)

    def run(self, method: str, momentum: float | None = None) -> ToyRun:
        for r in self.runs:
            if r.method == method and (momentum is None or r.momentum == momentum):
                return r
        raise KeyError((method, momentum))

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)


def toy_grad(xp: Any, w: Any, u: Any) -> Any:
    r""":math:`\nabla f(w) = -(\hat w^* - (\hat w\cdot\hat w^*)\hat w)/\lVert w\rVert` for unit ``u`` = :math:`\hat w^*`
    (same shape as ``w``), in ``w``'s namespace."""
    n = xp.sqrt(xp.sum(w * w))
    wh = w / n
    return -(u - xp.sum(wh * u) * wh) / n


def _make_step(xp: Any, method: str, hp: dict[str, Any], u: Any, delta: float, eps: float) -> Callable[..., Any]:
    from array_api_compat import device

    import adamp_core as ac
    from adamp_core import diagnostics

    beta = hp.get("momentum", 0.0)

    def step(w: Any, state: Any) -> tuple[Any, Any, tuple[Any, ...]]:
        g = toy_grad(xp, w, u)
        if method in ("adam", "adamp"):
            w1, state1 = ac.adamp_step(w, g, state, **hp)
            p_sq = xp.full((), math.nan, dtype=w.dtype, device=device(w))
        else:
            p = beta * state.momentum + g  # Alg. 1 line 2, unprojected (what Lemma 2.2 is about)
            w1, state1 = ac.sgdp_step(w, g, state, **hp)
            p_sq = xp.sum(p * p)
        d = diagnostics.step_diagnostics(w, w1, g, delta=delta, eps=eps)
        return w1, state1, (xp.sum(g * g), p_sq, d.effective_step, d.cos_channel, d.view)

    return step


def _methods(cfg: ToyConfig) -> list[tuple[str, float, dict[str, Any], bool]]:
    """(method, momentum, core hyperparameters, projected?) for every run."""
    common = dict(delta=cfg.delta, eps=cfg.eps)
    out: list[tuple[str, float, dict[str, Any], bool]] = [("gd", 0.0, dict(lr=cfg.lr, momentum=0.0, **common), False)]
    for m in cfg.momenta:
        hp = dict(lr=cfg.lr, momentum=float(m), **common)
        out += [("momentum", float(m), hp, False), ("sgdp", float(m), hp, True),
                ("sgdp_alg1", float(m), dict(hp, project_buffer=False), True)]  # the buffer keeps its radial part
    ahp = dict(lr=cfg.adam_lr, **common)
    out += [("adam", 0.9, ahp, False), ("adamp", 0.9, ahp, True)]
    return out


def _resolve_backend(name: str) -> Any:
    from adamp_xp.testing.backends import get_backend

    return get_backend({"torch": "torch:cpu", "jax": "jax:cpu"}.get(name, name))


def run_toy(cfg: ToyConfig | None = None, **overrides: Any) -> ToyResult:
    """Run every optimizer on the toy with ``cfg`` (or ``ToyConfig(**overrides)``) and check the lemmas."""
    import adamp_core as ac

    cfg = cfg if cfg is not None else ToyConfig(**overrides)
    backend = _resolve_backend(cfg.backend)
    reason = backend.skip_reason()
    if reason:
        raise RuntimeError(f"backend {backend.id} is not usable here: {reason}")
    if backend.library == "jax" and cfg.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    from array_api_compat import array_namespace

    runs = []
    for method, momentum, hp, projected in _methods(cfg):
        shape = (1, 2) if projected else (2,)  # (1, 2): one scale-invariant row; (2,): never projected
        w = backend.asarray(cfg.w0.reshape(shape), cfg.dtype)
        u = backend.asarray((cfg.w_star / np.linalg.norm(cfg.w_star)).reshape(shape), cfg.dtype)
        xp = array_namespace(w)
        state = ac.adamp_init(w) if method in ("adam", "adamp") else ac.sgdp_init(w)
        step = _make_step(xp, method, hp, u, cfg.delta, cfg.eps)
        if backend.library == "jax":
            import jax

            step = jax.jit(step)  # the core steps and diagnostics are sync-free, so they trace once
        ws, recs = [w], []
        for _ in range(cfg.steps):
            w, state, rec = step(w, state)
            ws.append(w)
            recs.append(rec)
        # One stack and one transfer per series, after the loop (no per-step host sync).
        cols = [backend.to_numpy(xp.stack([r[i] for r in recs])) for i in range(5)]
        traj = backend.to_numpy(xp.stack([xp.reshape(v, (2,)) for v in ws]))
        runs.append(
            ToyRun(
                method,
                momentum,
                hp["lr"],
                traj,
                cols[0],
                cols[1],
                cols[2],
                cols[3],
                cols[4].astype(np.int64),
                cfg.w_star.copy(),
            )
        )
    result = ToyResult(cfg, runs)
    result.checks = check_lemmas(result)
    return result


def check_lemmas(result: ToyResult) -> list[dict[str, Any]]:
    """The paper's lemmas on the recorded trajectories, step by step, in float64 on the host.

    Residuals are relative to :math:`\\lVert w_{t+1}\\rVert^2`; tolerance 1e-12 for a float64 run
    (1e-5 for float32). Also checks that momentum's norm grows strictly more than GD's and that SGDP's
    per-step norm change is the second-order term
    :math:`\\lVert w_{t+1} - w_t\\rVert^2 = \\eta^2\\lVert\\Pi p_t\\rVert^2` (up to the ``eps`` in
    :math:`\\hat w = w/(\\lVert w\\rVert+\\epsilon)` and rounding).
    """
    cfg = result.config
    tol = TOLERANCE[cfg.dtype]
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float, passed: bool, detail: str) -> None:
        checks.append(dict(name=name, value=value, tolerance=tol, passed=bool(passed), detail=detail))

    gd = result.run("gd")
    sq = gd.norms**2
    res = np.abs(sq[1:] - sq[:-1] - gd.lr**2 * gd.grad_sq) / sq[1:]
    add(
        "Lemma 2.1 (GD)",
        float(res.max()),
        res.max() <= tol,
        "max_t ||w_{t+1}|^2 - |w_t|^2 - lr^2 |grad|^2| / |w_{t+1}|^2",
    )
    growth_gd = sq[-1] - sq[0]
    for m in cfg.momenta:
        run = result.run("momentum", m)
        sq = run.norms**2
        s = np.zeros_like(run.buf_sq)  # s_t = sum_{k<t} beta^{t-k} |p_k|^2 = beta (s_{t-1} + |p_{t-1}|^2)
        for t in range(1, len(s)):
            s[t] = m * (s[t - 1] + run.buf_sq[t - 1])
        rhs = sq[:-1] + run.lr**2 * run.buf_sq + 2 * run.lr**2 * s
        res = np.abs(sq[1:] - rhs) / sq[1:]
        add(
            f"Lemma 2.2 (momentum {m:g})",
            float(res.max()),
            res.max() <= tol,
            "max_t ||w_{t+1}|^2 - (|w_t|^2 + lr^2 |p_t|^2 + 2 lr^2 sum_k beta^(t-k) |p_k|^2)| / |w_{t+1}|^2",
        )
        growth = sq[-1] - sq[0]
        add(
            f"momentum {m:g} grows |w|^2 more than GD",
            float(growth / growth_gd),
            growth > growth_gd,
            "(|w_T|^2 - |w_0|^2) momentum / GD; must exceed 1",
        )
        for method in ("sgdp", "sgdp_alg1"):
            run = result.run(method, m)
            sq = run.norms**2
            dw2 = np.sum(np.diff(run.w, axis=0) ** 2, axis=1)  # eta^2 |Pi p_t|^2
            res = np.abs(sq[1:] - sq[:-1] - dw2) / sq[1:]
            # The first-order term -2 eta w.Pi(p) is eps-small: Pi uses w/(|w|+eps), not w/|w|.
            bound = tol + 4 * cfg.eps * cfg.lr * np.sqrt(run.buf_sq) / np.sqrt(sq[:-1])
            add(
                f"{METHOD_LABELS[method]} {m:g}: norm change is second order",
                float(res.max()),
                np.all(res <= bound),
                "max_t ||w_{t+1}|^2 - |w_t|^2 - |w_{t+1} - w_t|^2| / |w_{t+1}|^2; bound per "
                "step: tol + 4 eps lr |p_t| / |w_t| (the eps of w/(|w| + eps))",
            )
    return checks


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(result: ToyResult) -> str:
    """The results table: one row per optimizer."""
    head = [
        "optimizer",
        "lr",
        "final |w|",
        "steps to <1 deg",
        "stays <1 deg from",
        "final angle (deg)",
        "eff. step at end",
        "projected steps",
    ]
    body = []
    for r in result.runs:
        projected = int(np.count_nonzero(r.view)) if r.method in ("sgdp", "sgdp_alg1", "adamp") else None
        body.append(
            [
                r.name,
                f"{r.lr:g}",
                f"{r.norms[-1]:.3f}",
                _fmt(r.first_below(1.0), "d"),
                _fmt(r.settled_below(1.0), "d"),
                f"{r.angles[-1]:.2e}",
                f"{r.effective_step[-1]:.2e}",
                "-" if projected is None else f"{projected}/{len(r.view)}",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def format_checks(result: ToyResult) -> str:
    lines = []
    for c in result.checks:
        verdict = "holds" if c["passed"] else "FAILS"
        lines.append(f"{c['name']:<48} {c['value']:.2e}  {verdict}   [{c['detail']}]")
    return "\n".join(lines)


def _panels(result: ToyResult) -> list[tuple[str, list[ToyRun]]]:
    panels = []
    for m in result.config.momenta:
        runs = [result.run("gd")] + [result.run(k, m) for k in ("momentum", "sgdp", "sgdp_alg1")]
        panels.append((f"momentum {m:g} (lr {result.config.lr:g})", runs))
    panels.append((f"Adam vs AdamP (lr {result.config.adam_lr:g})", [result.run("adam"), result.run("adamp")]))
    return panels


def _pyplot() -> Any:
    import matplotlib

    if "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(r: ToyRun) -> str:
    return METHOD_LABELS[r.method]


_DPI = 110  # the figures' resolution (docs/figures: readable at the width of a page)


def _norm_ticks(ax: Any) -> None:
    """|w| on a log axis spanning one decade or less (Adam's 0.8 to 1.9) or a few (to ~30): ticks at round
    multiples of powers of ten (1, 2, 3, 5; finer where that gives fewer than three), labelled as plain
    numbers, and no labels on the minor ticks (matplotlib's default mixes "2x10^0" minor labels with "10^0"
    major ones)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = ax.get_ylim()
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1, 2, 3, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8)):
        ticks = [t for t in (m * 10.0**e for e in decades for m in mantissas) if lo <= t <= hi]
        if len(ticks) >= 3:
            break
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _decade_ticks(row: Any, most: int = 7) -> None:
    """Log axes over many decades (one row of panels): labelled ticks every k decades at the powers of ten
    divisible by k (10^0, 10^-4, 10^-8, ...: evenly spaced), k the same on every panel of the row (from 1, 2, 3,
    4, 5, 10, 20: the smallest that gives every panel at most ``most`` labels); unlabelled ticks at the other
    decades."""
    from matplotlib.ticker import FixedLocator, LogFormatterSciNotation, NullFormatter

    spans = []
    for ax in row:
        lo, hi = ax.get_ylim()
        spans.append((math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)))
    widest = max(e_hi - e_lo for e_lo, e_hi in spans)
    k = next((k for k in (1, 2, 3, 4, 5, 10, 20) if widest // k + 1 <= most), 50)
    for ax, (e_lo, e_hi) in zip(row, spans, strict=True):
        ax.yaxis.set_major_locator(FixedLocator([10.0**e for e in range(e_lo, e_hi + 1) if e % k == 0]))
        ax.yaxis.set_major_formatter(LogFormatterSciNotation())
        ax.yaxis.set_minor_locator(FixedLocator([10.0**e for e in range(e_lo, e_hi + 1) if e % k]))
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot_trajectories(result: ToyResult, path: str) -> str:
    """Trajectories on the plane, one panel per momentum (and Adam vs AdamP); returns ``path``."""
    plt = _pyplot()
    panels = _panels(result)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), layout="constrained")
    for ax, (title, runs) in zip(np.atleast_1d(axes), panels, strict=True):
        r_max = max(float(r.norms.max()) for r in runs) * 1.08
        circle = np.linspace(0, 2 * np.pi, 200)
        ax.plot(np.cos(circle), np.sin(circle), color="0.75", lw=0.8, zorder=0)
        ax.plot([0, r_max], [0, 0], color="0.4", lw=0.8, ls=":", zorder=0)
        ax.annotate("w*", (r_max * 0.92, 0), textcoords="offset points", xytext=(0, 4), fontsize=8, color="0.3")
        for r in runs:
            ax.plot(
                r.w[:, 0],
                r.w[:, 1],
                color=_COLORS[r.method],
                ls=_STYLES.get(r.method, "-"),
                lw=1.1,
                label=f"{_label(r)}: |w| {r.norms[-1]:.2f}",
            )
        ax.plot(*runs[0].w[0], "k.", ms=6)
        if r_max > 4:  # momentum flew far out: zoom on the unit circle, where the other runs stay
            ins = ax.inset_axes([0.03, 0.56, 0.42, 0.42])
            ins.plot(np.cos(circle), np.sin(circle), color="0.75", lw=0.8, zorder=0)
            for r in runs:
                ins.plot(r.w[:, 0], r.w[:, 1], color=_COLORS[r.method], ls=_STYLES.get(r.method, "-"), lw=1.0)
            ins.set_xlim(-0.3, 2.1)
            ins.set_ylim(-0.9, 1.5)
            ins.set_aspect("equal")
            ins.set_xticks([])
            ins.set_yticks([])
            ax.indicate_inset_zoom(ins, edgecolor="0.5")
        ax.set_aspect("equal")
        ax.set_xlim(-r_max, r_max)
        ax.set_ylim(-r_max, r_max)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(r"$w_1$ (along $w^*$)", fontsize=8)
        ax.set_ylabel(r"$w_2$", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5, loc="lower left")
    # No "\min_w" in the suptitle: mathtext sets its w under "min", where it ran into the panel titles.
    fig.suptitle(
        r"2-D toy $f(w) = -\hat w\cdot\hat w^*$: trajectories of $w$ from $|w_0| = 1$ (grey circle: $|w| = 1$)",
        fontsize=10,
        y=1.07,  # clear of the panel titles (constrained layout leaves them right under it)
    )
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", pad_inches=0.1)  # nothing cut: equal-aspect panels, ticks
    plt.close(fig)
    return path


def plot_curves(result: ToyResult, path: str) -> str:
    """|w|, effective step size and angle to w* over steps; one column per momentum (and Adam/AdamP)."""
    plt = _pyplot()
    panels = _panels(result)
    fig, axes = plt.subplots(
        3, len(panels), figsize=(3.4 * len(panels), 7.2), sharex=True, layout="constrained", squeeze=False
    )
    steps = np.arange(result.config.steps + 1)
    for j, (title, runs) in enumerate(panels):
        for r in runs:
            kw = dict(color=_COLORS[r.method], ls=_STYLES.get(r.method, "-"), lw=1.1, label=_label(r))
            axes[0, j].plot(steps, r.norms, **kw)
            axes[1, j].plot(steps[1:], r.effective_step, **kw)
            axes[2, j].plot(steps, np.maximum(r.angles, 1e-6), **kw)
        axes[0, j].set_title(title, fontsize=9)
        for ax in axes[:, j]:
            ax.set_yscale("log")
            ax.tick_params(labelsize=7)
        _norm_ticks(axes[0, j])
        axes[2, j].axhline(1.0, color="0.6", lw=0.7, ls=":")
        axes[2, j].set_xlabel("step", fontsize=8)
        axes[0, j].legend(fontsize=6.5)
    _decade_ticks(axes[1])
    _decade_ticks(axes[2])
    axes[0, 0].set_ylabel(r"$|w_t|$", fontsize=9)
    axes[1, 0].set_ylabel(r"effective step $|\hat w_{t+1} - \hat w_t|$", fontsize=9)
    axes[2, 0].set_ylabel(r"angle to $w^*$ (deg)", fontsize=9)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def _momenta(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise invalid("momenta", text, "comma-separated numbers") from None
    if not values:
        raise invalid("momenta", text, "at least one value")
    return values


def register(subparsers: Any) -> None:
    """Add ``adamp-xp toy`` to an argparse ``subparsers``."""
    p = subparsers.add_parser("toy", help="the paper's 2-D toy: momentum inflates |w|, SGDP/AdamP do not",
                              description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per optimizer (default {DEFAULT_STEPS})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help=f"GD/momentum/SGDP learning rate (default {DEFAULT_LR})")
    p.add_argument("--adam-lr", type=float, default=DEFAULT_ADAM_LR,
                   help=f"Adam/AdamP learning rate (default {DEFAULT_ADAM_LR})")
    p.add_argument("--angle", type=float, default=DEFAULT_ANGLE,
                   help=f"initial angle between w0 and w*, degrees (default {DEFAULT_ANGLE:g})")
    p.add_argument("--momenta", type=_momenta, default=DEFAULT_MOMENTA, help="comma-separated (default 0.9,0.95,0.99)")
    p.add_argument("--backend", default="numpy", help="numpy (default), array_api_strict, torch, torch:cuda, jax, "
                   "jax:gpu or cupy: the same experiment through that library")
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float64", help="default float64")
    p.add_argument("--out", default=None, help=f"folder for the PNG figures (default: ./{DEFAULT_OUT}, which "
                   ".gitignore ignores)")
    p.add_argument("--no-plot", action="store_true", help="print the tables only")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``adamp-xp toy``: exit code 0 when every lemma check holds, 1 otherwise, 2 on a setup error."""
    try:
        cfg = ToyConfig(
            steps=args.steps,
            lr=args.lr,
            adam_lr=args.adam_lr,
            angle=args.angle,
            momenta=tuple(args.momenta),
            backend=args.backend,
            dtype=args.dtype,
        )
        result = run_toy(cfg)
    except (ValueError, RuntimeError) as exc:
        print(f"adamp-xp toy: {exc}")
        return 2
    print(
        f"2-D toy min_w -(w/|w|).(w*/|w*|), |w0| = 1 at {cfg.angle:g} deg from w*, {cfg.steps} steps, "
        f"backend {cfg.backend}, {cfg.dtype}"
    )
    print(format_table(result))
    print("\nChecks (float64 host arithmetic on the recorded trajectories):")
    print(format_checks(result))
    if not args.no_plot:
        try:
            _pyplot()
        except ImportError:
            print("\nno figures: matplotlib is not installed (pip install -e '.[plot]')")
        else:
            out = out_folder(args.out)
            paths = [
                plot_trajectories(result, os.path.join(out, "toy_trajectories.png")),
                plot_curves(result, os.path.join(out, "toy_curves.png")),
            ]
            print("\nfigures: " + ", ".join(paths))
    return 0 if result.passed else 1


if __name__ == "__main__":  # pragma: no cover - `python -m adamp_xp.experiments.toy`
    import sys

    sys.exit(run_subcommand(register, "toy", sys.argv[1:]))
