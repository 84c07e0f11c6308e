"""``adamp-xp bench --host``: the host time of a step, every row of ours beside torch's fused optimizers."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from adamp_xp.bench import host  # noqa: E402
from adamp_xp.bench.workloads import Workload  # noqa: E402


def test_host_rows_cover_every_path_and_regime():
    w = Workload("tiny", 1.0, "a few shapes", ((8, 3, 3, 3), (8,), (8,), (10, 8)), (True, False, False, False))
    results = host.host_rows([w], steps=2, repeats=1)
    rows = {r["row"] for r in results}
    assert {"AdamW(fused=True)", "SGD(fused=True)", "AdamP (numba, default)", "AdamP(fused=False) multi-tensor"} <= rows
    assert {r["grads"] for r in results} == {"persistent", "new"}
    for r in results:
        assert r["ms"] > 0 and r["n_tensors"] == 4 and r["gc_per_step"] >= 0
        if r["row"] == "AdamW(fused=True)":
            assert r["ratio"] == 1.0
    table = host.format_host(results)
    assert table.count("\n") == len(rows) + 1 and "tiny (4 tensors), new grads" in table


def test_stubbed_triton_steps_change_nothing():
    """Stubbed launches run the host's work only: the params stay as they were."""
    import torch

    from adamp_core.paths import triton_fused

    if not triton_fused.AVAILABLE:
        pytest.skip("triton is not installed")
    import adamp_torch

    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = adamp_torch.AdamP([p], fused="triton")
    p.grad = torch.full_like(p, 0.5)
    with triton_fused.counting() as counts, triton_fused.stubbed():
        opt.step()
    assert counts.launches == 3 and torch.equal(p, torch.ones(4, 3))
    assert not triton_fused.interpreting() or triton_fused.os.environ.get("TRITON_INTERPRET") == "1"
