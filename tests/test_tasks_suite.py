"""The wider task suite: S5 composition, MNIST-1D with a large init, teacher-student regression.

Sizes, disjoint splits, determinism by seed, the models, the configs through the CLI, and short direction runs
(the model fits its training set well before it generalises). The long runs that measure the delay are in
``docs/tasks-suite.md`` with their commands.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_grokfast import GrokfastCallback, GrokkingDetectorCallback
from lightning_grokfast.cli.fit import TaskCLI
from lightning_grokfast.tasks import (
    GrokTransformer,
    MLPClassifier,
    MLPRegressor,
    MNIST1DDataModule,
    ModularArithmeticDataModule,
    PermutationGroupDataModule,
    TeacherStudentDataModule,
    make_mnist1d_dataset,
    make_modular_dataset,
    make_permutation_dataset,
    make_teacher_student_dataset,
    permutations_of,
)
from tests.helpers import trainer

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_grokfast" / "configs"


def _rows(dataset: TensorDataset) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for row in dataset.tensors[0]}


# ---------------------------------------------------------------------------------------------------- S5
def test_permutation_table_is_the_composition_of_the_symmetric_group() -> None:
    perms = permutations_of(5)
    inputs, targets = make_permutation_dataset(5)
    assert perms.shape == (120, 5) and len(_rows(TensorDataset(perms))) == 120
    assert torch.equal(perms[0], torch.arange(5))  # token 0 is the identity
    assert inputs.shape == (120 * 120, 4) and targets.shape == (120 * 120,)
    assert set(inputs[:, 1].tolist()) == {121} and set(inputs[:, 3].tolist()) == {120}  # op, equals tokens
    x, y = inputs[:, 0], inputs[:, 2]
    torch.testing.assert_close(perms[targets], torch.gather(perms[x], 1, perms[y]))  # (x o y)(i) = x(y(i))
    table = targets.reshape(120, 120)
    assert torch.equal(table[:, 0], torch.arange(120)) and torch.equal(table[0], torch.arange(120))
    assert not torch.equal(table, table.T)  # S5 is not abelian


def test_permutation_split_has_its_sizes_is_disjoint_and_deterministic_by_seed() -> None:
    a, b, c = (PermutationGroupDataModule(n=4, train_fraction=0.25, seed=s) for s in (3, 3, 4))
    assert (len(a.train_set), len(a.val_set), a.num_tokens) == (144, 432, 26)
    assert not _rows(a.train_set) & _rows(a.val_set)
    assert len(_rows(a.train_set) | _rows(a.val_set)) == 24 * 24
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])


def test_modular_split_is_unchanged_by_the_shared_split_helper() -> None:
    data = ModularArithmeticDataModule(p=11, seed=3, paper_order=False)
    inputs, _ = make_modular_dataset("*", 11)
    order = torch.randperm(110, generator=torch.Generator().manual_seed(3))
    assert torch.equal(data.train_set.tensors[0], inputs[order[:55]])
    assert torch.equal(data.val_set.tensors[0], inputs[order[55:]])


@pytest.mark.parametrize(("kwargs", "match"), [({"n": 7}, "`n` must be"), ({"train_fraction": 1.0}, "train_fraction")])
def test_permutation_datamodule_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PermutationGroupDataModule(**kwargs)


# ---------------------------------------------------------------------------------------------------- MNIST-1D
def test_mnist1d_has_its_sizes_is_disjoint_and_deterministic_by_seed() -> None:
    a, b, c = (MNIST1DDataModule(num_train=100, num_val=200, seed=s) for s in (0, 0, 1))
    inputs, targets = a.train_set.tensors
    assert inputs.shape == (100, 40) == (100, a.num_inputs) and len(a.val_set) == 200
    assert set(targets.tolist()) <= set(range(10)) and a.num_classes == 10
    assert not _rows(a.train_set) & _rows(a.val_set)
    assert torch.equal(inputs, b.train_set.tensors[0])
    assert not torch.equal(inputs, c.train_set.tensors[0])


def test_mnist1d_generation_leaves_the_global_random_streams_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    make_mnist1d_dataset(20, seed=5)
    assert (np.random.rand(), random.random()) == expected


def test_mnist1d_rejects_sizes_the_generator_cannot_make() -> None:
    with pytest.raises(ValueError, match="multiple of 10"):
        make_mnist1d_dataset(25)
    with pytest.raises(ValueError, match="multiple of 10"):
        MNIST1DDataModule(num_train=100, num_val=5)


# ---------------------------------------------------------------------------------------------------- regression
def test_teacher_student_targets_are_standardised_disjoint_and_deterministic_by_seed() -> None:
    a, b, c = (TeacherStudentDataModule(num_inputs=8, num_train=300, num_val=700, seed=s) for s in (2, 2, 3))
    inputs, targets = a.train_set.tensors
    assert inputs.shape == (300, 8) and targets.shape == (300, 1) and len(a.val_set) == 700
    assert (a.num_inputs, a.num_outputs) == (8, 1)
    everything = torch.cat([targets, a.val_set.tensors[1]])
    assert abs(float(everything.mean())) < 1e-5 and math.isclose(float(everything.std()), 1.0, rel_tol=1e-5)
    assert not _rows(a.train_set) & _rows(a.val_set)
    assert torch.equal(targets, b.train_set.tensors[1]) and not torch.equal(targets, c.train_set.tensors[1])


def test_teacher_student_noise_is_added_to_the_standardised_targets() -> None:
    _, clean = make_teacher_student_dataset(num_examples=2000, seed=0)
    _, noisy = make_teacher_student_dataset(num_examples=2000, noise=0.5, seed=0)
    assert math.isclose(float((noisy - clean).std()), 0.5, rel_tol=0.1)
    with pytest.raises(ValueError, match="`noise` must be"):
        make_teacher_student_dataset(noise=-1.0)


def test_mlp_regressor_scales_its_initialisation_and_predicts_one_value_per_example() -> None:
    torch.manual_seed(0)
    plain = MLPRegressor(num_inputs=6, hidden=8)
    torch.manual_seed(0)
    scaled = MLPRegressor(num_inputs=6, hidden=8, init_scale=3.0)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, 3 * p)
    assert plain(torch.randn(5, 6)).shape == (5, 1)
    with pytest.raises(ValueError, match="`init_scale` must be"):
        MLPRegressor(init_scale=0.0)


# ---------------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    ("name", "model_class", "data_class", "filtered"),
    [
        ("s5_baseline", GrokTransformer, PermutationGroupDataModule, False),
        ("s5_ema", GrokTransformer, PermutationGroupDataModule, True),
        ("mnist1d_baseline", MLPClassifier, MNIST1DDataModule, False),
        ("mnist1d_ema", MLPClassifier, MNIST1DDataModule, True),
        ("regression_baseline", MLPRegressor, TeacherStudentDataModule, False),
        ("regression_ema", MLPRegressor, TeacherStudentDataModule, True),
    ],
)
def test_suite_configs_set_up_their_task_and_filter(
    monkeypatch: pytest.MonkeyPatch, name: str, model_class: type, data_class: type, filtered: bool
) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-grokfast"])
    small = ["--data.num_train=100", "--data.num_val=100"] if data_class is MNIST1DDataModule else []
    cli = TaskCLI(args=["--config", str(CONFIGS / f"{name}.yaml"), *small], run=False)
    assert isinstance(cli.model, model_class) and isinstance(cli.datamodule, data_class)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GrokfastCallback)]
    assert callback.enabled is filtered
    if data_class is PermutationGroupDataModule:
        assert cli.model.hparams.num_tokens == cli.datamodule.num_tokens == 122
    else:
        assert cli.model.hparams.num_inputs == cli.datamodule.num_inputs
    if model_class is MLPRegressor:  # the regression configs read the errors with mode "min"
        (detector,) = [c for c in cli.trainer.callbacks if isinstance(c, GrokkingDetectorCallback)]
        assert (detector.machine.mode, detector.val_metric) == ("min", "val_loss")


# ---------------------------------------------------------------------------------------------------- direction
def _fit(model: pl.LightningModule, data: pl.LightningDataModule, steps: int) -> None:
    pl.seed_everything(0, verbose=False)
    trainer(max_steps=steps, limit_val_batches=0).fit(model, datamodule=data)
    model.eval()


def _accuracy(model: pl.LightningModule, dataset: TensorDataset) -> float:
    inputs, targets = dataset.tensors
    with torch.no_grad():
        return float((model(inputs).argmax(-1) == targets).float().mean())


def test_s4_composition_is_memorised_before_it_generalises() -> None:
    data = PermutationGroupDataModule(n=4, train_fraction=0.5, batch_size=64, seed=0)
    torch.manual_seed(0)
    model = GrokTransformer(
        data.num_tokens, dim=64, num_heads=2, num_layers=1, lr=3e-3, weight_decay=1.0, optimizer="adamw"
    )
    _fit(model, data, steps=300)
    train, val = _accuracy(model, data.train_set), _accuracy(model, data.val_set)
    assert train >= 0.9 and val < 0.3


def test_mnist1d_with_a_large_init_is_memorised_before_it_generalises() -> None:
    data = MNIST1DDataModule(num_train=1000, num_val=1000)
    torch.manual_seed(0)
    model = MLPClassifier(40, 10, hidden=200, depth=2, init_scale=8.0, weight_decay=1.0, optimizer="adamw")
    _fit(model, data, steps=200)
    train, val = _accuracy(model, data.train_set), _accuracy(model, data.val_set)
    assert train >= 0.99 and val < 0.4


def test_teacher_student_with_a_large_init_interpolates_before_it_generalises() -> None:
    data = TeacherStudentDataModule(num_train=1000, num_val=500)
    torch.manual_seed(0)
    model = MLPRegressor(20, hidden=200, depth=2, init_scale=4.0, weight_decay=1.0, optimizer="adamw")
    _fit(model, data, steps=400)
    with torch.no_grad():
        train, val = (
            float(nn.functional.mse_loss(model(x), y)) for x, y in (data.train_set.tensors, data.val_set.tensors)
        )
    assert train < 0.01 and val > 10 * train and val > 0.1


# ---------------------------------------------------------------------------------------------------- safe default
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _safe_default() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("safe_default", BENCHMARKS / "safe_default.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(task: str, rule: str, seed: int, steps: dict[str, int | None], cap: int = 100) -> dict:
    return {"task": task, "config": rule, "seed": seed, "cap": cap, "steps_to": steps, "seconds_to": steps}


def test_safe_default_verdict_flags_a_rule_slower_than_no_filter_at_the_higher_mark() -> None:
    safe = _safe_default()
    marks = (0.9, 0.95)
    runs = [_run("digits", "none", s, {"0.9": 50, "0.95": 60}) for s in (0, 1, 2)]
    runs += [_run("digits", "ma", s, {"0.9": 20, "0.95": 80}) for s in (0, 1, 2)]
    runs += [_run("digits", "ema_ma", s, {"0.9": 40, "0.95": None}) for s in (0, 1, 2)]
    summary = {"digits": {r: safe.summarize_marks([x for x in runs if x["config"] == r], marks) for r in safe.RULES
                          if any(x["config"] == r for x in runs)}}  # fmt: skip
    verdicts = safe.verdicts(summary, {"digits": ["0.9", "0.95"]})["digits"]
    assert verdicts["none"] == "> 1.25x best at 0.9"
    assert verdicts["ma"] == "slower at 0.95; > 1.25x best at 0.95"
    assert verdicts["ema_ma"] == "> 1.25x best at 0.9; median not reached at 0.95"


def test_safe_default_script_runs_the_new_tasks_in_smoke_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "safe_default.py"), "--smoke", "--out-dir", str(tmp_path),
         "--tasks", "s5", "mnist1d", "regression", "--rules", "none", "ema_ma_backoff", "auto"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "safe_default_smoke.json").read_text())
    ran = {(run["task"], run["config"]) for run in report["runs"]}
    assert ran == {(t, r) for t in ("s5", "mnist1d", "regression") for r in ("none", "ema_ma_backoff", "auto")}
    assert report["marks"]["regression"] == ["-0.05", "-0.01"]  # negated errors: higher is better
    assert set(report["verdicts"]) == {"s5", "mnist1d", "regression"}
    assert "| regression (-0.05 / -0.01) | no filter |" in result.stdout


def test_safe_default_merges_finished_runs_once_under_the_current_rule_names() -> None:
    safe = _safe_default()
    ours = [_run("digits", "auto", 0, {"0.9": 20, "0.95": 30})]
    theirs = [
        _run("digits", "ma_unstable", 0, {"0.9": 99, "0.95": 99}),  # measured under the rule's earlier name
        _run("digits", "ma_unstable", 1, {"0.9": 25, "0.95": 35}),
        {**_run("digits", "none", 0, {"0.9": None, "0.95": None}), "interrupted": True},
    ]
    merged = safe.merge(ours, safe.finished(theirs))
    assert [(r["config"], r["seed"], r["steps_to"]["0.9"]) for r in merged] == [("auto", 0, 20), ("auto", 1, 25)]


def test_lamb_warmup_ramps_lamb_and_keeps_a_back_off_made_meanwhile() -> None:
    _safe_default()  # puts benchmarks/ on the path
    from safe_default_rules import LambWarmup

    grokfast = GrokfastCallback(filter="ma", window_size=10, lamb=4.0)
    warmup = LambWarmup(grokfast, steps=4)
    trainer = SimpleNamespace(global_step=0)
    lambs = []
    for step in range(6):
        trainer.global_step = step
        warmup.on_train_batch_start(trainer)  # type: ignore[arg-type]
        lambs.append(grokfast.lamb)
        if step == 2:
            grokfast.boost_lamb(0.5)  # the detector's back-off halves lamb mid-ramp
    assert lambs == [0.0, 1.0, 2.0, 1.5, 2.0, 2.0]


def test_leaderboard_runs_the_suite_tasks_and_the_auto_row_in_smoke_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "grokking_leaderboard.py"), "--smoke", "--out-dir", str(tmp_path),
         "--tasks", "mnist1d", "regression", "--methods", "none", "auto"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "grokking_leaderboard_smoke.json").read_text())
    assert {(r["task"], r["config"]) for r in report["runs"]} == {
        (t, m) for t in ("mnist1d", "regression") for m in ("none", "auto")
    }
    assert "| regression (MSE 0.05) | auto (MA, lamb x0.5 at each train drop) |" in result.stdout
