"""The grokking benchmarks' runs in one Optuna storage: a study per table, a trial per (row, seed) cell.

``grokking.py`` (study ``paper``) and ``grokking_leaderboard.py`` (study ``leaderboard-<task>``) run their grid of
rows x seeds as trials of these studies, each trial one ``Trainer.fit`` whose whole result (milestones, curve,
command) is the trial's ``run`` user attribute and whose value is the steps to the table's target. A cell is
run when its study has no finished run of it and no live trial running it, so an invocation interrupted anywhere
resumes where it stopped, and several processes (or machines, with a shared database URL) can work on one grid.
The tables and figures are made from the storage.

Why not Optuna's ``GridSampler``: it counts a failed (interrupted) trial as a visited grid point, and a grid with
one more row is another search space to it (the rows measured before would run again). Here the cell of a trial
is its ``cell`` user attribute, so rows and seeds can be added at any time.
"""

from __future__ import annotations

import datetime
import json
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

RESULTS = Path(__file__).resolve().parent / "results"
#: The storage of the measured results (next to their tables).
DEFAULT_STORAGE = f"sqlite:///{RESULTS / 'grokking.db'}"
HEARTBEAT_S = 60

Cell = tuple[str, int]  # (row, seed)


def open_study(storage: str, name: str) -> optuna.Study:
    """The study ``name`` in ``storage`` (created if new), with heartbeats so a killed run's cell is freed."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kwargs: dict[str, Any] = {"heartbeat_interval": HEARTBEAT_S, "grace_period": 2 * HEARTBEAT_S}
    if storage.startswith("sqlite"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    rdb = optuna.storages.RDBStorage(storage, **kwargs)
    return optuna.create_study(study_name=name, storage=rdb, direction="minimize", load_if_exists=True)


def _cell(trial: optuna.trial.FrozenTrial) -> Cell | None:
    cell = trial.user_attrs.get("cell")
    return (str(cell[0]), int(cell[1])) if cell else None


def finished_runs(study: optuna.Study) -> dict[Cell, dict[str, Any]]:
    """The run of every finished cell (the first trial that finished it), in trial order."""
    runs: dict[Cell, dict[str, Any]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        cell = _cell(trial)
        if cell is not None and cell not in runs:
            runs[cell] = trial.user_attrs["run"]
    return runs


def _taken(study: optuna.Study) -> set[Cell]:
    """Cells finished or being run now (a trial running with a stale heartbeat is failed first)."""
    optuna.storages.fail_stale_trials(study)
    states = (TrialState.COMPLETE, TrialState.RUNNING)
    return {c for t in study.get_trials(deepcopy=False, states=states) if (c := _cell(t)) is not None}


def run_value(run: dict[str, Any], target: str) -> float:
    """A run's trial value: its steps to ``target``, else ``cap * (1 + shortfall)`` as ``lightning-grokfast tune``."""
    steps = run["steps_to"].get(target)
    if steps is not None:
        return float(steps)
    best = max((v for _, v, *_ in run.get("curve") or []), default=math.nan)
    shortfall = 1.0 if not math.isfinite(best) else min(1.0, max(0.0, (float(target) - best) / float(target)))
    return run["cap"] * (1.0 + shortfall)


def run_cells(
    study: optuna.Study, cells: list[Cell], run: Callable[[str, int], dict[str, Any]], target: str
) -> list[dict[str, Any]]:
    """Run every cell of ``cells`` that no worker has finished or is running, one trial each, in order.

    ``run(row, seed)`` trains and returns the run's result. A run stopped by Ctrl-C or SIGTERM (``"interrupted"``
    in its result) is recorded as a failed trial, which leaves its cell to the next invocation, and ends this one
    with ``KeyboardInterrupt``.

    Returns:
        The runs finished by this call.
    """
    done: list[dict[str, Any]] = []
    while any(c not in _taken(study) for c in cells):
        chosen = _run_free_cell(study, cells, run, target)
        if "run" in chosen:
            done.append(chosen["run"])
        elif "cell" in chosen:  # the run raised (recorded as failed, with its error): not again in this call
            cells = [c for c in cells if c != chosen["cell"]]
    return done


def _run_free_cell(
    study: optuna.Study, cells: list[Cell], run: Callable[[str, int], dict[str, Any]], target: str
) -> dict[str, Any]:
    """One trial on the first cell nobody has taken: ``{"cell": ..., "run": ...}`` (what got that far)."""
    chosen: dict[str, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        free = [c for c in cells if c not in _taken(study)]  # another worker may have taken one meanwhile
        if not free:
            raise optuna.TrialPruned("every cell is taken")
        chosen["cell"] = free[0]
        trial.set_user_attr("cell", list(free[0]))
        result = run(*free[0])
        trial.set_user_attr("run", result)
        chosen["run"] = result
        if result.get("interrupted"):
            raise KeyboardInterrupt(f"stopped at step {result['steps_run']:,}")
        return run_value(result, target)

    study.optimize(objective, n_trials=1, catch=(Exception,))
    return chosen


def migrate(study: optuna.Study, runs: Iterable[dict[str, Any]], target: str) -> int:
    """Add measured ``runs`` (result dicts of an earlier JSON report) as finished trials of cells not yet there.

    Returns:
        How many runs were added.
    """
    present = set(finished_runs(study))
    added = 0
    for run in runs:
        cell = (str(run["config"]), int(run["seed"]))
        if cell in present:
            continue
        run = {**run, "curve": run.get("curve") or []}
        wall = datetime.timedelta(seconds=float(run.get("wall_s") or 0.0))
        now = datetime.datetime.now()
        trial = optuna.trial.create_trial(
            value=run_value(run, target),
            user_attrs={"cell": list(cell), "run": json.loads(json.dumps(run)), "migrated": True},
        )
        trial.datetime_start, trial.datetime_complete = now - wall, now
        study.add_trial(trial)
        present.add(cell)
        added += 1
    return added
