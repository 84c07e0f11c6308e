"""Train a small BatchNorm CNN on scikit-learn's digits with ``adamp_torch.AdamP`` (or ``SGDP``).

A complete training loop: data, model, optimizer, a cosine learning-rate schedule, a checkpoint saved
halfway and training resumed from it in a fresh model and optimizer, then the test accuracy::

    python examples/torch_training.py                   # AdamP, 300 steps: a few seconds on 2 CPU cores
    python examples/torch_training.py --optimizer sgdp  # SGDP (Nesterov momentum)
    python examples/torch_training.py --steps 20        # a quick check

Needs ``pip install -e ".[torch,plot]"`` (torch and scikit-learn). The convs are followed by BatchNorm,
so their weights are scale-invariant: AdamP removes the radial part of their updates (their norms, printed
at the start and the end, then grow only by second-order terms), while the classifier's weights take the
plain AdamW step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from adamp_torch import SGDP, AdamP


def load_data(seed: int = 0):
    """Digits as (N, 1, 8, 8) float32 images in [0, 1]; 1,497 to train on, 300 to test."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[300:], y[300:]), (x[:300], y[:300])


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),  # makes the conv weight scale-invariant: its update is projected
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adamp":
        return AdamP(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2)
    return SGDP(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-5)


def conv_weight_norms(model: nn.Module) -> list[float]:
    return [round(m.weight.norm().item(), 3) for m in model if isinstance(m, nn.Conv2d)]


def train(model, optimizer, scheduler, data, start: int, stop: int, batch_size: int, seed: int, log_every: int):
    """Steps ``start`` to ``stop - 1``; batch ``i`` depends only on ``seed`` and ``i``, so a resumed run
    sees the batches the uninterrupted one would."""
    (x, y), loss = data, float("nan")
    model.train()
    for i in range(start, stop):
        idx = torch.randint(0, len(x), (batch_size,), generator=torch.Generator().manual_seed(seed * 100_003 + i))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        scheduler.step()  # per-step cosine decay of the learning rate
        if (i + 1) % log_every == 0 or i + 1 == stop:
            print(f"step {i + 1:4d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
    return loss.item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", choices=["adamp", "sgdp"], default="adamp")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in all (default: 300)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: a temporary one)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_data, (x_test, y_test) = load_data(args.seed)
    half, log_every = args.steps // 2, max(1, args.steps // 10)

    model = make_model()
    optimizer = make_optimizer(args.optimizer, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    print(
        f"{type(optimizer).__module__}.{type(optimizer).__name__}, {args.steps} steps; conv |w| at start:",
        conv_weight_norms(model),
    )
    train(model, optimizer, scheduler, train_data, 0, half, args.batch_size, args.seed, log_every)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or Path(tmp) / "checkpoint.pt"
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": half,
            },
            path,
        )
        print(f"saved a checkpoint at step {half}; resuming in a new model and optimizer")

        # What a new process would do: build everything again, then load the checkpoint.
        model = make_model()
        optimizer = make_optimizer(args.optimizer, model)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
        checkpoint = torch.load(path, weights_only=True)  # plain tensors and numbers: no pickle needed
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    loss = train(
        model, optimizer, scheduler, train_data, checkpoint["step"], args.steps, args.batch_size, args.seed, log_every
    )

    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.3f}; conv |w| at the end:", conv_weight_norms(model))
    return {"loss": loss, "accuracy": accuracy}


if __name__ == "__main__":
    main()
