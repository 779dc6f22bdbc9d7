"""Tiny models and recorders shared by the Trainer-level tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 48, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


class TinyModel(pl.LightningModule):
    """Two linear layers, SGD by default; deterministic on CPU."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, batch_size: int = 8, n: int = 48) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        self.optimizer_name, self.lr, self.batch_size, self.n = optimizer, lr, batch_size, n

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(self.n), batch_size=self.batch_size, shuffle=False)


class GradRecorder(Callback):
    """Records, per optimizer step, the gradients as this callback's hook sees them (put it before or after)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor | None]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.grads.append(
            {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in pl_module.named_parameters()}
        )


class StepGradRecorder(Callback):
    """Records the gradients that `optimizer.step()` really uses (after clipping), via `on_train_batch_end`-free
    wrapping of the optimizer's step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recorder = self
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for optimizer in trainer.optimizers:
            original_step = optimizer.step

            def step(closure=None, _original=original_step, _optimizer=optimizer):
                loss = closure() if closure is not None else None
                recorder.grads.append(
                    {
                        names[id(p)]: p.grad.detach().clone()
                        for group in _optimizer.param_groups
                        for p in group["params"]
                        if p.grad is not None
                    }
                )
                _original()
                return loss

            optimizer.step = step


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def reference_run(model: TinyModel, reference, steps: int, accumulate: int = 1) -> dict[str, Tensor]:
    """Plain PyTorch loop: backward over `accumulate` batches, reference filter, SGD/Adam step."""
    optimizer = model.configure_optimizers()
    batches = iter(_cycle(model.train_dataloader()))
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(accumulate):
            x, y = next(batches)
            (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
        named = {n: p.grad for n, p in model.named_parameters()}
        for name, grad in reference(named).items():
            dict(model.named_parameters())[name].grad = grad
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _cycle(loader: DataLoader):
    while True:
        yield from loader
