"""The grokking benchmarks (paper table and leaderboard) run in their smallest mode and summarise correctly."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tests.test_benchmarks import BENCHMARKS, _load

common = _load("grokking_common")


def test_summary_counts_unreached_marks_as_beyond_the_cap() -> None:
    marks = [
        {"0.5": 10, "0.9": 20, "0.95": 30},
        {"0.5": 12, "0.9": None, "0.95": None},
        {"0.5": 8, "0.9": 40, "0.95": 50},
    ]
    runs = [{"config": "ema", "seed": s, "cap": 100, "steps_to": m, "seconds_to": m} for s, m in enumerate(marks)]
    summary = common.summarize_marks(runs, (0.5, 0.9, 0.95))["marks"]
    assert summary["0.5"]["steps_median"] == 10 and summary["0.5"]["reached"] == 3
    assert summary["0.9"]["steps_median"] == 40 and summary["0.9"]["steps_max"] == math.inf
    assert summary["0.95"]["reached"] == 2
    assert common.cell(summary["0.95"], 100) == "50 (30 - > 100)"


def test_speedup_is_a_lower_bound_when_the_baseline_hit_its_cap() -> None:
    reached = {"cap": 3000, "marks": {"0.95": {"steps_median": 2000.0}}}
    capped = {"cap": 3000, "marks": {"0.95": {"steps_median": math.inf}}}
    assert common.speedup(reached, 1000.0, "0.95") == "2.0x"
    assert common.speedup(capped, 1000.0, "0.95") == "> 3.0x"
    assert common.speedup(reached, math.inf, "0.95") == ""


def test_per_seed_speedups_pair_each_seed_and_bound_the_runs_that_hit_their_cap() -> None:
    def runs(config: str, steps: list[int | None]) -> list[dict[str, object]]:
        return [
            {"config": config, "seed": s, "cap": 3000, "steps_to": {"0.95": n}, "seconds_to": {"0.95": n}}
            for s, n in enumerate(steps)
        ]

    base = common.summarize_marks(runs("none", [None, 1800, 1200, None]), (0.95,))
    ours = common.summarize_marks(runs("ema", [900, 1200, None, None, 700]), (0.95,))
    assert common.paired_speedups(base, ours, "0.95") == "0: > 3.3x, 1: 1.5x, 2: < 0.4x, 3: n/a"
    assert common.paired_speedups(None, ours, "0.95") == ""


def test_rows_needing_callback_arguments_that_do_not_exist_are_reported_missing() -> None:
    needs_nothing = common.Method("none", "no filter")
    needs_unknown = common.Method("x", "x", grokfast={"filter": "ema"}, needs=("no_such_argument",))
    assert common.missing_requirement(needs_nothing) is None
    assert "no_such_argument" in common.missing_requirement(needs_unknown)


def _stop_at_validation(number: int, stop: type[BaseException], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the benchmark's MilestoneCallback raise ``stop`` (Ctrl-C, SIGTERM) right after validation ``number``."""
    record = common.MilestoneCallback.on_validation_end

    def stop_there(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        record(self, trainer, pl_module)
        if len(self.curve) == number:
            raise stop()

    monkeypatch.setattr(common.MilestoneCallback, "on_validation_end", stop_there)


def _run_stopped(task: str, settings, method: str = "none"):  # type: ignore[no-untyped-def]
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C once it has caught one
    try:
        return common.run_one(common.TASKS[task], common.Method(method, method, grokfast=method), 0, settings)
    finally:
        signal.signal(signal.SIGINT, sigint)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SIGTERMException], ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_keeps_its_curve_and_says_where_it_stopped(
    stop: type[BaseException], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _stop_at_validation(2, stop, monkeypatch)
    settings = common.Settings(mode="smoke", max_steps=40, val_every=4)
    result = _run_stopped("parity", settings)
    assert result["interrupted"] and result["steps_run"] == 8 and result["cap"] == 8
    assert result["cap_requested"] == 40 and [s for s, _, _ in result["curve"]] == [4, 8]
    store = _load("grokking_store")
    study = store.open_study(f"sqlite:///{tmp_path / 'grokking.db'}", "stopped")
    with pytest.raises(KeyboardInterrupt, match="stopped at step 8"):  # the invocation ends
        store.run_cells(study, [("none", 0)], lambda row, seed: result, "0.95")
    (trial,) = study.trials
    assert trial.state.name == "FAIL" and trial.user_attrs["run"]["steps_run"] == 8  # recorded, as failed
    assert store.finished_runs(study) == {}  # so the next invocation runs the cell again


def test_a_checkpointed_run_continues_where_it_was_stopped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def settings(folder: str) -> object:
        return common.Settings(
            mode="smoke", max_steps=24, val_every=4, checkpoint_dir=str(tmp_path / folder), checkpoint_every=4
        )

    uninterrupted = _run_stopped("modular", settings("once"), method="ema")
    with monkeypatch.context() as patch:
        _stop_at_validation(3, KeyboardInterrupt, patch)  # at step 12, before its save: saved at 4, 8
        stopped = _run_stopped("modular", settings("twice"), method="ema")
    assert stopped["interrupted"] and stopped["steps_run"] == 12
    continued = _run_stopped("modular", settings("twice"), method="ema")
    assert "interrupted" not in continued and continued["steps_run"] == 24 and continued["continued_at"] == [8]
    assert continued["curve"] == uninterrupted["curve"]  # the same batches, filter state and milestones
    assert continued["wall_s"] >= stopped["wall_s"] * 0.9  # the first part's seconds are counted


def _run(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", "--out-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_paper_table_script_runs_in_smoke_mode(tmp_path: Path) -> None:
    result = _run("grokking", tmp_path)
    report = json.loads((tmp_path / "grokking_smoke.json").read_text())
    assert {run["config"] for run in report["runs"]} == {
        "baseline_wd0",
        "baseline_wd0.005",
        "baseline_wd0.01",
        "ema",
        "ma",
        "ema_detector",
    }
    assert "| run | seeds | 50 % |" in result.stdout
    assert (tmp_path / "grokking_smoke.png").stat().st_size > 0


def test_leaderboard_runs_every_task_and_row_in_smoke_mode(tmp_path: Path) -> None:
    result = _run("grokking_leaderboard", tmp_path, "--methods", "none", "ema", "ema_ma", "stablemax_wd0")
    report = json.loads((tmp_path / "grokking_leaderboard_smoke.json").read_text())
    ran = {(run["task"], run["config"]) for run in report["runs"]}
    assert ran == {(t, m) for t in ("modular", "parity", "digits") for m in ("none", "ema", "ema_ma", "stablemax_wd0")}
    assert {run["weight_decay"] for run in report["runs"] if run["config"] == "stablemax_wd0"} == {0.0}
    assert "| task | row | wd |" in result.stdout
    again = _run("grokking_leaderboard", tmp_path, "--table-only")
    assert again.stdout.count("| parity (95%) |") == 4


def test_leaderboard_runs_only_the_cells_its_storage_lacks(tmp_path: Path) -> None:
    _run("grokking_leaderboard", tmp_path, "--tasks", "digits", "--methods", "none")
    more = _run("grokking_leaderboard", tmp_path, "--tasks", "digits", "--methods", "none", "ma")
    assert "digits/ma seed 0" in more.stdout and "digits/none seed 0" not in more.stdout  # none: from the storage
    assert more.stdout.count("| digits (90%) |") == 2
