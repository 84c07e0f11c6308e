# recipe: jax_sharding
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adamp_optax

# Two devices (on a CPU host: XLA_FLAGS=--xla_force_host_platform_device_count=2 before JAX starts).
mesh = jax.make_mesh((2,), ("model",), axis_types=(AxisType.Auto,))  # jit propagates the shardings
shardings = {
    "w1": NamedSharding(mesh, P("model", None)),  # (hidden, in): rows split over the devices
    "w2": NamedSharding(mesh, P(None, "model")),  # (classes, hidden): columns split
}


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (32, 16), jnp.float32) / 4,
        "w2": jax.random.normal(k2, (4, 32), jnp.float32) / 4,
    }


def loss_fn(params, x, y):
    h = x @ params["w1"].T
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)  # w1 is scale-invariant
    w2 = params["w2"] / jnp.linalg.norm(params["w2"], axis=1, keepdims=True)  # and so is each row of w2
    return optax.softmax_cross_entropy_with_integer_labels(8.0 * jax.nn.relu(h) @ w2.T, y).mean()


tx = adamp_optax.adamp(1e-2, weight_decay=1e-2)


@jax.jit
def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


params = jax.device_put(init_params(jax.random.key(0)), shardings)
opt_state = tx.init(params)  # the moments are sharded like the params
x = jax.random.normal(jax.random.key(1), (64, 16), jnp.float32)
y = jnp.arange(64) % 4
for _ in range(10):
    params, opt_state, loss = train_step(params, opt_state, x, y)
