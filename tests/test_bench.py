"""Benchmarks: workload definitions, ``adamp-xp bench`` end to end, and the asv suite's classes.

No timing is asserted; sizes are tiny so the file runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adamp_xp.bench import register
from adamp_xp.bench._cli import QUICK_SKIP_BACKENDS, QUICK_SKIP_IMPLS, _settings
from adamp_xp.bench.measure import extra_peak_bytes, torch_ops
from adamp_xp.bench.runners import (
    HYPERPARAMS,
    IMPLS,
    GradCache,
    Unavailable,
    build_runner,
    device_backends,
    impl_rows,
)
from adamp_xp.bench.workloads import ENV_SCALE, WORKLOAD_NAMES, get_workload, host_data

ROOT = Path(__file__).resolve().parents[1]
ASV_DIR = ROOT / "asv_benchmarks"
ALL_BACKENDS = ["numpy", "array_api_strict", "torch:cpu", "torch:cuda", "cupy", "jax:cpu", "jax:gpu"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamp-xp")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _bench(argv: list[str]) -> int:
    args = _parser().parse_args(["bench", *argv])
    return args.func(args)


# -- workloads ----------------------------------------------------------------------------------


def test_resnet50_matches_torchvision_parameter_count():
    w = get_workload("resnet50", 1)
    # torchvision.models.resnet50: 25,557,032 parameters in 161 tensors: 53 convs (49 + 4 downsample),
    # 53 BatchNorms (weight + bias) and fc (weight + bias).
    assert w.n_tensors == 161
    assert w.n_elements == 25_557_032
    ndims = [len(s) for s in w.shapes]
    assert ndims.count(4) == 53 and ndims.count(2) == 1 and ndims.count(1) == 107
    assert w.shapes[0] == (64, 3, 7, 7) and w.shapes[-2:] == ((1000, 2048), (1000,))
    assert sum(w.invariant) == 53 and all(len(s) == 4 for s, inv in zip(w.shapes, w.invariant, strict=True) if inv)


def test_other_workloads_have_documented_sizes():
    t = get_workload("transformer", 1)
    d = 1024
    assert t.n_tensors == 12 and t.n_elements == 12 * d * d + 13 * d
    assert sorted(s for s in t.shapes if len(s) == 2) == [(d, d), (d, 4 * d), (3 * d, d), (4 * d, d)]
    assert [s for s in t.shapes if len(s) == 1].count((d,)) == 6  # 2 LayerNorms (weight, bias) + 2 biases
    small = get_workload("small", 1)
    sizes = [math.prod(s) for s in small.shapes]
    assert small.n_tensors == 2000 and 1024 <= min(sizes) and max(sizes) <= 4096
    large = get_workload("large", 1)
    assert large.shapes == ((8192, 8192),) and large.n_elements == 64 * 2**20


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_scale_shrinks_elements_and_keeps_tensor_counts(name, monkeypatch):
    full = get_workload(name, 1)
    monkeypatch.setenv(ENV_SCALE, "0.05")
    small = get_workload(name)  # from the environment variable
    assert small.scale == 0.05
    assert 0.02 < small.n_elements / full.n_elements < 0.1
    if name == "small":
        assert small.n_tensors == 100
    else:
        assert small.n_tensors == full.n_tensors


@pytest.mark.parametrize(
    ("env", "scale", "message"),
    [
        ("abc", None, r"Invalid ADAMP_BENCH_SCALE: 'abc' \(expected a positive number\)"),
        ("-1", None, r"Invalid ADAMP_BENCH_SCALE: -1.0"),
        (None, 0.0, r"Invalid scale: 0.0"),
        (None, float("nan"), r"Invalid scale: nan"),
    ],
)
def test_bad_scale_is_rejected(env, scale, message, monkeypatch):
    if env is not None:
        monkeypatch.setenv(ENV_SCALE, env)
    with pytest.raises(ValueError, match=message):
        get_workload("small", scale)


def test_unknown_workload_is_rejected():
    with pytest.raises(ValueError, match=r"Unknown workload: 'vgg'"):
        get_workload("vgg")


def test_host_data_regimes_fire_the_documented_views():
    """Invariant tensors get grads orthogonal to each row (channel view projected); the others do not
    pass the test on either view. Checked in float64 NumPy with the paper's threshold delta/sqrt(n)."""
    w = get_workload("resnet50", 0.002)
    params, grads = host_data(w, seed=3)
    assert [p.shape for p in params] == list(w.shapes) and all(g.dtype == np.float32 for g in grads)
    delta = 0.1
    checked = 0
    for p, g, inv in zip(params, grads, w.invariant, strict=True):
        if p.ndim < 2:
            continue
        pr, gr = p.reshape(p.shape[0], -1).astype(np.float64), g.reshape(p.shape[0], -1).astype(np.float64)
        cos_rows = np.abs((pr * gr).sum(1)) / (np.linalg.norm(pr, axis=1) * np.linalg.norm(gr, axis=1))
        cos_layer = abs((pr * gr).sum()) / (np.linalg.norm(pr) * np.linalg.norm(gr))
        if inv:
            assert cos_rows.max() < delta / math.sqrt(pr.shape[1])
        else:
            assert cos_rows.max() >= delta / math.sqrt(pr.shape[1]) and cos_layer >= delta / math.sqrt(pr.size)
        checked += 1
    assert checked == 54


