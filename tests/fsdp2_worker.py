"""One 2-process (or 1-process) ModelParallelStrategy + FSDP2 ``fully_shard`` run on CPU, for tests/test_fsdp2.py.

Run as a script (Lightning's launcher re-runs it once per rank):
``python tests/fsdp2_worker.py OUT_DIR KIND DEVICES EPOCHS [CKPT]`` (KIND: a filter, ``ma:5`` for window 5, or
``off`` for no GrokfastCallback; with ``WORKER_LAYOUT=tp`` the model is split by tensor parallelism instead).
Writes into OUT_DIR: ``epoch=*.ckpt`` (distributed checkpoints),
``final.pt`` (the full parameters, gathered after training), ``rank{r}.json`` (full-tensor gathers counted during
``fit``, the filter's steps and state bytes, the local shard sizes) and ``rank{r}_state.pt`` (this rank's local
filter state).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_grokfast import GrokfastCallback
from tests.helpers import make_data


class ShardedModel(pl.LightningModule):
    """Two linear layers sharded with FSDP2; ``body.weight`` has 5 rows, so 2 ranks hold uneven shards."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def configure_model(self) -> None:
        fully_shard(self.body)
        fully_shard(self.head)
        fully_shard(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(make_data(48), batch_size=8)


class TensorParallelModel(ShardedModel):
    """The same layers split by tensor parallelism: ``body`` column-wise (``Shard(0)``), ``head`` row-wise
    (weight ``Shard(1)``, bias ``Replicate``); ``body`` has 6 outputs so the split is even."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def configure_model(self) -> None:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(
            self, self.device_mesh["tensor_parallel"], {"body": ColwiseParallel(), "head": RowwiseParallel()}
        )


def count_gathers() -> dict[str, int]:
    """Count DTensor.full_tensor / redistribute calls (a gather of the state would go through them)."""
    counts = {"full_tensor": 0, "redistribute": 0}
    for name in counts:
        original = getattr(DTensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        setattr(DTensor, name, counting)
    return counts


def main(out: Path, kind: str, devices: int, epochs: int, ckpt: str | None) -> None:
    kind, _, window = kind.partition(":")  # "ma:5": window_size 5; "off": no Grokfast at all
    window_size = int(window or 3)
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
    if kind != "off":
        callback = GrokfastCallback(
            filter=kind, alpha=0.8, lamb=2.0, window_size=window_size, ma_lamb=1.0, resum_every=4
        )
        callbacks.insert(0, callback)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(),
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = TensorParallelModel() if os.environ.get("WORKER_LAYOUT") == "tp" else ShardedModel()
    counts = count_gathers()
    trainer.fit(model, ckpt_path=ckpt)
    gathers = dict(counts)
    if kind == "off":
        return
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    filt = callback.filters[0]
    local_numel = {n: p.to_local().numel() for n, p in model.named_parameters()}
    report = {"gathers": gathers, "steps": filt.steps, "state_bytes": filt.state_bytes(), "local_numel": local_numel}
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.save({n: s.to_dict() for n, s in filt.states.items()}, out / f"rank{rank}_state.pt")
    if rank == 0:
        torch.save(full, out / "final.pt")


if __name__ == "__main__":
    try:
        main(
            Path(sys.argv[1]),
            sys.argv[2],
            int(sys.argv[3]),
            int(sys.argv[4]),
            sys.argv[5] if len(sys.argv) > 5 else None,
        )
    finally:  # an orderly gloo shutdown (once seen: 'terminate called without an active exception' at exit)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
