"""AdamP/SGDP over many params at once: any nesting of lists, tuples and dicts of arrays (for JAX
arrays, any pytree: flax's ``{"params": {"dense": {"kernel": ...}}}``, ``FrozenDict``, ``nnx.State``).

``params``, ``grads`` and ``states`` have the same structure (same lengths, the same keys, at
every level; a state tree holds one AdamPState/SGDPState where the params hold an array). A
``None`` grad leaves its param and state as they are (like ``p.grad is None`` in torch.optim).
Every hyperparameter, grad and state is checked before anything is computed, so a bad entry
anywhere raises before any result exists; the error names the entry (``grads[3]``,
``grads['fc.weight']``, ``grads['params']['dense']['kernel']``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from ._common import finite_flag, keep_if_finite
from .adamp import AdamPState, adamp_update, check_adamp_state
from .adamp import adamp_init as _adamp_init
from .arrays import check_array, check_grad, check_hyper_arrays
from .hyperparams import check_adamp, check_flag, check_sgdp
from .sgdp import SGDPState, check_sgdp_state, sgdp_update
from .sgdp import sgdp_init as _sgdp_init

__all__ = ["adamp_init", "adamp_step", "sgdp_init", "sgdp_step"]


class _Node:
    """The structure of a params tree, down to its leaves (arrays, or None for a grad): built by
    :func:`_flatten`, it flattens grads and states *up to* it (their leaf positions may hold anything,
    e.g. one AdamPState each) and rebuilds a tree of the same type from new leaves."""

    __slots__ = ("kind", "keys", "children", "like")

    def __init__(self, kind: str, keys: list[Any], children: list[_Node], like: Any) -> None:
        self.kind, self.keys, self.children, self.like = kind, keys, children, like

    def flatten_up_to(self, tree: Any, what: str, out: list[Any]) -> None:
        if self.kind == "leaf":
            out.append(tree)
            return
        if self.kind == "pytree":  # a JAX pytree node (flax FrozenDict, nnx.State, a registered dataclass...)
            try:
                subtrees = self.like.flatten_up_to(tree)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{what} must have the same structure as params: {exc}") from None
        else:
            if (self.kind == "dict") != isinstance(tree, Mapping) or (
                self.kind == "seq" and not _is_sequence(tree)
            ):
                raise ValueError(f"{what} must have the same structure as params: {type(tree).__name__} vs"
                                 f" {type(self.like).__name__}")
            keys = list(tree.keys()) if self.kind == "dict" else list(range(len(tree)))
            if sorted(map(repr, keys)) != sorted(map(repr, self.keys)):
                raise ValueError(f"{what} must have the same structure as params: keys/length {keys} vs {self.keys}")
            subtrees = [tree[k] for k in self.keys]
        for key, child, sub in zip(self.keys, self.children, subtrees, strict=True):
            child.flatten_up_to(sub, f"{what}[{key!r}]" if self.kind != "pytree" else f"{what}{key}", out)

    def unflatten(self, leaves: Any) -> Any:
        """A tree shaped like the params from an iterator of new leaves."""
        if self.kind == "leaf":
            return next(leaves)
        values = [child.unflatten(leaves) for child in self.children]
        if self.kind == "pytree":
            return self.like.unflatten(values)
        if self.kind == "dict":
            items = dict(zip(self.keys, values, strict=True))
            return items if type(self.like) is dict else type(self.like)(items)  # OrderedDict, a frozen mapping...
        like = self.like
        if isinstance(like, tuple):
            return type(like)(*values) if hasattr(like, "_fields") else type(like)(values)
        return values


def _is_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _is_leaf(x: Any) -> bool:
    return x is None or (hasattr(x, "shape") and hasattr(x, "dtype"))


def _is_plain_array(x: Any) -> bool:
    """A NumPy array or torch tensor: a leaf, without asking JAX."""
    return type(x).__module__ in ("numpy", "torch", "torch.nn.parameter") or x is None


def _pytree_children(x: Any) -> tuple[list[str], list[Any], Any] | None:
    """One level of a JAX pytree node: (key strings, children, treedef), or None when ``x`` is not one
    (or JAX is not loaded: this module never imports it)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    tu = jax.tree_util
    pairs, treedef = tu.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if tu.treedef_is_leaf(treedef):
        return None
    return [tu.keystr(path) for path, _ in pairs], [c for _, c in pairs], treedef


def _flatten(tree: Any, label: str, paths: list[str], leaves: list[Any]) -> _Node:
    """Walk ``tree`` (lists, tuples, dicts and, for JAX, any pytree, nested), collecting its leaves and
    their labels (``params['params']['dense']['kernel']``)."""
    plain = type(tree) in (dict, list, tuple) or (isinstance(tree, tuple) and hasattr(tree, "_fields"))
    # Other node types keep their type through JAX; some (nnx.Variable) have a shape and dtype too.
    node = None if plain or _is_plain_array(tree) else _pytree_children(tree)
    if node is None and _is_leaf(tree):
        paths.append(label)
        leaves.append(tree)
        return _Node("leaf", [], [], None)
    if node is not None:
        keys, children, treedef = node
        kids = [_flatten(c, label + k, paths, leaves) for k, c in zip(keys, children, strict=True)]
        return _Node("pytree", keys, kids, treedef)
    if isinstance(tree, Mapping):
        keys = list(tree.keys())
        return _Node("dict", keys, [_flatten(tree[k], f"{label}[{k!r}]", paths, leaves) for k in keys], tree)
    if _is_sequence(tree):
        keys = list(range(len(tree)))
        return _Node("seq", keys, [_flatten(x, f"{label}[{k!r}]", paths, leaves) for k, x in enumerate(tree)], tree)
    paths.append(label)  # not an array: check_array names it
    leaves.append(tree)
    return _Node("leaf", [], [], None)


