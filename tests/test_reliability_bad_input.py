"""Every entry point against the one bad-input table of ``tests/bad_inputs.py`` (issue 9).

For each case and each entry point that can receive it: the exact error type, a message that names
the value (the table's regex) *and* the offending parameter where it is (``grads[1]``,
``param_groups[0]['params'][1]``, ``leaf ['z']``, ...), and atomicity: the bad entry is the *last*
param, after two good steps, and after the error every param and every state is bit-for-bit what it
was, and the next good step works. Functional entry points (core, tree, optax) must not have
written their inputs either.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from typing import Any

import numpy as np
import pytest
from bad_inputs import (
    ARRAYS,
    DTYPE,
    HYPER,
    HYPER_ARRAYS,
    SHAPE,
    Bad,
    BadHyper,
    BadHyperArray,
    bad_numpy_value,
    good_values,
)

import adamp_core as ac
from adamp_core.arrays import namespace_name

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
adamp_torch = pytest.importorskip("adamp_torch")
adamp_array = pytest.importorskip("adamp_array")
adamp_optax = pytest.importorskip("adamp_optax")

ENTRY_POINTS = ["core:numpy", "core:torch", "tree:numpy", "torch", "array:numpy", "array:torch", "optax"]

# Where the last param is named, per entry point and target.
LABELS = {
    "core": dict(grad=r"\bgrad\b", param=r"\bparam\b", state=r"\bstate\b", missing_grad=r"\bgrad\b"),
    "tree": dict(grad=r"grads\[1\]", param=r"params\[1\]", state=r"states\[1\]"),
    "torch": dict(
        grad=r"param_groups\[0\]\['params'\]\[1\]",
        param=r"param_groups\[0\]\['params'\]\[1\]",
        state_dict=r"param_groups\[0\]",
    ),
    "array": dict(grad=r"grads\[1\]", param=r"params\[1\]", state_dict=r"param_groups\[0\]|state\[1\]"),
    "optax": dict(
        grad=r"leaf \['z'\]", param=r"leaf \['z'\]", state=r"leaf \['z'\]|^state must be", missing_grad=r"grads\['z'\]"
    ),
}


# ---------------------------------------------------------------------------------------------
# Libraries: how each entry point makes arrays, and what "another library / device" is for it.


class Lib:
    def __init__(self, name: str) -> None:
        self.name = name

    def array(self, value: np.ndarray) -> Any:
        value = np.array(value, copy=True)
        if self.name == "torch":
            return torch.from_numpy(value)
        if self.name == "jax":
            return jnp.asarray(value)
        return value

    def other_library(self, value: np.ndarray) -> Any:
        return torch.from_numpy(np.array(value)) if self.name == "numpy" else np.array(value)

    def other_device(self, value: np.ndarray) -> Any:
        if self.name != "torch":
            return None  # one device only here (JAX: one CPU device; NumPy: host only)
        return torch.empty(value.shape, dtype=getattr(torch, str(value.dtype)), device="meta")


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, (int, float)):
        return np.asarray(x)
    if hasattr(x, "detach"):
        if x.device.type == "meta":  # no data: its metadata stands in
            return np.asarray(f"meta {tuple(x.shape)} {x.dtype}")
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def make_bad(lib: Lib, bad: Bad) -> Any:
    """The bad array (or list) in ``lib``, or None when this library cannot express it."""
    if bad.not_array:
        return bad_numpy_value(bad).tolist()
    value = bad_numpy_value(bad)
    if bad.library == "other":
        return lib.other_library(value)
    if bad.device == "other":
        return lib.other_device(value)
    return lib.array(value)


def check_message(exc: pytest.ExceptionInfo, case: Any, label: str | None) -> None:
    msg = str(exc.value)
    assert type(exc.value) is case.error, f"{type(exc.value).__name__} instead of {case.error.__name__}: {msg}"
    assert re.search(case.match, msg), f"value not named: {msg!r} !~ {case.match!r}"
    if label is not None:
        assert re.search(label, msg), f"parameter not named: {msg!r} !~ {label!r}"


def snapshot(tree: Any) -> list[np.ndarray]:
    """Every array in a (nested) structure, copied to NumPy, in a fixed order."""
    out: list[np.ndarray] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif x is not None and not isinstance(x, (str, bool)):
            out.append(to_numpy(x))

    walk(tree)
    return out


def assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Entry points


HP_GOOD = {"adamp": dict(lr=1e-2, weight_decay=0.1), "sgdp": dict(lr=0.1, momentum=0.9, weight_decay=1e-2)}
HP_BASE = {"adamp": {}, "sgdp": dict(lr=0.1)}  # the defaults: what a hyperparameter case edits


def _core_fns(optimizer: str) -> tuple[Any, Any]:
    return (ac.adamp_init, ac.adamp_step) if optimizer == "adamp" else (ac.sgdp_init, ac.sgdp_step)


def _optax_kwargs(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    out = {}
    for k, v in kwargs.items():
        if k == "lr":
            out["learning_rate"] = v
        elif k == "betas":
            if not isinstance(v, tuple) or len(v) != 2:
                return None  # b1/b2 are separate arguments in optax: no pair to get wrong
            out["b1"], out["b2"] = v
        else:
            out[k] = v
    return out


def _torch_cls(optimizer: str) -> Any:
    return adamp_torch.AdamP if optimizer == "adamp" else adamp_torch.SGDP


def _array_cls(optimizer: str) -> Any:
    return adamp_array.AdamP if optimizer == "adamp" else adamp_array.SGDP


def _optax_fn(optimizer: str) -> Any:
    return adamp_optax.adamp if optimizer == "adamp" else adamp_optax.sgdp


def _torch_params(shape_last: tuple[int, ...] = SHAPE, seed: int = 0) -> list[Any]:
    p1, _, p2, _ = good_values(seed)
    if shape_last != SHAPE:
        p2 = np.resize(p2, shape_last)
    return [torch.nn.Parameter(torch.from_numpy(p1.copy())), torch.nn.Parameter(torch.from_numpy(p2.copy()))]


def _torch_steps(opt: Any, params: list[Any], n: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.from_numpy(rng.standard_normal(tuple(p.shape)))
        opt.step()


def _torch_snapshot(opt: Any, params: list[Any]) -> list[np.ndarray]:
    return snapshot([list(params), [opt.state[p] for p in params if p in opt.state]])


def _array_setup(optimizer: str, lib: Lib, shape_last: tuple[int, ...] = SHAPE, kwargs: Any = None) -> tuple[Any, Any]:
    p1, g1, p2, g2 = good_values()
    if shape_last != SHAPE:
        p2, g2 = np.resize(p2, shape_last), np.resize(g2, shape_last)
    opt = _array_cls(optimizer)([lib.array(p1), lib.array(p2)], **(HP_GOOD[optimizer] if kwargs is None else kwargs))

    def grads(scale: float = 1.0) -> list[Any]:
        return [lib.array(scale * g1), lib.array(scale * g2)]

    return opt, grads


def _array_snapshot(opt: Any) -> list[np.ndarray]:
    # every group's params and every state (NamedTuples are tuples: snapshot walks them), whatever the layout
    return snapshot([[g["params"] for g in opt.param_groups], opt.states])


# ---------------------------------------------------------------------------------------------
# Hyperparameters


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", HYPER, ids=[c.id for c in HYPER])
def test_bad_hyperparameter(case: BadHyper, entry: str) -> None:
    kind, _, libname = entry.partition(":")
    lib = Lib(libname or {"torch": "torch", "optax": "jax"}[kind])
    p1, g1, p2, g2 = good_values()
    label = None  # hyperparameter messages name the hyperparameter itself ("Invalid learning rate: -1.0")
    if kind in ("core", "tree"):
        init, step = _core_fns(case.optimizer)
        if kind == "core":
            w, g = lib.array(p2), lib.array(g2)
            state = init(w)
            before = snapshot([w, g, state])
            with pytest.raises(Exception) as exc:
                step(w, g, state, **case.kwargs)
            assert_same(before, snapshot([w, g, state]))
        else:
            tree_step = ac.tree.adamp_step if case.optimizer == "adamp" else ac.tree.sgdp_step
            ws, gs = [lib.array(p1), lib.array(p2)], [lib.array(g1), lib.array(g2)]
            states = [init(w) for w in ws]
            before = snapshot([ws, gs, states])
            with pytest.raises(Exception) as exc:
                tree_step(ws, gs, states, **case.kwargs)
            assert_same(before, snapshot([ws, gs, states]))
        check_message(exc, case, label)
    elif kind == "torch":
        cls = _torch_cls(case.optimizer)
        with pytest.raises(Exception) as exc:
            cls(_torch_params(), **case.kwargs)
        check_message(exc, case, label)
        # the same value put into a group of a working optimizer: refused at step(), nothing changes
        params = _torch_params()
        opt = cls(params, **HP_BASE[case.optimizer])  # the defaults, which the case edits
        _torch_steps(opt, params, 2)
        for k, v in case.kwargs.items():
            opt.param_groups[0][k] = v
        for p in params:
            p.grad = torch.ones_like(p)
        before = _torch_snapshot(opt, params)
        with pytest.raises(Exception) as exc:
            opt.step()
        check_message(exc, case, label)
        assert_same(before, _torch_snapshot(opt, params))
    elif kind == "array":
        cls = _array_cls(case.optimizer)
        with pytest.raises(Exception) as exc:
            cls([lib.array(p1), lib.array(p2)], **case.kwargs)
        check_message(exc, case, label)
        if "skip_nonfinite" in case.kwargs:
            return  # an optimizer-wide option of adamp_array, not a group hyperparameter
        opt, grads = _array_setup(case.optimizer, lib, kwargs=HP_BASE[case.optimizer])
        opt.step(grads())
        opt.step(grads(0.5))
        for k, v in case.kwargs.items():
            opt.param_groups[0][k] = v
        before = _array_snapshot(opt)
        with pytest.raises(Exception) as exc:
            opt.step(grads())
        check_message(exc, case, label)
        assert_same(before, _array_snapshot(opt))
    else:  # optax: numbers are checked when the transformation is made
        kwargs = _optax_kwargs(case.kwargs)
        if kwargs is None:
            pytest.skip("optax takes b1 and b2 separately: there is no pair of the wrong length")
        with pytest.raises(Exception) as exc:
            _optax_fn(case.optimizer)(**kwargs)
        check_message(exc, case, label)


# ---------------------------------------------------------------------------------------------
# Arrays: grads, params, states


def not_applicable(bad: Bad, entry: str) -> str | None:
    """Why ``bad`` cannot reach ``entry`` (None: it can). Such pairs are not generated."""
    kind, _, libname = entry.partition(":")
    one_device = bad.device == "other" and (libname or {"torch": "torch", "optax": "jax"}[kind]) != "torch"
    if kind in ("core", "tree"):
        if bad.target == "state_dict":
            return "state dicts belong to the stateful adapters; the core takes state objects"
        if bad.target == "missing_grad" and kind == "tree":
            return "a None grad in adamp_core.tree skips its param (like torch.optim); see test_none_grad_skips"
        if one_device:
            return "NumPy has a single device"
    elif kind == "torch":
        if bad.target in ("state", "missing_grad"):
            return "torch.optim keeps its own state (see the state_dict cases); a None grad skips its param"
        if bad.not_array or bad.library == "other" or bad.device == "other":
            return "torch refuses to attach such a .grad (or param) itself, before the optimizer sees it"
    elif kind == "array":
        if bad.target in ("state", "missing_grad"):
            return "adamp_array keeps its own state (see the state_dict cases); a None grad skips its param"
        if one_device:
            return "NumPy has a single device"
    else:
        if bad.target == "state_dict":
            return "an optax state is a pytree handed to update() (see the state cases), not a state dict"
        if bad.not_array:
            return "in a pytree a list is a node, not a bad leaf"
        if one_device:
            return "JAX has a single CPU device here"
    return None


def _run_core(kind: str, lib: Lib, bad: Bad, optimizer: str) -> None:
    init, step = _core_fns(optimizer)
    p1, g1, p2, g2 = good_values()
    w1, w2, gr1, gr2 = lib.array(p1), lib.array(p2), lib.array(g1), lib.array(g2)
    label = LABELS[kind].get(bad.target)
    if bad.target == "grad":
        gr2 = make_bad(lib, bad)
    elif bad.target == "missing_grad":
        gr2 = None
    if bad.target == "param":
        w2 = make_bad(lib, bad)
        if kind == "tree" and bad.not_array:  # a list is a subtree of params there (nesting): take a str
            w2, bad = "not an array", dataclasses.replace(bad, match=r"must be an array, got str")
        states = [init(w1), None]
    elif bad.target == "state":
        other = (ac.sgdp_init if optimizer == "adamp" else ac.adamp_init) if bad.other_optimizer else init
        states = [init(w1), other(lib.array(np.resize(p2, bad.shape)))]
    else:
        states = [init(w1), init(w2)]
    hp = HP_GOOD[optimizer]
    before = snapshot([w1, w2, gr1, gr2, states])
    with pytest.raises(Exception) as exc:
        if kind == "core":
            step(w2, gr2, states[1], **hp)
        else:
            (ac.tree.adamp_step if optimizer == "adamp" else ac.tree.sgdp_step)([w1, w2], [gr1, gr2], states, **hp)
    check_message(exc, bad, label)
    assert_same(before, snapshot([w1, w2, gr1, gr2, states]))
    if kind == "tree" and bad.target == "param":  # tree.*_init names the entry too
        with pytest.raises(bad.error, match=LABELS["tree"]["param"]):
            (ac.tree.adamp_init if optimizer == "adamp" else ac.tree.sgdp_init)([w1, w2])


def _run_torch(bad: Bad, optimizer: str) -> None:
    cls = _torch_cls(optimizer)
    label = LABELS["torch"].get(bad.target)
    if bad.target == "param":
        value = bad_numpy_value(bad)
        with pytest.raises(Exception) as exc:
            cls([_torch_params()[0], torch.from_numpy(value)], **HP_GOOD[optimizer])
        check_message(exc, bad, label)
        opt = cls([_torch_params()[0]], **HP_GOOD[optimizer])
        with pytest.raises(bad.error, match=bad.match):
            opt.add_param_group({"params": [torch.from_numpy(value)]})
        assert len(opt.param_groups) == 1
        return
    params = _torch_params()
    opt = cls(params, **HP_GOOD[optimizer])
    _torch_steps(opt, params, 2)
    if bad.target == "grad":
        for p in params:
            p.grad = torch.ones_like(p)
        params[1].grad.data = torch.from_numpy(bad_numpy_value(bad))  # torch checks .grad, not .grad.data
        before = _torch_snapshot(opt, params)
        with pytest.raises(Exception) as exc:
            opt.step()
    else:  # state_dict: a checkpoint of the other optimizer, or of a model whose last param has another shape
        src_params = _torch_params(bad.shape, seed=5)
        src_cls = _torch_cls("sgdp" if optimizer == "adamp" else "adamp") if bad.other_optimizer else cls
        src = src_cls(src_params, **HP_GOOD["sgdp" if (optimizer == "adamp") == bad.other_optimizer else "adamp"])
        _torch_steps(src, src_params, 2, seed=7)
        sd = src.state_dict()
        before = _torch_snapshot(opt, params)
        groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        with pytest.raises(Exception) as exc:
            opt.load_state_dict(sd)
        assert groups_before == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    check_message(exc, bad, label)
    assert_same(before, _torch_snapshot(opt, params))
    for p in params:  # and it still works
        p.grad = torch.ones_like(p)
    opt.step()


def _run_array(lib: Lib, bad: Bad, optimizer: str) -> None:
    cls = _array_cls(optimizer)
    label = LABELS["array"].get(bad.target)
    if bad.target == "param":
        p1 = good_values()[0]
        with pytest.raises(Exception) as exc:
            cls([lib.array(p1), make_bad(lib, bad)], **HP_GOOD[optimizer])
        check_message(exc, bad, label)
        return
    opt, grads = _array_setup(optimizer, lib)
    opt.step(grads())
    opt.step(grads(0.5))
    before = _array_snapshot(opt)
    if bad.target == "grad":
        g = grads()
        g[1] = make_bad(lib, bad)
        with pytest.raises(Exception) as exc:
            opt.step(g)
    else:  # state_dict
        other = ("sgdp" if optimizer == "adamp" else "adamp") if bad.other_optimizer else optimizer
        src, src_grads = _array_setup(other, lib, bad.shape, HP_GOOD[other])
        src.step(src_grads())
        with pytest.raises(Exception) as exc:
            opt.load_state_dict(src.state_dict())
    check_message(exc, bad, label)
    assert_same(before, _array_snapshot(opt))
    opt.step(grads())  # and it still works


def _run_optax(bad: Bad, optimizer: str) -> None:
    lib = Lib("jax")
    label = LABELS["optax"].get(bad.target)
    tx = _optax_fn(optimizer)(**_optax_kwargs(HP_GOOD[optimizer]))
    p1, g1, p2, g2 = good_values()
    params = {"a": lib.array(p1), "z": lib.array(p2)}
    grads = {"a": lib.array(g1), "z": lib.array(g2)}
    if bad.target == "param":
        with pytest.raises(Exception) as exc:
            tx.init({"a": params["a"], "z": make_bad(lib, bad)})
        check_message(exc, bad, label)
        return
    state = tx.init(params)
    if bad.target == "grad":
        grads["z"] = make_bad(lib, bad)
    elif bad.target == "missing_grad":
        grads["z"] = None
    elif bad.other_optimizer:
        other = _optax_fn("sgdp" if optimizer == "adamp" else "adamp")
        state = other(**_optax_kwargs(HP_GOOD["sgdp" if optimizer == "adamp" else "adamp"])).init(params)
    else:
        state = tx.init({"a": params["a"], "z": lib.array(np.resize(p2, bad.shape))})
    before = snapshot([params, grads, jax.tree.leaves(state)])
    with pytest.raises(Exception) as exc:
        tx.update(grads, state, params)
    check_message(exc, bad, label)
    assert_same(before, snapshot([params, grads, jax.tree.leaves(state)]))


BAD_ARRAY_CASES = [
    pytest.param(bad, entry, optimizer, id=f"{bad.id}-{entry}-{optimizer}")
    for bad in ARRAYS
    for entry in ENTRY_POINTS
    for optimizer in ("adamp", "sgdp")
    if not_applicable(bad, entry) is None
]


@pytest.mark.parametrize("bad,entry,optimizer", BAD_ARRAY_CASES)
def test_bad_array(bad: Bad, entry: str, optimizer: str) -> None:
    kind, _, libname = entry.partition(":")
    if kind in ("core", "tree"):
        _run_core(kind, Lib(libname), bad, optimizer)
    elif kind == "torch":
        _run_torch(bad, optimizer)
    elif kind == "array":
        _run_array(Lib(libname), bad, optimizer)
    else:
        _run_optax(bad, optimizer)


# ---------------------------------------------------------------------------------------------
# A None grad where it is allowed: the param and its state are skipped (torch.optim's convention).


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_none_grad_skips(optimizer: str) -> None:
    p1, g1, p2, g2 = good_values()
    init, _ = _core_fns(optimizer)
    tree_step = ac.tree.adamp_step if optimizer == "adamp" else ac.tree.sgdp_step
    states = [init(p1), init(p2)]
    new_p, new_s = tree_step([p1, p2], [g1, None], states, **HP_GOOD[optimizer])
    assert new_p[1] is p2 and new_s[1] is states[1] and not np.array_equal(new_p[0], p1)

    opt, grads = _array_setup(optimizer, Lib("numpy"))
    before = snapshot(opt.params[1])
    opt.step([grads()[0], None])
    assert_same(before, snapshot(opt.params[1]))

    params = _torch_params()
    topt = _torch_cls(optimizer)(params, **HP_GOOD[optimizer])
    params[0].grad = torch.ones_like(params[0])
    before = params[1].detach().clone()
    topt.step()
    assert torch.equal(params[1].detach(), before) and params[1] not in topt.state


def test_table_size() -> None:
    """The table is what the issue asks for: many hyperparameters, every kind of array mismatch."""
    assert len(HYPER) >= 30
    assert {b.target for b in ARRAYS} == {"grad", "param", "state", "state_dict", "missing_grad"}
    assert all(b.shape == SHAPE or b.id.endswith("shape") for b in ARRAYS) and DTYPE == "float64"
    # every case reaches at least two entry points, one of them an adapter
    for b in ARRAYS:
        reach = [e for e in ENTRY_POINTS if not_applicable(b, e) is None]
        assert len(reach) >= 2 and any(e.startswith(("torch", "array", "optax")) for e in reach), (b.id, reach)


# ---------------------------------------------------------------------------------------------
# Hyperparameters given as 0-d arrays: a bool or complex dtype is refused; an array of another library or
# device is refused before anything changes (torch and adamp_array: it sits in the *last* of two groups,
# after two good steps), or, for another library, converted so the results keep the param's library,
# dtype and device and equal those of the same value given as a Python float.


def _unfused(*entries: str) -> list[str]:
    """``entry/unfused`` for the stateful adapters that have ``fused=False`` (their pure array-API step, as on
    GPUs, for 16-bit or non-contiguous params); the plain entry runs their default (fused kernels on CPU)."""
    out = []
    for e in entries:
        cls = _torch_cls("adamp") if e == "torch" else _array_cls("adamp")
        if "fused" in inspect.signature(cls).parameters:
            out.append(f"{e}/unfused")
    return out


def _split_path(entry: str) -> tuple[str, dict[str, Any]]:
    base, _, path = entry.partition("/")
    return base, ({"fused": False} if path == "unfused" else {})


HYPER_ARRAY_ENTRIES = ["core:numpy", "core:torch", "tree:numpy", "torch", "array:numpy", "array:torch", "optax"]
HYPER_ARRAY_ENTRIES += _unfused("torch", "array:numpy", "array:torch")


def _entry_lib(entry: str) -> Lib:
    kind, _, libname = _split_path(entry)[0].partition(":")
    return Lib(libname or {"torch": "torch", "optax": "jax"}[kind])


def _hyper_array_cases() -> list[Any]:
    out = []
    for case in HYPER_ARRAYS:
        for entry in HYPER_ARRAY_ENTRIES:
            if case.device == "other" and _entry_lib(entry).name != "torch":
                continue  # NumPy and JAX have one device here
            for optimizer in ("adamp", "sgdp"):
                out.append(pytest.param(case, entry, optimizer, id=f"{case.id}-{entry}-{optimizer}"))
    return out


def _hyper_array(lib: Lib, case: BadHyperArray) -> Any:
    value = np.asarray(HP_GOOD["adamp"]["lr"]).astype(case.dtype)  # 0-d: True, 0.01+0j or 0.01
    if case.library == "other":
        return lib.other_library(value)
    if case.device == "other":
        return lib.other_device(value)
    return lib.array(value)


def _outcome(case: BadHyperArray, run: Any, snap: Any) -> Any:
    """Run ``run()``; return None if it refused as the case says (nothing changed), else its result,
    which is allowed only for a convertible case (the caller then compares it with the float run)."""
    before = snap()
    try:
        result = run()
    except Exception as exc:  # the type is checked exactly below
        msg = str(exc)
        assert type(exc) is case.error, f"{type(exc).__name__} instead of {case.error.__name__}: {msg}"
        assert re.search(case.match, msg), f"{msg!r} !~ {case.match!r}"
        assert_same(before, snap())
        return None
    assert case.convertible, f"{case.id} was accepted; it must raise {case.error.__name__} matching {case.match!r}"
    return result


def _same_arrays_as(ours: list[Any], ref: list[Any]) -> None:
    """Same library, dtype, device and values, bit for bit."""
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert namespace_name(a) == namespace_name(b) and str(a.dtype) == str(b.dtype), (type(a), a.dtype, b.dtype)
        assert str(getattr(a, "device", "cpu")) == str(getattr(b, "device", "cpu"))
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")
@pytest.mark.parametrize("case,entry,optimizer", _hyper_array_cases())
def test_bad_hyperparameter_array(case: BadHyperArray, entry: str, optimizer: str) -> None:
    kind = entry.partition(":")[0].partition("/")[0]
    path = _split_path(entry)[1]
    lib = _entry_lib(entry)
    bad = _hyper_array(lib, case)
    good = float(HP_GOOD["adamp"]["lr"])
    p1, g1, p2, g2 = good_values()
    hp = dict(HP_GOOD[optimizer])

    if kind in ("core", "tree"):
        init, step = _core_fns(optimizer)
        ws, gs = [lib.array(p1), lib.array(p2)], [lib.array(g1), lib.array(g2)]
        states = [init(w) for w in ws]
        if kind == "core":

            def run(v: Any) -> Any:
                return step(ws[1], gs[1], states[1], **{**hp, case.name: v})
        else:
            tree_step = ac.tree.adamp_step if optimizer == "adamp" else ac.tree.sgdp_step

            def run(v: Any) -> Any:
                return tree_step(ws, gs, states, **{**hp, case.name: v})

        result = _outcome(case, lambda: run(bad), lambda: snapshot([ws, gs, states]))
        if result is not None:
            _same_arrays_as(snapshot_arrays(result), snapshot_arrays(run(good)))
        return

    if kind == "torch":
        cls = _torch_cls(optimizer)

        def build(v: Any) -> tuple[Any, list[Any]]:
            params = _torch_params() + _torch_params(seed=3)
            opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.5 * hp["lr"]}], **hp, **path)
            _torch_steps(opt, params, 2)
            opt.param_groups[1][case.name] = v
            for p in params:
                p.grad = torch.ones_like(p)
            return opt, params

        try:  # refused when the group is made is fine too: nothing existed yet
            cls([{"params": _torch_params()[:1]}, {"params": _torch_params(seed=3)[:1], case.name: bad}], **hp, **path)
        except Exception as exc:
            assert type(exc) is case.error and re.search(case.match, str(exc)), f"{type(exc).__name__}: {exc}"
        opt, params = build(bad)
        if _outcome(case, lambda: opt.step() or True, lambda: _torch_snapshot(opt, params)) is not None:
            ref_opt, ref_params = build(good)
            ref_opt.step()
            _same_arrays_as(list(params), list(ref_params))
        return

    if kind == "array":
        cls = _array_cls(optimizer)

        def build(v: Any) -> tuple[Any, Any]:
            q1, h1, q2, h2 = good_values(3)
            opt = cls(
                [
                    {"params": [lib.array(p1), lib.array(p2)]},
                    {"params": [lib.array(q1), lib.array(q2)], "lr": 0.5 * hp["lr"]},
                ],
                **hp,
                **path,
            )
            grads = [[lib.array(g1), lib.array(g2)], [lib.array(h1), lib.array(h2)]]
            opt.step(grads)
            opt.step(grads)
            opt.param_groups[1][case.name] = v
            return opt, grads

        try:
            cls([{"params": [lib.array(p1)]}, {"params": [lib.array(p2)], case.name: bad}], **hp, **path)
        except Exception as exc:
            assert type(exc) is case.error and re.search(case.match, str(exc)), f"{type(exc).__name__}: {exc}"
        opt, grads = build(bad)
        if _outcome(case, lambda: opt.step(grads) or True, lambda: _array_snapshot(opt)) is not None:
            ref, ref_grads = build(good)
            ref.step(ref_grads)
            _same_arrays_as(
                snapshot_arrays([list(g["params"]) for g in opt.param_groups]),
                snapshot_arrays([list(g["params"]) for g in ref.param_groups]),
            )
        return

    # optax: the learning rate is the only array hyperparameter
    params = {"a": lib.array(p1), "z": lib.array(p2)}
    grads = {"a": lib.array(g1), "z": lib.array(g2)}

    def run_optax(v: Any) -> Any:
        tx = _optax_fn(optimizer)(**_optax_kwargs({**hp, case.name: v}))
        return jax.tree.leaves(tx.update(grads, tx.init(params), params))

    result = _outcome(case, lambda: run_optax(bad), lambda: snapshot([params, grads]))
    if result is not None:
        _same_arrays_as(result, run_optax(good))


def snapshot_arrays(tree: Any) -> list[Any]:
    """Every array of a nested structure of lists, tuples and dicts (NamedTuples included), unconverted."""
    out: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "dtype") and hasattr(x, "shape"):
            out.append(x)

    walk(tree)
    return out


# ---------------------------------------------------------------------------------------------
# Atomicity with many params in several groups: the bad grad is the last param of the last group, after
# params of every kind (4-d, 2-d, 1-d, 0-d) in earlier groups. A faster multi-tensor path must keep this.

GROUP_SHAPES = [[(4, 2, 3, 3), (6,), ()], [(5, 3), (7,), SHAPE]]
MANY_ENTRIES = ["torch", "array:numpy", "array:torch"] + _unfused("torch", "array:numpy", "array:torch")


def _many_cases() -> list[Any]:
    out = []
    for entry in MANY_ENTRIES:
        lib = _entry_lib(entry)
        for bad in ARRAYS:
            if bad.target != "grad":
                continue
            if entry.startswith("torch") and (bad.not_array or bad.library == "other" or bad.device == "other"):
                continue  # torch refuses to attach those as .grad itself
            if bad.device == "other" and lib.name != "torch":
                continue
            for optimizer in ("adamp", "sgdp"):
                out.append(pytest.param(entry, bad, optimizer, id=f"{entry}-{bad.id}-{optimizer}"))
        for optimizer in ("adamp", "sgdp"):
            out.append(pytest.param(entry, "lr=-1.0", optimizer, id=f"{entry}-last-group-lr=-1.0-{optimizer}"))
    return out


@pytest.mark.parametrize("entry,bad,optimizer", _many_cases())
def test_bad_entry_last_of_many_groups_changes_nothing(entry: str, bad: Any, optimizer: str) -> None:
    lib = _entry_lib(entry)
    entry, path = _split_path(entry)
    rng = np.random.default_rng(4)
    values = [[np.asarray(rng.standard_normal(s)) for s in group] for group in GROUP_SHAPES]
    hp = HP_GOOD[optimizer]

    def grads(scale: float) -> list[list[np.ndarray]]:
        return [[np.asarray(scale * rng.standard_normal(s)) for s in group] for group in GROUP_SHAPES]

    if entry == "torch":
        params = [[torch.nn.Parameter(torch.from_numpy(v.copy())) for v in group] for group in values]
        flat = [p for group in params for p in group]
        opt = _torch_cls(optimizer)(
            [{"params": params[0]}, {"params": params[1], "lr": 0.5 * hp["lr"], "weight_decay": 0.0}], **hp, **path
        )
        for scale in (1.0, 0.5):
            for p, g in zip(flat, [g for group in grads(scale) for g in group], strict=True):
                p.grad = torch.from_numpy(g)
            opt.step()
        for p, g in zip(flat, [g for group in grads(2.0) for g in group], strict=True):
            p.grad = torch.from_numpy(g)
        if isinstance(bad, Bad):
            flat[-1].grad.data = torch.from_numpy(bad_numpy_value(bad))  # torch checks .grad, not .grad.data
        else:
            opt.param_groups[1]["lr"] = -1.0
        before = _torch_snapshot(opt, flat)
        with pytest.raises(Exception) as exc:
            opt.step()
        assert_same(before, _torch_snapshot(opt, flat))
    else:
        opt = _array_cls(optimizer)(
            [
                {"params": [lib.array(v) for v in values[0]]},
                {"params": [lib.array(v) for v in values[1]], "lr": 0.5 * hp["lr"], "weight_decay": 0.0},
            ],
            **hp,
            **path,
        )
        for scale in (1.0, 0.5):
            opt.step([[lib.array(g) for g in group] for group in grads(scale)])
        last = [[lib.array(g) for g in group] for group in grads(2.0)]
        if isinstance(bad, Bad):
            last[1][-1] = make_bad(lib, bad)
        else:
            opt.param_groups[1]["lr"] = -1.0
        before = _array_snapshot(opt)
        with pytest.raises(Exception) as exc:
            opt.step(last)
        assert_same(before, _array_snapshot(opt))
    case = bad if isinstance(bad, Bad) else HYPER[0]  # HYPER[0]: lr=-1.0
    assert type(exc.value) is case.error and re.search(case.match, str(exc.value)), str(exc.value)
    if isinstance(bad, Bad):
        label = r"param_groups\[1\]\['params'\]\[2\]" if entry == "torch" else r"grads\[1\]\[2\]"
        assert re.search(label, str(exc.value)), str(exc.value)


# ---------------------------------------------------------------------------------------------
# Not bad input: a grad of another floating precision than its param. The core, adamp_core.tree,
# adamp_array and adamp_optax accept it and compute in the param's dtype (the grad is cast first, so the
# result equals the step on the cast grad: bit for bit for the pure steps, up to rounding where adamp_array
# takes its fused kernels for one of the two); adamp_torch follows torch.optim and requires
# grad.dtype == param.dtype.


@pytest.mark.parametrize("param_dtype,grad_dtype", [("float64", "float32"), ("float32", "float64")])
@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_grad_of_another_precision(optimizer: str, param_dtype: str, grad_dtype: str) -> None:
    p1, g1, p2, g2 = good_values()
    hp = HP_GOOD[optimizer]
    init, step = _core_fns(optimizer)
    for libname in ("numpy", "torch", "jax"):
        lib = Lib(libname)
        w = lib.array(p2.astype(param_dtype))
        g_other, g_cast = lib.array(g2.astype(grad_dtype)), lib.array(g2.astype(grad_dtype).astype(param_dtype))
        ours, ref = step(w, g_other, init(w), **hp), step(w, g_cast, init(w), **hp)
        _same_arrays_as(snapshot_arrays(ours), snapshot_arrays(ref))
        assert str(ours[0].dtype).endswith(param_dtype)
    tree_step = ac.tree.adamp_step if optimizer == "adamp" else ac.tree.sgdp_step
    ws = [p1.astype(param_dtype), p2.astype(param_dtype)]
    _same_arrays_as(
        snapshot_arrays(tree_step(ws, [g1.astype(grad_dtype), g2.astype(grad_dtype)], [init(w) for w in ws], **hp)),
        snapshot_arrays(
            tree_step(
                ws,
                [g1.astype(grad_dtype).astype(param_dtype), g2.astype(grad_dtype).astype(param_dtype)],
                [init(w) for w in ws],
                **hp,
            )
        ),
    )
    a, b = _array_cls(optimizer)([p2.astype(param_dtype)], **hp), _array_cls(optimizer)([p2.astype(param_dtype)], **hp)
    a.step([g2.astype(grad_dtype)])
    b.step([g2.astype(grad_dtype).astype(param_dtype)])
    # adamp_array may take its fused in-place kernels for one of the two (same dtypes) and the pure step for
    # the other (mixed dtypes): equal up to rounding, and in the param's dtype
    assert a.params[0].dtype == b.params[0].dtype == np.dtype(param_dtype)
    rtol = 4 * float(np.finfo(param_dtype).eps)
    np.testing.assert_allclose(a.params[0], b.params[0], rtol=rtol, atol=rtol * float(np.max(np.abs(b.params[0]))))
    tx = _optax_fn(optimizer)(**_optax_kwargs(hp))
    wj = {"z": jnp.asarray(p2.astype(param_dtype))}
    u_other = tx.update({"z": jnp.asarray(g2.astype(grad_dtype))}, tx.init(wj), wj)
    u_cast = tx.update({"z": jnp.asarray(g2.astype(grad_dtype).astype(param_dtype))}, tx.init(wj), wj)
    _same_arrays_as(jax.tree.leaves(u_other), jax.tree.leaves(u_cast))
    # adamp_torch: torch.optim's rule (torch itself refuses such a .grad; set through .grad.data)
    params = _torch_params()
    params = [torch.nn.Parameter(p.detach().to(getattr(torch, param_dtype))) for p in params]
    opt = _torch_cls(optimizer)(params, **hp)
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad.data = torch.from_numpy(g2.astype(grad_dtype))
    before = _torch_snapshot(opt, params)
    with pytest.raises(TypeError, match=rf"param_groups\[0\]\['params'\]\[1\].*{grad_dtype}.*{param_dtype}"):
        opt.step()
    assert_same(before, _torch_snapshot(opt, params))