# -- adamp-xp bench ---------------------------------------------------------------------------------


def test_impl_rows_cover_every_backend():
    cpu = impl_rows("cpu")
    cuda = impl_rows("cuda")
    assert {b for _, b in cpu} == {"numpy", "array_api_strict", "torch:cpu", "jax:cpu"}
    assert {b for _, b in cuda} == {"torch:cuda", "cupy", "jax:gpu"}
    assert {k for k, _ in cpu} == set(IMPLS) == {k for k, _ in cuda}
    with pytest.raises(ValueError, match=r"Invalid device: 'tpu'"):
        impl_rows("tpu")
    only = impl_rows("cpu", ["core", "torch-fused"], ["numpy", "torch:cpu"])
    assert only == [("torch-fused", "torch:cpu"), ("core", "numpy"), ("core", "torch:cpu")]
    with pytest.raises(ValueError, match=r"Invalid backend for device 'cpu': 'cupy'"):
        impl_rows("cpu", None, ["cupy"])


def test_quick_leaves_out_the_conformance_backend_unless_asked(monkeypatch):
    monkeypatch.delenv(ENV_SCALE, raising=False)
    parse = lambda *argv: _settings(_parser().parse_args(["bench", *argv]))
    quick = parse("--quick")
    assert QUICK_SKIP_BACKENDS == ("array_api_strict",)
    assert quick["backends"] == ["numpy", "torch:cpu", "jax:cpu"] and quick["skipped_backends"] == ["array_api_strict"]
    assert quick["threads"] == 1 and quick["repeats"] == 5
    assert QUICK_SKIP_IMPLS == (
        "adamp_torch-unfused", "adamp_array-unfused", "adamp_torch-foreach", "adamp_array-foreach",
        "adamp_torch-unfused+caution", "adamp_torch-foreach+caution",
    )
    assert quick["impls"] == [k for k in IMPLS if k not in QUICK_SKIP_IMPLS]
    assert parse("--quick", "--impl", "adamp_torch-unfused")["impls"] == ["adamp_torch-unfused"]
    assert parse()["impls"] is None
    # --quick shrinks every workload 20x, and "small" to 40 tensors; an explicit --scale wins everywhere.
    assert {w: get_workload(w, s).n_tensors for w, s in quick["scales"].items()} == {
        "resnet50": 161,
        "transformer": 12,
        "small": 40,
        "large": 1,
    }
    assert set(parse("--quick", "--scale", "0.1")["scales"].values()) == {0.1}
    assert parse("--quick", "--backend", "all")["backends"] == list(device_backends("cpu"))
    assert parse("--quick", "--backend", "array_api_strict")["backends"] == ["array_api_strict"]
    full = parse()
    assert "array_api_strict" in full["backends"] and full["skipped_backends"] == [] and full["threads"] is None
    with pytest.raises(ValueError, match=r"Invalid --backend: 'cupy' for --device cpu"):
        parse("--backend", "cupy")


