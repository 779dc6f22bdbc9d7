"""What every built-in task's model shares: the loss, the logged metrics and the optimizer with its warm-up."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_grokfast.core.validation import check_choice, check_int, check_number, require
from lightning_grokfast.tasks.losses import LOSSES, get_loss

torchmetrics = require("torchmetrics", "tasks", "The built-in tasks")

#: The optimizers a built-in task's ``optimizer`` argument may name: Adam's weight decay is coupled (an L2 term
#: in the gradient, as in the Grokfast paper's code), AdamW's is decoupled.
OPTIMIZERS = ("adam", "adamw")


class ClassificationTask(pl.LightningModule):
    """Base of the built-in tasks' models: a classifier trained with Adam(W) and a linear learning-rate warm-up.

    Subclasses build their layers and define ``forward(inputs) -> logits``. Logged: ``train_loss`` and
    ``train_acc`` (per step and per epoch), ``val_loss`` and ``val_acc``, ``test_loss`` and ``test_acc``; the
    accuracies are what :class:`~lightning_grokfast.GrokkingDetectorCallback` and the dashboard read.

    Args:
        num_classes: number of classes of the output.
        lr: learning rate.
        weight_decay: weight decay, ``>= 0``.
        betas: Adam betas.
        warmup_steps: linear learning-rate warm-up, in optimizer steps (0: none).
        optimizer: ``"adam"`` (coupled L2 weight decay) or ``"adamw"`` (decoupled).
        loss: ``"cross_entropy"`` or ``"stablemax"`` (:func:`~lightning_grokfast.tasks.losses.stablemax_cross_entropy`).

    Raises:
        ValueError: If an argument is out of range.

    Example::

        >>> import torch
        >>> from lightning_grokfast.tasks.base import ClassificationTask
        >>> class Linear(ClassificationTask):
        ...     def __init__(self) -> None:
        ...         super().__init__(num_classes=3)
        ...         self.layer = torch.nn.Linear(4, 3)
        ...     def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        ...         return self.layer(inputs)
        >>> Linear()(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 10,
        optimizer: str = "adam",
        loss: str = "cross_entropy",
    ) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", low=2)
        check_number(lr, "lr", low=0.0, low_inclusive=False)
        check_number(weight_decay, "weight_decay", low=0.0)
        if len(betas) != 2:
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        for beta in betas:
            check_number(beta, "betas", low=0.0, high=1.0, high_inclusive=False)
        check_int(warmup_steps, "warmup_steps")
        check_choice(optimizer, "optimizer", OPTIMIZERS)
        self.save_hyperparameters()  # also collects the subclass's arguments
        self.loss_fn = get_loss(loss)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = self.loss_fn(logits, targets)
        self.train_acc(logits, targets)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        self.val_acc(logits, targets)
        self.log("val_loss", self.loss_fn(logits, targets), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        self.log("test_loss", self.loss_fn(logits, targets))
        self.log("test_acc", (logits.argmax(-1) == targets).float().mean())

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer_class = torch.optim.AdamW if hp["optimizer"] == "adamw" else torch.optim.Adam
        optimizer = optimizer_class(
            self.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], betas=tuple(hp["betas"])
        )
        return {"optimizer": optimizer, "lr_scheduler": warmup_schedule(optimizer, hp["warmup_steps"])}


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` entry: the learning rate rises linearly over ``warmup_steps`` optimizer steps.

    Args:
        optimizer: the optimizer whose learning rate is scheduled.
        warmup_steps: optimizer steps until the full learning rate (0: none).

    Returns:
        ``{"scheduler": LambdaLR, "interval": "step"}``, for ``configure_optimizers``.

    Example::

        >>> import torch
        >>> from lightning_grokfast.tasks.base import warmup_schedule
        >>> optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
        >>> warmup_schedule(optimizer, 10)["interval"]
        'step'
    """
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, step / warmup_steps) if warmup_steps else 1.0
    )
    return {"scheduler": schedule, "interval": "step"}


class SplitDataModule(pl.LightningDataModule):
    """Base of the built-in tasks' data: a train and a validation :class:`~torch.utils.data.TensorDataset`.

    Subclasses set ``self.train_set`` and ``self.val_set`` in ``__init__`` (the data is small and generated or
    loaded at construction, so it is the same on every process). Training batches are reshuffled each epoch
    from a generator seeded with ``seed``; validation and test use the validation set.

    Args:
        batch_size: training batch size, ``>= 1`` (a batch larger than the train set is the whole set).
        val_batch_size: validation batch size (default: the whole validation set in one batch).
        seed: seed of the split and of the shuffling.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        >>> from lightning_grokfast.tasks import ModularArithmeticDataModule
        >>> data = ModularArithmeticDataModule(p=11, batch_size=16)
        >>> len(data.train_set) + len(data.val_set)
        110
    """

    train_set: TensorDataset
    val_set: TensorDataset

    def __init__(self, batch_size: int, val_batch_size: int | None, seed: int) -> None:
        super().__init__()
        self.batch_size = check_int(batch_size, "batch_size", low=1)
        if val_batch_size is not None:
            check_int(val_batch_size, "val_batch_size", low=1)
        self._val_batch_size = val_batch_size
        self.seed = check_int(seed, "seed")

    @property
    def val_batch_size(self) -> int:
        """The validation batch size (the whole validation set unless given)."""
        return self._val_batch_size or len(self.val_set)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


__all__ = ["LOSSES", "OPTIMIZERS", "ClassificationTask", "SplitDataModule", "warmup_schedule"]
