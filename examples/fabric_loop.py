"""Grokfast with Lightning Fabric: ``attach_grokfast`` on Fabric's optimizer, on one process or several (DDP).

Fabric calls no callback hooks around ``optimizer.step()``, so ``GrokfastCallback`` cannot run there; the step
pre-hook of ``attach_grokfast`` does. Under DDP every rank filters the same all-reduced gradients, so every rank
holds the same filter state, and ``fabric.save`` writes it with the optimizer.

    python examples/fabric_loop.py                   # one process, about 1,000 steps to 95% validation accuracy
    python examples/fabric_loop.py --devices 2       # two CPU processes (DDP, gloo), the batch split between them
    python examples/fabric_loop.py --tiny
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_grokfast import attach_grokfast
from lightning_grokfast.tasks import GrokTransformer

try:  # run as a script (examples/ on sys.path) or imported as examples.fabric_loop
    from plain_loop import accuracy, split
except ImportError:  # pragma: no cover
    from examples.plain_loop import accuracy, split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Grokfast with Lightning Fabric.")
    parser.add_argument("--tiny", action="store_true", help="a few steps on p=11")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=3000)
    args = parser.parse_args(argv)
    p, steps, batch = (11, 4, 32) if args.tiny else (97, args.max_steps, 512)

    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    train_data, val_data = split(p)
    torch.manual_seed(0)
    model = GrokTransformer(num_tokens=p + 2, num_classes=p)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.005)
    model, optimizer = fabric.setup(model, optimizer)
    attach_grokfast(optimizer, model=model.module, filter="ema", alpha=0.98, lamb=2.0)  # the one line

    inputs, targets = train_data
    per_rank = batch // fabric.world_size
    for step in range(steps):
        rows = torch.randint(len(targets), (batch,), generator=torch.Generator().manual_seed(step))
        rows = rows[fabric.global_rank * per_rank : (fabric.global_rank + 1) * per_rank]
        optimizer.zero_grad()
        fabric.backward(nn.functional.cross_entropy(model(inputs[rows]), targets[rows]))
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            val = accuracy(model, val_data)
            fabric.print(f"step {step + 1}: val {val:.3f}")
            if val >= 0.95:
                break
    fabric.save("fabric_loop.ckpt", {"model": model, "optimizer": optimizer})


if __name__ == "__main__":
    main()
