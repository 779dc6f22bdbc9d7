"""Each example script runs end to end with its tiny-run flag.

The scripts run in this process (``runpy``, as ``__main__``, with their own ``sys.argv``), which saves the
interpreter start and imports of a subprocess per example; the console-script test in ``test_cli.py`` covers the
subprocess path.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXAMPLES = {
    "minimal_trainer": ["--tiny"],
    "manual_optimization": ["--tiny"],
    "own_lightning_cli": ["fit", "--config", str(ROOT / "configs" / "callbacks.yaml"), "--tiny"],
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_tiny_and_draws_the_accuracy_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    script = ROOT / "examples" / f"{name}.py"
    monkeypatch.chdir(tmp_path)  # the examples write lightning_logs/ to the working directory
    monkeypatch.setattr(sys, "argv", [str(script), *EXAMPLES[name]])
    runpy.run_path(str(script), run_name="__main__")
    assert len(list(tmp_path.rglob("grokking_accuracy.png"))) == 1


@pytest.mark.parametrize("name", ["plain_loop", "fabric_loop"])
def test_loop_example_runs_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    script = ROOT / "examples" / f"{name}.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny"])
    runpy.run_path(str(script), run_name="__main__")
    assert any(tmp_path.glob("*.pt")) or any(tmp_path.glob("*.ckpt"))


def test_hf_trainer_example_runs_tiny_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")  # in the `hf` extra
    script = ROOT / "examples" / "hf_trainer.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny"])
    runpy.run_path(str(script), run_name="__main__")
    assert "resumed run ends with the uninterrupted run's weights: True" in capsys.readouterr().out
