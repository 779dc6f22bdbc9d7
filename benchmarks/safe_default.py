"""Safe default: candidate Grokfast rules against no filter on every task, at the task's target and a higher mark.

A rule is a safe default when, on every task, it is never slower than no filter at the same weight decay (median
over seeds of the steps to the mark) at both marks, and within 1.25x of the best row measured. Tasks: the
leaderboard's ``modular``, ``parity``, ``digits`` (``grokking_common.TASKS``) and the suite's ``s5``,
``mnist1d``, ``regression`` (defined here, as their configs in ``lightning_grokfast/configs``). Every run is
``grokking_common.run_one``: it validates every few steps and stops at the higher mark or the cap.

The regression task's metric is an error: its model here also logs the negated errors as ``train_acc`` and
``val_acc`` (higher is better), so the shared milestone engine and the detector read it unchanged; its marks are
negated mean squared errors (``-0.05`` is a validation MSE of 0.05).

Rules (``--rules``): ``none``; ``ema`` (the task's EMA setting, the leaderboard's); ``ma`` (window 100, lamb 5);
``ema_ma`` (both terms); ``ema_ma_guard`` (the same with the divergence guard, ``max_amplified_ratio=1``);
``ema_ma_backoff`` (the same, lamb and ma_lamb x0.25 once the detector sees grokking start).

    python benchmarks/safe_default.py --tasks digits regression --rules none ema_ma --seeds 0 1 2 --threads 1
    python benchmarks/safe_default.py --resume ...   # keeps the runs already in the JSON (piecewise grids)

Writes ``benchmarks/results/<stem>.{json,md}`` (stem ``safe_default``) after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, quiet_lightning
from grokking_common import MA, RESULTS, TASKS, Method, Settings, Task, cell, paired_speedups, run_one, summarize_marks

from lightning_grokfast.tasks import (
    GrokTransformer,
    MLPClassifier,
    MLPRegressor,
    MNIST1DDataModule,
    PermutationGroupDataModule,
    TeacherStudentDataModule,
)


# ---------------------------------------------------------------------------------------------------- new tasks
def _s5(seed: int, weight_decay: float, loss: str, smoke: bool) -> tuple[Any, Any]:
    data = PermutationGroupDataModule(n=4 if smoke else 5, batch_size=64 if smoke else 512, seed=seed)
    size = {"dim": 16, "num_heads": 2, "num_layers": 1} if smoke else {}
    model = GrokTransformer(data.num_tokens, weight_decay=weight_decay, loss=loss, optimizer="adamw", **size)
    return model, data


def _mnist1d(seed: int, weight_decay: float, loss: str, smoke: bool) -> tuple[Any, Any]:
    data = MNIST1DDataModule(num_train=100 if smoke else 1000, num_val=100 if smoke else 4000, seed=seed)
    hidden = 16 if smoke else 200
    model = MLPClassifier(
        40, 10, hidden=hidden, depth=2, init_scale=8.0, optimizer="adamw", weight_decay=weight_decay, loss=loss
    )
    return model, data


class NegatedErrorRegressor(MLPRegressor):
    """:class:`MLPRegressor` that also logs ``-train_loss`` and ``-val_loss`` as ``train_acc`` and ``val_acc``."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_acc", -loss.detach(), on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        error = torch.nn.functional.mse_loss(self(inputs), targets)
        self.log("val_loss", error)
        self.log("val_acc", -error)


def _regression(seed: int, weight_decay: float, loss: str, smoke: bool) -> tuple[Any, Any]:
    data = TeacherStudentDataModule(num_train=100 if smoke else 1000, num_val=100 if smoke else 2000, seed=seed)
    hidden = 16 if smoke else 200
    model = NegatedErrorRegressor(
        20, hidden=hidden, depth=2, init_scale=4.0, optimizer="adamw", weight_decay=weight_decay
    )
    return model, data


PAPER_MNIST_EMA = {"filter": "ema", "alpha": 0.8, "lamb": 0.1}
SUITE: dict[str, Task] = {
    **TASKS,
    "s5": Task("s5", "S5 composition, the paper's transformer, AdamW", _s5, 1.0, (0.5, 0.9), 10000, 100,
               {"filter": "ema", "alpha": 0.98, "lamb": 2.0}, "configs/s5_baseline.yaml"),
    "mnist1d": Task("mnist1d", "MNIST-1D (1,000 train), MLP x8 init, AdamW", _mnist1d, 1.0, (0.35, 0.4), 3000, 25,
                    PAPER_MNIST_EMA, "configs/mnist1d_baseline.yaml"),
    "regression": Task("regression", "teacher-student (1,000 train), MLP x4 init, AdamW; -MSE", _regression, 1.0,
                       (-0.2, -0.05), 3000, 25, PAPER_MNIST_EMA, "configs/regression_baseline.yaml"),
}  # fmt: skip
#: The higher mark of each task (its marks' last is the target): the run continues to it.
HIGHER = {"modular": 0.99, "parity": 0.99, "digits": 0.95, "s5": 0.95, "mnist1d": 0.45, "regression": -0.01}
#: Per-task detector thresholds of the back-off rule (the default ones assume accuracies).
DETECTOR = {"regression": {"memorization_threshold": -0.01, "jump_threshold": 0.1, "convergence_gap": 0.01}}

EMA_MA = {"filter": "ema+ma", "alpha": 0.98, "lamb": 2.0, "window_size": 100, "ma_lamb": 5.0}
RULES: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", "no filter"),
        Method("ema", "Grokfast EMA (task's setting)", grokfast="ema"),
        Method("ma", "Grokfast MA (w 100, lamb 5)", grokfast=MA),
        Method("ema_ma", "Grokfast EMA+MA", grokfast=EMA_MA),
        Method("ema_ma_guard", "EMA+MA + divergence guard (ratio 1)", grokfast={**EMA_MA, "max_amplified_ratio": 1.0}),
        Method("ema_ma_backoff", "EMA+MA, lamb x0.25 at grokking", grokfast=EMA_MA, detector={"lambda_boost": 0.25}),
    )
}


def task_with_higher_mark(name: str) -> Task:
    """The task with its higher mark appended: its runs stop there (or at the cap), not at the target."""
    task = SUITE[name]
    return dataclasses.replace(task, marks=(*task.marks, HIGHER[name]))


def rule_for(rule: Method, task: str) -> Method:
    """``rule`` with the task's detector thresholds, if it uses the detector."""
    if rule.detector is None or task not in DETECTOR:
        return rule
    return dataclasses.replace(rule, detector={**rule.detector, **DETECTOR[task]})


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


def markdown(summary: dict[str, dict[str, Any]], marks: dict[str, list[str]], command: str) -> str:
    """One table: per task, rule and mark, steps (median and range), per-seed speed-ups, the verdict."""
    judged = verdicts(summary, marks)
    lines = [
        f"<!-- {command} -->",
        "| task | rule | seeds | steps to target | per seed vs none | steps to higher mark | per seed vs none"
        " | time to target | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
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
                f" | {cell(t, cap, 'seconds')} | {judged[task_name][name]} |"
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
    runs = json.loads(json_path.read_text())["runs"] if args.resume and json_path.exists() else []
    command = " ".join(["python benchmarks/safe_default.py", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    for task_name in args.tasks:
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
    table = markdown(document["summary"], document["marks"], command)
    print(f"\n{table}")
    (args.out_dir / f"{stem}.md").write_text(table)
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    return document


if __name__ == "__main__":
    main()
