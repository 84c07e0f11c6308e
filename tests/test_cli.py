"""The ``adamp-xp`` command: conformance end to end (filtered to a few fast rows), --json, the exit
status on a wrong step, --version and every subcommand's --help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from adamp_xp import __version__
from adamp_xp.cli import main

pytest.importorskip("adamp", reason="the oracle adamp==0.3.0 is not installed")
pytest.importorskip("torch")

FAST = ["--steps", "3", "--no-progress", "--jax-cache", "none"]


def _table(text: str) -> list[list[str]]:
    """The table's rows, split on runs of two or more spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.startswith(("adamp_", "-"))]


def test_conformance_prints_rows_with_their_paths_and_passes(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["conformance", "--target", "core", "--target", "tree", "--backend", "numpy", "--backend", "cupy",
                 "--workers", "0", "--json", str(out), *FAST])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = [r for r in _table(text) if r[0] != "-" * 15]
    assert [r[:4] for r in rows] == [
        ["adamp_core", "numpy", "float64", "defaults"], ["adamp_core.tree", "numpy", "float64", "defaults"],
        ["adamp_core", "numpy", "float32", "defaults"], ["adamp_core.tree", "numpy", "float32", "defaults"],
        ["adamp_core", "numpy", "float64", "caution (vs timm)"],
        ["adamp_core", "numpy", "float32", "caution (vs timm)"]]
    assert all(r[4] == "per-tensor" and r[-1] == "PASS" for r in rows), text
    assert re.search(r"cupy: 4 rows SKIP \(.+\): adamp_core, adamp_core.tree", text)
    assert re.search(r"6 passed, 0 failed, 4 skipped in [\d.]+ s", text)
    doc = json.loads(out.read_text())
    core = [r for r in doc["rows"] if r["target"] == "adamp_core" and r["backend"] == "numpy"]
    assert all(r["views"]["channel"] and r["views"]["layer"] and r["views"]["none"] and r["views_agree"]
               for r in core)


def test_json_holds_every_row_the_versions_and_the_machine(tmp_path, capsys):
    out = tmp_path / "c.json"
    if __import__("torch").cuda.is_available():
        pytest.skip("checks the SKIP rows of a machine without a GPU")
    code = main(["conformance", "--target", "adamp_array", "--backend", "numpy", "--backend", "torch:cuda",
                 "--dtype", "float32", "--workers", "2", "--json", str(out), *FAST])  # two spawned workers
    capsys.readouterr()
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["steps"] == 3 and doc["full"] is False and doc["workers"] == 2 and doc["seconds"] > 0
    assert (doc["passed"], doc["failed"], doc["skipped"]) == (4, 0, 2)
    assert doc["argv"][:2] == ["conformance", "--target"]
    for name in ("adamp-xp", "adamp", "numpy", "torch", "jax", "optax", "numba", "array-api-compat"):
        assert name in doc["versions"]
    assert doc["versions"]["adamp"] == "0.3.0" and doc["versions"]["adamp-xp"] == __version__
    assert {"platform", "cpu_count", "usable_cpus", "python"} <= set(doc["machine"])
    assert doc["machine"]["cpu_count"] == os.cpu_count()
    numpy_rows = [r for r in doc["rows"] if r["backend"] == "numpy"]
    assert [r["options"] for r in numpy_rows] == ["defaults", "fused=False", "fused=False, foreach=False",
                                                  "caution (vs timm)"]
    for r in numpy_rows:
        assert r["status"] == "PASS" and r["path"].split(" + ")[0] == r["expected_path"]
        assert set(r) >= {"target", "backend", "device", "dtype", "options", "path", "paths", "expected_path",
                          "max_rel_error", "tolerance", "runs", "steps", "cases", "seconds"}
        assert r["max_rel_error"] <= r["tolerance"] == 1e-5
    cuda = [r for r in doc["rows"] if r["backend"] == "torch:cuda"]
    assert len(cuda) == 2 and all(r["status"] == "SKIP" and r["note"] for r in cuda)  # (this test runs on a CPU)


