"""The fused Triton step (adamp_core.paths.triton_fused, ``fused="triton"``) against the array-API step, step by
step: under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, as CI runs it), and on a CUDA GPU
where there is one. float64 within 1e-12 and float32 within 1e-5 (normwise over the steps), 16-bit params
equal to the float32 step on their upcast rounded once (within one unit in the last place); mixed views and
decisions in one launch, long rows cut into parts, empty, 0-d, 1-d tensors and rows of length 1, extreme
magnitudes, non-finite grads with and without ``skip_nonfinite``, caution and ``project_buffer``, the
adapters, and a constant number of launches per step whatever the number of tensors.

The interpreter runs every program in Python: the sizes here are small on purpose."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed (the 'triton' extra): no Triton kernels to test")

import array_api_compat.torch as xp  # noqa: E402

from adamp_core import dispatch  # noqa: E402
from adamp_core.hyperparams import check_adamp, check_sgdp  # noqa: E402
from adamp_core.optimizers import ADAMP, SGDP  # noqa: E402
from adamp_core.paths import triton_fused  # noqa: E402
from adamp_core.projection import VIEW_CHANNEL, VIEW_LAYER, VIEW_NONE, projected_view  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
SPECS = {"adamp": ADAMP, "sgdp": SGDP}
# Shapes that take every path of the kernels in one launch: both tile shapes (narrow: many rows; wide: few
# long rows), the channel and the layer view and neither, never-projected 1-d and 0-d params, empty tensors,
# rows of length 1.
SHAPES = [(8, 3, 3, 3), (6, 10), (20, 40), (7,), (), (0, 4), (5, 1), (1, 9), (3, 600), (2, 5, 2), (4,)]
CUDA = torch.cuda.is_available()
# The interpreter evaluates both sides of every tl.where with NumPy (0/0 where a row is all zero, say).
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _amax(t):
    return float(t.detach().max()) if t.numel() else 0.0


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """CPU tensors go to Triton's interpreter (the kernels read TRITON_INTERPRET when they are built)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _hp(optimizer, nesterov=False, **extra):
    if optimizer == "adamp":
        return check_adamp(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, nesterov=nesterov, **extra)
    return check_sgdp(lr=0.1, momentum=0.9, dampening=0.0 if nesterov else 0.1, weight_decay=1e-2,
                      nesterov=nesterov, **extra)


def _state(spec, p, state_dtype=None, host_step=False):
    """A fresh state as adamp_torch keeps it (a 0-d int64 step tensor), or with a Python-int step."""
    s = spec.init(p, state_dtype=state_dtype)
    if spec.has_step:
        s = s._replace(step=0 if host_step else torch.zeros((), dtype=torch.int64, device=p.device))
    return s


def _grad(gen, w, t):
    """Grads that fire the channel view (each row orthogonal to w's), the layer view (orthogonal to w as a
    whole) and neither, in turn (as tests/test_fused.py)."""
    g = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.device)  # (a CPU generator)
    if w.ndim >= 2 and w.numel():
        wr, gr = w.reshape(w.shape[0], -1).double(), g.reshape(w.shape[0], -1)
        wr = wr / wr.abs().max()  # the direction only: w near 1e-200 or 1e150 squares out of range
        if t % 3 == 0:
            gr -= wr * ((wr * gr).sum(1, keepdim=True) / (wr * wr).sum(1, keepdim=True))
        elif t % 3 == 1:
            gr -= wr * ((wr * gr).sum() / (wr * wr).sum())
    return (g * 0.1).to(w.dtype)


def _clone_state(s):
    return type(s)(*(x.clone() if torch.is_tensor(x) else x for x in s))


