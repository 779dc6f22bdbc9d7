"""The figures of the documentation, drawn from the grokking benchmarks' result JSON files.

* ``steps_<task>.png``: per task, the optimizer steps each row took to reach the target accuracy, one point per seed
  (log scale); a run that did not reach it by its cap is a hollow triangle at the cap, labelled "not reached by N".
* ``curves.png``: validation (solid) and training (dashed) accuracy of a few representative runs per task (seed 0:
  no filter, EMA, MA), on a log step axis.
* ``paper_table.png``: steps to 95 % for the paper's settings (``grokking.py``), every seed, with the paper's figure.

``python benchmarks/figures.py`` redraws them into ``docs/figures/`` from ``benchmarks/results/grokking.json`` and
``grokking_leaderboard.json``; ``grokking.py`` and ``grokking_leaderboard.py`` draw the same figures for the runs
they just made.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"

SEED_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")
#: colours of the representative rows in the curves figure
ROW_COLORS = {"none": "#555555", "ema": "#1f77b4", "ma": "#d62728", "baseline_wd0": "#555555"}
ROW_LABELS = {"none": "no filter", "ema": "Grokfast EMA", "ma": "Grokfast MA (window 100, lamb 5)"}
TASK_TITLES = {
    "modular": "x*y mod 97 (transformer, Adam)",
    "parity": "sparse parity n=30 k=3 (MLP, AdamW)",
    "digits": "digits, 500 train images (MLP, AdamW)",
}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _steps(run: dict[str, Any], mark: str) -> float:
    value = run["steps_to"].get(mark)
    return math.inf if value is None else float(value)


def _median(values: list[float]) -> float:
    return statistics.median_low(sorted(values)) if values else math.inf


def draw_steps(ax: Any, runs: list[dict[str, Any]], labels: dict[str, str], mark: str, title: str) -> None:
    """Steps to ``mark`` per row (y) and seed (points) on a log x axis; unreached runs as hollow triangles at the cap.

    Args:
        ax: the matplotlib axes to draw into.
        runs: result records (``config``, ``seed``, ``cap``, ``steps_to``) of one task.
        labels: row name -> label, for the rows to draw; rows are sorted by their median steps (unreached last).
        mark: the accuracy mark, a key of ``steps_to`` (``"0.95"``).
        title: the axes title.

    """
    rows = [name for name in labels if any(r["config"] == name for r in runs)]
    by_row = {name: sorted((r for r in runs if r["config"] == name), key=lambda r: r["seed"]) for name in rows}
    rows.sort(key=lambda name: (_median([_steps(r, mark) for r in by_row[name]]), name), reverse=True)
    seeds = sorted({r["seed"] for r in runs})
    for y, name in enumerate(rows):
        unreached = 0
        for run in by_row[name]:
            color = SEED_COLORS[seeds.index(run["seed"]) % len(SEED_COLORS)]
            offset = (seeds.index(run["seed"]) - (len(seeds) - 1) / 2) * 0.16
            steps = _steps(run, mark)
            if math.isfinite(steps):
                ax.plot(steps, y + offset, "o", color=color, ms=7, zorder=3)
            else:
                unreached += 1
                ax.plot(run["cap"], y + offset, ">", mfc="white", mec=color, mew=1.6, ms=8, zorder=3)
        median = _median([_steps(r, mark) for r in by_row[name]])
        if math.isfinite(median):
            ax.plot([median, median], [y - 0.32, y + 0.32], color="black", lw=1.6, zorder=2)
        if unreached:
            cap = max(r["cap"] for r in by_row[name] if not math.isfinite(_steps(r, mark)))
            ax.text(cap * 1.12, y, f"not reached by {cap:,} ({unreached}/{len(by_row[name])})", va="center", fontsize=9)
    unreached_caps = sorted({r["cap"] for r in runs if not math.isfinite(_steps(r, mark))})
    for cap in unreached_caps:
        ax.axvline(cap, color="grey", ls=":", lw=1)
    reached = [_steps(r, mark) for r in runs if math.isfinite(_steps(r, mark))]
    right = max([*(c * 2.6 for c in unreached_caps), *(s * 1.5 for s in reached)])
    ax.set_xscale("log")
    _readable_log_ticks(ax, _left_limit(runs, mark), right)
    ax.set_yticks(range(len(rows)), [labels[name] for name in rows], fontsize=10)
    for tick, name in zip(ax.get_yticklabels(), rows):
        if name in ("none", "baseline_wd0"):
            tick.set_fontweight("bold")
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel(f"optimizer steps to {float(mark):.0%} validation accuracy (log scale)", fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", which="major", alpha=0.3)
    handles = [
        ax.plot([], [], "o", color=SEED_COLORS[i % len(SEED_COLORS)], label=f"seed {s}")[0] for i, s in enumerate(seeds)
    ]
    handles.append(ax.plot([], [], ">", mfc="white", mec="black", label="not reached by the cap")[0])
    handles.append(ax.plot([], [], "|", color="black", ms=12, mew=1.6, label="median")[0])
    _legend_below(ax, handles)


def _legend_below(ax: Any, handles: list[Any]) -> None:
    columns = len(handles) if len(handles) <= 5 else (len(handles) + 1) // 2
    ax.legend(handles=handles, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=columns)


def _readable_log_ticks(ax: Any, left: float, right: float) -> None:
    """A log x axis from ``left`` to ``right``, ticks at 1-2-5 (short ranges 1-2-3-5-7) written out: ``2,000``."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    steps = (1, 2, 3, 5, 7) if right / left < 100 else (1, 2, 5)
    ticks = [m * 10**e for e in range(0, 7) for m in steps if left <= m * 10**e <= right]
    ax.set_xlim(left, right)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))


