"""What AdamP and SGDP share as ``torch.optim.Optimizer`` subclasses: grad checks, lazy state,
``state_dtype``, and checkpoints that move both ways with the official ``adamp==0.3.0``.

No maths lives here; the update rules are in :mod:`adamp_core`.
"""

from __future__ import annotations

import collections
import functools
import itertools
import operator
from collections.abc import Callable
from typing import Any

import array_api_compat.torch as _xp_torch
import torch
from torch.optim.optimizer import required

from adamp_core import dispatch
from adamp_core.arrays import check_hyper_arrays
from adamp_core.diagnostics import step_diagnostics
from adamp_core.hyperparams import check_fused
from adamp_core.optimizers import OptimizerSpec

from ._distributed import is_dtensor, local_shards

__all__ = ["ProjectedOptimizer", "XP", "no_grad_step", "required"]

# The array-API namespace of every torch tensor (what ``array_namespace(p)`` returns), resolved
# once at import: no per-param or per-step lookup, and nothing for torch.compile to trace.
XP = _xp_torch


def no_grad_step(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``step`` without autograd, as ``torch.optim``'s ``_use_grad_for_differentiable`` does.

    The two ``graph_break`` calls are torch.optim's own (pytorch/pytorch#104053): they let AOTAutograd
    see the compiled step as an inference graph, so inductor updates params and state in place.
    """

    @functools.wraps(func)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        # torch read as a local, as torch.optim's wrapper does: dynamo resumes a frame that reads the module
        # global ``torch`` after a graph break only by giving the whole frame up (torch 2.13), and then every
        # call below it would be compiled as a frame of its own. torch._dynamo is loaded here, on the first
        # step, not at import (it loads triton).
        import torch._dynamo

        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            torch._dynamo.graph_break()
            return func(self, *args, **kwargs)
        finally:
            torch._dynamo.graph_break()
            torch.set_grad_enabled(prev)

    return step


def normalize_state_dtype(value: Any) -> torch.dtype | None:
    """``None`` (state in the param's dtype) or a real floating ``torch.dtype`` (also given as a name)."""
    if value is None:
        return None
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"Invalid state_dtype: {value!r} (expected None or a real floating torch.dtype)")
    return dtype


# Group keys that adamp 0.3.0 does not have.
_EXTRA_KEYS = ("maximize", "state_dtype", "skip_nonfinite", "fused", "foreach", "capturable")


_STRIDED = torch.strided


def _check_capturable(p: torch.Tensor, hp: Any) -> None:
    """With ``capturable=True``, a tensor hyperparameter must live on the params' device: a CPU scalar tensor
    beside device params is read on the host by every kernel launch (a CUDA graph would keep the value it had
    at capture)."""
    if p.device.type == "cpu":
        return
    for name, value in zip(hp._fields, hp, strict=True):
        for v in value if type(value) is tuple else (value,):
            if torch.is_tensor(v) and v.device != p.device:
                label = "learning rate" if name == "lr" else f"{name} value"
                raise ValueError(f"Invalid {label}: a tensor on {v.device} with capturable=True and params on"
                                 f" {p.device} (put it on {p.device})")


def _eager_group(opt: ProjectedOptimizer, gi: int) -> None:
    """One group's eager step; a compiled step calls it through ``torch.compiler.disable`` (a graph break)."""
    group = opt.param_groups[gi]
    opt._step_group(gi, group, opt._check_hyper(group), [p.grad for p in group["params"]], None, False)


_EAGER_GROUP: list[Any] = [None]  # _eager_group under torch.compiler.disable, made on first need


def _label(gi: int, pi: int) -> str:
    return f"param_groups[{gi}]['params'][{pi}]"


class _GroupView:
    """One param group as the dispatcher takes it, kept between steps: its params with a grad (``owners``),
    their :class:`adamp_core.dispatch.Tensor` (state created on first use, DTensors as their local rows) and
    the dispatcher's :class:`adamp_core.dispatch.Plans`. It holds while the group's params, their storage,
    grad objects, state dicts and state tensors are the same objects and its options the same
    (:meth:`holds`); then a step does no per-tensor Python beyond reading the grads and the params' storage.
    New grad objects (the default ``zero_grad(set_to_none=True)``) are handed to the dispatcher apart from
    the kept tensors (:meth:`grads_for`)."""

    __slots__ = ("params", "grads", "ptrs", "states", "state_version", "tracked", "arrays", "owners", "tensors",
                 "plans", "devices", "options", "passes", "cacheable", "where")

    @classmethod
    def build(cls, opt: ProjectedOptimizer, group: dict[str, Any], grads: list[Any], traced: bool = False
              ) -> _GroupView:
        spec = opt._spec
        v = cls()
        v.params, v.grads = list(group["params"]), grads
        v.owners, v.tensors, v.where = [], [], []
        dtensor = False
        for pi, (p, grad) in enumerate(zip(v.params, grads, strict=True)):
            if grad is None:
                continue
            state = opt.state[p]
            if len(state) == 0:
                state.update(opt._new_state(group, p))
            if group["skip_nonfinite"]:
                opt._skip_counter(p)  # every stepped param has one from its first step on
            local, g, bufs, rows = local_shards(p, grad, *(state[k] for k in spec.buffers))
            dtensor = dtensor or is_dtensor(p)
            core = spec.state(state["step"], *bufs) if spec.has_step else spec.state(*bufs)
            # A DTensor left whole (not sharded by rows) runs through DTensor's propagation: alone.
            v.tensors.append(dispatch.Tensor(local, g, core, rows, alone=is_dtensor(local)))
            v.owners.append(p)
            v.where.append(pi)
        v.states = [opt.state[p] for p in v.owners]
        v.state_version = getattr(opt.state, "version", None)
        # state dicts of ours count their own changes; others (a deep copy's) are compared entry by entry
        v.tracked = v.state_version is not None and all(type(st) is _TrackedDict and st._owner is opt.state
                                                        for st in v.states)
        v.arrays = _state_arrays(v.states)
        v.ptrs = [p.data_ptr() for p in v.owners] if not (dtensor or traced) else None
        v.devices = {p.device: p for p in reversed(v.owners)}  # one param per device (the first)
        v.options = _view_options(group)
        v.plans = dispatch.Plans()
        ids = [id(p) for p in v.owners]
        v.passes = [None] if len(set(ids)) == len(ids) else _occurrence_passes(ids)
        # DTensors give new local tensors at every step; a group with a param listed twice steps in passes.
        v.cacheable = not (dtensor or traced) and v.passes == [None]
        return v

    def holds(self, opt: ProjectedOptimizer, group: dict[str, Any], params: list[Any], grads: list[Any]) -> bool:
        """Whether this view still describes ``group``: the same params (same storage: ``model.to()`` moves
        ``p.data``), the same set of params with a grad, the same state dicts and tensors, the same options."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return False
        if _view_options(group) != self.options:
            return False
        where = self.where  # the same grad objects: the same params have one (no list.count(None): it uses ==)
        if not all(map(operator.is_, grads, self.grads)) and (
                len(where) != sum(1 for g in grads if g is not None) or any(grads[i] is None for i in where)):
            return False
        if [p.data_ptr() for p in self.owners] != self.ptrs:
            return False
        # a param's state dict, or an entry of one, replaced (opt.state[p] = ..., opt.state[p]["exp_avg"] = ...)
        # counts in the version; state dicts not of ours (a deep copy's) are compared entry by entry
        if getattr(opt.state, "version", None) != self.state_version:
            return False
        return self.tracked or all(map(operator.is_, _state_arrays(self.states), self.arrays))

    def grads_for(self, grads: list[Any], maximize: bool) -> list[Any]:
        """This step's grads of the view's tensors (negated for ``maximize``, from this step's values); the
        tensors themselves are kept: the dispatcher takes the grads apart."""
        self.grads = grads
        # a kept view holds plain tensors (its grads are the params' own); one built for this step only holds
        # the local rows of DTensors
        new = [grads[i] for i in self.where] if self.cacheable else [t.grad for t in self.tensors]
        if maximize and new:
            return [torch.neg(g) for g in new] if any(is_dtensor(g) for g in new) else torch._foreach_neg(new)
        return new


class _Counted:
    """Mutators that count a change (``_changed``) before making it: what lets a view notice a replaced state
    entry without looking at every one."""

    __slots__ = ()

    def _changed(self) -> None:
        raise NotImplementedError

    def __setitem__(self, key: Any, value: Any) -> None:
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._changed()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self._changed()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._changed()
        return super().popitem()

    def clear(self) -> None:
        self._changed()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._changed()
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._changed()
        return super().setdefault(key, default)


class _TrackedState(_Counted, collections.defaultdict):
    """``optimizer.state`` (torch's ``defaultdict(dict)``) whose ``version`` counts every change of its
    entries and of their per-param dicts (:class:`_TrackedDict`): a param's state, or a tensor of it,
    replaced is seen by a view without looking every param up. Pickles as torch's own defaultdict."""

    def __init__(self, state: Any = ()) -> None:
        super().__init__(functools.partial(_TrackedDict, self))
        self.version = 0
        for key, value in dict(state).items():  # the optimizer's own dicts (new, or load_state_dict's)
            dict.__setitem__(self, key, _TrackedDict(self, value) if type(value) is dict else value)

    def _changed(self) -> None:
        self.version += 1

    def __reduce__(self) -> Any:
        return (collections.defaultdict, (dict, {k: dict(v) for k, v in self.items()}))


class _TrackedDict(_Counted, dict):
    """The state of one param: a dict whose changes count in its :class:`_TrackedState`'s version."""

    __slots__ = ("_owner",)

    def __init__(self, owner: _TrackedState, *args: Any) -> None:
        super().__init__(*args)
        self._owner = owner

    def _changed(self) -> None:
        self._owner.version += 1

    def __reduce__(self) -> Any:  # a plain dict in checkpoints and copies
        return (dict, (dict(self),))


def _state_arrays(states: list[dict[str, Any]]) -> list[Any]:
    return [x for st in states for x in st.values()]


def _view_options(group: dict[str, Any]) -> tuple[Any, ...]:
    return (group["maximize"], group["skip_nonfinite"])


def _occurrence_passes(ids: list[int]) -> list[list[int]]:
    """Indices split into passes by occurrence: a param listed twice is stepped twice, one pass after the
    other, each on the state the last one left, as ``adamp==0.3.0`` (and ``torch.optim``) step it."""
    seen: dict[int, int] = {}
    passes: list[list[int]] = []
    for i, key in enumerate(ids):
        k = seen[key] = seen.get(key, -1) + 1
        if k == len(passes):
            passes.append([])
        passes[k].append(i)
    return passes


class ProjectedOptimizer(torch.optim.Optimizer):
    """Base of :class:`adamp_torch.AdamP` and :class:`adamp_torch.SGDP` (not public): everything but the
    signature and the docstring, which a subclass adds with its :class:`adamp_core.optimizers.OptimizerSpec`."""

    _spec: OptimizerSpec
    _diagnostics: dict[torch.Tensor, Any] | None = None  # see record_diagnostics

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("_spec")
        if spec is not None:  # the NamedTuple of the spec's checked hyperparameters (built in a traced step)
            cls._hyper = type(spec.check(**{**spec.all_defaults, "lr": 1e-3}))

    def __init__(self, params: Any, given: dict[str, Any]) -> None:
        """``given``: the subclass's arguments (its ``locals()``): the spec's hyperparameters and this
        adapter's options."""
        defaults = {n: given[n] for n in (*self._spec.names, *_EXTRA_KEYS)}
        defaults["state_dtype"] = normalize_state_dtype(defaults["state_dtype"])
        # lr may be left to the param groups (adamp 0.3.0 uses torch's `required` too).
        self._check_hyper({**defaults, "lr": 0.0} if defaults["lr"] is required else defaults)
        super().__init__(params, defaults)
        self.state = _TrackedState(self.state)

    @property
    def _name(self) -> str:
        return self._spec.name

    @property
    def _state_keys(self) -> tuple[str, ...]:
        """The per-param state arrays, shaped like the param (``exp_avg``, ``exp_avg_sq``; ``momentum``)."""
        return self._spec.buffers

    @property
    def _has_step(self) -> bool:
        return self._spec.has_step

    @property
    def _group_keys(self) -> tuple[str, ...]:
        """The hyperparameter names every saved group must have: those of adamp 0.3.0's groups (the spec's
        official ones; an option such as ``caution`` that a group lacks means its default). Not
        ``self.defaults``: torch's ``__setstate__`` adds keys of its own there (``differentiable``), which no
        saved group needs to carry."""
        return self._spec.official

    # -- hyperparameters ---------------------------------------------------------------------
    def _check_hyper(self, group: dict[str, Any]) -> Any:
        """Validated hyperparameters of ``group`` (an adamp_core NamedTuple); raises on a bad one."""
        self._check_flags(group)
        return self._spec.checked(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, refusing bad hyperparameters and complex params
        before the group is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        merged = {**self.defaults, **param_group}
        if all(v is not required for v in merged.values()):  # else torch raises its own error below
            self._check_hyper(merged)
        if "state_dtype" in param_group:
            param_group = {**param_group, "state_dtype": normalize_state_dtype(param_group["state_dtype"])}
        super().add_param_group(param_group)
        self._views.clear()
        group = self.param_groups[-1]
        for pi, p in enumerate(group["params"]):
            if p.is_complex() or not p.is_floating_point():
                self.param_groups.pop()
                raise TypeError(
                    f"{self._name} supports real floating params only: {_label(len(self.param_groups), pi)} has dtype"
                    f" {p.dtype}"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if type(self.__dict__.get("state")) is not _TrackedState:  # load_state_dict, unpickling
            self.state = _TrackedState(self.state)
        self._views.clear()
        # Groups saved by adamp==0.3.0 (or an older version of this package) lack our extra keys and the
        # spec's options (caution...): those mean their defaults, which step as adamp 0.3.0 does.
        for group in self.param_groups:
            for name, default in self._spec.options.items():
                group.setdefault(name, default)
            group.setdefault("maximize", False)
            group.setdefault("state_dtype", None)
            group.setdefault("skip_nonfinite", False)
            group.setdefault("fused", None)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
        for name, default in self._spec.options.items():
            self.defaults.setdefault(name, default)
        self.defaults.setdefault("maximize", False)
        self.defaults.setdefault("state_dtype", None)
        self.defaults.setdefault("skip_nonfinite", False)
        self.defaults.setdefault("fused", None)
        self.defaults.setdefault("foreach", None)
        self.defaults.setdefault("capturable", False)

    # -- grads ------------------------------------------------------------------------------------
    @property
    def _views(self) -> dict[int, _GroupView]:
        """Per param group (by index): what the last step built for it (see :class:`_GroupView`)."""
        views = self.__dict__.get("_group_views")
        if views is None:
            views = self.__dict__["_group_views"] = {}
        return views

    def _check_grads(self) -> list[tuple[Any, list[Any], _GroupView | None]]:
        """Check every group's hyperparameters and every grad against its param (metadata only: no sync)
        before anything is written, so a bad grad anywhere leaves every param and every state as it was.
        Returns per group ``(hyperparameters, grads, view)``: ``view`` is the last step's
        :class:`_GroupView` where it still holds (then only new grad objects are checked)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            try:  # a group edited after construction (group["lr"] = ...) is checked here, before any write
                hp = self._check_hyper(group)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{exc} (param_groups[{gi}])") from None
            params = group["params"]
            grads = [p.grad for p in params]
            view = self._views.get(gi)
            if view is not None and not view.holds(self, group, params, grads):
                view = None
            if view is None:
                devices = {}
                for pi, (p, g) in enumerate(zip(params, grads, strict=True)):
                    if g is not None:
                        self._check_grad(gi, pi, p, g)
                        devices.setdefault(p.device, p)
            else:  # the view's params were checked, and its grad objects when first seen: new grads only
                devices, strided = view.devices, _STRIDED
                if not all(map(operator.is_, grads, view.grads)):
                    for pi, (p, g, old) in enumerate(zip(params, grads, view.grads, strict=True)):
                        if g is None or g is old:
                            continue
                        if (g.dtype is not p.dtype or g.layout is not strided or g.shape != p.shape
                                or g.device != p.device):
                            self._check_grad(gi, pi, p, g)  # raises, naming what is wrong
            self._check_hyper_arrays(gi, group, hp, devices.values())
            out.append((hp, grads, view))
        return out

    @staticmethod
    def _check_hyper_arrays(gi: int, group: dict[str, Any], hp: Any, params: Any) -> None:
        """Array hyperparameters against one param per device of the group (and, with ``capturable``, on it)."""
        for p in params:
            try:
                check_hyper_arrays(p, hp)
                if group.get("capturable", False):
                    _check_capturable(p, hp)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{exc} (param_groups[{gi}])") from None

    def _check_grad(self, gi: int, pi: int, p: torch.Tensor, g: torch.Tensor) -> None:
        """One grad against its param; the error names what is wrong."""
        if g.layout != torch.strided:
            raise RuntimeError(
                f"{self._name} does not support sparse gradients: {_label(gi, pi)} has a {g.layout} grad"
            )
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"{self._name} supports real floating params only: {_label(gi, pi)} has dtype {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"grad of {_label(gi, pi)} has dtype {g.dtype} but the param has dtype {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(
                f"grad of {_label(gi, pi)} has shape {tuple(g.shape)} but the param has shape {tuple(p.shape)}"
            )
        if g.device != p.device:
            raise ValueError(f"grad of {_label(gi, pi)} is on {g.device} but the param is on {p.device}")

    # -- lazy state ---------------------------------------------------------------------------------
    def _new_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        dtype = group.get("state_dtype") or p.dtype
        # preserve_format: state keeps the param's memory format (channels_last, transposed views).
        state: dict[str, Any] = {}
        if self._has_step:
            # A 0-d int64 tensor on the param's device: no host sync, no recompile per step under
            # torch.compile (a Python int would be a new constant every step).
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        for key in self._state_keys:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    # -- non-finite gradients (skip_nonfinite=True) ----------------------------------------------
    @staticmethod
    def _check_flags(group: dict[str, Any]) -> None:
        for name in ("maximize", "skip_nonfinite", "capturable"):
            if not isinstance(group.get(name, False), bool):
                raise TypeError(f"Invalid {name} value: {group[name]!r} (expected True or False)")
        check_fused(group.get("fused"))
        foreach = group.get("foreach")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach value: {foreach!r} (expected None, True or False)")

    # -- the step: framework glue around adamp_core.dispatch ---------------------------------------
    @no_grad_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` (re-evaluating the model and returning the
        loss) runs with grad enabled. Returns the closure's loss, or ``None``.

        Every grad and hyperparameter of every group is checked before any param or state is
        written; a sparse, complex, or mismatched (shape, dtype, device) grad raises. Each group is
        then stepped by :func:`adamp_core.dispatch.step` (which picks the fused kernels, the
        multi-tensor step or the per-tensor step, and keeps their plans between steps) and written back
        in place.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._traced_step()
            return loss
        checked = self._check_grads()
        for gi, (group, (hp, grads, view)) in enumerate(zip(self.param_groups, checked, strict=True)):
            self._step_group(gi, group, hp, grads, view, False)
        return loss

    # -- the step inside torch.compile ------------------------------------------------------------
    def _traced_step(self) -> None:
        """``step`` as dynamo traces it (``torch.compile(opt.step)``): per group, :meth:`_init_group` runs
        eagerly while tracing (dynamo calls an optimizer's ``_init_group`` with real tensors, as for
        ``torch.optim``: checks, lazy state, the group's tensors as graph inputs with static addresses),
        then the dispatcher's traced step (``traced=True``: the numba kernels as a torch operator on a CPU,
        else the array-API maths for inductor to fuse) and the write-back are traced into the graph. No
        view, plan or per-tensor Python value is kept: dynamo's guards are the only check at each call."""
        spec = self._spec
        fields, n_buf = spec.state._fields, len(spec.buffers)
        for gi, group in enumerate(self.param_groups):
            params: list[Any] = []
            grads: list[Any] = []
            steps: list[Any] = []
            bufs: list[Any] = []
            skips: list[Any] = []
            how = self._init_group(group, params, grads, steps, bufs, skips)
            if how == "none":
                continue
            if how == "eager":  # DTensors, a param listed twice: the eager step, outside the graph
                _EAGER_GROUP[0](self, gi)
                continue
            hp = self._traced_hyper(group)
            if group["maximize"]:
                grads = torch._foreach_neg(grads)
            tensors = []
            for i, p in enumerate(params):
                b = bufs[i * n_buf:(i + 1) * n_buf]
                tensors.append(dispatch.Tensor(p, grads[i], spec.state(steps[i], *b) if steps else spec.state(*b)))
            skip = group["skip_nonfinite"]

            def sink(idx: list[int], outcomes: list[dispatch.Outcome], tensors: Any = tensors, skip: bool = skip,
                     skips: list[Any] = skips) -> None:
                for i, o in zip(idx, outcomes, strict=True):
                    t = tensors[i]
                    if o.param is not None:  # new arrays (the array-API step): into the params and state
                        t.param.copy_(o.param)
                        for f in fields:
                            getattr(t.state, f).copy_(getattr(o.state, f))
                    if skip and o.skips is not None:
                        skips[i].add_(o.skips)
                    elif skip and o.ok is not None:
                        skips[i].add_(torch.logical_not(o.ok).to(torch.int64))

            # foreach: not inside torch.compile (the docstrings say so): inductor fuses the per-tensor steps
            # across tensors itself, and the multi-tensor step's grouping is Python over library objects
            dispatch.step(spec, tensors, hp, skip_nonfinite=skip, fused=group["fused"], foreach=None, traced=True,
                          sink=sink)

    def _init_group(self, group: dict[str, Any], params: list[Any], grads: list[Any], steps: list[Any],
                    bufs: list[Any], skips: list[Any]) -> str:
        """Run eagerly by dynamo while it traces :meth:`_traced_step` (its ``OptimizerVariable`` calls an
        optimizer's ``_init_group`` with the real group and empty lists, then makes what the lists hold
        graph inputs): checks the group's hyperparameters and grads (before anything is written), creates
        missing state, loads what the traced step calls (:func:`adamp_core.dispatch.prepare_traced`), and
        fills the lists with the params that have a grad, their grads, step counts, state buffers (flat,
        in the spec's order) and skip counters. Returns "none" (no grad), "eager" (DTensors, a param
        listed twice, diagnostics on: the eager step, behind a graph break) or "traced"."""
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        try:
            hp = self._check_hyper(group)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (param_groups[{gi}])") from None
        owners = []
        for pi, p in enumerate(group["params"]):
            if p.grad is not None:
                self._check_grad(gi, pi, p, p.grad)
                owners.append(p)
        if not owners:
            return "none"
        self._check_hyper_arrays(gi, group, hp, {p.device: p for p in owners}.values())
        if (any(is_dtensor(p) for p in owners) or len({id(p) for p in owners}) != len(owners)
                or self._diagnostics is not None):
            if _EAGER_GROUP[0] is None:  # made here, eagerly: torch.compiler.disable loads dynamo (and triton)
                _EAGER_GROUP[0] = torch.compiler.disable(_eager_group)
            return "eager"
        dispatch.prepare_traced(self._spec, group["fused"], owners[0])
        skip = group["skip_nonfinite"]
        for p in owners:
            state = self.state[p]
            if len(state) == 0:
                state.update(self._new_state(group, p))
            params.append(p)
            grads.append(p.grad)
            if self._has_step:
                steps.append(state["step"])
            bufs.extend(state[k] for k in self._state_keys)
            if skip:
                skips.append(self._skip_counter(p))
        return "traced"

    def _traced_hyper(self, group: dict[str, Any]) -> Any:
        """The group's hyperparameters as the spec's NamedTuple, built while tracing (their checks ran
        in :meth:`_init_group`): Python numbers become constants of the graph (a new float value is a
        recompile, as for ``torch.optim``), a 0-d tensor is a graph input."""
        values = {}
        for name, default in self._spec.all_defaults.items():
            v = group.get(name, default)
            if type(v) is int:
                v = float(v)
            elif type(v) is list or type(v) is tuple:
                v = tuple(float(x) if type(x) is int else x for x in v)
            values[name] = v
        return self._hyper(**values)

    def _step_group(self, gi: int, group: dict[str, Any], hp: Any, grads: list[Any], view: _GroupView | None,
                    traced: bool) -> None:
        if view is None:
            view = _GroupView.build(self, group, grads, traced)
            if view.cacheable:
                self._views[gi] = view
            elif not traced:  # a compiled step leaves our views alone (dynamo would guard on them)
                self._views.pop(gi, None)
        tensors, local_grads = view.tensors, view.grads_for(grads, group["maximize"])
        if not tensors:
            return
        owners = view.owners
        old = [t.param.clone() for t in tensors] if self._diagnostics is not None else None
        skipped: set[int] = set()
        skip = group["skip_nonfinite"]

        def write_back(idx: list[int], outcomes: list[dispatch.Outcome]) -> None:
            # As each unit (kernel call, group, tensor) is done: new arrays never pile up.
            self._write_back([owners[i] for i in idx], [tensors[i] for i in idx], outcomes, skip)
            if old is not None:
                skipped.update(i for i, o in zip(idx, outcomes, strict=True) if o.ok is False)

        for part in view.passes:  # one pass, or one per occurrence of a param listed more than once
            sub = tensors if part is None else [tensors[i] for i in part]
            sub_grads = local_grads if part is None else [local_grads[i] for i in part]
            sink = write_back if part is None else (lambda idx, o, part=part: write_back([part[i] for i in idx], o))
            dispatch.step(self._spec, sub, hp, skip_nonfinite=skip, fused=group["fused"], foreach=group["foreach"],
                          traced=traced, sink=sink, plans=view.plans if part is None else None, grads=sub_grads)
        if old is not None:
            for i, (p, t, g, before) in enumerate(zip(owners, tensors, local_grads, old, strict=True)):
                if i not in skipped:
                    self._diagnostics[p] = step_diagnostics(before, t.param, g, hp.delta, hp.eps)

    def _write_back(self, owners: list[torch.Tensor], tensors: list[dispatch.Tensor],
                    outcomes: list[dispatch.Outcome], skip: bool) -> None:
        """Write the dispatcher's new arrays into the params and their state, in place (params and state keep
        their identity, device and memory format), with one ``_foreach_copy_``, and count skipped steps
        with one ``_foreach_add_``. Kernels that wrote in place advanced their step counts themselves and
        hand their skips as flags (a host False, or device arrays): no sync."""
        first = outcomes[0] if outcomes else None
        if (not skip and first is not None and first.param is None and first.state is None
                and all(map(operator.is_, outcomes, itertools.repeat(first)))):
            return  # a unit written in place, step counts advanced: nothing to do (no per-tensor loop)
        fields = self._spec.state._fields
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        skipped: list[torch.Tensor] = []  # skip counters of tensors a host kernel did not write
        counters: list[torch.Tensor] = []  # skip counters with their device flags (1: skipped)
        flags: list[torch.Tensor] = []
        for p, t, o in zip(owners, tensors, outcomes, strict=True):
            if o.param is not None:
                dst += [t.param, *(getattr(t.state, f) for f in fields)]
                src += [o.param, *(getattr(o.state, f) for f in fields)]
            if skip:
                if o.ok is False:
                    skipped.append(self._skip_counter(p))
                elif o.skips is not None:
                    counters.append(self._skip_counter(p))
                    flags.append(o.skips)
                elif o.ok is not None:
                    counters.append(self._skip_counter(p))
                    flags.append(torch.logical_not(o.ok).to(torch.int64))
        if any(is_dtensor(x) for x in dst) or torch.compiler.is_compiling():
            for d, x in zip(dst, src, strict=True):
                d.copy_(x)
        elif dst:
            torch._foreach_copy_(dst, src)
        if skipped:
            torch._foreach_add_(skipped, 1)
        if counters:
            torch._foreach_add_(counters, flags)

    # -- diagnostics (issue: make the slowdown visible) -----------------------------------------
    def record_diagnostics(self, enabled: bool = True) -> None:
        """Record :func:`adamp_core.diagnostics.step_diagnostics` of every param at every step from now on
        (``enabled=False`` stops and drops the records). Off by default: then a step computes nothing
        for it. The latest record per param is :attr:`diagnostics`."""
        if not isinstance(enabled, bool):
            raise TypeError(f"Invalid enabled value: {enabled!r} (expected True or False)")
        self._diagnostics = {} if enabled else None

    @property
    def diagnostics(self) -> dict[torch.Tensor, Any]:
        """``{param: StepDiagnostics}`` of the last step (0-d tensors on the param's device, no sync; see
        :func:`adamp_core.diagnostics.to_host`). Empty until a step ran with :meth:`record_diagnostics` on."""
        return {} if self._diagnostics is None else self._diagnostics

    def _skip_counter(self, p: torch.Tensor) -> torch.Tensor:
        """``state["nonfinite_skips"]`` of ``p``: a 0-d int64 tensor on its device counting the steps
        skipped for a non-finite grad (created at the first step with ``skip_nonfinite=True``)."""
        state = self.state[p]
        if "nonfinite_skips" not in state:
            state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=p.device)
        return state["nonfinite_skips"]

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` with each ``step`` as a Python int, as ``adamp==0.3.0``
        stores it, so the official optimizer resumes from it with its own float64 bias correction.

        This reads the step counters back to the host: one transfer per device, not per param.
        """
        sd = super().state_dict()
        # plain per-param dicts, new ones (torch's are our live, change-counting ones): what torch.load's
        # weights_only unpickler and adamp 0.3.0 read
        sd["state"] = {k: dict(st) if isinstance(st, dict) else st for k, st in sd["state"].items()}
        if not self._has_step:
            return sd
        by_device: dict[torch.device, list[Any]] = {}
        for key, st in sd["state"].items():
            if torch.is_tensor(st.get("step")):
                by_device.setdefault(st["step"].device, []).append(key)
        steps: dict[Any, int] = {}
        for keys in by_device.values():
            values = torch.stack([sd["state"][k]["step"].reshape(()) for k in keys]).tolist()
            steps.update(zip(keys, (int(v) for v in values), strict=True))
        # New per-param dicts: the ones in sd["state"] are our live state dicts.
        sd["state"] = {k: ({**st, "step": steps[k]} if k in steps else st) for k, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, also for a state_dict of ``adamp==0.3.0``.

        Before loading, each state array's shape is checked against its param. After loading,
        ``step`` (Python int from adamp 0.3.0, or a tensor of any dtype) becomes our 0-d int64
        tensor on the param's device, and the state arrays are taken from the saved ones in the
        group's ``state_dtype`` (torch would have cast them to the param's dtype).
        """
        pairs = self._saved_pairs(state_dict)
        for gi, sg in enumerate(state_dict.get("param_groups", [])):
            missing = sorted(k for k in self._group_keys if k not in sg)
            if missing:
                raise ValueError(
                    f"loaded param_groups[{gi}] is missing {missing}: not a {self._name} state dict (a state dict of"
                    " another optimizer?)"
                )
        for saved_id, p, label in pairs:
            saved = state_dict["state"].get(saved_id, {})
            absent = [k for k in self._state_keys if saved and k not in saved]
            if absent:
                raise ValueError(
                    f"state_dict state {saved_id!r} of {label} has keys {sorted(saved)} but {self._name} needs"
                    f" {list(self._state_keys)}: not a {self._name} state dict (a state dict of another optimizer?)"
                )
            if self._has_step and "step" in saved and not torch.is_tensor(saved["step"]):
                _check_saved_step(saved["step"], label)
            for key in self._state_keys:
                v = saved.get(key)
                if torch.is_tensor(v) and v.shape != p.shape:
                    raise ValueError(
                        f"state_dict state {saved_id!r} ({key}) has shape {tuple(v.shape)} but {label} has shape"
                        f" {tuple(p.shape)}"
                    )
        # Our extra group keys that a saved group lacks (adamp 0.3.0 has neither) keep this
        # optimizer's values: loading an official checkpoint must not drop state_dtype=float32.
        kept = [
            {k: g[k] for k in _EXTRA_KEYS if k in g and k not in sg}
            for g, sg in zip(self.param_groups, state_dict.get("param_groups", []), strict=False)
        ]
        super().load_state_dict(state_dict)
        self._views.clear()
        for g, extra in zip(self.param_groups, kept, strict=False):
            g.update(extra)
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, p, _ in pairs:
            st = self.state.get(p)
            if not st:
                continue
            if self._has_step and "step" in st:
                st["step"] = _step_tensor(st["step"], p.device)
            if "nonfinite_skips" in st:  # torch casts it to the param's dtype: back to an int64 count
                st["nonfinite_skips"] = _step_tensor(st["nonfinite_skips"], p.device)
            dtype = groups[id(p)].get("state_dtype")
            if dtype is not None:
                saved = state_dict["state"].get(saved_id, {})
                for key in self._state_keys:
                    if torch.is_tensor(saved.get(key)):
                        st[key] = saved[key].to(device=p.device, dtype=dtype, copy=True)

    def _saved_pairs(self, state_dict: dict[str, Any]) -> list[tuple[Any, torch.Tensor, str]]:
        """(saved id, param, label) for each param, as torch's load_state_dict pairs them."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return []  # torch raises its own error
        pairs = []
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(sg["params"]) != len(g["params"]):
                return []
            pairs += [
                (sid, p, _label(gi, pi)) for pi, (sid, p) in enumerate(zip(sg["params"], g["params"], strict=True))
            ]
        return pairs


def _step_tensor(step: Any, device: torch.device) -> torch.Tensor:
    """A step count (int, or a tensor of any dtype, e.g. torch.optim.Adam's float32) as a 0-d int64
    tensor on ``device``."""
    if torch.is_tensor(step):
        if step.dtype.is_floating_point:
            step = torch.round(step)
        return step.reshape(()).to(device=device, dtype=torch.int64, copy=True)
    return torch.tensor(int(step), dtype=torch.int64, device=device)


def _check_saved_step(step: Any, label: str) -> None:
    if isinstance(step, bool) or not isinstance(step, int | float) or not (0 <= step < 2**62) or step != int(step):
        raise ValueError(f"Invalid saved step for {label}: {step!r} (expected a non-negative integer count)")
