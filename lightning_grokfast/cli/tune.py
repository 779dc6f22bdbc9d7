"""``lightning-grokfast tune``: search the Grokfast settings of a fit config with Optuna.

Each trial is one ``fit`` of the config (per seed) with Grokfast settings drawn from the search space
(:mod:`~lightning_grokfast.cli.tune_space`); its value is the number of optimizer steps to the target
(:mod:`~lightning_grokfast.cli.tune_trial`), minimized. The study lives in an Optuna storage (an SQLite file in the
working directory by default), so several processes or machines given the same ``--storage`` and ``--study-name``
share it; each runs ``--n-trials`` trials. ``--export`` and ``--report`` read a study and run no trials
(:mod:`~lightning_grokfast.cli.tune_report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lightning_grokfast.cli.tune_space import DEFAULT_SEARCH_SPACE, SearchSpace, apply_settings, describe
from lightning_grokfast.cli.tune_trial import ARGS_AND_ARGV, TrialSpec, median_value, run_seed

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = ["DEFAULT_STORAGE", "build_parser", "main"]

#: Storage used without ``--storage``: an SQLite file in the working directory.
DEFAULT_STORAGE = "sqlite:///grokfast_tune.db"
_ATTEMPTS = 5  # tries to open the storage / create the study while other workers initialise them
#: Study user attribute holding what every worker and ``--export`` must share (config, space, target, seeds).
STUDY_ATTR = "lightning_grokfast"

_EPILOG = """\
examples:
  lightning-grokfast tune --config configs/parity_baseline.yaml --n-trials 30 --seeds 0 1 2
  lightning-grokfast tune --config configs/ema.yaml --trainer.max_steps 1500 --search-space space.yaml
  lightning-grokfast tune --study-name parity_baseline --export best.yaml
  lightning-grokfast fit --config best.yaml
  lightning-grokfast tune --study-name parity_baseline --report

