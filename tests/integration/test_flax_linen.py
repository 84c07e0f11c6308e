"""Recipe ``flax_linen``: a linen model trained with ``adamp_optax`` (in an ``optax.chain`` with a
schedule), params and optimizer state saved mid-run with ``flax.serialization.to_bytes`` and restored with
``from_bytes`` into a fresh ``tx.init(params)`` template; the resumed run ends exactly where an
uninterrupted run of the same steps ends, and differs from resuming with a fresh optimizer state."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("flax.linen")

import adamp_optax  # noqa: E402


def _leaves(tree):
    return [np.asarray(v) for v in jax.tree.leaves(tree)]


def test_checkpoint_mid_run_resumes_exactly(run_recipe, tmp_path):
    ns = run_recipe("flax_linen")
    assert (tmp_path / "checkpoint.msgpack").stat().st_size > 0
    restored = ns["restored"]["opt_state"][1]
    assert isinstance(restored, adamp_optax.ScaleByAdamPState) and int(restored.count) == 10
    assert {int(s) for s in jax.tree.leaves(restored.step)} == {10}

    # Uninterrupted: the same 20 steps from the same init, no checkpoint.
    model, tx, x = ns["model"], ns["tx"], ns["x"]
    params = model.init(jax.random.key(0), x)
    params, opt_state = ns["train"](params, tx.init(params), 20)
    for ours, ref in zip(_leaves((ns["params"], ns["opt_state"])), _leaves((params, opt_state)), strict=True):
        np.testing.assert_array_equal(ours, ref)
    assert int(opt_state[1].count) == 20 and not np.array_equal(_leaves(params)[0], _leaves(ns["template_params"])[0])

    # The optimizer state matters: resuming with a fresh one ends elsewhere.
    fresh, _ = ns["train"](ns["restored"]["params"], tx.init(ns["restored"]["params"]), 10)
    assert max(np.max(np.abs(a - b)) for a, b in zip(_leaves(fresh), _leaves(params), strict=True)) > 1e-4
