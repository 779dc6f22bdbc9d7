"""What Grokfast costs per optimizer step: ours, the paper's algorithm as published, and the PyPI anchors.

Four sections, each reported as ratios (times are printed next to them only to show the scale):

``trainer``
    Whole training step of the paper's model (``GrokTransformer`` on ``x*y mod 97``, batch 512) through the real
    ``lightning.pytorch.Trainer`` (no validation, no logger): step time with a filter / step time without. Our
    filters live in one ``fit`` (the published ones in another); a scheduler switches one of them on for a block of
    steps (one epoch), then none for a block, and so on (A/B/A/B). Off means ``enabled=False``: the hook returns at
    its first line. The figure is the median over rounds of (median step time of a filter block / median of the
    no-filter block just before it).
    The anchors are optimizers, so they get their own ``fit``: ``GrokFastAdamW`` with grokfast switched on and off
    between blocks, and ``GrokAdamW`` against ``torch.optim.AdamW`` (one optimizer object stepping either).
``loop``
    The same measurement in a plain PyTorch loop (no Lightning, no metrics): a smaller denominator, so a stricter
    ratio.
``large``
    About 50M parameters in transformer-like shapes with random gradients: (b) filter time alone divided by the
    time of one ``torch._foreach_copy_`` of the same gradients (the memory-traffic floor; measured just before each
    filter call, paired); (c) optimizer-step time with grokfast / plain ``torch.optim.AdamW`` for ours (filter +
    AdamW), the published algorithm (+ AdamW), ``GrokFastAdamW`` and ``GrokAdamW``; bytes of state per parameter
    beyond AdamW's. Only the EMA fits here: a moving average keeps ``window_size`` gradients per parameter.
``window``
    Every filter, moving averages included, alone / ``foreach_copy_`` on as many parameters as the largest window
    allows within ``--ma-memory-gb``, one filter at a time (so MA w=100 and w=1000 run on the same tensors).

Our filter is measured two ways: "check" is the default (it verifies the gradients are finite with a
``_foreach_norm`` pass), "found_inf" is the AMP path (the scaler already knows, ``found_inf`` is passed in).
Moving averages are timed full (steady state): ours with ``warmup=False`` in the training sections (same work per
step as a full window), or pre-filled through ``step(amplify=False)``; the published one with a pre-filled window.

Run ``python benchmarks/overhead.py`` (all sections), ``--sections trainer loop``, ``--smoke`` (seconds, for the
tests), ``--device cuda``. Prints markdown tables and writes ``benchmarks/results/overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_grokfast import GradientFilter, GrokfastCallback
from lightning_grokfast.tasks import GrokTransformer, ModularArithmeticDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, quiet_lightning
from reference import (
    ReferenceGrokfastCallback,
    gradfilter_ema_reference,
    gradfilter_ma_reference,
    prefilled_ma_state,
    reference_state_bytes,
)

SECTIONS = ("trainer", "loop", "large", "window")
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
    rounds: int = 20
    block: int | None = None  # steps per block; None: one epoch
    params: int = 50_000_000
    ma_memory_gb: float = 6.0
    large_rounds: int = 10
    window_iters: int = 10
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
            smoke=True,
        )


# ---------------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}x"


def _fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.2f} ms"


def _fmt_bytes(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f}"


def _tensor_bytes(tensors: Iterator[Tensor]) -> int:
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

    return _tensor_bytes(tensors())


def _anchor_classes() -> tuple[type[torch.optim.Optimizer], type[torch.optim.Optimizer]] | None:
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


class _OptimizerFromFactory(GrokTransformer):
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
            on, off = _median(blocks[(r, key, idx)]), _median(blocks[before])
            ratios.append(on / off)
            with_filter += blocks[(r, key, idx)]
            without += blocks[before]
        out[key] = {
            "ratio": _median(ratios),
            "ratio_min": min(ratios) if ratios else math.nan,
            "ratio_max": max(ratios) if ratios else math.nan,
            "ratio_of_medians": _median(with_filter) / _median(without) if with_filter else math.nan,
            "ratio_of_means": statistics.fmean(with_filter) / statistics.fmean(without) if with_filter else math.nan,
            "step_s": _median(with_filter),
            "baseline_step_s": _median(without),
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
        _sync(self.device)
        self.stamps = [time.perf_counter()]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._switch(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    @property
    def durations(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.stamps)]


# ---------------------------------------------------------------------------------------------------- (a) trainer
def _task(settings: Settings, seed: int = 0) -> tuple[ModularArithmeticDataModule, int]:
    pl.seed_everything(seed, verbose=False)
    datamodule = ModularArithmeticDataModule(p=settings.p, batch_size=settings.batch_size, seed=seed)
    steps_per_epoch = math.ceil(len(datamodule.train_set) / settings.batch_size)
    return datamodule, settings.block or steps_per_epoch


def _model(settings: Settings, datamodule: ModularArithmeticDataModule, cls: type = GrokTransformer) -> Any:
    return cls(num_tokens=datamodule.num_tokens, dim=settings.dim)


def _fit(settings: Settings, model: pl.LightningModule, datamodule: Any, callbacks: list[Callback], steps: int) -> None:
    trainer = pl.Trainer(
        accelerator="gpu" if settings.device.type == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=datamodule)


class _KeyedGrokfastCallback(GrokfastCallback):
    """``GrokfastCallback`` with a ``state_key`` of its own, so that several can share one Trainer."""

    def __init__(self, key: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._key = key

    @property
    def state_key(self) -> str:
        return f"GrokfastCallback[{self._key}]"


def _ours_callback(spec: FilterSpec) -> GrokfastCallback:
    kwargs = dict(spec.ours)
    if spec.window:
        kwargs["warmup"] = False  # same work per step as a full window, from the first step
    return _KeyedGrokfastCallback(spec.key, **kwargs, enabled=False, log_stats=False)


def _reference_callback(spec: FilterSpec) -> ReferenceGrokfastCallback:
    assert spec.reference is not None
    kind = "ma" if spec.window else "ema"
    return ReferenceGrokfastCallback(kind, prefill=bool(spec.window), **spec.reference)


def run_trainer_section(settings: Settings) -> dict[str, Any]:
    """(a): whole training step through the Trainer: ours, then the published algorithm, then the anchors.

    Ours and the published algorithm run in separate fits: the published one allocates new tensors at every step
    and keeps its window alive, which would otherwise disturb the allocator for the no-filter blocks next to ours.
    """
    specs = filter_specs(settings.windows)
    result: dict[str, Any] = {"variants": {}}
    sessions = {
        "ours": {f"ours/{spec.key}": _ours_callback(spec) for spec in specs},
        "reference": {f"reference/{spec.key}": _reference_callback(spec) for spec in specs if spec.reference},
    }
    for session, callbacks in sessions.items():
        datamodule, block = _task(settings)
        model = _model(settings, datamodule)
        keys = list(callbacks)
        schedule = block_schedule(keys, settings.rounds, block)
        timer = BlockScheduleCallback(schedule, {key: _enabler(cb) for key, cb in callbacks.items()}, settings.device)
        print(f"[overhead] trainer/{session}: {len(keys)} variants x {settings.rounds} rounds x {block} steps")
        _fit(settings, model, datamodule, [*callbacks.values(), timer], len(schedule))
        variants = paired_ratios(schedule, timer.durations, keys)
        n_params = sum(p.numel() for p in model.parameters())
        for key, cb in callbacks.items():
            state = cb.state_bytes() if isinstance(cb, ReferenceGrokfastCallback) else cb.filters[0].state_bytes()
            variants[key]["state_bytes_per_param"] = state / n_params
        result["variants"].update(variants)
        result["block_steps"] = block
        callbacks.clear()
        gc.collect()
    if settings.anchors:
        result["anchors"] = run_trainer_anchors(settings)
    return result


def _enabler(callback: Any) -> Callable[[bool], None]:
    def toggle(on: bool) -> None:
        callback.enabled = on

    return toggle


def run_trainer_anchors(settings: Settings) -> dict[str, Any]:
    """GrokFastAdamW grokfast on / off, and GrokAdamW / torch AdamW, each in its own ``fit`` with block switching."""
    classes = _anchor_classes()
    if classes is None:
        return {}
    grokfast_adamw, grok_adamw = classes
    out: dict[str, Any] = {}
    hyper = {"lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 0.005}

    datamodule, block = _task(settings)
    model = _model(settings, datamodule, _OptimizerFromFactory)
    model.optimizer_factory = lambda params: grokfast_adamw(params, grokfast_alpha=0.98, grokfast_lamb=2.0, **hyper)

    def toggle_gfa(on: bool) -> None:
        optimizer = model.trainer.optimizers[0]
        (optimizer.turn_on_grokfast if on else optimizer.turn_off_grokfast)()

    schedule = block_schedule(["grokfast_pytorch"], settings.rounds, block)
    timer = BlockScheduleCallback(schedule, {"grokfast_pytorch": toggle_gfa}, settings.device)
    _fit(settings, model, datamodule, [timer], len(schedule))
    out["GrokFastAdamW on / off"] = paired_ratios(schedule, timer.durations, ["grokfast_pytorch"])["grokfast_pytorch"]

    datamodule, block = _task(settings)
    model = _model(settings, datamodule, _OptimizerFromFactory)
    model.optimizer_factory = lambda params: SwitchOptimizer(
        params,
        lambda ps: torch.optim.AdamW(ps, **hyper),
        lambda ps: grok_adamw(ps, alpha_init=0.98, lamb=2.0, gradient_clipping=0.0, **hyper),
    )

    def toggle_grokadamw(on: bool) -> None:
        model.trainer.optimizers[0].use_second = on

    schedule = block_schedule(["grokadamw"], settings.rounds, block)
    timer = BlockScheduleCallback(schedule, {"grokadamw": toggle_grokadamw}, settings.device)
    _fit(settings, model, datamodule, [timer], len(schedule))
    out["GrokAdamW / torch AdamW"] = paired_ratios(schedule, timer.durations, ["grokadamw"])["grokadamw"]
    return out


# ---------------------------------------------------------------------------------------------------- (a') loop
def run_loop_section(settings: Settings) -> dict[str, Any]:
    """The training step in a plain PyTorch loop: forward, backward, filter, Adam step, schedule step.

    As in ``trainer``, ours and the published algorithm run in separate loops (fresh model and optimizer each).
    """
    specs = filter_specs(settings.windows)
    result: dict[str, Any] = {"variants": {}}
    for session in ("ours", "reference"):
        datamodule, block = _task(settings)
        model = _model(settings, datamodule).to(settings.device)
        named = list(model.named_parameters())
        names, params = [n for n, _ in named], [p for _, p in named]
        hooks: dict[str, Callable[[], None]] = {}
        state_bytes: dict[str, Callable[[], int]] = {}
        for spec in specs:
            key = f"{session}/{spec.key}"
            if session == "ours":
                kwargs = dict(spec.ours)
                if spec.window:
                    kwargs["warmup"] = False  # same work per step as a full window, from the first step
                filt = GradientFilter(kwargs.pop("filter"), **kwargs)
                hooks[key], state_bytes[key] = _loop_filter_hook(filt, names, params), filt.state_bytes
            elif spec.reference is not None:
                hooks[key], state_bytes[key] = _loop_reference_hook(model, spec)
        keys = list(hooks)
        schedule = block_schedule(keys, settings.rounds, block)
        print(f"[overhead] loop/{session}: {len(keys)} variants x {settings.rounds} rounds x {block} steps")
        durations, hook_times = _plain_loop(settings, model, datamodule, schedule, hooks)
        variants = paired_ratios(schedule, durations, keys)
        for key in keys:  # the filter call alone, timed inside the loop
            variants[key]["filter_s"] = _median(hook_times[key])
            variants[key]["filter_share"] = variants[key]["filter_s"] / variants[key]["baseline_step_s"]
        n_params = sum(p.numel() for p in params)
        for key in keys:
            variants[key]["state_bytes_per_param"] = state_bytes[key]() / n_params
        result["variants"].update(variants)
        result["block_steps"] = block
        hooks.clear()
        gc.collect()
    return result


def _plain_loop(
    settings: Settings,
    model: GrokTransformer,
    datamodule: ModularArithmeticDataModule,
    schedule: Schedule,
    hooks: dict[str, Callable[[], None]],
) -> tuple[list[float], dict[str, list[float]]]:
    """Train for ``len(schedule)`` steps, calling the active hook between backward and the optimizer step.

    Returns:
        The duration of every step, and the durations of each hook's calls (warm-up round excluded).

    """
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    loader = datamodule.train_dataloader()
    batches = iter(loader)
    _sync(settings.device)
    stamps = [time.perf_counter()]
    hook_times: dict[str, list[float]] = {key: [] for key in hooks}
    for r, key in schedule:
        try:
            inputs, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            inputs, targets = next(batches)
        inputs, targets = inputs.to(settings.device), targets.to(settings.device)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        if key is not None:
            hook_s = _timed(hooks[key], settings.device)
            if r:
                hook_times[key].append(hook_s)
        optimizer.step()
        scheduler.step()
        _sync(settings.device)
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)], hook_times


def _loop_filter_hook(filt: GradientFilter, names: list[str], params: list[nn.Parameter]) -> Callable[[], None]:
    def hook() -> None:
        filt.step(names, [p.grad for p in params])

    return hook


def _loop_reference_hook(model: nn.Module, spec: FilterSpec) -> tuple[Callable[[], None], Callable[[], int]]:
    assert spec.reference is not None
    holder: dict[str, Any] = {"state": prefilled_ma_state(model, spec.window) if spec.window else None}

    def hook() -> None:
        if spec.window:
            holder["state"] = gradfilter_ma_reference(model, holder["state"], **spec.reference)
        else:
            holder["state"] = gradfilter_ema_reference(model, holder["state"], **spec.reference)

    return hook, lambda: reference_state_bytes(holder["state"])


# ---------------------------------------------------------------------------------------------------- (b), (c) large
class FlatModel(nn.Module):
    """Parameters in the shapes of a 4-layer transformer of width ``dim`` (about ``12 * dim**2`` per layer)."""

    def __init__(self, total: int, device: torch.device, layers: int = 4) -> None:
        super().__init__()
        dim = max(8, round(math.sqrt(total / (12 * layers)) / 8) * 8)
        shapes = {
            "qkv_weight": (3 * dim, dim),
            "qkv_bias": (3 * dim,),
            "proj_weight": (dim, dim),
            "proj_bias": (dim,),
            "norm1_weight": (dim,),
            "norm1_bias": (dim,),
            "fc1_weight": (4 * dim, dim),
            "fc1_bias": (4 * dim,),
            "fc2_weight": (dim, 4 * dim),
            "fc2_bias": (dim,),
            "norm2_weight": (dim,),
            "norm2_bias": (dim,),
        }
        generator = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterDict(
            {
                f"layer{i}_{name}": nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device))
                for i in range(layers)
                for name, shape in shapes.items()
            }
        )
        self.dim = dim


@dataclass
class GradBench:
    """Parameters with gradients and a pristine copy of the gradients, restored (and timed) before every call."""

    model: FlatModel
    device: torch.device
    pristine: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.pristine = [
            (torch.randn(p.shape, generator=generator) * 1e-3).to(self.device) for p in self.model.parameters()
        ]
        for p, g in zip(self.model.parameters(), self.pristine):
            p.grad = g.clone()

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.model.parameters()]

    def restore(self) -> None:
        torch._foreach_copy_(self.grads(), self.pristine)

    def measure(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(time of restoring the gradients with one ``foreach_copy_``, time of ``fn``)."""
        return _timed(self.restore, self.device), _timed(fn, self.device)


