"""``lightning-grokfast tune --export`` and ``--report``: the best trial as a fit config; the trials as a table and
figures. Both read the study from its storage and run no trials."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lightning_grokfast.cli.tune_space import SearchSpace, apply_settings, describe
from lightning_grokfast.cli.tune_trial import seeded

if TYPE_CHECKING:
    import optuna

__all__ = ["export", "outcome_text", "report", "trial_rows"]

_STUDY_ATTR = "lightning_grokfast"


def _setup(study: optuna.Study) -> dict[str, Any]:
    setup = study.user_attrs.get(_STUDY_ATTR)
    if setup is None:
        raise SystemExit(f"[tune] study {study.study_name!r} was not made by `lightning-grokfast tune` (no config)")
    return dict(setup)


def outcome_text(trial: optuna.trial.FrozenTrial) -> str:
    """One trial's result in words; with several seeds, the steps of each.

    Args:
        trial: a trial of a tune study.

    Returns:
        ``910 steps``, ``not reached by 3,000 (value 4,650)``, ``pruned at step 700``, ``FAILED: ValueError: ...``.

    Example::

        print(outcome_text(study.best_trial))  # "850 steps (seeds 0: 850, 1: 1,100, 2: 850)"

    """
    from optuna.trial import TrialState

    repeats = trial.user_attrs.get("repeats_trial")
    again = "" if repeats is None else f", as trial {repeats} (same settings, not trained again)"
    if trial.state == TrialState.PRUNED:
        return (f"pruned at step {trial.last_step:,}" if trial.last_step is not None else "pruned") + again
    if trial.state == TrialState.FAIL:
        return f"FAILED: {trial.user_attrs.get('error', 'no error recorded (worker died or was interrupted)')}"
    if trial.state != TrialState.COMPLETE or trial.value is None:
        return trial.state.name
    steps: dict[str, int | None] = trial.user_attrs.get("steps_to_target", {})
    cap = trial.user_attrs.get("cap")
    per_seed = ", ".join(f"{seed}: {_steps(s, cap)}" for seed, s in steps.items())
    reached = trial.value <= (cap or math.inf)
    head = f"{trial.value:,.0f} steps" if reached else f"not reached by {cap:,} (value {trial.value:,.0f})"
    head = f"{head} (seeds {per_seed})" if len(steps) > 1 else head
    return head + again


def _steps(steps: int | None, cap: int | None) -> str:
    return f"{steps:,}" if steps is not None else f"> {cap:,}" if cap else "not reached"


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial of a study, in trial order.

    Args:
        study: a tune study.

    Returns:
        One ``{trial, state, settings, result, seconds, value}`` dict per trial.

    Example::

        for row in trial_rows(study):
            print(row["trial"], row["settings"], row["result"])

    """
    space = SearchSpace(_setup(study)["search_space"])
    rows = []
    for trial in study.get_trials(deepcopy=False):
        settings = space.settings_of(trial.params) if trial.params else {}
        seconds = trial.user_attrs.get("seconds")
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "settings": describe(settings),
                "result": outcome_text(trial),
                "value": trial.value,
                "seconds": f"{seconds:.0f}" if isinstance(seconds, (int, float)) else "",
            }
        )
    return rows


def report(study: optuna.Study, directory: Path) -> Path:
    """Print the trials as a markdown table (best first) and write the figures into ``directory``.

    Figures: ``history.png`` (value per trial and best so far), ``importances.png`` (Optuna's parameter
    importances, from two finished trials on), ``curves.png`` (the distance to the target reported at every
    validation: the pruners' view). The table is also written as ``trials.md``.

    Args:
        study: a tune study.
        directory: where the table and the figures go (created if missing).

    Returns:
        ``directory``.

    Example::

        report(optuna.load_study(study_name="parity", storage="sqlite:///grokfast_tune.db"), Path("tune_report"))

    """
    rows = trial_rows(study)
    rows.sort(key=lambda r: (r["value"] is None, r["value"] if r["value"] is not None else 0, r["trial"]))
    lines = [
        f"Study `{study.study_name}`: {len(rows)} trials; value = optimizer steps to the target (median over seeds).",
        "",
        "| trial | state | settings | result | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['trial']} | {r['state']} | {r['settings']} | {r['result']} | {r['seconds']} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trials.md").write_text(table)
    for name, draw in (("history", _history), ("importances", _importances), ("curves", _curves)):
        try:
            draw(study, directory / f"{name}.png")
            print(f"[tune] wrote {directory / f'{name}.png'}")
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # too few trials for this figure
            print(f"[tune] no {name}.png: {error}")
    return directory


def export(study: optuna.Study, path: Path) -> Path:
    """Write the best trial of ``study`` as a fit config at ``path`` (``lightning-grokfast fit --config path``).

    The config is the study's fit config (with its overrides) plus the best trial's settings, seeded with the
    study's first seed; a comment at the top says where it comes from.

    Args:
        study: a tune study.
        path: the YAML file to write.

    Returns:
        ``path``.

    Raises:
        SystemExit: If the study has no finished trial.

    Example::

        export(study, Path("best.yaml"))  # then: lightning-grokfast fit --config best.yaml

    """
    setup = _setup(study)
    try:
        best = study.best_trial
    except ValueError:
        raise SystemExit(f"[tune] study {study.study_name!r} has no finished trial to export") from None
    settings = SearchSpace(setup["search_space"]).settings_of(best.params)
    config = seeded(apply_settings(setup["fit_config"], settings), setup["seeds"][0])
    header = (
        f"# Best trial ({best.number}) of the tune study {study.study_name!r}: {describe(settings)}\n"
        f"# {outcome_text(best)}; target {setup['spec']['monitor']} {setup['spec']['target']}, seeds {setup['seeds']}\n"
        f"#   lightning-grokfast fit --config {path.name}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    print(f"[tune] wrote {path}: trial {best.number}, {describe(settings)}")
    return path


def _history(study: optuna.Study, path: Path) -> None:
    from optuna.visualization.matplotlib import plot_optimization_history

    _save(plot_optimization_history(study, target_name="steps to target"), path)


def _importances(study: optuna.Study, path: Path) -> None:
    from optuna.visualization.matplotlib import plot_param_importances

    _save(plot_param_importances(study, target_name="steps to target"), path)


def _curves(study: optuna.Study, path: Path) -> None:
    from optuna.visualization.matplotlib import plot_intermediate_values

    axes = plot_intermediate_values(study)
    axes.set_ylabel("distance to the target (first seed)")
    axes.set_xlabel("optimizer step")
    _save(axes, path)


def _save(axes: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = axes.get_figure() if hasattr(axes, "get_figure") else axes.flat[0].get_figure()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
