"""The list/dict functions equal the per-array steps and check every input first."""

from __future__ import annotations

import numpy as np
import pytest

import adamp_core as ac

SHAPES = {"conv": (4, 3, 3, 3), "fc": (5, 7), "bias": (5,), "scale": ()}


def _params(backend, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    return {k: backend.asarray(np.asarray(rng.standard_normal(s)), dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
def test_tree_equals_per_array_steps(backend, opt):
    if not backend.supports("float64"):
        pytest.skip("needs float64")
    hp = dict(lr=0.01, weight_decay=0.1, nesterov=True) if opt == "adamp" else dict(lr=0.1, momentum=0.9, nesterov=True)
    init, step = (ac.adamp_init, ac.adamp_step) if opt == "adamp" else (ac.sgdp_init, ac.sgdp_step)
    tree_init, tree_step = (ac.tree.adamp_init, ac.tree.adamp_step) if opt == "adamp" else (
        ac.tree.sgdp_init, ac.tree.sgdp_step)
    params = _params(backend)
    single = {k: (p, init(p)) for k, p in params.items()}
    states = tree_init(params)
    rng = np.random.default_rng(1)
    for _ in range(5):
        grads = {k: backend.asarray(np.asarray(rng.standard_normal(s)), "float64") for k, s in SHAPES.items()}
        params, states = tree_step(params, grads, states, **hp)
        single = {k: step(p, grads[k], s, **hp) for k, (p, s) in single.items()}
    assert list(params) == list(SHAPES)
    for k in SHAPES:
        np.testing.assert_array_equal(backend.to_numpy(params[k]), backend.to_numpy(single[k][0]))
        for a, b in zip(states[k], single[k][1], strict=True):
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))


def test_tree_keeps_container_type_and_skips_none_grads():
    params = (np.ones((2, 3)), np.ones(3))
    states = ac.tree.sgdp_init(params)
    new_p, new_s = ac.tree.sgdp_step(params, (np.ones((2, 3)), None), states, lr=0.1)
    assert isinstance(new_p, tuple) and isinstance(new_s, tuple)
    assert new_p[1] is params[1] and new_s[1] is states[1]
    assert not np.array_equal(new_p[0], params[0])


# (grads transform, error, message regex): the bad entry is always the last one
BAD = [
    (lambda g: {**g, "scale": np.ones(3)}, ValueError, r"grads\['scale'\] shape \(3,\) differs from param shape \(\)"),
    (lambda g: {**g, "scale": np.array(1, dtype=np.int64)}, TypeError, r"grads\['scale'\] dtype int64"),
    (lambda g: {k: v for k, v in g.items() if k != "scale"}, ValueError, r"grads must have the same structure"),
    (lambda g: list(g.values()), ValueError, r"grads must have the same structure"),
]


@pytest.mark.parametrize("transform,error,match", BAD)
def test_tree_checks_everything_before_computing(transform, error, match, monkeypatch):
    """A bad last grad raises before any param is computed (the update function is never called)."""
    import adamp_core.tree as tree_mod

    params = {k: np.asarray(np.random.default_rng(0).standard_normal(s)) for k, s in SHAPES.items()}
    grads = {k: np.ones(s) for k, s in SHAPES.items()}
    calls = []
    monkeypatch.setattr(tree_mod, "adamp_update", lambda *a: calls.append(a))
    with pytest.raises(error, match=match):
        tree_mod.adamp_step(params, transform(grads), ac.tree.adamp_init(params))
    assert calls == []


def test_tree_names_the_bad_state():
    params = [np.ones((2, 2)), np.ones((3, 3))]
    states = [ac.adamp_init(params[0]), ac.sgdp_init(params[1])]
    with pytest.raises(TypeError, match=r"states\[1\]: state must be an AdamPState"):
        ac.tree.adamp_step(params, [np.ones((2, 2)), np.ones((3, 3))], states)
    with pytest.raises(TypeError, match=r"params must be a list, tuple or dict of arrays, got ndarray"):
        ac.tree.adamp_step(np.ones(3), np.ones(3), None)


def _nested(leaves):
    """flax-style nesting of the four SHAPES arrays: dicts in dicts, a list, a tuple."""
    return {"params": {"block": {"conv": leaves["conv"], "norm": [leaves["scale"], (leaves["bias"],)]}},
            "head": {"fc": leaves["fc"]}}


@pytest.mark.parametrize("opt", ["adamp", "sgdp"])
def test_tree_takes_nested_structures(backend, opt):
    """Any nesting of dicts, lists and tuples: the same results as the flat dict (which equals the per-array
    steps above), the same containers back, a None grad anywhere skipping its param."""
    if not backend.supports("float64"):
        pytest.skip("needs float64")
    hp = dict(lr=0.01, weight_decay=0.1) if opt == "adamp" else dict(lr=0.1, momentum=0.9)
    tree_init, tree_step = (ac.tree.adamp_init, ac.tree.adamp_step) if opt == "adamp" else (
        ac.tree.sgdp_init, ac.tree.sgdp_step)
    flat = _params(backend)
    nested = _nested(flat)
    flat_s, nested_s = tree_init(flat), tree_init(nested)
    assert isinstance(nested_s["params"]["block"]["norm"][1], tuple)
    rng = np.random.default_rng(1)
    for _ in range(3):
        grads = {k: backend.asarray(np.asarray(rng.standard_normal(s)), "float64") for k, s in SHAPES.items()}
        flat, flat_s = tree_step(flat, grads, flat_s, **hp)
        nested, nested_s = tree_step(nested, _nested(grads), nested_s, **hp)
    norm = nested["params"]["block"]["norm"]
    assert isinstance(norm, list) and isinstance(norm[1], tuple)
    for k, got in _nested(flat).items():
        for a, b in zip(_leaves(got), _leaves(nested[k]), strict=True):
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    grads = _nested({k: backend.asarray(np.ones(s), "float64") for k, s in SHAPES.items()})
    grads["head"]["fc"] = None
    new, new_s = tree_step(nested, grads, nested_s, **hp)
    assert new["head"]["fc"] is nested["head"]["fc"] and new_s["head"]["fc"] is nested_s["head"]["fc"]


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def test_tree_nested_errors_name_the_path():
    params = _nested({k: np.ones(s) for k, s in SHAPES.items()})
    states = ac.tree.adamp_init(params)
    grads = _nested({k: np.ones(s) for k, s in SHAPES.items()})
    grads["params"]["block"]["norm"][1] = (np.ones(4),)
    with pytest.raises(ValueError, match=r"grads\['params'\]\['block'\]\['norm'\]\[1\]\[0\] shape \(4,\) differs"):
        ac.tree.adamp_step(params, grads, states)
    grads = _nested({k: np.ones(s) for k, s in SHAPES.items()})
    del grads["head"]
    with pytest.raises(ValueError, match=r"grads must have the same structure as params"):
        ac.tree.adamp_step(params, grads, states)
    grads = _nested({k: np.ones(s) for k, s in SHAPES.items()})
    grads["params"]["block"]["norm"] = grads["params"]["block"]["norm"][:1]
    with pytest.raises(ValueError, match=r"grads\['params'\]\['block'\]\['norm'\] must have the same structure"):
        ac.tree.adamp_step(params, grads, states)
    with pytest.raises(TypeError, match=r"params\['params'\]\['x'\] must be an array, got str"):
        ac.tree.adamp_init({"params": {"x": "weights"}})


def test_tree_keeps_jax_pytree_types():
    """JAX pytrees that are not plain containers (flax's FrozenDict and nnx.State) go through JAX's own
    flattening and come back as the same types, with results equal to the plain-dict ones."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    flax_core = pytest.importorskip("flax.core")
    rng = np.random.default_rng(0)
    plain = {"params": {"dense": {"kernel": jnp.asarray(rng.standard_normal((4, 3))), "bias": jnp.zeros(3)}}}
    frozen = flax_core.FrozenDict(plain)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, p.dtype), plain)
    new_plain, _ = ac.tree.sgdp_step(plain, grads, ac.tree.sgdp_init(plain), lr=0.1, momentum=0.9)
    new_frozen, state = ac.tree.sgdp_step(frozen, flax_core.FrozenDict(grads), ac.tree.sgdp_init(frozen), lr=0.1,
                                          momentum=0.9)
    assert type(new_frozen) is flax_core.FrozenDict and type(state) is flax_core.FrozenDict
    for a, b in zip(jax.tree.leaves(new_plain), jax.tree.leaves(new_frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
