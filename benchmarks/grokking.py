"""How much sooner the paper's model groks with Grokfast, trained through the real Lightning Trainer.

Task and model are the paper's: ``x * y mod 97`` (x in [0, 97), y in [1, 97)), a random half for training, the
2-layer width-128 pre-norm decoder-only transformer of the paper's code, Adam (lr 1e-3, betas 0.9/0.98, coupled
weight decay, 10 warm-up updates), batch 512. Each run is a ``Trainer.fit`` that validates on the whole
validation half every ``--val-every`` optimizer steps, records the first step and the wall-clock time (from the
start of training, validation included) at which validation accuracy reaches 50 %, 90 % and 95 %, and stops at
95 % or at its step cap. A seed sets the initialization (``seed_everything``), the train/validation split and the
batch order, all three as the paper's code draws them with the same ``--seed``.

Configurations (``--configs``):

``baseline_wd0``, ``baseline_wd0.005``, ``baseline_wd0.01``
    No filter; the paper's baseline uses weight decay 0, the filtered runs 0.005 (EMA) and 0.01 (MA), so the
    baseline is also run at those, to separate the filter's effect from the weight decay's. Capped at
    ``--max-steps-baseline`` (the paper needs 39,890 steps at weight decay 0: "not reached by N" is a result).
``ema``
    ``GrokfastCallback(filter="ema", alpha=0.98, lamb=2.0)``, weight decay 0.005.
``ma``
    ``GrokfastCallback(filter="ma", window_size=100, lamb=5.0)``, weight decay 0.01.
``ema_detector``
    ``ema`` plus ``GrokkingDetectorCallback(lambda_boost=1.5, max_lamb=4.0)`` (its convergence stop is off).

Every method at one weight decay, the anchors and the other tasks are in ``grokking_leaderboard.py``.
Modes: default (seeds 0 1 2), ``--quick`` (seed 0, small caps), ``--smoke`` (tiny task, seconds, for the tests).
Every run is a trial of the study ``paper`` in the Optuna storage ``--storage`` (default
``benchmarks/results/grokking.db``, see ``grokking_store.py``): a (configuration, seed) already finished there is
not run again, so a long run interrupted or run piecewise (``--seeds 1``) adds up, and several processes can share
it. The leaderboard's modular rows ``none``, ``ema`` and ``ema_detector`` (same task, weight decay 0.005) fill the
cells of ``baseline_wd0.005``, ``ema`` and ``ema_detector`` that this study lacks. Prints a markdown table and
writes ``benchmarks/results/<stem>.{md,png,json}`` (stem ``grokking``, ``grokking_quick``, ``grokking_smoke`` or
``--stem``) from the storage; ``--migrate`` adds the runs of JSON reports of earlier versions.
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
from grokking_common import (
    MA,
    PAPER_BASELINE_STEPS,
    RESULTS,
    TASKS,
    Method,
    Settings,
    add_checkpoint_arguments,
    cell,
    paired_speedups,
    plot_curves,
    row_commands,
    run_one,
    speedup,
    summarize_marks,
)
from grokking_leaderboard import study_name
from grokking_store import finished_runs, migrate, open_study, run_cells

TASK = TASKS["modular"]
#: name -> (method, weight decay, paper's steps to 95 %)
CONFIGS: dict[str, tuple[Method, float, int | None]] = {
    "baseline_wd0": (Method("baseline_wd0", "no filter, wd 0"), 0.0, PAPER_BASELINE_STEPS),
    "baseline_wd0.005": (Method("baseline_wd0.005", "no filter, wd 0.005"), 0.005, None),
    "baseline_wd0.01": (Method("baseline_wd0.01", "no filter, wd 0.01"), 0.01, None),
    "ema": (Method("ema", "EMA alpha 0.98 lamb 2, wd 0.005", grokfast="ema"), 0.005, 910),
    "ma": (Method("ma", "MA window 100 lamb 5, wd 0.01", grokfast=MA), 0.01, 790),
    "ema_detector": (
        Method(
            "ema_detector",
            "EMA + detector boost (x1.5, max lamb 4), wd 0.005",
            grokfast="ema",
            detector={"lambda_boost": 1.5, "max_lamb": 4.0},
        ),
        0.005,
        None,
    ),
}


#: leaderboard rows of the modular task (at its weight decay 0.005) that are rows of this table too
FROM_LEADERBOARD = {"none": "baseline_wd0.005", "ema": "ema", "ema_detector": "ema_detector"}


def leaderboard_runs(storage: str, mode: str) -> list[dict[str, Any]]:
    """The leaderboard's modular runs of the rows that are rows of this table too (renamed to this table's)."""
    study = open_study(storage, study_name("modular", mode))
    runs = []
    for (row, _), run in finished_runs(study).items():
        if row in FROM_LEADERBOARD:
            runs.append({**run, "config": FROM_LEADERBOARD[row]})
    return runs


def is_baseline(name: str) -> bool:
    return CONFIGS[name][0].grokfast is None


def markdown(summary: dict[str, Any], seeds: int, val_every: int, commands: dict[str, str]) -> str:
    """The README table: steps to each mark, time to 95 %, speed-ups, the paper's figure, the command."""
    lines = [
        f"Optimizer steps to validation accuracy marks, median (min - max) over the seeds run ({seeds} by default);"
        f' wall-clock time includes validation every {val_every} steps; "not reached by N": N is the run\'s step'
        " cap. Speed-up: steps to 95 % without filter / with.",
        "",
        "| run | seeds | 50 % | 90 % | 95 % | time to 95 % | reached 95 % | speed-up vs no filter wd 0 | vs no filter,"
        " same wd (medians) | same wd, per seed | paper: steps to 95 % | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    baselines = {CONFIGS[n][1]: summary[n] for n in summary if is_baseline(n)}
    for name, entry in summary.items():
        method, weight_decay, paper_steps = CONFIGS[name]
        cap, marks = entry["cap"], entry["marks"]
        steps = marks["0.95"]["steps_median"]
        vs_wd0 = vs_same = per_seed = ""
        if not is_baseline(name):
            wd0 = baselines.get(0.0)
            vs_wd0 = speedup(wd0, steps, "0.95")
            if wd0 and len(wd0["seeds"]) > 1:
                vs_wd0 += f" ({paired_speedups(wd0, entry, '0.95')})"
            vs_same = speedup(baselines.get(weight_decay), steps, "0.95")
            per_seed = paired_speedups(baselines.get(weight_decay), entry, "0.95")
        paper = f"{paper_steps:,}" if paper_steps else ""
        if paper_steps and not is_baseline(name):
            paper += f" ({PAPER_BASELINE_STEPS / paper_steps:.0f}x vs wd 0)"
        seed_list = " ".join(map(str, entry["seeds"]))
        reached = f"{marks['0.95']['reached']}/{len(entry['seeds'])}"
        lines.append(
            f"| {method.label} | {seed_list} | {cell(marks['0.5'], cap)} | {cell(marks['0.9'], cap)}"
            f" | {cell(marks['0.95'], cap)} | {cell(marks['0.95'], cap, 'seconds')} | {reached} | {vs_wd0}"
            f" | {vs_same} | {per_seed} | {paper} | {commands.get(name, '')} |"
        )
    return "\n".join([*lines, ""])


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Accuracy curves (left) and median steps to 95 % with min-max bars against the paper's, log scale (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = {name: CONFIGS[name][0].label for name in summary}
    plot_curves(curves, runs, labels, "x*y mod 97: validation (solid) and train batch (dashed) accuracy", 0.95)
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(summary):
        mark, cap = summary[name]["marks"]["0.95"], summary[name]["cap"]
        reached = math.isfinite(mark["steps_median"])
        height = mark["steps_median"] if reached else cap
        lo, hi = (mark[k] if math.isfinite(mark[k]) else cap for k in ("steps_min", "steps_max"))
        bars.bar(i, height, color=colors(i), hatch=None if reached else "//", alpha=1.0 if reached else 0.4)
        bars.errorbar(i, height, yerr=[[height - lo], [hi - height]], color="black", capsize=4)
        bars.text(i, height * 1.1, f"{height:,.0f}" if reached else f"> {cap:,}", ha="center", fontsize=8)
        if CONFIGS[name][2]:
            bars.plot([i], [CONFIGS[name][2]], marker="x", color="black", ms=8)
    bars.set_yscale("log")
    bars.set_ylim(bottom=100, top=PAPER_BASELINE_STEPS * 2)
    bars.set_xticks(range(len(summary)), list(summary), rotation=25, ha="right", fontsize=8)
    bars.set_ylabel("steps to 95 % validation accuracy (median, min-max)")
    bars.set_title("x: the paper's steps; hatched: not reached by the cap", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    from figures import paper_figure  # every seed's steps to 95 %, unreached runs marked at their cap

    paper = {name: steps for name, (_, _, steps) in CONFIGS.items() if steps}
    paper_figure(runs, labels, paper, path.with_name(f"{path.stem}_steps.png"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the configurations and seeds missing from the storage; write the table, figure and JSON from it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="seed 0 only, caps 2500 (filtered) / 1500 (no filter)")
    mode.add_argument("--smoke", action="store_true", help="tiny task and a few steps (for the tests)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--max-steps", type=int, default=3000, help="step cap of filtered runs (default 3000)")
    parser.add_argument("--max-steps-baseline", type=int, default=3000, help="step cap of no-filter runs")
    parser.add_argument("--val-every", type=int, default=10, help="validate every this many optimizer steps")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--progress-every", type=int, default=0, help="print validation accuracy every N steps")
    parser.add_argument("--table-only", action="store_true", help="train nothing; tabulate the storage")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<out-dir>/grokking.db)")
    parser.add_argument("--migrate", nargs="+", type=Path, default=[], help="add the runs of these JSON reports")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", help="file name stem of the results")
    add_checkpoint_arguments(parser)
    args = parser.parse_args(argv)

    settings = Settings(mode="smoke" if args.smoke else "quick" if args.quick else "full")
    settings.seeds = args.seeds or ([0] if args.quick or args.smoke else [0, 1, 2])
    settings.val_every = 3 if args.smoke else args.val_every
    settings.progress_every = args.progress_every
    settings.checkpoint_dir, settings.checkpoint_every = args.checkpoint_dir, args.checkpoint_every
    caps = (12, 6) if args.smoke else (2500, 1500) if args.quick else (args.max_steps, args.max_steps_baseline)
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    quiet_lightning()
    stem = args.stem or {"full": "grokking", "quick": "grokking_quick", "smoke": "grokking_smoke"}[settings.mode]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{args.out_dir.resolve() / 'grokking.db'}"
    study = open_study(storage, "paper" + ("" if settings.mode == "full" else f"-{settings.mode}"))
    command = " ".join(["python benchmarks/grokking.py", *(argv if argv is not None else sys.argv[1:])])
    for path in args.migrate:
        report = json.loads(path.read_text())
        runs = [{"command": report["command"], **r} for r in report["runs"] if r["config"] in CONFIGS]
        print(f"[grokking] {path.name}: {migrate(study, runs, '0.95')} runs added", flush=True)
    started = time.perf_counter()

    def run(name: str, seed: int) -> dict[str, Any]:
        method, weight_decay, _ = CONFIGS[name]
        cap = caps[1] if is_baseline(name) else caps[0]
        return {**run_one(TASK, method, seed, settings, weight_decay=weight_decay, cap=cap), "command": command}

    cells = [] if args.table_only else [(name, seed) for name in args.configs for seed in settings.seeds]
    try:
        run_cells(study, cells, run, "0.95")
    except KeyboardInterrupt as stop:
        raise SystemExit(f"[grokking] {stop}; the finished runs are in {storage}, run again to go on") from None
    own = finished_runs(study)
    runs = list(own.values())
    runs += [r for r in leaderboard_runs(storage, settings.mode) if (r["config"], r["seed"]) not in own]
    report = _report(runs, command, settings, started)
    commands = row_commands(runs, lambda r: r["config"])
    table = markdown(report["summary"], len(settings.seeds), settings.val_every or 10, commands)
    print(f"\n{table}")
    (args.out_dir / f"{stem}.md").write_text(f"<!-- {command} -->\n{table}")
    plot(runs, report["summary"], args.out_dir / f"{stem}.png")
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[grokking] wrote {stem}.md, {stem}.png and {stem}.json from {storage}")
    return report


def _report(runs: list[dict[str, Any]], command: str, settings: Settings, started: float) -> dict[str, Any]:
    names = [n for n in CONFIGS if any(r["config"] == n for r in runs)]
    return {
        "command": command,
        "settings": vars(settings),
        "environment": environment("cpu"),
        "seconds": time.perf_counter() - started,
        "summary": {n: summarize_marks([r for r in runs if r["config"] == n], TASK.marks) for n in names},
        "runs": runs,
    }


if __name__ == "__main__":
    main()
