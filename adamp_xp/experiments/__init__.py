"""Experiments that reproduce the paper's evidence (Heo et al., ICLR 2021): ``adamp-xp toy`` (the 2-D
toy of Sec. 2) and ``adamp-xp digits`` (a small BN-CNN on scikit-learn's digits).

Each module has ``register(subparsers)``, which adds its ``adamp-xp`` subcommand; heavy optional
dependencies (matplotlib, torch, scikit-learn, tqdm) are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any


def invalid(option: str, text: str, expected: str) -> argparse.ArgumentTypeError:
    """The error an argparse ``type=`` function raises for ``--option text``: names the option, the value
    and what was expected."""
    return argparse.ArgumentTypeError(f"invalid --{option} {text!r}: expected {expected}")


def run_subcommand(register: Callable[[Any], None], command: str, argv: Sequence[str] | None) -> int:
    """``python -m adamp_xp.experiments.<module>``: the ``adamp-xp <command>`` subcommand that ``register``
    adds, on the arguments ``argv``; its exit code."""
    parser = argparse.ArgumentParser(prog="adamp-xp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([command, *(argv or [])])
    return args.func(args)
