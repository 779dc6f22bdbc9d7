"""The candidate rules of the safe-default study (``safe_default.py --rules``).

Every rule is a :class:`grokking_common.Method`: a GrokfastCallback setting, optionally with the library's
:class:`~lightning_grokfast.GrokkingDetectorCallback` steering ``lamb`` (boost at grokking, back-off at unstable
training), or with :class:`GapScaledLamb`, a measured and rejected candidate kept so its figures can be re-run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
from grokking_common import AUTO_ROW, BACKOFF, EMA_MA, MA, SHARED_ROWS, Method
from lightning.pytorch.callbacks import Callback
from suite_tasks import DETECTOR

from lightning_grokfast import GrokfastCallback
from lightning_grokfast.callbacks.auto import AUTO_FILTER
from lightning_grokfast.callbacks.tracking import TrainMetricTracker


class GapScaledLamb(Callback):
    """After memorization, ``lamb`` and ``ma_lamb`` = their first values x ``min(1, gap / peak gap) ** power``
    (or x 0 once that ratio is below ``cut``), never raised again.

    ``gap`` is ``train - val`` after each validation (the train value the mean since the previous one); the peak is
    the largest gap since the train value first reached ``memorized``. Before that, the amplification is unchanged.
    """

    def __init__(
        self, grokfast: GrokfastCallback, memorized: float = 0.99, power: float = 1.0, cut: float | None = None
    ) -> None:
        self.grokfast, self.memorized, self.power, self.cut = grokfast, memorized, power, cut
        self.scale = 1.0
        self.first = (grokfast.lamb, grokfast.ma_lamb)
        self.peak: float | None = None
        self.tracker = TrainMetricTracker()
        self.tracker.watch("train_acc")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.tracker.record(trainer.global_step, trainer.callback_metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train = TrainMetricTracker.mean(self.tracker.flush(trainer.global_step), "train_acc")
        val = trainer.callback_metrics.get("val_acc")
        if train is None or val is None or (self.peak is None and train < self.memorized):
            return
        gap = max(0.0, train - float(val))
        self.peak = max(gap, self.peak or 0.0)
        ratio = min(1.0, gap / self.peak) if self.peak > 0 else 0.0
        scale = (0.0 if ratio < self.cut else 1.0) if self.cut is not None else ratio**self.power
        self.scale = min(self.scale, scale)  # never raised again: a dip of validation must not re-amplify
        self.grokfast.lamb, self.grokfast.ma_lamb = self.first[0] * self.scale, self.first[1] * self.scale


@dataclasses.dataclass(frozen=True)
class GapScaled:
    """The ``extra`` of a :class:`GapScaledLamb` rule (a callable of the row's GrokfastCallback)."""

    power: float = 1.0
    memorized: float = 0.99
    cut: float | None = None

    def __call__(self, grokfast: GrokfastCallback) -> list[Callback]:
        return [GapScaledLamb(grokfast, self.memorized, self.power, self.cut)]


class LambWarmup(Callback):
    """``lamb`` and ``ma_lamb`` rise linearly from 0 to their values over the first ``steps`` optimizer steps.

    It composes with the detector's back-off: a change of ``lamb`` made by another callback between two steps
    scales the value the ramp climbs to.
    """

    def __init__(self, grokfast: GrokfastCallback, steps: int) -> None:
        self.grokfast, self.steps = grokfast, steps
        self.target = (grokfast.lamb, grokfast.ma_lamb)
        self.set: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        current = (self.grokfast.lamb, self.grokfast.ma_lamb)
        if self.set is not None and current != self.set:  # another callback changed lamb: keep its scaling
            self.target = tuple(t * c / s if s else t for t, c, s in zip(self.target, current, self.set))
        ramp = min(1.0, trainer.global_step / self.steps)
        self.set = (self.target[0] * ramp, self.target[1] * ramp)
        self.grokfast.lamb, self.grokfast.ma_lamb = self.set


@dataclasses.dataclass(frozen=True)
class Warmup:
    """The ``extra`` of a :class:`LambWarmup` rule."""

    steps: int

    def __call__(self, grokfast: GrokfastCallback) -> list[Callback]:
        return [LambWarmup(grokfast, self.steps)]


RULES: dict[str, Method] = {
    m.name: m
    for m in (
        *SHARED_ROWS,
        AUTO_ROW,
        Method("ema_ma_guard", "EMA+MA + divergence guard (ratio 1)", grokfast={**EMA_MA, "max_amplified_ratio": 1.0}),
        Method("ema_ma_backoff", "EMA+MA, lamb x0.25 at grokking", grokfast=EMA_MA, detector={"lambda_boost": 0.25}),
        Method("ma_gap", "MA, lamb x gap / peak gap", grokfast=MA, extra=GapScaled()),
        Method("ema_ma_gap", "EMA+MA, lamb x gap / peak gap", grokfast=EMA_MA, extra=GapScaled()),
        Method("ma_gap2", "MA, lamb x (gap / peak gap)^2", grokfast=MA, extra=GapScaled(2.0)),
        Method("ma_cut", "MA, off once gap < peak gap / 2", grokfast=MA, extra=GapScaled(cut=0.5)),
        Method("ema_ma_cut", "EMA+MA, off once gap < peak gap / 2", grokfast=EMA_MA, extra=GapScaled(cut=0.5)),
        Method("auto_w50", "auto with window 50", grokfast={**AUTO_FILTER, "window_size": 50}, detector=BACKOFF),
        Method("auto_warm", "auto, lamb warm-up over 1,000 steps", grokfast=AUTO_FILTER, detector=BACKOFF,
               extra=Warmup(1000)),
        Method("ema_ma_unstable", "EMA+MA, lamb x0.5 at each train drop", grokfast=EMA_MA, detector=BACKOFF),
    )
}  # fmt: skip


def rule_for(rule: Method, task: str) -> Method:
    """``rule`` with the task's detector thresholds (and memorization threshold), if it uses them."""
    if task not in DETECTOR:
        return rule
    if isinstance(rule.extra, GapScaled):
        extra = dataclasses.replace(rule.extra, memorized=DETECTOR[task]["memorization_threshold"])
        rule = dataclasses.replace(rule, extra=extra)
    if rule.detector is not None:
        rule = dataclasses.replace(rule, detector={**rule.detector, **DETECTOR[task]})
    return rule
