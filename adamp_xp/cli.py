"""The ``adamp-xp`` command.

``adamp-xp conformance``: run the core (and the adapters, when installed) on every installed
backend and dtype against the official ``adamp==0.3.0`` and print one table. Optional
dependencies (torch, jax, the official package) are imported lazily.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from collections import Counter
from typing import Any

__all__ = ["main"]

# Modules that define `register(subparsers)` for further subcommands (toy, digits, bench).
_SUBCOMMANDS: list[str] = ["adamp_xp.experiments.toy", "adamp_xp.experiments.digits", "adamp_xp.bench"]


def _enable_jax_x64() -> None:
    try:
        import jax
    except ImportError:
        return
    jax.config.update("jax_enable_x64", True)


def _core_rows(backends: list[Any], dtypes: list[str], steps: int, jit: bool, emit: Any) -> list[dict[str, Any]]:
    from .testing import oracle

    rows = []
    for b in backends:
        for dtype in dtypes:
            variants = [("adamp_core", None)]
            if jit and b.library == "jax":
                variants.append(("adamp_core+jax.jit", "jit"))
            for target, how in variants:
                row: dict[str, Any] = dict(target=target, backend=b.library, device=b.device, dtype=dtype)
                reason = b.skip_reason() or (None if b.supports(dtype) else f"no {dtype}")
                if reason:
                    rows.append({**row, "status": "SKIP", "note": reason})
                    emit(rows[-1])
                    continue
                err, views, ok_views, runs, t0 = 0.0, Counter(), True, 0, time.perf_counter()
                for opt, cases in (("adamp", oracle.ADAMP_CASES), ("sgdp", oracle.SGDP_CASES)):
                    for case, hp in cases.items():
                        step_fn = None
                        if how == "jit":
                            import jax

                            import adamp_core as ac

                            core = ac.adamp_step if opt == "adamp" else ac.sgdp_step
                            step_fn = jax.jit(functools.partial(core, **hp))
                        for shape in oracle.SHAPES:
                            r = oracle.run_core(b, opt, case, shape, dtype, steps, step_fn=step_fn)
                            err = max(err, r.max_rel_error)
                            views.update(r.views)
                            ok_views &= r.views_agree
                            runs += 1
                tol = oracle.tolerance(dtype)
                passed = ok_views and err <= tol
                rows.append({**row, "runs": runs, "steps": steps, "max_rel_error": err, "tolerance": tol,
                             "views": {"channel": views[1], "layer": views[2], "none": views[0]},
                             "views_agree": ok_views, "status": "PASS" if passed else "FAIL",
                             "seconds": round(time.perf_counter() - t0, 1)})
                emit(rows[-1])
    return rows


# The adapters hold no maths; two cases per optimizer (nesterov + weight decay, and non-default
# betas/dampening with wd_ratio) check their wiring without compiling every case under jax.jit.
_ADAPTER_CASES = {"adamp": ["nesterov_wd", "betas_eps_ratio"], "sgdp": ["nesterov_wd", "dampening_ratio"]}


def _adapter_rows(backends: list[Any], dtypes: list[str], steps: int) -> list[dict[str, Any]]:
    try:
        from .testing import adapters_conformance
    except ImportError:
        return []
    usable = [b for b in backends if b.skip_reason() is None]
    rows = adapters_conformance.adapter_rows(dtypes=tuple(dtypes), steps=steps, backends=usable, cases=_ADAPTER_CASES)
    for r in rows:  # rows carry `passed` (and `note` when skipped); the table wants a status
        r.setdefault("status", "SKIP" if r.get("passed") is None else ("PASS" if r["passed"] else "FAIL"))
        r.setdefault("tolerance", 1e-10 if r["dtype"] == "float64" else 1e-5)
    return rows


_COLUMNS = (("target", 20), ("backend", 17), ("device", 6), ("dtype", 7), ("max rel err", 11), ("tol", 5),
            ("views ch/ly/none", 16), ("result", 0))


def _format_row(r: dict[str, Any]) -> str:
    v = r.get("views")
    cells = [
        r["target"], r["backend"], r["device"], r["dtype"],
        f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else "-",
        f"{r['tolerance']:.0e}" if "tolerance" in r else "-",
        f"{v['channel']}/{v['layer']}/{v['none']}" if v else "-",
        r["status"] + (f" ({r['note']})" if r.get("note") else ""),
    ]
    return "  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True)).rstrip()


def _header() -> str:
    names = "  ".join(name.ljust(w) for name, w in _COLUMNS).rstrip()
    rule = "  ".join("-" * (w or len(name)) for name, w in _COLUMNS)
    return f"{names}\n{rule}"


def conformance(args: argparse.Namespace) -> int:
    _enable_jax_x64()
    try:
        import adamp  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"adamp-xp conformance needs the official package and torch: pip install 'adamp-xp[test,torch]' ({exc})")
        return 2
    from .testing.backends import BACKENDS, get_backend

    backends = [get_backend(b) for b in args.backend] if args.backend else list(BACKENDS)
    dtypes = args.dtype or ["float64", "float32"]
    from .testing import oracle

    print(f"adamp_core vs adamp==0.3.0: {len(oracle.SHAPES)} shapes x {len(oracle.ADAMP_CASES)} AdamP + "
          f"{len(oracle.SGDP_CASES)} SGDP cases x {args.steps} steps per backend and dtype; error = max over steps "
          f"and arrays of max|ours - ref| / max|ref|; views = steps projected on the channel view / layer view / none.",
          flush=True)
    emit = lambda row: print(_format_row(row), flush=True)
    print(_header(), flush=True)
    rows = _core_rows(backends, dtypes, args.steps, jit=not args.no_jit, emit=emit)
    if not args.core_only:
        for row in _adapter_rows(backends, dtypes, args.steps):
            rows.append(row)
            emit(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    failed = [r for r in rows if r["status"] == "FAIL"]
    ran = [r for r in rows if r["status"] == "PASS"]
    print(f"\n{len(ran)} passed, {len(failed)} failed, {len(rows) - len(ran) - len(failed)} skipped")
    return 1 if failed or not ran else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adamp-xp", description="AdamP/SGDP on the Python array API")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("conformance", help="compare every backend with adamp==0.3.0 and print a table")
    p.add_argument("--backend", action="append", help="backend id (numpy, array_api_strict, torch:cpu, torch:cuda, "
                   "jax:cpu, jax:gpu, cupy); repeatable; default: all")
    p.add_argument("--dtype", action="append", choices=["float32", "float64"], help="repeatable; default: both")
    p.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    p.add_argument("--no-jit", action="store_true", help="skip the jax.jit rows")
    p.add_argument("--core-only", action="store_true", help="skip the adapter rows")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=conformance)
    for module in _SUBCOMMANDS:  # each module adds its own subcommand; heavy imports stay lazy inside them
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
