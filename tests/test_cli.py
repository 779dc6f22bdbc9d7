"""The ``lightning-grokfast`` CLI: configs, callback groups, the class_path form, and what each run writes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_grokfast import GrokfastCallback, GrokkingDashboardCallback, GrokkingDetectorCallback
from lightning_grokfast.cli.fit import TASK_TRAINER_DEFAULTS, GrokfastCLI, TaskCLI, main
from lightning_grokfast.tasks import (
    DigitsDataModule,
    GrokTransformer,
    MLPClassifier,
    ModularArithmeticDataModule,
    SparseParityDataModule,
    make_modular_dataset,
)
from lightning_grokfast.tasks.losses import stablemax_cross_entropy
from tests.helpers import TinyModel
from tests.test_dashboard import read_events, read_layout

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TASK_CONFIGS = ("baseline", "ema", "ma", "ema_detector", "auto")

#: A few steps on a tiny task with a small model; validation after every epoch (4 steps).
TINY = [
    "--data.p=11",
    "--data.batch_size=16",
    "--model.dim=16",
    "--model.num_heads=2",
    "--model.num_layers=1",
    "--trainer.max_steps=8",
    "--trainer.log_every_n_steps=1",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def program_name_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when given ``args`` while ``sys.argv`` holds more (pytest's own arguments)."""
    monkeypatch.setattr(sys, "argv", ["lightning-grokfast"])


def build(*args: str) -> GrokfastCLI:
    """Parse and instantiate (no subcommand, no training) the ``lightning-grokfast`` CLI."""
    return GrokfastCLI(trainer_defaults=TASK_TRAINER_DEFAULTS, args=list(args), run=False)


