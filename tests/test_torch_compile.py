"""``torch.compile(optimizer.step)`` on every setting (issue 24), compiled from the very first step, defaults
included: the compiled step equals the eager one (float64 within 1e-12, float32 within 1e-5, relative), at most
two graphs per param group, no graph break in our code, and no frame compiled again over 20 warm steps (with a
constant float lr, and with a 0-d tensor lr that a scheduler changes).

Most tests use a counting backend (dynamo's graph run as it is); ``aot_eager`` and inductor each in one
small test (inductor builds C++: slow on a shared CPU).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import adamp_torch  # noqa: E402
from adamp_core.paths import numba_fused, triton_fused  # noqa: E402

KW = {"adamp": dict(lr=1e-2, weight_decay=0.1), "sgdp": dict(lr=0.05, momentum=0.9, weight_decay=1e-2)}
CLASSES = {"adamp": adamp_torch.AdamP, "sgdp": adamp_torch.SGDP}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
WARM = 20  # warm steps with error_on_recompile

# (id, options): every path and option a compiled step may take
SETTINGS = {
    "defaults": {},
    "fused=False": dict(fused=False),
    "fused=True": dict(fused=True),
    "foreach=True": dict(foreach=True),
    "foreach=False": dict(foreach=False),
    "fused=False,foreach=True": dict(fused=False, foreach=True),
    "fused=False,foreach=False": dict(fused=False, foreach=False),
    "caution": dict(caution=True),
    "nesterov": dict(nesterov=True),
    "skip_nonfinite": dict(skip_nonfinite=True),
    "maximize": dict(maximize=True),
    "no weight_decay": dict(weight_decay=0.0),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # profiler notices
        yield
    torch._dynamo.reset()


def _net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5)).to(dtype)


def _groups(net, **kw):
    """Two param groups (decay on the weights, none on biases and norms), as training recipes do."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    return [dict(params=decay), dict(params=rest, weight_decay=0.0)]


def _batches(n, dtype, nonfinite_at=None):
    gen = torch.Generator().manual_seed(1)
    out = [(torch.randn(8, 3, 6, 6, generator=gen, dtype=dtype), torch.randint(0, 5, (8,), generator=gen))
           for _ in range(n)]
    if nonfinite_at is not None:
        x, y = out[nonfinite_at]
        out[nonfinite_at] = (x.clone().fill_(float("inf")), y)
    return out


