"""One trial of ``lightning-grokfast tune``: a ``fit`` of the config per seed, steps to the target, pruning reports.

The objective of a trial is the median over its seeds of the optimizer steps at which the monitored validation
metric first reaches the target. A seed that does not reach it by the end of its run counts
``cap * (1 + shortfall)``: ``cap`` is the run's step budget (``trainer.max_steps``) and ``shortfall`` in ``[0, 1]``
how far the best validation value stayed from the target, relative to it (``(target - best) / target`` for
``mode="max"``). Every such value lies above ``cap``, so a run that never reaches the target ranks behind every run
that does, and among those that do not, one that came closer ranks better (which gives the sampler a direction
where a constant penalty would give it a plateau); the worst possible value is ``2 * cap``.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from jsonargparse.typing import import_object
from lightning.pytorch.callbacks import Callback

from lightning_grokfast.cli.fit import TASK_TRAINER_DEFAULTS, TaskCLI

if TYPE_CHECKING:
    import optuna

__all__ = ["SeedOutcome", "TargetCallback", "TrialSpec", "not_reached_value", "run_seed"]

#: LightningCLI's warning when it gets ``args`` while ``sys.argv`` holds the tune command line (expected here).
ARGS_AND_ARGV = ".*args parameter is intended to run from within Python.*"

#: Trainer settings of every trial run (not of ``--export``): no logs, checkpoints, progress bars or summaries per
#: trial. Each applies where the config and the overrides leave the setting unset; a value they give wins.
QUIET_TRIAL: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a study measures (stored with the study; every worker must agree on it).

    Args:
        monitor: the validation metric in ``trainer.callback_metrics``.
        mode: ``"max"`` (higher is better) or ``"min"``.
        target: the value the metric must reach (``>=`` for max, ``<=`` for min).
        seeds: one fit per seed (``seed_everything`` and the datamodule's ``seed``); the objective is the median.

    Example::

        spec = TrialSpec(monitor="val_loss", mode="min", target=0.05, seeds=(0, 1, 2))
        spec.reached(0.04)  # True

    """

    monitor: str = "val_acc"
    mode: str = "max"
    target: float = 0.95
    seeds: tuple[int, ...] = (0,)

    def reached(self, value: float) -> bool:
        """Whether a value of the metric reaches the target.

        Args:
            value: a validation value of ``monitor``.

        Returns:
            ``value >= target`` in mode ``"max"``, ``value <= target`` in mode ``"min"``.
        """
        return value >= self.target if self.mode == "max" else value <= self.target

    def distance(self, value: float) -> float:
        """How far a value is from the target (the value reported to the pruners).

        Args:
            value: a validation value of ``monitor``.

        Returns:
            The distance, lower is better, ``<= 0`` once reached.
        """
        return self.target - value if self.mode == "max" else value - self.target


def not_reached_value(spec: TrialSpec, best: float, cap: int) -> float:
    """The objective value of a seed that did not reach the target: ``cap * (1 + shortfall)``, in ``(cap, 2*cap]``.

    Args:
        spec: the study's target and mode.
        best: the best validation value the run saw (``nan`` if none).
        cap: the run's step budget.

    Returns:
        ``cap * (1 + shortfall)``, ``shortfall = |target - best| / max(|target|, |best|)`` clipped to ``[0, 1]``
        (``1`` when ``best`` is not a finite number).

    Example::

        not_reached_value(TrialSpec(target=0.95), best=0.5, cap=1000)  # 1473.7: behind every run that reached it

    """
    if not math.isfinite(best):
        return 2.0 * cap
    scale = max(abs(spec.target), abs(best))
    shortfall = 1.0 if scale == 0 else min(1.0, max(0.0, spec.distance(best) / scale))
    return cap * (1.0 + shortfall)


@dataclass
class SeedOutcome:
    """One seed's fit: first step at the target (``None``: not reached), its step budget, best value, curve.

    Args:
        seed: the seed.
        steps: the first optimizer step at which the target was reached (``None``: not reached).
        cap: the step budget.
        best: the best validation value seen.
        steps_run: the optimizer steps run.
        seconds: training time.
        curve: ``(step, value)`` at each validation.

    Example::

        SeedOutcome(seed=0, steps=None, cap=1000, best=0.5, steps_run=1000, seconds=12.0).value(TrialSpec())

    """

    seed: int
    steps: int | None
    cap: int
    best: float
    steps_run: int
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)

    def value(self, spec: TrialSpec) -> float:
        """This seed's objective value.

        Args:
            spec: the study's target and mode.

        Returns:
            ``steps``, or :func:`not_reached_value` when the target was not reached.
        """
        return float(self.steps) if self.steps is not None else not_reached_value(spec, self.best, self.cap)


def median_value(outcomes: list[SeedOutcome], spec: TrialSpec) -> float:
    """The trial's objective: the median of its seeds' values."""
    return float(statistics.median(o.value(spec) for o in outcomes))


