"""attach_grokfast under Hugging Face Accelerate (the optimizer wrapper the HF Trainer uses)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_grokfast import attach_grokfast

accelerate = pytest.importorskip("accelerate")  # in the `dev` extra; Accelerate is optional for users


def test_accelerated_optimizer_is_filtered_and_checkpointed_like_a_plain_one():
    def run(wrap: bool) -> tuple[nn.Module, dict]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        if wrap:
            accelerator = accelerate.Accelerator(cpu=True)
            model, optimizer = accelerator.prepare(model, optimizer)
            assert type(optimizer).__name__ == "AcceleratedOptimizer"
        handle = attach_grokfast(optimizer, model=model, filter="ema", alpha=0.8, lamb=2.0)
        for step in range(5):
            generator = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 4, generator=generator), torch.randint(0, 2, (8,), generator=generator)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss) if wrap else loss.backward()
            optimizer.step()
        assert handle.filter.steps == 5
        return model, optimizer.state_dict()

    plain, _ = run(False)
    wrapped, wrapped_state = run(True)
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(p, q)
    assert wrapped_state["grokfast"]["steps"] == 5
    assert all("grokfast_ema" in entry for entry in wrapped_state["state"].values())