def _structure(params: Any) -> tuple[_Node, list[str], list[Any]]:
    """The structure, leaf labels and leaves of ``params``; its root must be a container."""
    if _is_leaf(params) or isinstance(params, (str, bytes)):
        raise TypeError(f"params must be a list, tuple or dict of arrays, got {type(params).__name__}")
    paths: list[str] = []
    leaves: list[Any] = []
    node = _flatten(params, "params", paths, leaves)
    if node.kind == "leaf":
        raise TypeError(f"params must be a list, tuple or dict of arrays, got {type(params).__name__}")
    return node, paths, leaves


def _leaves_like(node: _Node, tree: Any, what: str) -> list[Any]:
    out: list[Any] = []
    node.flatten_up_to(tree, what, out)
    return out


def _init(params: Any, init: Any, state_dtype: Any) -> Any:
    node, paths, leaves = _structure(params)
    for label, p in zip(paths, leaves, strict=True):  # name the bad entry before anything is allocated
        check_array(p, label)
    return node.unflatten(iter([init(p, state_dtype=state_dtype) for p in leaves]))


def adamp_init(params: Any, *, state_dtype: Any = None) -> Any:
    """:func:`adamp_core.adamp_init` for every param; same structure as ``params``."""
    return _init(params, _adamp_init, state_dtype)


def sgdp_init(params: Any, *, state_dtype: Any = None) -> Any:
    """:func:`adamp_core.sgdp_init` for every param; same structure as ``params``."""
    return _init(params, _sgdp_init, state_dtype)


def _step(
    params: Any, grads: Any, states: Any, hp: Any, check_state: Any, update: Any, skip_nonfinite: Any = False
) -> tuple[Any, Any]:
    skip = check_flag(skip_nonfinite, "skip_nonfinite")
    node, paths, ps = _structure(params)
    gs = _leaves_like(node, grads, "grads")
    ss = _leaves_like(node, states, "states")
    todo = []
    for i, (label, p, g) in enumerate(zip(paths, ps, gs, strict=True)):  # every entry checked before any maths
        xp = check_array(p, label)
        if g is None:
            continue
        check_grad(p, g, "grads" + label[len("params"):])
        check_hyper_arrays(p, hp)
        try:
            check_state(p, ss[i])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"states{label[len('params'):]}: {exc}") from None
        todo.append((i, xp))
    new_p, new_s = list(ps), list(ss)
    for i, xp in todo:
        new_p[i], new_s[i] = update(xp, ps[i], gs[i], ss[i], hp)
        if skip:  # each param on its own: a NaN in one grad leaves only that param (and state) as it was
            ok = finite_flag(xp, gs[i])
            new_p[i], new_s[i] = keep_if_finite(xp, ok, new_p[i], new_s[i], ps[i], ss[i])
    return node.unflatten(iter(new_p)), node.unflatten(iter(new_s))


def adamp_step(params: Any, grads: Any, states: Any, lr: Any = 1e-3, betas: tuple[Any, Any] = (0.9, 0.999),
               eps: Any = 1e-8, weight_decay: Any = 0.0, delta: Any = 0.1, wd_ratio: Any = 0.1, nesterov: bool = False,
               caution: bool = False, *, skip_nonfinite: bool = False) -> tuple[Any, Any]:
    """:func:`adamp_core.adamp_step` over a (nested) list/tuple/dict or pytree; returns ``(params, states)``.
    ``caution``, ``skip_nonfinite``: as in :func:`adamp_core.adamp_step`, param by param."""
    hp = check_adamp(lr, betas, eps, weight_decay, delta, wd_ratio, nesterov, caution)
    return _step(params, grads, states, hp, check_adamp_state, adamp_update, skip_nonfinite)


def sgdp_step(params: Any, grads: Any, states: Any, lr: Any, momentum: Any = 0.0, dampening: Any = 0.0,
              weight_decay: Any = 0.0, nesterov: bool = False, eps: Any = 1e-8, delta: Any = 0.1, wd_ratio: Any = 0.1,
              caution: bool = False, project_buffer: bool = True, *, skip_nonfinite: bool = False) -> tuple[Any, Any]:
    """:func:`adamp_core.sgdp_step` over a (nested) list/tuple/dict or pytree; returns ``(params, states)``.
    ``caution``, ``project_buffer``, ``skip_nonfinite``: as in :func:`adamp_core.sgdp_step`, param by param."""
    hp = check_sgdp(lr, momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio, caution, project_buffer)
    return _step(params, grads, states, hp, check_sgdp_state, sgdp_update, skip_nonfinite)


# Re-exported so that `from adamp_core.tree import AdamPState` works in tree-level code.
AdamPState = AdamPState
SGDPState = SGDPState
