r"""``adamp-xp digits``: SGD vs SGDP and AdamW vs AdamP on real data, in minutes on a laptop.

scikit-learn's ``load_digits`` (1,797 8x8 images, shipped with scikit-learn: no download), a fixed
stratified split (1,347 train / 450 test), and a small CNN whose three conv layers are each followed
by BatchNorm, which makes their weights scale-invariant (Heo et al., ICLR 2021, Sec. 2.1):

    conv(1->16) BN ReLU, conv(16->32) BN ReLU, maxpool, conv(32->32) BN ReLU, global avg pool, linear(32->10)

Every optimizer gets the same budget, batch order, initial weights (per seed) and cosine learning-rate
schedule; the pairs differ only in the projection. Hyperparameters are the official package's README
examples: ``SGD/SGDP(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-5)`` and
``AdamW/AdamP(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)``. SGDP and AdamP are
:mod:`adamp_torch` (whose maths is :mod:`adamp_core`); SGD and AdamW are ``torch.optim``.

For the scale-invariant conv weights the run records, every step, the weight norm and the effective
step size :math:`\lVert\hat w_{t+1} - \hat w_t\rVert` (:mod:`adamp_core.diagnostics`, measured outside
the optimizer, so the torch.optim baselines are measured the same way), and for every weight matrix
which view the scale-invariance test picks: the paper's ResNet-18 panels (norm, effective step size,
accuracy), in miniature.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import DEFAULT_OUT, invalid, out_folder, run_subcommand

__all__ = ["DigitsConfig", "DigitsResult", "OPTIMIZERS", "format_table", "main", "plot", "register", "run_digits"]

OPTIMIZERS = ("SGD", "SGDP", "AdamW", "AdamP")
SGD_HP = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-5)
ADAM_HP = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)
_COLORS = {"SGD": "tab:orange", "SGDP": "tab:green", "AdamW": "tab:purple", "AdamP": "tab:blue"}
_STYLES = {"SGD": "-", "SGDP": "-", "AdamW": "--", "AdamP": "--"}


@dataclass(frozen=True)
class DigitsConfig:
    epochs: int = 20
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    batch_size: int = 64
    optimizers: tuple[str, ...] = OPTIMIZERS
    device: str = "cpu"
    progress: bool = True
    threads: int | None = 1  # torch CPU threads during the run (tiny convs: 1 is fastest); None: leave as is

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"Invalid threads: {self.threads!r} (expected an int >= 1 or None)")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 1)")
        if not self.seeds:
            raise ValueError(f"Invalid seeds: {self.seeds!r} (expected at least one seed)")
        bad = [o for o in self.optimizers if o not in OPTIMIZERS]
        if bad or not self.optimizers:
            raise ValueError(f"Invalid optimizers: {self.optimizers!r} (choose from {', '.join(OPTIMIZERS)})")


QUICK = dict(epochs=5, seeds=(0, 1, 2))


@dataclass
class RunRecord:
    """One (optimizer, seed) run."""

    optimizer: str
    seed: int
    test_acc: list[float] = field(default_factory=list)  # per epoch, in [0, 1]
    train_loss: list[float] = field(default_factory=list)  # per epoch (mean over its steps)
    norm0: np.ndarray | None = None  # (layers,): |w| of each scale-invariant weight at initialisation
    norm: np.ndarray | None = None  # (steps, layers): |w| of each scale-invariant weight after each step
    eff_step: np.ndarray | None = None  # (steps, layers): effective step size of each step
    views: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> (steps,) view the test picks


@dataclass
class DigitsResult:
    config: DigitsConfig
    steps_per_epoch: int
    scale_invariant: list[str]  # names of the conv weights followed by BN
    runs: list[RunRecord]
    seconds: float = 0.0

    def by_optimizer(self, name: str) -> list[RunRecord]:
        return [r for r in self.runs if r.optimizer == name]

    def final_acc(self, name: str) -> np.ndarray:
        return np.array([r.test_acc[-1] for r in self.by_optimizer(name)])


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("adamp-xp digits needs torch: pip install -e '.[torch,plot]'") from exc
    return torch


def load_data(device: Any) -> tuple[Any, Any, Any, Any]:
    """``(x_train, y_train, x_test, y_test)`` as tensors on ``device``; pixels standardized with the
    training set's mean and std. The split is fixed (``random_state=0``), whatever the seed."""
    torch = _torch()
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise RuntimeError("adamp-xp digits needs scikit-learn: pip install -e '.[plot]'") from exc
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()
    as_x = lambda a: torch.tensor(((a - mean) / std).reshape(-1, 1, 8, 8), dtype=torch.float32, device=device)
    as_y = lambda a: torch.tensor(a, dtype=torch.int64, device=device)
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def make_model() -> Any:
    """The small BN-CNN; the three conv weights (bias-free, each followed by BatchNorm) are scale-invariant."""
    nn = _torch().nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def scale_invariant_names(model: Any) -> list[str]:
    """Names of conv weights directly followed by a BatchNorm layer in a ``Sequential``."""
    nn = _torch().nn
    mods = list(model.named_children())
    return [
        f"{name}.weight"
        for (name, m), (_, nxt) in zip(mods, mods[1:], strict=False)
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d)
    ]


