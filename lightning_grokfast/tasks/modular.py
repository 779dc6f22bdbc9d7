"""Modular arithmetic, the task on which grokking was found, with the Grokfast paper's transformer.

Every equation ``x op y = z (mod p)`` is one example of four input tokens ``[x, op, y, =]``; the model reads
them with a causal transformer and predicts ``z`` at the last position. Loss and accuracy are measured on that
answer token only. The data is generated in memory and split at random (seeded) into train and validation halves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from lightning_grokfast.core.validation import check_bool, check_int, check_number
from lightning_grokfast.tasks.base import ClassificationTask, SplitDataModule, split_table

OPERATIONS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "+": lambda x, y, p: (x + y) % p,
    "-": lambda x, y, p: (x - y) % p,
    "*": lambda x, y, p: (x * y) % p,
    # y has an inverse mod prime p when y != 0: x / y = x * y^(p-2)
    "/": lambda x, y, p: (x * _modular_power(y, p - 2, p)) % p,
    "x^2+y^2": lambda x, y, p: (x * x + y * y) % p,
    "x^3+xy": lambda x, y, p: (x * x * x + x * y) % p,
}


def _modular_power(base: Tensor, exponent: int, modulus: int) -> Tensor:
    result = torch.ones_like(base)
    base = base % modulus
    while exponent:
        if exponent & 1:
            result = (result * base) % modulus
        base = (base * base) % modulus
        exponent >>= 1
    return result


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


def make_modular_dataset(operation: str = "*", p: int = 97) -> tuple[Tensor, Tensor]:
    """All equations ``x op y`` with ``x`` in ``[0, p)`` and ``y`` in ``[1, p)``, as the paper's code builds them.

    Args:
        operation: one of :data:`OPERATIONS`.
        p: the modulus, a prime (division needs inverses).

    Returns:
        ``(inputs, targets)``: ``inputs`` of shape ``(N, 4)`` holding ``[x, op, y, =]`` token ids, where the
        equals token is ``p`` and the operator token is ``p + 1`` (as in the paper's code); ``targets`` of shape
        ``(N,)``.

    Raises:
        ValueError: If ``operation`` is unknown or ``p`` is not a prime.

    Example::

        >>> from lightning_grokfast.tasks import make_modular_dataset
        >>> inputs, targets = make_modular_dataset("*", p=5)
        >>> inputs[7].tolist(), int(targets[7])
        ([1, 6, 4, 5], 4)
    """
    if operation not in OPERATIONS:
        raise ValueError(f"`operation` must be one of {list(OPERATIONS)}, got {operation!r}.")
    if isinstance(p, bool) or not isinstance(p, int) or not _is_prime(p):
        raise ValueError(f"`p` must be a prime number >= 2, got {p!r}.")
    x, y = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).unbind(1)
    targets = OPERATIONS[operation](x, y, p)
    inputs = torch.stack([x, torch.full_like(x, p + 1), y, torch.full_like(x, p)], dim=1)
    return inputs, targets


class EpochPermutationSampler(Sampler[int]):
    """The paper's shuffling: each epoch permutes the previous epoch's order by a permutation from ``generator``.

    The paper's code reassigns ``train_data = train_data[:, torch.randperm(n)]`` every epoch, so its orders compose;
    and it draws exactly one permutation per epoch. :class:`~torch.utils.data.RandomSampler` permutes the original
    order, draws one more permutation at the end of every epoch, and a ``DataLoader`` given the generator draws its
    workers' base seed from it too, so it would not keep that order.

    Args:
        n: number of samples.
        generator: the random stream of the permutations, positioned before the first epoch's draw.
        start_epoch: epochs already trained: their permutations are drawn (and composed) at construction, so the
            first iteration yields epoch ``start_epoch``'s order, as an uninterrupted run would.
        skip: samples of that first iteration already trained on (a resume mid-epoch); they are not yielded again
            (``len`` stays an epoch's length: the Trainer restores its own count of the epoch's batches).

    Raises:
        ValueError: If ``start_epoch`` is negative or ``skip`` is not in ``[0, n]``.

    Example::

        sampler = EpochPermutationSampler(4704, torch.Generator().manual_seed(0), start_epoch=3, skip=1024)

    """

    def __init__(self, n: int, generator: torch.Generator, start_epoch: int = 0, skip: int = 0) -> None:
        check_int(start_epoch, "start_epoch", low=0)
        if check_int(skip, "skip", low=0) > n:
            raise ValueError(f"`skip` must be an integer in [0, n={n}], got {skip}.")
        self.generator = generator
        self.order = torch.arange(n)
        for _ in range(start_epoch):
            self._draw()
        self._skip = skip

    def _draw(self) -> None:
        self.order = self.order[torch.randperm(len(self.order), generator=self.generator)]

    def __len__(self) -> int:
        return len(self.order)  # an epoch's length, as a resumed Trainer counts its batches from the checkpoint's

    def __iter__(self) -> Iterator[int]:
        self._draw()
        skip, self._skip = self._skip, 0
        yield from self.order[skip:].tolist()


def paper_random_stream(seed: int, num_tokens: int = 99) -> torch.Generator:
    """The random stream from which the paper's code draws its split and its shuffles when run with ``--seed seed``.

    That script seeds torch's global generator, initialises its model from it, then draws the train/validation
    permutation and one permutation of the train set per epoch from the same generator. The default
    :class:`GrokTransformer` (``num_tokens`` of them) draws its initial weights in the same order and shapes, so
    this builds one under a forked global generator and returns a generator in the state that follows. The global
    generator is left as it was.

    Args:
        seed: the seed given to the paper's script.
        num_tokens: the vocabulary of that script's model (``p + 2``).

    Returns:
        A CPU generator positioned where the paper's code draws its split.

    Example::

        generator = paper_random_stream(0)
        order = torch.randperm(97 * 96, generator=generator)  # the paper's split for seed 0

    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        GrokTransformer(num_tokens=num_tokens)
        state = torch.get_rng_state()
    generator = torch.Generator()
    generator.set_state(state)
    return generator


class ModularArithmeticDataModule(SplitDataModule):
    """Generated ``x op y (mod p)`` equations, split at random into train and validation sets.

    Args:
        operation: ``"+"``, ``"-"``, ``"*"``, ``"/"``, ``"x^2+y^2"`` or ``"x^3+xy"``.
        p: prime modulus (default 97).
        train_fraction: fraction of all equations used for training, in ``(0, 1)`` (default 0.5).
        batch_size: training batch size (default 512, as in the paper).
        val_batch_size: validation batch size (default: the whole validation set in one batch).
        seed: seed of the train/validation split and of the shuffling.
        paper_order: draw the split and the per-epoch shuffles as the paper's code does for ``--seed seed``
            (default; see :func:`paper_random_stream`): with ``seed_everything(seed)`` before the default
            :class:`GrokTransformer` is built, a run then starts from the paper code's weights, split and batches.
            ``False``: split as lightning-grokfast 0.2 did (a generator seeded with ``seed`` alone), batches
            as :class:`~torch.utils.data.RandomSampler` draws them from it.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        dm = ModularArithmeticDataModule(operation="*", p=97, train_fraction=0.5)
        trainer.fit(GrokTransformer(num_tokens=dm.num_tokens), datamodule=dm)

    """

    def __init__(
        self,
        operation: str = "*",
        p: int = 97,
        train_fraction: float = 0.5,
        batch_size: int = 512,
        val_batch_size: int | None = None,
        seed: int = 0,
        paper_order: bool = True,
    ) -> None:
        super().__init__(batch_size, val_batch_size, seed)
        check_number(train_fraction, "train_fraction", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_bool(paper_order, "paper_order")
        self.save_hyperparameters()
        inputs, targets = make_modular_dataset(operation, p)
        generator = paper_random_stream(seed, p + 2) if paper_order else torch.Generator().manual_seed(seed)
        self.train_set, self.val_set = split_table(inputs, targets, train_fraction, generator)
        self._shuffle_state = generator.get_state()  # the paper's epochs draw their permutations from here on

    def train_dataloader(self) -> DataLoader:
        if not self.hparams["paper_order"]:
            return super().train_dataloader()
        generator = torch.Generator()
        generator.set_state(self._shuffle_state)
        epoch, skip = self._resumed_position()
        sampler = EpochPermutationSampler(len(self.train_set), generator, start_epoch=epoch, skip=skip)
        return DataLoader(self.train_set, self.batch_size, sampler=sampler)

    def _resumed_position(self) -> tuple[int, int]:
        """(epoch, samples of it already trained on) of the attached Trainer: ``(0, 0)`` unless it resumes a run.

        The shuffles are a function of the epoch, so a run resumed from a checkpoint (the Trainer restores its
        loops before it builds the dataloader) continues the uninterrupted run's batches with no state of its own.
        With several processes the sampler is wrapped in a distributed one that needs full epochs: a resume
        mid-epoch there gets the right epoch's order from its start (Lightning warns of this case).
        """
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        epoch = trainer.current_epoch
        progress = trainer.fit_loop.epoch_loop.batch_progress.current  # a _ProcessedTracker, typed as its base
        skip = int(getattr(progress, "processed", progress.completed)) * self.batch_size  # batches trained on
        if skip >= len(self.train_set):
            return epoch + 1, 0
        return epoch, skip if trainer.world_size == 1 else 0

    @property
    def num_tokens(self) -> int:
        """Vocabulary size: ``p`` numbers plus the operator and equals tokens."""
        return int(self.hparams["p"]) + 2


class _DecoderBlock(nn.Module):
    """Causal self-attention and a 4x MLP, pre-norm (the Grokfast reference) or post-norm."""

    def __init__(self, dim: int, num_heads: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.mlp_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, causal_mask: Tensor) -> Tensor:
        if self.norm_first:
            # as the reference code: the residual stream restarts from the normalised input
            x = self.attention_norm(x)
            attended, _ = self.attention(x, x, x, attn_mask=causal_mask, need_weights=False)
            x = x + attended
            return x + self.mlp(self.mlp_norm(x))
        attended, _ = self.attention(x, x, x, attn_mask=causal_mask, need_weights=False)
        x = self.attention_norm(x + attended)
        return self.mlp_norm(x + self.mlp(x))


class GrokTransformer(ClassificationTask):
    """The decoder-only transformer of the Grokfast paper's algorithmic-data experiments.

    As the paper's code by default: token and position embeddings, ``num_layers`` pre-norm decoder blocks
    (``x = ln_1(x); x = x + attn(x); x = x + mlp(ln_2(x))``, causal self-attention and a 4x MLP), a final
    LayerNorm and a bias-free linear head over all ``num_tokens`` tokens, PyTorch's default initialisation. The
    loss and accuracy are taken on the answer (last) position. Optimizer: Adam (or AdamW) with
    ``betas=(0.9, 0.98)`` and a linear learning-rate warm-up. Its layers draw their initial weights in the order
    and shapes of the paper's model, so after ``torch.manual_seed(s)`` (``seed_everything(s)``) the default model
    holds the weights the paper's code starts from with ``--seed s``; with :class:`ModularArithmeticDataModule`'s
    ``paper_order`` the split and the batches are that run's too.

    Args:
        num_tokens: vocabulary size (``p + 2`` for :class:`ModularArithmeticDataModule`).
        num_classes: number of outputs of the head (default ``num_tokens``, as the reference; ``p`` is enough).
        dim: model width (paper: 128).
        num_layers: decoder blocks (paper: 2).
        num_heads: attention heads (paper: 4).
        dropout: dropout probability (paper: 0).
        norm_first: pre-norm blocks as the reference (default); ``False``: post-norm blocks
            (``x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))``, the model of lightning-grokfast 0.1).
        head_bias: whether the head has a bias (reference: no).
        lr: learning rate (paper: 1e-3).
        weight_decay: weight decay (paper: 0 for the baseline, 0.005 with EMA, 0.01 with MA).
        betas: Adam betas (paper: 0.9, 0.98).
        warmup_steps: linear learning-rate warm-up, in optimizer steps (paper: 10).
        optimizer: ``"adam"`` (coupled L2 weight decay, as in the paper's code) or ``"adamw"``.
        loss: ``"cross_entropy"`` (paper) or ``"stablemax"`` (StableMax cross-entropy, Prieto et al. 2025).
        seq_len: positions of the position embedding (5, as the reference's ``x op y = z``; the inputs
            ``[x, op, y, =]`` use the first 4), at least the input length.

    Raises:
        ValueError: If an argument is out of range.

    Example::

        model = GrokTransformer(num_tokens=99)
        post_norm = GrokTransformer(num_tokens=99, num_classes=97, norm_first=False, head_bias=True)  # 0.1's model

    """

    def __init__(
        self,
        num_tokens: int = 99,
        num_classes: int | None = None,
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
        norm_first: bool = True,
        head_bias: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 10,
        optimizer: str = "adam",
        loss: str = "cross_entropy",
        seq_len: int = 5,
    ) -> None:
        check_int(num_tokens, "num_tokens", low=2)
        num_classes = num_tokens if num_classes is None else num_classes
        super().__init__(num_classes, lr, weight_decay, betas, warmup_steps, optimizer, loss)
        check_int(dim, "dim", low=1)
        check_int(num_layers, "num_layers", low=1)
        check_int(num_heads, "num_heads", low=1)
        check_int(seq_len, "seq_len", low=1)
        check_number(dropout, "dropout", low=0.0, high=1.0, high_inclusive=False)
        check_bool(norm_first, "norm_first")
        check_bool(head_bias, "head_bias")
        if dim % num_heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
        self.token_embedding = nn.Embedding(num_tokens, dim)
        self.position_embedding = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(_DecoderBlock(dim, num_heads, dropout, norm_first) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes, bias=head_bias)
        self.register_buffer("causal_mask", torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1))
        self.register_buffer("positions", torch.arange(seq_len))
        self.causal_mask: Tensor
        self.positions: Tensor

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits of the answer for each ``(batch, seq_len)`` input."""
        h = self.token_embedding(inputs) + self.position_embedding(self.positions[: inputs.shape[1]])
        mask = self.causal_mask[: inputs.shape[1], : inputs.shape[1]]
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.final_norm(h[:, -1]))