def _left_limit(runs: list[dict[str, Any]], mark: str) -> float:
    reached = [_steps(r, mark) for r in runs if math.isfinite(_steps(r, mark))]
    return min(reached) * 0.7 if reached else 10


def steps_figure(
    runs: list[dict[str, Any]],
    labels: dict[str, str],
    mark: str,
    title: str,
    path: Path,
    paper: dict[str, int] | None = None,
) -> Path:
    """Write the steps-to-target figure of one task (see :func:`draw_steps`) to ``path``.

    Args:
        runs: result records of one task.
        labels: row name -> label of the rows to draw.
        mark: the accuracy mark (the task's target).
        title: the figure title.
        path: the PNG to write.
        paper: row name -> the paper's steps to ``mark``, drawn as black crosses.

    Returns:
        ``path``.

    """
    plt = pyplot()
    rows = sum(any(r["config"] == name for r in runs) for name in labels)
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.45 * rows))
    draw_steps(ax, runs, labels, mark, title)
    if paper:
        names = [t.get_text() for t in ax.get_yticklabels()]
        for name, steps in paper.items():
            if labels.get(name) in names:
                ax.plot(steps, names.index(labels[name]), "kx", ms=9, mew=2, zorder=4)
        handles = [*ax.get_legend().legend_handles, ax.plot([], [], "kx", ms=9, mew=2, label="paper (GPU)")[0]]
        _legend_below(ax, handles)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_figure(panels: list[tuple[str, list[dict[str, Any]], float]], path: Path) -> Path:
    """Write validation (solid) and training (dashed) accuracy curves of a few runs per panel, log step axis.

    Args:
        panels: per panel, its title, its runs (one colour per row: no filter, EMA, MA) and its target accuracy.
        path: the PNG to write.

    Returns:
        ``path``.

    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, runs, target) in zip(axes[0], panels):
        for run in runs:
            color = ROW_COLORS.get(run["config"])
            steps, val, train = zip(*[(max(s, 1), v, t) for s, v, t in run["curve"]])
            ax.plot(steps, train, color=color, lw=0.8, ls="--", alpha=0.6)
            ax.plot(steps, val, color=color, lw=2.2)
        ax.axhline(target, color="grey", ls=":", lw=1)
        ax.text(1.01, target, f"{target:.0%}", transform=ax.get_yaxis_transform(), va="center", fontsize=9)
        ax.set_xscale("log")
        first = min(min(s for s, _, _ in run["curve"]) for run in runs)
        last = max(max(s for s, _, _ in run["curve"]) for run in runs)
        _readable_log_ticks(ax, max(first, 1) * 0.8, last * 1.3)
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("optimizer step (log scale)", fontsize=10)
        ax.set_ylabel("accuracy", fontsize=10)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles = [
        axes[0][0].plot([], [], color=ROW_COLORS[name], lw=2.2, label=label)[0] for name, label in ROW_LABELS.items()
    ]
    handles += [
        axes[0][0].plot([], [], color="black", lw=2.2, label="validation")[0],
        axes[0][0].plot([], [], color="black", lw=0.8, ls="--", label="train")[0],
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def representative_runs(runs: list[dict[str, Any]], task: str, seed: int = 0) -> list[dict[str, Any]]:
    """The runs of ``task`` and ``seed`` that the curves figure shows: no filter, EMA and MA, where they exist."""
    configs = ("baseline_wd0", "none", "ema", "ma")
    return [r for r in runs if r["task"] == task and r["seed"] == seed and r["config"] in configs and r["curve"]]


def _run(runs: Iterable[dict[str, Any]], task: str, config: str, seed: int = 0) -> dict[str, Any] | None:
    return next((r for r in runs if (r["task"], r["config"], r["seed"]) == (task, config, seed)), None)


def leaderboard_figures(
    runs: list[dict[str, Any]],
    labels: dict[str, str],
    targets: dict[str, float],
    out_dir: Path,
    prefix: str = "",
    curves: bool = True,
) -> list[Path]:
    """The leaderboard's figures: ``<prefix>steps_<task>.png`` per task and ``<prefix>curves.png``.

    Args:
        runs: the leaderboard's result records (``task``, ``config``, ``seed``, ``cap``, ``steps_to``, ``curve``).
        labels: row name -> label.
        targets: task name -> target accuracy.
        out_dir: the folder to write into.
        prefix: file name prefix.
        curves: also write ``<prefix>curves.png`` (seed 0 of no filter, EMA and MA per task).

    Returns:
        The paths written.

    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    tasks = [t for t in targets if any(r["task"] == t for r in runs)]
    for task in tasks:
        task_runs = [r for r in runs if r["task"] == task]
        title = f"{TASK_TITLES.get(task, task)}: steps to {targets[task]:.0%} at matched weight decay"
        path = out_dir / f"{prefix}steps_{task}.png"
        written.append(steps_figure(task_runs, labels, str(targets[task]), title, path))
    panels = [
        (f"{TASK_TITLES.get(task, task)}, seed 0", representative_runs(runs, task), targets[task]) for task in tasks
    ]
    panels = [panel for panel in panels if panel[1]]
    if curves and panels:
        written.append(curves_figure(panels, out_dir / f"{prefix}curves.png"))
    return written


