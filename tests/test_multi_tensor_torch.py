"""torch's own multi-tensor step (adamp_core.paths._multi_tensor_torch) against the per-tensor step, step by
step: every tensor of a group gets what it would get alone (float64 within 1e-12, float32 within 1e-5 of the
update, normwise per step), its own view decision, step count, skip and scale; and the operators a step
dispatches do not grow with the number of tensors (a count, not a time)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from adamp_core import dispatch  # noqa: E402
from adamp_core.adamp import AdamPState  # noqa: E402
from adamp_core.hyperparams import check_adamp, check_sgdp  # noqa: E402
from adamp_core.optimizers import ADAMP, SGDP  # noqa: E402
from adamp_core.paths import MULTI_TENSOR, per_tensor  # noqa: E402
from adamp_core.paths import _multi_tensor_torch as native  # noqa: E402
from adamp_core.sgdp import SGDPState  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
# 4-d conv, 2-d, 3-d, row length 1, 1-d, a row of one, and one empty tensor (stepped alone)
SHAPES = [(4, 3, 3, 3), (5, 6), (3, 2, 4), (6, 1), (2, 7), (7,), (1,), (5,), (0, 3), (3, 3)]
STEPS = 7


def _grad(gen, w, kind, dtype):
    """A grad whose rows are orthogonal to w's rows (the channel view fires), orthogonal to w as a whole only
    (the layer view may fire), or generic (neither)."""
    g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    if w.ndim >= 2 and w.numel() and w[0].numel() > 1:  # (a row of one entry orthogonal to w would be 0)
        wr, gr = w.double().reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
        if kind == 0:
            gr -= wr * ((wr * gr).sum(1, keepdim=True) / (wr * wr).sum(1, keepdim=True).clamp(min=1e-300))
        elif kind == 1:
            gr -= wr * ((wr * gr).sum() / (wr * wr).sum().clamp(min=1e-300))
    return g.to(dtype)


def _hyper(opt, nesterov=False, caution=False, tensor_lr=False, project_buffer=True, wd=1e-2, dampening=0.2):
    lr = torch.tensor(1e-2 if opt == "adamp" else 0.1) if tensor_lr else (1e-2 if opt == "adamp" else 0.1)
    if opt == "adamp":
        return check_adamp(lr, (0.9, 0.999), 1e-8, wd, 0.1, 0.1, nesterov, caution)
    return check_sgdp(lr, 0.9, 0.0 if nesterov else dampening, wd, nesterov, 1e-8, 0.1, 0.1, caution,
                      project_buffer)


def _state(opt, p, state_dtype, step):
    z = torch.zeros(p.shape, dtype=state_dtype)
    if opt == "adamp":
        return AdamPState(step, z, z.clone())
    return SGDPState(z)


def _twins(opt, shapes, dtype, state_dtype, python_steps, seed=0, scale=None, zero=(), strided=False):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for i, s in enumerate(shapes):
        p = torch.randn(s, generator=gen, dtype=torch.float64)
        if scale is not None:
            p = p * scale[i % len(scale)]
        if i in zero:
            p = torch.zeros(s, dtype=torch.float64)
        p = p.to(dtype)
        if strided and p.ndim == 2:  # the same values, column-major: the plan holds a buffer per array
            p = p.t().contiguous().t()
        ps.append(p)
    steps = [(i % 3 if python_steps else torch.tensor(i % 3, dtype=torch.int64)) for i in range(len(shapes))]
    def twin():
        return [[p.clone(), _state(opt, p, state_dtype, st if python_steps else st.clone())]
                for p, st in zip(ps, steps, strict=True)]

    return gen, twin(), twin()


def _compare(x, y, dtype, what, floor=0.0):
    """Entrywise within the tolerance of the largest entry (relative, as tests/test_core_grouped.py), or of
    ``floor``: the size of what was projected (a projection that removes almost all of a buffer leaves only
    the rounding of the sums, in any order)."""
    assert x.shape == y.shape and x.dtype == y.dtype, what
    x, y = x.double(), y.double()
    if x.numel() == 0:
        return
    scale = max(float(y.abs().max()), floor, 1e-300)
    err = float((x - y).abs().max()) / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g}"


def _run(opt, shapes, hp, *, dtype=torch.float64, state_dtype=None, python_steps=False, skip=False, steps=STEPS,
         grad_scale=None, scale=None, zero=(), nonfinite=(), strided=False):
    """``steps`` steps of the native group step (dispatch.step, foreach=True) and of the per-tensor step on the
    same tensors and grads, compared after every step (params, state, counts). Returns the outcomes' paths."""
    spec = ADAMP if opt == "adamp" else SGDP
    state_dtype = state_dtype or dtype
    gen, mine, ref = _twins(opt, shapes, dtype, state_dtype, python_steps, scale=scale, zero=zero, strided=strided)
    plans = dispatch.Plans()
    paths = set()
    for t in range(steps):
        grads = []
        for i, (p, _) in enumerate(mine):
            g = _grad(gen, p, (i + t) % 3, dtype)
            if grad_scale is not None:
                g = g * grad_scale[i % len(grad_scale)]
            if (t, i) in nonfinite:
                g = g.clone()
                g.view(-1)[0] = float("nan") if (i % 2) else float("inf")
            grads.append(g)
        tensors = [dispatch.Tensor(p, g, s) for (p, s), g in zip(mine, grads, strict=True)]
        outs = dispatch.step(spec, tensors, hp, skip_nonfinite=skip, fused=False, foreach=True, plans=plans)
        for j, o in enumerate(outs):
            paths.add(o.path)
            if o.param is not None:
                mine[j][0].copy_(o.param)
                for f in spec.state._fields:
                    if torch.is_tensor(getattr(o.state, f)):
                        getattr(mine[j][1], f).copy_(getattr(o.state, f))
                    else:
                        mine[j][1] = mine[j][1]._replace(**{f: getattr(o.state, f)})
            elif o.state is not None:
                mine[j][1] = o.state
        for j, ((p, s), g) in enumerate(zip(ref, grads, strict=True)):
            xp = per_tensor.namespace(p)
            o = per_tensor.step_one(spec, xp, dispatch.Tensor(p, g, s), g, hp, skip)
            ref[j] = [o.param, o.state]
        for j, ((p, s), (rp, rs)) in enumerate(zip(mine, ref, strict=True)):
            _compare(p, rp, dtype, f"step {t}, tensor {j} {shapes[j]} param")
            for f in spec.state._fields:
                x, y = getattr(s, f), getattr(rs, f)
                if f == "step":
                    assert int(x) == int(y), f"step {t}, tensor {j}: count {int(x)} != {int(y)}"
                else:  # the momentum buffers (SGDP's projected) are of the grad's size
                    floor = float(grads[j].double().abs().max()) if f != "exp_avg_sq" and grads[j].numel() else 0.0
                    _compare(x, y, dtype, f"step {t}, tensor {j} {f}", floor if torch.isfinite(
                        torch.tensor(floor)) else 0.0)
    lean = {g.lean for g in _native_groups(plans)}
    assert lean == ({False, True} if strided else {True}), lean  # strided: the 2-d group holds rows
    return paths


