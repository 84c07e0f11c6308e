"""adamp_torch: AdamP and SGDP (Heo et al., ICLR 2021, arXiv:2006.08217) as ``torch.optim``
optimizers, drop-in replacements for the official ``adamp`` package (0.3.0)::

    from adamp_torch import AdamP, SGDP   # instead of: from adamp import AdamP, SGDP

Same arguments, defaults, state keys (``step``, ``exp_avg``, ``exp_avg_sq``; ``momentum``) and
results; checkpoints move both ways. The update maths is :mod:`adamp_core` (sync-free).
"""

from .adamp import AdamP
from .sgdp import SGDP

__all__ = ["AdamP", "SGDP"]
