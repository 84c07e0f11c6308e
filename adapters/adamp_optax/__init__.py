r"""adamp_optax: AdamP and SGDP (Heo et al., ICLR 2021) as ``optax.GradientTransformation``\ s.

>>> import jax.numpy as jnp, optax, adamp_optax
>>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(4)}
>>> tx = adamp_optax.adamp(learning_rate=1e-2, weight_decay=1e-2)
>>> state = tx.init(params)
>>> grads = {"w": jnp.full((4, 3), 0.1), "b": jnp.full(4, 0.1)}
>>> updates, state = tx.update(grads, state, params)   # params are required
>>> params = optax.apply_updates(params, updates)

A thin adapter: each leaf is stepped by :func:`adamp_core.adamp_step` / :func:`adamp_core.sgdp_step`
(paper Algorithms 2 and 1, matching ``adamp==0.3.0``), and the update returned is
``new_param - param``, so ``optax.apply_updates(params, updates)`` gives the core's new params up to
the rounding of ``param + (new_param - param)``: about one ulp of the param per step (a few under
``jax.jit``, whose fusions may round differently). In float64 the trajectories stay within ~1e-14
relative of ``adamp==0.3.0``'s over 30 steps, far inside the 1e-10 the tests require. The weight decay
and the projection are inside the transformation (they need the params), so put it *last* in an
``optax.chain`` (after clipping, say) and do not add ``optax.scale_by_learning_rate``.

Works under ``jax.jit`` (the core's step is sync-free) and on any pytree of params, including
``flax.nnx.Optimizer(model, adamp_optax.adamp(...), wrt=nnx.Param)`` and sharded params. The state is laid
out as optax's own (cf. ``ScaleByAdamState(count, mu, nu)``): :class:`ScaleByAdamPState` ``(count, step,
exp_avg, exp_avg_sq, nonfinite_skips)`` and :class:`ScaleBySGDPState` ``(count, momentum,
nonfinite_skips)``, where ``count`` is the update count (an int32 array, the argument of a
``learning_rate`` schedule, which is called with 0 on the first update as in optax) and every other
field is a tree like the params (``step``: each leaf's own step count, which a skipped update does not
advance). So ``optax.tree_utils.tree_get(state, "exp_avg")`` finds the moments, and frameworks that
rewrap the state's arrays (nnx) keep it intact; ``update`` rebuilds each leaf's
:class:`adamp_core.AdamPState` / :class:`adamp_core.SGDPState` from the trees. ``init`` places the state
like the params (``zeros_like``: the moments follow each param's sharding; the counts are uncommitted
next to uncommitted params, committed or replicated over the mesh next to committed or sharded ones), so a
jitted step compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import adamp_core as ac
from adamp_core.adamp import check_adamp_state
from adamp_core.arrays import check_array, check_grad, check_hyper_arrays
from adamp_core.grouped import adamp_update_group, group_indices, sgdp_update_group
from adamp_core.hyperparams import _flag
from adamp_core.sgdp import check_sgdp_state

__all__ = ["ScaleByAdamPState", "ScaleBySGDPState", "adamp", "sgdp"]


class ScaleByAdamPState(NamedTuple):
    """State of :func:`adamp`, laid out as optax's ``ScaleByAdamState(count, mu, nu)``: the update count
    and trees shaped like the params. Leaf by leaf, ``(step, exp_avg, exp_avg_sq)`` is the
    :class:`adamp_core.AdamPState` of that param (``adamp_core.AdamPState(*leaf fields)``)."""

    count: Any  # int32 array: updates done so far (the learning-rate schedule's argument)
    step: Any  # tree like the params of int32 0-d arrays: the leaf's steps (a skipped one does not advance)
    exp_avg: Any  # tree like the params: first moments (in state_dtype)
    exp_avg_sq: Any  # tree like the params: second moments (in state_dtype)
    # skip_nonfinite=True: tree like the params of int32 counts of the updates each leaf skipped
    # for a non-finite gradient (read with jax.tree.map(int, state.nonfinite_skips)); else None.
    nonfinite_skips: Any = None


class ScaleBySGDPState(NamedTuple):
    """State of :func:`sgdp`: the update count and a tree shaped like the params of momentum buffers
    (leaf by leaf, ``adamp_core.SGDPState(momentum)``)."""

    count: Any
    momentum: Any  # tree like the params: momentum buffers (in state_dtype)
    nonfinite_skips: Any = None  # as in ScaleByAdamPState


def _zero_count(like: Any) -> Any:
    """A 0-d int32 zero placed as ``jax.jit`` places a scalar it computes from ``like``: uncommitted
    next to an uncommitted (or traced) ``like``, on its device if it is committed to one, replicated
    over its mesh if it is sharded. A state placed otherwise than jit's outputs would make the jitted
    step compile a second time, on its second call (jit keys its cache on the inputs' placements)."""
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.core.Tracer) or not getattr(like, "committed", False) or sharding is None:
        return jnp.zeros([], jnp.int32)
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(),
                                              memory_kind=sharding.memory_kind)
    elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return jnp.zeros([], jnp.int32)  # another kind of sharding: placed by jit on the first call
    return jax.device_put(jnp.zeros([], jnp.int32), sharding)