def _native_groups(plans):
    return [layout for path, plan in plans.units for _, _, layout in getattr(plan, "groups", [])
            if getattr(layout, "native", False)]


CASES = {
    "plain": {},
    "nesterov": dict(nesterov=True),
    "caution": dict(caution=True),
    "nesterov, caution": dict(nesterov=True, caution=True),
    "tensor lr": dict(tensor_lr=True),
    "no weight decay": dict(wd=0.0),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
def test_group_step_is_the_per_tensor_step(opt, dtype, case):
    paths = _run(opt, SHAPES, _hyper(opt, **case), dtype=dtype)
    assert MULTI_TENSOR in paths


@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
@pytest.mark.parametrize("skip", [False, True])
def test_non_contiguous_params_take_the_plan_s_buffers(opt, skip):
    """A group with a column-major param reads params and state through the plan's buffers (one
    ``_foreach_copy_`` in, one out) instead of ``cat``/``split_with_sizes_copy``: the same results."""
    _run(opt, SHAPES, _hyper(opt, caution=True), skip=skip, strided=True, nonfinite={(1, 1), (3, 4)} if skip else ())


@pytest.mark.parametrize("project_buffer", [True, False])
@pytest.mark.parametrize("dampening", [0.0, 0.2])
def test_sgdp_dampening_and_buffer(dampening, project_buffer):
    _run("sgdp", SHAPES, _hyper("sgdp", dampening=dampening, project_buffer=project_buffer))


@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
@pytest.mark.parametrize("python_steps", [False, True], ids=["array counts", "python counts"])
def test_skip_nonfinite(opt, python_steps):
    """A tensor with a NaN/inf grad entry keeps its param, state and count; the others step."""
    _run(opt, SHAPES, _hyper(opt, caution=True), skip=True, python_steps=python_steps,
         nonfinite={(1, 0), (1, 3), (2, 5), (4, 1), (4, 2), (5, 9)})


def test_python_int_counts_of_different_values():
    _run("adamp", SHAPES, _hyper("adamp"), python_steps=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("state_dtype", [None, torch.float32], ids=["own state", "float32 state"])
@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
def test_half_params_float32_maths(opt, dtype, state_dtype):
    _run(opt, SHAPES, _hyper(opt, caution=True), dtype=dtype, state_dtype=state_dtype)


@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
def test_extreme_magnitudes_float32(opt):
    """Weights and grads near 1e19 and 1e-20 (float32): the per-row power-of-two scaling keeps the sums exact,
    as alone; a zero-initialised tensor too."""
    _run(opt, SHAPES, _hyper(opt), dtype=torch.float32, scale=[1e19, 1e-20, 1.0], grad_scale=[1e-20, 1e19, 1.0],
         zero=(4,))


def test_empty_tensor_and_groups_of_one():
    """An empty tensor is stepped alone (per-tensor step); a lone non-empty tensor takes the native step."""
    spec = ADAMP
    ps = [torch.randn(3, 4, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)]
    tensors = [dispatch.Tensor(p, torch.randn(p.shape, dtype=p.dtype), _state("adamp", p, p.dtype, torch.tensor(0)))
               for p in ps]
    plans = dispatch.Plans()
    outs = dispatch.step(spec, tensors, _hyper("adamp"), fused=False, foreach=True, plans=plans)
    assert [o.path for o in outs] == [MULTI_TENSOR, "per_tensor"]
    assert len(_native_groups(plans)) == 1
    assert int(tensors[0].state.step) == 1


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(opt, n, caution=False, skip=False):
    spec = ADAMP if opt == "adamp" else SGDP
    hp = _hyper(opt, caution=caution)
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3) if i % 2 else (4, 5, 2, 2) for i in range(n)] + [(4,)] * n  # one 4-d and one 1-d group
    tensors = [dispatch.Tensor(p, torch.randn(p.shape, generator=gen), _state(opt, p, p.dtype, torch.tensor(0)))
               for p in (torch.randn(s, generator=gen) for s in shapes)]
    plans = dispatch.Plans()
    for _ in range(2):
        dispatch.step(spec, tensors, hp, fused=False, foreach=True, skip_nonfinite=skip, plans=plans)
    grads = [torch.randn(t.param.shape, generator=gen) for t in tensors]
    with _Count() as c:
        dispatch.step(spec, tensors, hp, fused=False, foreach=True, skip_nonfinite=skip, plans=plans, grads=grads)
    assert len(_native_groups(plans)) == 2
    return c.n