class TargetCallback(Callback):
    """Records the first step at which the monitored validation metric reaches the target, then stops the run.

    After every validation (the sanity check excepted) it reads ``trainer.callback_metrics[monitor]``. With a trial
    to report to, it reports :meth:`TrialSpec.distance` at ``trainer.global_step`` and stops the run when the
    trial's pruner says so. A run that reaches the target reports the value it reached at each later validation
    step up to its step budget (without running them): to a pruner, a finished run stays at the target instead of
    vanishing from the comparison at later steps.

    Args:
        spec: monitor, mode and target.
        trial: the Optuna trial to report to (``None``: no reports, no pruning).

    Raises:
        RuntimeError: (after the fit, from :func:`run_seed`) if the metric is missing or not finite.

    Example::

        trainer = L.Trainer(callbacks=[TargetCallback(TrialSpec(monitor="val_acc", target=0.95))])

    """

    def __init__(self, spec: TrialSpec, trial: optuna.Trial | None = None) -> None:
        self.spec = spec
        self.trial = trial
        self.steps: int | None = None
        self.best = math.nan
        self.curve: list[tuple[int, float]] = []
        self.pruned_at: int | None = None
        self.error: str | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        metrics = trainer.callback_metrics
        if self.spec.monitor not in metrics:
            self.error = f"`{self.spec.monitor}` is not among the logged metrics: {sorted(metrics)}."
            trainer.should_stop = True
            return
        value = float(metrics[self.spec.monitor])
        if not math.isfinite(value):
            self.error = f"`{self.spec.monitor}` is {value} at step {step}."
            trainer.should_stop = True
            return
        self.curve.append((step, value))
        if not math.isfinite(self.best) or self.spec.distance(value) < self.spec.distance(self.best):
            self.best = value
        if self.trial is not None:
            self.trial.report(self.spec.distance(value), step)
        if self.steps is None and self.spec.reached(value):
            self.steps = step
            trainer.should_stop = True
            self._report_rest(trainer, value)
        elif self.trial is not None and self.trial.should_prune():
            self.pruned_at = step
            trainer.should_stop = True

    def _report_rest(self, trainer: pl.Trainer, value: float) -> None:
        if self.trial is None or len(self.curve) < 2 or trainer.max_steps <= 0:
            return
        interval = self.curve[-1][0] - self.curve[-2][0]
        if interval <= 0:
            return
        for step in range(self.curve[-1][0] + interval, trainer.max_steps + 1, interval):
            self.trial.report(self.spec.distance(value), step)


def run_seed(config: dict[str, Any], spec: TrialSpec, seed: int, trial: optuna.Trial | None) -> SeedOutcome:
    """Fit ``config`` once with ``seed``, reporting to ``trial`` (if given) for pruning.

    Args:
        config: the trial's fit config (plain data, the ``grokfast`` group already set).
        spec: monitor, mode and target.
        seed: set as ``seed_everything`` and, when the datamodule takes a ``seed`` argument, as its ``seed``.
        trial: the trial to report the validation curve to, or ``None``.

    Returns:
        The seed's outcome.

    Raises:
        optuna.TrialPruned: If the trial's pruner stopped the run.
        KeyboardInterrupt: If the run was interrupted (Ctrl-C); the trial is then recorded as failed.
        RuntimeError: If the monitored metric is missing or not finite.

    Example::

        outcome = run_seed(fit_config, TrialSpec(target=0.9), seed=0, trial=None)
        outcome.steps  # first step at 90 % validation accuracy, or None

    """
    import optuna

    run_config = seeded(config, seed)
    trainer = dict(run_config.get("trainer") or {})
    run_config["trainer"] = {**trainer, **{k: v for k, v in QUIET_TRIAL.items() if trainer.get(k) is None}}
    if isinstance(run_config.get("dashboard"), dict):  # a figure per trial run would overwrite the last one
        run_config["dashboard"] = {**run_config["dashboard"], "enabled": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ARGS_AND_ARGV)
        cli = TaskCLI(
            args=run_config,
            run=False,
            trainer_defaults=TASK_TRAINER_DEFAULTS,
            save_config_callback=None,
            seed_everything_default=seed,
        )
    target = TargetCallback(spec, trial)
    cli.trainer.callbacks.append(target)  # type: ignore[attr-defined]  # (set by the callback connector)
    started = time.perf_counter()
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after a graceful shutdown
        if cli.trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if target.error is not None:
        raise RuntimeError(target.error)
    if target.pruned_at is not None:
        raise optuna.TrialPruned(f"pruned at step {target.pruned_at}")
    max_steps = cli.trainer.max_steps
    cap = max(max_steps, cli.trainer.global_step) if max_steps > 0 else cli.trainer.global_step
    return SeedOutcome(
        seed=seed,
        steps=target.steps,
        cap=cap,
        best=target.best,
        steps_run=cli.trainer.global_step,
        seconds=time.perf_counter() - started,
        curve=target.curve,
    )


def seeded(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """A copy of ``config`` with ``seed_everything: seed`` and the datamodule's ``seed`` (when it takes one)."""
    out = {**config, "seed_everything": seed}
    data = out.get("data")
    if isinstance(data, dict) and data.get("class_path"):
        try:
            takes_seed = "seed" in inspect.signature(import_object(data["class_path"])).parameters
        except (ImportError, AttributeError, TypeError, ValueError):
            takes_seed = False
        if takes_seed:
            out["data"] = {**data, "init_args": {**(data.get("init_args") or {}), "seed": seed}}
    return out
