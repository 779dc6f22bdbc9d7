"""Multilayer perceptrons for the vector-input tasks: a classifier (parity, digits, MNIST-1D) and a regressor."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from lightning_grokfast.core.validation import check_int, check_number
from lightning_grokfast.tasks.base import ClassificationTask, RegressionTask


class MLPClassifier(ClassificationTask):
    """ReLU MLP with ``depth`` hidden layers of width ``hidden``, optionally with all weights scaled up at init.

    A large initialisation (``init_scale`` > 1, as in Omnigrok, Liu et al. 2022) makes a model memorise its
    training set first and generalise only once weight decay has shrunk its weights: grokking on tasks that
    otherwise generalise at once. The optimizer arguments default to those of every built-in task (so that
    ``--model MLPClassifier`` after the default task keeps them); the parity and digits configs set theirs.

    Args:
        num_inputs: input features (``num_bits`` of :class:`~lightning_grokfast.tasks.SparseParityDataModule`, 64
            for :class:`~lightning_grokfast.tasks.DigitsDataModule`).
        num_classes: classes (2 for parity, 10 for digits).
        hidden: width of the hidden layers.
        depth: number of hidden layers, ``>= 1``.
        init_scale: factor applied to every parameter after PyTorch's default initialisation, ``> 0``.
        lr: learning rate.
        weight_decay: weight decay, ``>= 0``.
        betas: Adam betas.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        optimizer: ``"adam"`` or ``"adamw"`` (decoupled weight decay, used by the parity and digits configs).
        loss: ``"cross_entropy"`` or ``"stablemax"``.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        model = MLPClassifier(num_inputs=30, num_classes=2, hidden=512, weight_decay=1.0, optimizer="adamw")

    """

    def __init__(
        self,
        num_inputs: int = 30,
        num_classes: int = 2,
        hidden: int = 512,
        depth: int = 1,
        init_scale: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 10,
        optimizer: str = "adam",
        loss: str = "cross_entropy",
    ) -> None:
        super().__init__(num_classes, lr, weight_decay, betas, warmup_steps, optimizer, loss)
        self.net = build_mlp(num_inputs, num_classes, hidden, depth, init_scale)

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits of shape ``(batch, num_classes)``."""
        return self.net(inputs)


class MLPRegressor(RegressionTask):
    """ReLU MLP regressor (mean squared error), optionally with all weights scaled up at initialisation.

    The regression twin of :class:`MLPClassifier`: with a large initialisation (``init_scale`` > 1, Omnigrok) it
    interpolates a small training set at once and its validation error falls only once weight decay has shrunk its
    weights. Its losses are errors (lower is better): read them with ``mode="min"``.

    Args:
        num_inputs: input features (``num_inputs`` of :class:`~lightning_grokfast.tasks.TeacherStudentDataModule`).
        num_outputs: outputs per example (``num_outputs`` of the datamodule).
        hidden: width of the hidden layers.
        depth: number of hidden layers, ``>= 1``.
        init_scale: factor applied to every parameter after PyTorch's default initialisation, ``> 0``.
        lr: learning rate.
        weight_decay: weight decay, ``>= 0``.
        betas: Adam betas.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        optimizer: ``"adam"`` or ``"adamw"``.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        model = MLPRegressor(num_inputs=20, hidden=200, depth=2, init_scale=4.0, weight_decay=1.0, optimizer="adamw")

    """

    def __init__(
        self,
        num_inputs: int = 20,
        num_outputs: int = 1,
        hidden: int = 200,
        depth: int = 2,
        init_scale: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 10,
        optimizer: str = "adam",
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, optimizer)
        self.net = build_mlp(num_inputs, num_outputs, hidden, depth, init_scale)

    def forward(self, inputs: Tensor) -> Tensor:
        """Predictions of shape ``(batch, num_outputs)``."""
        return self.net(inputs)


def build_mlp(num_inputs: int, num_outputs: int, hidden: int, depth: int, init_scale: float = 1.0) -> nn.Sequential:
    """A ReLU MLP, ``depth`` hidden layers of width ``hidden``, every parameter scaled by ``init_scale`` at init.

    Args:
        num_inputs: input features, ``>= 1``.
        num_outputs: outputs, ``>= 1``.
        hidden: width of the hidden layers, ``>= 1``.
        depth: number of hidden layers, ``>= 1``.
        init_scale: factor applied to every weight and bias after PyTorch's default initialisation, ``> 0``.

    Returns:
        The ``nn.Sequential`` of ``Linear``/``ReLU`` layers, ending with a ``Linear`` to ``num_outputs``.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        net = build_mlp(40, 10, hidden=256, depth=2, init_scale=8.0)

    """
    check_int(num_inputs, "num_inputs", low=1)
    check_int(num_outputs, "num_outputs", low=1)
    check_int(hidden, "hidden", low=1)
    check_int(depth, "depth", low=1)
    check_number(init_scale, "init_scale", low=0.0, low_inclusive=False)
    widths = [num_inputs] + [hidden] * depth
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_outputs))
    net = nn.Sequential(*layers)
    if init_scale != 1.0:
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.mul_(init_scale)
    return net
