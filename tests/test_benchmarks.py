"""The benchmark scripts run (in their smallest mode) and their published-algorithm yardsticks are right."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from lightning_grokfast.core.filters import GradientFilter

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` under a name of its own (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reference = _load("reference")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _run_both(filt: GradientFilter, apply_reference, steps: int) -> None:
    """Feed the same random gradients to the reference (through a model) and to ``filt``; compare every step."""
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    generator = torch.Generator().manual_seed(1)
    state = None
    for step in range(steps):
        raw = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
        for p, g in zip(model.parameters(), raw):
            p.grad = g.clone()  # a fresh tensor every step, as backward after zero_grad(set_to_none=True)
        state = apply_reference(model, state)
        ours = [g.clone() for g in raw]
        filt.step(names, ours)
        for name, p, mine in zip(names, model.parameters(), ours):
            where = f"step {step}, {name}"
            torch.testing.assert_close(mine, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m, where=where: f"{where}: {m}")


def test_reference_ema_agrees_with_gradient_filter() -> None:
    filt = GradientFilter("ema", alpha=0.9, lamb=2.0)
    _run_both(filt, lambda model, state: reference.gradfilter_ema_reference(model, state, alpha=0.9, lamb=2.0), 200)


@pytest.mark.parametrize("filter_type", ["mean", "sum"])
@pytest.mark.parametrize("warmup", [True, False])
def test_reference_ma_agrees_with_gradient_filter(filter_type: str, warmup: bool) -> None:
    window = 8
    filt = GradientFilter("ma", window_size=window, lamb=5.0, filter_type=filter_type, warmup=warmup)

    def apply(model: nn.Module, state):
        return reference.gradfilter_ma_reference(
            model, state, window_size=window, lamb=5.0, filter_type=filter_type, warmup=warmup
        )

    _run_both(filt, apply, 12 * window)  # past the filter's re-summation at 10 x window


def test_reference_ma_keeps_the_raw_gradients_of_its_window() -> None:
    model = _model()
    state = None
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.full_like(p, float(step + 1))
        state = reference.gradfilter_ma_reference(model, state, window_size=2, lamb=1.0, warmup=True)
    first = next(iter(state.values()))
    assert [float(t.flatten()[0]) for t in first] == [2.0, 3.0]
    assert reference.reference_state_bytes(state) == 2 * 4 * sum(p.numel() for p in model.parameters())


def test_block_schedule_ratios_pair_each_filter_block_with_the_block_before() -> None:
    overhead = _load("overhead")
    schedule = overhead.block_schedule(["a", "b"], rounds=2, block=2)
    assert len(schedule) == 3 * 2 * 4 and schedule[:4] == [(0, None), (0, None), (0, "a"), (0, "a")]
    durations = [{None: 1.0, "a": 1.5, "b": 3.0}[key] for _, key in schedule]
    ratios = overhead.paired_ratios(schedule, durations, ["a", "b"])
    assert ratios["a"]["ratio"] == pytest.approx(1.5) and ratios["a"]["rounds"] == 2
    assert ratios["b"]["ratio"] == pytest.approx(3.0)


def _run_script(name: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke", "--out-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_overhead_script_runs_in_smoke_mode(tmp_path: Path) -> None:
    result = _run_script("overhead", tmp_path)
    report = json.loads((tmp_path / "overhead_smoke.json").read_text())
    assert set(report["results"]) == {"glue", "trainer", "loop", "large", "ma", "window"}
    assert "ours/ema" in report["results"]["trainer"]["variants"]
    assert "| target |" not in result.stdout  # the script measures; the targets are in the README
    assert "Training step of the paper's model through `Trainer.fit`" in result.stdout
    assert (tmp_path / "overhead_smoke.md").exists()


def test_dropin_script_runs_in_smoke_mode(tmp_path: Path) -> None:
    result = _run_script("dropin", tmp_path)
    report = json.loads((tmp_path / "dropin_smoke.json").read_text())
    assert [row["filter"] for row in report["rows"]] == ["EMA", "MA, window 4"]
    assert all(row["ours_s"] > 0 and row["published_s"] > 0 for row in report["rows"])
    assert "| model | filter |" in result.stdout


def test_overhead_tiles_sweeps_every_block_against_the_untiled_step(tmp_path: Path) -> None:
    script = str(BENCHMARKS / "overhead_tiles.py")
    result = subprocess.run(
        [sys.executable, script, "--params", "300000", "--rounds", "1", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "overhead_tiles.json").read_text())["rows"]
    assert len(rows) == 2 * 7 and "ema untiled (2 foreach calls)" in rows and "ma block 256 Ki" in rows
    assert all(row["ratio"] > 0 and row["min"] <= row["ratio"] <= row["max"] for row in rows.values())
    assert "| ema block 64 Ki |" in (tmp_path / "overhead_tiles.md").read_text()