def callbacks_of(cli: GrokfastCLI, kind: type) -> list:
    return [c for c in cli.trainer.callbacks if isinstance(c, kind)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Run ``lightning-grokfast fit --config configs/<name>.yaml`` (tiny) once per config; return its log dir."""
    log_dirs: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in log_dirs:
            root = tmp_path_factory.mktemp(name)
            main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *TINY, f"--trainer.default_root_dir={root}"])
            log_dirs[name] = root / "lightning_logs" / "version_0"
        return log_dirs[name]

    return run


# ---------------------------------------------------------------------- every config runs and fills the dashboard
@pytest.mark.parametrize("name", TASK_CONFIGS)
def test_config_run_registers_the_grokking_layout(fitted: Callable[[str], Path], name: str) -> None:
    layout = read_layout(read_events(fitted(name)))
    assert [section.title for section in layout.category] == ["Grokking"]
    assert len(layout.category[0].chart) == 7


@pytest.mark.parametrize("name", TASK_CONFIGS)
def test_config_run_logs_accuracy_loss_gap_and_weight_norm(fitted: Callable[[str], Path], name: str) -> None:
    events = read_events(fitted(name))
    tags = set(events.Tags()["scalars"])
    assert {"train_acc_step", "train_loss_step", "val_acc", "val_loss", "grokking/gap", "grokking/weight_norm"} <= tags
    assert [e.step for e in events.Scalars("grokking/gap")] == [e.step for e in events.Scalars("val_acc")]


@pytest.mark.parametrize("name", TASK_CONFIGS)
def test_config_run_logs_the_accuracy_figure_and_saves_its_png(fitted: Callable[[str], Path], name: str) -> None:
    log_dir = fitted(name)
    assert [image.step for image in read_events(log_dir).Images("grokking/accuracy")] == [8]
    assert (log_dir / "grokking_accuracy.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["ema", "ma", "ema_detector"])
def test_grokfast_configs_log_filter_statistics(fitted: Callable[[str], Path], name: str) -> None:
    tags = set(read_events(fitted(name)).Tags()["scalars"])
    assert {"grokfast/lamb", "grokfast/grad_norm", "grokfast/slow_norm"} <= tags


def test_baseline_config_leaves_gradients_unfiltered(fitted: Callable[[str], Path]) -> None:
    tags = read_events(fitted("baseline")).Tags()["scalars"]
    assert not [tag for tag in tags if tag.startswith("grokfast/")]


def test_auto_config_is_the_auto_grokfast_rule() -> None:
    from lightning_grokfast import auto_grokfast

    cli = build("--config", str(CONFIGS / "auto.yaml"))
    (grokfast,) = callbacks_of(cli, GrokfastCallback)
    (detector,) = callbacks_of(cli, GrokkingDetectorCallback)
    rule_grokfast, rule_detector = auto_grokfast()
    assert (grokfast.filter, grokfast.lamb, grokfast.config.window_size) == (
        rule_grokfast.filter,
        rule_grokfast.lamb,
        rule_grokfast.config.window_size,
    )
    for name in ("instability_backoff", "instability_drop", "stop_on_convergence", "train_metric", "val_metric"):
        assert getattr(detector, name) == getattr(rule_detector, name), name


def test_ema_detector_config_runs_the_detector(fitted: Callable[[str], Path]) -> None:
    tags = set(read_events(fitted("ema_detector")).Tags()["scalars"])
    assert {"detector/phase", "detector/gap", "detector/lamb"} <= tags


# ---------------------------------------------------------------------- what each config sets up
def test_paper_settings_come_from_the_configs() -> None:
    ema, ma, baseline = (build("--config", str(CONFIGS / f"{name}.yaml")) for name in ("ema", "ma", "baseline"))
    (ema_callback,) = callbacks_of(ema, GrokfastCallback)
    assert (ema_callback.filter, ema_callback.alpha, ema_callback.lamb) == ("ema", 0.98, 2.0)
    assert ema.model.hparams.weight_decay == 0.005
    (ma_callback,) = callbacks_of(ma, GrokfastCallback)
    assert (ma_callback.filter, ma_callback.lamb, ma.config.grokfast.window_size) == ("ma", 5.0, 100)
    assert ma.model.hparams.weight_decay == 0.01
    (baseline_callback,) = callbacks_of(baseline, GrokfastCallback)
    assert baseline_callback.enabled is False


def test_ema_config_starts_from_the_paper_codes_weights_split_and_batches() -> None:
    # `seed_everything: 0` then the model: the same draws as the paper's script with `--seed 0` (its model first,
    # then its split and shuffles; the datamodule draws those from its own copy of that stream).
    cli = build_task("--config", str(CONFIGS / "ema.yaml"))
    torch.manual_seed(0)
    expected = GrokTransformer(num_tokens=99).state_dict()
    split = torch.randperm(97 * 96)
    for name, tensor in cli.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name])
    inputs, _ = make_modular_dataset("*", 97)
    torch.testing.assert_close(cli.datamodule.train_set.tensors[0], inputs[split[:4656]])


# ---------------------------------------------------------------------- flag groups
def test_grokfast_flag_group_configures_the_filter() -> None:
    (callback,) = callbacks_of(build("--grokfast.filter", "ma", "--grokfast.lamb", "5"), GrokfastCallback)
    assert (callback.filter, callback.lamb) == ("ma", 5.0)


def test_parameter_selection_and_overrides_are_expressible_as_flags_and_yaml(tmp_path: Path) -> None:
    config = tmp_path / "selection.yaml"
    config.write_text('grokfast:\n  exclude: ["bias", "norm"]\n  lamb_scale: {"^head": 0.5}\n')
    (callback,) = callbacks_of(build("--config", str(config)), GrokfastCallback)
    assert [p.pattern for p in callback.exclude] == ["bias", "norm"]
    assert [(p.pattern, f) for p, f in callback.lamb_scale] == [("^head", 0.5)]
    (flagged,) = callbacks_of(build("--grokfast.exclude", "[bias]"), GrokfastCallback)
    assert [p.pattern for p in flagged.exclude] == ["bias"]


def test_grokfast_enabled_false_switches_the_filter_off() -> None:
    (callback,) = callbacks_of(build("--grokfast.enabled", "false"), GrokfastCallback)
    assert callback.enabled is False


def test_dashboard_is_on_by_default_and_can_be_left_out() -> None:
    assert len(callbacks_of(build(), GrokkingDashboardCallback)) == 1
    assert callbacks_of(build("--dashboard.enabled", "false"), GrokkingDashboardCallback) == []


def test_detector_is_off_by_default_and_enabled_by_its_flag_group() -> None:
    assert callbacks_of(build(), GrokkingDetectorCallback) == []
    cli = build("--detector.enabled", "true", "--detector.lambda_boost", "1.5", "--detector.max_lamb", "4")
    (detector,) = callbacks_of(cli, GrokkingDetectorCallback)
    assert (detector.lambda_boost, detector.max_lamb) == (1.5, 4.0)


def test_data_num_tokens_is_linked_to_the_model() -> None:
    assert build("--data.p", "13").model.hparams.num_tokens == 15


# ---------------------------------------------------------------------- task selection (the lightning-grokfast command)
def build_task(*args: str) -> TaskCLI:
    """Parse and instantiate ``lightning-grokfast`` (:class:`TaskCLI`) without training."""
    return TaskCLI(trainer_defaults=TASK_TRAINER_DEFAULTS, args=list(args), run=False)


def test_task_cli_defaults_to_the_modular_task_and_links_its_vocabulary() -> None:
    cli = build_task("--data.p", "13", "--model.dim", "32")
    assert isinstance(cli.model, GrokTransformer) and isinstance(cli.datamodule, ModularArithmeticDataModule)
    assert (cli.model.hparams.num_tokens, cli.model.hparams.dim) == (15, 32)


def test_model_and_data_flags_select_another_task_and_pass_its_sizes() -> None:
    cli = build_task("--model", "MLPClassifier", "--data", "SparseParityDataModule", "--data.num_bits", "12")
    assert isinstance(cli.model, MLPClassifier) and isinstance(cli.datamodule, SparseParityDataModule)
    assert (cli.model.hparams.num_inputs, cli.model.hparams.num_classes) == (12, 2)


@pytest.mark.parametrize(
    ("name", "data_class", "filtered"),
    [
        ("parity_baseline", SparseParityDataModule, False),
        ("parity_ema", SparseParityDataModule, True),
        ("digits_baseline", DigitsDataModule, False),
        ("digits_ema", DigitsDataModule, True),
    ],
)
def test_task_configs_set_up_their_task_and_filter(name: str, data_class: type, filtered: bool) -> None:
    cli = build_task("--config", str(CONFIGS / f"{name}.yaml"))
    assert isinstance(cli.datamodule, data_class) and isinstance(cli.model, MLPClassifier)
    assert (cli.model.hparams.optimizer, cli.model.hparams.weight_decay) == ("adamw", 1.0)
    assert cli.model.hparams.num_inputs == cli.datamodule.num_inputs
    (callback,) = callbacks_of(cli, GrokfastCallback)
    assert callback.enabled is filtered


def test_stablemax_loss_is_selected_by_flag_and_by_its_config() -> None:
    assert build_task("--model.loss", "stablemax").model.loss_fn is stablemax_cross_entropy
    cli = build_task("--config", str(CONFIGS / "stablemax.yaml"))
    assert cli.model.loss_fn is stablemax_cross_entropy and cli.model.hparams.weight_decay == 0.0
    assert callbacks_of(cli, GrokfastCallback)[0].enabled is False


def test_parity_config_fits_through_the_console_entry_point(tmp_path: Path) -> None:
    tiny = ["--data.num_train=64", "--data.num_val=64", "--model.hidden=8", "--trainer.max_steps=4"]
    tiny += ["--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false"]
    main(["fit", "--config", str(CONFIGS / "parity_ema.yaml"), *tiny, f"--trainer.default_root_dir={tmp_path}"])
    assert (tmp_path / "lightning_logs" / "version_0" / "grokking_accuracy.png").is_file()


# ---------------------------------------------------------------------- the trainer.callbacks class_path form
def test_class_path_callbacks_replace_the_default_groups() -> None:
    cli = build("--config", str(CONFIGS / "callbacks.yaml"))
    assert len(callbacks_of(cli, GrokfastCallback)) == 1
    assert len(callbacks_of(cli, GrokkingDashboardCallback)) == 1
    assert len(callbacks_of(cli, GrokkingDetectorCallback)) == 1


def test_configuring_grokfast_in_both_forms_raises() -> None:
    with pytest.raises(MisconfigurationException, match="configured twice"):
        build("--config", str(CONFIGS / "callbacks.yaml"), "--grokfast.lamb", "5")


def test_disabled_grokfast_group_yields_to_a_class_path_callback() -> None:
    cli = build("--config", str(CONFIGS / "callbacks.yaml"), "--grokfast.enabled", "false")
    (callback,) = callbacks_of(cli, GrokfastCallback)
    assert callback.enabled is True


def test_cli_class_takes_models_without_num_tokens() -> None:
    cli = GrokfastCLI(TinyModel, None, args=["--grokfast.lamb", "3"], run=False)
    assert isinstance(cli.model, TinyModel)
    assert callbacks_of(cli, GrokfastCallback)[0].lamb == 3.0


# ---------------------------------------------------------------------- subcommands and the console script
def test_print_config_shows_the_callback_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "ma.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "grokfast:\n  filter: ma\n" in printed
    assert "dashboard:\n" in printed and "detector:\n" in printed


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_subcommands_run(tmp_path: Path, subcommand: str) -> None:
    main([subcommand, "--config", str(CONFIGS / "ema.yaml"), *TINY, f"--trainer.default_root_dir={tmp_path}"])
    assert list((tmp_path / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))


def test_console_script_fits_from_the_ema_config(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "lightning-grokfast"
    command = [
        str(script),
        "fit",
        "--config",
        str(CONFIGS / "ema.yaml"),
        *TINY,
        f"--trainer.default_root_dir={tmp_path}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "version_0" / "grokking_accuracy.png").is_file()


def test_the_top_level_help_names_the_tune_subcommand(capsys: pytest.CaptureFixture) -> None:
    from lightning_grokfast.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "lightning-grokfast tune" in " ".join(capsys.readouterr().out.split())