def make_optimizer(name: str, params: Any) -> Any:
    """``torch.optim.SGD``/``AdamW`` or ``adamp_torch.SGDP``/``AdamP`` with the shared hyperparameters."""
    torch = _torch()
    if name == "SGD":
        return torch.optim.SGD(params, **SGD_HP)
    if name == "AdamW":
        return torch.optim.AdamW(params, **ADAM_HP)
    try:
        import adamp_torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(f"{name} needs adamp_torch (pip install -e '.[torch]'): {exc}") from exc
    return adamp_torch.SGDP(params, **SGD_HP) if name == "SGDP" else adamp_torch.AdamP(params, **ADAM_HP)


def _train_one(cfg: DigitsConfig, name: str, seed: int, data: tuple[Any, ...], bar: Any) -> RunRecord:
    torch = _torch()
    from adamp_core import diagnostics

    x_tr, y_tr, x_te, y_te = data
    dev = x_tr.device
    torch.manual_seed(seed)  # same initial weights for every optimizer at this seed
    model = make_model().to(dev)
    named = dict(model.named_parameters())
    si_names = scale_invariant_names(model)
    si = [named[n] for n in si_names]
    # Params the projection may touch (ndim > 1); only recorded for the optimizers that project.
    tested = {n: p for n, p in named.items() if p.ndim > 1} if name in ("SGDP", "AdamP") else {}
    opt = make_optimizer(name, model.parameters())
    steps_per_epoch = x_tr.shape[0] // cfg.batch_size  # drop the last partial batch (BatchNorm)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(10_000 + seed)  # same batch order for every optimizer at this seed
    loss_fn = torch.nn.CrossEntropyLoss()
    hp_delta, hp_eps = 0.1, 1e-8  # the test's defaults, as both adamp_torch optimizers use here
    rec = RunRecord(name, seed)
    rec.norm0 = np.array([float(diagnostics.weight_norm(p.detach())) for p in si])
    norms, steps, views = [], [], {n: [] for n in tested}
    for _epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(x_tr.shape[0], generator=gen).to(dev)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            with torch.no_grad():
                for n, p in tested.items():  # what the optimizer's scale-invariance test decides for this grad
                    views[n].append(diagnostics.scale_invariance(p, p.grad, hp_delta, hp_eps).view)
                before = [p.detach().clone() for p in si]
            opt.step()
            sched.step()
            with torch.no_grad():  # sync-free: 0-d tensors, copied to the host once per run
                norms.append(torch.stack([diagnostics.weight_norm(p) for p in si]))
                steps.append(
                    torch.stack([diagnostics.effective_step_size(w0, p) for w0, p in zip(before, si, strict=True)])
                )
            losses.append(loss.detach())
            bar.update(1)
        rec.train_loss.append(float(torch.stack(losses).mean()))
        model.eval()
        with torch.no_grad():
            rec.test_acc.append(float((model(x_te).argmax(1) == y_te).float().mean()))
        bar.set_postfix_str(f"{name} seed {seed} test acc {rec.test_acc[-1]:.3f}", refresh=False)
    rec.norm = torch.stack(norms).double().cpu().numpy()
    rec.eff_step = torch.stack(steps).double().cpu().numpy()
    rec.views = {n: torch.stack(v).cpu().numpy() for n, v in views.items()}
    return rec


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def run_digits(cfg: DigitsConfig | None = None, **overrides: Any) -> DigitsResult:
    """Train every optimizer on every seed; return the records (no printing, no figures)."""
    cfg = cfg if cfg is not None else DigitsConfig(**overrides)
    torch = _torch()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"Invalid device: {cfg.device!r} (torch.cuda.is_available() is False)")
    dev = torch.device(cfg.device)
    data = load_data(dev)
    steps_per_epoch = data[0].shape[0] // cfg.batch_size
    total = len(cfg.optimizers) * len(cfg.seeds) * cfg.epochs * steps_per_epoch
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="digits", unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    else:
        bar = _NoBar()
    t0 = time.perf_counter()
    runs = []
    threads = torch.get_num_threads()
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        for seed in cfg.seeds:
            for name in cfg.optimizers:
                runs.append(_train_one(cfg, name, seed, data, bar))
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return DigitsResult(cfg, steps_per_epoch, scale_invariant_names(make_model()), runs, time.perf_counter() - t0)


