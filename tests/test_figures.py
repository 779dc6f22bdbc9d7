"""The documentation figures (``benchmarks/figures.py``): every seed is a point, an unreached run says so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import figures


def _run(config: str, seed: int, steps: int | None, cap: int = 3000) -> dict:
    curve = [(10, 0.1, 0.5), (steps or cap, 0.96 if steps else 0.4, 1.0)]
    return {"task": "modular", "config": config, "seed": seed, "cap": cap, "steps_to": {"0.95": steps}, "curve": curve}


RUNS = [_run("none", 0, None), _run("none", 1, 1890), _run("ema", 0, 910), _run("ema", 1, 1330)]
LABELS = {"none": "no filter", "ema": "Grokfast EMA"}


def _axes():
    plt = figures.pyplot()
    fig, ax = plt.subplots()
    figures.draw_steps(ax, RUNS, LABELS, "0.95", "title")
    return plt, fig, ax


def _points(ax, marker: str) -> list[tuple[float, float]]:
    return [(x, y) for line in ax.get_lines() if line.get_marker() == marker for x, y in line.get_xydata()]


def test_every_reached_seed_is_a_point_at_its_steps() -> None:
    plt, fig, ax = _axes()
    assert sorted(x for x, _ in _points(ax, "o")) == [910, 1330, 1890]
    plt.close(fig)


def test_an_unreached_run_is_a_triangle_at_its_cap_labelled_not_reached() -> None:
    plt, fig, ax = _axes()
    assert [x for x, _ in _points(ax, ">")] == [3000]
    assert [t.get_text() for t in ax.texts] == ["not reached by 3,000 (1/2)"]
    plt.close(fig)


def test_rows_are_sorted_fastest_first_from_the_top() -> None:
    plt, fig, ax = _axes()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["no filter", "Grokfast EMA"]  # y grows upwards: the last label is the top row
    plt.close(fig)


def test_leaderboard_figures_write_one_steps_figure_per_task_and_the_curves(tmp_path: Path) -> None:
    written = figures.leaderboard_figures(RUNS, LABELS, {"modular": 0.95}, tmp_path, prefix="lb_")
    assert [p.name for p in written] == ["lb_steps_modular.png", "lb_curves.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
