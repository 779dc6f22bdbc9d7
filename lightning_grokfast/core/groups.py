"""The work units of a filter step: gradients grouped with their states, and the slow terms they add.

:class:`~lightning_grokfast.GradientFilter` sorts the gradients of a step into :class:`Group` s (one device, dtype,
amplification and window position each, so that one foreach call serves a whole group) and collects, per group,
the :class:`Term` s it adds back. This module knows tensors and :class:`~lightning_grokfast.ParamState` records,
nothing of names or frameworks.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_grokfast.core import ops
from lightning_grokfast.core.state import ParamState

__all__ = ["Group", "Term", "added_norm", "is_tiled", "slow_norm"]


class Term(NamedTuple):
    """A slow term added to the gradients: ``lamb * unit * tensors`` (``unit`` is 1/count for an MA mean).

    Attributes:
        tensors: the state tensors (EMAs or window sums), one per gradient of the group.
        lamb: the amplification.
        unit: the factor of a mean (``1 / count``), 1.0 otherwise.
        added: already added to the gradients, with the update (compiled or tiled path).

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.groups import Term
        >>> Term([torch.ones(2)], lamb=5.0, unit=0.1).coef
        0.5
    """

    tensors: list[Tensor]
    lamb: float
    unit: float
    added: bool = False

    @property
    def coef(self) -> float:
        """``lamb * unit``, the factor the tensors are added with."""
        return self.lamb * self.unit


@dataclasses.dataclass
class Group:
    """Gradients of one device, dtype, lamb scale and window position, with their states in the same order.

    Attributes:
        grad_dtype: the gradients' dtype.
        state_dtype: the dtype of the EMA and of the window (the running sum stays at least float32).
        lamb_scale: the per-parameter factor of ``lamb`` shared by the group.
        positions: where the group's gradients are in the step's list.
        states: their state records, in the same order.
        ema: the EMA tensors of ``states`` (empty without an EMA).
        ma_sum: the running sums of ``states`` (empty without a moving average).
        windows: the ring buffers of ``states``, each of shape ``(window, *shape)``.
        slots: ring slot -> views of that slot in every window, built lazily.
        ema_started: every EMA of the group holds a gradient (no per-step scan of the states).
        tiled: CPU gradients of :data:`~lightning_grokfast.core.ops.TILE_MIN_BYTES` or more: the update and the
            amplification run block by block.

    Example::

        group = Group(torch.float32, torch.float32, 1.0, positions=[0], states=[record])
        group.slot(0)  # the first slot of every window of the group
    """

    grad_dtype: torch.dtype
    state_dtype: torch.dtype
    lamb_scale: float
    positions: list[int]
    states: list[ParamState]
    ema: list[Tensor] = dataclasses.field(default_factory=list)
    ma_sum: list[Tensor] = dataclasses.field(default_factory=list)
    windows: list[Tensor] = dataclasses.field(default_factory=list)
    slots: dict[int, list[Tensor]] = dataclasses.field(default_factory=dict)
    ema_started: bool = False
    tiled: bool = False

    def slot(self, index: int) -> list[Tensor]:
        """The views of ring slot ``index`` in every window of the group (kept for the next steps).

        Args:
            index: the slot.

        Returns:
            One view per window.
        """
        views = self.slots.get(index)
        if views is None:
            views = self.slots[index] = [w[index] for w in self.windows]
        return views


def is_tiled(group: Group, grads: list[Tensor]) -> bool:
    """Whether a group's update and amplification should run block by block: CPU gradients beyond the cache.

    Args:
        group: the group.
        grads: its gradients.

    Returns:
        ``True`` for CPU gradients of :data:`~lightning_grokfast.core.ops.TILE_MIN_BYTES` bytes or more.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.groups import Group, is_tiled
        >>> is_tiled(Group(torch.float32, torch.float32, 1.0, [0], []), [torch.zeros(10)])
        False
    """
    size = sum(g.numel() for g in grads) * group.grad_dtype.itemsize
    return grads[0].device.type == "cpu" and size >= ops.TILE_MIN_BYTES


def slow_norm(terms: list[list[Term]], device: torch.device) -> Tensor:
    """Norm of the slow component before ``lamb``: the lamb-weighted mean of each group's ``unit * tensors``.

    Args:
        terms: the terms of every group.
        device: where the result goes.

    Returns:
        A 0-dim tensor on ``device`` (0 when there is no term).

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.groups import Term, slow_norm
        >>> slow_norm([[Term([torch.full((4,), 2.0)], lamb=5.0, unit=1.0)]], torch.device("cpu"))
        tensor(4.)
    """
    weighted = []
    for group_terms in terms:
        total = sum(t.lamb for t in group_terms)
        weights = [t.lamb / total if total else 1.0 / len(group_terms) for t in group_terms]
        weighted.append([(t.tensors, w * t.unit) for t, w in zip(group_terms, weights)])
    return _norm_of_sums(weighted, device)


def added_norm(terms: list[list[Term]], device: torch.device) -> Tensor:
    """Norm of what would be added to the gradients: ``sum(coef * state)`` over every group.

    Args:
        terms: the terms of every group.
        device: where the result goes.

    Returns:
        A 0-dim tensor on ``device`` (0 when nothing would be added).

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.groups import Term, added_norm
        >>> added_norm([[Term([torch.full((4,), 2.0)], lamb=5.0, unit=0.1)]], torch.device("cpu"))
        tensor(2.)
    """
    return _norm_of_sums([[(t.tensors, t.coef) for t in group if t.coef != 0.0] for group in terms], device)


def _norm_of_sums(groups: list[list[tuple[list[Tensor], float]]], device: torch.device) -> Tensor:
    """L2 norm over every group of ``sum(factor * tensors)`` (0 when no group has a pair)."""
    parts = []
    for pairs in groups:
        if not pairs:
            continue
        combined = torch._foreach_mul(pairs[0][0], pairs[0][1])
        for tensors, factor in pairs[1:]:
            torch._foreach_add_(combined, tensors, alpha=factor)
        parts.append(ops.squared_norms(combined))
    if not parts:
        return torch.zeros((), device=device)
    return ops.global_norm(parts, device)
