"""``adamp_xp.testing.conformance``: the rows cover every entry point and execution path, and each row
reports the path the dispatcher really took (checked against its documented policy)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from adamp_xp.testing import conformance as C
from adamp_xp.testing.oracle import TIMM_ADAMP_CASES

pytest.importorskip("adamp", reason="the oracle adamp==0.3.0 is not installed")

STEPS = 2


def _run(row: C.Row) -> dict:
    result = C.run_row(row, steps=STEPS)
    assert result["status"] == "PASS", result
    assert result["max_rel_error"] <= result["tolerance"]
    return result


def test_the_default_rows_cover_every_target_and_path_on_a_cpu():
    rows = C.plan(device="cpu")
    got = {(r.name, r.backend, r.dtype, r.label, r.expected) for r in rows}
    for dtype in ("float64", "float32"):
        for backend in ("numpy", "array_api_strict", "torch:cpu", "jax:cpu"):
            assert ("adamp_core", backend, dtype, "defaults", C.PER_TENSOR) in got
        assert ("adamp_core", "jax:cpu", dtype, "jax.jit", "per-tensor (jit)") in got
        for backend in ("numpy", "torch:cpu"):
            assert ("adamp_core.tree", backend, dtype, "defaults", C.PER_TENSOR) in got
        for target in ("adamp_torch", "adamp_array"):
            assert (target, "torch:cpu", dtype, "fused=False", C.MULTI) in got
            assert (target, "torch:cpu", dtype, "fused=False, foreach=False", C.PER_TENSOR) in got
        assert ("adamp_array", "numpy", dtype, "fused=False", C.MULTI) in got
        for backend in ("array_api_strict",):
            assert ("adamp_array", backend, dtype, "defaults", C.MULTI) in got
            assert ("adamp_array", backend, dtype, "foreach=False", C.PER_TENSOR) in got
    # the fused kernels in float32 (numba compiles them once per dtype); float64's: --full, or --dtype float64
    for target, backend in (("adamp_torch", "torch:cpu"), ("adamp_array", "torch:cpu"), ("adamp_array", "numpy")):
        assert (target, backend, "float32", "defaults", C.FUSED) in got
        assert (target, backend, "float64", "defaults", C.FUSED) not in got
        for more in (C.plan([target], [backend], dtypes=["float64"]), C.plan(device="cpu", full=True)):
            assert (target, backend, "float64", "defaults", C.FUSED) in {
                (r.name, r.backend, r.dtype, r.label, r.expected) for r in more}
    assert ("adamp_torch", "torch:cpu", "float32", "channels_last", f"{C.FUSED} + {C.MULTI}") in got
    assert not any(r.dtype == "float64" and C.FUSED in r.expected for r in rows)
    for half in ("bfloat16", "float16"):
        assert ("adamp_torch", "torch:cpu", half, "state_dtype=float32", C.MULTI) in got
    # JAX: its default dtype (float32) for the tree and the adapters, float64 too for the core
    assert ("adamp_core.tree", "jax:cpu", "float32", "defaults", C.PER_TENSOR) in got
    assert ("adamp_array", "jax:cpu", "float32", "defaults", C.MULTI) in got
    assert ("adamp_array", "jax:cpu", "float32", "foreach=False", C.PER_TENSOR) in got
    assert ("adamp_optax", "jax:cpu", "float32", "jax.jit", "per-tensor (jit)") in got
    assert ("adamp_optax", "jax:cpu", "float32", "jax.jit, foreach=True", "multi-tensor (jit)") in got
    assert {r.name for r in rows} == set(C.TARGETS.values())
    assert all(r.backend in ("numpy", "array_api_strict", "torch:cpu", "jax:cpu") for r in rows)
    full = C.plan(device="cpu", full=True)
    assert all(r.all_cases for r in full) and len(full) > len(rows)
    assert ("adamp_optax", "jax:cpu", "float64") in {(r.name, r.backend, r.dtype) for r in full}


def test_cuda_rows_are_the_gpu_backends():
    rows = C.plan(device="cuda")
    assert {r.backend for r in rows} == {"torch:cuda", "jax:gpu", "cupy"}
    assert ("adamp_torch", "torch:cuda", "float32", "defaults", C.MULTI) in {
        (r.name, r.backend, r.dtype, r.label, r.expected) for r in rows}


def test_targets_and_backends_filter():
    rows = C.plan(["adamp_torch"], ["torch:cpu"], dtypes=["float32"])
    assert {r.label for r in rows if not r.cautious} == {"defaults", "fused=False", "fused=False, foreach=False",
                                                          "channels_last"}
    with pytest.raises(ValueError, match="Unknown target: 'keras'"):
        C.plan(["keras"])


@pytest.mark.parametrize("options", [(), ("fused=False",), ("fused=False", "foreach=False"), ("channels_last",)],
                         ids=lambda o: ",".join(o) or "defaults")
def test_adamp_torch_rows_run_the_path_the_policy_names(options):
    pytest.importorskip("torch")
    from adamp_core.paths import numba_fused as fused

    row = next(r for r in C.plan(["adamp_torch"], ["torch:cpu"], dtypes=["float32"]) if r.options == options)
    result = _run(row)
    if row.expected.startswith(C.FUSED) and not fused.AVAILABLE:
        pytest.skip("numba is not installed: no fused kernels")
    ran = set(result["paths"]) - {k for k, n in result["paths"].items() if not n}
    assert ran == set(row.expected.split(" + ")), result["paths"]
    assert result["path"].split(" + ")[0] == row.expected.split(" + ")[0]


def test_cautious_rows_cover_every_torch_path_against_timm():
    """caution=True rows (issue 19) on each adamp_torch path and the core, against timm 1.0.31's optimizers;
    the fused one runs the kernels and passes."""
    pytest.importorskip("torch")
    pytest.importorskip("adamp_xp.testing.timm_reference").timm_optimizers()
    from adamp_core.paths import numba_fused as fused

    rows = [r for r in C.plan(["adamp_torch", "core"], ["torch:cpu"], dtypes=["float32"]) if r.cautious]
    assert {(r.target, r.expected) for r in rows} == {
        ("core", C.PER_TENSOR), ("adamp_torch", C.FUSED), ("adamp_torch", C.MULTI), ("adamp_torch", C.PER_TENSOR)}
    assert all(r.describe()["reference"] == "timm 1.0.31" and "caution" in r.label for r in rows)
    assert all(set(r.cases["adamp"]) <= set(TIMM_ADAMP_CASES) for r in rows)
    result = _run(next(r for r in rows if r.expected == C.FUSED))
    if fused.AVAILABLE:
        assert result["path"].startswith(C.FUSED), result["path"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_params_with_float32_state(dtype):
    pytest.importorskip("torch")
    (row,) = C.plan(["adamp_torch"], ["torch:cpu"], dtypes=[dtype])
    result = _run(row)
    assert result["tolerance"] == C.row_tolerance(dtype, STEPS) == {"bfloat16": 2**-6, "float16": 2**-9}[dtype]
    assert result["path"] == C.MULTI


def test_adamp_array_and_tree_rows_on_numpy():
    for row in C.plan(["adamp_array", "tree"], ["numpy"], dtypes=["float64"]):
        result = _run(row)
        assert result["tolerance"] == 1e-12
        assert result["path"].split(" + ")[0] == row.expected, (row, result["path"])


def test_jax_rows(monkeypatch):
    """Every JAX row (float32): the core eager and under jax.jit, the tree (pytrees), adamp_array (multi-tensor
    and per tensor) and adamp_optax (per tensor, and foreach=True: the multi-tensor step traced), each on its
    default tables, but on one or two shapes and one case per optimizer to keep the compilations short."""
    pytest.importorskip("optax")
    one = {"adamp": ("nesterov_wd",), "sgdp": ("nesterov_wd",)}
    for table in ("EAGER_JAX_CASES", "LIGHT_ADAPTER_CASES"):
        monkeypatch.setattr(C, table, one)
    monkeypatch.setattr(C, "SHAPES", {k: v for k, v in C.SHAPES.items() if k in ("conv4d", "scalar0d")})
    monkeypatch.setattr(C, "JAX_SHAPES", ("conv4d",))
    monkeypatch.setattr(C, "JAX_JIT_SHAPES", ("conv4d", "scalar0d"))
    rows = [r for r in C.plan(backends=["jax:cpu"], dtypes=["float32"]) if not r.cautious]
    assert [(r.name, r.label) for r in rows] == [
        ("adamp_core", "defaults"), ("adamp_core", "jax.jit"), ("adamp_core.tree", "defaults"),
        ("adamp_array", "defaults"), ("adamp_array", "foreach=False"),
        ("adamp_optax", "jax.jit"), ("adamp_optax", "jax.jit, foreach=True")]
    assert [r.shapes for r in rows] == [("conv4d",), ("conv4d", "scalar0d"), *[("conv4d",)] * 5]
    for row in rows:
        result = _run(dataclasses.replace(row, all_cases=False))  # not every case
        assert result["path"] == row.expected
        assert result["cases"] == {"adamp": ["nesterov_wd"], "sgdp": ["nesterov_wd"]}
        assert result["shapes"] == list(row.shapes)


def test_each_row_runs_its_cases_and_shapes():
    """The default tables: every case and shape for the core on numpy and torch; every case compiled for the
    core under jax.jit (float32: JAX_JIT_SHAPES); fewer cases where each operation is a Python round trip or a
    compilation, fewer shapes on JAX; --full: everything everywhere."""
    rows = {(r.name, r.backend, r.dtype, r.label): r for r in C.plan(device="cpu") if not r.cautious}
    every = {"adamp": None, "sgdp": None}
    for backend in ("numpy", "torch:cpu"):
        assert rows[("adamp_core", backend, "float32", "defaults")].cases == every
        assert rows[("adamp_array", backend, "float32", "fused=False")].cases == C.ADAPTER_CASES
    for backend in ("numpy", "torch:cpu", "array_api_strict"):
        assert all(r.shapes == tuple(C.SHAPES) for r in rows.values() if r.backend == backend)
    assert rows[("adamp_core", "array_api_strict", "float64", "defaults")].cases == C.EAGER_JAX_CASES
    assert rows[("adamp_array", "array_api_strict", "float64", "defaults")].cases == C.LIGHT_ADAPTER_CASES
    jit32 = rows[("adamp_core", "jax:cpu", "float32", "jax.jit")]
    jit64 = rows[("adamp_core", "jax:cpu", "float64", "jax.jit")]
    assert jit32.cases == jit64.cases == every
    assert jit32.shapes == C.JAX_JIT_SHAPES and jit64.shapes == C.JAX_SHAPES
    assert rows[("adamp_core", "jax:cpu", "float32", "defaults")].cases == C.EAGER_JAX_CASES
    assert rows[("adamp_optax", "jax:cpu", "float32", "jax.jit")].cases == C.LIGHT_ADAPTER_CASES
    assert all(r.shapes == C.JAX_SHAPES for r in rows.values() if r.backend == "jax:cpu" and r is not jit32)
    assert set(C.JAX_SHAPES) <= set(C.JAX_JIT_SHAPES) <= set(C.SHAPES)
    for cases in (C.ADAPTER_CASES, C.EAGER_JAX_CASES, C.LIGHT_ADAPTER_CASES):
        assert set(cases["adamp"]) <= set(C.ADAMP_CASES) and set(cases["sgdp"]) <= set(C.SGDP_CASES)
    for r in C.plan(device="cpu", full=True):
        assert r.cases == (C.ALL_CAUTIOUS_CASES if r.cautious else every) and r.shapes == tuple(C.SHAPES)
    cautious = [r for r in C.plan(device="cpu") if r.cautious]  # against timm: its cases only
    assert cautious and all(r.cases == C.CAUTIOUS_CASES for r in cautious)


def test_hyperparameters_traced_or_static():
    """The jit programs take every hyperparameter as a traced 0-d array but the flags (Python bools: a
    program each; a new flag, such as caution, needs no change) and, below float64, AdamP's betas."""
    traced, static = C._traced_hp("adamp", {"lr": 1e-2, "nesterov": True, "caution": True}, "float32")
    assert static == (("betas", (0.9, 0.999)), ("caution", True), ("nesterov", True))
    assert traced == {"lr": 1e-2, "eps": 1e-8, "weight_decay": 0.0, "delta": 0.1, "wd_ratio": 0.1}
    traced, static = C._traced_hp("adamp", {"betas": (0.8, 0.99)}, "float64")
    assert static == (("nesterov", False),) and traced["betas"] == (0.8, 0.99)
    traced, static = C._traced_hp("sgdp", {"lr": 0.1, "momentum": 0.9, "project_buffer": False}, "float32")
    assert static == (("nesterov", False), ("project_buffer", False))
    assert set(traced) == {"lr", "momentum", "dampening", "weight_decay", "eps", "delta", "wd_ratio"}
    keys = {C._traced_hp(o, hp, "float32")[1] for o, t in (("adamp", C.ADAMP_CASES), ("sgdp", C.SGDP_CASES))
            for hp in t.values()}
    assert len(keys) == 5  # the float32 jax.jit row's programs: AdamP's 3, SGDP's 2


