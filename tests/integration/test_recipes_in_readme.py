"""The Integrations page's recipes (docs/integrations.md; README links to it) are the files the integration
tests run, verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent / "recipes"
PAGE = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE, re.S)
NAMES = sorted(p.stem for p in RECIPES.glob("*.py"))


def test_there_are_recipes():
    assert len(NAMES) >= 5, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_recipe_is_in_readme(name):
    source = (RECIPES / f"{name}.py").read_text()
    assert source.startswith(f"# recipe: {name}\n"), f"recipes/{name}.py must start with '# recipe: {name}'"
    assert source in BLOCKS, f"docs/integrations.md has no ```python block equal to tests/integration/recipes/{name}.py"
