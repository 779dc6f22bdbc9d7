"""Safe default: candidate Grokfast rules against no filter on every task, at the task's target and a higher mark.

A rule is a safe default when, on every task, it is never slower than no filter at the same weight decay (median
over seeds of the steps to the mark) at both marks, and within 1.25x of the best row measured. Tasks: the
leaderboard's ``modular``, ``parity``, ``digits`` (``grokking_common.TASKS``) and the suite's ``s5``,
``mnist1d``, ``regression`` (``suite_tasks.py``, as their configs in ``lightning_grokfast/configs``). Every run is
``grokking_common.run_one``: it validates every few steps and stops at the higher mark or the cap.

The regression task's metric is an error: its model here also logs the negated errors as ``train_acc`` and
``val_acc`` (higher is better), so the shared milestone engine and the detector read it unchanged; its marks are
negated mean squared errors (``-0.05`` is a validation MSE of 0.05).

Rules (``--rules``): ``none``; ``ema`` (the task's EMA setting, the leaderboard's); ``ma`` (window 100, lamb 5);
``ema_ma`` (both terms); ``ema_ma_guard`` (the same with the divergence guard, ``max_amplified_ratio=1``);
``ema_ma_backoff`` (the same, lamb and ma_lamb x0.25 once the detector sees grokking start); ``auto`` (the
``auto_grokfast`` rule: MA window 100, lamb 5, halved whenever the train metric falls 0.02 below its best);
``ema_ma_unstable`` (the same back-off over EMA+MA); ``auto_warm`` (``auto`` with ``lamb`` rising from 0 over the
first 1,000 steps, ``safe_default_rules.LambWarmup``); the rejected ``*_gap`` and ``*_cut`` candidates
(``safe_default_rules.GapScaledLamb``).

    python benchmarks/safe_default.py --tasks digits regression --rules none ema_ma --seeds 0 1 2 --threads 1
    python benchmarks/safe_default.py --resume ...   # keeps the runs already in the JSON (piecewise grids)
    python benchmarks/safe_default.py --table-only --merge results/a.json results/b.json --leaderboard
                                      # one table from runs made under other stems (and the leaderboard's)

Writes ``benchmarks/results/<stem>.{json,md}`` (stem ``safe_default``) after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, quiet_lightning
from grokking_common import RESULTS, Settings, cell, paired_speedups, row_commands, run_one, summarize_marks
from safe_default_rules import RULES, rule_for
from suite_tasks import HIGHER, SUITE, task_with_higher_mark


# ---------------------------------------------------------------------------------------------------- report
def verdicts(summary: dict[str, dict[str, Any]], marks: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """Per task and rule: ``slower`` if its median steps exceed no filter's at a mark, ``> 1.25x best`` if it is
    more than 1.25x the best measured row's median at a mark, ``median not reached`` if at least half of its runs
    did not reach a mark by the cap (then it cannot be judged there), else ``ok``."""
    out: dict[str, dict[str, str]] = {}
    for task_name, rows in summary.items():
        for name, entry in rows.items():
            notes = []
            for mark in marks[task_name]:
                ours = entry["marks"][mark]["steps_median"]
                best = min(r["marks"][mark]["steps_median"] for r in rows.values())
                base = rows.get("none")
                if math.isinf(ours):
                    notes.append(f"median not reached at {mark}")
                    continue
                if base is not None and ours > base["marks"][mark]["steps_median"]:
                    notes.append(f"slower at {mark}")
                if ours > 1.25 * best:
                    notes.append(f"> 1.25x best at {mark}")
            out.setdefault(task_name, {})[name] = "; ".join(notes) or "ok"
    return out


def markdown(
    summary: dict[str, dict[str, Any]], marks: dict[str, list[str]], command: str, commands: dict[str, str]
) -> str:
    """One table: per task, rule and mark, steps (median and range), per-seed speed-ups, the verdict, and the
    commands that made the row's runs (``commands["<task>/<rule>"]``)."""
    judged = verdicts(summary, marks)
    lines = [
        f"<!-- {command} -->",
        "| task | rule | seeds | steps to target | per seed vs none | steps to higher mark | per seed vs none"
        " | time to target | verdict | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task_name, rows in summary.items():
        target, higher = marks[task_name]
        base = rows.get("none")
        for name, entry in rows.items():
            t, h, cap = entry["marks"][target], entry["marks"][higher], entry["cap"]
            lines.append(
                f"| {task_name} ({target} / {higher}) | {RULES[name].label} | {' '.join(map(str, entry['seeds']))}"
                f" | {cell(t, cap)} | {paired_speedups(base, entry, target) if name != 'none' else ''}"
                f" | {cell(h, cap)} | {paired_speedups(base, entry, higher) if name != 'none' else ''}"
                f" | {cell(t, cap, 'seconds')} | {judged[task_name][name]}"
                f" | {commands.get(f'{task_name}/{name}', '')} |"
            )
    return "\n".join([*lines, ""])


def report(runs: list[dict[str, Any]], command: str, settings: Settings, started: float) -> dict[str, Any]:
    """The JSON document: every run, the per-task summaries, the marks judged, the environment."""
    summary: dict[str, dict[str, Any]] = {}
    marks: dict[str, list[str]] = {}
    for task_name in SUITE:
        task = task_with_higher_mark(task_name)
        marks[task_name] = [str(m) for m in task.marks[-2:]]
        for name in RULES:
            rows = [r for r in runs if r["task"] == task_name and r["config"] == name]
            if rows:
                summary.setdefault(task_name, {})[name] = summarize_marks(rows, task.marks)
    marks = {k: v for k, v in marks.items() if k in summary}
    return {
        "command": command,
        "settings": vars(settings),
        "environment": environment("cpu"),
        "seconds": time.perf_counter() - started,
        "marks": marks,
        "summary": summary,
        "verdicts": verdicts(summary, marks),
        "runs": runs,
    }


#: rules renamed since their runs were measured
RENAMED = {"ma_unstable": "auto"}


def finished(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that were not interrupted, under their rule's current name."""
    return [{**r, "config": RENAMED.get(r["config"], r["config"])} for r in runs if not r.get("interrupted")]


def merge(runs: list[dict[str, Any]], more: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` plus the runs of ``more`` whose (task, rule, seed) is not in it yet."""
    seen = {(r["task"], r["config"], r["seed"]) for r in runs}
    return runs + [r for r in more if (r["task"], r["config"], r["seed"]) not in seen]


def leaderboard_runs(storage: str | None) -> list[dict[str, Any]]:
    """The leaderboard's runs of modular and parity of the rules this study shares (``none``, ``ema``, ``ma``,
    ``ema_ma``, ``auto``), as runs of this study.

    A run that stopped at the leaderboard's target did not go on to the higher mark: its cap becomes the step it
    stopped at, so it counts as "not reached by that step" there, a bound, never a number.
    """
    from grokking_store import DEFAULT_STORAGE, finished_runs, open_study

    out = []
    for task_name in ("modular", "parity"):
        study = open_study(storage or DEFAULT_STORAGE, f"leaderboard-{task_name}")
        for (row, _), run in finished_runs(study).items():
            if row not in RULES:
                continue
            higher = str(HIGHER[task_name])
            out.append(
                {
                    **run,
                    "steps_to": {**run["steps_to"], higher: None},
                    "seconds_to": {**run["seconds_to"], higher: None},
                    "cap": run["steps_run"],
                    "imported_from": study.study_name,
                }
            )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected tasks x rules x seeds; write the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(SUITE), default=list(SUITE))
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, help="cap every run at this many steps (default: the task's cap)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps (for the tests)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=[], help="add the finished runs of these JSON files (other stems)"
    )
    parser.add_argument(
        "--leaderboard",
        action="store_true",
        help="add the leaderboard's runs of modular and parity (from --storage) of the rules both share; a run that"
        " stopped at the leaderboard's target counts for the higher mark only up to that step",
    )
    parser.add_argument("--table-only", action="store_true", help="train nothing; tabulate the runs gathered")
    parser.add_argument("--storage", default=None, help="the leaderboard's Optuna storage (default: grokking.db)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="file name stem (default safe_default[_smoke])")
    args = parser.parse_args(argv)

    settings = Settings(mode="smoke" if args.smoke else "full", seeds=args.seeds, max_steps=args.max_steps)
    if args.smoke:
        settings.max_steps, settings.val_every, settings.seeds = 8, 4, [0]
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    quiet_lightning()
    stem = args.stem or ("safe_default_smoke" if args.smoke else "safe_default")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{stem}.json"
    runs = finished(json.loads(json_path.read_text())["runs"]) if args.resume and json_path.exists() else []
    for path in args.merge:
        runs = merge(runs, finished(json.loads(path.read_text())["runs"]))
    if args.leaderboard:
        runs = merge(runs, leaderboard_runs(args.storage))
    command = " ".join(["python benchmarks/safe_default.py", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    for task_name in [] if args.table_only else args.tasks:
        task = task_with_higher_mark(task_name)
        for name in args.rules:
            for seed in settings.seeds:
                if any((r["task"], r["config"], r["seed"]) == (task_name, name, seed) for r in runs):
                    continue
                result = run_one(task, rule_for(RULES[name], task_name), seed, settings)
                result["command"] = command
                runs.append(result)
                json_path.write_text(json.dumps(report(runs, command, settings, started), indent=1) + "\n")
                if result.get("interrupted"):
                    raise SystemExit(f"[safe_default] stopped; the runs so far are in {json_path}")
    document = report(runs, command, settings, started)
    runs = document["runs"]
    table = markdown(
        document["summary"], document["marks"], command, row_commands(runs, lambda r: f"{r['task']}/{r['config']}")
    )
    print(f"\n{table}")
    (args.out_dir / f"{stem}.md").write_text(table)
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    return document


if __name__ == "__main__":
    main()
