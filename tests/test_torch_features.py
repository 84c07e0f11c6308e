"""adamp_torch beyond the plain float64 run: 16-bit params (with float32 state), memory formats,
non-contiguous params, maximize, tensor lr, torch.compile, bad input and atomicity.

The oracle is still adamp==0.3.0: 16-bit steps are compared one step at a time with the official
optimizer run in float32 from our own current param and state.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_torch_adapter import (
    DEVICES,
    TOL,
    classes,
    groups,
    loss_of,
    make_batches,
    make_net,
    state_error,
    train,
    traj_error,
)
from torch import nn

import adamp_torch
from adamp_xp.testing.oracle import make_grad

adamp = pytest.importorskip("adamp", reason="the oracle adamp==0.3.0 is not installed")

F64 = torch.float64
KW = {"adamp": dict(lr=1e-2, weight_decay=0.1), "sgdp": dict(lr=0.05, momentum=0.9, weight_decay=1e-2)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- 16-bit params ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_half_params_with_float32_state_match_official_step_by_step(optimizer, dtype, device):
    """Each step of ours (16-bit param, float32 state) equals one official float32 step taken from
    our current param and state, rounded to the param dtype (within one 16-bit ulp)."""
    ours_cls, ref_cls = classes(optimizer)
    kw = KW[optimizer]
    rng = np.random.default_rng(0)
    shapes = [(6, 3, 3, 3), (5, 12), (7,)]
    params = [nn.Parameter(torch.from_numpy(rng.standard_normal(s)).to(device, dtype)) for s in shapes]
    opt = ours_cls(params, state_dtype=torch.float32, **kw)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for t in range(9):
        refs = []
        for p in params:
            g = make_grad(p.detach().double().cpu().numpy(), ("channel", "layer", "none")[t % 3], rng)
            p.grad = torch.from_numpy(g).to(device, dtype)
            q = nn.Parameter(p.detach().float().cpu().clone())
            q.grad = p.grad.float().cpu()
            ref = ref_cls([q], **kw)
            if opt.state[p]:
                ref.state[q] = {
                    k: (int(v) if k == "step" else v.detach().cpu().clone()) for k, v in opt.state[p].items()
                }
            ref.step()
            refs.append((q, ref.state[q]))
        opt.step()
        for p, (q, ref_state) in zip(params, refs, strict=True):
            assert p.dtype == dtype
            expect = q.detach().to(dtype).float()
            # one ulp of the 16-bit format at the value's magnitude
            torch.testing.assert_close(p.detach().float().cpu(), expect, rtol=ulp, atol=ulp * 1e-3)
            for k, v in ref_state.items():
                if k == "step":
                    assert int(opt.state[p][k]) == v
                else:
                    assert opt.state[p][k].dtype == torch.float32
                    torch.testing.assert_close(opt.state[p][k].cpu(), v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_half_params_default_state_dtype_is_the_params(optimizer):
    ours_cls, _ = classes(optimizer)
    net = make_net(torch.bfloat16)
    opt = ours_cls(net.parameters(), **KW[optimizer])
    train(net, opt, make_batches(2, dtype=torch.bfloat16))
    for p in net.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert all(v.dtype == torch.bfloat16 for k, v in opt.state[p].items() if k != "step")


def test_float32_state_survives_save_and_load():
    """torch's load_state_dict casts state to the param dtype; with state_dtype=float32 we keep the
    saved float32 values exactly (and upcast a bf16 state saved without state_dtype)."""
    net = make_net(torch.bfloat16)
    opt = adamp_torch.AdamP(net.parameters(), state_dtype="float32")
    train(net, opt, make_batches(3, dtype=torch.bfloat16))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = adamp_torch.AdamP(net.parameters(), state_dtype=torch.float32)
    opt2.load_state_dict(torch.load(buf))
    for p in net.parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][k].dtype == torch.float32
            assert torch.equal(opt2.state[p][k], opt.state[p][k])
            assert opt2.state[p][k].data_ptr() != opt.state[p][k].data_ptr()
    # A checkpoint of adamp 0.3.0 (bf16 state, no state_dtype key): our group keeps float32.
    official = adamp.AdamP(net.parameters())
    train(net, official, make_batches(2, dtype=torch.bfloat16))
    opt3 = adamp_torch.AdamP(net.parameters(), state_dtype=torch.float32)
    opt3.load_state_dict(official.state_dict())
    assert opt3.param_groups[0]["state_dtype"] == torch.float32
    for p in net.parameters():
        assert opt3.state[p]["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(opt3.state[p]["exp_avg_sq"], official.state[p]["exp_avg_sq"].float())


# -- memory formats ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_channels_last_matches_official_and_keeps_format(optimizer, device):
    ours_cls, ref_cls = classes(optimizer)
    kw = KW[optimizer]
    net_ref = make_net()
    net = copy.deepcopy(net_ref).to(device=device, memory_format=torch.channels_last)
    convs = [p for p in net.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    ptrs = [p.data_ptr() for p in net.parameters()]
    opt_ref, opt = ref_cls(groups(net_ref, kw["lr"]), **kw), ours_cls(groups(net, kw["lr"]), **kw)
    batches = make_batches(12)
    ref = train(net_ref, opt_ref, batches)
    ours = train(
        net, opt, [(x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)) for x, y in batches]
    )
    assert traj_error(ours, ref) <= TOL
    assert state_error(opt, opt_ref, net, net_ref) <= TOL
    assert [p.data_ptr() for p in net.parameters()] == ptrs
    for p in convs:
        assert p.is_contiguous(memory_format=torch.channels_last)
        for k, v in opt.state[p].items():
            if k != "step":
                assert v.is_contiguous(memory_format=torch.channels_last), k


class _Strided(nn.Module):
    """A transposed param and a non-dense strided view of a larger tensor."""

    def __init__(self, contiguous=False):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.t = nn.Parameter(torch.randn(6, 5, generator=g, dtype=F64).t())  # (5, 6), strides (1, 5)
        self.base = torch.randn(4, 10, generator=g, dtype=F64)
        self.s = nn.Parameter(self.base[:, ::2])  # (4, 5), strides (10, 2): shares storage with base
        if contiguous:  # adamp 0.3.0 calls .view() and fails on the strided ones
            self.t, self.s = nn.Parameter(self.t.detach().contiguous()), nn.Parameter(self.s.detach().contiguous())

    def forward(self, x):
        return (x @ self.t.T).tanh() @ self.s.T


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_non_contiguous_params_match_official_and_keep_strides(optimizer):
    ours_cls, ref_cls = classes(optimizer)
    kw = KW[optimizer]
    nets = [_Strided(contiguous=True), _Strided()]
    strides = [p.stride() for p in nets[1].parameters()]
    assert not nets[1].t.is_contiguous() and not nets[1].s.is_contiguous()
    gaps = nets[1].base[:, 1::2].clone()
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(8, 6, generator=gen, dtype=F64), torch.randint(0, 4, (8,), generator=gen)) for _ in range(12)
    ]
    trajs, opts = [], []
    for net, cls in zip(nets, (ref_cls, ours_cls), strict=True):
        opt = cls(net.parameters(), **kw)
        traj = []
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            traj.append([p.detach().numpy().copy() for p in net.parameters()])
        trajs.append(traj)
        opts.append(opt)
    assert traj_error(trajs[1], trajs[0]) <= TOL
    assert state_error(opts[1], opts[0], nets[1], nets[0]) <= TOL
    assert [p.stride() for p in nets[1].parameters()] == strides
    assert torch.equal(nets[1].base[:, 1::2], gaps), "wrote outside the param's view"
    assert torch.equal(nets[1].base[:, ::2], nets[1].s.detach())


# -- maximize, tensor lr ---------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_maximize_equals_official_on_negated_loss(optimizer):
    ours_cls, ref_cls = classes(optimizer)
    kw = KW[optimizer]
    batches = make_batches(12)
    net_ref, net = make_net(), make_net()
    opt_ref, opt = ref_cls(net_ref.parameters(), **kw), ours_cls(net.parameters(), maximize=True, **kw)
    ref, ours = [], []
    for batch in batches:
        for n, o, sign, out in ((net_ref, opt_ref, -1.0, ref), (net, opt, 1.0, ours)):
            o.zero_grad()
            (sign * loss_of(n, batch)).backward()
            o.step()
            out.append([p.detach().numpy().copy() for p in n.parameters()])
    assert traj_error(ours, ref) <= TOL
    # maximize really changes the direction: the plain run differs from it
    plain = train(make_net(), ours_cls(make_net().parameters(), **kw), batches[:1])
    assert traj_error(plain, ours[:1]) > 1e-6


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_tensor_lr_matches_float_lr(optimizer):
    """A 0-d tensor lr (what torch.compile users pass to avoid recompiles) gives the official run."""
    ours_cls, ref_cls = classes(optimizer)
    kw = KW[optimizer]
    batches = make_batches(10)
    net_ref, net = make_net(), make_net()
    ref = train(net_ref, ref_cls(net_ref.parameters(), **kw), batches)
    opt = ours_cls(net.parameters(), **{**kw, "lr": torch.tensor(kw["lr"], dtype=F64)})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)
    assert traj_error(train(net, opt, batches, sched=sched), ref) <= TOL
    assert torch.is_tensor(opt.param_groups[0]["lr"])


# -- torch.compile -----------------------------------------------------------------------------------
@pytest.fixture
def dynamo_quiet():
    import torch._dynamo

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # array_api_compat's lru_cache helpers, profiler notices
        yield torch._dynamo
    torch._dynamo.reset()


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(64, 5)
    )


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_compiled_step_has_no_graph_breaks_or_recompiles(optimizer, dynamo_quiet):
    """torch.compile(opt.step): one FX graph in all (a graph break in our code would split it), no
    recompile over steps (the step counter is a tensor), and the same numbers as the eager optimizer."""
    ours_cls, _ = classes(optimizer)
    kw = KW[optimizer]
    batches = make_batches(4, dtype=torch.float32)
    nets = [_small_net(), _small_net()]  # few params: tracing time grows with their number
    # The eager twin takes the same per-tensor array-API step (fused=False, foreach=False) as the graph run
    # as traced: bit for bit (tests/test_torch_compile.py compares every other setting within tolerance).
    opts = [ours_cls(groups(n, kw["lr"]), **kw, fused=False, foreach=False) for n in nets]
    for n, o in zip(nets, opts, strict=True):  # create the state eagerly
        train(n, o, batches[:1])
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(opts[1].step, backend=counting_backend)
    with dynamo_quiet.config.patch(error_on_recompile=True):
        for batch in batches[1:]:
            for n, o, step in ((nets[0], opts[0], opts[0].step), (nets[1], opts[1], compiled)):
                o.zero_grad()
                loss_of(n, batch).backward()
                step()
    assert len(graphs) == 1
    n_ops = sum(node.op == "call_function" for node in graphs[0].graph.nodes)
    assert n_ops > 50, "the update was not captured in the graph"
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(p, q)
        for k, v in opts[0].state[p].items():
            assert torch.equal(v, opts[1].state[q][k])


def test_compiled_model_trains_like_eager(dynamo_quiet):
    net_ref = make_net()
    net = copy.deepcopy(net_ref)
    compiled = torch.compile(net, backend="aot_eager")
    opt_ref = adamp.AdamP(net_ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = adamp_torch.AdamP(net.parameters(), lr=1e-2, weight_decay=0.1)
    batches = make_batches(8)
    ref = train(net_ref, opt_ref, batches)
    ours = []
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        ours.append([p.detach().numpy().copy() for p in net.parameters()])
    assert traj_error(ours, ref) <= 1e-8


# -- bad input -------------------------------------------------------------------------------------------
def _p():
    return nn.Parameter(torch.ones(3, 4))


# (optimizer, kwargs, error, message regex)
BAD_KWARGS = [
    ("adamp", dict(lr=-1.0), ValueError, r"^Invalid learning rate: -1\.0$"),
    ("adamp", dict(lr=math.nan), ValueError, r"Invalid learning rate: nan"),
    ("adamp", dict(lr=torch.ones(2)), ValueError, r"Invalid learning rate: expected a scalar .* shape \(2,\)"),
    ("adamp", dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1\.0"),
    ("adamp", dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1: -0\.1"),
    ("adamp", dict(betas=0.9), ValueError, r"Invalid betas: 0\.9"),
    ("adamp", dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08"),
    ("adamp", dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0\.1"),
    ("adamp", dict(delta=-0.1), ValueError, r"Invalid delta value: -0\.1"),
    ("adamp", dict(wd_ratio=math.nan), ValueError, r"Invalid wd_ratio value: nan"),
    ("adamp", dict(nesterov=1), TypeError, r"Invalid nesterov value: 1"),
    ("adamp", dict(maximize="yes"), TypeError, r"Invalid maximize value: 'yes'"),
    ("adamp", dict(state_dtype=torch.int32), ValueError, r"Invalid state_dtype: torch\.int32"),
    ("adamp", dict(state_dtype="float99"), ValueError, r"Invalid state_dtype: 'float99'"),
    ("adamp", dict(state_dtype=torch.complex64), ValueError, r"Invalid state_dtype: torch\.complex64"),
    ("sgdp", dict(), ValueError, r"didn't specify a value of required optimization parameter lr"),
    ("sgdp", dict(lr=-0.1), ValueError, r"^Invalid learning rate: -0\.1$"),
    ("sgdp", dict(lr=None), TypeError, r"Invalid learning rate: None"),
    ("sgdp", dict(lr=0.1, momentum=-0.9), ValueError, r"Invalid momentum value: -0\.9"),
    ("sgdp", dict(lr=0.1, dampening=math.inf), ValueError, r"Invalid dampening value: inf"),
    ("sgdp", dict(lr=0.1, weight_decay=-1.0), ValueError, r"Invalid weight_decay value: -1\.0"),
    ("sgdp", dict(lr=0.1, momentum=1.5), ValueError, r"Invalid momentum value: 1\.5 \(expected a number in \[0, 1\]\)"),
    ("sgdp", dict(lr=0.1, momentum=1.0, weight_decay=0.1), ValueError, r"Invalid momentum value: 1\.0"),
    ("sgdp", dict(lr=0.1, eps=-1.0), ValueError, r"Invalid epsilon value: -1\.0"),
    ("sgdp", dict(lr=0.1, maximize=None), TypeError, r"Invalid maximize value: None"),
]


@pytest.mark.parametrize("optimizer,kwargs,error,match", BAD_KWARGS)
def test_bad_hyperparameters_are_refused(optimizer, kwargs, error, match):
    cls = classes(optimizer)[0]
    with pytest.raises(error, match=match):
        cls([_p()], **kwargs)
    # the same value given by a param group, through the constructor and add_param_group
    group_kw = {k: v for k, v in kwargs.items() if k != "lr"} if optimizer == "sgdp" and "lr" not in kwargs else kwargs
    if optimizer == "sgdp" and "lr" not in kwargs:
        return
    good = dict(lr=0.1) if optimizer == "sgdp" else {}
    with pytest.raises(error, match=match):
        cls([{"params": [_p()], **group_kw}], **good)
    opt = cls([_p()], **good)
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": [_p()], **group_kw})
    assert len(opt.param_groups) == 1


def test_sgdp_lr_may_come_from_every_group():
    opt = adamp_torch.SGDP([{"params": [_p()], "lr": 0.1}, {"params": [_p()], "lr": 0.2}], momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_complex_params_are_refused_at_construction(optimizer):
    cls = classes(optimizer)[0]
    z = nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"real floating params only: param_groups\[0\]\['params'\]\[1\] has dtype"):
        cls([_p(), z], lr=0.1)
    opt = cls([_p()], lr=0.1)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] has dtype torch\.complex64"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def _sparse(opt, p):
    p.grad = p.grad.to_sparse()


def _dtype(opt, p):
    p.grad.data = p.grad.data.float()


def _shape(opt, p):
    p.grad.data = torch.zeros(7, dtype=F64)


def _complex(opt, p):
    p.data = p.data.to(torch.complex128)
    p.grad.data = p.grad.data.to(torch.complex128)


def _bad_lr(opt, p):
    opt.param_groups[-1]["lr"] = -1.0


# (corruption of the last param of the last group, error, message regex)
LAST = r"param_groups\[1\]\['params'\]\[1\]"
BAD_GRADS = [
    (_sparse, RuntimeError, rf"does not support sparse gradients: {LAST} has a torch\.sparse_coo grad"),
    (_dtype, TypeError, rf"grad of {LAST} has dtype torch\.float32 but the param has dtype torch\.float64"),
    (_shape, ValueError, rf"grad of {LAST} has shape \(7,\) but the param has shape \(5,\)"),
    (_complex, TypeError, rf"real floating params only: {LAST} has dtype torch\.complex128"),
    (_bad_lr, ValueError, r"^Invalid learning rate: -1\.0 \(param_groups\[1\]\)$"),  # the group is named
]


@pytest.mark.parametrize("warm", [True, False], ids=["after-2-steps", "fresh"])
@pytest.mark.parametrize("corrupt,error,match", BAD_GRADS, ids=[c[0].__name__.strip("_") for c in BAD_GRADS])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_bad_grad_on_last_param_leaves_everything_untouched(optimizer, corrupt, error, match, warm):
    ours_cls, _ = classes(optimizer)
    kw = KW[optimizer]
    net = make_net()
    opt = ours_cls(groups(net, kw["lr"]), **kw)
    batches = make_batches(3)
    if warm:
        train(net, opt, batches[:2])
    opt.zero_grad()
    loss_of(net, batches[2]).backward()
    last = opt.param_groups[-1]["params"][-1]
    params = [p.detach().clone() for p in net.parameters()]
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in net.parameters() if p in opt.state}
    corrupt(opt, last)
    with pytest.raises(error, match=match):
        opt.step()
    for p, before in zip(net.parameters(), params, strict=True):
        if p is not last or corrupt is _bad_lr:
            assert torch.equal(p.detach(), before)
    assert {id(p) for p in opt.state} == set(states)
    for p in opt.state:
        assert all(torch.equal(v, opt.state[p][k]) for k, v in states[id(p)].items())


def test_none_grads_are_skipped():
    net = make_net()
    opt = adamp_torch.AdamP(net.parameters(), lr=1e-2)
    opt.zero_grad()
    loss_of(net, make_batches(1)[0]).backward()
    head_w = net[-1].weight
    head_w.grad = None
    before = head_w.detach().clone()
    opt.step()
    assert torch.equal(head_w.detach(), before) and head_w not in opt.state
    assert all(int(opt.state[p]["step"]) == 1 for p in net.parameters() if p is not head_w)


def test_bad_state_dicts_are_refused_before_loading():
    net = make_net()
    opt = adamp_torch.AdamP(net.parameters(), lr=1e-2)
    train(net, opt, make_batches(2))
    snapshot = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in net.parameters()}
    sd = opt.state_dict()
    wrong_shape = copy.deepcopy(sd)
    wrong_shape["state"][0]["exp_avg"] = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(
        ValueError, match=r"state 0 \(exp_avg\) has shape \(2, 2\) but param_groups\[0\]\['params'\]\[0\]"
    ):
        opt.load_state_dict(wrong_shape)
    wrong_step = copy.deepcopy(sd)
    wrong_step["state"][1]["step"] = -1
    with pytest.raises(ValueError, match=r"Invalid saved step for param_groups\[0\]\['params'\]\[1\]: -1"):
        opt.load_state_dict(wrong_step)
    for p in net.parameters():
        assert all(torch.equal(v, opt.state[p][k]) for k, v in snapshot[id(p)].items())


def test_grad_on_another_device_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("torch: no CUDA device (needs two devices)")
    p = nn.Parameter(torch.ones(3, 4))
    p.grad = torch.ones(3, 4)
    p.grad.data = torch.ones(3, 4, device="cuda")
    opt = adamp_torch.AdamP([p])
    with pytest.raises(ValueError, match=r"grad of param_groups\[0\]\['params'\]\[0\] is on cuda:0 but the param"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_empty_and_scalar_params(optimizer):
    """Zero-size params (adamp 0.3.0 fails on them) are left as they are; 0-d params take the plain step."""
    ours_cls, ref_cls = classes(optimizer)
    kw = KW[optimizer]
    empty = nn.Parameter(torch.empty(0, 3, dtype=F64))
    scalar, scalar_ref = nn.Parameter(torch.tensor(1.5, dtype=F64)), nn.Parameter(torch.tensor(1.5, dtype=F64))
    opt, ref = ours_cls([empty, scalar], **kw), ref_cls([scalar_ref], **kw)
    for t in range(5):
        empty.grad = torch.empty(0, 3, dtype=F64)
        scalar.grad = torch.tensor(0.3 - 0.1 * t, dtype=F64)
        scalar_ref.grad = scalar.grad.clone()
        opt.step()
        ref.step()
    assert empty.shape == (0, 3)
    assert abs(scalar.item() - scalar_ref.item()) <= TOL * abs(scalar_ref.item())
