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
import re
from typing import Any

import numpy as np
import pytest
from bad_inputs import ARRAYS, DTYPE, HYPER, SHAPE, Bad, BadHyper, bad_numpy_value, good_values

import adamp_core as ac

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
    states = [dict(s._asdict()) for s in opt.states]
    return snapshot([list(opt.params), states])


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
            with pytest.raises(Exception) as exc:
                tree_step(ws, gs, states, **case.kwargs)
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


def _na(reason: str) -> None:
    pytest.skip(f"not applicable: {reason}")


def _run_core(kind: str, lib: Lib, bad: Bad, optimizer: str) -> None:
    init, step = _core_fns(optimizer)
    p1, g1, p2, g2 = good_values()
    w1, w2, gr1, gr2 = lib.array(p1), lib.array(p2), lib.array(g1), lib.array(g2)
    label = LABELS[kind].get(bad.target)
    if bad.target == "state_dict":
        _na("state dicts belong to the stateful adapters; the core takes state objects")
    if bad.target == "missing_grad" and kind == "tree":
        _na("a None grad in adamp_core.tree skips its param (like torch.optim); see test_none_grad_skips")
    if bad.target == "grad":
        gr2 = make_bad(lib, bad)
        if gr2 is None:
            _na(f"{lib.name} has a single device here")
    elif bad.target == "missing_grad":
        gr2 = None
    if bad.target == "param":
        w2 = make_bad(lib, bad)
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
    if bad.target in ("state", "missing_grad"):
        _na("torch.optim keeps its own state (see the state_dict cases); a None grad skips its param")
    if bad.not_array or bad.library == "other" or bad.device == "other":
        _na("torch refuses to attach such a .grad (or param) itself, before the optimizer sees it")
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
    if bad.target in ("state", "missing_grad"):
        _na("adamp_array keeps its own state (see the state_dict cases); a None grad skips its param")
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
        if g[1] is None:
            _na(f"{lib.name} has a single device here")
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
    if bad.target == "state_dict":
        _na("an optax state is a pytree handed to update() (see the state cases), not a state dict")
    if bad.not_array:
        _na("in a pytree a list is a node, not a bad leaf")
    if bad.device == "other":
        _na("JAX has a single CPU device here")
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


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("bad", ARRAYS, ids=[b.id for b in ARRAYS])
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
