r"""DTensor params (FSDP2 ``fully_shard``, HSDP): the core runs on each process's local rows.

FSDP2 shards every param on dim 0, so a process holds whole rows of the channel view (possibly
none: a 1-row weight on 2 ranks). Per-row statistics are then local; the max over rows and the
layer-view sums are not. :func:`local_shards` hands the core's step (through :func:`adamp_core.dispatch.step`,
which steps such a tensor alone) the local tensors and a :class:`ShardedRows`, whose reductions
over rows reduce the local rows and then all-gather the per-shard results over the mesh dimension
that shards dim 0: one all-gather of a few scalars per call, 4 per param with ``ndim > 1`` per step
(row-scale minima, layer sums, max cosine, layer ``w.u``), no host sync. Every rank combines the same
gathered values in rank order, so the decision to project is bit-for-bit the same on every rank, and
NaN propagates exactly as ``xp.max`` does on one device.

Running the core on the DTensors instead (DTensor's sharding propagation) is ~5x slower per step on
CPU, issues more collectives, and fails where a rank holds no rows (``amin`` of an empty local shard).
Placements other than ``Shard(0)``/``Replicate`` (tensor parallel ``Shard(1)``, 2-d FSDP + TP) still
take that path. FSDP1's flat 1-d shards have no rows at all: a warning says so. No maths here: that
is in :mod:`adamp_core`.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch

from adamp_core.projection import RowReduce

__all__ = ["ShardedRows", "is_dtensor", "local_shards"]


def is_dtensor(x: Any) -> bool:
    """``isinstance(x, DTensor)``, without importing ``torch.distributed.tensor`` (none exists
    until something has imported it)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def _gather(group: Any, device_type: str, local: torch.Tensor) -> torch.Tensor:
    """``(world, k)``: the ``(k,)`` vectors of every rank of ``group``, in rank order. The few numbers
    travel on the mesh's device type (FSDP2's CPU offload keeps params on the CPU, NCCL needs CUDA)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    send = local.to(device_type) if local.device.type != device_type else local.contiguous()
    out = send.new_empty((world * local.shape[0],))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, send, group=group)
    return out.to(local.device).reshape(world, local.shape[0])


class ShardedRows(RowReduce):
    """Reductions over the rows of a tensor whose dim 0 is split over the ranks of ``group``:
    reduce the local rows (empty ones give the identity: 0, -inf, +inf), gather, reduce again."""

    def __init__(self, shape: tuple[int, ...], group: Any, device_type: str = "cpu") -> None:
        super().__init__(shape)
        self.group, self.device_type = group, device_type

    def sum(self, xp: Any, *xs: Any) -> tuple[Any, ...]:
        local = torch.stack([torch.sum(x) for x in xs])
        return tuple(_gather(self.group, self.device_type, local).sum(dim=0).unbind())

    def max(self, xp: Any, *xs: Any) -> tuple[Any, ...]:
        local = torch.stack([torch.amax(x) if x.shape[0] else x.new_full((), -math.inf) for x in xs])
        return tuple(_gather(self.group, self.device_type, local).amax(dim=0).unbind())

    def min(self, xp: Any, *xs: Any) -> tuple[Any, ...]:
        local = torch.stack([torch.amin(x) if x.shape[0] else x.new_full((), math.inf) for x in xs])
        return tuple(_gather(self.group, self.device_type, local).amin(dim=0).unbind())


FSDP1_WARNING = (
    "AdamP/SGDP got an FSDP1 FlatParameter (FullyShardedDataParallel): its 1-d flattened shard has no"
    " rows, so no scale-invariance test or projection can be made and the step is plain AdamW/SGD."
    " Use FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor params keep their shape."
)


def _row_mesh_dim(p: Any) -> int | None:
    """The mesh dim that shards dim 0 when every other mesh dim replicates (FSDP2: ``(Shard(0),)``;
    HSDP: ``(Replicate(), Shard(0))``); -1 when every mesh dim replicates; None otherwise."""
    from torch.distributed.tensor import Shard

    found = -1
    for i, pl in enumerate(p.placements):
        if type(pl) is Shard and pl.dim == 0 and found == -1:
            found = i
        elif not pl.is_replicate():
            return None
    return found


def _check_like(p: Any, x: Any, what: str) -> None:
    param = f"DTensor param of shape {tuple(p.shape)} with placements {tuple(p.placements)}"
    if not is_dtensor(x):
        raise TypeError(f"{what} of a {param} is a {type(x).__name__}; expected a DTensor with the same placements")
    if x.device_mesh != p.device_mesh or tuple(x.placements) != tuple(p.placements):
        raise ValueError(
            f"{what} of a {param} on {p.device_mesh} has placements {tuple(x.placements)} on {x.device_mesh}"
        )


def local_shards(p: Any, g: Any, *state: Any) -> tuple[Any, Any, tuple[Any, ...], RowReduce | None]:
    """``(p, g, state, rows)`` for one param: for a DTensor sharded only on dim 0 (or replicated), its
    local tensors (views: writing them writes the DTensors) and the :class:`RowReduce` for its rows;
    otherwise the arguments unchanged and ``None``.

    A grad with other placements than its param (on the same mesh) is redistributed to the param's.
    """
    if not is_dtensor(p):
        if getattr(p, "_is_flat_param", False):
            warnings.warn(FSDP1_WARNING, UserWarning, stacklevel=4)
        return p, g, state, None
    if is_dtensor(g) and g.device_mesh == p.device_mesh and tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    _check_like(p, g, "the grad")
    for i, s in enumerate(state):
        _check_like(p, s, f"optimizer state array {i}")
    mesh_dim = _row_mesh_dim(p)
    if mesh_dim is None:  # e.g. Shard(1): DTensor's own sharding propagation does the reductions
        return p, g, state, None
    if mesh_dim == -1:
        rows = RowReduce(p.shape)
    else:
        mesh = p.device_mesh
        rows = ShardedRows(tuple(p.shape), mesh.get_group(mesh_dim), mesh.device_type)
    return p.to_local(), g.to_local(), tuple(s.to_local() for s in state), rows