class _Twin:
    """The Triton path and the array-API step on the same tensors, compared normwise over the steps."""

    def __init__(self, spec, shapes, dtype, device="cpu", seed=0, state_dtype=None, host_step=False, scale=1.0):
        self.spec, self.gen = spec, torch.Generator().manual_seed(seed)
        self.params = [(torch.randn(s, generator=self.gen, dtype=torch.float64) * scale).to(dtype).to(device)
                       for s in shapes]
        self.states = [_state(spec, p, state_dtype, host_step) for p in self.params]
        self.ref_params = [p.clone() for p in self.params]
        self.ref_states = [_clone_state(s) for s in self.states]
        self.diff: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.views: set[int] = set()
        self.plans = dispatch.Plans()  # what an adapter keeps per param group between steps

    def step(self, hp, grads, skip=False, iters=None):
        for p, g in zip(self.params, grads, strict=True):
            if p.ndim > 1 and p.numel():
                self.views.add(int(projected_view(p, g, hp.delta, hp.eps)))
        tensors = [dispatch.Tensor(p, g, s) for p, g, s in zip(self.params, grads, self.states, strict=True)]
        if iters is None:
            outcomes = dispatch.step(self.spec, tensors, hp, skip_nonfinite=skip, fused="triton", foreach=False,
                                     plans=self.plans)
        else:  # straight to the kernels, with short tiles
            entries = [triton_fused.entry(self.spec, t.param, t.grad, t.state) for t in tensors]
            ok, skips = triton_fused.step_group(self.spec, entries, hp, skip, iters=iters)
            # what the path does with a host (Python-int) count: returned advanced, in the outcome's state
            host = [type(getattr(s, "step", None)) is int for s in self.states]
            outcomes = [dispatch.Outcome("triton", state=s._replace(step=s.step + 1) if h else None,
                                         ok=None if ok is None else ok[j], skips=None if skips is None else skips[j])
                        for j, (s, h) in enumerate(zip(self.states, host, strict=True))]
        assert all(o.path == "triton" for o in outcomes), [o.path for o in outcomes]
        # what an adapter holding immutable states does: keeps the returned state where written
        self.states = [o.state if o.state is not None and (o.ok is None or bool(o.ok)) else s
                       for s, o in zip(self.states, outcomes, strict=True)]
        for i, (p, g) in enumerate(zip(self.ref_params, grads, strict=True)):
            new_p, new_s = self.spec.update(xp, p, g, self.ref_states[i], hp)
            finite = bool(torch.isfinite(g).all())
            if skip and not finite:
                new_p, new_s = p, self.ref_states[i]
            elif self.spec.has_step and not torch.is_tensor(new_s.step):
                new_s = new_s._replace(step=int(new_s.step))
            self.ref_params[i], self.ref_states[i] = new_p, new_s
            pairs = [("param", self.params[i], new_p), *zip(new_s._fields, self.states[i], new_s, strict=True)]
            for name, a, b in pairs:
                if name == "step":
                    assert int(a) == int(b), (i, int(a), int(b))
                    continue
                a, b = a.double(), b.double()
                d = torch.where((a == b) | (torch.isnan(a) & torch.isnan(b)), 0.0, (a - b).abs())  # NaN, inf alike
                self.diff[name] = max(self.diff.get(name, 0.0), _amax(torch.nan_to_num(d, nan=math.inf)))
                self.scale[name] = max(self.scale.get(name, 0.0), _amax(torch.nan_to_num(b.abs(), nan=0.0, posinf=0.0)))
        return outcomes

    def grads(self, t):
        return [_grad(self.gen, p, t) for p in self.params]

    def check(self, tol):
        for name, d in self.diff.items():
            assert d <= tol * max(self.scale[name], 1e-30), (name, d, self.scale[name])


@pytest.mark.parametrize(("optimizer", "nesterov", "dtype"), [
    ("adamp", False, torch.float64), ("adamp", True, torch.float64), ("sgdp", False, torch.float64),
    ("sgdp", True, torch.float64), ("adamp", False, torch.float32), ("sgdp", True, torch.float32)])
