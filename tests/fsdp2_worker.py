"""Runs of ModelParallelStrategy (FSDP2 ``fully_shard`` or tensor parallel) on CPU, for tests/test_fsdp2.py.

Run as a script (Lightning's launcher re-runs it once per rank): ``python tests/fsdp2_worker.py JOBS.json``, where
the file holds a list of jobs, all with the same ``devices``, run one after the other in the same processes (one
process start for many fits). A job: ``out`` (directory), ``kind`` (a filter, ``ma:5`` for window 5, or ``off``
for no GrokfastCallback), ``devices``, ``epochs``, ``ckpt`` (or null), ``layout`` (``fsdp2``, ``tp``, or
``fabric``: attach_grokfast under Fabric, see ``run_fabric_job``) and ``expect_error`` (only with
``devices == 1``: the exception's text goes to ``error.txt`` and the next job runs).
Each job writes into ``out``: ``epoch=*.ckpt`` (distributed checkpoints), ``final.pt`` (the full parameters,
gathered after training), ``rank{r}.json`` (full-tensor gathers counted during ``fit``, the filter's steps and
state bytes, the local shard sizes), ``rank{r}_state.pt`` (this rank's local filter state) and ``warnings.txt``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

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


COUNTS = {"full_tensor": 0, "redistribute": 0}


def count_gathers() -> None:
    """Count DTensor.full_tensor / redistribute calls in ``COUNTS`` (a gather of the state would go through them)."""
    for name in COUNTS:
        original = getattr(DTensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            COUNTS[_name] += 1
            return _original(self, *args, **kwargs)

        setattr(DTensor, name, counting)


def run_job(job: dict) -> None:
    out = Path(job["out"])
    kind, _, window = job["kind"].partition(":")  # "ma:5": window_size 5; "off": no Grokfast at all
    callbacks: list[pl.Callback] = [ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1, filename="{epoch}")]
    if kind != "off":
        callback = GrokfastCallback(
            filter=kind, alpha=0.8, lamb=2.0, window_size=int(window or 3), ma_lamb=1.0, resum_every=4
        )
        callbacks.insert(0, callback)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=job["devices"],
        strategy=ModelParallelStrategy(),
        max_epochs=job["epochs"],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = TensorParallelModel() if job.get("layout") == "tp" else ShardedModel()
    COUNTS.update(full_tensor=0, redistribute=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, ckpt_path=job.get("ckpt"))
        except Exception as err:
            if not job.get("expect_error") or job["devices"] != 1:
                raise
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(f"{type(err).__name__}: {err}")
            return
    gathers = dict(COUNTS)
    rank = trainer.global_rank
    out.mkdir(parents=True, exist_ok=True)
    (out / "warnings.txt").write_text("\n".join(str(w.message) for w in caught))
    if kind == "off":
        return
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    filt = callback.filters[0]
    local_numel = {n: p.to_local().numel() for n, p in model.named_parameters()}
    report = {"gathers": gathers, "steps": filt.steps, "state_bytes": filt.state_bytes(), "local_numel": local_numel}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    torch.save({n: s.to_dict() for n, s in filt.states.items()}, out / f"rank{rank}_state.pt")
    if rank == 0:
        torch.save(full, out / "final.pt")


class Net(nn.Module):
    """ShardedModel's layers as a plain module (for Fabric)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def run_fabric_job(job: dict) -> None:
    """attach_grokfast under Fabric + FSDP2: ``epochs`` is the number of steps; ``save_at``: save after that step;
    ``ckpt``: load it first (and continue from its step); ``start_step``: attach_grokfast's."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel

    from lightning_grokfast import attach_grokfast

    def parallelize(model: nn.Module, mesh: Any) -> nn.Module:
        fully_shard(model.body)
        fully_shard(model.head)
        fully_shard(model)
        return model

    out = Path(job["out"])
    fabric = Fabric(accelerator="cpu", devices=job["devices"], strategy=FabricModelParallel(parallelize))
    fabric.launch()
    torch.manual_seed(0)
    model = fabric.setup_module(Net())
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=0.01))
    handle = attach_grokfast(
        optimizer, job["kind"], model=model, alpha=0.8, lamb=2.0, window_size=3, start_step=job.get("start_step", 0)
    )
    state = {"model": model, "optimizer": optimizer, "step": 0}
    if job.get("ckpt"):
        fabric.load(job["ckpt"], state)
    x, y = make_data(48).tensors
    for step in range(state["step"], job["epochs"]):
        optimizer.zero_grad()
        batch = slice(8 * (step % 6), 8 * (step % 6 + 1))
        fabric.backward(nn.functional.cross_entropy(model(x[batch]), y[batch]))
        optimizer.step()
        if step + 1 == job.get("save_at"):
            fabric.save(out / "step.ckpt", {"model": model, "optimizer": optimizer, "step": step + 1})
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    clean = all(not any(k.startswith("grokfast") for k in g) for g in optimizer.param_groups) and all(
        not any(k.startswith("grokfast") for k in entry) for entry in optimizer.state.values()
    )
    report = {
        "steps": handle.filter.steps,
        "live_state_clean": clean,
        "local_numel": {n: p.to_local().numel() for n, p in model.named_parameters()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{fabric.global_rank}.json").write_text(json.dumps(report))
    if fabric.global_rank == 0:
        torch.save(full, out / "final.pt")


if __name__ == "__main__":
    count_gathers()
    try:
        for job in json.loads(Path(sys.argv[1]).read_text()):
            (run_fabric_job if job.get("layout") == "fabric" else run_job)(job)
    finally:  # an orderly gloo shutdown (once seen: 'terminate called without an active exception' at exit)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
