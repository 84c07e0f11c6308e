"""Recipe ``jax_sharding``: ``adamp_optax`` under ``jax.jit`` with params sharded over 2 devices
(``NamedSharding`` on a ``Mesh``), one weight split along its first axis and one along its second.

It equals the same steps on one device (1e-6, float32); the state keeps the params' shardings from
``tx.init`` on (the moments split like the params, the counts replicated over the mesh) and the step
compiles once. Both weights are projected: ``w1`` (split by rows) on the layer view, whose statistics sum
over rows held by different devices after the channel view's max over those rows failed; ``w2`` (split by
columns) on the channel view, whose row sums run across the devices.

JAX makes its CPU devices once, when its backend starts, and this test session has started it with one:
the recipe runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (executed as
``run_recipe`` does, in a fresh namespace), which writes what it measured for the asserts here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from adamp_core import VIEW_CHANNEL, VIEW_LAYER  # noqa: E402

RECIPE = Path(__file__).resolve().parent / "recipes" / "jax_sharding.py"
STEPS = 10  # the recipe's

CHILD = r"""
import json, sys
import numpy as np
import jax
import adamp_core as ac

recipe, out = sys.argv[1], sys.argv[2]
ns = {"__name__": "__recipe_jax_sharding__"}
exec(compile(open(recipe).read(), recipe, "exec"), ns)
tx, shardings, init_params, train_step = ns["tx"], ns["shardings"], ns["init_params"], ns["train_step"]
res = {"devices": jax.device_count(), "compiles": train_step._cache_size()}


def placed(a, k):
    return a.sharding.is_equivalent_to(shardings[k], a.ndim)


def replicated(a):
    return a.sharding.is_fully_replicated and a.sharding.device_set == set(ns["mesh"].devices.flat)


init_state = tx.init(jax.device_put(init_params(jax.random.key(0)), shardings))
final_params, final_state = ns["params"], ns["opt_state"]
res["placed"] = {
    f"{when}:{field}:{k}": placed(tree[k], k)
    for when, state, params in (("init", init_state, None), ("final", final_state, final_params))
    for field, tree in (("params", params), ("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq))
    if tree is not None
    for k in shardings
}
res["replicated"] = {
    f"{when}:{name}": replicated(a)
    for when, state in (("init", init_state), ("final", final_state))
    for name, a in [("count", state.count), *(("step:" + k, v) for k, v in state.step.items())]
}
res["count"] = int(final_state.count)

# Which view each weight takes, from the first gradient: on the host (NumPy) and under jit on the shards.
p0 = jax.device_put(init_params(jax.random.key(0)), shardings)
g0 = jax.jit(jax.grad(ns["loss_fn"]))(p0, ns["x"], ns["y"])
res["views_host"] = {k: int(ac.projected_view(np.asarray(p0[k]), np.asarray(g0[k]))) for k in p0}
res["views_sharded"] = {k: int(jax.jit(ac.projected_view)(p0[k], g0[k])) for k in p0}

# The same steps on one device.
params = init_params(jax.random.key(0))
state = tx.init(params)
for _ in range(int(res["count"])):
    params, state, _ = train_step(params, state, ns["x"], ns["y"])
res["ref_devices"] = [len(a.sharding.device_set) for a in jax.tree.leaves((params, state))]
arrays = {}
for name, (p, s) in (("sharded", (final_params, final_state)), ("ref", (params, state))):
    for k in shardings:
        arrays[f"{name}/param/{k}"] = np.asarray(p[k])
        arrays[f"{name}/exp_avg/{k}"] = np.asarray(s.exp_avg[k])
        arrays[f"{name}/exp_avg_sq/{k}"] = np.asarray(s.exp_avg_sq[k])
arrays["init/w1"], arrays["init/w2"] = np.asarray(p0["w1"]), np.asarray(p0["w2"])
# The core itself on JAX's default mesh (Explicit axes), eagerly and under jit, for a weight split along
# either axis: against the same step on NumPy float32.
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

mesh = jax.make_mesh((2,), ("x",))
rng = np.random.default_rng(0)
w = rng.standard_normal((4, 6)).astype(np.float32)
g = rng.standard_normal((4, 6)).astype(np.float32)
g -= (g * w).sum(1, keepdims=True) / (w * w).sum(1, keepdims=True) * w  # orthogonal rows: projected
want, _ = ac.adamp_step(w, g, ac.adamp_init(w), lr=0.1, weight_decay=0.1)
res["explicit"] = {}
for spec in (P("x", None), P(None, "x")):
    ws, gs = (jax.device_put(a, NamedSharding(mesh, spec)) for a in (w, g))
    for how, step in (("eager", ac.adamp_step), ("jit", jax.jit(ac.adamp_step, static_argnames=()))):
        got, _ = step(ws, gs, ac.adamp_init(ws), 0.1, weight_decay=0.1)
        res["explicit"][f"{spec}:{how}"] = [float(np.abs(np.asarray(got) - want).max()),
                                            int(ac.projected_view(ws, gs))]
np.savez(out + ".npz", **arrays)
with open(out + ".json", "w") as f:
    json.dump(res, f)
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jax_sharding")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    out = tmp / "measured"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(RECIPE), str(out)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(f"{out}.json") as f:
        res = json.load(f)
    return res, dict(np.load(f"{out}.npz"))


def test_sharded_run_equals_the_one_device_run(measured):
    res, arrays = measured
    assert res["devices"] == 2 and res["count"] == STEPS
    assert set(res["ref_devices"]) == {1}  # the reference really ran on one device
    for k in ("w1", "w2"):
        for field in ("param", "exp_avg", "exp_avg_sq"):
            ours, ref = arrays[f"sharded/{field}/{k}"], arrays[f"ref/{field}/{k}"]
            assert ours.dtype == ref.dtype == np.float32
            np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6, err_msg=f"{field} {k}")
        assert np.max(np.abs(arrays[f"sharded/param/{k}"] - arrays[f"init/{k}"])) > 1e-3  # it trained


def test_both_weights_are_projected_across_shards(measured):
    res, _ = measured
    expected = {"w1": VIEW_LAYER, "w2": VIEW_CHANNEL}
    assert res["views_host"] == expected
    assert res["views_sharded"] == expected


def test_state_keeps_the_params_shardings_and_the_step_compiles_once(measured):
    res, _ = measured
    assert res["placed"] and all(res["placed"].values()), res["placed"]
    assert len(res["placed"]) == 10  # init: exp_avg, exp_avg_sq; final: params, exp_avg, exp_avg_sq; x 2
    assert res["replicated"] and all(res["replicated"].values()), res["replicated"]
    assert res["compiles"] == 1


def test_core_on_an_explicit_mesh(measured):
    """JAX's default ``make_mesh`` (Explicit axes): the core's step, eager and under jit, on a weight split
    along its rows or along its columns, equals the NumPy step (it used to fail: a 0-d constant placed with
    the param's sharding, and a ``vecdot`` contracting a sharded axis)."""
    res, _ = measured
    assert len(res["explicit"]) == 4
    for case, (err, view) in res["explicit"].items():
        assert err < 1e-6, case
        assert view == 1, case  # the channel view, on the host's decision as on the shards'
