"""Shared settings, timing helpers and the A/B block schedule of the overhead benchmarks."""

from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_grokfast.tasks import GrokTransformer

SECTIONS = ("glue", "trainer", "loop", "large", "ma", "window")
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FilterSpec:
    """One filter setting, for our ``GradientFilter`` and (if it has one) the published algorithm."""

    key: str
    label: str
    ours: dict[str, Any]
    reference: dict[str, Any] | None

    @property
    def window(self) -> int:
        return int(self.ours.get("window_size", 0)) if self.ours["filter"] != "ema" else 0


def filter_specs(windows: tuple[int, int]) -> list[FilterSpec]:
    """EMA (alpha 0.98, lamb 2), MA at both windows (lamb 5), and EMA+MA, with the paper's hyperparameters."""
    small, large = windows
    return [
        FilterSpec(
            "ema",
            "EMA (alpha 0.98, lamb 2)",
            {"filter": "ema", "alpha": 0.98, "lamb": 2.0},
            {"alpha": 0.98, "lamb": 2.0},
        ),
        FilterSpec(
            f"ma{small}",
            f"MA (window {small}, lamb 5)",
            {"filter": "ma", "window_size": small, "lamb": 5.0},
            {"window_size": small, "lamb": 5.0},
        ),
        FilterSpec(
            f"ma{large}",
            f"MA (window {large}, lamb 5)",
            {"filter": "ma", "window_size": large, "lamb": 5.0},
            {"window_size": large, "lamb": 5.0},
        ),
        FilterSpec(
            "ema+ma",
            f"EMA + MA (window {small})",
            {"filter": "ema+ma", "alpha": 0.98, "lamb": 2.0, "window_size": small, "ma_lamb": 5.0},
            None,
        ),
    ]


@dataclass
class Settings:
    """Sizes of every section; ``--smoke`` shrinks them to seconds."""

    device: torch.device
    windows: tuple[int, int] = (100, 1000)
    p: int = 97
    dim: int = 128
    batch_size: int = 512
    rounds: int = 5
    block: int | None = None  # steps per block; None: one epoch
    params: int = 50_000_000
    ma_memory_gb: float = 6.0
    large_rounds: int = 5
    window_iters: int = 10
    glue_steps: int = 200
    compile: bool = True
    anchors: bool = True
    smoke: bool = False

    @classmethod
    def smoke_settings(cls, device: torch.device) -> Settings:
        return cls(
            device=device,
            windows=(3, 12),
            p=23,
            dim=32,
            batch_size=64,
            rounds=1,
            block=1,
            params=200_000,
            ma_memory_gb=0.05,
            large_rounds=1,
            window_iters=1,
            glue_steps=20,
            compile=False,
            smoke=True,
        )


# ---------------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}x"


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.2f} ms"


def fmt_bytes(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f}"


def tensor_bytes(tensors: Iterator[Tensor]) -> int:
    """Bytes of the distinct storages among ``tensors``."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor.numel():
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor state of an optimizer (``GrokAdamW`` keeps its state in ``param_groups[i]["state"]``)."""

    def tensors() -> Iterator[Tensor]:
        states = list(optimizer.state.values())
        for group in optimizer.param_groups:
            states.extend(group.get("state", {}).values())
        for state in states:
            yield from (v for v in state.values() if isinstance(v, Tensor))

    return tensor_bytes(tensors())


def anchor_classes() -> tuple[type[torch.optim.Optimizer], type[torch.optim.Optimizer]] | None:
    """``(GrokFastAdamW, GrokAdamW)`` if both anchors are installed (``pip install -e .[bench]``)."""
    try:
        import logging

        root_level = logging.getLogger().level
        from grokadamw import GrokAdamW  # its import configures the root logger at INFO; undo that
        from grokfast_pytorch import GrokFastAdamW

        logging.getLogger().setLevel(root_level)
    except ImportError as err:
        print(f"[overhead] anchors not installed ({err}); skipping them. `pip install -e .[bench]` adds them.")
        return None
    warnings.filterwarnings("ignore", module="grokadamw")
    warnings.filterwarnings("ignore", message=".*autocast.*")
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    return GrokFastAdamW, GrokAdamW


