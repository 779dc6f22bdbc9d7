"""Train metrics between validations, shared by the grokking detector and the dashboard (pure torch).

Per-batch values stay on their device; :meth:`TrainMetricTracker.flush` moves everything recorded since the last
validation to the host in one transfer, once per validation, however many callbacks read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["TrainMetricTracker", "lookup"]


def lookup(metrics: Mapping[str, Any], name: str, suffixes: Iterable[str] = ("", "_epoch", "_step")) -> Any:
    """``metrics[name + suffix]`` for the first suffix present, else ``None``.

    Args:
        metrics: e.g. ``trainer.callback_metrics``.
        name: the metric's name.
        suffixes: the suffixes to try, in order (Lightning adds ``_epoch`` and ``_step`` for
            ``self.log(..., on_step=True, on_epoch=True)``).

    Returns:
        The value, or ``None``.

    Example::

        >>> from lightning_grokfast.callbacks.tracking import lookup
        >>> lookup({"train_acc_step": 0.5}, "train_acc")
        0.5
    """
    for suffix in suffixes:
        if f"{name}{suffix}" in metrics:
            return metrics[f"{name}{suffix}"]
    return None


class TrainMetricTracker:
    """Records watched train metrics after every training batch; one host transfer per validation.

    A batch's value of ``name`` is ``callback_metrics[name + "_step"]``, else ``callback_metrics[name]`` (never the
    previous epoch's ``name + "_epoch"``).

    Example::

        tracker = TrainMetricTracker()
        tracker.watch("train_acc")
        tracker.record(trainer.global_step, trainer.callback_metrics)  # after each training batch
        values = tracker.flush(trainer.global_step)  # at validation: {"train_acc": [(step, value), ...]}

    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self._pending: list[tuple[int, str, Tensor]] = []
        self._flushed: tuple[int, dict[str, list[tuple[int, float]]]] | None = None

    def watch(self, name: str) -> None:
        """Record ``name`` from now on.

        Args:
            name: the metric's name (without ``_step``).
        """
        if name not in self.names:
            self.names.append(name)

    def record(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Keep this batch's values of the watched metrics (as device tensors: no synchronization).

        Args:
            step: the optimizer step of the batch.
            metrics: ``trainer.callback_metrics``.
        """
        for name in self.names:
            value = lookup(metrics, name, ("_step", ""))
            if isinstance(value, Tensor):
                self._pending.append((step, name, value.detach().reshape(-1)[0]))
            elif isinstance(value, (int, float)):
                self._pending.append((step, name, torch.tensor(float(value))))

    def flush(self, step: int) -> dict[str, list[tuple[int, float]]]:
        """``{name: [(step, value), ...]}`` recorded since the previous flush, moved to the host in one transfer.

        A second flush at the same ``step`` returns the same values (so several readers share one transfer).

        Args:
            step: the optimizer step of the validation.

        Returns:
            The recorded values per watched metric.
        """
        if self._flushed is not None and self._flushed[0] == step and not self._pending:
            return self._flushed[1]
        result: dict[str, list[tuple[int, float]]] = {name: [] for name in self.names}
        if self._pending:
            device = self._pending[0][2].device
            values = torch.stack([v.to(device, torch.float64) for _, _, v in self._pending]).tolist()
            for (at, name, _), value in zip(self._pending, values):
                result.setdefault(name, []).append((at, value))
            self._pending.clear()
        self._flushed = (step, result)
        return result

    @staticmethod
    def mean(flushed: Mapping[str, list[tuple[int, float]]], name: str) -> float | None:
        """The mean of ``name``'s flushed values, or ``None`` when there are none.

        Args:
            flushed: what :meth:`flush` returned.
            name: the metric's name.

        Returns:
            The mean, or ``None``.
        """
        values = [v for _, v in flushed.get(name, [])]
        return sum(values) / len(values) if values else None

    def state_dict(self) -> dict[str, Any]:
        """The values recorded since the last flush, as plain floats (read on the host: checkpoints only).

        Returns:
            The state, for :meth:`load_state_dict`.
        """
        return {"pending": [[s, n, float(v)] for s, n, v in self._pending]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state: a dict from :meth:`state_dict`.
        """
        self._pending = [(int(s), str(n), torch.tensor(float(v))) for s, n, v in state.get("pending", [])]
        self._flushed = None
