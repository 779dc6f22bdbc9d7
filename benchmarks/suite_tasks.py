"""The task suite of the safe-default study: the leaderboard's tasks and the three of ``docs/tasks-suite.md``.

``SUITE`` holds ``grokking_common.TASKS`` (modular, parity, digits) and S5 composition, MNIST-1D and the
teacher-student regression, with the models and data of their ``configs/*_baseline.yaml``. Each task's marks end with
its target; ``HIGHER`` is the higher mark its runs continue to.

The regression's metric is an error: its model here also logs the negated errors as ``train_acc`` and ``val_acc``
(higher is better), so the shared milestone engine and the detector read it unchanged; its marks are negated mean
squared errors (``-0.05`` is a validation MSE of 0.05).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from grokking_common import TASKS, Task
from torch import Tensor

from lightning_grokfast.tasks import (
    GrokTransformer,
    MLPClassifier,
    MLPRegressor,
    MNIST1DDataModule,
    PermutationGroupDataModule,
    TeacherStudentDataModule,
)


def _s5(seed: int, weight_decay: float, loss: str, smoke: bool) -> tuple[Any, Any]:
    data = PermutationGroupDataModule(n=4 if smoke else 5, batch_size=64 if smoke else 512, seed=seed)
    size = {"dim": 16, "num_heads": 2, "num_layers": 1} if smoke else {}
    model = GrokTransformer(data.num_tokens, weight_decay=weight_decay, loss=loss, optimizer="adamw", **size)
    return model, data


def _mnist1d(seed: int, weight_decay: float, loss: str, smoke: bool) -> tuple[Any, Any]:
    data = MNIST1DDataModule(num_train=100 if smoke else 1000, num_val=100 if smoke else 4000, seed=seed)
    hidden = 16 if smoke else 200
    model = MLPClassifier(
        40, 10, hidden=hidden, depth=2, init_scale=8.0, optimizer="adamw", weight_decay=weight_decay, loss=loss
    )
    return model, data


class NegatedErrorRegressor(MLPRegressor):
    """:class:`MLPRegressor` that also logs ``-train_loss`` and ``-val_loss`` as ``train_acc`` and ``val_acc``."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_acc", -loss.detach(), on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        error = torch.nn.functional.mse_loss(self(inputs), targets)
        self.log("val_loss", error)
        self.log("val_acc", -error)


def _regression(seed: int, weight_decay: float, loss: str, smoke: bool) -> tuple[Any, Any]:
    data = TeacherStudentDataModule(num_train=100 if smoke else 1000, num_val=100 if smoke else 2000, seed=seed)
    hidden = 16 if smoke else 200
    model = NegatedErrorRegressor(
        20, hidden=hidden, depth=2, init_scale=4.0, optimizer="adamw", weight_decay=weight_decay
    )
    return model, data


PAPER_MNIST_EMA = {"filter": "ema", "alpha": 0.8, "lamb": 0.1}
SUITE: dict[str, Task] = {
    **TASKS,
    "s5": Task("s5", "S5 composition, the paper's transformer, AdamW", _s5, 1.0, (0.5, 0.9), 10000, 100,
               {"filter": "ema", "alpha": 0.98, "lamb": 2.0}, "configs/s5_baseline.yaml"),
    "mnist1d": Task("mnist1d", "MNIST-1D (1,000 train), MLP x8 init, AdamW", _mnist1d, 1.0, (0.35, 0.4), 3000, 25,
                    PAPER_MNIST_EMA, "configs/mnist1d_baseline.yaml"),
    "regression": Task("regression", "teacher-student (1,000 train), MLP x4 init, AdamW; -MSE", _regression, 1.0,
                       (-0.2, -0.05), 3000, 25, PAPER_MNIST_EMA, "configs/regression_baseline.yaml"),
}  # fmt: skip
#: The higher mark of each task (its marks' last is the target): the run continues to it.
HIGHER = {"modular": 0.99, "parity": 0.99, "digits": 0.95, "s5": 0.95, "mnist1d": 0.45, "regression": -0.01}
#: Per-task detector thresholds of the back-off rule (the default ones assume accuracies).
DETECTOR = {"regression": {"memorization_threshold": -0.01, "jump_threshold": 0.1, "convergence_gap": 0.01}}


def task_with_higher_mark(name: str) -> Task:
    """The task with its higher mark appended: its runs stop there (or at the cap), not at the target."""
    task = SUITE[name]
    return dataclasses.replace(task, marks=(*task.marks, HIGHER[name]))