def test_bundles_share_compilations_and_start_with_the_longest():
    rows = C.plan()
    bundles = C._bundles(rows)
    assert sorted(map(id, (r for b in bundles for r in b))) == sorted(map(id, rows))
    (fused,) = [b for b in bundles if b[0].expected.startswith(C.FUSED)]  # numba compiles each kernel once
    assert {(r.name, r.backend, r.dtype, r.label) for r in fused} == {
        (t, b, d, o) for d in ("float32",) for t, b, o in (
            ("adamp_torch", "torch:cpu", "defaults"), ("adamp_torch", "torch:cpu", "channels_last"),
            ("adamp_array", "numpy", "defaults"), ("adamp_array", "torch:cpu", "defaults"),
            ("adamp_torch", "torch:cpu", "caution (vs timm)"), ("adamp_array", "numpy", "caution (vs timm)"))}
    for backend in ("jax:cpu", "jax:gpu"):  # one import of JAX; the eager rows share their compiled operations
        (jax_rows,) = [b for b in bundles if b[0].backend == backend]
        assert jax_rows == [r for r in rows if r.backend == backend]
    assert all(len(b) == 1 for b in bundles if b[0].backend not in ("jax:cpu", "jax:gpu")
               and not b[0].expected.startswith(C.FUSED))
    costs = [sum(C._cost(r) for r in b) + (C._KERNELS_COST if b is fused else 0) for b in bundles]
    assert costs == sorted(costs, reverse=True)


