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


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 4, generator=generator), torch.randint(0, 2, (8,), generator=generator)


def _prepared(lr: float = 0.01):
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train(accelerator, model, optimizer, steps) -> None:
    for step in steps:
        x, y = _batch(step)
        optimizer.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        optimizer.step()


@pytest.mark.parametrize("attach_first", [True, False], ids=["attach-then-load_state", "load_state-then-attach"])
@pytest.mark.parametrize("kind", [dict(filter="ema", alpha=0.8), dict(filter="ema+ma", window_size=3)], ids=str)
def test_accelerator_save_state_and_load_state_resume_exactly(tmp_path, attach_first, kind):
    accelerator, straight, optimizer = _prepared()
    attach_grokfast(optimizer, model=straight, **kind)
    _train(accelerator, straight, optimizer, range(8))

    accelerator, first, optimizer = _prepared()
    attach_grokfast(optimizer, model=first, **kind)
    _train(accelerator, first, optimizer, range(4))
    accelerator.save_state(str(tmp_path / "state"))

    accelerator, resumed, optimizer = _prepared()
    if attach_first:
        handle = attach_grokfast(optimizer, model=resumed, **kind)
        accelerator.load_state(str(tmp_path / "state"))
    else:
        accelerator.load_state(str(tmp_path / "state"))
        handle = attach_grokfast(optimizer, model=resumed, **kind)
    assert handle.filter.steps == 4
    _train(accelerator, resumed, optimizer, range(4, 8))
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_accelerate_gradient_accumulation_filters_once_per_synchronised_step():
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    handle = attach_grokfast(optimizer, model=model, filter="ema", alpha=0.8)
    for step in range(6):  # 6 micro-batches = 2 optimizer steps
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=generator), torch.randint(0, 2, (8,), generator=generator)
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    assert handle.filter.steps == 2
