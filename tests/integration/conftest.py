"""Integration tests: the library inside the tools people train with (transformers' Trainer, Lightning,
timm's registry, flax nnx/linen, torch.func, JAX sharding), each with the real package.

Each "Integrations" recipe is a file in ``recipes/`` (first line ``# recipe: NAME``), pasted
verbatim into docs/integrations.md (``test_recipes_in_readme.py`` checks it); the tests run the file through
``run_recipe`` and check what it computed against an independent run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent / "recipes"


def recipe_source(name: str) -> str:
    return (RECIPES / f"{name}.py").read_text()


@pytest.fixture
def run_recipe(tmp_path, monkeypatch):
    """``run_recipe(name, **globals)``: execute ``recipes/NAME.py`` in a fresh namespace (cwd a temporary
    folder, for checkpoints) and return that namespace."""

    def run(name: str, **given):
        monkeypatch.chdir(tmp_path)
        ns = {"__name__": f"__recipe_{name}__", **given}
        exec(compile(recipe_source(name), str(RECIPES / f"{name}.py"), "exec"), ns)
        return ns

    return run


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test: fastest for tiny models, and immune to a busy machine (torch's
    OpenMP threads spin-wait for each other; on 2 shared cores a tiny BERT step took 0.5 s instead of 10 ms)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