Every argument not listed above is passed to the fit config as an override (--trainer.*, --model.*, --data.*,
--grokfast.*), as `lightning-grokfast fit` takes it; the sampled settings are applied on top.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-grokfast tune`` (unknown arguments are fit overrides).

    Returns:
        The parser; ``parse_known_args`` leaves the fit overrides (``--trainer.*``, ``--data.*``, ...) over.

    Example::

        args, overrides = build_parser().parse_known_args(["--config", "ma.yaml", "--trainer.max_steps", "300"])

    """
    parser = argparse.ArgumentParser(
        prog="lightning-grokfast tune",
        description=(
            "Search the Grokfast settings (filter, alpha, lamb, window_size) that make a fit config reach its target"
            " validation metric in the fewest optimizer steps, with Optuna. Each trial is one `fit` of the config"
            " per seed; its value is the steps to the target (median over --seeds), minimized."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    study = parser.add_argument_group("study")
    study.add_argument(
        "--config",
        action="append",
        metavar="CONFIG.yaml",
        help="the fit config every trial runs (as `lightning-grokfast fit --config`; may be repeated). Needed to"
        " create a study; a worker joining an existing study may leave it out and use the stored one.",
    )
    study.add_argument(
        "--study-name",
        help="name of the study in the storage (default: the stem of the first --config; with --export/--report"
        " and no --config, the storage's only study)",
    )
    study.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help=f"Optuna RDB storage URL shared by all workers (default {DEFAULT_STORAGE}: a file in the working"
        " directory; postgresql://user@host/db for many machines)",
    )
    study.add_argument(
        "--n-trials", type=int, default=30, help="trials this process runs, whatever other workers do (default 30)"
    )
    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seeds of each trial (seed_everything and the datamodule's seed); its value is the median over them"
        " (default: 0)",
    )
    objective.add_argument("--target", type=float, default=0.95, help="value of --monitor to reach (default 0.95)")
    objective.add_argument("--monitor", default="val_acc", help="validation metric to watch (default val_acc)")
    objective.add_argument(
        "--mode",
        choices=("max", "min"),
        default="max",
        help="max: the target is reached at >= --target (accuracies); min: at <= (losses). Default max.",
    )
    objective.add_argument(
        "--search-space",
        metavar="FILE.yaml",
        help="YAML search space replacing the default one: {name: [choices] | {low, high, log, step, type} |"
        " value}; plain names are GrokfastCallback arguments, dotted names config paths (see the docs)",
    )
    search = parser.add_argument_group("sampler and pruner")
    search.add_argument(
        "--sampler",
        choices=("tpe", "random", "grid"),
        default="tpe",
        help="tpe: Optuna's TPE, multivariate, with constant liar for parallel workers (default); random; grid:"
        " every combination of a search space made of lists only",
    )
    search.add_argument("--sampler-seed", type=int, help="seed of the sampler (give each worker its own)")
    search.add_argument(
        "--pruner",
        choices=("patient", "median", "hyperband", "none"),
        default="patient",
        help="patient (default): prune a run whose metric is behind the median of the finished trials at the same"
        " step AND has not improved for --prune-patience optimizer steps; median: the median rule alone;"
        " hyperband: Optuna's HyperbandPruner; none: never prune",
    )
    search.add_argument(
        "--prune-warmup-steps",
        type=int,
        help="no pruning before this optimizer step (default: a quarter of trainer.max_steps; see"
        " benchmarks/results/grokking_pruning.md)",
    )
    search.add_argument(
        "--prune-patience",
        type=int,
        help="optimizer steps without a new best value before the patient pruner may prune (default: a quarter of"
        " trainer.max_steps, as the warm-up; counted in steps, so it does not depend on how often the config"
        " validates)",
    )
    search.add_argument(
        "--prune-startup-trials", type=int, default=5, help="finished trials before any pruning (default 5)"
    )
    workers = parser.add_argument_group("workers")
    workers.add_argument(
        "--heartbeat-interval",
        type=int,
        default=60,
        help="seconds between a running trial's heartbeats; a trial silent for --grace-period seconds (its worker"
        " was killed) is marked failed and retried by the next worker (default 60; 0: no heartbeat)",
    )
    workers.add_argument(
        "--grace-period",
        type=int,
        help="seconds after its last heartbeat at which a running trial counts as dead (default: twice"
        " --heartbeat-interval)",
    )
    workers.add_argument("--max-retry", type=int, default=3, help="retries of a trial whose worker died (default 3)")
    output = parser.add_argument_group("output (no trials are run)")
    output.add_argument(
        "--export",
        metavar="PATH",
        help="write the best trial as a fit config: `lightning-grokfast fit --config PATH` runs it as is",
    )
    output.add_argument(
        "--report",
        nargs="?",
        const="",
        metavar="DIR",
        help="print the trials as a table and write figures (optimization history, parameter importances,"
        " validation curves) into DIR (default: <study-name>_report)",
    )
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's per-fit messages and warnings")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ``lightning-grokfast tune``.

    Args:
        argv: the arguments after ``tune`` (default ``sys.argv[2:]``).

    Raises:
        SystemExit: With status 2 on bad arguments, 130 after Ctrl-C (the trial then running is recorded as failed).

    Example::

        from lightning_grokfast.cli.tune import main

        main(["--config", "configs/parity_baseline.yaml", "--n-trials", "2", "--trainer.max_steps", "100"])

    """
    parser = build_parser()
    argv = sys.argv[2:] if argv is None else list(argv)
    args, overrides = parser.parse_known_args(argv)
    stray = [a for a in overrides if a.startswith("-") and not a.startswith("--")]
    if stray:
        parser.error(f"unknown arguments {stray}; fit overrides have the form --group.name VALUE")
    if overrides and not args.config:
        parser.error(f"fit overrides {overrides} need --config")
    if not math.isfinite(args.target):
        parser.error(f"--target must be a finite number, got {args.target}")
    for name in ("n_trials", "prune_patience", "prune_startup_trials", "heartbeat_interval", "max_retry"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")

    try:
        import optuna
    except ImportError:
        parser.exit(2, "lightning-grokfast tune needs Optuna: pip install 'lightning-grokfast[tune]'\n")

    optuna.logging.set_verbosity(optuna.logging.WARNING if args.verbose else optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not args.verbose:
        _quiet_lightning()
    storage = open_storage(args)
    study_name = args.study_name or (Path(args.config[0]).stem if args.config else _only_study(storage, parser))

    if args.export is not None or args.report is not None:
        from lightning_grokfast.cli import tune_report

        study = _load_study(study_name, storage, parser)
        if args.report is not None:
            tune_report.report(study, Path(args.report or f"{study_name}_report"))
        if args.export is not None:
            tune_report.export(study, Path(args.export))
        return

    from lightning_grokfast.cli.tune_pruning import make_pruner

    setup = _study_setup(args, overrides, parser, argv)
    if not setup:  # a worker joining with the stored config
        stored = _load_study(study_name, storage, parser).user_attrs.get(STUDY_ATTR)
        if stored is None:
            parser.error(f"study {study_name!r} has no stored config: --config is needed to create it")
        setup = dict(stored)
    for attempt in range(_ATTEMPTS):  # workers starting together may race to create the study
        try:
            study = optuna.create_study(
                study_name=study_name,
                storage=storage,
                direction="minimize",
                load_if_exists=True,
                sampler=make_sampler(args, SearchSpace(setup["search_space"])),
                pruner=make_pruner(args, setup["fit_config"]),
            )
            setup = _agree(study, setup, args.config is not None, parser)
            break
        except Exception:
            if attempt == _ATTEMPTS - 1:
                raise
            time.sleep(1.0 + attempt)
    space, spec = SearchSpace(setup["search_space"]), TrialSpec(**{**setup["spec"], "seeds": tuple(setup["seeds"])})
    print(
        f"[tune] study {study_name!r} in {args.storage}: {args.n_trials} trials here, seeds {list(spec.seeds)},"
        f" {spec.monitor} {'>=' if spec.mode == 'max' else '<='} {spec.target:g}",
        flush=True,
    )

    def objective(trial: optuna.Trial) -> float:
        return run_trial(trial, setup["fit_config"], space, spec)

    try:
        study.optimize(
            objective, n_trials=args.n_trials, catch=(Exception,), callbacks=[_progress_line], gc_after_trial=True
        )
    except KeyboardInterrupt:
        print(
            "[tune] interrupted: the running trial is recorded as FAILED; the study is intact. Run the same command"
            " to go on.",
            flush=True,
        )
        raise SystemExit(130) from None


def run_trial(trial: optuna.Trial, fit_config: dict[str, Any], space: SearchSpace, spec: TrialSpec) -> float:
    """One trial: draw the settings, fit every seed, record them, return the median value.

    The first seed's validation curve is reported to the pruner (the later seeds run only if it is not pruned).
    Settings that repeat an ended trial's (``filter: none`` has nothing else to draw) end as it ended without
    training again: with its value, or pruned at the same step (the fits are seeded, so the curve would be the same;
    the pruner is not asked again).
    Per-seed steps, the step budget and any error are stored as the trial's user attributes.
    """
    from optuna.trial import TrialState

    settings = space.sample(trial)
    ended = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    for previous in ended:  # the fits are seeded: the same settings give the same runs
        if previous.params == trial.params:
            return _repeat(trial, previous)
    config = apply_settings(fit_config, settings)
    outcomes = []
    started = time.perf_counter()
    try:
        for index, seed in enumerate(spec.seeds):
            outcomes.append(run_seed(config, spec, seed, trial if index == 0 else None))
    except KeyboardInterrupt:
        trial.set_user_attr("error", "interrupted (Ctrl-C)")
        raise
    except Exception as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
        raise
    finally:
        trial.set_user_attr("steps_to_target", {str(o.seed): o.steps for o in outcomes})
        trial.set_user_attr("best_value", {str(o.seed): o.best for o in outcomes})
        trial.set_user_attr("cap", max((o.cap for o in outcomes), default=None))
        trial.set_user_attr("seconds", time.perf_counter() - started)  # a pruned seed's time included
    return median_value(outcomes, spec)


def _repeat(trial: optuna.Trial, previous: FrozenTrial) -> float:
    """End ``trial`` as ``previous`` ended (same settings, seeded fits): its value, or pruned at the same step."""
    import optuna
    from optuna.trial import TrialState

    trial.set_user_attr("repeats_trial", previous.number)
    if previous.state == TrialState.PRUNED:
        for step, value in sorted(previous.intermediate_values.items()):
            trial.report(value, step)  # the same curve, so the report shows where it was cut
        raise optuna.TrialPruned(f"as trial {previous.number} (same settings, not trained again)")
    for key in ("steps_to_target", "best_value", "cap"):
        trial.set_user_attr(key, previous.user_attrs.get(key))
    assert previous.value is not None  # a COMPLETE trial has its value
    return previous.value


def open_storage(args: argparse.Namespace) -> optuna.storages.RDBStorage:
    """The RDB storage at ``--storage`` with heartbeats and a retry of trials whose worker died."""
    import optuna
    from optuna.storages import RDBStorage

    engine_kwargs: dict[str, Any] = {}
    if args.storage.startswith("sqlite"):  # several workers on one file wait for each other's writes
        engine_kwargs["connect_args"] = {"timeout": 60}
    retry: dict[str, Any] = {}
    if args.max_retry and args.heartbeat_interval:
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
            retry["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(args.max_retry)
        else:
            retry["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=args.max_retry)
    for attempt in range(_ATTEMPTS):
        try:
            return RDBStorage(
                args.storage,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=args.heartbeat_interval or None,
                grace_period=args.grace_period,
                **retry,
            )
        except (ImportError, ValueError) as error:
            raise SystemExit(f"[tune] cannot open --storage {args.storage}: {error}") from error
        except Exception as error:  # workers creating one new database at once: its tables are being made
            if attempt == _ATTEMPTS - 1:
                raise SystemExit(f"[tune] cannot open --storage {args.storage}: {error}") from error
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def make_sampler(args: argparse.Namespace, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The ``--sampler`` over ``space``."""
    import optuna

    if args.sampler == "grid":
        if not space.is_grid:
            raise SystemExit("[tune] --sampler grid needs a search space made of lists (choices) only")
        return optuna.samplers.GridSampler(space.grid(), seed=args.sampler_seed)
    if args.sampler == "random":
        return optuna.samplers.RandomSampler(seed=args.sampler_seed)
    return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=args.sampler_seed)


def resolve_fit_config(configs: list[str], overrides: list[str]) -> dict[str, Any]:
    """The fit config that ``lightning-grokfast fit --config ... OVERRIDES`` would run, as plain data.

    Parsed by the fit CLI itself (so every override is checked as ``fit`` checks it), nothing instantiated.
    """
    from lightning_grokfast.cli.fit import TASK_TRAINER_DEFAULTS, TaskCLI

    class _ParseOnly(TaskCLI):
        def before_instantiate_classes(self) -> None:
            """The task sizes are filled in by each trial's own parse."""

        def instantiate_classes(self) -> None:
            """Nothing is built: only the parsed config is wanted."""

    args = [item for path in configs for item in ("--config", path)] + list(overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ARGS_AND_ARGV)
        cli = _ParseOnly(args=args, run=False, trainer_defaults=TASK_TRAINER_DEFAULTS, save_config_callback=None)
    dumped = cli.parser.dump(cli.config, skip_unset=False)
    config = yaml.safe_load(dumped)
    config.pop("config", None)
    return config


def _study_setup(
    args: argparse.Namespace, overrides: list[str], parser: argparse.ArgumentParser, argv: list[str]
) -> dict[str, Any]:
    if not args.config:
        return {}
    try:
        space = SearchSpace.from_yaml(args.search_space) if args.search_space else SearchSpace(DEFAULT_SEARCH_SPACE)
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.error(f"--search-space: {error}")
    fit_config = resolve_fit_config(args.config, overrides)
    setup = {
        "fit_config": fit_config,
        "search_space": space.to_dict(),
        "spec": {"monitor": args.monitor, "mode": args.mode, "target": args.target},
        "seeds": list(args.seeds),
        "command": " ".join(["lightning-grokfast tune", *argv]),
    }
    return json.loads(json.dumps(setup))  # as the storage will return it


def _agree(study: optuna.Study, setup: dict[str, Any], given: bool, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Store the setup with a new study; check that a joining worker runs the same one (or adopt it)."""
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        study.set_user_attr(STUDY_ATTR, setup)
        return setup
    if given:
        for key in ("fit_config", "search_space", "spec", "seeds"):
            if stored[key] != setup[key]:
                parser.error(
                    f"study {study.study_name!r} was created with another {key.replace('_', ' ')}; every worker of a"
                    " study runs the same command (or leaves out --config to use the stored one). Pick another"
                    " --study-name for a new search."
                )
    return dict(stored)


def _load_study(name: str, storage: optuna.storages.BaseStorage, parser: argparse.ArgumentParser) -> optuna.Study:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        parser.error(f"no study {name!r} in the storage (it holds {names or 'no studies'}); --config creates one")


def _only_study(storage: optuna.storages.BaseStorage, parser: argparse.ArgumentParser) -> str:
    import optuna

    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if len(names) != 1:
        parser.error(f"--study-name is needed (the storage holds {names or 'no studies'})")
    return names[0]


def _progress_line(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    from lightning_grokfast.cli.tune_report import outcome_text

    try:
        best = study.best_trial
        best_text = f"best {best.value:,.0f} (trial {best.number})"
    except ValueError:
        best_text = "no finished trial yet"
    setup = study.user_attrs.get(STUDY_ATTR, {})
    settings = SearchSpace(setup["search_space"]).settings_of(trial.params) if setup else trial.params
    print(f"[tune] trial {trial.number}: {describe(settings)}: {outcome_text(trial)} | {best_text}", flush=True)


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*litlogger.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message)