class Graphs:
    """A dynamo backend that counts the graphs it is given and runs each as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _run_pair(optimizer, options, dtype, *, backend=None, steps=6, warm=WARM, tensor_lr=False, scheduler=False,
              nonfinite_at=None):
    """An eager and a compiled optimizer (compiled from the first step) on two copies of one net; returns
    (eager net, compiled net, eager opt, compiled opt, graphs, frames compiled during the warm steps)."""
    kw = {**KW[optimizer], **options}
    nets = [_net(dtype), _net(dtype)]
    opts = []
    for n in nets:
        lr = torch.tensor(kw["lr"], dtype=torch.float64) if tensor_lr else kw["lr"]
        opts.append(CLASSES[optimizer](_groups(n), **{**kw, "lr": lr}))
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in opts] if scheduler else []
    graphs = Graphs()
    compiled = torch.compile(opts[1].step, backend=backend or graphs)
    batches = _batches(steps + warm, dtype, nonfinite_at)
    frames = None
    with contextlib.ExitStack() as stack:  # error_on_recompile is undone however the loop ends
        for k, (x, y) in enumerate(batches):
            if k == steps:  # warm: nothing may compile again from here on
                frames = counters["stats"]["unique_graphs"]
                stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
            for n, o, step in ((nets[0], opts[0], opts[0].step), (nets[1], opts[1], compiled)):
                o.zero_grad()
                F.cross_entropy(n(x), y).backward()
                step()
            for s in scheds:
                s.step()
    new_frames = counters["stats"]["unique_graphs"] - (frames or 0)
    return nets, opts, graphs.graphs, new_frames


def _assert_equal(nets, opts, dtype):
    tol = TOL[dtype]
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        scale = p.abs().max().clamp_min(1e-30)
        assert ((p - q).abs().max() / scale).item() <= tol
        for k, v in opts[0].state[p].items():
            w = opts[1].state[q][k]
            if v.dtype.is_floating_point:
                assert ((v - w).abs().max() / v.abs().max().clamp_min(1e-30)).item() <= tol, k
            else:
                assert torch.equal(v, w), k


def _breaks():
    """Graph breaks other than torch.optim's own two (``_use_grad_for_differentiable``, ours mirrors it), and
    whatever dynamo could not trace (a frame it gives up runs eagerly at every call, counted apart)."""
    breaks = {k: v for k, v in counters["graph_break"].items() if "torch._dynamo.graph_break()" not in k}
    return breaks | dict(counters["unimplemented"])


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_compiled_step_equals_eager_without_recompiles(optimizer, setting):
    options = SETTINGS[setting]
    if options.get("fused") is True and not numba_fused.AVAILABLE:
        pytest.skip("numba is not installed")
    nonfinite_at = 2 if options.get("skip_nonfinite") else None
    nets, opts, graphs, new_frames = _run_pair(optimizer, options, torch.float64, nonfinite_at=nonfinite_at)
    assert new_frames == 0
    assert 1 <= len(graphs) <= 2 * len(opts[1].param_groups)
    assert not _breaks()
    ops = [str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"]
    kernel = numba_fused.AVAILABLE and options.get("fused") is not False
    # on a CPU the compiled step calls the numba kernels as one operator per dtype, else the array-API maths
    assert (ops.count("adamp_xp.numba_step.default") == len(opts[1].param_groups)) if kernel else len(ops) > 20
    _assert_equal(nets, opts, torch.float64)
    if nonfinite_at is not None:
        counts = [int(opts[1].state[p]["nonfinite_skips"]) for p in nets[1].parameters()]
        assert counts == [int(opts[0].state[p]["nonfinite_skips"]) for p in nets[0].parameters()]
        assert max(counts) == 1


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_tensor_lr_with_a_scheduler_compiles_once(optimizer):
    """A 0-d tensor lr changed by a scheduler every 3 steps: a graph input, nothing compiled again."""
    nets, opts, graphs, new_frames = _run_pair(optimizer, {}, torch.float64, tensor_lr=True, scheduler=True)
    assert new_frames == 0
    assert len(graphs) <= 2 * len(opts[1].param_groups)
    assert torch.is_tensor(opts[1].param_groups[0]["lr"])
    assert opts[1].param_groups[0]["lr"].item() < KW[optimizer]["lr"] / 2**5  # the schedule did run
    _assert_equal(nets, opts, torch.float64)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_float32_compiled_equals_eager(optimizer):
    nets, opts, graphs, new_frames = _run_pair(optimizer, {}, torch.float32, warm=4)
    assert new_frames == 0
    _assert_equal(nets, opts, torch.float32)


def test_aot_eager_backend():
    """Through AOTAutograd (functionalization, the in-place epilogue), as inductor sees the graph."""
    nets, opts, _, new_frames = _run_pair("adamp", dict(caution=True), torch.float64, backend="aot_eager", warm=3)
    assert new_frames == 0
    assert not _breaks()
    _assert_equal(nets, opts, torch.float64)


def test_a_float_lr_changed_by_a_scheduler_recompiles_as_torch_optim_does():
    """A Python-float lr is a constant of the graph (as in torch.optim): a new value compiles again; README
    recommends a 0-d tensor lr with a scheduler."""
    with pytest.raises(Exception, match="[Rr]ecompil"):
        _run_pair("adamp", {}, torch.float64, scheduler=True, steps=1, warm=4)


def test_a_param_listed_twice_steps_eagerly_inside_the_compiled_step():
    """A group listing a param twice (stepped twice, as adamp 0.3.0) takes the eager step through a graph
    break; the result is the eager optimizer's."""
    gen = torch.Generator().manual_seed(0)
    ps = [[nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))] for _ in range(2)]
    ps[1][0].data.copy_(ps[0][0].data)
    opts = [adamp_torch.AdamP([p[0], p[0]], lr=0.01) for p in ps]
    compiled = torch.compile(opts[1].step, backend=Graphs())
    for _ in range(3):
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        for p, step in ((ps[0][0], opts[0].step), (ps[1][0], compiled)):
            p.grad = g.clone()
            step()
    assert torch.equal(ps[0][0], ps[1][0])
    assert int(opts[1].state[ps[1][0]]["step"]) == 6


def test_the_kernel_operator_hands_out_of_range_tensors_to_the_array_api_step():
    """float64 params whose row sums of squares leave the kernels' range: the operator steps them with the
    per-tensor step inside, as the eager path does; compiled equals eager."""
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, generator=gen, dtype=torch.float64) * 1e300, torch.randn(5, generator=gen,
                                                                                       dtype=torch.float64)]
    ps = [[nn.Parameter(d.clone()) for d in data] for _ in range(2)]
    opts = [adamp_torch.AdamP(p, lr=0.01, weight_decay=0.1) for p in ps]
    graphs = Graphs()
    compiled = torch.compile(opts[1].step, backend=graphs)
    for _ in range(3):
        gs = [torch.randn(d.shape, generator=gen, dtype=torch.float64) for d in data]
        for p, step in ((ps[0], opts[0].step), (ps[1], compiled)):
            for q, g in zip(p, gs, strict=True):
                q.grad = g.clone()
            step()
    assert "numba_step" in graphs.graphs[0].code
    for a, b in zip(*ps, strict=True):
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-12


