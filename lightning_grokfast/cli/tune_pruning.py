"""The pruners of ``lightning-grokfast tune``, and the patience that protects a run about to grok.

Imported by :mod:`lightning_grokfast.cli.tune` once Optuna is known to be installed (extra ``[tune]``).
"""

from __future__ import annotations

import argparse
from typing import Any

import optuna
from optuna.study import StudyDirection

__all__ = ["StepPatientPruner", "make_pruner"]


class StepPatientPruner(optuna.pruners.BasePruner):
    """Lets ``wrapped`` prune only a run whose reported value has not improved for ``patience`` optimizer steps.

    Optuna's ``PatientPruner`` counts reports; a run validated every 10 steps would then get 100 steps of patience,
    one validated every 200 steps 2,000. Counted in optimizer steps (the step a value is reported at), the
    protection of a run on its grokking plateau does not depend on how often the config validates.

    Args:
        wrapped: the pruner that decides once the run has stalled (the median rule).
        patience: optimizer steps; the run may be pruned when its best value over the last ``patience`` steps is
            no better than its best before them. 0: ``wrapped`` alone.

    Raises:
        ValueError: If ``patience`` is negative.

    Example::

        pruner = StepPatientPruner(optuna.pruners.MedianPruner(n_warmup_steps=500), patience=500)
        study = optuna.create_study(direction="minimize", pruner=pruner)
    """

    def __init__(self, wrapped: optuna.pruners.BasePruner, patience: int) -> None:
        if patience < 0:
            raise ValueError(f"`patience` must be >= 0 optimizer steps, got {patience}.")
        self.wrapped = wrapped
        self.patience = patience

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether to prune ``trial`` now: it has stalled for ``patience`` steps and ``wrapped`` says so.

        Args:
            study: the study.
            trial: the running trial.

        Returns:
            ``True`` to prune.
        """
        values = trial.intermediate_values
        last = trial.last_step
        if self.patience and last is not None:
            before = [v for step, v in values.items() if step <= last - self.patience]
            recent = [v for step, v in values.items() if step > last - self.patience]
            if not before:  # not yet `patience` steps of history
                return False
            if study.direction == StudyDirection.MAXIMIZE:
                improved = max(recent) > max(before)
            else:
                improved = min(recent) < min(before)
            if improved:
                return False
        return self.wrapped.prune(study, trial)


def make_pruner(args: argparse.Namespace, fit_config: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The ``--pruner``; its warm-up and patience default to a quarter of the config's ``trainer.max_steps``.

    Args:
        args: the parsed ``tune`` arguments (``pruner``, ``prune_warmup_steps``, ``prune_patience``,
            ``prune_startup_trials``).
        fit_config: the study's fit config (for ``trainer.max_steps``).

    Returns:
        The pruner.

    Example::

        pruner = make_pruner(args, {"trainer": {"max_steps": 2000}})  # warm-up and patience 500 steps
    """
    if args.pruner == "none":
        return optuna.pruners.NopPruner()
    max_steps = int((fit_config.get("trainer") or {}).get("max_steps") or -1)
    quarter = max_steps // 4 if max_steps > 0 else 0
    warmup = quarter if args.prune_warmup_steps is None else args.prune_warmup_steps
    if args.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(warmup, 1), max_resource=max(max_steps, warmup + 1))
    median = optuna.pruners.MedianPruner(n_startup_trials=args.prune_startup_trials, n_warmup_steps=warmup)
    if args.pruner == "median":
        return median
    return StepPatientPruner(median, patience=quarter if args.prune_patience is None else args.prune_patience)
