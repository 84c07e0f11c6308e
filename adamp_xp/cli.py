"""The ``adamp-xp`` command.

``adamp-xp conformance``: run the core (and the adapters, when installed) on every installed
backend and dtype against the official ``adamp==0.3.0`` and print one table. Optional
dependencies (torch, jax, the official package) are imported lazily.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from typing import Any

from . import __version__
from .testing.backends import BACKENDS

__all__ = ["main"]

# Modules that define `register(subparsers)` for further subcommands (toy, digits, bench).
_SUBCOMMANDS: list[str] = ["adamp_xp.experiments.toy", "adamp_xp.experiments.digits", "adamp_xp.bench"]


# Column headings, and the narrowest each column may be (its values' usual width; _Table widens a column to its
# longest value, known before any row runs).
_COLUMNS = (("target", 0), ("backend", 0), ("dtype", 0), ("options", 0), ("path (observed)", 0),
            ("max rel err", 7), ("tol", 5), ("views ch/ly/none", 11), ("s", 5), ("result", 0))
_GAP = 2  # spaces between columns


def _cells(r: dict[str, Any]) -> list[str]:
    v = r.get("views")
    return [
        r["target"], r["backend"], r["dtype"], r.get("options", "-"), r.get("path", "-"),
        f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else "-",
        f"{r['tolerance']:.2g}" if "tolerance" in r else "-",
        f"{v['channel']}/{v['layer']}/{v['none']}" if v else "-",
        f"{r['seconds']:.1f}" if "seconds" in r else "-",
        r["status"] + (f" ({r['note']})" if r.get("note") else ""),
    ]


def _path_width(expected: str) -> int:
    """Room for the path a row of ``expected`` path may report: the expected label with a share ("fused kernels
    + multi-tensor 12%"), or with one more path and its share ("fused kernels + per-tensor 3%"). A longer one
    still lines up again at the next column with room (:meth:`_Table.line`)."""
    return len(expected) + (len(" 99%") if " + " in expected else len(" + per-tensor 99%"))


class _Table:
    """The conformance table: every column as wide as its heading and its longest value among the planned rows
    (``planned``: their :meth:`Row.describe` dicts), so rows stay aligned as they stream in, whatever the
    options. A cell longer than planned (an unexpected path) takes the spaces of the next columns, which then
    start where they should again as soon as there is room."""

    def __init__(self, planned: list[dict[str, Any]]) -> None:
        widths = [max(len(name), least) for name, least in _COLUMNS]
        for r in planned:
            known = [r["target"], r["backend"], r["dtype"], r["options"]]
            for i, cell in enumerate(known):
                widths[i] = max(widths[i], len(cell))
            widths[4] = max(widths[4], _path_width(r.get("expected_path", "")))
        widths[-1] = 0  # the last column is not padded
        self.widths = widths

    def line(self, cells: list[str]) -> str:
        out, start = "", 0
        for cell, width in zip(cells, self.widths, strict=True):
            out = out.ljust(start) if not out or len(out) + _GAP <= start else out + " " * _GAP
            out += str(cell)
            start += width + _GAP
        return out.rstrip()

    def row(self, r: dict[str, Any]) -> str:
        return self.line(_cells(r))

    def header(self) -> str:
        return self.line([name for name, _ in _COLUMNS]) + "\n" + self.line(
            ["-" * (w or len(name)) for (name, _), w in zip(_COLUMNS, self.widths, strict=True)])


def _skipped(rows: list[dict[str, Any]], table: _Table) -> list[str]:
    """Skipped rows, one line per backend and reason (no GPU, library missing) when there are several."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["backend"], r.get("note", "")), []).append(r)
    lines = []
    for (backend, reason), rs in by.items():
        if len(rs) == 1:
            lines.append(table.row(rs[0]))
        else:
            targets = ", ".join(dict.fromkeys(r["target"] for r in rs))
            lines.append(f"{backend}: {len(rs)} rows SKIP ({reason}): {targets}")
    return lines


class _NoBar:
    """What the table needs of a tqdm bar, when tqdm (the ``plot`` extra) is not installed."""

    def update(self, n: int) -> None:
        pass

    def write(self, line: str, file: Any = None) -> None:
        print(line, file=file)

    def close(self) -> None:
        pass


def _progress(total: int, off: bool) -> Any:
    """A tqdm bar on stderr (rows done / rows), while rows print on stdout; none when stderr is not a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="row", leave=False, disable=True if off else None)


def _references(rows: list[Any]) -> str:
    """What the rows are checked against, as the header says it: adamp 0.3.0, and for the cautious rows timm
    (or why they will be SKIP here: timm not installed, with the install hint)."""
    from .testing import conformance as conf
    from .testing.timm_reference import TIMM_VERSION

    cautious = [r for r in rows if r.cautious]
    if not cautious:
        return "against adamp==0.3.0"
    reason = conf.reference_missing(cautious[0])
    if reason:
        return f"against adamp==0.3.0 (its {len(cautious)} rows 'caution (vs timm)' SKIP here, {reason})"
    return f"against adamp==0.3.0 and timm {TIMM_VERSION} (its {len(cautious)} rows 'caution (vs timm)')"


def conformance(args: argparse.Namespace) -> int:
    missing = [m for m in ("adamp", "torch") if importlib.util.find_spec(m) is None]  # imported by the workers
    if missing:
        print(f"adamp-xp conformance needs the official package and torch: pip install -e '.[test,torch]' in a "
              f"clone of adamp-xp (missing: {', '.join(missing)})")
        return 2
    from .testing import conformance as conf

    steps = args.steps or (conf.FULL_STEPS if args.full else conf.DEFAULT_STEPS)
    rows = conf.plan(args.target, args.backend, args.device, args.dtype, full=args.full)
    if not rows:
        print("no rows: nothing matches --target/--backend/--device/--dtype")
        return 2
    workers = args.workers if args.workers is not None else max(1, min(4, os.cpu_count() or 1))
    jax_cache = conf.jax_cache_dir(args.jax_cache)
    table = _Table([r.describe() for r in rows])
    print(f"adamp-xp {__version__} {_references(rows)}: {len(rows)} rows, "
          f"{steps} steps per trajectory, "
          f"{'every case and shape in every row' if args.full else 'each row on its cases and shapes (--full: all)'}, "
          f"{workers} worker(s), JAX cache: {jax_cache or 'off'}.\n"
          f"error: max over steps, param and state of max|ours - ref| / max|ref|; path: what "
          f"adamp_core.dispatch.step ran (observed); views: steps on the channel/layer/no view (core rows).",
          flush=True)
    print(table.header(), flush=True)
    t0 = time.perf_counter()
    bar = _progress(len(rows), args.no_progress)
    skipped: list[dict[str, Any]] = []

    def show(r: dict[str, Any]) -> None:
        bar.update(1)
        if r["status"] == "SKIP" and not args.verbose_skips:
            skipped.append(r)  # listed together at the end, one line per backend
            return
        bar.write(table.row(r), file=sys.stdout)
        sys.stdout.flush()

    results = conf.run_rows(rows, steps=steps, workers=workers, jax_cache=jax_cache,
                            perturb=args.perturb, on_result=show)
    bar.close()
    seconds = time.perf_counter() - t0
    for line in _skipped(skipped, table):
        print(line)
    failed = [r for r in results if r["status"] == "FAIL"]
    ran = [r for r in results if r["status"] == "PASS"]
    print(f"\n{len(ran)} passed, {len(failed)} failed, {len(results) - len(ran) - len(failed)} skipped in "
          f"{seconds:.1f} s ({workers} worker(s), {os.cpu_count()} CPUs)")
    if args.json:
        doc = {"command": "adamp-xp conformance", "argv": args.argv, "steps": steps, "full": args.full,
               "seconds": round(seconds, 2), "workers": workers, "versions": conf.versions(),
               "machine": conf.machine(), "passed": len(ran), "failed": len(failed),
               "skipped": len(results) - len(ran) - len(failed), "rows": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    if not ran and not failed:
        print("nothing ran here: every row was skipped")
    return 1 if failed else 0


_CONFORMANCE_HELP = (
    "Check every entry point of adamp-xp (adamp_core per backend and dtype, eager and under jax.jit; "
    "adamp_core.tree; adamp_torch on its default fused kernels, multi-tensor and per-tensor paths, 16-bit "
    "params and channels_last; adamp_array on each backend and path; adamp_optax under jax.jit) against the "
    "official adamp==0.3.0, step by step, and print one row per check with the execution path that ran. Exit "
    "status 1 if any row fails."
)


def _described(parser: argparse.ArgumentParser, help_text: str | None) -> None:
    """Every subcommand's ``--help`` opens with a description that ends like a sentence (a module's
    docstring cut at its first paragraph may end with a comma)."""
    text = (parser.description or help_text or "").strip()
    if text and text[-1] in ",;:":
        text = text[:-1].rstrip() + "."
    elif text and text[-1] not in ".!?)":
        text += "."
    parser.description = text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adamp-xp",
        description="AdamP/SGDP (Heo et al., ICLR 2021) on the Python array API: conformance against adamp==0.3.0, "
        "benchmarks and the paper's experiments.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("conformance", help="check every entry point and path against adamp==0.3.0 (one table)",
                       description=_CONFORMANCE_HELP)
    p.add_argument("--target", action="append", choices=["core", "tree", "adamp_torch", "adamp_array", "adamp_optax"],
                   help="repeatable; default: all")
    p.add_argument("--backend", action="append", choices=[b.id for b in BACKENDS], metavar="BACKEND",
                   help=f"one of {', '.join(b.id for b in BACKENDS)}; repeatable; default: all of --device")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="cpu: the host backends; cuda: torch:cuda, cupy and jax:gpu (SKIP without a GPU); default: all")
    p.add_argument("--dtype", action="append", choices=["float64", "float32", "bfloat16", "float16"],
                   help="repeatable; default: all (bfloat16/float16: adamp_torch with state_dtype=float32)")
    p.add_argument("--steps", type=int, default=None, help="steps per trajectory (default 12; --full: 30)")
    p.add_argument("--full", action="store_true", help="every case and every shape in every row, 30 steps")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: 2, or 1 on one CPU; 0: run in this process)")
    p.add_argument("--jax-cache", metavar="DIR", default=None,
                   help="JAX persistent compilation cache (default: $ADAMP_XP_JAX_CACHE, else ~/.cache/adamp-xp/jax; "
                   "'none': off)")
    p.add_argument("--json", metavar="PATH", help="also write every row, the versions and the machine as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--verbose-skips", action="store_true", help="one line per skipped row")
    p.add_argument("--perturb", default=None, help=argparse.SUPPRESS)  # tests: a wrong step in these rows
    p.set_defaults(func=conformance)
    for module in _SUBCOMMANDS:  # each module adds its own subcommand; heavy imports stay lazy inside them
        importlib.import_module(module).register(sub)
    helps = {a.dest: a.help for a in getattr(sub, "_choices_actions", [])}
    for name, subparser in sub.choices.items():
        _described(subparser, helps.get(name))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
