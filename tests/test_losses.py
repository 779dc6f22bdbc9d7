"""StableMax cross-entropy against its definition (Prieto et al., ICLR 2025)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grokfast.tasks.losses import LOSSES, get_loss, stablemax, stablemax_cross_entropy


def _s(x: float) -> float:
    return x + 1 if x >= 0 else 1 / (1 - x)


def test_stablemax_loss_is_minus_log_of_s_target_over_sum_of_s() -> None:
    logits = [[2.5, -1.0, 0.0, -3.5], [-0.25, 4.0, 1.0, -10.0]]
    targets = [0, 3]
    expected = [-math.log(_s(row[t]) / sum(_s(x) for x in row)) for row, t in zip(logits, targets)]
    loss = stablemax_cross_entropy(torch.tensor(logits), torch.tensor(targets), reduction="none")
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    mean = stablemax_cross_entropy(torch.tensor(logits), torch.tensor(targets))
    assert float(mean) == pytest.approx(sum(expected) / 2, rel=1e-6)
    total = stablemax_cross_entropy(torch.tensor(logits), torch.tensor(targets), reduction="sum")
    assert float(total) == pytest.approx(sum(expected), rel=1e-6)


def test_stablemax_probabilities_sum_to_one_and_follow_the_definition() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    torch.testing.assert_close(stablemax(logits), torch.tensor([[1 / 3.5, 2 / 3.5, 0.5 / 3.5]]))
    assert float(stablemax(torch.randn(5, 7)).sum(-1).sub(1).abs().max()) < 1e-6


def test_stablemax_loss_and_gradient_stay_finite_and_nonzero_where_softmax_collapses() -> None:
    logits = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)
    target = torch.tensor([0])
    assert float(torch.nn.functional.cross_entropy(logits.detach(), target)) == 0.0  # softmax has collapsed
    loss = stablemax_cross_entropy(logits, target)
    loss.backward()
    assert 0 < float(loss.detach()) < 0.01
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_stablemax_loss_keeps_the_dtype_of_the_logits() -> None:
    logits = torch.randn(4, 3, dtype=torch.float32)
    assert stablemax_cross_entropy(logits, torch.tensor([0, 1, 2, 0])).dtype == torch.float32


def test_loss_names_resolve_and_unknown_names_raise() -> None:
    assert get_loss("stablemax") is stablemax_cross_entropy
    assert set(LOSSES) == {"cross_entropy", "stablemax"}
    with pytest.raises(ValueError, match="`loss` must be one of"):
        get_loss("mse")
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        stablemax_cross_entropy(torch.zeros(1, 2), torch.tensor([0]), reduction="max")