def paper_figure(runs: list[dict[str, Any]], labels: dict[str, str], paper: dict[str, int], path: Path) -> Path:
    """Steps to 95 % on ``x*y mod 97`` for the paper's settings, every seed, with the paper's figures as crosses.

    Args:
        runs: ``grokking.py``'s result records.
        labels: row name -> label.
        paper: row name -> the paper's steps to 95 %.
        path: the PNG to write.

    Returns:
        ``path``.

    """
    path.parent.mkdir(parents=True, exist_ok=True)
    title = "x*y mod 97, the paper's settings: steps to 95 % validation accuracy"
    return steps_figure(runs, labels, "0.95", title, path, paper=paper)


def main(argv: list[str] | None = None) -> list[Path]:
    """Draw every documentation figure from the result JSON files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result JSON files")
    parser.add_argument("--out-dir", type=Path, default=FIGURES, help="folder the PNG files go to")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grokking import CONFIGS
    from grokking_common import TASKS
    from grokking_leaderboard import METHODS

    board = json.loads((args.results / "grokking_leaderboard.json").read_text())["runs"]
    targets = {name: task.marks[-1] for name, task in TASKS.items()}
    labels = {name: method.label for name, method in METHODS.items()}
    written = leaderboard_figures(board, labels, targets, args.out_dir, curves=False)
    paper_runs = json.loads((args.results / "grokking.json").read_text())["runs"]
    paper_labels = {name: method.label for name, (method, _, _) in CONFIGS.items()}
    paper = {name: steps for name, (_, _, steps) in CONFIGS.items() if steps}
    written.append(paper_figure(paper_runs, paper_labels, paper, args.out_dir / "paper_table.png"))
    # the curves: the modular task at the paper's settings (no filter at weight decay 0), the others at matched decay
    panels = [
        (
            "x*y mod 97, seed 0: no filter at wd 0; EMA wd 0.005, MA wd 0.01",
            representative_runs(paper_runs, "modular"),
            0.95,
        ),
        *((f"{TASK_TITLES[t]}, seed 0, wd 1", representative_runs(board, t), targets[t]) for t in ("parity", "digits")),
    ]
    written.append(curves_figure(panels, args.out_dir / "curves.png"))
    for path in written:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return written


if __name__ == "__main__":
    main()