class SwitchOptimizer(torch.optim.Optimizer):
    """Steps one of two optimizers built over the same parameters; ``use_second`` chooses which.

    Lets one ``Trainer.fit`` alternate between, e.g., ``torch.optim.AdamW`` and ``GrokAdamW`` block by block.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        first: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        second: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    ) -> None:
        params = list(params)
        super().__init__(params, {})
        self.first, self.second = first(params), second(params)
        self.use_second = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        return (self.second if self.use_second else self.first).step(closure)


class OptimizerFromFactory(GrokTransformer):
    """The paper's model with another optimizer (no learning-rate schedule): for the anchors."""

    def configure_optimizers(self):  # type: ignore[override]
        return self.optimizer_factory(list(self.parameters()))


# ---------------------------------------------------------------------------------------------------- block schedule
Schedule = list[tuple[int, str | None]]  # (round, active variant) per optimizer step; round 0 is a warm-up


def block_schedule(keys: list[str], rounds: int, block: int) -> Schedule:
    """Round 0 (warm-up) then ``rounds`` rounds of: ``block`` steps without filter, ``block`` with ``key``, per key."""
    schedule: Schedule = []
    for r in range(rounds + 1):
        for key in keys:
            schedule += [(r, None)] * block + [(r, key)] * block
    return schedule


def paired_ratios(schedule: Schedule, durations: list[float], keys: list[str]) -> dict[str, dict[str, float]]:
    """Per key: median over rounds of (median step time of its block / median of the no-filter block before it)."""
    blocks: dict[tuple[int, str | None, int], list[float]] = {}
    order: list[tuple[int, str | None, int]] = []
    previous: tuple[int, str | None] | None = None
    index = 0
    for (r, key), duration in zip(schedule, durations):
        if (r, key) != previous:
            index += 1
            previous = (r, key)
            order.append((r, key, index))
        if not math.isnan(duration):
            blocks.setdefault((r, key, index), []).append(duration)
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        ratios, with_filter, without = [], [], []
        for i, (r, k, idx) in enumerate(order):
            if k != key or r == 0 or i == 0:
                continue
            before = order[i - 1]
            if before[1] is not None or (r, key, idx) not in blocks or before not in blocks:
                continue
            on, off = median(blocks[(r, key, idx)]), median(blocks[before])
            ratios.append(on / off)
            with_filter += blocks[(r, key, idx)]
            without += blocks[before]
        out[key] = {
            "ratio": median(ratios),
            "ratio_min": min(ratios) if ratios else math.nan,
            "ratio_max": max(ratios) if ratios else math.nan,
            "ratio_of_medians": median(with_filter) / median(without) if with_filter else math.nan,
            "ratio_of_means": statistics.fmean(with_filter) / statistics.fmean(without) if with_filter else math.nan,
            "step_s": median(with_filter),
            "baseline_step_s": median(without),
            "rounds": len(ratios),
        }
    return out


class BlockScheduleCallback(Callback):
    """Switches variants on and off per optimizer step according to a schedule, and times every step.

    Args:
        schedule: the active variant (or ``None``) of every optimizer step.
        toggles: ``{key: switch}``; ``switch(True)`` turns the variant on.
        device: synchronized before each time stamp.

    """

    def __init__(self, schedule: Schedule, toggles: dict[str, Callable[[bool], None]], device: torch.device) -> None:
        self.schedule = schedule
        self.toggles = toggles
        self.device = device
        self.stamps: list[float] = []

    def _switch(self, step: int) -> None:
        active = self.schedule[step][1] if step < len(self.schedule) else None
        for key, toggle in self.toggles.items():
            toggle(key == active)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch(0)
        sync(self.device)
        self.stamps = [time.perf_counter()]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._switch(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    @property
    def durations(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.stamps)]
