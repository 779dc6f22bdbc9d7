"""Leaderboard: every method at matched weight decay on every built-in task, steps and time to the target accuracy.

Tasks (``--tasks``; model, data and weight decay in ``grokking_common.TASKS``, and the suite's in ``suite_tasks``):

``modular``  ``x*y mod 97``, the paper's transformer, Adam with coupled weight decay 0.005, target 95 %.
``parity``   sparse parity n=30 k=3 with 1,000 training examples, a 512-wide MLP, AdamW weight decay 1, target 95 %.
``digits``   scikit-learn's digits with 500 training images, a 2x200 MLP with a x16 initialisation (Omnigrok),
             AdamW weight decay 1, target 90 % (the MLP's ceiling with 500 images is about 95 %).
``s5``, ``mnist1d``, ``regression``: the task suite of ``docs/tasks-suite.md`` (targets 90 %, 40 %, a validation MSE
             of 0.05); not run by default, and only the Grokfast rows and ``none`` make sense on the regression.

Rows (``--methods``): no filter; Grokfast EMA (the paper's setting for the kind of task: alpha 0.98 lamb 2, or
its MNIST setting alpha 0.8 lamb 0.1 on digits); MA (window 100, lamb 5); EMA+MA (both terms); EMA with the
detector's boost (lamb x1.5 once grokking is detected, at most 4); the anchors GrokFastAdamW and GrokAdamW
(``pip install -e .[bench]``; their weight decay is decoupled); ⊥Grad alone and EMA + ⊥Grad (rows that need
``GrokfastCallback(orthogonal=...)``, ``filter="none"``: skipped with a message where the callback lacks them);
StableMax cross-entropy without weight decay and without filter; ``auto`` (``auto_grokfast``: MA with its
``lamb`` halved whenever training becomes unstable, see ``safe_default.py``). Every row of a task uses the task's weight
decay, except the StableMax row (0, its point).

Each run is a ``Trainer.fit`` that validates every few steps (the task's interval) and stops at the target or the
task's cap. ``--seeds`` (default 0 1 2); ``--smoke`` for the tests. Every run is a trial of the task's study
``leaderboard-<task>`` in the Optuna storage ``--storage`` (default ``benchmarks/results/grokking.db``, see
``grokking_store.py``): a cell (row, seed) already finished there is not run again, so an interrupted invocation
resumes where it stopped, the grid can be run piecewise (``--methods none ema --seeds 1 2``), and several
processes can share it. The table ``<stem>.md``, the JSON export ``<stem>.json`` and the figures
``<stem>_steps_<task>.png`` and ``<stem>_curves.png`` (stem ``grokking_leaderboard`` by default) are made from
everything in the storage for ``--tasks`` (``--table-only``: nothing trained). ``--migrate`` adds the runs of JSON
reports of earlier versions or of ``safe_default.py`` (its runs of the rows here).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, quiet_lightning
from grokking_common import (
    AUTO_ROW,
    RESULTS,
    SHARED_ROWS,
    TASKS,
    Method,
    Settings,
    add_checkpoint_arguments,
    cell,
    missing_requirement,
    paired_speedups,
    row_commands,
    run_one,
    speedup,
    summarize_marks,
)
from grokking_store import finished_runs, migrate, open_study, run_cells
from safe_default_rules import rule_for
from suite_tasks import SUITE

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *SHARED_ROWS,
        Method("ema_detector", "EMA + detector boost", grokfast="ema", detector={"lambda_boost": 1.5, "max_lamb": 4.0}),
        Method("grokfastadamw", "GrokFastAdamW (grokfast-pytorch)", anchor="grokfastadamw"),
        Method("grokadamw", "GrokAdamW (grokadamw)", anchor="grokadamw"),
        Method("orthograd", "⊥Grad alone", grokfast={"filter": "none", "orthogonal": True}, needs=("orthogonal",)),
        Method("ema_orthograd", "Grokfast EMA + ⊥Grad", grokfast="ema_orthogonal", needs=("orthogonal",)),
        Method("stablemax_wd0", "StableMax loss, wd 0, no filter", loss="stablemax", weight_decay=0.0),
        AUTO_ROW,
    )
}


def markdown(summary: dict[str, dict[str, Any]], commands: dict[str, str]) -> str:
    """One table: per task and row, seeds, steps and time to the target, runs that reached it, speed-up."""
    lines = [
        "| task | row | wd | seeds | steps to target | time to target | reached | speed-up vs no filter (medians)"
        " | per seed | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task_name, rows in summary.items():
        task = SUITE[task_name]
        target = str(task.marks[-1])
        base = rows.get("none")
        for name, entry in rows.items():
            method, mark, cap = METHODS[name], entry["marks"][target], entry["cap"]
            weight_decay = task.weight_decay if method.weight_decay is None else method.weight_decay
            ratio = speedup(base, mark["steps_median"], target) if name != "none" else ""
            per_seed = paired_speedups(base, entry, target) if name != "none" else ""
            lines.append(
                f"| {task_name} ({_mark(float(target))}) | {method.label} | {weight_decay:g}"
                f" | {' '.join(map(str, entry['seeds']))} | {cell(mark, cap)} | {cell(mark, cap, 'seconds')}"
                f" | {mark['reached']}/{len(entry['seeds'])} | {ratio} | {per_seed}"
                f" | {commands.get(f'{task_name}/{name}', '')} |"
            )
    return "\n".join([*lines, ""])


def _mark(target: float) -> str:
    """``95%``, or ``MSE 0.05`` for a negated error (the regression's)."""
    return f"MSE {-target:g}" if target < 0 else f"{target:.0%}"


def plot(runs: list[dict[str, Any]], tasks: list[str], path: Path) -> list[Path]:
    """Per task, steps to the target by row with every seed (``<stem>_steps_<task>.png``), and a few curves
    (``<stem>_curves.png``); see ``figures.py``."""
    from figures import leaderboard_figures

    labels = {name: method.label for name, method in METHODS.items()}
    targets = {name: SUITE[name].marks[-1] for name in tasks}
    return leaderboard_figures(runs, labels, targets, path.parent, prefix=f"{path.stem}_")


def study_name(task: str, mode: str) -> str:
    """The leaderboard study of ``task`` in the storage (``-smoke``: the tests' tiny runs, kept apart)."""
    return f"leaderboard-{task}" + ("" if mode == "full" else f"-{mode}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the cells of tasks x methods x seeds missing from the storage; write the table and figure from it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(SUITE), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps (for the tests)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--table-only", action="store_true", help="train nothing; tabulate the storage")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<out-dir>/grokking.db)")
    parser.add_argument("--migrate", nargs="+", type=Path, default=[], help="add the runs of these JSON reports")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="file name stem (default grokking_leaderboard[_smoke])")
    add_checkpoint_arguments(parser)
    args = parser.parse_args(argv)

    settings = Settings(
        mode="smoke" if args.smoke else "full",
        seeds=args.seeds,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
    )
    if args.smoke:
        settings.max_steps, settings.val_every, settings.seeds = 8, 4, [0]
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    quiet_lightning()
    stem = args.stem or ("grokking_leaderboard_smoke" if args.smoke else "grokking_leaderboard")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{args.out_dir.resolve() / 'grokking.db'}"
    studies = {task: open_study(storage, study_name(task, settings.mode)) for task in SUITE}
    command = " ".join(["python benchmarks/grokking_leaderboard.py", *(argv if argv is not None else sys.argv[1:])])
    for path in args.migrate:
        report = json.loads(path.read_text())
        for task, study in studies.items():
            runs = [{"command": report["command"], **r} for r in report["runs"] if r["task"] == task]
            runs = [r for r in runs if r["config"] in METHODS]  # a study's other rules (safe_default.py) stay out
            print(f"[grokking] {path.name}: {migrate(study, runs, str(SUITE[task].marks[-1]))} {task} runs added")
    started = time.perf_counter()

    def run(task_name: str, name: str, seed: int) -> dict[str, Any]:
        return {**run_one(SUITE[task_name], rule_for(METHODS[name], task_name), seed, settings), "command": command}

    for task_name in [] if args.table_only else args.tasks:
        methods = []
        for name in args.methods:
            why = missing_requirement(METHODS[name])
            if why:
                print(f"[grokking] SKIPPING {name}: {why}", flush=True)
            else:
                methods.append(name)
        cells = [(name, seed) for name in methods for seed in settings.seeds]
        target = str(SUITE[task_name].marks[-1])
        try:
            run_cells(studies[task_name], cells, functools.partial(run, task_name), target)
        except KeyboardInterrupt as stop:
            raise SystemExit(f"[grokking] {stop}; the finished runs are in {storage}, run again to go on") from None
    runs = [run for task in args.tasks for run in finished_runs(studies[task]).values()]
    report = _report(runs, command, settings, started)
    table = markdown(report["summary"], row_commands(runs, lambda r: f"{r['task']}/{r['config']}"))
    print(f"\n{table}")
    (args.out_dir / f"{stem}.md").write_text(f"<!-- {command} -->\n{table}")
    plot(runs, list(report["summary"]), args.out_dir / f"{stem}.png")
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[grokking] wrote {stem}.md, {stem}.json and {stem}_*.png from {storage}")
    return report


def _report(runs: list[dict[str, Any]], command: str, settings: Settings, started: float) -> dict[str, Any]:
    summary: dict[str, dict[str, Any]] = {}
    for task_name, task in SUITE.items():
        for name in METHODS:
            rows = [r for r in runs if r["task"] == task_name and r["config"] == name]
            if rows:
                summary.setdefault(task_name, {})[name] = summarize_marks(rows, task.marks)
    return {
        "command": command,
        "settings": vars(settings),
        "environment": environment("cpu"),
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