def _ours_filter(bench: GradBench, spec: FilterSpec, found_inf: bool) -> tuple[GradientFilter, Callable[[], Any]]:
    kwargs = dict(spec.ours)
    filt = GradientFilter(kwargs.pop("filter"), **kwargs)
    names = bench.names
    verdict = torch.zeros((), device=bench.device) if found_inf else None
    for _ in range(spec.window):  # fill the window (no amplification, gradients untouched)
        filt.step(names, bench.grads(), amplify=False, found_inf=torch.zeros((), device=bench.device))
    return filt, lambda: filt.step(names, bench.grads(), found_inf=verdict)


def _reference_filter(bench: GradBench, spec: FilterSpec) -> tuple[dict[str, Any], Callable[[], Any]]:
    assert spec.reference is not None
    holder: dict[str, Any] = {"state": prefilled_ma_state(bench.model, spec.window) if spec.window else None}
    function = gradfilter_ma_reference if spec.window else gradfilter_ema_reference

    def call() -> None:
        holder["state"] = function(bench.model, holder["state"], **spec.reference)

    return holder, call


def run_large_section(settings: Settings) -> dict[str, Any]:
    """(b) EMA filters alone / copy and (c) optimizer steps / AdamW on ``--params`` parameters, interleaved."""
    device = settings.device
    bench = GradBench(FlatModel(settings.params, device), device)
    ema = filter_specs(settings.windows)[0]
    numel = bench.numel
    print(f"[overhead] large: {numel / 1e6:.1f}M parameters in {len(bench.params)} tensors on {device}")
    adamw = torch.optim.AdamW(bench.params, lr=1e-5, weight_decay=0.01)
    ours, ours_step = _ours_filter(bench, ema, found_inf=False)
    ours_amp, ours_amp_step = _ours_filter(bench, ema, found_inf=True)
    ref_holder, ref_step = _reference_filter(bench, ema)

    def norm_pass() -> None:
        torch._foreach_norm(bench.grads())

    variants: dict[str, Callable[[], Any]] = {
        "filter/ours EMA (check)": ours_step,
        "filter/ours EMA (found_inf)": ours_amp_step,
        "filter/reference EMA": ref_step,
        "filter/foreach_norm pass": norm_pass,
        "optimizer/AdamW": adamw.step,
        "optimizer/ours EMA (check) + AdamW": lambda: (ours_step(), adamw.step()),
        "optimizer/ours EMA (found_inf) + AdamW": lambda: (ours_amp_step(), adamw.step()),
        "optimizer/reference EMA + AdamW": lambda: (ref_step(), adamw.step()),
    }
    anchor_optimizers: dict[str, torch.optim.Optimizer] = {}
    classes = _anchor_classes() if settings.anchors else None
    if classes is not None:
        grokfast_adamw, grok_adamw = classes
        gfa = grokfast_adamw(bench.params, lr=1e-5, weight_decay=0.01, grokfast_alpha=0.98, grokfast_lamb=2.0)
        gaw = grok_adamw(bench.params, lr=1e-5, weight_decay=0.01, alpha_init=0.98, lamb=2.0, gradient_clipping=0.0)
        anchor_optimizers = {"GrokFastAdamW on": gfa, "GrokAdamW": gaw}
        variants["optimizer/GrokFastAdamW off"] = lambda: (gfa.turn_off_grokfast(), gfa.step())
        variants["optimizer/GrokFastAdamW on"] = lambda: (gfa.turn_on_grokfast(), gfa.step())
        variants["optimizer/GrokAdamW"] = gaw.step

    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in variants}
    for r in range(settings.large_rounds + 2):  # rounds 0 and 1: warm-up (first steps allocate state)
        for key, fn in variants.items():
            copy_s, fn_s = bench.measure(fn)
            if r > 1:
                samples[key].append((copy_s, fn_s))

    def paired(key: str, reference: str) -> dict[str, float]:
        ratios = [a[1] / b[1] for a, b in zip(samples[key], samples[reference])]
        return {"ratio": _median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}

    out: dict[str, Any] = {
        "params": numel,
        "tensors": len(bench.params),
        "copy_s": _median([s[0] for key in samples for s in samples[key]]),
        "filters": {},
    }
    for key in variants:
        if key.startswith("filter/"):
            ratios = [fn_s / c_s for c_s, fn_s in samples[key]]
            out["filters"][key.removeprefix("filter/")] = {
                "time_s": _median([s[1] for s in samples[key]]),
                "copy_s": _median([s[0] for s in samples[key]]),
                "ratio_to_copy": _median(ratios),
                "ratio_to_copy_min": min(ratios),
                "ratio_to_copy_max": max(ratios),
            }
    adamw_bytes = optimizer_state_bytes(adamw)
    beyond_adamw = {
        "ours EMA (check) + AdamW": ours.state_bytes(),
        "ours EMA (found_inf) + AdamW": ours_amp.state_bytes(),
        "reference EMA + AdamW": reference_state_bytes(ref_holder["state"]),
        "GrokFastAdamW off": 0,
    }
    for name, optimizer in anchor_optimizers.items():
        beyond_adamw[name] = optimizer_state_bytes(optimizer) - adamw_bytes
    out["optimizer"] = {
        "AdamW_s": _median([s[1] for s in samples["optimizer/AdamW"]]),
        "AdamW_state_bytes_per_param": adamw_bytes / numel,
        "rows": {},
    }
    for key in variants:
        if key.startswith("optimizer/") and key != "optimizer/AdamW":
            name = key.removeprefix("optimizer/")
            out["optimizer"]["rows"][name] = {
                "time_s": _median([s[1] for s in samples[key]]),
                "to_adamw": paired(key, "optimizer/AdamW"),
                "state_bytes_per_param_beyond_adamw": beyond_adamw.get(name, math.nan) / numel,
            }
    if classes is not None:
        out["optimizer"]["rows"]["GrokFastAdamW on"]["to_own_off"] = paired(
            "optimizer/GrokFastAdamW on", "optimizer/GrokFastAdamW off"
        )
    return out


