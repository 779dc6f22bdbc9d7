"""attach_grokfast under Lightning Fabric: real 2-process CPU DDP (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_grokfast import attach_grokfast

STEPS = 4
PER_RANK = 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(2 * PER_RANK, 4, generator=generator), torch.randint(0, 2, (2 * PER_RANK,), generator=generator)


def single_process_state() -> dict[str, torch.Tensor]:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    handle = attach_grokfast(optimizer, model=model, filter="ema", alpha=0.8, lamb=2.0)
    for step in range(STEPS):
        x, y = global_batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {n: s.ema for n, s in handle.filter.states.items()}


def worker(fabric: Fabric, out_dir: Path) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    handle = attach_grokfast(optimizer, model=model.module, filter="ema", alpha=0.8, lamb=2.0)
    for step in range(STEPS):
        x, y = global_batch(step)
        rank = fabric.global_rank
        x, y = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]
        optimizer.zero_grad()
        fabric.backward(nn.functional.cross_entropy(model(x), y))
        optimizer.step()
    expected = single_process_state()
    for name, state in handle.filter.states.items():
        gathered = fabric.all_gather(state.ema)
        assert torch.equal(gathered[0], gathered[1]), f"ranks disagree on {name}"
        torch.testing.assert_close(state.ema, expected[name], atol=1e-6, rtol=1e-5)
    fabric.save(out_dir / "ckpt.pt", {"optimizer": optimizer})
    (out_dir / f"rank{fabric.global_rank}.ok").write_text("ok")


@pytest.mark.timeout(180)
def test_fabric_ddp_ranks_hold_the_same_state_as_one_process_on_the_global_batch(tmp_path: Path):
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    fabric.launch(worker, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok"]
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]
    assert saved["grokfast"]["steps"] == STEPS
    assert all("grokfast_ema" in entry for entry in saved["state"].values())
