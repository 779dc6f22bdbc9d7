"""``lightning-grokfast tune``: trials on a real Optuna storage (SQLite, PostgreSQL), workers, export, pruning."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from lightning_grokfast import GrokfastCallback  # noqa: E402
from lightning_grokfast.cli import main as cli_main  # noqa: E402
from lightning_grokfast.cli.tune import build_parser, main  # noqa: E402
from lightning_grokfast.cli.tune_space import DEFAULT_SEARCH_SPACE, SearchSpace, apply_settings  # noqa: E402
from lightning_grokfast.cli.tune_trial import TrialSpec, not_reached_value  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "lightning_grokfast" / "configs" / "parity_baseline.yaml")

#: Sparse parity made easy (10 bits, 2 relevant, no weight decay): at lr 0.01 validation accuracy passes 0.9 at
#: step 25 of 40; at lr 1e-6 it stays near chance. About a second per trial.
TINY = [
    "--trainer.max_steps=40",
    "--trainer.val_check_interval=5",
    "--data.init_args.num_bits=10",
    "--data.init_args.k=2",
    "--data.init_args.num_train=200",
    "--data.init_args.num_val=200",
    "--data.init_args.batch_size=200",
    "--model.init_args.hidden=64",
    "--model.init_args.weight_decay=0.0",
    "--model.init_args.lr=0.01",
]


def tune_args(storage: str, *extra: str, name: str = "tiny") -> list[str]:
    return ["--config", CONFIG, "--study-name", name, "--storage", storage, "--target", "0.9", *TINY, *extra]


def space_file(tmp_path: Path, space: dict) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def load(storage: str, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def reaching(tmp_path: Path) -> str:
    """A search space of one setting that reaches the target of :data:`TINY` (no filter, lr 0.01: step 25)."""
    return space_file(tmp_path, {"filter": "none"})


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tune.db'}"


# ---------------------------------------------------------------------- the objective
def test_a_trial_is_a_fit_whose_value_is_the_steps_to_the_target(storage: str, tmp_path: Path) -> None:
    main(tune_args(storage, "--n-trials", "1", "--pruner", "none", "--search-space", reaching(tmp_path)))
    (trial,) = load(storage).trials
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["steps_to_target"]["0"] == trial.value
    assert 0 < trial.value <= 40 and trial.value % 5 == 0  # a validation step within the budget


def test_not_reached_counts_more_than_the_budget_and_less_the_closer_it_came() -> None:
    spec = TrialSpec(target=0.95)
    assert 3000 < not_reached_value(spec, 0.9, 3000) < not_reached_value(spec, 0.5, 3000) <= 6000
    assert not_reached_value(spec, float("nan"), 3000) == 6000


def test_seeds_make_the_value_the_median_of_one_fit_per_seed(storage: str, tmp_path: Path) -> None:
    main(
        tune_args(
            storage,
            "--n-trials",
            "1",
            "--pruner",
            "none",
            "--seeds",
            "0",
            "1",
            "2",
            "--search-space",
            reaching(tmp_path),
        )
    )
    (trial,) = load(storage).trials
    steps = trial.user_attrs["steps_to_target"]
    assert sorted(steps) == ["0", "1", "2"]
    assert trial.value == sorted(steps.values())[1]


def test_progress_line_names_the_trial_settings_steps_and_best(storage: str, capsys: pytest.CaptureFixture) -> None:
    main(tune_args(storage, "--n-trials", "2", "--pruner", "none"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[tune] trial")]
    assert len(lines) == 2
    assert all("filter=" in line and "steps" in line and "| best" in line for line in lines)


def test_a_trial_repeating_finished_settings_takes_their_value_without_training(storage: str, tmp_path: Path) -> None:
    space = space_file(tmp_path, {"filter": "none"})
    main(tune_args(storage, "--n-trials", "2", "--pruner", "none", "--search-space", space))
    first, second = load(storage).trials
    assert second.value == first.value and second.user_attrs["repeats_trial"] == 0
    assert "seconds" not in second.user_attrs  # nothing was trained


# ---------------------------------------------------------------------- search space
def test_default_search_space_covers_the_four_filters_and_their_settings() -> None:
    assert DEFAULT_SEARCH_SPACE["filter"] == ["none", "ema", "ma", "ema+ma"]
    assert {"alpha", "lamb", "window_size", "ma_lamb"} <= set(DEFAULT_SEARCH_SPACE)


def test_settings_apply_only_to_the_filters_that_use_them() -> None:
    space = SearchSpace(DEFAULT_SEARCH_SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        settings = space.sample(study.ask())
        if settings["filter"] == "none":
            assert set(settings) == {"filter"}
        assert ("alpha" in settings) == (settings["filter"] in ("ema", "ema+ma"))
        assert ("window_size" in settings) == (settings["filter"] in ("ma", "ema+ma"))


def test_filter_none_switches_grokfast_off_and_dotted_names_set_config_paths() -> None:
    config = {"grokfast": {"enabled": True, "filter": "ema"}, "model": {"init_args": {"lr": 1.0}}}
    off = apply_settings(config, {"filter": "none", "model.init_args.lr": 0.5})
    assert off["grokfast"]["enabled"] is False and off["model"]["init_args"]["lr"] == 0.5
    assert config["model"]["init_args"]["lr"] == 1.0  # the input is left alone


@pytest.mark.parametrize(
    "spec",
    [{"lamb": {"low": 2.0, "high": 1.0}}, {"lamb": {"low": 0.0, "high": 1.0, "log": True}}, {"filter": ["sgd"]}],
    ids=["low-above-high", "log-from-zero", "unknown-filter"],
)
def test_a_malformed_search_space_is_refused_naming_the_entry(spec: dict) -> None:
    with pytest.raises(ValueError, match=r"Search space `(lamb|filter)`"):
        SearchSpace(spec)


def test_search_space_file_replaces_the_default_one(storage: str, tmp_path: Path) -> None:
    space = space_file(tmp_path, {"filter": "ma", "window_size": [7], "lamb": {"low": 1.0, "high": 2.0}})
    main(tune_args(storage, "--n-trials", "1", "--pruner", "none", "--search-space", space))
    (trial,) = load(storage).trials
    assert trial.params["window_size"] == 7 and 1.0 <= trial.params["lamb"] <= 2.0 and "filter" not in trial.params


# ---------------------------------------------------------------------- failures, pruning, workers
def test_a_failing_trial_is_recorded_failed_with_its_error_and_the_study_goes_on(storage: str, tmp_path: Path) -> None:
    space = space_file(tmp_path, {"filter": "none", "model.init_args.lr": [-1.0, 0.01]})
    study = optuna.create_study(study_name="tiny", storage=storage)
    study.enqueue_trial({"model.init_args.lr": -1.0})
    study.enqueue_trial({"model.init_args.lr": 0.01})
    main(tune_args(storage, "--n-trials", "2", "--pruner", "none", "--search-space", space))
    failed, completed = load(storage).trials
    assert failed.state == TrialState.FAIL and "lr" in failed.user_attrs["error"]
    assert completed.state == TrialState.COMPLETE


def test_a_missing_metric_fails_the_trial_naming_the_logged_ones(storage: str) -> None:
    main(tune_args(storage, "--n-trials", "1", "--monitor", "val_f1"))
    (trial,) = load(storage).trials
    assert trial.state == TrialState.FAIL and "val_f1" in trial.user_attrs["error"]
    assert "val_acc" in trial.user_attrs["error"]


def test_a_pruned_trial_is_recorded_pruned(storage: str, tmp_path: Path) -> None:
    space = space_file(tmp_path, {"filter": "none", "model.init_args.lr": [0.01, 1.0e-6]})
    study = optuna.create_study(study_name="tiny", storage=storage)
    study.enqueue_trial({"model.init_args.lr": 0.01})
    study.enqueue_trial({"model.init_args.lr": 1.0e-6})  # stays at chance: behind the first at every step
    prune = ["--pruner", "median", "--prune-startup-trials", "1", "--prune-warmup-steps", "10"]
    main(tune_args(storage, "--n-trials", "2", "--search-space", space, *prune))
    first, second = load(storage).trials
    assert first.state == TrialState.COMPLETE
    assert second.state == TrialState.PRUNED and second.last_step == 10


def test_a_trial_repeating_pruned_settings_is_pruned_at_the_same_step_without_training(
    storage: str, tmp_path: Path
) -> None:
    space = space_file(tmp_path, {"filter": "none", "model.init_args.lr": [0.01, 1.0e-6]})
    study = optuna.create_study(study_name="tiny", storage=storage)
    for lr in (0.01, 1.0e-6, 1.0e-6):
        study.enqueue_trial({"model.init_args.lr": lr})
    prune = ["--pruner", "median", "--prune-startup-trials", "1", "--prune-warmup-steps", "10"]
    main(tune_args(storage, "--n-trials", "3", "--search-space", space, *prune))
    _, second, third = load(storage).trials
    assert second.state == third.state == TrialState.PRUNED
    assert third.user_attrs["repeats_trial"] == 1 and "seconds" not in third.user_attrs
    assert third.intermediate_values == second.intermediate_values and third.last_step == second.last_step == 10


def test_the_patient_pruner_spares_a_run_that_is_still_improving(storage: str, tmp_path: Path) -> None:
    space = space_file(tmp_path, {"filter": "none", "model.init_args.lr": [0.01, 0.003]})
    for pruner, expected in (("median", TrialState.PRUNED), ("patient", TrialState.COMPLETE)):
        name = f"slower-{pruner}"
        study = optuna.create_study(study_name=name, storage=storage)
        study.enqueue_trial({"model.init_args.lr": 0.01})
        study.enqueue_trial({"model.init_args.lr": 0.003})  # behind the first, but better at every validation
        prune = ["--pruner", pruner, "--prune-startup-trials", "1", "--prune-warmup-steps", "10"]
        prune += ["--prune-patience", "10"]
        main(tune_args(storage, "--n-trials", "2", "--search-space", space, *prune, name=name))
        assert load(storage, name).trials[1].state == expected, pruner


@pytest.mark.parametrize("every", [10, 100])
def test_the_patience_counts_optimizer_steps_whatever_the_validation_interval(every: int) -> None:
    from lightning_grokfast.cli.tune_pruning import StepPatientPruner

    study = optuna.create_study(pruner=StepPatientPruner(optuna.pruners.MedianPruner(0, 0), patience=1000))
    study.add_trial(optuna.trial.create_trial(value=0.0, intermediate_values={s: 0.0 for s in range(0, 4001, 10)}))
    trial = study.ask()
    decisions = {}
    for step in range(every, 4001, every):  # behind the median at every step; improves until step 1,500
        trial.report(0.9 - 0.1 * (min(step, 1500) / 1500), step)
        decisions[step] = trial.should_prune()
    assert not any(pruned for step, pruned in decisions.items() if step < 2500)  # it improved within 1,000 steps
    assert decisions[2500] and decisions[4000]


def test_the_patience_is_checked() -> None:
    from lightning_grokfast.cli.tune_pruning import StepPatientPruner

    with pytest.raises(ValueError, match="patience"):
        StepPatientPruner(optuna.pruners.MedianPruner(), patience=-1)


def test_a_finished_run_stays_at_the_target_for_the_pruner(storage: str, tmp_path: Path) -> None:
    main(tune_args(storage, "--n-trials", "1", "--pruner", "median", "--search-space", reaching(tmp_path)))
    (trial,) = load(storage).trials
    assert max(trial.intermediate_values) == 40  # reported up to the budget, though it stopped at the target
    assert trial.intermediate_values[40] == trial.intermediate_values[trial.value]


def run_worker(storage: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-c", "from lightning_grokfast.cli import main; main()", "tune"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [*command, *tune_args(storage, *extra)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_two_workers_on_one_sqlite_storage_finish_n_trials_each(storage: str) -> None:
    workers = [run_worker(storage, "--n-trials", "3", "--sampler-seed", str(seed)) for seed in (0, 1)]
    outputs = [worker.communicate(timeout=240)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert [out.count("[tune] trial ") for out in outputs] == [3, 3]
    trials = load(storage).trials
    assert len(trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)


def test_a_worker_with_another_config_is_refused(storage: str, capsys: pytest.CaptureFixture) -> None:
    main(tune_args(storage, "--n-trials", "1"))
    with pytest.raises(SystemExit) as exit_info:
        main(tune_args(storage, "--n-trials", "1", "--trainer.max_steps=30"))
    assert exit_info.value.code == 2 and "another fit config" in capsys.readouterr().err


def test_a_worker_may_join_with_the_stored_config(storage: str) -> None:
    main(tune_args(storage, "--n-trials", "1", "--pruner", "none"))
    main(["--study-name", "tiny", "--storage", storage, "--n-trials", "1", "--pruner", "none"])
    assert len(load(storage).trials) == 2


def wait_for(storage: str, condition, timeout: float = 120.0) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            trials = load(storage).trials
        except KeyError:  # the study does not exist yet
            continue
        if condition(trials):
            return trials
    raise AssertionError(f"timed out; trials: {[(t.number, t.state) for t in load(storage).trials]}")


def test_a_killed_worker_leaves_a_trial_that_the_next_worker_retries_and_ctrl_c_records(
    storage: str, tmp_path: Path
) -> None:
    space = space_file(tmp_path, {"filter": "none", "model.init_args.lr": [1.0e-6]})  # never reaches the target
    args = ["--n-trials", "1", "--heartbeat-interval", "1", "--grace-period", "2", "--search-space", space]
    args += ["--pruner", "none", "--trainer.max_steps=100000"]
    first = run_worker(storage, *args)
    wait_for(storage, lambda trials: trials and trials[0].intermediate_values)  # training
    first.kill()
    first.wait()
    assert load(storage).trials[0].state == TrialState.RUNNING
    time.sleep(3)  # past the grace period: the trial's heartbeat is stale

    second = run_worker(storage, *args)
    trials = wait_for(storage, lambda trials: len(trials) == 2 and trials[1].intermediate_values)
    assert trials[0].state == TrialState.FAIL
    assert trials[1].state == TrialState.RUNNING and trials[1].params == trials[0].params  # the retry
    second.send_signal(signal.SIGINT)  # Ctrl-C
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 130, output
    interrupted = load(storage).trials[1]
    assert interrupted.state == TrialState.FAIL and "interrupted" in interrupted.user_attrs["error"]


# ---------------------------------------------------------------------- export and report
def test_export_writes_the_best_trial_as_a_config_that_fit_runs_as_is(
    storage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main(tune_args(storage, "--n-trials", "2", "--pruner", "none", "--sampler-seed", "0"))
    best = load(storage).best_trial
    exported = tmp_path / "best.yaml"
    main(["--study-name", "tiny", "--storage", storage, "--export", str(exported)])
    config = yaml.safe_load(exported.read_text())
    assert config["grokfast"]["enabled"] == (best.params["filter"] != "none")
    for name, value in best.params.items():
        if name != "filter":
            assert config["grokfast"][name] == value
    monkeypatch.chdir(tmp_path)
    from lightning_grokfast.cli.fit import TaskCLI

    cli_main(["fit", "--config", str(exported)])  # as is: no override
    cli = TaskCLI(args=["--config", str(exported)], run=False)
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, GrokfastCallback)]
    assert callbacks and callbacks[0].enabled == (best.params["filter"] != "none")


def test_report_prints_the_trials_and_writes_the_figures(
    storage: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    main(tune_args(storage, "--n-trials", "3", "--pruner", "none", "--sampler-seed", "0"))
    capsys.readouterr()
    main(["--storage", storage, "--report", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert out.count("| COMPLETE |") == 3
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"trials.md", "history.png", "curves.png"}


# ---------------------------------------------------------------------- the command line
def test_help_explains_every_option(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    for action in parser._actions:  # argparse offers no public list of its options
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        cli_main(["tune", "--help"])
    out = capsys.readouterr().out
    assert "lightning-grokfast tune" in out
    for action in parser._actions:
        assert any(option in out for option in action.option_strings)


# ---------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl in a temporary directory); skipped where none can be had."""
    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): `apt-get install postgresql` to run this test")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (`pip install psycopg2-binary`)")
    user = None
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the PostgreSQL server as")
    directory = Path(tempfile.mkdtemp(prefix="tune-pg-"))
    data = directory / "data"
    if user:
        shutil.chown(directory, user)
    port = _free_port()
    try:
        init = [initdb, "-D", str(data), "-U", "tune", "--auth=trust"]
        subprocess.run(init, user=user, check=True, capture_output=True)
        options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1"
        start = [pg_ctl, "-D", str(data), "-o", options, "-l", str(directory / "log"), "-w", "start"]
        subprocess.run(start, user=user, check=True, capture_output=True)
    except subprocess.CalledProcessError as error:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {error.stderr.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql+psycopg2://tune@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], user=user, capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def test_a_postgresql_backed_study_runs_its_trials(postgres_url: str) -> None:
    main(tune_args(postgres_url, "--n-trials", "2", "--pruner", "none"))
    trials = load(postgres_url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
