"""Shipped configs: ``--config NAME`` finds them outside a checkout, ``lightning-grokfast configs`` lists them."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lightning_grokfast.cli.configs import CONFIG_DIR, list_configs, resolve_config_args, shipped_config
from lightning_grokfast.cli.fit import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data.p=11",
    "--data.batch_size=16",
    "--model.dim=16",
    "--model.num_heads=2",
    "--model.num_layers=1",
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--dashboard.enabled=false",
]


@pytest.fixture(autouse=True)
def program_name_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when given ``args`` while ``sys.argv`` holds more (pytest's own arguments)."""
    monkeypatch.setattr(sys, "argv", ["lightning-grokfast"])


@pytest.mark.parametrize("value", ["ema", "ema.yaml", "configs/ema.yaml", "--config=ema"])
def test_a_config_name_resolves_to_the_shipped_file(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", value] if value.startswith("--") else ["fit", "--config", value]
    resolved = resolve_config_args(args)
    assert str(CONFIG_DIR / "ema.yaml") in resolved[-1]


def test_an_existing_file_wins_over_the_shipped_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ema.yaml").write_text("seed_everything: 3\n")
    assert shipped_config("ema.yaml") is None
    assert resolve_config_args(["fit", "-c", "ema.yaml"]) == ["fit", "-c", "ema.yaml"]


def test_other_paths_and_unknown_names_are_left_to_the_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert shipped_config("elsewhere/ema.yaml") is None
    assert shipped_config("no_such_config") is None


def test_configs_subcommand_lists_every_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    main(["configs"])
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith(("Run", "Shipped"))]
    assert names == sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
    assert "alpha 0.98, lamb 2.0, weight decay 0.005" in out


def test_configs_subcommand_prints_one_config(capsys: pytest.CaptureFixture[str]) -> None:
    main(["configs", "ma"])
    assert capsys.readouterr().out == (CONFIG_DIR / "ma.yaml").read_text()


def test_configs_subcommand_names_the_shipped_configs_for_an_unknown_name() -> None:
    with pytest.raises(SystemExit, match="shipped configs are: auto, baseline"):
        main(["configs", "nope"])
    with pytest.raises(ValueError, match="No shipped config named 'nope'"):
        list_configs("nope")


def test_fit_runs_a_shipped_config_by_name_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "ema", *TINY, f"--trainer.default_root_dir={tmp_path}"])
    config = (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert "alpha: 0.98" in config and "weight_decay: 0.005" in config


def _run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``command`` without PYTHONPATH: a checkout on it (and the egg-info a build leaves there) would stand in
    for the installed wheel."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=180, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.wheel
def test_installed_wheel_runs_a_shipped_config_by_name(tmp_path: Path) -> None:
    """Build the wheel, install it (no dependencies) into a fresh venv that sees this environment's packages, and
    run ``lightning-grokfast configs`` and ``lightning-grokfast fit --config ema`` from an empty directory."""
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT)
    (wheel,) = wheels.glob("lightning_grokfast-*.whl")
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # the dependencies (torch, lightning, ...) come from this environment, the package only from the wheel
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel)
    where = _run(python, "-c", "import lightning_grokfast as m; print(m.__file__)", cwd=work).stdout
    assert where.startswith(site), where
    assert "parity_ema" in _run(venv / "bin" / "lightning-grokfast", "configs", cwd=work).stdout
    _run(
        venv / "bin" / "lightning-grokfast",
        "fit",
        "--config",
        "ema",
        *TINY,
        f"--trainer.default_root_dir={work}",
        cwd=work,
    )
    assert "alpha: 0.98" in (work / "lightning_logs" / "version_0" / "config.yaml").read_text()