# ---------------------------------------------------------------------------------------------------- (b) window
def run_window_section(settings: Settings) -> dict[str, Any]:
    """Every filter alone / ``foreach_copy_`` on parameters sized so the largest window fits the memory budget."""
    device = settings.device
    largest = max(settings.windows)
    numel = min(settings.params, int(settings.ma_memory_gb * 1e9 / (4 * (largest + 1))))
    bench = GradBench(FlatModel(numel, device), device)
    numel = bench.numel
    print(f"[overhead] window: {numel / 1e6:.2f}M parameters, windows {settings.windows}, one filter at a time")
    out: dict[str, Any] = {"params": numel, "tensors": len(bench.params), "filters": {}}
    for spec in filter_specs(settings.windows):
        kinds: list[tuple[str, Callable[[], tuple[Any, Callable[[], Any]]]]] = [
            (f"ours {spec.key} (check)", lambda spec=spec: _ours_filter(bench, spec, found_inf=False)),
            (f"ours {spec.key} (found_inf)", lambda spec=spec: _ours_filter(bench, spec, found_inf=True)),
        ]
        if spec.reference is not None:
            kinds.append((f"reference {spec.key}", lambda spec=spec: _reference_filter(bench, spec)))
        for label, make in kinds:
            state, call = make()
            samples = [bench.measure(call) for _ in range(settings.window_iters + 2)][2:]
            ratios = [fn_s / c_s for c_s, fn_s in samples]
            held = state.state_bytes() if isinstance(state, GradientFilter) else reference_state_bytes(state["state"])
            out["filters"][label] = {
                "filter": spec.key,
                "time_s": _median([s[1] for s in samples]),
                "copy_s": _median([s[0] for s in samples]),
                "ratio_to_copy": _median(ratios),
                "ratio_to_copy_min": min(ratios),
                "ratio_to_copy_max": max(ratios),
                "state_bytes_per_param": held / numel,
            }
            del state, call
            gc.collect()  # free this filter's window before the next one
    return out