def test_workers_share_the_references_through_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(C._SETTINGS, "refs", str(tmp_path))
    monkeypatch.setattr(C, "_REFERENCES", {})
    ref = C._reference("sgdp", "momentum", "vector1d", "float64", 3, None)
    assert [p.name for p in tmp_path.iterdir()] == ["sgdp_momentum_vector1d_float64_3_None.pickle"]
    monkeypatch.setattr(C, "_REFERENCES", {})  # another worker: reads the file, runs nothing
    monkeypatch.setattr(C, "reference_run", lambda *a, **k: pytest.fail("computed again"))
    again = C._reference("sgdp", "momentum", "vector1d", "float64", 3, None)
    assert all((a == b).all() for a, b in zip(again.params, ref.params, strict=True)) and again.views == ref.views


def test_a_missing_library_skips_without_importing_anything():
    from adamp_xp.testing.backends import Backend

    assert C._cheap_skip(Backend("numpy", "cpu")) is None
    assert C._cheap_skip(Backend("no_such_library", "cpu")) == "no_such_library is not installed (ModuleNotFoundError)"


def test_row_tolerances():
    assert C.row_tolerance("float64", 12) == 1e-12 and C.row_tolerance("float32", 30) == 1e-5
    assert C.row_tolerance("bfloat16", 12) == C.row_tolerance("bfloat16", 30) == 2**-6  # two bfloat16 ulps
    assert C.row_tolerance("float16", 30) == 2**-9


