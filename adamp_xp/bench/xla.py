"""What XLA makes of one jitted optimizer step: ``adamp_optax.adamp``/``sgdp`` beside ``optax.adamw``/``optax.sgd``.

For a workload's parameter shapes (:mod:`adamp_xp.bench.workloads`), each row jits one full user step,
``updates, state = tx.update(grads, state, params); params = optax.apply_updates(params, updates)``, with
the params and the optimizer state donated (the same for every row), and reports

* ``bytes_per_element`` / ``flops_per_element``: XLA's cost analysis of the compiled program
  (``jitted.lower(...).compile().cost_analysis()``), divided by the number of param elements: a count,
  not a time, so it is the same on every run of one JAX version and backend;
* ``fusions``: the number of fusion computations in the optimized HLO (each is at least one pass over its
  operands; on a GPU each is one kernel launch);
* ``lower_s``, ``compile_s``, ``first_s``: tracing and lowering, XLA's compilation, and the first call
  (``compile_plus_first_s`` is their sum: what a user waits for before the first step);
* ``step_ms``: the median of ``repeats`` further calls, each ``block_until_ready``.

The hyperparameters are the bench's (:data:`adamp_xp.bench.runners.HYPERPARAMS`); optax's SGD baseline
gets the same weight decay through ``optax.add_decayed_weights`` (as the bench's ``optax+jit`` row). A last
pair, :data:`SGDP_DEFAULTS`, is SGDP's defaults with momentum 0.9 beside plain ``optax.sgd(momentum=0.9)``.
``python -m adamp_xp.bench.xla [workload] [--repeats N] [--only adamp|sgdp|sgdp-defaults]`` prints the table.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from .runners import HYPERPARAMS
from .workloads import get_workload, host_data

__all__ = ["OPTIMIZERS", "ROWS", "SGDP_DEFAULTS", "XlaRow", "main", "measure", "transformation", "format_table",
           "hlo_text"]

SGDP_DEFAULTS = "sgdp-defaults"
# (label, optimizer, ours) in the order of the table; a reference row follows each of ours.
ROWS: tuple[tuple[str, str, bool], ...] = (
    ("adamp_optax.adamp", "adamp", True),
    ("optax.adamw", "adamp", False),
    ("adamp_optax.sgdp", "sgdp", True),
    ("optax.sgd(momentum)", "sgdp", False),
    # SGDP's defaults but momentum (no weight decay, no Nesterov, the stored buffer projected) beside plain
    # momentum SGD: the reference the table used.
    ("adamp_optax.sgdp()", SGDP_DEFAULTS, True),
    ("optax.sgd(momentum=0.9)", SGDP_DEFAULTS, False),
)
OPTIMIZERS = ("adamp", "sgdp", SGDP_DEFAULTS)


@dataclass
class XlaRow:
    label: str
    optimizer: str
    n_tensors: int
    n_elements: int
    bytes_per_element: float
    flops_per_element: float
    fusions: int
    lower_s: float
    compile_s: float
    first_s: float
    step_ms: float

    @property
    def compile_plus_first_s(self) -> float:
        return self.lower_s + self.compile_s + self.first_s


def transformation(optimizer: str, ours: bool, **overrides: Any) -> Any:
    """The optax transformation of a row: ours (``adamp_optax``) or the optax reference, with the bench's
    hyperparameters (``overrides`` replace some, or add options of ours: ``caution=True``, ``foreach=True``)."""
    import optax

    if optimizer == SGDP_DEFAULTS:
        options = dict(overrides)
        lr = options.pop("lr", HYPERPARAMS["sgdp"]["lr"])
        if ours:
            import adamp_optax

            return adamp_optax.sgdp(learning_rate=lr, **{"momentum": 0.9, **options})
        return optax.sgd(learning_rate=lr, momentum=0.9)
    hp = {**HYPERPARAMS[optimizer], **overrides}
    if ours:
        import adamp_optax

        options = {k: v for k, v in overrides.items() if k not in HYPERPARAMS[optimizer]}  # caution, foreach, ...
        if optimizer == "adamp":
            return adamp_optax.adamp(learning_rate=hp["lr"], b1=hp["betas"][0], b2=hp["betas"][1], eps=hp["eps"],
                                     weight_decay=hp["weight_decay"], delta=hp["delta"], wd_ratio=hp["wd_ratio"],
                                     nesterov=hp["nesterov"], **options)
        return adamp_optax.sgdp(learning_rate=hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
                                weight_decay=hp["weight_decay"], nesterov=hp["nesterov"], eps=hp["eps"],
                                delta=hp["delta"], wd_ratio=hp["wd_ratio"], **options)
    if optimizer == "adamp":
        return optax.adamw(learning_rate=hp["lr"], b1=hp["betas"][0], b2=hp["betas"][1], eps=hp["eps"],
                           weight_decay=hp["weight_decay"])
    return optax.chain(optax.add_decayed_weights(hp["weight_decay"]),
                       optax.sgd(learning_rate=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"]))


def _step_fn(tx: Any) -> Any:
    import optax

    def step(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    return dict(cost or {})


def count_fusions(hlo: str) -> int:
    """Fusion computations called from the entry computation of an optimized HLO module's text."""
    return len(re.findall(r"\bfusion\(", hlo)) or len(re.findall(r"= [^=]*\bfusion\b", hlo))