# -- capturable (torch's name and meaning) ------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_capturable_is_saved_and_old_checkpoints_load_without_it(optimizer):
    cls = CLASSES[optimizer]
    net = _net(torch.float64)
    opt = cls(net.parameters(), **KW[optimizer], capturable=True)
    assert opt.param_groups[0]["capturable"] is True
    x, y = _batches(1, torch.float64)[0]
    F.cross_entropy(net(x), y).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["capturable"] is True
    for g in sd["param_groups"]:  # a checkpoint of an older version (or of adamp 0.3.0's keys and ours)
        del g["capturable"]
    fresh = cls(net.parameters(), **KW[optimizer])
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["capturable"] is False
    if optimizer == "adamp":
        p = next(net.parameters())
        assert fresh.state[p]["step"].device == p.device and fresh.state[p]["step"].dtype == torch.int64


@pytest.mark.parametrize("bad", [1, None, "yes"])
def test_capturable_must_be_a_bool(bad):
    with pytest.raises(TypeError, match=rf"^Invalid capturable value: {bad!r} \(expected True or False\)$"):
        adamp_torch.AdamP([nn.Parameter(torch.ones(2, 2))], capturable=bad)


def test_capturable_refuses_a_host_tensor_lr_beside_device_params_before_any_write():
    """A CPU 0-d lr beside params on another device (here "meta", standing for a GPU) would be read on the host
    at every launch, and a CUDA graph would keep its value at capture: refused, naming it, nothing written."""
    p = nn.Parameter(torch.ones(3, 2, device="meta"))
    p.grad = torch.ones(3, 2, device="meta")
    opt = adamp_torch.AdamP([p], lr=torch.tensor(0.01), capturable=True)
    with pytest.raises(ValueError, match=r"Invalid learning rate: a tensor on cpu with capturable=True and params"
                                         r" on meta .*\(param_groups\[0\]\)"):
        opt.step()
    assert len(opt.state[p]) == 0


# -- the Triton kernels as a torch operator (CPU tensors under Triton's interpreter) -------------------------
TRITON = {"fused=triton": {}, "fused=triton,skip_nonfinite,caution": dict(skip_nonfinite=True, caution=True),
          "fused=triton,nesterov,maximize": dict(nesterov=True, maximize=True)}


@pytest.mark.parametrize("setting", list(TRITON))
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_compiled_triton_step_calls_the_kernels_as_an_operator(optimizer, setting, monkeypatch):
    """fused="triton": the compiled step calls torch.ops.adamp_xp.triton_step once per launch set (an opaque
    operator, run here by Triton's interpreter on CPU tensors: on a GPU the same node launches the kernels and
    a CUDA graph captures them, scripts/gpu_capture_check.py); equal to the eager Triton step, bit for bit."""
    if not triton_fused.AVAILABLE:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    options = {"fused": "triton", **TRITON[setting]}
    nonfinite_at = 2 if options.get("skip_nonfinite") else None
    nets, opts, graphs, new_frames = _run_pair(optimizer, options, torch.float32, steps=4, warm=3,
                                               nonfinite_at=nonfinite_at)
    assert new_frames == 0
    assert not _breaks()
    ops = [str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"]
    assert ops.count("adamp_xp.triton_step.default") == len(opts[1].param_groups)
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(p, q)
        for k, v in opts[0].state[p].items():
            assert torch.equal(v, opts[1].state[q][k]), k


# -- inductor (slow on a shared CPU: one small case each way) -------------------------------------------------
@pytest.mark.parametrize("fused", [None, False], ids=["numba-operator", "inductor-maths"])
def test_inductor_compiled_step_equals_eager(fused):
    """backend="inductor": the default CPU step (the numba operator, which inductor calls in place) and
    fused=False (inductor's own C++ for the array-API maths), on a conv weight and a bias, float32."""
    if fused is None and not numba_fused.AVAILABLE:
        pytest.skip("numba is not installed")
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 3, 3, generator=gen), torch.randn(4, generator=gen)]
    ps = [[nn.Parameter(d.clone()) for d in data] for _ in range(2)]
    opts = [adamp_torch.AdamP(p, lr=0.01, weight_decay=0.1, fused=fused) for p in ps]
    compiled = torch.compile(opts[1].step, backend="inductor")
    for k in range(5):
        gs = [torch.randn(d.shape, generator=gen) for d in data]
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            for p, step in ((ps[0], opts[0].step), (ps[1], compiled)):
                for q, g in zip(p, gs, strict=True):
                    q.grad = g.clone()
                step()
    for a, b in zip(*ps, strict=True):
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5
    assert int(opts[1].state[ps[1][0]]["step"]) == 5


