"""Grokfast state under FSDP2 (ModelParallelStrategy + fully_shard): memory per rank and checkpoint time.

Two CPU processes (gloo) train an MLP of about 4M parameters for a few steps, with and without GrokfastCallback,
then time ``trainer.save_checkpoint`` (a distributed checkpoint, each rank writing its shard) and
``strategy.load_checkpoint`` (each rank reading its shard) several times. Reports the filter state's bytes on each
rank against the shard's share ``4 * N / W`` (EMA), and the median save/load times.

    python benchmarks/sharded.py                     # EMA and MA (window 10), 2 processes, ~1 minute on a CPU
    python benchmarks/sharded.py --width 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_grokfast import GrokfastCallback

RESULTS = Path(__file__).resolve().parent / "results"


class Mlp(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])

    def configure_model(self) -> None:
        for layer in self.layers:
            fully_shard(layer)
        fully_shard(self)

    def training_step(self, batch, batch_idx):
        return self.layers(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def train_dataloader(self):
        width = self.layers[0].in_features
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, width)), batch_size=8)


class TimeCheckpoints(pl.Callback):
    """After training: time saving and loading the distributed checkpoint; record the filter's bytes."""

    def __init__(self, repeats: int, directory: Path) -> None:
        self.repeats, self.directory = repeats, directory
        self.result: dict = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.directory / "ckpt"
        saves, loads = [], []
        for _ in range(self.repeats):
            trainer.strategy.barrier()
            start = time.perf_counter()
            trainer.save_checkpoint(path)
            trainer.strategy.barrier()
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.strategy.load_checkpoint(path)
            trainer.strategy.barrier()
            loads.append(time.perf_counter() - start)
        grokfast = next((c for c in trainer.callbacks if isinstance(c, GrokfastCallback)), None)
        local = sum(p.to_local().numel() for p in pl_module.parameters())
        self.result = {
            "rank": trainer.global_rank,
            "params_total": sum(p.numel() for p in pl_module.parameters()),
            "params_local": local,
            "state_bytes": grokfast.filters[0].state_bytes() if grokfast else 0,
            "save_s": statistics.median(saves),
            "load_s": statistics.median(loads),
        }
        gathered = trainer.strategy.all_gather(torch.tensor([self.result["state_bytes"], local], dtype=torch.float64))
        self.result["state_bytes_per_rank"] = [int(v) for v in gathered[:, 0].tolist()]
        self.result["params_per_rank"] = [int(v) for v in gathered[:, 1].tolist()]


def measure(variant: str, args: argparse.Namespace, directory: Path) -> dict:
    timer = TimeCheckpoints(args.repeats, directory)
    callbacks: list[pl.Callback] = [timer]
    if variant == "ema":
        callbacks.insert(0, GrokfastCallback(filter="ema", log_stats=False))
    elif variant == "ma":
        callbacks.insert(0, GrokfastCallback(filter="ma", window_size=args.window, log_stats=False))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy(),
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Mlp(args.width))
    return {"variant": variant, **timer.result}


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"FSDP2 on {args.devices} CPU processes (gloo), {rows[0]['params_total'] / 1e6:.1f}M parameters, "
        f"median of {args.repeats} saves/loads (`python benchmarks/sharded.py`)",
        "",
        "| filter | state bytes per rank | shard's share of 4N (EMA) | save | load |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        share = [4 * n for n in row["params_per_rank"]]
        lines.append(
            f"| {row['variant']} | {', '.join(f'{b:,}' for b in row['state_bytes_per_rank'])} |"
            f" {', '.join(f'{s:,}' for s in share)} | {row['save_s'] * 1e3:.0f} ms | {row['load_s'] * 1e3:.0f} ms |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024, help="MLP width (4 layers: about 4 * width^2 parameters)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = Path(tempfile.mkdtemp(prefix="sharded-bench-"))
    rows = [measure(variant, args, directory) for variant in ("none", "ema", "ma")]
    if rows[0].get("rank", 0) == 0:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "sharded.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        table = render(rows, args)
        (RESULTS / "sharded.md").write_text(table)
        print(table)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
