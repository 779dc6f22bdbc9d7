"""The train-metric tracker shared by the detector and the dashboard."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_grokfast.callbacks.tracking import TrainMetricTracker


class CountHostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "_local_scalar_dense" in str(func) or ("aten._to_copy" in str(func) and "cpu" in str(kwargs)):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_records_step_values_before_plain_ones_and_flushes_once_per_validation():
    tracker = TrainMetricTracker()
    tracker.watch("train_acc")
    tracker.watch("train_loss")
    with CountHostReads() as mode:
        for step in range(3):
            tracker.record(step, {"train_acc_step": torch.tensor(0.1 * step), "train_acc_epoch": torch.tensor(9.0)})
            tracker.record(step, {"train_loss": torch.tensor(1.0)})
    assert mode.reads == 0  # nothing read on the host per batch
    first = tracker.flush(3)
    assert [s for s, _ in first["train_acc"]] == [0, 1, 2]
    assert TrainMetricTracker.mean(first, "train_acc") == pytest.approx(0.1)
    assert tracker.flush(3) is first  # a second reader at the same validation shares the transfer
    assert tracker.flush(4) == {"train_acc": [], "train_loss": []}


def test_pending_values_survive_a_checkpoint():
    tracker = TrainMetricTracker()
    tracker.watch("train_acc")
    tracker.record(5, {"train_acc": 0.5})
    restored = TrainMetricTracker()
    restored.watch("train_acc")
    restored.load_state_dict(tracker.state_dict())
    assert restored.flush(6) == {"train_acc": [(5, 0.5)]}