def hlo_text(optimizer: str, ours: bool, shapes: list[tuple[int, ...]], **overrides: Any) -> str:
    """The optimized HLO of one row's step on params of ``shapes`` (float32), to see where the traffic goes."""
    import jax
    import jax.numpy as jnp

    tx = transformation(optimizer, ours, **overrides)
    params = [jnp.ones(s, jnp.float32) for s in shapes]
    state = tx.init(params)
    return jax.jit(_step_fn(tx)).lower(params, state, params).compile().as_text()


def _one(label: str, optimizer: str, ours: bool, params_h: list[Any], grads_h: list[Any], repeats: int,
         overrides: dict[str, Any]) -> XlaRow:
    import jax

    dev = jax.devices()[0]
    tx = transformation(optimizer, ours, **overrides)
    params = jax.device_put(list(params_h), dev)
    grads = jax.device_put(list(grads_h), dev)
    state = jax.device_put(tx.init(params), dev)  # committed like the step's outputs: one compilation
    jax.block_until_ready((params, state, grads))
    fn = jax.jit(_step_fn(tx), donate_argnums=(0, 1))  # a fresh function: nothing cached from another row

    t0 = time.perf_counter()
    lowered = fn.lower(params, state, grads)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    params, state = jax.block_until_ready(compiled(params, state, grads))
    t3 = time.perf_counter()
    times = []
    for _ in range(repeats):
        s = time.perf_counter()
        params, state = jax.block_until_ready(compiled(params, state, grads))
        times.append(time.perf_counter() - s)
    cost = _cost(compiled)
    n = sum(int(p.size) for p in params_h)
    return XlaRow(label, optimizer, len(params_h), n, cost.get("bytes accessed", float("nan")) / n,
                  cost.get("flops", float("nan")) / n, count_fusions(compiled.as_text()), t1 - t0, t2 - t1,
                  t3 - t2, 1e3 * statistics.median(times))


def measure(workload: str = "resnet50", *, optimizers: tuple[str, ...] = OPTIMIZERS, repeats: int = 5,
            scale: float | None = None, seed: int = 0, **overrides: Any) -> list[XlaRow]:
    """One :class:`XlaRow` per row of :data:`ROWS` whose optimizer is in ``optimizers``, on ``workload``'s
    shapes (float32; ``scale``: see :func:`adamp_xp.bench.workloads.bench_scale`). ``overrides`` go to
    our rows only (``caution=True``, say)."""
    wl = get_workload(workload, scale)
    params_h, grads_h = host_data(wl, seed)
    return [_one(label, opt, ours, params_h, grads_h, repeats, overrides if ours else {})
            for label, opt, ours in ROWS if opt in optimizers]


def format_table(rows: list[XlaRow]) -> str:
    """A plain-text table: each of our rows followed by its optax reference, with ratios to it."""
    head = (f"{'row':<24}{'B/elem':>9}{'x':>6}{'flop/elem':>11}{'fusions':>9}{'step ms':>10}{'x':>6}"
            f"{'lower s':>9}{'compile s':>11}{'+1st s':>8}{'x':>6}")
    lines = [head, "-" * len(head)]
    ref = {r.optimizer: r for r in rows if not r.label.startswith("adamp_optax")}
    for r in rows:
        b = ref.get(r.optimizer)

        def ratio(a: float, c: float | None) -> str:
            return f"{a / c:6.2f}" if c else f"{'':6}"

        lines.append(f"{r.label:<24}{r.bytes_per_element:9.1f}{ratio(r.bytes_per_element, b and b.bytes_per_element)}"
                     f"{r.flops_per_element:11.1f}{r.fusions:9d}{r.step_ms:10.2f}{ratio(r.step_ms, b and b.step_ms)}"
                     f"{r.lower_s:9.2f}{r.compile_s:11.2f}{r.compile_plus_first_s:8.2f}"
                     f"{ratio(r.compile_plus_first_s, b and b.compile_plus_first_s)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adamp_xp.bench.xla", description=__doc__.split("\n\n")[0])
    p.add_argument("workload", nargs="?", default="resnet50")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", choices=OPTIMIZERS, default=None)
    p.add_argument("--caution", action="store_true", help="our rows with caution=True")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    a = p.parse_args(argv)
    opts = (a.only,) if a.only else OPTIMIZERS
    rows = measure(a.workload, optimizers=opts, repeats=a.repeats, **({"caution": True} if a.caution else {}))
    if a.json:
        import json

        print(json.dumps([{**asdict(r), "compile_plus_first_s": r.compile_plus_first_s} for r in rows], indent=1))
    else:
        wl = get_workload(a.workload)
        print(wl.summary())
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
