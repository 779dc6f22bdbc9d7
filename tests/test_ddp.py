"""Real 2-process CPU DDP (gloo): every rank holds the same filter state as a single process on the global batch."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_grokfast import GradientFilter, GrokfastCallback
from tests.helpers import TinyModel, make_data, trainer

STEPS = 5
PER_RANK_BATCH = 4


class CheckAgainstSingleProcess(Callback):
    """Runs inside each DDP worker: compares the filter state across ranks and with a one-process reference."""

    def __init__(self, out_dir: Path, initial: dict[str, torch.Tensor]) -> None:
        self.out_dir, self.initial = out_dir, initial

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grokfast = next(c for c in trainer.callbacks if isinstance(c, GrokfastCallback))
        state = grokfast.filters[0].state_dict()["params"]
        for name, entry in state.items():
            gathered = trainer.strategy.all_gather(entry["ema"])
            assert torch.equal(gathered[0], gathered[1]), f"ranks disagree on {name}"
            expected = self.single_process_state()[name]
            torch.testing.assert_close(entry["ema"], expected, atol=1e-6, rtol=1e-5, msg=f"{name} differs")
        (self.out_dir / f"rank{trainer.global_rank}.ok").write_text("checked")

    def single_process_state(self) -> dict[str, torch.Tensor]:
        """The same steps in one process, each on the union of both ranks' batches (the global batch)."""
        model = TinyModel(batch_size=2 * PER_RANK_BATCH)
        model.load_state_dict(copy.deepcopy(self.initial))
        optimizer = model.configure_optimizers()
        filt = GradientFilter("ema", alpha=0.8, lamb=2.0)
        data = make_data()
        names = [n for n, _ in model.named_parameters()]
        for step in range(STEPS):
            x, y = data[step * 2 * PER_RANK_BATCH : (step + 1) * 2 * PER_RANK_BATCH]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            filt.step(names, [p.grad for p in model.parameters()])
            optimizer.step()
        return {n: e["ema"] for n, e in filt.state_dict()["params"].items()}


class RankSplitModel(TinyModel):
    """Rank r trains on examples r, r + 2, r + 4, ...: each step's two batches form one contiguous global batch."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(make_data(), num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(make_data(), batch_size=PER_RANK_BATCH, sampler=sampler)


@pytest.mark.timeout(180)
def test_ddp_ranks_hold_identical_filter_state_equal_to_a_single_process_run(tmp_path: Path):
    model = RankSplitModel()
    initial = copy.deepcopy(model.state_dict())
    run = trainer(
        strategy="ddp_fork",
        devices=2,
        max_steps=STEPS,
        use_distributed_sampler=False,
        callbacks=[GrokfastCallback(filter="ema", alpha=0.8, lamb=2.0), CheckAgainstSingleProcess(tmp_path, initial)],
    )
    run.fit(model)
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok"]


class ResumeModel(TinyModel):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(), batch_size=PER_RANK_BATCH, shuffle=False)


class SaveFinalParams(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save({n: p.detach().clone() for n, p in pl_module.named_parameters()}, self.path)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_ddp_resume_from_an_epoch_checkpoint_is_bit_identical(tmp_path: Path, kind: str):
    """The filter state travels in the optimizer state of the DDP checkpoint (rank 0 writes it for all)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(epochs: int, out: str, ckpt: Path | None = None) -> None:
        grokfast = GrokfastCallback(filter=kind, alpha=0.8, lamb=2.0, window_size=2)
        saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        run = trainer(
            strategy="ddp_fork",
            devices=2,
            max_epochs=epochs,
            enable_checkpointing=True,
            callbacks=[grokfast, saver, SaveFinalParams(tmp_path / out)],
        )
        run.fit(ResumeModel(optimizer="adam", lr=0.01), ckpt_path=ckpt)

    fit(2, "straight.pt")
    fit(2, "resumed.pt", ckpt=tmp_path / "epoch=0.ckpt")
    straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


class CheckLegacyState(Callback):
    """Inside each DDP worker, after the restore: the filter holds the 0.1 checkpoint's per-parameter state."""

    def __init__(self, out_dir: Path, legacy: dict, kind: str) -> None:
        self.out_dir, self.legacy, self.kind = out_dir, legacy, kind

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # no step runs: no train end
        grokfast = next(c for c in trainer.callbacks if isinstance(c, GrokfastCallback))
        states = grokfast.filters[0].states
        assert grokfast.filters[0].steps == 6
        field = "ema" if self.kind == "ema" else "ma_history"
        for name, entry in self.legacy["filters"]["0"]["params"].items():
            assert torch.equal(getattr(states[name], field), entry[field]), name
        (self.out_dir / f"rank{trainer.global_rank}.ok").write_text("checked")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_a_checkpoint_of_version_0_1_resumes_its_filter_state_on_every_ddp_rank(tmp_path: Path, kind: str):
    """tests/data/grokfast-0.1-*.ckpt (one epoch, single process, filter state in the callback state) under DDP."""
    path = Path(__file__).parent / "data" / f"grokfast-0.1-{kind}.ckpt"
    saved = torch.load(path, weights_only=True)
    (legacy,) = [v for k, v in saved["callbacks"].items() if k.startswith("GrokfastCallback")]
    grokfast = GrokfastCallback(filter=kind, alpha=0.8, lamb=2.0, window_size=4)
    run = trainer(
        strategy="ddp_fork", devices=2, max_epochs=1, callbacks=[grokfast, CheckLegacyState(tmp_path, legacy, kind)]
    )
    run.fit(TinyModel(optimizer="adam", lr=0.01), ckpt_path=path)
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok"]
