"""Overhead section ``glue``: what the entry points cost around the filter maths, on the paper's model.

Three ways to filter the same gradients of ``GrokTransformer`` (29 tensors), each timed where it runs:

* ``filter``: ``GradientFilter.step(names, [p.grad for p in params])``, the maths with the least glue possible;
* ``callback``: ``GrokfastCallback.on_before_optimizer_step`` inside a real ``Trainer.fit``;
* ``hook``: the step pre-hook of ``attach_grokfast`` inside ``optimizer.step()`` of a plain loop.

Within one run the variants alternate step by step (A/B/A/B), so each sees the same caches and the same load;
every figure is a median over steps, and the headline is (entry point) / (filter) on alternating steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from overhead_common import Settings, filter_specs, median
from overhead_training import build_model, build_task, fit_steps
from torch import nn

from lightning_grokfast import GradientFilter, GrokfastCallback, attach_grokfast


class _Alternating(pl.Callback):
    """On even optimizer steps the Grokfast callback filters, on odd ones a bare ``GradientFilter`` does (timed)."""

    def __init__(self, callback: GrokfastCallback, bare: GradientFilter) -> None:
        self.callback, self.bare = callback, bare
        self.callback_s: list[float] = []
        self.filter_s: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step % 2 == 0:
            start = time.perf_counter()
            self.callback.on_before_optimizer_step(trainer, pl_module, optimizer)
            self.callback_s.append(time.perf_counter() - start)
        else:
            names, params = self._named(pl_module)
            start = time.perf_counter()
            self.bare.step(names, [p.grad for p in params])
            self.filter_s.append(time.perf_counter() - start)

    def _named(self, module: nn.Module) -> tuple[tuple[str, ...], list[nn.Parameter]]:
        if not hasattr(self, "_names"):
            named = list(module.named_parameters())
            self._names, self._params = tuple(n for n, _ in named), [p for _, p in named]
        return self._names, self._params


def _filter_kwargs(spec_ours: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(spec_ours)
    if kwargs["filter"] != "ema":
        kwargs["warmup"] = False  # a full window's work from the first step
    return kwargs


def run_callback(settings: Settings, kwargs: dict[str, Any], steps: int) -> dict[str, float]:
    """The callback's hook against a bare filter step, alternating steps of one ``Trainer.fit``."""
    datamodule, _ = build_task(settings)
    model = build_model(settings, datamodule)
    callback = GrokfastCallback(**kwargs, log_stats=False)
    timer = _Alternating(callback, GradientFilter(**kwargs))
    fit_steps(settings, model, datamodule, [timer], steps)
    skip = min(10, steps // 4)  # the first steps allocate state
    return _summary(timer.callback_s[skip:], timer.filter_s[skip:])


def run_hook(settings: Settings, kwargs: dict[str, Any], steps: int) -> dict[str, float]:
    """``attach_grokfast``'s pre-hook against a bare filter step, alternating steps of a plain loop."""
    datamodule, _ = build_task(settings)
    model = build_model(settings, datamodule).to(settings.device)
    named = list(model.named_parameters())
    names, params = tuple(n for n, _ in named), [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    stamps: list[float] = []
    optimizer.register_step_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    handle = attach_grokfast(optimizer, model=model, **kwargs)
    optimizer.register_step_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    bare = GradientFilter(**kwargs)
    hook_s: list[float] = []
    filter_s: list[float] = []
    loader = datamodule.train_dataloader()
    batches = iter(loader)
    for step in range(steps):
        try:
            inputs, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            inputs, targets = next(batches)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs.to(settings.device)), targets.to(settings.device)).backward()
        handle.enabled = step % 2 == 0
        stamps.clear()
        if not handle.enabled:
            start = time.perf_counter()
            bare.step(names, [p.grad for p in params])
            filter_s.append(time.perf_counter() - start)
        optimizer.step()
        if handle.enabled:
            hook_s.append(stamps[1] - stamps[0])
    handle.remove()
    skip = min(10, steps // 4)
    return _summary(hook_s[skip:], filter_s[skip:])


def _summary(entry_s: list[float], filter_s: list[float]) -> dict[str, float]:
    return {
        "entry_s": median(entry_s),
        "filter_s": median(filter_s),
        "ratio": median(entry_s) / median(filter_s),
        "glue_s": median(entry_s) - median(filter_s),
        "steps": len(entry_s),
    }


def run_glue_section(settings: Settings) -> dict[str, Any]:
    """EMA and MA (window ``settings.windows[0]``): callback / filter and hook / filter on the paper's model."""
    steps = settings.glue_steps
    out: dict[str, Any] = {"steps": steps, "variants": {}}
    runners: dict[str, Callable[[Settings, dict[str, Any], int], dict[str, float]]] = {
        "callback": run_callback,
        "hook": run_hook,
    }
    for spec in filter_specs(settings.windows)[:2]:
        for entry, runner in runners.items():
            print(f"[overhead] glue: {entry} / filter, {spec.key}, {steps} steps")
            row = runner(settings, _filter_kwargs(spec.ours), steps)
            out["variants"][f"{entry}/{spec.key}"] = {"label": spec.label, **row}
    return out
