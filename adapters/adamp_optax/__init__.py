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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamp_core import dispatch
from adamp_core.arrays import check_array, check_grad, check_hyper_arrays
from adamp_core.hyperparams import check_flag
from adamp_core.optimizers import ADAMP, SGDP, OptimizerSpec

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


def _checked_leaves(spec: OptimizerSpec, hp: Any, paths: list[Any], params: list[Any], grads: list[Any],
                    states: list[Any]) -> None:
    """The checks of the core's step (``adamp_core.adamp_step`` / ``sgdp_step``), in its order, for every
    leaf before any is stepped; an error names the leaf."""
    for path, p, g, s in zip(paths, params, grads, states, strict=True):
        try:
            check_array(p)
            check_grad(p, g)
            check_hyper_arrays(p, hp)
            spec.check_state(p, s)
        except (TypeError, ValueError) as exc:  # name the leaf; nothing has run
            raise type(exc)(f"{exc} (leaf {jax.tree_util.keystr(path)})") from None


def _transformation(
    spec: OptimizerSpec,
    learning_rate: Any,
    hyper: dict[str, Any],
    state_dtype: Any,
    skip_nonfinite: bool,
    foreach: bool | None,
    state_cls: type,
) -> optax.GradientTransformation:
    """The optax transformation of ``spec`` (``hyper``: its hyperparameters but ``lr``, checked already)."""
    name = spec.name.lower()
    fields = spec.state._fields  # the state_cls fields between count and nonfinite_skips, one tree each

    def check_hp(lr: Any) -> Any:
        return spec.checked({**hyper, "lr": lr})

    def init_one(path: Any, p: Any) -> Any:
        try:
            s = spec.init(p, state_dtype=state_dtype)  # the core checks the param and state_dtype
        except (TypeError, ValueError) as exc:  # name the leaf of a bad param
            raise type(exc)(f"{exc} (leaf {jax.tree_util.keystr(path)})") from None
        return s._replace(step=_zero_count(p)) if spec.has_step else s

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
        hp = check_hp(learning_rate(state.count) if callable(learning_rate) else learning_rate)
        # The updates' structure drives: params and the state's trees are flattened up to it (empty
        # nodes such as optax.MaskedNode have no leaves), and each leaf's core state is rebuilt from them.
        paths_grads, treedef = jax.tree_util.tree_flatten_with_path(updates)
        paths, grads = [path for path, _ in paths_grads], [g for _, g in paths_grads]
        params_l = _flatten_like(treedef, params, "params", updates)
        columns = [_flatten_like(treedef, getattr(state, f), f"state.{f}", updates) for f in fields]
        states_l = [spec.state(*leaf) for leaf in zip(*columns, strict=True)]
        _checked_leaves(spec, hp, paths, params_l, grads, states_l)
        # JAX arrays are immutable (no fused kernels); under jax.jit XLA fuses each leaf's step itself.
        traced = any(isinstance(p, jax.core.Tracer) for p in params_l)
        tensors = [dispatch.Tensor(p, g, s, writable=False) for p, g, s in zip(params_l, grads, states_l, strict=True)]
        outcomes = dispatch.step(spec, tensors, hp, skip_nonfinite=skip_nonfinite, foreach=foreach, traced=traced)
        # optax applies updates additively: p + (new_p - p) == new_p up to one rounding.
        new_updates = [o.param - p for o, p in zip(outcomes, params_l, strict=True)]
        trees = [treedef.unflatten([getattr(o.state, f) for o in outcomes]) for f in fields]
        skips = None
        if skip_nonfinite:  # the core kept p and s for a non-finite g; count it (no sync)
            skips_l = _flatten_like(treedef, state.nonfinite_skips, "state.nonfinite_skips", updates)
            skips = treedef.unflatten([n + jnp.logical_not(o.ok).astype(jnp.int32)
                                       for n, o in zip(skips_l, outcomes, strict=True)])
        new_state = state_cls(optax.safe_increment(state.count), *trees, skips)
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def adamp(learning_rate: Any = 1e-3, b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, weight_decay: Any = 0.0,
          delta: Any = 0.1, wd_ratio: Any = 0.1, nesterov: bool = False, caution: bool = False, *,
          state_dtype: Any = None, skip_nonfinite: bool = False,
          foreach: bool | None = None) -> optax.GradientTransformation:
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
    (``learning_rate``, ``b1``, ``b2``); numbers are checked here, before anything runs. ``caution=True``:
    Cautious AdamP as in timm 1.0.31 (:mod:`adamp_core.caution`).

    Non-finite gradients propagate into the params and the state as the arithmetic gives (as in
    ``adamp==0.3.0``). With ``skip_nonfinite=True`` a leaf whose gradient has a NaN/inf entry gets a
    zero update and keeps its state (its step count does not advance; ``count`` still does), and
    ``state.nonfinite_skips`` counts the skips per leaf; all of this under ``jax.jit``, without a sync.

    ``foreach`` (keyword only): False or None (the default) steps each leaf with
    :func:`adamp_core.adamp_step`, and XLA fuses each leaf's step. True steps leaves of one dtype whose
    row lengths share a bucket together with :mod:`adamp_core.paths.multi_tensor` (on a CPU backend only leaves
    below 65,536 elements). Measured on a 2-core CPU under ``jax.jit``: 400 small tensors compile in 53
    instead of 124 s and step in 30 instead of 83 ms, but ResNet-50's shapes step in 312 instead of 210
    ms, and 2,000 small tensors did not compile within 7 minutes (XLA and the thousands of padded
    concatenations), so it is opt-in.
    """
    hyper = dict(betas=(b1, b2), eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                 nesterov=nesterov, caution=caution)
    return _make(ADAMP, learning_rate, hyper, state_dtype, skip_nonfinite, foreach, ScaleByAdamPState)


def sgdp(learning_rate: Any, momentum: Any = 0.0, dampening: Any = 0.0, weight_decay: Any = 0.0,
         nesterov: bool = False, eps: Any = 1e-8, delta: Any = 0.1, wd_ratio: Any = 0.1, caution: bool = False,
         project_buffer: bool = True, *, state_dtype: Any = None, skip_nonfinite: bool = False,
         foreach: bool | None = None) -> optax.GradientTransformation:
    r"""SGDP (paper Algorithm 1) as an optax transformation.

    .. math::

        b_t = \mu b_{t-1} + (1-\tau) g_t,\quad p_t = g_t + \mu b_t \text{ (nesterov) or } b_t,\quad
        w_{t+1} = w_t\Big(1 - \frac{\eta_t\lambda r}{1-\mu}\Big) - \eta_t\,\Pi_{w_t}(p_t),

    and ``update`` :math:`= w_{t+1} - w_t`. Arguments are those of ``adamp.SGDP`` (``learning_rate``
    for ``lr``, required); it may be an optax schedule. ``update`` requires ``params``. Without
    nesterov the stored buffer is the projected one, as in ``adamp==0.3.0``; ``project_buffer=False`` keeps
    it unprojected (Algorithm 1 as printed, timm's SGDP). ``caution``, ``skip_nonfinite`` and ``foreach``: as
    in :func:`adamp`.
    """
    hyper = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, eps=eps,
                 delta=delta, wd_ratio=wd_ratio, caution=caution, project_buffer=project_buffer)
    return _make(SGDP, learning_rate, hyper, state_dtype, skip_nonfinite, foreach, ScaleBySGDPState)


def _make(spec: OptimizerSpec, learning_rate: Any, hyper: dict[str, Any], state_dtype: Any, skip_nonfinite: Any,
          foreach: Any, state_cls: type) -> optax.GradientTransformation:
    """Check everything that can be checked now (numbers, flags), then build the transformation."""
    _check_learning_rate(learning_rate)
    # A schedule is checked at each update; here a placeholder stands for it.
    spec.checked({**hyper, "lr": 0.0 if callable(learning_rate) else learning_rate})
    return _transformation(spec, learning_rate, hyper, state_dtype, check_flag(skip_nonfinite, "skip_nonfinite"),
                           _foreach(foreach), state_cls)