def _mean_std(a: np.ndarray) -> str:
    std = float(np.std(a, ddof=1)) if a.size > 1 else float("nan")
    return f"{100 * a.mean():.2f} ± {100 * std:.2f}"


def format_table(result: DigitsResult) -> str:
    """Accuracy mean ± sample std over seeds, paired differences, and what the test projected."""
    head = [
        "optimizer",
        "test acc % (mean ± std)",
        "seeds",
        "final train loss",
        "|w| end (scale-inv.)",
        "eff. step, 1st / last epoch",
        "steps projected: conv / linear",
    ]
    spe = result.steps_per_epoch
    body = []
    for name in result.config.optimizers:
        runs = result.by_optimizer(name)
        acc = result.final_acc(name)
        norm = np.mean([r.norm[-1].mean() for r in runs])
        first = np.mean([r.eff_step[:spe].mean() for r in runs])
        last = np.mean([r.eff_step[-spe:].mean() for r in runs])
        conv = [v for r in runs for n, v in r.views.items() if n in result.scale_invariant]
        lin = [v for r in runs for n, v in r.views.items() if n not in result.scale_invariant]
        frac = lambda vs: f"{100 * np.mean([np.mean(v > 0) for v in vs]):.0f}%" if vs else "-"
        projected = f"{frac(conv)} / {frac(lin)}" if name in ("SGDP", "AdamP") else "(not projected)"
        body.append(
            [
                name,
                _mean_std(acc),
                str(acc.size),
                f"{np.mean([r.train_loss[-1] for r in runs]):.4f}",
                f"{norm:.2f}",
                f"{first:.2e} / {last:.2e}",
                projected,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    lines = [line(head), line(["-" * w for w in widths]), *map(line, body)]
    for ours, base in (("SGDP", "SGD"), ("AdamP", "AdamW")):
        if ours in result.config.optimizers and base in result.config.optimizers:
            d = result.final_acc(ours) - result.final_acc(base)
            std = float(np.std(d, ddof=1)) if d.size > 1 else float("nan")
            wins = int(np.sum(d > 0)), int(np.sum(d == 0)), int(np.sum(d < 0))
            lines.append(
                f"paired {ours} - {base}: {100 * d.mean():+.2f} ± {100 * std:.2f} points "
                f"(better / tied / worse on {wins[0]} / {wins[1]} / {wins[2]} seeds)"
            )
    return "\n".join(lines)


def plot(result: DigitsResult, path: str) -> str:
    """Mean weight norm and mean effective step size of the scale-invariant weights, and test accuracy,
    per epoch (mean over seeds, band = min..max over seeds)."""
    import matplotlib

    if "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spe, epochs = result.steps_per_epoch, result.config.epochs
    x = np.arange(1, epochs + 1)
    x0 = np.arange(0, epochs + 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), layout="constrained")
    for name in result.config.optimizers:
        runs = result.by_optimizer(name)
        # per run: mean over the scale-invariant layers; norm at the end of each epoch, step averaged per epoch
        norm = np.array([np.r_[r.norm0.mean(), r.norm.mean(axis=1)[spe - 1 :: spe]] for r in runs])
        step = np.array([r.eff_step.mean(axis=1).reshape(epochs, spe).mean(axis=1) for r in runs])
        acc = 100 * np.array([r.test_acc for r in runs])
        for ax, xs, series in zip(axes, (x0, x, x), (norm, step, acc), strict=True):
            ax.plot(xs, series.mean(axis=0), color=_COLORS[name], ls=_STYLES[name], lw=1.4, label=name)
            ax.fill_between(xs, series.min(axis=0), series.max(axis=0), color=_COLORS[name], alpha=0.15, lw=0)
    axes[0].set_title("mean weight norm |w| (BN-followed conv weights)", fontsize=9)
    axes[1].set_title(r"mean effective step size $|\hat w_{t+1} - \hat w_t|$", fontsize=9)
    axes[1].set_yscale("log")
    axes[2].set_title("test accuracy (%)", fontsize=9)
    lo = 100 * min(float(np.min(r.test_acc)) for r in result.runs)  # every epoch of every run on the axes
    axes[2].set_ylim(max(lo - 2, 0), 100.5)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("epoch", fontsize=8)
        # whole epochs at round steps (--quick: 1, 2, ..., 5, not 1.0, 1.5, ...; 20 epochs: 0, 5, ..., 20)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    cfg = result.config
    fig.suptitle(
        f"sklearn digits, BN-CNN, {len(cfg.seeds)} seeds x {epochs} epochs, cosine LR "
        "(SGD/SGDP lr 0.1 nesterov, AdamW/AdamP lr 1e-3 wd 1e-2)",
        fontsize=9,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def _seeds(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise invalid("seeds", text, "an int >= 1")
    return n


def register(subparsers: Any) -> None:
    """Add ``adamp-xp digits`` to an argparse ``subparsers``."""
    p = subparsers.add_parser("digits", help="SGD vs SGDP and AdamW vs AdamP on sklearn digits (small BN-CNN)",
                              description="Train a small BN-CNN on scikit-learn's digits with SGD, SGDP, AdamW and "
                              "AdamP; print test accuracy over seeds and plot weight norms and effective step sizes.")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['epochs']} epochs x {len(QUICK['seeds'])} seeds (under a minute on 2 CPU cores)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20; --quick: 5)")
    p.add_argument("--seeds", type=_seeds, default=None, help="number of seeds 0..n-1 (default 5; --quick: 3)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this tiny CNN)")
    p.add_argument("--out", default=None, help=f"folder for digits.png (default: ./{DEFAULT_OUT}, which .gitignore "
                   "ignores)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``adamp-xp digits``; exit code 0, or 2 when a dependency or the device is missing."""
    base = DigitsConfig(**QUICK) if args.quick else DigitsConfig()
    try:
        cfg = DigitsConfig(
            epochs=args.epochs or base.epochs,
            seeds=tuple(range(args.seeds)) if args.seeds else base.seeds,
            device=args.device,
            progress=not args.no_progress,
            threads=args.threads,
        )
        if not args.no_plot:
            import matplotlib  # noqa: F401  (fail before training, not after)
        result = run_digits(cfg)
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"adamp-xp digits: {exc}")
        return 2
    spe = result.steps_per_epoch
    print(
        f"sklearn digits (1347 train / 450 test), BN-CNN, {cfg.epochs} epochs x {spe} steps of batch "
        f"{cfg.batch_size}, cosine LR, seeds {list(cfg.seeds)}, device {cfg.device}, {result.seconds:.0f} s"
    )
    print(f"SGD/SGDP: {SGD_HP}; AdamW/AdamP: {ADAM_HP}")
    print(format_table(result))
    print(f"scale-invariant weights (conv followed by BN): {', '.join(result.scale_invariant)}")
    if not args.no_plot:
        print(f"figure: {plot(result, os.path.join(out_folder(args.out), 'digits.png'))}")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m adamp_xp.experiments.digits`
    sys.exit(run_subcommand(register, "digits", sys.argv[1:]))