# ---------------------------------------------------------------------------------------------------- report
# The paper's latency per step (official code, GTX 1080 Ti, modular multiplication): no filter 0.15 s.
PAPER_STEP_RATIO = {"ema": 0.15 / 0.15, "ma": 0.37 / 0.15}


def headline_table(results: dict[str, Any], settings: Settings) -> list[str]:
    """One table with the paper, the published algorithm, ours and the anchors side by side."""
    small, large = settings.windows
    trainer = results.get("trainer", {})
    variants, anchors = trainer.get("variants", {}), trainer.get("anchors") or {}
    big = results.get("large", {})
    filters, rows = big.get("filters", {}), big.get("optimizer", {}).get("rows", {})

    def step(key: str) -> str:
        return _ratio_spread(variants.get(key)) if key in variants else "n/a"

    def copy(name: str) -> str:
        return _copy_spread(filters[name]) if name in filters else "n/a"

    def opt(name: str, which: str = "to_adamw") -> str:
        return _ratio_spread(rows[name][which]) if name in rows and which in rows[name] else "n/a"

    def state(key: str) -> str:
        return _fmt_bytes(variants[key].get("state_bytes_per_param")) if key in variants else "n/a"

    size = f"{big['params'] / 1e6:.0f}M" if big else "n/a"
    ema_ours = copy("ours EMA (check)") + " check; " + copy("ours EMA (found_inf)") + " found_inf"
    opt_ours = opt("ours EMA (check) + AdamW") + " check; " + opt("ours EMA (found_inf) + AdamW") + " found_inf"
    gfa_opt = opt("GrokFastAdamW on") + "; its own on / off " + opt("GrokFastAdamW on", "to_own_off")
    return [
        "**Side by side** (ratios; median and min-max over rounds)",
        "",
        "| figure | paper (official code, GPU) | published algorithm | lightning-grokfast | GrokFastAdamW"
        " | GrokAdamW |",
        "|---|---|---|---|---|---|",
        f"| EMA: training step / no filter (Trainer) | {PAPER_STEP_RATIO['ema']:.2f}x (0.15 s -> 0.15 s)"
        f" | {step('reference/ema')} | {step('ours/ema')} | {_ratio_spread(anchors.get('GrokFastAdamW on / off'))}"
        f" (grokfast on / off) | {_ratio_spread(anchors.get('GrokAdamW / torch AdamW'))} (/ torch AdamW) |",
        f"| MA w{small}: training step / no filter (Trainer) | {PAPER_STEP_RATIO['ma']:.2f}x (0.15 s -> 0.37 s)"
        f" | {step(f'reference/ma{small}')} | {step(f'ours/ma{small}')} | no MA | no MA |",
        f"| MA w{large}: training step / no filter (Trainer) | | {step(f'reference/ma{large}')}"
        f" | {step(f'ours/ma{large}')} | no MA | no MA |",
        f"| EMA filter alone / `foreach_copy_`, {size} params | | {copy('reference EMA')} | {ema_ours}"
        " | inside its step | inside its step |",
        f"| optimizer step with EMA / torch AdamW, {size} params | | {opt('reference EMA + AdamW')} (+ AdamW)"
        f" | {opt_ours} (+ AdamW) | {gfa_opt} | {opt('GrokAdamW')} |",
        f"| state bytes per parameter, EMA / MA w{small} / MA w{large} | | {state('reference/ema')} /"
        f" {state(f'reference/ma{small}')} / {state(f'reference/ma{large}')} | {state('ours/ema')} /"
        f" {state(f'ours/ma{small}')} / {state(f'ours/ma{large}')}"
        f" | {_fmt_bytes(rows.get('GrokFastAdamW on', {}).get('state_bytes_per_param_beyond_adamw'))}"
        f" | {_fmt_bytes(rows.get('GrokAdamW', {}).get('state_bytes_per_param_beyond_adamw'))} |",
        "",
    ]