def test_kernels_equal_array_api_step(optimizer, nesterov, dtype):
    """Every shape of SHAPES in one launch, 3 steps: the channel view, the layer view and neither fire."""
    twin = _Twin(SPECS[optimizer], SHAPES, dtype, seed=1)
    hp = _hp(optimizer, nesterov)
    for t in range(3):
        twin.step(hp, twin.grads(t))
    twin.check(TOL[dtype])
    assert twin.views == {VIEW_CHANNEL, VIEW_LAYER, VIEW_NONE}


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_long_rows_in_parts(optimizer):
    """Tiles one block long: every row longer than a block is cut into parts that decide combines (narrow
    and wide tiles), with a host (Python-int) step count."""
    shapes = [(20, 100), (3000,), (2, 1500), (17, 33)]
    twin = _Twin(SPECS[optimizer], shapes, torch.float64, seed=2, host_step=True)
    hp = _hp(optimizer)
    for t in range(2):
        twin.step(hp, twin.grads(t), iters=1)
    twin.check(TOL[torch.float64])
    assert VIEW_CHANNEL in twin.views and VIEW_LAYER in twin.views
    if optimizer == "adamp":  # host counts: returned advanced in the outcome (the kernels advance a copy)
        assert [s.step for s in twin.states] == [2] * 4


def _ulps(a, b):
    """|a - b| in units of the last place of b's dtype (at b's magnitude)."""
    bits = {torch.bfloat16: 8, torch.float16: 11}[b.dtype]
    b64 = b.double()
    ulp = torch.exp2(torch.floor(torch.log2(b64.abs().clamp_min(torch.finfo(b.dtype).tiny))) - (bits - 1))
    return _amax((a.double() - b64).abs() / ulp)


@pytest.mark.parametrize(("dtype", "state_dtype"), [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                                    (torch.float16, None)], ids=["bf16", "bf16-f32state", "f16"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_16bit_params_are_the_float32_step_rounded_once(optimizer, dtype, state_dtype):
    """Each step from the same 16-bit inputs: the kernels' params and 16-bit state are the array-API step's
    float32 results rounded once (within one unit in the last place: a float32 sum order apart), float32
    state within 1e-5."""
    spec, hp = SPECS[optimizer], _hp(optimizer)
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 10), (16, 3, 3), (9,), ()]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    states = [_state(spec, p, state_dtype) for p in params]
    for t in range(2):
        grads = [_grad(gen, p, t) for p in params]
        refs = [spec.update(xp, p.clone(), g, _clone_state(s), hp) for p, g, s in zip(params, grads, states,
                                                                                    strict=True)]
        outcomes = dispatch.step(spec, [dispatch.Tensor(p, g, s) for p, g, s in zip(params, grads, states,
                                                                                    strict=True)], hp, fused="triton")
        assert {o.path for o in outcomes} == {"triton"}
        for p, s, (rp, rs) in zip(params, states, refs, strict=True):
            assert p.dtype == dtype and _ulps(p, rp) <= 1.0
            for name in spec.buffers:
                a, b = getattr(s, name), getattr(rs, name)
                if b.dtype == torch.float32:
                    assert _amax((a - b).abs()) <= 1e-5 * max(_amax(b.abs()), 1e-30)
                else:
                    assert _ulps(a, b) <= 1.0, name


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e19), (torch.float32, 1e-20),
                                              (torch.float64, 1e150), (torch.float64, 1e-200)],
                         ids=["f32-1e19", "f32-1e-20", "f64-1e150", "f64-1e-200"])
def test_extreme_magnitudes_stay_exact_and_finite(dtype, scale):
    """Weights whose squares leave the dtype's range: float64 sums (float32) and power-of-two row scaling
    (float64) keep the test and the projection exact, as the array-API step's scaling does."""
    twin = _Twin(ADAMP, [(8, 3, 3), (4, 50), (6,)], dtype, seed=4, scale=scale)
    hp = check_adamp(lr=1e-2, weight_decay=1e-2)
    for t in range(2):
        twin.step(hp, twin.grads(t))
    twin.check(TOL[dtype])
    assert all(bool(torch.isfinite(p).all()) for p in twin.params)
    assert VIEW_CHANNEL in twin.views


