"""The ``adamp-xp`` command runs end to end."""

from __future__ import annotations

import json

import pytest

from adamp_xp.cli import main

pytest.importorskip("adamp", reason="the oracle adamp==0.3.0 is not installed")


def test_conformance_prints_table_and_passes(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["conformance", "--backend", "numpy", "--backend", "cupy", "--steps", "6", "--core-only",
                 "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert any(line.split()[:2] == ["adamp_core", "numpy"] and line.endswith("PASS") for line in text.splitlines())
    rows = json.loads(out.read_text())
    numpy_rows = [r for r in rows if r["backend"] == "numpy"]
    assert {r["dtype"] for r in numpy_rows} == {"float32", "float64"}
    assert all(r["status"] == "PASS" and r["views"]["channel"] and r["views"]["layer"] and r["views"]["none"]
               for r in numpy_rows)
    assert {r["status"] for r in rows if r["backend"] == "cupy"} <= {"SKIP", "PASS"}


def test_conformance_includes_adapter_rows(capsys):
    pytest.importorskip("adamp_array")
    code = main(["conformance", "--backend", "numpy", "--dtype", "float64", "--steps", "4"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert any(line.split()[:2] == ["adamp_array", "numpy"] and line.endswith("PASS") for line in text.splitlines())


def test_conformance_rejects_unknown_backend():
    with pytest.raises(ValueError, match=r"Unknown backend: 'tensorflow'"):
        main(["conformance", "--backend", "tensorflow"])
