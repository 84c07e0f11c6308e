# recipe: torch_func
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import adamp_core as ac


def make_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))


# An ensemble of 4 models trained as one: every param stacked on a leading axis, one vmapped step.
torch.manual_seed(0)
models = [make_model() for _ in range(4)]
params, _ = stack_module_state(models)  # {name: (4, *shape)}
params = {name: p.detach() for name, p in params.items()}
base = make_model().to("meta")  # the architecture only: functional_call supplies the weights
x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))


def loss_fn(p, x, y):
    return torch.nn.functional.cross_entropy(functional_call(base, p, (x,)), y)


def train_step(p, s, x, y):
    return ac.tree.adamp_step(p, grad(loss_fn)(p, x, y), s, lr=1e-2, weight_decay=1e-2)


states = vmap(ac.tree.adamp_init)(params)  # per model: step 0 and zero moments
ensemble_step = vmap(train_step, in_dims=(0, 0, None, None))  # one batch, shared by the models
for _ in range(5):
    params, states = ensemble_step(params, states, x, y)
