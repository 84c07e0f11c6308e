# recipe: timm
# AdamP and SGDP in timm's optimizer registry, under names of their own: once registered,
# create_optimizer_v2 builds them with timm's param groups (no weight decay on biases and norms).
# timm's own "adamp" and "sgdp" entries are its bundled copies of the official code, with other
# defaults ("adamp": wd_ratio=0.01, nesterov=True; "sgdp": nesterov=True); ours keep adamp 0.3.0's.
# The cautious ones (timm's "cadamp"/"csgdp": caution=True) under names of their own too; "csgdpxp" keeps
# the unprojected buffer, as timm's SGDP does (project_buffer=False; the same with nesterov).
import torch
from timm.optim import OptimInfo, create_optimizer_v2
from timm.optim._optim_factory import default_registry  # timm (1.0.31) exports no register function

from adamp_torch import SGDP, AdamP

default_registry.register(OptimInfo(name="adampxp", opt_class=AdamP, description="AdamP of adamp-xp", has_betas=True))
default_registry.register(OptimInfo(name="sgdpxp", opt_class=SGDP, description="SGDP of adamp-xp", has_momentum=True))
default_registry.register(OptimInfo(name="cadampxp", opt_class=AdamP, description="Cautious AdamP of adamp-xp",
                                    has_betas=True, defaults={"caution": True}))
default_registry.register(OptimInfo(name="csgdpxp", opt_class=SGDP, description="Cautious SGDP of adamp-xp",
                                    has_momentum=True, defaults={"caution": True, "project_buffer": False}))


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False),
        torch.nn.BatchNorm2d(8),  # makes the conv weight scale-invariant: its update is projected
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )


model = make_model()
optimizer = create_optimizer_v2(model, "adampxp", lr=1e-3, weight_decay=0.05)
# or: create_optimizer_v2(model, "sgdpxp", lr=0.1, weight_decay=1e-4)  (timm's momentum default: 0.9)
# cautious: create_optimizer_v2(model, "cadampxp", lr=1e-3, weight_decay=0.05)
