"""The grokking detector on lower-is-better metrics, with strict booleans and marks, and under DDP when a metric
exists on some ranks only."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_grokfast import GrokkingDetectorCallback, GrokkingStateMachine
from tests.test_detector_callback import Script, ScriptedModule, make_trainer

#: a loss curve that groks: train loss drops at step 50, validation loss only at step 300, then meets it
TRAIN_LOSS = Script((0, 2.0), (50, 0.01))
VAL_LOSS = Script((0, 4.0), (300, 0.4), (400, 0.02))


def test_min_mode_detects_grokking_at_the_drop_of_a_loss():
    machine = GrokkingStateMachine(
        mode="min", memorization_threshold=0.1, jump_threshold=1.0, convergence_gap=0.05, marks=[1.0, 0.05]
    )
    for step in range(0, 500, 10):
        machine.update(step, VAL_LOSS(step), TRAIN_LOSS(step))
    assert [(t.phase, t.step) for t in machine.transitions] == [
        ("memorizing", 50),
        ("grokking", 300),
        ("converged", 420),
    ]
    grokking = machine.transitions[1]
    assert (grokking.val_before, grokking.val_after) == (4.0, 0.4)  # reported in the loss's own units
    assert machine.mark_steps == {1.0: 300, 0.05: 400}
    assert machine.last_gap == pytest.approx(0.02 - 0.01)  # val - train


def test_detector_callback_in_min_mode_on_losses_and_the_state_round_trip():
    detector = GrokkingDetectorCallback(
        mode="min", memorization_threshold=0.1, jump_threshold=1.0, convergence_gap=0.05, stop_on_convergence=False
    )
    make_trainer([detector], max_steps=500).fit(ScriptedModule(val_acc=VAL_LOSS, train_acc=TRAIN_LOSS))
    assert [t.phase for t in detector.transitions] == ["memorizing", "grokking", "converged"]
    assert detector.machine.step_of("grokking") == 300
    other = GrokkingStateMachine(mode="max")
    with pytest.raises(ValueError, match="saved with mode='min'"):
        other.load_state_dict(detector.machine.state_dict())


def test_max_mode_on_values_outside_zero_one_is_reported_once():
    detector = GrokkingDetectorCallback(stop_on_convergence=False)
    with pytest.warns(RuntimeWarning, match=r"mode='min'") as record:
        make_trainer([detector], max_steps=120).fit(ScriptedModule(val_acc=VAL_LOSS, train_acc=TRAIN_LOSS))
    assert sum("mode='min'" in str(w.message) for w in record) == 1


@pytest.mark.parametrize("argument", ["strict", "verbose", "stop_on_convergence", "adaptive_alpha"])
def test_boolean_arguments_refuse_strings(argument):
    with pytest.raises(ValueError, match=f"`{argument}` must be True or False"):
        GrokkingDetectorCallback(**{argument: "false"})


def test_a_single_mark_is_one_mark():
    assert GrokkingDetectorCallback(marks=0.9).machine.marks == (0.9,)
    with pytest.raises(ValueError, match="`marks` must be a number or a list of numbers"):
        GrokkingDetectorCallback(marks={"a": 1})


# ---------------------------------------------------------------------- DDP: a metric on some ranks only
class RankZeroOnly(ScriptedModule):
    """Logs the validation metric from rank 0 only: ``if self.global_rank == 0: self.log(..., rank_zero_only=True)``."""

    def validation_step(self, batch, batch_idx):
        if self.global_rank == 0:
            self.log("val_acc", self.val_acc(self.global_step), rank_zero_only=True)


class RecordOutcome(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        detector = next(c for c in trainer.callbacks if isinstance(c, GrokkingDetectorCallback))
        (self.out / f"rank{trainer.global_rank}.phase").write_text(detector.phase)


@pytest.mark.timeout(120)
def test_ddp_metric_on_rank_zero_only_does_not_hang_and_both_ranks_decide_alike(tmp_path):
    detector = GrokkingDetectorCallback(strict=False, stop_on_convergence=False)
    trainer = make_trainer([detector, RecordOutcome(tmp_path)], max_steps=150, strategy="ddp_fork", devices=2)
    trainer.fit(RankZeroOnly())
    phases = {p.name: p.read_text() for p in tmp_path.glob("*.phase")}
    assert phases == {"rank0.phase": "grokking", "rank1.phase": "grokking"}


class MarksItsError(GrokkingDetectorCallback):
    """Writes the error each rank is about to raise (the launcher may end a rank before its `on_exception`)."""

    def __init__(self, out: Path) -> None:
        super().__init__(strict=True)
        self.out = out

    def _missing_message(self, trainer):
        message = super()._missing_message(trainer)
        (self.out / f"rank{trainer.global_rank}.raised").write_text(message)
        return message


@pytest.mark.timeout(120)
def test_ddp_strict_missing_metric_raises_on_every_rank(tmp_path):
    trainer = make_trainer([MarksItsError(tmp_path)], max_steps=150, strategy="ddp_fork", devices=2)
    with pytest.raises(Exception, match="GrokkingDetectorCallback is missing"):
        trainer.fit(RankZeroOnly())
    raised = sorted(p.name for p in tmp_path.glob("*.raised"))
    assert raised == ["rank0.raised", "rank1.raised"]
    assert "on another rank" in (tmp_path / "rank0.raised").read_text()
    assert "on rank 1" in (tmp_path / "rank1.raised").read_text()


def test_dashboard_booleans_refuse_strings():
    from lightning_grokfast import GrokkingDashboardCallback

    with pytest.raises(ValueError, match="`log_weight_norm` must be True or False"):
        GrokkingDashboardCallback(log_weight_norm="false")