@pytest.mark.parametrize("skip", [False, True], ids=["propagate", "skip"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_nonfinite_grads(optimizer, skip):
    """A NaN and an inf grad entry: propagated as the arithmetic gives (the array-API step's NaNs, bit for
    bit where they land), or with skip_nonfinite those tensors not written at all (step count kept), the
    others stepped, the flags on the device."""
    twin = _Twin(SPECS[optimizer], [(6, 10), (7,), (4, 3)], torch.float64, seed=5)
    hp = _hp(optimizer)
    twin.step(hp, twin.grads(0), skip=skip)
    grads = twin.grads(1)
    grads[0][2, 3] = float("nan")
    grads[1][0] = float("inf")
    before = [p.clone() for p in twin.params]
    outcomes = twin.step(hp, grads, skip=skip)
    for p, r in zip(twin.params, twin.ref_params, strict=True):
        assert torch.allclose(p, r, rtol=1e-12, atol=0.0, equal_nan=True)
    if skip:
        assert [bool(o.ok) for o in outcomes] == [False, False, True]
        assert [int(o.skips) for o in outcomes] == [1, 1, 0]
        assert torch.equal(twin.params[0], before[0]) and torch.equal(twin.params[1], before[1])
        if optimizer == "adamp":
            assert [int(s.step) for s in twin.states] == [1, 1, 2]
    else:
        assert all(o.ok is None and o.skips is None for o in outcomes)
        assert bool(torch.isnan(twin.params[0]).any()) and not bool(torch.isfinite(twin.params[1]).all())


@pytest.mark.parametrize(("optimizer", "extra"), [
    ("adamp", dict(caution=True)), ("sgdp", dict(caution=True)), ("sgdp", dict(caution=True, project_buffer=False)),
    ("sgdp", dict(project_buffer=False))], ids=["adamp-caution", "sgdp-caution", "sgdp-caution-unprojected-buffer",
                                                "sgdp-unprojected-buffer"])
def test_caution_and_project_buffer(optimizer, extra):
    """timm's cautious AdamP/SGDP (two more passes) and SGDP's unprojected buffer, as the array-API step."""
    twin = _Twin(SPECS[optimizer], [(8, 3, 3, 3), (6, 10), (20, 40), (7,), (), (3, 600)], torch.float64, seed=6)
    hp = _hp(optimizer, **extra)
    with triton_fused.counting() as counts:
        for t in range(3):
            twin.step(hp, twin.grads(t))
    twin.check(TOL[torch.float64])
    assert counts.launches == 3 * (5 if extra.get("caution") else 3)


def test_channels_last_params_are_taken():
    """A 4-d param, its grad and state in channels_last memory (rows stay contiguous blocks)."""
    p = torch.randn(8, 4, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    s = _state(ADAMP, p)
    assert s.exp_avg.stride() == p.stride()
    ref_p, ref_s = p.clone(), _clone_state(s)
    gen = torch.Generator().manual_seed(7)
    hp = _hp("adamp")
    for t in range(2):
        g = _grad(gen, p, t).contiguous(memory_format=torch.channels_last)
        (o,) = dispatch.step(ADAMP, [dispatch.Tensor(p, g, s)], hp, fused="triton")
        assert o.path == "triton"
        ref_p, ref_s = ADAMP.update(xp, ref_p, g, ref_s, hp)
    assert float((p - ref_p).abs().max()) <= 1e-12 * float(ref_p.abs().max())


@pytest.mark.parametrize("count", [10, 200])
def test_launches_per_step_are_constant(count):
    """One launch set per dtype group whatever the number of tensors: 3 kernels (stats, decide, update), and
    no upload once the layout and the addresses are known; two dtype groups: twice that."""
    shapes = [((i % 7) + 1, 3) if i % 3 else ((i % 5) + 1,) for i in range(count)]
    twin = _Twin(ADAMP, shapes, torch.float32, seed=8)
    hp = _hp("adamp")
    grads = twin.grads(0)
    with triton_fused.counting() as first:
        twin.step(hp, grads)
    assert first.launches == 3 and first.uploads <= 3  # tables: the layout (2) and the addresses (1)
    if count <= 10:  # (the interpreter takes seconds for each step of 200 tensors)
        with triton_fused.counting() as again:
            twin.step(hp, grads)
        assert again.launches == 3 and again.uploads == 0  # the same tensors: nothing to upload
    twin.check(TOL[torch.float32])
    mixed = [torch.zeros(3, 2, dtype=d) for d in (torch.float32, torch.float64)]
    with triton_fused.counting() as two:
        dispatch.step(ADAMP, [dispatch.Tensor(p, torch.ones_like(p), _state(ADAMP, p)) for p in mixed], hp,
                      fused="triton")
    assert two.launches == 6


def _maximize_and_skip(adamp_torch, optimizer, dtype, state_dtype):
    torch.manual_seed(9)
    shapes = [(8, 3, 3, 3), (6, 10), (7,), ()]
    base = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    cls = adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP
    kw = dict(lr=1e-2, weight_decay=1e-2, maximize=True, skip_nonfinite=True, state_dtype=state_dtype)
    if optimizer == "sgdp":
        kw.update(momentum=0.9, nesterov=True)
    ours = [torch.nn.Parameter(b.clone()) for b in base]
    ref = [torch.nn.Parameter(b.clone()) for b in base]
    a, b = cls(ours, fused="triton", **kw), cls(ref, fused=False, foreach=False, **kw)
    for t in range(3):
        for p, q in zip(ours, ref, strict=True):
            g = _grad(torch.Generator().manual_seed(t), p.detach(), t)
            if t == 1 and p.ndim == 2:
                g[0, 0] = float("nan")
            p.grad, q.grad = g.clone(), g.clone()
        with triton_fused.counting() as counts:
            a.step()
        b.step()
        assert counts.launches == 3
    return a, b, ours, ref


@pytest.mark.parametrize(("optimizer", "dtype", "state_dtype"), [
    ("adamp", torch.float32, None), ("sgdp", torch.float64, None), ("adamp", torch.bfloat16, torch.float32)],
    ids=["adamp-f32", "sgdp-f64", "adamp-bf16-f32state"])
def test_torch_adapter(optimizer, dtype, state_dtype):
    """adamp_torch.AdamP/SGDP(fused="triton") with maximize, skip_nonfinite and state_dtype, three steps:
    the same params, state, step counts and skip counters as the per-tensor array-API step."""
    adamp_torch = pytest.importorskip("adamp_torch")
    a, b, ours, ref = _maximize_and_skip(adamp_torch, optimizer, dtype, state_dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-7}[dtype]
    for p, q in zip(ours, ref, strict=True):
        assert _amax((p.double() - q.double()).abs()) <= tol * max(_amax(q.double().abs()),
                                                                                  1e-30)
        sa, sb = a.state[p], b.state[q]
        assert int(sa["nonfinite_skips"]) == int(sb["nonfinite_skips"])
        if optimizer == "adamp":
            assert sa["step"].dtype == torch.int64 and int(sa["step"]) == int(sb["step"])
            assert sa["exp_avg"].dtype == (state_dtype or dtype)
    assert sum(int(a.state[p]["nonfinite_skips"]) for p in ours) == 1


def test_array_adapter_with_torch_tensors():
    """adamp_array over torch tensors (host step counts): the kernels write in place, the adapter advances."""
    adamp_array = pytest.importorskip("adamp_array")
    torch.manual_seed(10)
    base = [torch.randn(6, 10, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    ours, ref = [b.clone() for b in base], [b.clone() for b in base]
    a = adamp_array.AdamP(ours, lr=1e-2, weight_decay=1e-2, fused="triton")
    b = adamp_array.AdamP(ref, lr=1e-2, weight_decay=1e-2, fused=False, foreach=False)
    for t in range(2):
        grads = [_grad(torch.Generator().manual_seed(t), p, t) for p in base]
        a.step(grads)
        b.step([g.clone() for g in grads])
    for p, q in zip(a.params, b.params, strict=True):
        assert float((p - q).abs().max()) <= 1e-12 * float(q.abs().max())
    assert a.params[0] is ours[0]  # written in place
    assert a.state_dict()["state"][0]["step"] == 2


def test_what_the_kernels_do_not_take_falls_through(monkeypatch):
    """Outside the interpreter CPU tensors, array hyperparameters, unequal strides, NumPy arrays, tensors the
    adapter marks alone: the paths of fused=None, exactly as without the option."""
    p = torch.randn(6, 10, dtype=torch.float64)
    g = torch.randn(6, 10, dtype=torch.float64)
    hp = _hp("adamp")

    def how(tensors, hp=hp):
        return [o.path for o in dispatch.step(ADAMP, tensors, hp, fused="triton", foreach=False)]

    assert how([dispatch.Tensor(p.clone(), g, _state(ADAMP, p))]) == ["triton"]
    assert how([dispatch.Tensor(p.clone(), g, _state(ADAMP, p), alone=True)]) in (["numba"], ["per_tensor"])
    assert how([dispatch.Tensor(p.clone(), g.t().contiguous().t(), _state(ADAMP, p))])[0] != "triton"
    assert how([dispatch.Tensor(p.clone(), g, _state(ADAMP, p))], hp._replace(lr=torch.tensor(1e-2)))[0] \
        != "triton"
    n = p.numpy().copy()
    assert how([dispatch.Tensor(n, g.numpy(), ADAMP.init(n))])[0] != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert how([dispatch.Tensor(p.clone(), g, _state(ADAMP, p))])[0] != "triton"


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_fused, "AVAILABLE", False)
    with pytest.raises(ValueError, match=r"Invalid fused value: 'triton' \(the Triton kernels need triton"):
        triton_fused.check_available()
    with pytest.raises(ValueError, match="Invalid iters: 0"):
        triton_fused.step_group(ADAMP, [], _hp("adamp"), iters=0)


def test_kernels_compile_ahead_of_time_for_sm90():
    """The kernels as the GPU gets them (not the interpreter's Python) compile for an H100/H200 (sm_90)
    here, without a GPU: Triton's own compiler and ptxas. One variant: AdamP, float32, caution."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - another Triton layout
        pytest.skip(f"this Triton cannot compile ahead of time here: {exc}")
    import triton.language as tl

    k = triton_fused._kernels(False)
    bits = {n: "i64" for n in ("lr_b", "mom_b", "c1_b", "b2_b", "c2_b", "lb1_b", "lb2_b", "eps_b", "wd_b", "delta_b",
                               "ratio_b", "mu_b")}
    tile = dict(OPT=0, NESTEROV=False, WK=0, S1K=0, S2K=0, CDT=tl.float32)
    cases = [
        (k.stats, ["tiles", "meta", "ptrs", "parts", "lr_b", "mom_b", "c1_b", "b2_b", "c2_b", "lb1_b", "lb2_b",
                   "eps_b"], tile),
        (k.decide, ["meta", "ptrs", "parts", "coef", "scal", "okout", "skipout", "lr_b", "wd_b", "delta_b", "ratio_b",
                    "eps_b", "lb1_b", "lb2_b", "mu_b"], dict(OPT=0, SKIP=True, CDT=tl.float32, RB=128)),
        (k.update, ["tiles", "meta", "ptrs", "coef", "scal", "mom_b", "c1_b", "b2_b", "c2_b", "eps_b"],
         dict(STORE_Q=False, CAUTION=True, **tile)),
    ]
    kinds = {"tiles": "*i64", "meta": "*i64", "ptrs": "*i64", "okout": "*i1", "skipout": "*i64", **bits}
    for fn, args, consts in cases:
        sig = {a: kinds.get(a, "*fp64") for a in args} | {c: "constexpr" for c in consts}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=4, enable_fp_fusion=False))
        except (RuntimeError, FileNotFoundError) as exc:
            if "ptxas" in str(exc) or "backend" in str(exc).lower():  # pragma: no cover - no CUDA backend files
                pytest.skip(f"no CUDA compiler in this Triton: {exc}")
            raise
        assert compiled.asm["cubin"]


def test_cupy_arrays_through_dlpack():  # pragma: no cover - needs CuPy and a GPU
    """adamp_array over CuPy arrays with fused="triton": the kernels write the CuPy memory (DLPack, zero copy)."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed: the DLPack path needs a GPU")
    if not CUDA or not cupy.is_available():
        pytest.skip("no CUDA device for CuPy and torch")
    adamp_array = pytest.importorskip("adamp_array")
    rng = np.random.default_rng(11)
    base = [rng.standard_normal((6, 10)), rng.standard_normal(5)]
    ours = [cupy.asarray(b) for b in base]
    ref = [cupy.asarray(b) for b in base]
    a = adamp_array.AdamP(ours, lr=1e-2, weight_decay=1e-2, fused="triton")
    b = adamp_array.AdamP(ref, lr=1e-2, weight_decay=1e-2, fused=False, foreach=False)
    with triton_fused.counting() as counts:
        for _ in range(2):
            grads = [cupy.asarray(rng.standard_normal(x.shape)) for x in base]
            a.step(grads)
            b.step([g.copy() for g in grads])
    assert counts.launches == 6
    for p, q in zip(a.params, b.params, strict=True):
        assert float(cupy.abs(p - q).max()) <= 1e-12 * float(cupy.abs(q).max())


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cuda_kernels_equal_array_api_step(dtype, monkeypatch):  # pragma: no cover - needs a GPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if dtype == torch.bfloat16:
        twin = _Twin(ADAMP, SHAPES, dtype, device="cuda", seed=12, state_dtype=torch.float32)
        hp = _hp("adamp")
        outcomes = twin.step(hp, twin.grads(0))
        assert {o.path for o in outcomes} == {"triton"}
        for p, r in zip(twin.params, twin.ref_params, strict=True):
            assert _ulps(p, r) <= 1.0
        return
    for optimizer in ("adamp", "sgdp"):
        twin = _Twin(SPECS[optimizer], SHAPES, dtype, device="cuda", seed=12)
        hp = _hp(optimizer, caution=True)
        for t in range(3):
            twin.step(hp, twin.grads(t))
        twin.check(TOL[dtype])


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_graph_capture_replays_to_the_same_result(monkeypatch):  # pragma: no cover - needs a GPU
    """optimizer.step() captured in a CUDA graph with static grads (no host sync in a step, no upload once
    the tables are known): replaying it gives what eager steps give."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    adamp_torch = pytest.importorskip("adamp_torch")
    torch.manual_seed(13)
    shapes = [(64, 32, 3, 3), (128, 64), (64,), (1000, 16)]
    base = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") * 0.01 for s in shapes]
    graphed = [torch.nn.Parameter(b.clone()) for b in base]
    eager = [torch.nn.Parameter(b.clone()) for b in base]
    for ps in (graphed, eager):
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
    a = adamp_torch.AdamP(graphed, lr=1e-2, weight_decay=1e-2, fused="triton")
    b = adamp_torch.AdamP(eager, lr=1e-2, weight_decay=1e-2, fused="triton")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compile, build the tables
            a.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a.step()
    for _ in range(3):
        b.step()
    for _ in range(5):
        graph.replay()
    for _ in range(5):
        b.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed, eager, strict=True):
        assert torch.equal(p, q)
    assert int(a.state[graphed[0]]["step"]) == int(b.state[eager[0]]["step"]) == 8



def test_bench_counts_the_launches(tmp_path, monkeypatch, capsys):
    """``adamp-xp bench --launches`` (README Speed) on a small workload: 3 Triton launches, nothing else."""
    import json

    from adamp_xp.bench import runners
    from adamp_xp.cli import main

    monkeypatch.setitem(runners.INTERPRETER_ROWS, "allowed", False)  # restored after the command sets it
    out = tmp_path / "launches.json"
    assert main(["bench", "--launches", "--workload", "transformer", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert (row["n_tensors"], row["triton_launches"], row["uploads"], row["torch_ops"]) == (12, 3, 0, 0)
    assert "| transformer | adamp | 12 | 3 | 0 | 0 | 3 |" in capsys.readouterr().out
