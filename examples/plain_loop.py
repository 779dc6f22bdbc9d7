"""Grokfast in a plain PyTorch loop: one line, ``attach_grokfast(optimizer, ...)``, and nothing else changes.

Trains the Grokfast paper's task (``x * y mod 97``, half the equations for training) with the built-in transformer,
used as a plain ``nn.Module``. The filter state lives in ``optimizer.state_dict()``, so the usual checkpoint of
model and optimizer resumes the filter exactly.

    python examples/plain_loop.py              # about 1,000 steps to 95% validation accuracy on a laptop CPU
    python examples/plain_loop.py --tiny       # a few steps on a tiny task, with a save/resume in the middle
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from lightning_grokfast import attach_grokfast
from lightning_grokfast.tasks import GrokTransformer
from lightning_grokfast.tasks.modular import make_modular_dataset


def split(p: int, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    inputs, targets = make_modular_dataset("*", p)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    return (inputs[order[:half]], targets[order[:half]]), (inputs[order[half:]], targets[order[half:]])


def build(p: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GrokTransformer(num_tokens=p + 2, num_classes=p)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.005)
    attach_grokfast(optimizer, model=model, filter="ema", alpha=0.98, lamb=2.0)  # the one line
    return model, optimizer


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(-1) == data[1]).float().mean())


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data, steps: range, batch_size: int) -> None:
    inputs, targets = data
    for step in steps:
        rows = torch.randint(len(targets), (batch_size,), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[rows]), targets[rows]).backward()
        optimizer.step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Grokfast in a plain PyTorch loop.")
    parser.add_argument("--tiny", action="store_true", help="a few steps on p=11, with a save and resume")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--checkpoint", default="plain_loop.pt")
    args = parser.parse_args(argv)
    p, steps, batch = (11, 6, 32) if args.tiny else (97, args.max_steps, 512)
    train_data, val_data = split(p)
    model, optimizer = build(p)
    half = steps // 2 if args.tiny else steps
    for start in range(0, half, 100):
        train(model, optimizer, train_data, range(start, min(start + 100, half)), batch)
        val = accuracy(model, val_data)
        print(f"step {min(start + 100, half)}: train {accuracy(model, train_data):.3f}, val {val:.3f}")
        if val >= 0.95:
            break
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, args.checkpoint)
    if args.tiny:  # resume in a fresh model and optimizer: the filter state comes back with the optimizer's
        model, optimizer = build(p)
        saved = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        train(model, optimizer, train_data, range(half, steps), batch)
        print(f"resumed to step {steps}: val {accuracy(model, val_data):.3f}")
    print(f"checkpoint: {Path(args.checkpoint).resolve()}")


if __name__ == "__main__":
    main()
