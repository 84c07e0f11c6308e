"""Train a small convnet with FSDP2 (``torch.distributed.fsdp.fully_shard``) and AdamP.

Launch one process per device::

    torchrun --nproc-per-node 2 examples/fsdp2_adamp.py                # CPU, gloo
    torchrun --nproc-per-node 2 examples/fsdp2_adamp.py --device cuda  # GPUs, nccl
    torchrun --nproc-per-node 2 examples/fsdp2_adamp.py --check        # also compare with one process

FSDP2 turns every parameter into a DTensor sharded on dim 0. ``adamp_torch.AdamP`` needs no change
for that: it updates each process's local rows, and the few statistics that span rows (the max over
rows of the channel view's cosines, the layer view's sums) are combined across the shards, so every
rank takes the same decision as one process holding the whole tensor would.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from adamp_torch import SGDP, AdamP


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process (and in the --check replica)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
        nn.GroupNorm(4, 16),  # conv weights before a norm layer are scale-invariant: AdamP projects them
        nn.ReLU(),
        nn.Conv2d(16, 10, 3, stride=2, padding=1, bias=False),
        nn.GroupNorm(2, 10),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(10 * 4 * 4, 5),  # 5 rows: split unevenly over 2 ranks (3 + 2), which is fine
    )


def batches(steps: int, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed synthetic task: each of 5 classes adds its own random pattern to noise."""
    gen = torch.Generator().manual_seed(1)
    patterns = torch.randn(5, 3, 16, 16, generator=gen, dtype=dtype)
    out = []
    for _ in range(steps):
        y = torch.randint(0, 5, (batch,), generator=gen)
        out.append((patterns[y] + torch.randn(batch, 3, 16, 16, generator=gen, dtype=dtype), y))
    return out


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "adamp":
        return AdamP(params, lr=3e-3, betas=(0.9, 0.999), weight_decay=1e-2)
    return SGDP(params, lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--optimizer", choices=["adamp", "sgdp"], default="adamp")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="global batch, split over the ranks")
    ap.add_argument("--check", action="store_true", help="float64, and compare with one process at the end")
    args = ap.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        dtype = torch.float64 if args.check else torch.float32
        mesh = init_device_mesh(args.device, (world,))
        model = make_model().to(device=device, dtype=dtype)
        for layer in model:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fully_shard(layer, mesh=mesh)  # one all-gather / reduce-scatter unit per layer
        fully_shard(model, mesh=mesh)
        opt = make_optimizer(args.optimizer, model.parameters())  # params are DTensors now: nothing to change

        data = batches(args.steps, args.batch, dtype)
        per_rank = args.batch // world
        for step, (x, y) in enumerate(data):
            xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xs.to(device)), ys.to(device))
            loss.backward()  # FSDP2 reduce-scatters the grads: each rank holds the grad of its rows
            opt.step()
            if step % 10 == 0 or step == args.steps - 1:
                loss = loss.detach()
                dist.all_reduce(loss, op=dist.ReduceOp.SUM)  # mean over ranks = loss of the global batch
                if rank == 0:
                    print(f"step {step:3d}  loss {loss.item() / world:.4f}", flush=True)

        full = [p.full_tensor().detach() for p in model.parameters()]  # collective: every rank takes part
        if args.check and rank == 0:
            ref = make_model().to(device=device, dtype=dtype)
            ref_opt = make_optimizer(args.optimizer, ref.parameters())
            for x, y in data:  # the same samples the ranks used, all in one batch
                x, y = x[: per_rank * world], y[: per_rank * world]
                ref_opt.zero_grad(set_to_none=True)
                F.cross_entropy(ref(x.to(device)), y.to(device)).backward()
                ref_opt.step()
            with torch.no_grad():
                err = max(
                    float((a - b).abs().max() / b.abs().max()) for a, b in zip(full, ref.parameters(), strict=True)
                )
            print(f"FSDP2 on {world} ranks vs one process: max relative difference {err:.2e}")
            if not err < 1e-10:
                raise SystemExit("FSDP2 training differs from single-process training")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