@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
@pytest.mark.parametrize("caution, skip", [(False, False), (True, True)])
def test_ops_per_step_do_not_grow_with_tensors(opt, caution, skip):
    """Every operator a step dispatches (views included) is per group: 20 and 200 tensors per group, equal
    counts."""
    few, many = _ops_per_step(opt, 10, caution, skip), _ops_per_step(opt, 100, caution, skip)
    assert few == many, (few, many)
    assert many < 400  # two groups (4-d and 1-d): the goal of issue 26 for a whole step


def test_group_tensors_split_by_kind_and_size():
    keys = ["a", "a", "b", "a", "a", "a"]
    shapes = [(2, 3), (4,), (2, 3), (0, 3), (5, 5), (100, 100)]
    assert native.group_tensors(keys, shapes, on_host=False, host_max_elements=1 << 16, max_elements=1000) == [
        [0, 4], [1], [2], [3], [5]]
    # on a host, tensors above host_max_elements (here 20: (5, 5) and (100, 100)) are alone
    assert native.group_tensors(keys, shapes, on_host=True, host_max_elements=20, max_elements=1000) == [
        [0], [1], [2], [3], [4], [5]]


def test_non_contiguous_param_keeps_its_logical_rows():
    """The flat layout keeps each tensor's logical (row-major) order: a non-contiguous param (a transposed
    view) is read and written through its own strides."""
    base = torch.randn(6, 5, dtype=torch.float64)
    p = base.t()  # (5, 6), non-contiguous
    q = p.contiguous()
    hp = _hyper("adamp")
    g = torch.randn(5, 6, dtype=torch.float64)
    s1 = _state("adamp", p, p.dtype, torch.tensor(0))
    s2 = _state("adamp", q, q.dtype, torch.tensor(0))
    extra = torch.randn(3, 4, dtype=torch.float64)
    se = _state("adamp", extra, extra.dtype, torch.tensor(0))
    dispatch.step(ADAMP, [dispatch.Tensor(p, g, s1), dispatch.Tensor(extra, torch.ones(3, 4, dtype=torch.float64),
                                                                       se)], hp, fused=False, foreach=True)
    o = per_tensor.step_one(ADAMP, per_tensor.namespace(q), dispatch.Tensor(q, g, s2), g, hp, False)
    np.testing.assert_allclose(p.numpy(), o.param.numpy(), rtol=1e-12, atol=0)