def test_bench_runs_end_to_end_and_writes_json(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("adamp")
    out = tmp_path / "bench.json"
    impls = ["torch-fused", "official", "core", "adamp_array", "core+jit"]
    argv = ["--workload", "small", "--scale", "0.002", "--repeats", "2", "--min-time", "0.001", "--json", str(out)]
    argv += ["--jax-cache", "none"]
    code = _bench(argv + [x for k in impls for x in ("--impl", k)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "x AdamW(fused=True)" in text and "x adamp 0.3.0" in text and "median of 2 interleaved runs" in text
    data = json.loads(out.read_text())
    assert data["meta"]["repeats"] == 2 and data["meta"]["scale"] == 0.002 and data["meta"]["device"] == "cpu"
    rows = data["results"]
    expected = [(k, b) for k, b in impl_rows("cpu") if k in impls]
    assert [(r["impl"], r["backend"]) for r in rows] == expected
    for r in rows:
        assert r["workload"] == "small" and r["optimizer"] == "adamp" and r["n_tensors"] == 4
        if r["status"] == "skip":  # jax not installed
            assert r["backend"] == "jax:cpu" and r["note"]
            continue
        assert r["status"] == "ok", r
        assert r["ms_per_step"] > 0 and len(r["runs_ms"]) == r["repeats"] == 2 and r["steps_per_run"] >= 1
        assert r["ms_per_step"] == pytest.approx(float(np.median(r["runs_ms"])))
        assert r["ratio_baseline"] == pytest.approx(r["ms_per_step"] / rows[0]["ms_per_step"])
        assert r["ratio_official"] == pytest.approx(r["ms_per_step"] / rows[1]["ms_per_step"])
    assert rows[0]["label"] == "torch.optim.AdamW(fused=True)" and rows[0]["ratio_baseline"] == 1.0
    assert rows[1]["label"] == "adamp.AdamP 0.3.0 (official)" and rows[1]["ratio_official"] == 1.0


def test_bench_sgdp_and_absent_devices(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    argv = [
        "--workload",
        "large",
        "--scale",
        "1e-5",
        "--optimizer",
        "sgdp",
        "--repeats",
        "1",
        "--min-time",
        "0.001",
        "--impl",
        "torch-foreach",
        "--impl",
        "core",
        "--device",
        "cuda",
        "--json",
        str(out),
    ]
    code = _bench(argv)
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [(r["impl"], r["backend"]) for r in rows] == [
        ("torch-foreach", "torch:cuda"),
        ("core", "cupy"),
        ("core", "torch:cuda"),
    ]
    for r in rows:
        assert r["status"] in ("ok", "skip") and r["optimizer"] == "sgdp"
        if r["status"] == "skip":
            assert f"skip: {r['label']} [{r['backend']}]" in text
    assert code == (0 if any(r["status"] == "ok" for r in rows) else 1)


def _params_after_one_step(impl, optimizer, backend, cache):
    try:
        runner = build_runner(impl, optimizer, backend, cache)
    except Unavailable as exc:
        pytest.skip(str(exc))
    runner.step()
    runner.sync()
    out = []
    for p in runner._extra["params"]:
        p = p.detach().cpu() if hasattr(p, "detach") else p
        out.append(np.asarray(p, dtype=np.float64))
    return out


CPU_ROWS = [(k, b) for k, b in impl_rows("cpu")]


@pytest.mark.parametrize(("impl", "backend"), CPU_ROWS, ids=[f"{k}-{b}" for k, b in CPU_ROWS])
def test_adamp_rows_share_hyperparameters_with_adamw(impl, backend):
    """Every AdamP row runs the hyperparameters of the AdamW rows: on the transformer workload nothing is
    projected (no weight is scale-invariant), where AdamP's first step is AdamW's. Reference: AdamW's first
    step in float64 NumPy, p (1 - lr wd) - lr g / (|g| + eps) (bias-corrected moments are g and g^2)."""
    cache = GradCache(get_workload("transformer", 1e-4))
    hp = HYPERPARAMS["adamp"]
    got = _params_after_one_step(impl, "adamp", backend, cache)
    for p0, g, p1 in zip(cache.params, cache.grads, got, strict=True):
        p0, g = p0.astype(np.float64), g.astype(np.float64)
        want = p0 * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * g / (np.abs(g) + hp["eps"])
        np.testing.assert_allclose(p1, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("impl", "backend"), CPU_ROWS, ids=[f"{k}-{b}" for k, b in CPU_ROWS])
def test_sgdp_rows_use_nesterov_momentum(impl, backend):
    """SGD rows (torch.optim.SGD, optax.sgd) and SGDP rows run Nesterov momentum 0.9 on the same lr. First
    step, nothing projected: the momentum buffer is g, the update lr (1 + m) g'; torch.optim and optax couple
    the weight decay (g' = g + wd p), AdamP's authors decouple it (p (1 - lr wd) - lr (1 + m) g)."""
    cache = GradCache(get_workload("transformer", 1e-4))
    hp = HYPERPARAMS["sgdp"]
    assert hp["momentum"] == 0.9 and hp["nesterov"] is True and hp["dampening"] == 0
    lr, wd, m = hp["lr"], hp["weight_decay"], hp["momentum"]
    got = _params_after_one_step(impl, "sgdp", backend, cache)
    for p0, g, p1 in zip(cache.params, cache.grads, got, strict=True):
        p0, g = p0.astype(np.float64), g.astype(np.float64)
        if IMPLS[impl].reference and impl != "official":
            want = p0 - lr * (1 + m) * (g + wd * p0)
        else:
            want = p0 * (1 - lr * wd) - lr * (1 + m) * g
        np.testing.assert_allclose(p1, want, rtol=1e-5, atol=1e-7)


def test_sgdp_ratios_are_against_foreach_sgd(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    argv = ["--workload", "transformer", "--scale", "1e-4", "--optimizer", "sgdp", "--repeats", "1"]
    argv += ["--min-time", "0.001", "--impl", "torch-fused", "--impl", "torch-foreach", "--impl", "core"]
    argv += ["--backend", "numpy", "--backend", "torch:cpu", "--json", str(out)]
    assert _bench(argv) == 0
    text = capsys.readouterr().out
    assert "x SGD(foreach=True)" in text and "SGDP (lr 0.01, Nesterov momentum 0.9, weight decay 0.0001)" in text
    rows = {(r["impl"], r["backend"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {
        ("torch-fused", "torch:cpu"),
        ("torch-foreach", "torch:cpu"),
        ("core", "numpy"),
        ("core", "torch:cpu"),
    }
    base = rows[("torch-foreach", "torch:cpu")]
    for r in rows.values():
        assert r["baseline"] == "torch.optim.SGD(foreach=True)"
        assert r["ratio_baseline"] == pytest.approx(r["ms_per_step"] / base["ms_per_step"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scale", "-1"], r"Invalid --scale: -1.0 \(expected a positive float\)"),
        (["--repeats", "0"], r"Invalid --repeats: 0"),
        (["--min-time", "0"], r"Invalid --min-time: 0.0"),
    ],
)
def test_bench_rejects_bad_arguments(argv, message):
    with pytest.raises(ValueError, match=message):
        _bench(argv)


def test_bench_package_imports_no_heavy_library():
    code = (
        "import sys, adamp_xp.bench.workloads, adamp_xp.bench.runners; print({'torch', 'jax'} & set(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"


# -- asv suite ------------------------------------------------------------------------------------------


@pytest.fixture
def asv_suite(monkeypatch):
    monkeypatch.setenv(ENV_SCALE, "0.002")
    monkeypatch.setenv("ADAMP_BENCH_JAX_CACHE", "none")
    monkeypatch.delenv("ADAMP_BENCH_THREADS", raising=False)  # importing the suite would apply it to torch
    monkeypatch.syspath_prepend(str(ASV_DIR))
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    import benchmarks.optimizers as suite

    return suite


def test_asv_classes_are_parametrized_as_documented(asv_suite):
    core = asv_suite.Core
    assert core.param_names == ("backend", "workload", "optimizer")
    assert core.params == (ALL_BACKENDS, list(WORKLOAD_NAMES), ["AdamP", "SGDP"])
    for cls in (
        asv_suite.Core,
        asv_suite.CoreGPUMemory,
        asv_suite.Reference,
        asv_suite.ReferenceGPUMemory,
        asv_suite.Adapter,
        asv_suite.AdapterGPUMemory,
    ):
        assert len(cls.params) == len(cls.param_names)
    assert set(asv_suite.Reference.params[2]) == {
        "AdamW(fused=True)",
        "AdamW(foreach=True)",
        "SGD(foreach=True)",
        "adamp.AdamP==0.3.0",
        "adamp.SGDP==0.3.0",
    }
    assert asv_suite.CoreGPUMemory.track_peak_gpu_memory.unit == "bytes"


def test_asv_benchmarks_set_up_and_run_with_small_params(asv_suite):
    b = asv_suite.Core()
    b.setup("numpy", "small", "AdamP")
    before = [np.array(p) for p in b.runner._extra["params"]]
    b.time_step("numpy", "small", "AdamP")
    b.peakmem_step("numpy", "small", "AdamP")
    after = b.runner._extra["params"]
    assert len(after) == 4 and any(not np.array_equal(x, y) for x, y in zip(before, after, strict=True))
    with pytest.raises(NotImplementedError):
        asv_suite.CoreGPUMemory().setup("numpy", "small", "AdamP")
    if shutil.which("nvidia-smi") is None:
        for backend in ("torch:cuda", "jax:gpu", "cupy"):
            with pytest.raises(NotImplementedError):
                asv_suite.Core().setup(backend, "small", "SGDP")
    if pytest.importorskip("torch"):
        r = asv_suite.Reference()
        r.setup("cpu", "small", "SGD(foreach=True)")
        r.time_step("cpu", "small", "SGD(foreach=True)")
        a = asv_suite.Adapter()
        a.setup("cpu", "small", "adamp_array.SGDP")
        a.time_step("cpu", "small", "adamp_array.SGDP")


@pytest.mark.skipif(shutil.which("asv") is None, reason="asv is not installed (pip install -e '.[bench]')")
def test_asv_check_passes():
    env = {**os.environ, "ADAMP_BENCH_SCALE": "0.002"}
    proc = subprocess.run(
        ["asv", "check", "--python=same"], cwd=ASV_DIR, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No problems found" in proc.stdout


def test_asv_thread_setting(asv_suite, monkeypatch):
    from benchmarks.common import apply_threads

    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.setenv("XLA_FLAGS", "")
    try:
        monkeypatch.setenv("ADAMP_BENCH_THREADS", "1")
        apply_threads()
        assert torch.get_num_threads() == 1
        assert "--xla_cpu_multi_thread_eigen=false" in os.environ["XLA_FLAGS"]
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "two"):
        monkeypatch.setenv("ADAMP_BENCH_THREADS", bad)
        with pytest.raises(ValueError, match=rf"Invalid ADAMP_BENCH_THREADS: '{bad}' \(expected a positive integer\)"):
            apply_threads()
    assert torch.get_num_threads() == before


def test_jax_compilation_cache_can_be_turned_off(monkeypatch):
    from adamp_xp.bench.runners import ENV_JAX_CACHE, enable_jax_compilation_cache

    assert enable_jax_compilation_cache("none") is None
    monkeypatch.setenv(ENV_JAX_CACHE, "NONE")
    assert enable_jax_compilation_cache() is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak resident set: Linux /proc only")
def test_extra_peak_bytes_sees_a_steps_temporaries():
    """The instrument behind the 'extra MiB' column: a step that fills a 64 MiB temporary shows at least
    that much, a step that allocates nothing shows (almost) nothing, and the in-place fused AdamP step
    needs far less than one param's bytes where the pure step needs several."""
    n = 16 * 2**20  # float32: 64 MiB

    def temporary() -> None:
        np.ones(n, dtype=np.float32).sum()

    big = extra_peak_bytes(temporary, lambda: None, "numpy")
    if big == 0:
        pytest.skip("this kernel does not reset the peak resident set (clear_refs)")
    assert big >= 0.9 * 4 * n
    assert extra_peak_bytes(lambda: None, lambda: None, "numpy") < 0.1 * 4 * n
    import adamp_array

    w, g = np.random.default_rng(0).standard_normal((2, 2048, 2048), dtype=np.float32)
    fused, pure = adamp_array.AdamP([w.copy()], lr=1e-3), adamp_array.AdamP([w.copy()], lr=1e-3, fused=False)
    for opt in (fused, pure):
        opt.step([g])  # the state exists before measuring
    if _fused_available():
        assert extra_peak_bytes(lambda: fused.step([g]), lambda: None, "numpy") < 0.25 * w.nbytes
    assert extra_peak_bytes(lambda: pure.step([g]), lambda: None, "numpy") > 2 * w.nbytes


def _fused_available() -> bool:
    from adamp_core.paths import numba_fused as fused

    return fused.AVAILABLE


def test_torch_ops_counts_kernels_and_the_grouped_step_needs_fewer():
    """The op counter counts kernels, not views; and the multi-tensor step of adamp_torch dispatches far
    fewer of them than the per-tensor step on ResNet-50's shapes (what makes it the GPU path)."""
    torch = pytest.importorskip("torch")
    x = torch.ones(4, 4)

    def three():
        x.view(16), x.t(), x[1:]  # views: no kernel
        y = (x + 1) * 2
        torch._foreach_mul_([x, y], 1.0)  # a foreach call counts once

    assert torch_ops(three) == 3
    cache = GradCache(get_workload("resnet50", 0.01))
    counts = {}
    for impl in ("adamp_torch-unfused", "adamp_torch-foreach"):
        runner = build_runner(impl, "adamp", "torch:cpu", cache)
        runner.step()
        counts[impl] = torch_ops(runner.step)
    assert counts["adamp_torch-foreach"] < counts["adamp_torch-unfused"] / 2, counts
