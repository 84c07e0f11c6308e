# recipe: flax_linen
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import serialization

import adamp_optax


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(8, (3, 3))(x)))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


model = CNN()
x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3), jnp.float32)
y = jnp.arange(16) % 4
tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    adamp_optax.adamp(optax.cosine_decay_schedule(1e-2, 20), weight_decay=1e-2),
)


@jax.jit
def train_step(params, opt_state, x, y):
    def loss_fn(params):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(params, opt_state, steps):
    for _ in range(steps):
        params, opt_state, loss = train_step(params, opt_state, x, y)
    return params, opt_state


params = model.init(jax.random.key(0), x)
opt_state = tx.init(params)
params, opt_state = train(params, opt_state, 10)
with open("checkpoint.msgpack", "wb") as f:  # params and optimizer state, mid-run
    f.write(serialization.to_bytes({"params": params, "opt_state": opt_state}))

# Later (a new process): restore into templates of the same structure, then resume.
template_params = model.init(jax.random.key(0), x)
template = {"params": template_params, "opt_state": tx.init(template_params)}
with open("checkpoint.msgpack", "rb") as f:
    restored = serialization.from_bytes(template, f.read())
params, opt_state = train(restored["params"], restored["opt_state"], 10)
