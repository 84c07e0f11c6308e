"""adamp_core: AdamP and SGDP (Heo et al., ICLR 2021) as pure, sync-free functions on the
Python array API. The same code runs on NumPy, CuPy, PyTorch, JAX and array-api-strict.

>>> import numpy as np, adamp_core as ac
>>> w = np.ones((4, 3)); state = ac.adamp_init(w)
>>> w, state = ac.adamp_step(w, np.full((4, 3), 0.1), state, lr=1e-3)
"""

from . import diagnostics, tree
from ._common import all_finite
from .adamp import AdamPState, adamp_init, adamp_step
from .hyperparams import ADAMP_DEFAULTS, SGDP_DEFAULTS, check_adamp, check_sgdp
from .projection import VIEW_CHANNEL, VIEW_LAYER, VIEW_NONE, project_update, projected_view
from .sgdp import SGDPState, sgdp_init, sgdp_step

__version__ = "0.1.0"

__all__ = [
    "ADAMP_DEFAULTS",
    "SGDP_DEFAULTS",
    "AdamPState",
    "SGDPState",
    "VIEW_CHANNEL",
    "VIEW_LAYER",
    "VIEW_NONE",
    "all_finite",
    "adamp_init",
    "adamp_step",
    "check_adamp",
    "check_sgdp",
    "diagnostics",
    "project_update",
    "projected_view",
    "sgdp_init",
    "sgdp_step",
    "tree",
]