_NO_PARAMS = (
    "{name} requires the current params: call update(updates, state, params) "
    "(the decoupled weight decay and the projection depend on the weights)."
)


def _foreach(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid foreach value: {value!r} (expected None, True or False)")
    return value


def _check_learning_rate(learning_rate: Any) -> None:
    if callable(learning_rate):
        return
    if isinstance(learning_rate, bool) or learning_rate is None or isinstance(learning_rate, (str, bytes)):
        raise TypeError(f"Invalid learning rate: {learning_rate!r} (expected a number, an array or a schedule)")


def _flatten_like(treedef: Any, tree: Any, what: str, updates: Any) -> list[Any]:
    """``treedef.flatten_up_to(tree)``, with an error that names a missing gradient."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as exc:
        leaves = jax.tree_util.tree_flatten_with_path(updates, is_leaf=lambda x: x is None)[0]
        missing = [jax.tree_util.keystr(path) for path, x in leaves if x is None]
        if missing:
            raise TypeError(
                f"grads{missing[0]} is None; a gradient is required for every param (mask params without"
                " one with optax.masked)"
            ) from None
        raise ValueError(f"{what} must have the structure of the gradients: {exc}") from None


class _Grouped(NamedTuple):
    """What the multi-tensor path of a transformation needs (``foreach``)."""

    check_hp: Callable[[Any], Any]  # learning rate -> checked hyperparameters
    check_state: Callable[[Any, Any], None]
    update_group: Callable[..., Any]  # adamp_core.grouped.adamp_update_group / sgdp_update_group


def _check_leaf(grouped: _Grouped, p: Any, g: Any, s: Any, lr: Any) -> Any:
    """The checks of the per-leaf step (adamp_core.adamp_step / sgdp_step), in its order, without the
    update; returns the checked hyperparameters."""
    hp = grouped.check_hp(lr)
    check_array(p)
    check_grad(p, g)
    check_hyper_arrays(p, hp)
    grouped.check_state(p, s)
    return hp


def _step_groups(grouped: _Grouped, paths: list[Any], grads: list[Any], params: list[Any], states: list[Any],
                 lr: Any, skip: bool) -> tuple[list[Any], list[Any], list[Any]]:
    """Every leaf checked first (naming a bad one), then stepped with :mod:`adamp_core.grouped`: leaves of
    one dtype and state dtypes whose row lengths share a bucket go together (on a CPU backend only those
    below ``HOST_TENSOR_MAX_ELEMENTS``, whose step is not bandwidth-bound). Returns the new params, the
    new states and, with ``skip``, the per-leaf "grad was finite" flags."""
    hps = []
    for path, p, g, s in zip(paths, params, grads, states, strict=True):
        try:
            hps.append(_check_leaf(grouped, p, g, s, lr))
        except (TypeError, ValueError) as exc:  # name the leaf; nothing has run
            raise type(exc)(f"{exc} (leaf {jax.tree_util.keystr(path)})") from None
    n = len(params)
    new_p, new_s, ok = [None] * n, [None] * n, [None] * n
    keys = [(p.dtype, tuple(x.dtype for x in s)) for p, s in zip(params, states, strict=True)]
    on_host = jax.default_backend() == "cpu"
    for idx in group_indices(keys, [tuple(p.shape) for p in params], on_host=on_host):
        ps, gs, ss = [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx]
        ps_new, ss_new, flags = grouped.update_group(check_array(ps[0]), ps, gs, ss, hps[idx[0]], skip)
        for j, i in enumerate(idx):
            new_p[i], new_s[i] = ps_new[j], ss_new[j]
            ok[i] = None if flags is None else flags[j]
    return new_p, new_s, ok


def _transformation(
    name: str,
    learning_rate: Any,
    init_leaf: Callable[[Any], Any],
    step_leaf: Callable[[Any, Any, Any, Any], tuple[Any, Any]],
    state_cls: type,
    core_cls: type,
    skip_nonfinite: bool,
    grouped: _Grouped | None = None,
) -> optax.GradientTransformation:
    fields = core_cls._fields  # the state_cls fields between count and nonfinite_skips, one tree each

    def init_one(path: Any, p: Any) -> Any:
        try:
            s = init_leaf(p)  # the core checks the param and state_dtype; moments are zeros_like(p)
        except (TypeError, ValueError) as exc:  # name the leaf of a bad param
            raise type(exc)(f"{exc} (leaf {jax.tree_util.keystr(path)})") from None
        return s._replace(step=_zero_count(p)) if "step" in fields else s

    def init_fn(params: Any) -> Any:
        paths_params, treedef = jax.tree_util.tree_flatten_with_path(params)
        states = [init_one(path, p) for path, p in paths_params]
        trees = [treedef.unflatten([s[i] for s in states]) for i in range(len(fields))]
        skips = treedef.unflatten([_zero_count(p) for _, p in paths_params]) if skip_nonfinite else None
        count = _zero_count(paths_params[0][1] if paths_params else None)
        return state_cls(count, *trees, skips)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError(_NO_PARAMS.format(name=name))
        if not isinstance(state, state_cls):
            raise TypeError(f"state must be a {state_cls.__name__} (from {name}(...).init), got {type(state).__name__}")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        # The updates' structure drives: params and the state's trees are flattened up to it (empty
        # nodes such as optax.MaskedNode have no leaves), and each leaf's core state is rebuilt from them.
        paths_grads, treedef = jax.tree_util.tree_flatten_with_path(updates)
        params_l = _flatten_like(treedef, params, "params", updates)
        columns = [_flatten_like(treedef, getattr(state, f), f"state.{f}", updates) for f in fields]
        states_l = [core_cls(*leaf) for leaf in zip(*columns, strict=True)]
        skips_l = (
            _flatten_like(treedef, state.nonfinite_skips, "state.nonfinite_skips", updates) if skip_nonfinite else []
        )
        new_updates, new_states, new_skips = [], [], []
        if grouped is not None:  # foreach: leaves stepped together (adamp_core.grouped)
            paths, grads = [path for path, _ in paths_grads], [g for _, g in paths_grads]
            ps_new, new_states, oks = _step_groups(grouped, paths, grads, params_l, states_l, lr, skip_nonfinite)
            for i, (p, new_p) in enumerate(zip(params_l, ps_new, strict=True)):
                if skip_nonfinite:
                    new_skips.append(skips_l[i] + jnp.logical_not(oks[i]).astype(jnp.int32))
                new_updates.append(new_p - p)
        else:  # foreach=False: one leaf at a time
            for i, ((path, g), p, s) in enumerate(zip(paths_grads, params_l, states_l, strict=True)):
                try:
                    new_p, new_s = step_leaf(p, g, s, lr)
                except (TypeError, ValueError) as exc:  # name the leaf; nothing has changed (pure functions)
                    raise type(exc)(f"{exc} (leaf {jax.tree_util.keystr(path)})") from None
                if skip_nonfinite:  # the core kept p and s for a non-finite g; count it (no sync)
                    new_skips.append(skips_l[i] + jnp.logical_not(ac.all_finite(g)).astype(jnp.int32))
                # optax applies updates additively: p + (new_p - p) == new_p up to one rounding.
                new_updates.append(new_p - p)
                new_states.append(new_s)
        skips = treedef.unflatten(new_skips) if skip_nonfinite else None
        trees = [treedef.unflatten([s[i] for s in new_states]) for i in range(len(fields))]
        new_state = state_cls(optax.safe_increment(state.count), *trees, skips)
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def adamp(
    learning_rate: Any = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    delta: Any = 0.1,
    wd_ratio: Any = 0.1,
    nesterov: bool = False,
    *,
    state_dtype: Any = None,
    skip_nonfinite: bool = False,
    foreach: bool | None = None,
) -> optax.GradientTransformation:
    r"""AdamP (paper Algorithm 2) as an optax transformation.

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        p_t = \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon},

    .. math::

        w_{t+1} = w_t (1 - \eta_t\lambda r) - \frac{\eta_t}{1-\beta_1^t}\,\Pi_{w_t}(p_t),
        \qquad \text{update} = w_{t+1} - w_t,

    with :math:`\Pi_{w_t}` the radial projection, applied when :math:`w_t` looks scale-invariant
    (then :math:`r` = ``wd_ratio``, else 1). ``learning_rate`` may be a number, a 0-d array or an
    optax schedule :math:`\eta_t` = ``learning_rate(count)``. ``update`` requires ``params``.
    ``state_dtype`` (keyword only) keeps the moments in another dtype (e.g. ``jnp.float32`` for
    bfloat16 params). Arguments are those of ``adamp.AdamP`` with optax's names
    (``learning_rate``, ``b1``, ``b2``); numbers are checked here, before anything runs.

    Non-finite gradients propagate into the params and the state as the arithmetic gives (as in
    ``adamp==0.3.0``). With ``skip_nonfinite=True`` a leaf whose gradient has a NaN/inf entry gets a
    zero update and keeps its state (its step count does not advance; ``count`` still does), and
    ``state.nonfinite_skips`` counts the skips per leaf; all of this under ``jax.jit``, without a sync.

    ``foreach`` (keyword only): False or None (the default) steps each leaf with
    :func:`adamp_core.adamp_step`, and XLA fuses each leaf's step. True steps leaves of one dtype whose
    row lengths share a bucket together with :mod:`adamp_core.grouped` (on a CPU backend only leaves
    below 65,536 elements). Measured on a 2-core CPU under ``jax.jit``: 400 small tensors compile in 53
    instead of 124 s and step in 30 instead of 83 ms, but ResNet-50's shapes step in 312 instead of 210
    ms, and 2,000 small tensors did not compile within 7 minutes (XLA and the thousands of padded
    concatenations), so it is opt-in.
    """
    _check_learning_rate(learning_rate)
    hp = ac.check_adamp(
        1e-3 if callable(learning_rate) else learning_rate, (b1, b2), eps, weight_decay, delta, wd_ratio, nesterov
    )
    kwargs = hp._asdict()
    del kwargs["lr"]
    skip = _flag(skip_nonfinite, "skip_nonfinite")

    def step_leaf(p: Any, g: Any, s: Any, lr: Any) -> tuple[Any, Any]:
        return ac.adamp_step(p, g, s, lr=lr, skip_nonfinite=skip, **kwargs)

    def check_hp(lr: Any) -> Any:
        return ac.check_adamp(lr, (b1, b2), eps, weight_decay, delta, wd_ratio, nesterov)

    grouped = _Grouped(check_hp, check_adamp_state, adamp_update_group) if _foreach(foreach) else None
    return _transformation(
        "adamp", learning_rate, lambda p: ac.adamp_init(p, state_dtype=state_dtype), step_leaf, ScaleByAdamPState,
        ac.AdamPState, skip,
        grouped,
    )


def sgdp(
    learning_rate: Any,
    momentum: Any = 0.0,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    nesterov: bool = False,
    eps: Any = 1e-8,
    delta: Any = 0.1,
    wd_ratio: Any = 0.1,
    *,
    state_dtype: Any = None,
    skip_nonfinite: bool = False,
    foreach: bool | None = None,
) -> optax.GradientTransformation:
    r"""SGDP (paper Algorithm 1) as an optax transformation.

    .. math::

        b_t = \mu b_{t-1} + (1-\tau) g_t,\quad p_t = g_t + \mu b_t \text{ (nesterov) or } b_t,\quad
        w_{t+1} = w_t\Big(1 - \frac{\eta_t\lambda r}{1-\mu}\Big) - \eta_t\,\Pi_{w_t}(p_t),

    and ``update`` :math:`= w_{t+1} - w_t`. Arguments are those of ``adamp.SGDP`` (``learning_rate``
    for ``lr``, required); it may be an optax schedule. ``update`` requires ``params``. Without
    nesterov the stored buffer is the projected one, as in ``adamp==0.3.0``. ``skip_nonfinite`` and
    ``foreach``: as in :func:`adamp`.
    """
    _check_learning_rate(learning_rate)
    hp = ac.check_sgdp(
        0.1 if callable(learning_rate) else learning_rate,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        eps,
        delta,
        wd_ratio,
    )
    kwargs = hp._asdict()
    del kwargs["lr"]
    skip = _flag(skip_nonfinite, "skip_nonfinite")

    def step_leaf(p: Any, g: Any, s: Any, lr: Any) -> tuple[Any, Any]:
        return ac.sgdp_step(p, g, s, lr=lr, skip_nonfinite=skip, **kwargs)

    def check_hp(lr: Any) -> Any:
        return ac.check_sgdp(lr, momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio)

    grouped = _Grouped(check_hp, check_sgdp_state, sgdp_update_group) if _foreach(foreach) else None
    return _transformation(
        "sgdp", learning_rate, lambda p: ac.sgdp_init(p, state_dtype=state_dtype), step_leaf, ScaleBySGDPState,
        ac.SGDPState, skip,
        grouped,
    )
