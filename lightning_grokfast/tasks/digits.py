"""Handwritten digits with a small training set, for grokking by a large initialisation (Omnigrok, Liu et al. 2022).

The 1,797 8x8 images of scikit-learn's bundled ``load_digits`` (shipped with scikit-learn, no download). An MLP
whose weights are scaled up at initialisation (:class:`~lightning_grokfast.tasks.MLPClassifier` with
``init_scale`` > 1) fits a few hundred training images at once and reaches its validation accuracy only after
weight decay has brought its weights down, hundreds to thousands of steps later.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_grokfast.core.validation import check_int
from lightning_grokfast.tasks.base import SplitDataModule

#: Number of images in scikit-learn's digits data set.
NUM_DIGITS = 1797


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(inputs, targets)``: ``(1797, 64)`` floats in ``[0, 1]`` and labels ``0..9``.

    Returns:
        ``(inputs, targets)``.

    Raises:
        ImportError: If scikit-learn is not installed (``pip install scikit-learn``).

    Example::

        >>> from lightning_grokfast.tasks.digits import load_digits_tensors
        >>> inputs, targets = load_digits_tensors()
        >>> tuple(inputs.shape), int(targets.max())
        ((1797, 64), 9)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("DigitsDataModule needs scikit-learn: `pip install scikit-learn`.") from error
    digits = load_digits()
    return torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target, dtype=torch.long)


class DigitsDataModule(SplitDataModule):
    """scikit-learn's 8x8 digits, ``num_train`` random images for training and the other ones for validation.

    Args:
        num_train: training images, in ``[1, 1796]`` (default 500).
        batch_size: training batch size (default 500: the whole training set).
        val_batch_size: validation batch size (default: the whole validation set).
        seed: seed of the split and the shuffling.

    Raises:
        ValueError: If an argument is out of range.
        ImportError: If scikit-learn is not installed.

    Example::

        dm = DigitsDataModule(num_train=500)
        trainer.fit(MLPClassifier(num_inputs=64, num_classes=10, depth=2, hidden=200, init_scale=16), datamodule=dm)

    """

    def __init__(
        self, num_train: int = 500, batch_size: int = 500, val_batch_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(batch_size, val_batch_size, seed)
        check_int(num_train, "num_train", low=1)
        if num_train >= NUM_DIGITS:
            raise ValueError(f"`num_train` must be an integer in [1, {NUM_DIGITS - 1}], got {num_train!r}.")
        self.save_hyperparameters()
        inputs, targets = load_digits_tensors()
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
        self.train_set = TensorDataset(inputs[order[:num_train]], targets[order[:num_train]])
        self.val_set = TensorDataset(inputs[order[num_train:]], targets[order[num_train:]])

    @property
    def num_inputs(self) -> int:
        """Input features: 64 pixels."""
        return 64

    @property
    def num_classes(self) -> int:
        """Ten digits."""
        return 10
