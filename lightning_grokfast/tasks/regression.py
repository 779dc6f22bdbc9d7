"""Teacher-student regression: a small random network (the teacher) labels Gaussian inputs, a student learns it.

A regression task whose metric is an error (lower is better), so the grokking detector and ``lightning-grokfast
tune`` run with ``mode="min"``. A student :class:`~lightning_grokfast.tasks.MLPRegressor` whose weights are scaled
up at initialisation (Omnigrok) interpolates its small training set at once, with a validation error far above
the targets' variance, and approaches the teacher only once weight decay has shrunk its weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_grokfast.core.validation import check_int, check_number
from lightning_grokfast.tasks.base import SplitDataModule


def make_teacher_student_dataset(
    num_inputs: int = 20, teacher_hidden: int = 4, num_examples: int = 3000, noise: float = 0.0, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Gaussian inputs labelled by a random one-hidden-layer ReLU teacher, targets standardised.

    The teacher ``y = v . relu(W x)`` has ``teacher_hidden`` units, with ``W`` and ``v`` drawn from a standard
    normal distribution (rows of ``W`` scaled by ``1 / sqrt(num_inputs)``). The targets are centred and scaled to
    unit variance over the whole set, so a mean squared error of 1 is that of predicting the mean; label noise of
    standard deviation ``noise`` is then added.

    Args:
        num_inputs: input dimension, ``>= 1``.
        teacher_hidden: hidden units of the teacher, ``>= 1``.
        num_examples: number of examples, ``>= 2``.
        noise: standard deviation of the label noise, ``>= 0``.
        seed: seed of the teacher, the inputs and the noise.

    Returns:
        ``(inputs, targets)`` of shapes ``(num_examples, num_inputs)`` and ``(num_examples, 1)``.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        inputs, targets = make_teacher_student_dataset(num_inputs=20, teacher_hidden=4, num_examples=3000)

    """
    check_int(num_inputs, "num_inputs", low=1)
    check_int(teacher_hidden, "teacher_hidden", low=1)
    check_int(num_examples, "num_examples", low=2)
    check_number(noise, "noise", low=0.0)
    check_int(seed, "seed")
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(teacher_hidden, num_inputs, generator=generator) / num_inputs**0.5
    readout = torch.randn(teacher_hidden, generator=generator)
    inputs = torch.randn(num_examples, num_inputs, generator=generator)
    targets = nn.functional.relu(inputs @ weights.T) @ readout
    targets = (targets - targets.mean()) / targets.std()
    targets = targets + noise * torch.randn(num_examples, generator=generator)
    return inputs, targets.unsqueeze(1)


class TeacherStudentDataModule(SplitDataModule):
    """Teacher-student regression: ``num_train`` labelled Gaussian inputs for training, ``num_val`` for validation.

    Args:
        num_inputs: input dimension (default 20).
        teacher_hidden: hidden units of the random ReLU teacher (default 4).
        num_train: training examples (default 1000).
        num_val: validation examples, drawn independently of the training ones (default 2000).
        noise: standard deviation of the label noise on standardised targets (default 0).
        batch_size: training batch size (default 1000: the whole training set).
        val_batch_size: validation batch size (default: the whole validation set).
        seed: seed of the teacher, the data and the shuffling.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        dm = TeacherStudentDataModule(num_inputs=20, num_train=1000)
        trainer.fit(MLPRegressor(num_inputs=20, init_scale=4.0, weight_decay=1.0, optimizer="adamw"), datamodule=dm)

    """

    def __init__(
        self,
        num_inputs: int = 20,
        teacher_hidden: int = 4,
        num_train: int = 1000,
        num_val: int = 2000,
        noise: float = 0.0,
        batch_size: int = 1000,
        val_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_batch_size, seed)
        check_int(num_train, "num_train", low=1)
        check_int(num_val, "num_val", low=1)
        self.save_hyperparameters()
        inputs, targets = make_teacher_student_dataset(num_inputs, teacher_hidden, num_train + num_val, noise, seed)
        self.train_set = TensorDataset(inputs[:num_train], targets[:num_train])
        self.val_set = TensorDataset(inputs[num_train:], targets[num_train:])

    @property
    def num_inputs(self) -> int:
        """Input features: ``num_inputs``."""
        return int(self.hparams["num_inputs"])

    @property
    def num_outputs(self) -> int:
        """One target per example."""
        return 1