def test_bench_compiled_rows():
    """adamp_xp.bench.compiled: every row, one run (dynamo's eager backend, the small workload: the table's
    shape, not its times)."""
    from adamp_xp.bench import compiled

    rows = compiled.run("small", ("adamp", "sgdp"), steps=1, repeats=1, backend="eager", scale=0.01)
    assert [r.name for r in rows][:3] == ["AdamP() compiled", "AdamP(fused=False) compiled",
                                          "AdamW(foreach=True) compiled"]
    assert len(rows) == 10 and all(r.step_ms > 0 for r in rows)
    assert all((r.compile_s is not None) == r.compiled for r in rows)
    assert "ms/step" in compiled.format_rows(rows)


def test_diagnostics_inside_a_compiled_step_are_recorded_by_the_eager_step():
    """record_diagnostics() on: the group steps eagerly behind a graph break, and the records are those of the
    eager optimizer."""
    gen = torch.Generator().manual_seed(0)
    ps = [[nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))] for _ in range(2)]
    ps[1][0].data.copy_(ps[0][0].data)
    opts = [adamp_torch.AdamP(p, lr=0.01) for p in ps]
    for o in opts:
        o.record_diagnostics()
    compiled = torch.compile(opts[1].step, backend=Graphs())
    for _ in range(2):
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        for p, step in ((ps[0][0], opts[0].step), (ps[1][0], compiled)):
            p.grad = g.clone()
            step()
    assert torch.equal(ps[0][0], ps[1][0])
    a, b = opts[0].diagnostics[ps[0][0]], opts[1].diagnostics[ps[1][0]]
    assert all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(a, b, strict=True))


_WHOLE_GRAPH = """
import cProfile, pstats, warnings
import torch
from torch._dynamo.utils import counters
import adamp_torch
warnings.simplefilter("ignore")
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(8, 4, 3, 3)), torch.nn.Parameter(torch.randn(8))]
for p in params:
    p.grad = torch.randn_like(p)
kw = dict(lr=0.01, fused={fused})
opt = adamp_torch.SGDP(params, momentum=0.9, **kw) if "{cls}" == "SGDP" else adamp_torch.AdamP(params, **kw)
step = torch.compile(opt.step)
for _ in range(2):
    step()
prof = cProfile.Profile()
prof.enable()
for _ in range(3):
    step()
prof.disable()
ours = sorted({{f"{{f[0].split('/')[-2]}}/{{f[0].split('/')[-1]}}:{{f[2]}}" for f in pstats.Stats(prof).stats
                if "/adapters/" in f[0] or "/adamp_core/" in f[0]}})
print("UNIMPLEMENTED", len(counters["unimplemented"]))
print("OURS", ours)
"""


@pytest.mark.parametrize("cls,fused", [("AdamP", None), ("SGDP", None), ("AdamP", False)])
def test_warm_compiled_step_runs_no_python_of_ours_but_the_kernels(cls, fused):
    """In a fresh process (nothing computed or imported lazily before the first compiled step): dynamo traces the
    whole step, and a warm compiled step runs no function of the core or the adapter but the numba path the
    operator calls (``fused=False``: none). Two things made dynamo give the step's frame up and run it, with the
    dispatcher and the checks, eagerly at every call: Python 3.11's cached_property (on the spec) takes a lock,
    and the array namespace was imported on first use (now resolved by ``dispatch.prepare_traced``)."""
    import ast
    import subprocess
    import sys

    if fused is None and not numba_fused.AVAILABLE:
        pytest.skip("numba is not installed")
    out = subprocess.run([sys.executable, "-c", _WHOLE_GRAPH.format(cls=cls, fused=fused)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("UNIMPLEMENTED", "OURS")))
    assert lines["UNIMPLEMENTED"] == "0"
    ours = ast.literal_eval(lines["OURS"])
    # the operator's body (the numba path: plan, launches, counts) and the compiled frame of step(); never
    # _traced_step, _init_group, the checks or the dispatcher
    allowed = ("paths/_torch_ops.py:", "paths/numba_fused.py:", "paths/_numba_kernels.py:", "paths/__init__.py:",
               "adamp_core/_common.py:host_bias_correction", "adamp_torch/_base.py:step")
    if fused is False:  # inductor's code: the step's frame only
        assert ours == ["adamp_torch/_base.py:step"], ours
        return
    assert any(f.startswith("paths/_torch_ops.py:") for f in ours), ours
    assert all(f.startswith(allowed) for f in ours), [f for f in ours if not f.startswith(allowed)]
