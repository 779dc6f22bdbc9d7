"""Classification losses for the built-in tasks: cross-entropy and StableMax cross-entropy.

StableMax (Prieto et al., "Grokking at the edge of numerical stability", ICLR 2025) replaces the exponential of
softmax with ``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` for ``x < 0``, which grows linearly instead of
exponentially. Softmax's probabilities round to exactly 0 or 1 once the logits are large ("softmax collapse"),
which stops learning on correctly classified examples; StableMax does not, and lets models grok without weight
decay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional

from lightning_grokfast.core.validation import check_choice

__all__ = ["LOSSES", "get_loss", "stablemax", "stablemax_cross_entropy"]


def _s(x: Tensor) -> Tensor:
    # both branches are evaluated by torch.where; clamp so that the unused one never divides by zero
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))


def stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """StableMax probabilities ``s(x_i) / sum_j s(x_j)`` along ``dim``, in the dtype of ``logits``.

    Args:
        logits: real-valued scores.
        dim: the class dimension.

    Example::

        >>> stablemax(torch.tensor([0.0, 1.0, -1.0]))
        tensor([0.2857, 0.5714, 0.1429])

    Returns:
        The probabilities, shaped like ``logits``.
    """
    s = _s(logits)
    return s / s.sum(dim=dim, keepdim=True)


def stablemax_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """``-log StableMax(logits)[target]``, computed in float64 and returned in the dtype of ``logits``.

    Args:
        logits: ``(N, C)`` scores.
        targets: ``(N,)`` class indices in ``[0, C)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: If ``reduction`` is not one of the three.

    Example::

        >>> loss = stablemax_cross_entropy(torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0]))
        >>> round(float(loss), 4)  # -log(3 / (3 + 1 + 0.5))
        0.4055

    Returns:
        The loss: a 0-dim tensor, or ``(N,)`` with ``reduction="none"``.
    """
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    s = _s(logits.double())
    log_probs = s.log() - s.sum(dim=-1, keepdim=True).log()
    return functional.nll_loss(log_probs, targets, reduction=reduction).to(logits.dtype)


#: The losses a built-in task's ``loss`` argument may name.
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": functional.cross_entropy,
    "stablemax": stablemax_cross_entropy,
}


def get_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss function called ``name`` in :data:`LOSSES`.

    Args:
        name: ``"cross_entropy"`` or ``"stablemax"``.

    Returns:
        The function ``(logits, targets) -> loss``.

    Raises:
        ValueError: If ``name`` is unknown.

    Example::

        >>> from lightning_grokfast.tasks.losses import get_loss
        >>> get_loss("stablemax").__name__
        'stablemax_cross_entropy'
    """
    check_choice(name, "loss", tuple(LOSSES))
    return LOSSES[name]
