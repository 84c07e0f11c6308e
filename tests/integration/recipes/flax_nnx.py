# recipe: flax_nnx
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import adamp_optax


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.norm(self.fc1(x))))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)  # AdamP's weight decay and projection read the model's params
    return loss


x = jax.random.normal(jax.random.key(0), (64, 8), jnp.float32)
y = jax.random.randint(jax.random.key(1), (64,), 0, 4)

model = MLP(nnx.Rngs(0))
optimizer = nnx.Optimizer(model, adamp_optax.adamp(1e-2, weight_decay=1e-2), wrt=nnx.Param)
losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
exp_avg = optax.tree_utils.tree_get(optimizer.opt_state, "exp_avg")  # first moments, shaped like the params

sgdp_model = MLP(nnx.Rngs(0))
sgdp_optimizer = nnx.Optimizer(
    sgdp_model, adamp_optax.sgdp(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4), wrt=nnx.Param
)
sgdp_losses = [float(train_step(sgdp_model, sgdp_optimizer, x, y)) for _ in range(20)]