def markdown(results: dict[str, Any], settings: Settings) -> str:
    """The README tables."""
    specs = filter_specs(settings.windows)
    lines: list[str] = headline_table(results, settings) if "trainer" in results or "large" in results else []
    for section, title in (
        ("trainer", "Training step of the paper's model through `Trainer.fit` (step with filter / step without)"),
        ("loop", "Training step of the paper's model in a plain PyTorch loop (step with filter / step without)"),
    ):
        if section not in results:
            continue
        variants = results[section]["variants"]
        base = statistics.median(v["baseline_step_s"] for v in variants.values())
        lines += [
            f"**{title}**, no-filter step {_fmt_ms(base)} (median of blocks; spread = min-max over rounds)",
            "",
            "| filter | ours | published algorithm | state bytes/param: ours | published |",
            "|---|---|---|---|---|",
        ]
        for spec in specs:
            ours, ref = variants.get(f"ours/{spec.key}"), variants.get(f"reference/{spec.key}")
            lines.append(
                f"| {spec.label} | {_ratio_spread(ours)} | {_ratio_spread(ref) if ref else 'n/a'} "
                f"| {_fmt_bytes(ours.get('state_bytes_per_param') if ours else None)} "
                f"| {_fmt_bytes(ref.get('state_bytes_per_param') if ref else None)} |"
            )
        if section == "loop":
            lines += [
                "",
                "Filter call alone, timed inside the loop, as a share of the no-filter step: "
                + ", ".join(
                    f"{key} {100 * row['filter_share']:.2f} %"
                    for key, row in variants.items()
                    if not math.isnan(row.get("filter_share", math.nan))
                ),
            ]
        anchors = results[section].get("anchors") or {}
        for name, row in anchors.items():
            lines.append(f"| anchor: {name} | {_ratio_spread(row)} | | | |")
        lines.append("")
    if "large" in results:
        large = results["large"]
        lines += [
            f"**Filter alone on {large['params'] / 1e6:.1f}M parameters / one `torch._foreach_copy_` of the same"
            f" gradients** (copy {_fmt_ms(large['copy_s'])})",
            "",
            "| variant | filter / copy (median, min-max) |",
            "|---|---|",
        ]
        for name, row in large["filters"].items():
            lines.append(f"| {name} | {_copy_spread(row)} |")
        lines += [
            "",
            f"**Optimizer step on {large['params'] / 1e6:.1f}M parameters / plain `torch.optim.AdamW` step**"
            f" (AdamW {_fmt_ms(large['optimizer']['AdamW_s'])}, its state"
            f" {_fmt_bytes(large['optimizer']['AdamW_state_bytes_per_param'])} bytes/param) and state beyond AdamW's",
            "",
            "| optimizer step | / AdamW (median, min-max over rounds) | state bytes/param beyond AdamW |",
            "|---|---|---|",
        ]
        for name, row in large["optimizer"]["rows"].items():
            extra = f"; on / off: {_ratio_spread(row['to_own_off'])}" if "to_own_off" in row else ""
            lines.append(
                f"| {name} | {_ratio_spread(row['to_adamw'])}{extra}"
                f" | {_fmt_bytes(row['state_bytes_per_param_beyond_adamw'])} |"
            )
        lines.append("")
    if "window" in results:
        window = results["window"]
        lines += [
            f"**Every filter alone on {window['params'] / 1e6:.2f}M parameters / one `torch._foreach_copy_`**"
            " (the largest window must fit in memory)",
            "",
            "| variant | filter / copy (median, min-max) | state bytes/param |",
            "|---|---|---|",
        ]
        for name, row in window["filters"].items():
            lines.append(f"| {name} | {_copy_spread(row)} | {_fmt_bytes(row['state_bytes_per_param'])} |")
        lines.append("")
    lines += targets_table(results, settings)
    return "\n".join(lines)


