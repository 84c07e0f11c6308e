"""Every Python example in README.md runs as written (blocks starting with `# sketch` are fragments; those
starting with `# recipe:` are run, and checked, by tests/integration/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
RUNNABLE = [b for b in BLOCKS if not b.startswith(("# sketch", "# recipe:"))]


def test_readme_has_examples():
    assert len(RUNNABLE) >= 4
    for entry_point in ("adamp_core", "adamp_torch", "adamp_array", "adamp_optax"):  # one example for each
        assert any(re.search(rf"^(import|from) {entry_point}\b", b, re.M) for b in RUNNABLE), entry_point


@pytest.mark.parametrize("code", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_example_runs(code, tmp_path, monkeypatch):
    for module in re.findall(r"^(?:import|from) (\w+)", code, re.M):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # examples may write files (checkpoints)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
