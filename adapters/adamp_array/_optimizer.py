"""The stateful optimizer shared by :class:`adamp_array.AdamP` and :class:`adamp_array.SGDP`.

It owns the bookkeeping only (param groups, per-param states, writing results back); every
update is chosen and computed by ``adamp_core`` (:func:`adamp_core.dispatch.step`, after the checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from array_api_compat import is_torch_array, is_writeable_array

from adamp_core import dispatch
from adamp_core.arrays import check_array, check_grad, check_hyper_arrays
from adamp_core.hyperparams import check_flag, check_fused
from adamp_core.optimizers import REQUIRED, OptimizerSpec

from ._convert import plain_hyperparam, plain_int, to_like, unflatten_state_dict

__all__ = ["ArrayOptimizer"]


# Group keys of adamp_torch's state dicts that adamp_array has as optimizer-wide options (or not at all):
# a checkpoint of the torch adapter loads here (maximize must be False).
_TORCH_GROUP_KEYS = ("maximize", "state_dtype", "skip_nonfinite", "fused", "foreach", "capturable")


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _keys(container: Any) -> list[Any]:
    return list(container.keys()) if isinstance(container, Mapping) else list(range(len(container)))


def _label(group: int | None, key: Any) -> str:
    return (f"[{group}]" if group is not None else "") + f"[{key!r}]"


def _write_in_place(param: Any, new: Any) -> bool:
    """Copy ``new`` into the user's array ``param`` when its library allows it; False when it does not
    (JAX, read-only NumPy, ...), in which case the optimizer holds ``new`` instead."""
    if not is_writeable_array(param):  # JAX, read-only NumPy, ...
        return False
    try:
        if is_torch_array(param):
            param.copy_(new)  # under torch.no_grad() (see step)
        else:
            param[...] = new
    except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


class ArrayOptimizer:
    """Param groups and per-param ``adamp_core`` states over arrays of any array-API library: the
    bookkeeping of :class:`adamp_array.AdamP` and :class:`adamp_array.SGDP`, which add their signature,
    docstring and :class:`adamp_core.optimizers.OptimizerSpec`; every step goes through
    :func:`adamp_core.dispatch.step`.
    """

    _spec: OptimizerSpec

    def __init__(self, params: Any, given: dict[str, Any]) -> None:
        """``given``: the subclass's arguments (its ``locals()``): the spec's hyperparameters and the
        keyword options ``state_dtype``, ``skip_nonfinite``, ``fused`` and ``foreach``."""
        defaults = {n: given[n] for n in self._spec.names}
        if defaults["lr"] is not REQUIRED:  # else every param group must give it
            self._spec.checked(defaults)
        state_dtype, skip_nonfinite = given["state_dtype"], given["skip_nonfinite"]
        fused, foreach = given["fused"], given["foreach"]
        self.defaults = dict(defaults)
        self._state_dtype = state_dtype
        self.skip_nonfinite = check_flag(skip_nonfinite, "skip_nonfinite")
        check_fused(fused)
        self.fused = fused
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach value: {foreach!r} (expected None, True or False)")
        self.foreach = foreach
        self._skips: dict[tuple[int, Any], int] = {}  # (group, key) -> steps skipped for a non-finite grad
        groups, self._layout = self._parse(params)
        self.param_groups: list[dict[str, Any]] = []
        self._kinds: list[type] = []  # list, tuple or dict: how each group's params were given
        self._states: list[dict[Any, Any]] = []
        self._held: set[tuple[int, Any]] = set()  # params the optimizer holds (their library refused a write)
        self._plans: dict[int, dispatch.Plans] = {}  # per group: what the execution paths built, kept
        seen: dict[int, str] = {}
        grouped = self._layout == "groups"
        for gi, given in enumerate(groups):
            unknown = sorted(set(given) - {"params", *self._hp_names}, key=str)
            if unknown:
                raise ValueError(
                    f"Invalid param group key(s) {unknown} in param_groups[{gi}] "
                    f"({self._name} takes: params, {', '.join(self._hp_names)})"
                )
            container = given["params"]
            if isinstance(container, Mapping):
                kind, params_c = dict, dict(container)
            elif isinstance(container, (list, tuple)):
                kind, params_c = type(container) if isinstance(container, tuple) else list, list(container)
            elif _is_array(container) or isinstance(container, (str, bytes)) or not isinstance(container, Iterable):
                raise TypeError(
                    f"params{'[' + str(gi) + ']' if grouped else ''} must be a list, tuple or dict of arrays, "
                    f"got {type(container).__name__}"
                )
            else:
                kind, params_c = list, list(container)
            group = {**self.defaults, **{k: v for k, v in given.items() if k != "params"}, "params": params_c}
            self._check_group(group, gi if grouped else None)
            states = {}
            for k in _keys(params_c):
                p = params_c[k]
                where = "params" + _label(gi if grouped else None, k)
                check_array(p, where)
                if id(p) in seen:
                    raise ValueError(f"{where} is the same array as {seen[id(p)]}; a param may appear only once")
                seen[id(p)] = where
                states[k] = self._fresh_state(p)
            self.param_groups.append(group)
            self._kinds.append(kind)
            self._states.append(states)

    # -- structure -------------------------------------------------------------------------

    @staticmethod
    def _parse(params: Any) -> tuple[list[Mapping[str, Any]], str]:
        if _is_array(params) or isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
            raise TypeError(
                f"params must be a list or dict of arrays, or a list of param-group dicts, got {type(params).__name__}"
            )
        if isinstance(params, Mapping):
            return [{"params": params}], "dict"
        kind = "tuple" if isinstance(params, tuple) else "list"
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        is_group = [isinstance(x, Mapping) for x in items]
        if all(is_group):
            for gi, g in enumerate(items):
                if "params" not in g:
                    raise ValueError(f"param_groups[{gi}] has no 'params' entry")
            return items, "groups"
        if any(is_group):
            raise TypeError("params must be either all arrays or all param-group dicts, not a mix")
        return [{"params": tuple(items) if kind == "tuple" else items}], kind

    def _export(self, gi: int, values: Mapping[Any, Any]) -> Any:
        kind = self._kinds[gi]
        if kind is dict:
            return dict(values)
        seq = [values[k] for k in range(len(values))]
        return tuple(seq) if kind is tuple else seq

    def _structure(self, per_group: list[Any]) -> Any:
        if self._layout != "groups":
            return per_group[0]
        return [
            {**{k: v for k, v in g.items() if k != "params"}, "params": c}
            for g, c in zip(self.param_groups, per_group, strict=True)
        ]

    @property
    def params(self) -> Any:
        """The current params, in the structure given to the constructor. Arrays updated in place are
        the user's own objects; immutable ones (JAX, read-only NumPy) are the optimizer's new arrays."""
        return self._structure([self._export(gi, g["params"]) for gi, g in enumerate(self.param_groups)])

    @property
    def nonfinite_skips(self) -> Any:
        """How many steps each param skipped for a non-finite grad (``skip_nonfinite=True``), as Python
        ints in the params' structure. Not part of :meth:`state_dict`."""
        return self._structure(
            [
                self._export(gi, {k: self._skips.get((gi, k), 0) for k in _keys(g["params"])})
                for gi, g in enumerate(self.param_groups)
            ]
        )

    @property
    def states(self) -> Any:
        """The ``adamp_core`` state (NamedTuple) of every param, in the params' structure."""
        return self._structure([self._export(gi, s) for gi, s in enumerate(self._states)])

    def _split_grads(self, grads: Any) -> list[Any]:
        if self._layout != "groups":
            return [self._match(grads, self.param_groups[0]["params"], "grads")]
        if _is_array(grads) or isinstance(grads, Mapping) or not isinstance(grads, (list, tuple)):
            raise TypeError(
                f"grads must be a list with one entry per param group ({len(self.param_groups)}), "
                f"got {type(grads).__name__}"
            )
        if len(grads) != len(self.param_groups):
            raise ValueError(f"grads has {len(grads)} entries but there are {len(self.param_groups)} param groups")
        out = []
        for gi, (g, group) in enumerate(zip(grads, self.param_groups, strict=True)):
            params = group["params"]
            # Accept the group-dict form {"params": grads} as well as the bare container.
            if (
                isinstance(g, Mapping)
                and set(g) == {"params"}
                and not (isinstance(params, Mapping) and set(params) == {"params"})
            ):
                g = g["params"]
            out.append(self._match(g, params, f"grads[{gi}]"))
        return out

    @staticmethod
    def _match(grads: Any, params: Any, what: str) -> Any:
        if isinstance(params, Mapping):
            if not isinstance(grads, Mapping):
                raise TypeError(f"{what} must be a dict with the params' keys, got {type(grads).__name__}")
            if set(grads) != set(params):
                missing = sorted(set(params) - set(grads), key=str)
                extra = sorted(set(grads) - set(params), key=str)
                raise ValueError(f"{what} keys differ from the params' keys (missing {missing}, unexpected {extra})")
            return grads
        if _is_array(grads) or isinstance(grads, Mapping) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"{what} must be a list of {len(params)} arrays (or None), got {type(grads).__name__}")
        if len(grads) != len(params):
            raise ValueError(f"{what} has {len(grads)} entries but there are {len(params)} params")
        return grads

    # -- hyperparameters and states ----------------------------------------------------------

    def _check_group(self, group: Mapping[str, Any], gi: int | None) -> Any:
        missing = [n for n in self._hp_names if n not in group]
        if missing:
            raise ValueError(f"param_groups[{gi or 0}] is missing hyperparameter(s) {missing}")
        if group["lr"] is REQUIRED:
            raise ValueError(
                f"{self._name}: lr is required (pass lr=... or give every param group an 'lr'); "
                f"missing in param_groups[{gi or 0}]"
            )
        try:
            return self._spec.checked(group)
        except (TypeError, ValueError) as exc:
            if gi is None:
                raise
            raise type(exc)(f"{exc} (param_groups[{gi}])") from None

    @property
    def _name(self) -> str:
        return self._spec.name

    @property
    def _hp_names(self) -> tuple[str, ...]:
        return self._spec.names

    def _fresh_state(self, param: Any) -> Any:
        # A Python-int step count: the bias corrections are then Python-float maths, exactly as adamp 0.3.0.
        state = self._spec.init(param, state_dtype=self._state_dtype)
        return state._replace(step=0) if self._spec.has_step else state

    # -- the step --------------------------------------------------------------------------

    def step(self, grads: Any) -> Any:
        """Update every param that has a grad (``None`` skips a param); return :attr:`params`.

        Everything is checked first (every group's hyperparameters, every grad's library, shape,
        dtype and device, every state), so a bad entry anywhere raises before any param or state
        changes. Then each param is updated by ``adamp_core`` and written back in place where its
        library allows it.
        """
        grouped = self._layout == "groups"
        hps = [self._check_group(g, gi if grouped else None) for gi, g in enumerate(self.param_groups)]
        per_group = self._split_grads(grads)
        todo = []
        for gi, (group, ggrads) in enumerate(zip(self.param_groups, per_group, strict=True)):
            params = group["params"]
            for k in _keys(params):
                where = _label(gi if grouped else None, k)
                p, g = params[k], ggrads[k]
                xp = check_array(p, "params" + where)
                if g is None:
                    continue
                check_grad(p, g, "grads" + where)
                try:
                    check_hyper_arrays(p, hps[gi])
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{exc} (param_groups[{gi}])") from None
                try:
                    self._spec.check_state(p, self._states[gi][k])
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"state{where}: {exc}") from None
                todo.append((gi, k, xp, p, g))
        by_group: dict[int, list[tuple[Any, Any, Any]]] = {}
        for gi, k, _, p, g in todo:
            by_group.setdefault(gi, []).append((k, p, g))
        with self._no_grad(todo):
            for gi, entries in by_group.items():
                states = self._states[gi]
                # Arrays handed out once held by the optimizer (their library refused a write) are never
                # written afterwards: not in place by the kernels either.
                tensors = [dispatch.Tensor(p, g, states[k], writable=(gi, k) not in self._held) for k, p, g in entries]

                def write_back(idx: list[int], outcomes: list[dispatch.Outcome], gi: int = gi, entries: Any = entries,
                               states: Any = states) -> None:
                    for i, o in zip(idx, outcomes, strict=True):  # as each unit is done: no pile of new arrays
                        k, p, _ = entries[i]
                        # skip_nonfinite: the flag is read on the host (free for NumPy, one sync per array on
                        # a device); a skipped tensor keeps its state (its count not advanced).
                        if o.ok is not None and not bool(o.ok):
                            self._skips[(gi, k)] = self._skips.get((gi, k), 0) + 1
                        elif o.param is not None:
                            self._write_back(gi, k, p, o.param, o.state)
                        elif o.state is not None:  # written in place; a Python-int count advanced by the path
                            states[k] = o.state

                dispatch.step(self._spec, tensors, hps[gi], skip_nonfinite=self.skip_nonfinite, fused=self.fused,
                              foreach=self.foreach, sink=write_back, plans=self._plans.setdefault(gi, dispatch.Plans()))
        return self.params

    def _write_back(self, gi: int, k: Any, p: Any, new_p: Any, new_s: Any) -> None:
        # Once a param's array refused a write (JAX, read-only NumPy) the optimizer holds a new
        # array at every step, so arrays handed out earlier are never changed afterwards.
        if (gi, k) in self._held or not _write_in_place(p, new_p):
            self._held.add((gi, k))
            self.param_groups[gi]["params"][k] = new_p
        self._states[gi][k] = new_s

    @staticmethod
    def _no_grad(todo: list[Any]) -> Any:
        # Torch tensors used as plain arrays: no autograd graph through the update (or the stored state).
        if any(is_torch_array(item[3]) for item in todo):
            import torch

            return torch.no_grad()
        return contextlib.nullcontext()

    # -- state dict ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {i: {"step": int, "exp_avg": array, ...}}, "param_groups": [{hyperparameters...,
        "params": [i, ...]}]}``: the layout of ``torch.optim`` and of ``adamp==0.3.0``, with params numbered
        across groups in order. It is a snapshot: the optimizer never writes state arrays in place.
        Save it with ``numpy.savez(f, **adamp_array.flatten_state_dict(sd))``."""
        state: dict[int, dict[str, Any]] = {}
        groups = []
        index = 0
        for gi, group in enumerate(self.param_groups):
            keys = _keys(group["params"])
            entry = {n: (tuple(group[n]) if n == "betas" else group[n]) for n in self._hp_names}
            entry["params"] = list(range(index, index + len(keys)))
            if self._kinds[gi] is dict and all(isinstance(k, str) for k in keys):
                entry["param_names"] = list(keys)
            for i, k in zip(entry["params"], keys, strict=True):
                state[i] = dict(self._states[gi][k]._asdict())
            groups.append(entry)
            index += len(keys)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or from ``adamp.AdamP``/``SGDP`` 0.3.0 or the
        flat ``numpy.load`` form). Arrays may come from any library or device: each is copied to its
        param's library and device, in the dtype of the state it replaces. Params are matched by
        position; a param without a saved state starts afresh. Everything is checked before anything
        changes."""
        if isinstance(state_dict, Mapping) and "param_groups" not in state_dict:
            state_dict = unflatten_state_dict(state_dict)
        if not isinstance(state_dict, Mapping) or "state" not in state_dict:
            raise ValueError("state_dict must have 'state' and 'param_groups' entries")
        saved_groups, saved_state = list(state_dict["param_groups"]), state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer {len(self.param_groups)}"
            )
        new_hps, new_states = [], []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            keys = _keys(group["params"])
            extra = sorted(set(saved) - {"params", "param_names", *self._hp_names, *_TORCH_GROUP_KEYS}, key=str)
            if saved.get("maximize", False) not in (False, 0):
                raise ValueError(
                    f"loaded param_groups[{gi}] has maximize={saved['maximize']!r}: {self._name} of adamp_array"
                    " minimizes (negate the gradients instead)"
                )
            if extra:
                raise ValueError(
                    f"loaded param_groups[{gi}] has unexpected key(s) {extra}: not a {self._name} state dict (a state"
                    " dict of another optimizer?)"
                )
            missing = [n for n in ("params", *self._spec.official) if n not in saved]  # an absent option: default
            if missing:
                raise ValueError(f"loaded param_groups[{gi}] is missing {missing}")
            ids = plain_hyperparam("params", saved["params"])
            if len(ids) != len(keys):
                raise ValueError(
                    f"loaded param_groups[{gi}] has {len(ids)} params but the optimizer's group has {len(keys)}"
                )
            if "param_names" in saved and self._kinds[gi] is dict and all(isinstance(k, str) for k in keys):
                names = plain_hyperparam("param_names", saved["param_names"])
                if names != keys:
                    raise ValueError(f"loaded param_groups[{gi}] names params {names}, the optimizer {keys}")
            hp = {n: plain_hyperparam(n, saved[n]) if n in saved else self._spec.options[n] for n in self._hp_names}
            self._check_group(hp, gi)
            new_hps.append(hp)
            states = {}
            for i, k in zip(ids, keys, strict=True):
                entry = saved_state.get(i, saved_state.get(str(i)))
                states[k] = self._load_state(group["params"][k], entry, f"state[{i}]")
            new_states.append(states)
        for group, hp, states, gi in zip(self.param_groups, new_hps, new_states, range(len(new_hps)), strict=True):
            group.update(hp)
            self._states[gi] = states
        self._plans.clear()

    def _load_state(self, param: Any, entry: Any, what: str) -> Any:
        fresh = self._fresh_state(param)
        if entry is None:
            return fresh
        if not isinstance(entry, Mapping):
            raise TypeError(f"{what} must be a dict, got {type(entry).__name__}")
        names = type(fresh)._fields
        extra = sorted(set(entry) - set(names) - {"nonfinite_skips"}, key=str)  # adamp_torch's skip count
        missing = [n for n in names if n not in entry]
        if extra or missing:
            raise ValueError(
                f"{what} has keys {sorted(entry, key=str)}; a {self._name} state has {list(names)}"
                " (a state dict of another optimizer?)"
            )
        values = {}
        for n in names:
            if n == "step":
                values[n] = plain_int(entry[n], f"{what}.step")
            else:
                values[n] = to_like(entry[n], getattr(fresh, n), f"{what}.{n}")
        return type(fresh)(**values)

    def __repr__(self) -> str:
        lines = [f"{self._name} ("]
        for gi, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {gi}")
            lines.extend(f"    {n}: {g[n]}" for n in self._hp_names)
        return "\n".join(lines) + "\n)"
