"""Sparse parity (Barak et al. 2022): the label is the parity of ``k`` hidden bits among ``num_bits`` random bits.

With a small fixed training set and weight decay, an MLP fits the training set within a few hundred steps and
finds the ``k`` relevant bits (and so generalises) only thousands of steps later.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_grokfast.core.validation import check_int
from lightning_grokfast.tasks.base import SplitDataModule


def make_sparse_parity_dataset(
    num_bits: int = 30, k: int = 3, num_examples: int = 3000, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """``num_examples`` distinct random ``±1`` vectors of ``num_bits`` bits, labelled by the parity of ``k`` of them.

    Args:
        num_bits: length of each input, ``1 <= num_bits <= 62``.
        k: number of relevant bits, ``1 <= k <= num_bits``.
        num_examples: number of distinct inputs, at most ``2 ** num_bits``.
        seed: seed of the relevant bits and of the inputs.

    Returns:
        ``(inputs, targets, relevant)``: float ``inputs`` of shape ``(num_examples, num_bits)`` in ``{-1, +1}``,
        ``targets`` in ``{0, 1}`` (1 when an odd number of the relevant bits are ``-1``) and the sorted indices
        of the ``k`` relevant bits.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        >>> from lightning_grokfast.tasks.parity import make_sparse_parity_dataset
        >>> inputs, targets, relevant = make_sparse_parity_dataset(num_bits=8, k=2, num_examples=16)
        >>> tuple(inputs.shape), len(relevant)
        ((16, 8), 2)
    """
    check_int(num_bits, "num_bits", low=1)
    if num_bits > 62:
        raise ValueError(f"`num_bits` must be an integer in [1, 62], got {num_bits!r}.")
    check_int(k, "k", low=1)
    if k > num_bits:
        raise ValueError(f"`k` must be an integer in [1, num_bits={num_bits}], got {k!r}.")
    check_int(num_examples, "num_examples", low=1)
    if num_examples > 2**num_bits:
        raise ValueError(f"`num_examples` must be at most 2 ** num_bits = {2**num_bits}, got {num_examples!r}.")
    generator = torch.Generator().manual_seed(seed)
    relevant = torch.randperm(num_bits, generator=generator)[:k].sort().values
    codes: list[int] = []
    seen: set[int] = set()
    while len(codes) < num_examples:
        for code in torch.randint(0, 2**num_bits, (num_examples,), generator=generator).tolist():
            if code not in seen and len(codes) < num_examples:
                seen.add(code)
                codes.append(code)
    bits = (torch.tensor(codes).unsqueeze(1) >> torch.arange(num_bits)) & 1
    inputs = 1.0 - 2.0 * bits.float()  # bit 1 -> -1
    targets = bits[:, relevant].sum(1) % 2
    return inputs, targets, relevant


class SparseParityDataModule(SplitDataModule):
    """``(n, k)`` sparse parity with a fixed training set: ``num_train`` examples, ``num_val`` other ones.

    Args:
        num_bits: input length ``n`` (default 30).
        k: number of relevant bits (default 3).
        num_train: training examples (default 1000).
        num_val: validation examples, disjoint from the training ones (default 2000).
        batch_size: training batch size (default 1000: the whole training set).
        val_batch_size: validation batch size (default: the whole validation set).
        seed: seed of the relevant bits, the inputs and the shuffling.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        dm = SparseParityDataModule(num_bits=30, k=3, num_train=1000)
        trainer.fit(MLPClassifier(num_inputs=30, num_classes=2), datamodule=dm)

    """

    def __init__(
        self,
        num_bits: int = 30,
        k: int = 3,
        num_train: int = 1000,
        num_val: int = 2000,
        batch_size: int = 1000,
        val_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_batch_size, seed)
        check_int(num_train, "num_train", low=1)
        check_int(num_val, "num_val", low=1)
        self.save_hyperparameters()
        inputs, targets, self.relevant_bits = make_sparse_parity_dataset(num_bits, k, num_train + num_val, seed)
        self.train_set = TensorDataset(inputs[:num_train], targets[:num_train])
        self.val_set = TensorDataset(inputs[num_train:], targets[num_train:])

    @property
    def num_inputs(self) -> int:
        """Input features: ``num_bits``."""
        return int(self.hparams["num_bits"])

    @property
    def num_classes(self) -> int:
        """Two classes: even and odd parity."""
        return 2