def test_path_label():
    assert C.path_label(Counter({C.FUSED: 90})) == "fused kernels"
    assert C.path_label(Counter({C.FUSED: 95, C.PER_TENSOR: 5, C.MULTI: 0})) == "fused kernels + per-tensor 5%"
    assert C.path_label(Counter({C.PER_TENSOR: 16}), jit=True) == "per-tensor (jit)"
    assert C.path_label(Counter()) == "-"


def test_the_recorder_counts_each_path_and_puts_everything_back():
    np = pytest.importorskip("numpy")
    from adamp_core import dispatch, optimizers
    from adamp_core.paths import numba_fused as fused

    step = dispatch.step
    spec = optimizers.ADAMP

    def tensors(n, shape=(4, 3)):
        return [dispatch.Tensor(np.ones(shape), np.full(shape, 0.1), spec.init(np.ones(shape))) for _ in range(n)]

    hp = spec.checked(dict(spec.defaults))
    with C.record_paths() as counts:
        dispatch.step(spec, tensors(3), hp, fused=False)  # one group of three
        dispatch.step(spec, tensors(2), hp, fused=False, foreach=False)  # one at a time
        dispatch.step(spec, tensors(2), hp)  # the kernels, where numba is
    kernels = 2 if fused.AVAILABLE else 0  # without numba the last two form a group
    assert counts == Counter({C.MULTI: 3 + 2 - kernels, C.PER_TENSOR: 2, C.FUSED: kernels})
    assert dispatch.step is step and not dispatch._OBSERVERS
