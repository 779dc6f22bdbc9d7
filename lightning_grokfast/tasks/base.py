"""What every built-in task shares: the optimizer and its warm-up, the losses and metrics, the train/validation data."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_grokfast.core.validation import check_choice, check_int, check_number, require
from lightning_grokfast.tasks.losses import LOSSES, get_loss

torchmetrics = require("torchmetrics", "tasks", "The built-in tasks")

#: The optimizers a built-in task's ``optimizer`` argument may name: Adam's weight decay is coupled (an L2 term
#: in the gradient, as in the Grokfast paper's code), AdamW's is decoupled.
OPTIMIZERS = ("adam", "adamw")


class TaskModule(pl.LightningModule):
    """Base of every built-in task's model: Adam(W) with a linear learning-rate warm-up, validated arguments.

    Subclasses set their loss and metrics (:class:`ClassificationTask`, :class:`RegressionTask`), build their
    layers and define ``forward``. ``lightning-grokfast`` (:class:`~lightning_grokfast.cli.fit.TaskCLI`) takes
    any subclass as ``--model``.

    Args:
        lr: learning rate.
        weight_decay: weight decay, ``>= 0``.
        betas: Adam betas.
        warmup_steps: linear learning-rate warm-up, in optimizer steps (0: none).
        optimizer: ``"adam"`` (coupled L2 weight decay) or ``"adamw"`` (decoupled).

    Raises:
        ValueError: If an argument is out of range.

    Example::

        class MyTask(ClassificationTask):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.net = torch.nn.Linear(8, 2)

            def forward(self, inputs):
                return self.net(inputs)

    """

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 10,
        optimizer: str = "adam",
    ) -> None:
        super().__init__()
        check_number(lr, "lr", low=0.0, low_inclusive=False)
        check_number(weight_decay, "weight_decay", low=0.0)
        if len(betas) != 2:
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        for beta in betas:
            check_number(beta, "betas", low=0.0, high=1.0, high_inclusive=False)
        check_int(warmup_steps, "warmup_steps")
        check_choice(optimizer, "optimizer", OPTIMIZERS)
        self.save_hyperparameters()  # also collects the subclasses' arguments

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer_class = torch.optim.AdamW if hp["optimizer"] == "adamw" else torch.optim.Adam
        optimizer = optimizer_class(
            self.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], betas=tuple(hp["betas"])
        )
        return {"optimizer": optimizer, "lr_scheduler": warmup_schedule(optimizer, hp["warmup_steps"])}


class ClassificationTask(TaskModule):
    """Base of the built-in classifiers: a :class:`TaskModule` with a classification loss and accuracies.

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
        check_int(num_classes, "num_classes", low=2)
        super().__init__(lr, weight_decay, betas, warmup_steps, optimizer)
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


class RegressionTask(TaskModule):
    """Base of the built-in regression models: a :class:`TaskModule` with the mean squared error as loss and metric.

    Subclasses build their layers and define ``forward(inputs) -> predictions`` of the targets' shape. Logged:
    ``train_loss`` (per step and per epoch), ``val_loss`` and ``test_loss``, all mean squared errors: lower is
    better, so :class:`~lightning_grokfast.GrokkingDetectorCallback` and ``lightning-grokfast tune`` read them with
    ``mode="min"``.

    Args:
        lr: learning rate.
        weight_decay: weight decay, ``>= 0``.
        betas: Adam betas.
        warmup_steps: linear learning-rate warm-up, in optimizer steps (0: none).
        optimizer: ``"adam"`` (coupled L2 weight decay) or ``"adamw"`` (decoupled).

    Raises:
        ValueError: If an argument is out of range.

    Example::

        class MyRegressor(RegressionTask):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.net = torch.nn.Linear(8, 1)

            def forward(self, inputs):
                return self.net(inputs)

    """

    def _mse(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self(inputs), targets)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._mse(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._mse(batch), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._mse(batch))


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


def split_table(
    inputs: Tensor, targets: Tensor, train_fraction: float, generator: torch.Generator
) -> tuple[TensorDataset, TensorDataset]:
    """Split a table of examples at random into a train and a validation set (each example in exactly one).

    Args:
        inputs: the examples' inputs, one row each.
        targets: their targets, as many as ``inputs``.
        train_fraction: fraction of the examples that go to the train set (rounded), in ``(0, 1)``.
        generator: the random stream of the split (one ``randperm`` of the examples is drawn from it).

    Returns:
        ``(train_set, val_set)``: the first ``round(train_fraction * len(targets))`` examples of the permutation, and
        the others.

    Raises:
        ValueError: If ``train_fraction`` is not in ``(0, 1)``.

    Example::

        train_set, val_set = split_table(inputs, targets, 0.5, torch.Generator().manual_seed(0))

    """
    check_number(train_fraction, "train_fraction", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    order = torch.randperm(len(targets), generator=generator)
    n_train = round(train_fraction * len(targets))
    train, val = order[:n_train], order[n_train:]
    return TensorDataset(inputs[train], targets[train]), TensorDataset(inputs[val], targets[val])


__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "ClassificationTask",
    "RegressionTask",
    "SplitDataModule",
    "TaskModule",
    "split_table",
    "warmup_schedule",
]
