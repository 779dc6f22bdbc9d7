"""MNIST-1D (Greydanus 2020) with a small training set, for grokking by a large initialisation (Omnigrok).

The ``mnist1d`` package (extra ``[tasks]``) generates the data procedurally, offline: ten 1-D digit templates,
padded, translated, scaled, sheared and made noisy into signals of 40 samples. An MLP whose weights are scaled up
at initialisation (:class:`~lightning_grokfast.tasks.MLPClassifier` with ``init_scale`` > 1) fits a training set of
1,000 signals within a few hundred steps and reaches its validation accuracy only once weight decay has shrunk its
weights.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_grokfast.core.validation import check_int, require
from lightning_grokfast.tasks.base import SplitDataModule

#: Samples per signal of MNIST-1D (the package's ``final_seq_length``).
SIGNAL_LENGTH = 40


def make_mnist1d_dataset(num_examples: int = 5000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``num_examples`` MNIST-1D signals generated with the package's default settings and ``seed``.

    The package draws from NumPy's and Python's global random generators after seeding them; their states are
    restored afterwards, so building the data changes no other random stream.

    Args:
        num_examples: number of signals, a positive multiple of 10 (the package makes as many of each digit).
        seed: the generator's seed (the package's ``seed`` argument).

    Returns:
        ``(inputs, targets)``: float ``inputs`` of shape ``(num_examples, 40)``, standardised over the whole set
        (as the package does), and ``targets`` in ``0..9``, shuffled.

    Raises:
        ValueError: If ``num_examples`` is not a positive multiple of 10.
        ImportError: If ``mnist1d`` is not installed (``pip install lightning-grokfast[tasks]``).

    Example::

        inputs, targets = make_mnist1d_dataset(5000, seed=0)  # (5000, 40), (5000,)

    """
    check_int(num_examples, "num_examples", low=10)
    if num_examples % 10:
        raise ValueError(f"`num_examples` must be a positive multiple of 10, got {num_examples!r}.")
    check_int(seed, "seed")
    data = require("mnist1d.data", "tasks", "MNIST1DDataModule")
    import numpy as np  # installed with mnist1d

    args = data.get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_examples, 1.0, seed
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        dataset = data.make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return torch.tensor(dataset["x"], dtype=torch.float32), torch.tensor(dataset["y"], dtype=torch.long)


class MNIST1DDataModule(SplitDataModule):
    """MNIST-1D: ``num_train`` generated signals for training and ``num_val`` other ones for validation.

    Args:
        num_train: training signals (default 1000).
        num_val: validation signals (default 4000); ``num_train + num_val`` must be a multiple of 10.
        batch_size: training batch size (default 1000: the whole training set).
        val_batch_size: validation batch size (default: the whole validation set).
        seed: seed of the generated signals and of the shuffling.

    Raises:
        ValueError: If an argument is out of range.
        ImportError: If ``mnist1d`` is not installed.

    Example::

        dm = MNIST1DDataModule(num_train=1000)
        trainer.fit(MLPClassifier(num_inputs=40, num_classes=10, depth=2, init_scale=8.0), datamodule=dm)

    """

    def __init__(
        self,
        num_train: int = 1000,
        num_val: int = 4000,
        batch_size: int = 1000,
        val_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_batch_size, seed)
        check_int(num_train, "num_train", low=1)
        check_int(num_val, "num_val", low=1)
        if (num_train + num_val) % 10:
            raise ValueError(f"`num_train + num_val` must be a multiple of 10, got {num_train} + {num_val}.")
        self.save_hyperparameters()
        inputs, targets = make_mnist1d_dataset(num_train + num_val, seed)
        self.train_set = TensorDataset(inputs[:num_train], targets[:num_train])
        self.val_set = TensorDataset(inputs[num_train:], targets[num_train:])

    @property
    def num_inputs(self) -> int:
        """Input features: 40 samples per signal."""
        return SIGNAL_LENGTH

    @property
    def num_classes(self) -> int:
        """Ten digits."""
        return 10
