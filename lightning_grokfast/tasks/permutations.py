"""Composition in the symmetric group S_n (S5: 120 permutations), a non-abelian task of Power et al. (2022).

Every pair of permutations ``(x, y)`` is one equation ``x o y = z`` with ``z(i) = x(y(i))``, written as the four
tokens ``[x, op, y, =]`` of the modular task, so :class:`~lightning_grokfast.tasks.GrokTransformer` reads it
unchanged. The whole table (``n!**2`` equations, 14,400 for S5) is split at random into train and validation sets.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from lightning_grokfast.core.validation import check_int, check_number
from lightning_grokfast.tasks.base import SplitDataModule, split_table


def permutations_of(n: int) -> Tensor:
    """The ``n!`` permutations of ``range(n)`` in lexicographic order, as rows of an ``(n!, n)`` tensor.

    Row ``k`` is the permutation with token ``k``; row 0 is the identity.

    Args:
        n: the number of permuted points, in ``[1, 6]`` (720 permutations at most: the table grows as ``n!**2``).

    Returns:
        An ``(n!, n)`` integer tensor, one permutation per row.

    Raises:
        ValueError: If ``n`` is out of range.

    Example::

        permutations_of(3)[:2]  # tensor([[0, 1, 2], [0, 2, 1]])

    """
    check_int(n, "n", low=1)
    if n > 6:
        raise ValueError(f"`n` must be an integer in [1, 6], got {n!r}.")
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long).reshape(-1, n)


def make_permutation_dataset(n: int = 5) -> tuple[Tensor, Tensor]:
    """Every equation ``x o y = z`` of the symmetric group S_n (composition: ``z(i) = x(y(i))``).

    Args:
        n: the group is S_n, ``n`` in ``[1, 6]`` (default 5: 120 elements, 14,400 equations).

    Returns:
        ``(inputs, targets)``: ``inputs`` of shape ``(n!**2, 4)`` holding ``[x, op, y, =]`` token ids (the
        permutations are tokens ``0 .. n!-1`` in the order of :func:`permutations_of`, the equals token is ``n!``
        and the operator token ``n! + 1``, as in the modular task); ``targets`` the token of ``x o y``.

    Raises:
        ValueError: If ``n`` is out of range.

    Example::

        inputs, targets = make_permutation_dataset(5)  # 14,400 equations over 120 permutations

    """
    perms = permutations_of(n)
    size = len(perms)
    x, y = torch.cartesian_prod(torch.arange(size), torch.arange(size)).unbind(1)
    composed = torch.gather(perms[x], 1, perms[y])  # composed[k, i] = perms[x_k][perms[y_k][i]]
    index = {tuple(p): k for k, p in enumerate(perms.tolist())}
    targets = torch.tensor([index[tuple(row)] for row in composed.tolist()], dtype=torch.long)
    inputs = torch.stack([x, torch.full_like(x, size + 1), y, torch.full_like(x, size)], dim=1)
    return inputs, targets


class PermutationGroupDataModule(SplitDataModule):
    """The composition table of S_n (default S5), split at random into train and validation equations.

    Args:
        n: the group is S_n, ``n`` in ``[1, 6]`` (default 5).
        train_fraction: fraction of the ``n!**2`` equations used for training, in ``(0, 1)`` (default 0.5).
        batch_size: training batch size (default 512).
        val_batch_size: validation batch size (default: the whole validation set in one batch).
        seed: seed of the split and of the shuffling.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        dm = PermutationGroupDataModule(n=5, train_fraction=0.5)
        trainer.fit(GrokTransformer(num_tokens=dm.num_tokens), datamodule=dm)

    """

    def __init__(
        self,
        n: int = 5,
        train_fraction: float = 0.5,
        batch_size: int = 512,
        val_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_batch_size, seed)
        check_number(train_fraction, "train_fraction", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.save_hyperparameters()
        inputs, targets = make_permutation_dataset(n)
        self.train_set, self.val_set = split_table(inputs, targets, train_fraction, torch.Generator().manual_seed(seed))

    @property
    def num_tokens(self) -> int:
        """Vocabulary size: ``n!`` permutations plus the operator and equals tokens."""
        return math.factorial(int(self.hparams["n"])) + 2