def _ratio_spread(row: dict[str, float] | None) -> str:
    if not row or math.isnan(row.get("ratio", math.nan)):
        return "n/a"
    return f"{row['ratio']:.3f}x ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})"


def _copy_spread(row: dict[str, float]) -> str:
    return f"{row['ratio_to_copy']:.2f}x ({row['ratio_to_copy_min']:.2f}-{row['ratio_to_copy_max']:.2f})"


def targets_table(results: dict[str, Any], settings: Settings) -> list[str]:
    """The issue's targets, each with the measured figure and whether it is met."""
    small, large = settings.windows
    rows: list[tuple[str, float | None, float]] = []
    for section in ("trainer", "loop"):
        if section in results:
            variants = results[section]["variants"]
            rows.append((f"EMA training step ({section}) <= 1.01x", variants["ours/ema"]["ratio"], 1.01))
            rows.append((f"MA w{small} training step ({section}) <= 1.02x", variants[f"ours/ma{small}"]["ratio"], 1.02))
    if "window" in results:
        filters = results["window"]["filters"]
        ratio = filters[f"ours ma{large} (check)"]["time_s"] / filters[f"ours ma{small} (check)"]["time_s"]
        rows.append((f"MA w{large} / w{small} filter time (window) <= 1.2x", ratio, 1.2))
    if "large" in results:
        filters = results["large"]["filters"]
        for name in ("ours EMA (check)", "ours EMA (found_inf)"):
            size = f"{results['large']['params'] / 1e6:.1f}M"
            rows.append((f"{name} / copy on {size} parameters <= 2.5x", filters[name]["ratio_to_copy"], 2.5))
    lines = ["**Targets**", "", "| target | measured | met |", "|---|---|---|"]
    for label, value, limit in rows:
        met = "n/a" if value is None or math.isnan(value) else ("yes" if value <= limit else "no")
        lines.append(f"| {label} | {_fmt_ratio(value)} | {met} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected sections, print the tables, write JSON and markdown."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (for the tests)")
    parser.add_argument("--rounds", type=int, help="A/B rounds of the training-step sections (default 20)")
    parser.add_argument("--params", type=int, help="parameters of the large section (default 50M)")
    parser.add_argument("--ma-memory-gb", type=float, help="memory for the largest window in `window` (default 6)")
    parser.add_argument("--large-rounds", type=int, help="interleaved rounds in `large` (default 10)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-anchors", action="store_true", help="leave out GrokFastAdamW and GrokAdamW")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    settings = Settings.smoke_settings(device) if args.smoke else Settings(device=device)
    for name in ("rounds", "params", "ma_memory_gb", "large_rounds"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.anchors = not args.no_anchors
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only add contention on a busy machine
    quiet_lightning()

    runners = {
        "trainer": run_trainer_section,
        "loop": run_loop_section,
        "large": run_large_section,
        "window": run_window_section,
    }
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for section in SECTIONS:
        if section in args.sections:
            section_start = time.perf_counter()
            results[section] = runners[section](settings)
            gc.collect()
            print(f"[overhead] {section} done in {time.perf_counter() - section_start:.0f} s")
    report = {
        "command": " ".join(["python", "benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(settings).items() if k != "device"} | {"device": str(device)},
        "environment": environment(settings.device),
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    table = markdown(results, settings)
    print()
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "overhead_smoke" if settings.smoke else "overhead"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out_dir / f"{stem}.md").write_text(f"<!-- {report['command']} -->\n{table}\n")
    print(f"[overhead] wrote {args.out_dir / stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
