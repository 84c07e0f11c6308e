"""Experiments that reproduce the paper's evidence (Heo et al., ICLR 2021): ``adamp-xp toy`` (the 2-D
toy of Sec. 2) and ``adamp-xp digits`` (a small BN-CNN on scikit-learn's digits).

Each module has ``register(subparsers)``, which adds its ``adamp-xp`` subcommand; heavy optional
dependencies (matplotlib, torch, scikit-learn, tqdm) are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

# Where ``adamp-xp toy`` and ``adamp-xp digits`` write their figures unless ``--out`` names a folder: a folder of
# the current directory that .gitignore ignores, so that running them in a clone never overwrites the tracked
# figures under docs/figures (regenerated with an explicit ``--out docs/figures``).
DEFAULT_OUT = "adamp-xp-figures"


def out_folder(out: str | None) -> str:
    """The folder for the figures: ``--out``, else :data:`DEFAULT_OUT`; created, and returned as an absolute
    path (printed, so the user sees where the figures went)."""
    path = os.path.abspath(out or DEFAULT_OUT)
    os.makedirs(path, exist_ok=True)
    return path


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
