"""Plain records of the filter state: what one parameter's filter holds, and what one filter step saw.

Pure torch. :class:`ParamState` is the unit of checkpointing: every entry point saves and loads the filter as one
record per parameter (in ``optimizer.state_dict()`` under ``grokfast_*`` keys).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["ParamState", "StepInfo"]


@dataclasses.dataclass
class StepInfo:
    """What one filter step saw. Tensors stay on their device; nothing here forces a synchronization.

    Attributes:
        finite: 0-dim bool tensor, ``True`` when every gradient was finite and the state was updated.
        grad_norm: L2 norm of the raw gradients, or ``None`` when it was not asked for.
        slow_norm: L2 norm of the slow component that was (or would have been) added, before ``lamb``.
        amplified: whether the slow component was added to the gradients.
        guard_scale: factor (0-dim tensor, ``<= 1``) the divergence guard applied to the added term, or ``None``.

    Example::

        >>> import torch
        >>> from lightning_grokfast import GradientFilter
        >>> info = GradientFilter("ema").step(["w"], [torch.ones(3)], compute_norms=True)
        >>> bool(info.finite), info.amplified
        (True, True)
    """

    finite: Tensor
    grad_norm: Tensor | None = None
    slow_norm: Tensor | None = None
    amplified: bool = False
    guard_scale: Tensor | None = None


@dataclasses.dataclass
class ParamState:
    """The whole filter state of one gradient: plain fields, tensors on the gradient's device.

    Attributes:
        ema: the EMA of the gradient (``None`` without an EMA filter).
        ema_started: whether ``ema`` holds a gradient yet (it starts at the first finite gradient).
        ma_history: the moving-average window, shape ``(window_size, *grad.shape)``, a ring buffer.
        ma_sum: running sum of the window (float32, or float64 for float64 gradients).
        ma_count: gradients in the window so far (at most ``window_size``).
        ma_index: ring slot the next gradient overwrites.
        ma_updates: window updates so far (schedules the exact re-summation of ``ma_sum``).

    Example::

        >>> import torch
        >>> from lightning_grokfast import GradientFilter
        >>> filt = GradientFilter("ema")
        >>> _ = filt.step(["w"], [torch.ones(3)])
        >>> filt.states["w"].ema_started, filt.states["w"].shape()
        (True, (3,))
    """

    ema: Tensor | None = None
    ema_started: bool = False
    ma_history: Tensor | None = None
    ma_sum: Tensor | None = None
    ma_count: int = 0
    ma_index: int = 0
    ma_updates: int = 0

    def shape(self) -> tuple[int, ...]:
        """The gradient's shape, read from the state tensors.

        Returns:
            The shape, or ``()`` when the record holds no tensor yet.
        """
        if self.ema is not None:
            return tuple(self.ema.shape)
        if self.ma_sum is not None:
            return tuple(self.ma_sum.shape)
        return ()

    def tensors(self) -> list[Tensor]:
        """The state tensors (EMA, MA window, MA sum), those that exist.

        Returns:
            The tensors, live (not copies).
        """
        return [t for t in (self.ema, self.ma_history, self.ma_sum) if t is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain entries (live tensors, not copies), for checkpoints.

        Returns:
            ``{field: value}`` for every field that is not ``None``.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], *, copy: bool = True) -> ParamState:
        """The inverse of :meth:`to_dict`; unknown keys are ignored.

        Args:
            entry: the entries of :meth:`to_dict`, e.g. as loaded from a checkpoint.
            copy: copy the tensors (``False``: the record holds the given tensors).

        Returns:
            The record.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {
            k: (v.detach().clone() if copy and isinstance(v, Tensor) else v) for k, v in entry.items() if k in known
        }
        for key in ("ma_count", "ma_index", "ma_updates"):
            if key in values:
                values[key] = int(values[key])
        if "ema_started" in values:
            values["ema_started"] = bool(values["ema_started"])
        return cls(**values)

    def to(self, device: torch.device) -> ParamState:
        """The same state with its tensors on ``device``.

        Args:
            device: the target device.

        Returns:
            A new record (this one is unchanged).
        """

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(self, ema=move(self.ema), ma_history=move(self.ma_history), ma_sum=move(self.ma_sum))
