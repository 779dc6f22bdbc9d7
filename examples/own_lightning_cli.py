"""Your own model and your own LightningCLI, with Grokfast, the detector and the dashboard added from YAML.

Nothing in the model knows about Grokfast: ``configs/callbacks.yaml`` lists the callbacks in the standard
``trainer.callbacks`` class_path form, which any LightningCLI understands. The model here is an MLP on token
embeddings learning modular addition, logging ``train_acc`` and ``val_acc`` (the names the callbacks read).

    python examples/own_lightning_cli.py fit --config configs/callbacks.yaml
    python examples/own_lightning_cli.py fit --config configs/callbacks.yaml --tiny   # a few steps, tiny task
    python examples/own_lightning_cli.py fit --config configs/callbacks.yaml --print_config
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import Tensor, nn

from lightning_grokfast.tasks import ModularArithmeticDataModule

#: Arguments that ``--tiny`` adds: a tiny task and three steps.
TINY_ARGS = [
    "--data.p=11",
    "--trainer.max_steps=3",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_checkpointing=false",
]


class ModularMLP(pl.LightningModule):
    """Embed the two operands of ``[x, op, y, =]``, concatenate, and classify the answer with a 2-layer MLP.

    Args:
        p: the modulus (number of answers); linked to ``data.p`` by :class:`MyCLI`.
        dim: embedding width.
        hidden: hidden width of the MLP.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    """

    def __init__(self, p: int = 97, dim: int = 128, hidden: int = 512, lr: float = 1e-3, weight_decay: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        self.embedding = nn.Embedding(p + 2, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, p))
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=p)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=p)

    def forward(self, inputs: Tensor) -> Tensor:
        operands = self.embedding(inputs[:, [0, 2]])
        return self.mlp(operands.flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = nn.functional.cross_entropy(logits, targets)
        self.train_acc(logits, targets)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        self.val_acc(logits, targets)
        self.log("val_loss", nn.functional.cross_entropy(logits, targets))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.98)
        )


class MyCLI(LightningCLI):
    """A LightningCLI of your own; the only addition is keeping the model's modulus equal to the data's."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.p", "model.p")


def main() -> None:
    if "--tiny" in sys.argv:
        sys.argv.remove("--tiny")
        sys.argv += TINY_ARGS
    MyCLI(
        ModularMLP,
        ModularArithmeticDataModule,
        seed_everything_default=0,
        trainer_defaults={"max_steps": 3000, "log_every_n_steps": 10},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
