"""Overhead sections (a) and (a'): a training step of the paper's model, through the Trainer and in a plain loop."""

from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from overhead_common import (
    BlockScheduleCallback,
    FilterSpec,
    OptimizerFromFactory,
    Schedule,
    Settings,
    SwitchOptimizer,
    anchor_classes,
    block_schedule,
    filter_specs,
    median,
    paired_ratios,
    sync,
    timed,
)
from reference import (
    ReferenceGrokfastCallback,
    gradfilter_ema_reference,
    gradfilter_ma_reference,
    prefilled_ma_state,
    reference_state_bytes,
)
from torch import nn

from lightning_grokfast import GradientFilter, GrokfastCallback
from lightning_grokfast.tasks import GrokTransformer, ModularArithmeticDataModule


# ---------------------------------------------------------------------------------------------------- (a) trainer
def build_task(settings: Settings, seed: int = 0) -> tuple[ModularArithmeticDataModule, int]:
    pl.seed_everything(seed, verbose=False)
    datamodule = ModularArithmeticDataModule(p=settings.p, batch_size=settings.batch_size, seed=seed)
    steps_per_epoch = math.ceil(len(datamodule.train_set) / settings.batch_size)
    return datamodule, settings.block or steps_per_epoch


def build_model(settings: Settings, datamodule: ModularArithmeticDataModule, cls: type = GrokTransformer) -> Any:
    return cls(num_tokens=datamodule.num_tokens, dim=settings.dim)


def fit_steps(
    settings: Settings, model: pl.LightningModule, datamodule: Any, callbacks: list[Callback], steps: int
) -> None:
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


class KeyedGrokfastCallback(GrokfastCallback):
    """``GrokfastCallback`` with a ``state_key`` of its own, so that several can share one Trainer."""

    def __init__(self, key: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._key = key

    @property
    def state_key(self) -> str:
        return f"GrokfastCallback[{self._key}]"


def ours_callback(spec: FilterSpec) -> GrokfastCallback:
    kwargs = dict(spec.ours)
    if spec.window:
        kwargs["warmup"] = False  # same work per step as a full window, from the first step
    return KeyedGrokfastCallback(spec.key, **kwargs, enabled=False, log_stats=False)


def compiled_callbacks(settings: Settings) -> dict[str, GrokfastCallback]:
    """The EMA with ``compile=True`` (its first enabled block, in the warm-up round, compiles)."""
    if not settings.compile:
        return {}
    ema = filter_specs(settings.windows)[0]
    return {
        "ours/ema_compile": KeyedGrokfastCallback(
            "ema_compile", **ema.ours, compile=True, enabled=False, log_stats=False
        )
    }


def reference_callback(spec: FilterSpec) -> ReferenceGrokfastCallback:
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
        "ours": {f"ours/{spec.key}": ours_callback(spec) for spec in specs} | compiled_callbacks(settings),
        "reference": {f"reference/{spec.key}": reference_callback(spec) for spec in specs if spec.reference},
    }
    for session, callbacks in sessions.items():
        datamodule, block = build_task(settings)
        model = build_model(settings, datamodule)
        keys = list(callbacks)
        schedule = block_schedule(keys, settings.rounds, block)
        timer = BlockScheduleCallback(schedule, {key: enabler(cb) for key, cb in callbacks.items()}, settings.device)
        print(f"[overhead] trainer/{session}: {len(keys)} variants x {settings.rounds} rounds x {block} steps")
        fit_steps(settings, model, datamodule, [*callbacks.values(), timer], len(schedule))
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


def enabler(callback: Any) -> Callable[[bool], None]:
    def toggle(on: bool) -> None:
        callback.enabled = on

    return toggle


