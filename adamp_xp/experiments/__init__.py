"""Experiments that reproduce the paper's evidence (Heo et al., ICLR 2021): ``adamp-xp toy`` (the 2-D
toy of Sec. 2) and ``adamp-xp digits`` (a small BN-CNN on scikit-learn's digits).

Each module has ``register(subparsers)``, which adds its ``adamp-xp`` subcommand; heavy optional
dependencies (matplotlib, torch, scikit-learn, tqdm) are imported inside the functions that need them.
"""
