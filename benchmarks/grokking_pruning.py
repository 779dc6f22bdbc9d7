"""Would a pruner have cut a run that was about to grok? Optuna's pruners replayed on the leaderboard's measured curves.

Every run of ``results/grokking_leaderboard.json`` (each row x seed of a task: no filter, Grokfast EMA, MA, ...,
anchors) becomes one trial of an in-memory Optuna study, in a random order. The trial reports what
``lightning-grokfast tune`` reports: at every validation step, the distance of the validation accuracy to the
target, and, once it reached the target, that value at the later validation steps up to its step cap. At each
report the pruner under test decides; a pruned trial stops there (and is stored as pruned, as in a real study).
Nothing is trained: the curves are the measured ones, so a pruner's decision is judged against what the run really
did next.

For each pruner and task, over ``--orders`` random trial orders: the optimizer steps spent (relative to no
pruning), the runs pruned, the runs pruned that would have reached the target ("cut before grokking"), and how
often the best run of the set was among them ("best lost").

    python benchmarks/grokking_pruning.py                # writes results/grokking_pruning.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lightning_grokfast.cli.tune_pruning import StepPatientPruner

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"modular": 0.95, "parity": 0.95, "digits": 0.9}


def pruners(cap: int) -> dict[str, optuna.pruners.BasePruner]:
    """The pruners compared (``cap``: the task's step cap; ``tune``'s default warm-up is a quarter of it).

    Hyperband is not among them: it keeps per-trial state in the storage, which this replay does not create.
    """
    median = optuna.pruners.MedianPruner
    patient = optuna.pruners.PatientPruner
    return {
        "median, no warm-up": median(n_startup_trials=5, n_warmup_steps=0),
        "median, warm-up cap/4": median(n_startup_trials=5, n_warmup_steps=cap // 4),
        "patient(10 validations) + median, no warm-up": patient(median(5, 0), patience=10),
        "patient(10 validations) + median, warm-up cap/4": patient(median(5, cap // 4), patience=10),
        "patient(20 validations) + median, warm-up cap/4": patient(median(5, cap // 4), patience=20),
        "patient(cap/4 steps) + median, warm-up cap/4 (tune's default)": StepPatientPruner(
            median(5, cap // 4), patience=cap // 4
        ),
    }


def trial_curve(run: dict[str, Any], target: float) -> tuple[dict[int, float], int | None]:
    """The distances a tune trial reports for ``run`` (filled up to its cap once reached), and its steps to target."""
    values: dict[int, float] = {}
    reached = None
    steps = [int(s) for s, _, _ in run["curve"]]
    for step, val, _ in run["curve"]:
        values[int(step)] = target - float(val)
        if val >= target:
            reached = int(step)
            break
    if reached is not None and len(steps) >= 2:
        for step in range(reached + steps[1] - steps[0], int(run["cap"]) + 1, steps[1] - steps[0]):
            values[step] = values[reached]
    return values, reached


def replay(runs: list[dict[str, Any]], target: float, pruner: optuna.pruners.BasePruner) -> dict[str, Any]:
    """One study over ``runs`` in the given order; what was spent and what was cut."""
    study = optuna.create_study(direction="minimize", pruner=pruner)
    spent = pruned = cut_before_grokking = 0
    values = []
    for number, run in enumerate(runs):
        curve, reached = trial_curve(run, target)
        cap = int(run["cap"])
        shortfall = min(1.0, max(0.0, min(curve.values()) / target))  # as tune's not-reached value
        value = float(reached) if reached is not None else cap * (1 + shortfall)
        seen: dict[int, float] = {}
        pruned_at = None
        for step in sorted(curve):
            seen[step] = curve[step]
            running = FrozenTrial(
                number=number,
                state=TrialState.RUNNING,
                value=None,
                datetime_start=datetime.datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values=dict(seen),
                trial_id=number,
            )
            if reached is not None and step >= reached:
                break  # the run stops at the target (no pruning decision there); later values are only reports
            if pruner.prune(study, running):
                pruned_at = step
                break
        if pruned_at is not None:
            pruned += 1
            spent += pruned_at
            cut_before_grokking += reached is not None
            study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values=dict(seen)))
        else:
            spent += reached if reached is not None else cap
            values.append(value)
            study.add_trial(optuna.trial.create_trial(value=value, intermediate_values=curve))
    best_all = min(float(r) if r is not None else math.inf for r in (trial_curve(run, target)[1] for run in runs))
    best_kept = min(values, default=math.inf)
    return {
        "spent": spent,
        "pruned": pruned,
        "cut_before_grokking": cut_before_grokking,
        "best_lost": best_kept > best_all,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Replay every pruner on every task's runs in ``--orders`` random orders; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=RESULTS / "grokking_leaderboard.json")
    parser.add_argument("--tasks", nargs="+", default=["modular", "parity"])
    parser.add_argument("--orders", type=int, default=20, help="random trial orders per pruner (default 20)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = json.loads(args.source.read_text())["runs"]
    rows = []
    for task in args.tasks:
        task_runs = [r for r in runs if r["task"] == task]
        target = TARGETS[task]
        cap = max(int(r["cap"]) for r in task_runs)
        full = sum(trial_curve(r, target)[1] or int(r["cap"]) for r in task_runs)
        reaching = sum(trial_curve(r, target)[1] is not None for r in task_runs)
        for name in pruners(cap):
            results = []
            for order in range(args.orders):
                shuffled = random.Random(order).sample(task_runs, len(task_runs))
                results.append(replay(shuffled, target, pruners(cap)[name]))
            n = len(results)
            rows.append(
                {
                    "task": task,
                    "pruner": name,
                    "runs": len(task_runs),
                    "runs_reaching_target": reaching,
                    "steps_spent_vs_no_pruning": sum(r["spent"] for r in results) / n / full,
                    "pruned_per_study": sum(r["pruned"] for r in results) / n,
                    "cut_before_grokking_per_study": sum(r["cut_before_grokking"] for r in results) / n,
                    "best_lost": f"{sum(r['best_lost'] for r in results)}/{n}",
                }
            )
            print(rows[-1], flush=True)
    command = " ".join(["python benchmarks/grokking_pruning.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"<!-- {command} -->",
        "| task | pruner | runs (reaching the target) | steps spent vs no pruning | pruned per study"
        " | of which would have reached the target | best run lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['pruner']} | {r['runs']} ({r['runs_reaching_target']}) |"
            f" {r['steps_spent_vs_no_pruning']:.0%} | {r['pruned_per_study']:.1f} |"
            f" {r['cut_before_grokking_per_study']:.1f} | {r['best_lost']} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "grokking_pruning.md").write_text(table)
    report = {"command": command, "orders": args.orders, "rows": rows}
    (args.out_dir / "grokking_pruning.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