def run_trainer_anchors(settings: Settings) -> dict[str, Any]:
    """GrokFastAdamW grokfast on / off, and GrokAdamW / torch AdamW, each in its own ``fit`` with block switching."""
    classes = anchor_classes()
    if classes is None:
        return {}
    grokfast_adamw, grok_adamw = classes
    out: dict[str, Any] = {}
    hyper = {"lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 0.005}

    datamodule, block = build_task(settings)
    model = build_model(settings, datamodule, OptimizerFromFactory)
    model.optimizer_factory = lambda params: grokfast_adamw(params, grokfast_alpha=0.98, grokfast_lamb=2.0, **hyper)

    def toggle_gfa(on: bool) -> None:
        optimizer = model.trainer.optimizers[0]
        (optimizer.turn_on_grokfast if on else optimizer.turn_off_grokfast)()

    schedule = block_schedule(["grokfast_pytorch"], settings.rounds, block)
    timer = BlockScheduleCallback(schedule, {"grokfast_pytorch": toggle_gfa}, settings.device)
    fit_steps(settings, model, datamodule, [timer], len(schedule))
    out["GrokFastAdamW on / off"] = paired_ratios(schedule, timer.durations, ["grokfast_pytorch"])["grokfast_pytorch"]

    datamodule, block = build_task(settings)
    model = build_model(settings, datamodule, OptimizerFromFactory)
    model.optimizer_factory = lambda params: SwitchOptimizer(
        params,
        lambda ps: torch.optim.AdamW(ps, **hyper),
        lambda ps: grok_adamw(ps, alpha_init=0.98, lamb=2.0, gradient_clipping=0.0, **hyper),
    )

    def toggle_grokadamw(on: bool) -> None:
        model.trainer.optimizers[0].use_second = on

    schedule = block_schedule(["grokadamw"], settings.rounds, block)
    timer = BlockScheduleCallback(schedule, {"grokadamw": toggle_grokadamw}, settings.device)
    fit_steps(settings, model, datamodule, [timer], len(schedule))
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
        datamodule, block = build_task(settings)
        model = build_model(settings, datamodule).to(settings.device)
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
                hooks[key], state_bytes[key] = loop_filter_hook(filt, names, params), filt.state_bytes
            elif spec.reference is not None:
                hooks[key], state_bytes[key] = loop_reference_hook(model, spec)
        keys = list(hooks)
        schedule = block_schedule(keys, settings.rounds, block)
        print(f"[overhead] loop/{session}: {len(keys)} variants x {settings.rounds} rounds x {block} steps")
        durations, hook_times = plain_loop(settings, model, datamodule, schedule, hooks)
        variants = paired_ratios(schedule, durations, keys)
        for key in keys:  # the filter call alone, timed inside the loop
            variants[key]["filter_s"] = median(hook_times[key])
            variants[key]["filter_share"] = variants[key]["filter_s"] / variants[key]["baseline_step_s"]
        n_params = sum(p.numel() for p in params)
        for key in keys:
            variants[key]["state_bytes_per_param"] = state_bytes[key]() / n_params
        result["variants"].update(variants)
        result["block_steps"] = block
        hooks.clear()
        gc.collect()
    return result


def plain_loop(
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
    sync(settings.device)
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
            hook_s = timed(hooks[key], settings.device)
            if r:
                hook_times[key].append(hook_s)
        optimizer.step()
        scheduler.step()
        sync(settings.device)
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)], hook_times


def loop_filter_hook(filt: GradientFilter, names: list[str], params: list[nn.Parameter]) -> Callable[[], None]:
    def hook() -> None:
        filt.step(names, [p.grad for p in params])

    return hook


def loop_reference_hook(model: nn.Module, spec: FilterSpec) -> tuple[Callable[[], None], Callable[[], int]]:
    assert spec.reference is not None
    holder: dict[str, Any] = {"state": prefilled_ma_state(model, spec.window) if spec.window else None}

    def hook() -> None:
        if spec.window:
            holder["state"] = gradfilter_ma_reference(model, holder["state"], **spec.reference)
        else:
            holder["state"] = gradfilter_ema_reference(model, holder["state"], **spec.reference)

    return hook, lambda: reference_state_bytes(holder["state"])