def test_a_wrong_step_fails_with_exit_status_1(tmp_path):
    """The hidden --perturb gives one target's rows a learning rate 0.1% too large: they must FAIL, the
    others still pass, and the command exits with 1."""
    out = tmp_path / "bad.json"
    r = subprocess.run([sys.executable, "-m", "adamp_xp.cli", "conformance", "--target", "core", "--target", "tree",
                        "--backend", "numpy", "--dtype", "float64", "--workers", "0", "--perturb", "tree",
                        "--json", str(out), *FAST], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {(row["target"], row["options"]): row for row in json.loads(out.read_text())["rows"]}
    assert rows["adamp_core", "defaults"]["status"] == rows["adamp_core", "caution (vs timm)"]["status"] == "PASS"
    tree = rows["adamp_core.tree", "defaults"]
    assert tree["status"] == "FAIL" and tree["max_rel_error"] > 1e-4
    assert "2 passed, 1 failed" in r.stdout


def test_cuda_rows_skip_with_a_reason_without_a_gpu(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA rows run")
    code = main(["conformance", "--device", "cuda", "--workers", "0", "--verbose-skips", *FAST])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = [r for r in _table(text) if r[0] != "-" * 15]
    assert rows and all(r[-1].startswith("SKIP (") for r in rows)
    assert {r[1] for r in rows} == {"torch:cuda", "jax:gpu", "cupy"}
    assert "nothing ran here" in text


@pytest.mark.parametrize("option, valid", [("--backend", ["numpy", "array_api_strict", "torch:cpu", "torch:cuda",
                                                              "jax:cpu", "jax:gpu", "cupy"]),
                                           ("--target", ["core", "tree", "adamp_torch", "adamp_array", "adamp_optax"]),
                                           ("--device", ["cpu", "cuda", "all"])])
def test_conformance_rejects_a_typo_with_the_valid_values(option, valid, capsys):
    """A typo is a usage error (exit status 2, argparse's message listing every valid value), not a traceback
    with status 1 (a failing row's)."""
    with pytest.raises(SystemExit) as exc:
        main(["conformance", option, "nonsense"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: invalid choice: 'nonsense'" in err and "Traceback" not in err
    assert all(f"'{v}'" in err for v in valid), err


def _columns(header: str) -> list[int]:
    """Where each heading starts."""
    return [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]


def test_the_table_stays_aligned_whatever_the_options():
    """Every column is as wide as its longest planned value, so that rows of long options (adamp_torch's
    "fused=False, foreach=False, caution (vs timm)") and observed paths with shares line up under the headings;
    a longer cell than planned pushes only its own line, which lines up again at the next column with room."""
    from adamp_xp.cli import _Table
    from adamp_xp.testing import conformance as C

    planned = [r.describe() for r in C.plan()]
    assert max(len(r["options"]) for r in planned) > 40
    table = _Table(planned)
    header, rule = table.header().splitlines()
    starts = _columns(header)
    assert len(starts) == 10 and _columns(rule) == starts
    for i, r in enumerate(planned):
        path = r["expected_path"] + (" 12%" if " + " in r["expected_path"] else " + per-tensor 3%")
        result = {**r, "path": path, "max_rel_error": 1.5e-15, "tolerance": 1e-12, "seconds": 123.4,
                  "views": {"channel": 280, "layer": 200, "none": 480} if i % 2 else None,
                  "status": "FAIL" if i % 3 else "PASS", "note": "views differ from adamp 0.3.0's" if i % 3 else ""}
        line = table.row(result)
        cells = re.split(r"\s{2,}", line)
        assert [line[s:s + len(c)] for s, c in zip(starts, cells, strict=True)] == cells, (header, line)
    long = table.row({**planned[0], "path": "fused kernels + multi-tensor 12% + per-tensor 3% (jit)",
                      "max_rel_error": 1.5e-15, "tolerance": 1e-12, "seconds": 1.0, "status": "PASS"})
    assert "per-tensor 3% (jit)  1.5e-15" in long and long.index("PASS") == starts[-1]


def _hide_timm(folder) -> dict:
    """An environment in which ``timm`` cannot be imported or found (as on a machine where only README's
    first command ran): a ``sitecustomize`` that refuses it, for this process and every worker it spawns."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\n\n\n"
        "class NoTimm:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'timm':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n\n\n"
        "sys.meta_path.insert(0, NoTimm())\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def _broken_timm(folder) -> dict:
    """An environment in which an installed ``timm`` is broken: its optimizer file raises when loaded."""
    (folder / "timm" / "optim").mkdir(parents=True)
    (folder / "timm" / "__init__.py").write_text("")
    (folder / "timm" / "optim" / "__init__.py").write_text("")
    (folder / "timm" / "optim" / "adamp.py").write_text("raise RuntimeError('broken timm for the test')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("timm", ["not installed", "broken"])
def test_without_timm_the_cautious_rows_skip_with_the_install_hint(timm, tmp_path):
    """README's first set-up command installs no timm: its `adamp-xp conformance` must exit 0, the cautious
    rows SKIP with the install hint and the header says so. A timm that is installed but broken is no SKIP:
    its rows FAIL (exit status 1) with the error."""
    env = (_hide_timm if timm == "not installed" else _broken_timm)(tmp_path / "site")
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "-m", "adamp_xp.cli", "conformance", "--target", "core", "--backend", "numpy",
                        "--dtype", "float32", "--workers", "0", "--json", str(out), *FAST],
                       capture_output=True, text=True, timeout=300, env=env)
    rows = {row["options"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"defaults", "caution (vs timm)"} and rows["defaults"]["status"] == "PASS"
    cautious = rows["caution (vs timm)"]
    header = r.stdout.splitlines()[0]
    if timm == "broken":
        assert r.returncode == 1, r.stdout + r.stderr
        assert cautious["status"] == "FAIL" and "RuntimeError: broken timm for the test" in cautious["note"]
        assert "and timm 1.0.31" in header
        return
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "Traceback" not in r.stderr
    hint = "timm is not installed: pip install --no-deps timm==1.0.31"
    assert cautious["status"] == "SKIP" and cautious["note"] == hint
    assert f"its 1 rows 'caution (vs timm)' SKIP here, {hint}" in header
    assert f"numpy: 1 rows SKIP ({hint})" not in r.stdout  # a single skipped row is shown as a row
    assert re.search(rf"adamp_core\s+numpy\s+float32\s+caution \(vs timm\).*SKIP \({re.escape(hint)}\)", r.stdout)
    assert "1 passed, 0 failed, 1 skipped" in r.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"adamp-xp {__version__}"


@pytest.mark.parametrize("command", ["conformance", "bench", "toy", "digits"])
def test_every_subcommand_help_has_a_description(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]  # usage, description, options
    assert not description.startswith(("options:", "optional arguments:")), text
    assert len(description.split()) >= 8
    assert description.rstrip().endswith("."), description  # a sentence: toy's used to end with a comma
    assert not description.rstrip().endswith(",")
