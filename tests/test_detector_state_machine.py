"""Specification of the grokking state machine, on scripted metric sequences (no Trainer)."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch

from lightning_grokfast.callbacks.detector import (
    PHASES,
    GrokkingStateMachine,
    Transition,
    default_grokking_signal,
)


def train_curve(step: int) -> float:
    """Memorizes: train accuracy reaches 1.0 at step 300."""
    return min(1.0, step / 300)


def grokking_curve(step: int) -> float:
    """Validation stays at chance, then jumps to 1.0 around step 1100 (a sigmoid of width ~30 steps)."""
    return 0.05 + 0.95 / (1.0 + math.exp(-(step - 1100) / 30))


def feed(machine: GrokkingStateMachine, steps, val=grokking_curve, train=train_curve) -> GrokkingStateMachine:
    for step in steps:
        machine.update(step, val(step), train(step))
    return machine


def phases_entered(machine: GrokkingStateMachine) -> list[str]:
    return [t.phase for t in machine.transitions]


# ---------------------------------------------------------------------- the phases
def test_starts_warming_up():
    assert GrokkingStateMachine().phase == "warming_up"


def test_clean_grokking_curve_goes_through_every_phase_in_order():
    machine = feed(GrokkingStateMachine(), range(10, 2001, 10))
    assert phases_entered(machine) == ["memorizing", "grokking", "converged"]
    assert machine.phase == "converged"


def test_transitions_record_the_step_at_which_they_happened():
    steps = range(10, 2001, 10)
    machine = feed(GrokkingStateMachine(patience=3), steps)
    entered = {t.phase: t.step for t in machine.transitions}
    assert entered["memorizing"] == 270  # first evaluation with train >= 0.9
    # first evaluation at which val rose by >= 0.2 above its lowest value since memorization (curve is increasing)
    first_jump = next(s for s in steps if s > 270 and grokking_curve(s) - grokking_curve(max(270, s - 1000)) >= 0.2)
    assert entered["grokking"] == first_jump
    # the third consecutive evaluation with 1 - val <= 0.05
    first_small_gap = next(s for s in steps if 1.0 - grokking_curve(s) <= 0.05)
    assert entered["converged"] == first_small_gap + 20
    assert machine.step_of("grokking") == first_jump


def test_grokking_transition_holds_the_values_before_and_after_the_jump():
    machine = feed(GrokkingStateMachine(), range(10, 2001, 10))
    grokking = next(t for t in machine.transitions if t.phase == "grokking")
    assert grokking.previous == "memorizing"
    assert grokking.val_before == pytest.approx(grokking_curve(270))  # lowest value since memorization began
    assert grokking.val_after == pytest.approx(grokking_curve(grokking.step))
    assert grokking.val_after - grokking.val_before >= 0.2
    assert grokking.train == 1.0


def test_memorizing_needs_a_high_train_metric():
    machine = GrokkingStateMachine(memorization_threshold=0.9)
    machine.update(10, 0.05, 0.89)
    assert machine.phase == "warming_up"
    machine.update(20, 0.05, 0.9)
    assert machine.phase == "memorizing"


def test_a_rise_during_warm_up_is_not_grokking():
    machine = GrokkingStateMachine()
    machine.update(10, 0.0, 0.1)
    machine.update(20, 0.5, 0.6)
    assert machine.phase == "warming_up"
    assert not machine.grokked


def test_a_rise_at_the_evaluation_that_enters_memorizing_is_not_grokking():
    machine = GrokkingStateMachine(jump_threshold=0.2)
    machine.update(10, 0.0, 0.5)
    machine.update(20, 0.5, 1.0)  # train and validation rose together: ordinary learning
    assert machine.phase == "memorizing"
    assert not machine.grokked


def test_the_jump_is_measured_from_the_lowest_value_since_memorization_began():
    machine = GrokkingStateMachine(jump_threshold=0.2)
    machine.update(10, 0.0, 0.5)
    machine.update(20, 0.3, 1.0)  # enters memorizing at 0.3
    machine.update(30, 0.45, 1.0)  # 0.45 above the warm-up value, only 0.15 above the memorizing one
    assert not machine.grokked
    machine.update(40, 0.5, 1.0)
    assert machine.step_of("grokking") == 40
    assert machine.transitions[-1].val_before == 0.3


def test_converged_needs_patience_consecutive_small_gaps():
    machine = GrokkingStateMachine(patience=3, convergence_gap=0.05)
    for step, val in [(10, 0.0), (20, 0.5), (30, 0.97), (40, 0.97), (50, 0.8), (60, 0.97), (70, 0.97)]:
        machine.update(step, val, 1.0)
    assert machine.phase == "grokking"  # the streak was broken at step 50
    machine.update(80, 0.97, 1.0)
    assert machine.phase == "converged"
    assert machine.step_of("converged") == 80


def test_phases_are_never_re_entered():
    machine = feed(GrokkingStateMachine(), range(10, 2001, 10))
    machine.update(2010, 0.05, 1.0)  # validation collapses after convergence
    machine.update(2020, 0.9, 1.0)
    assert machine.phase == "converged"
    assert phases_entered(machine) == ["memorizing", "grokking", "converged"]


# ---------------------------------------------------------------------- jumps
def test_noisy_curve_without_grokking_never_detects_a_jump():
    rng = random.Random(0)
    noise = {step: rng.uniform(-0.09, 0.09) for step in range(10, 5001, 10)}  # peak to peak < 0.2
    machine = feed(GrokkingStateMachine(jump_threshold=0.2), noise, val=lambda s: 0.2 + noise[s])
    assert machine.phase == "memorizing"
    assert not machine.grokked
    assert not machine.should_stop


def test_a_rise_spread_over_several_evaluations_inside_the_window_is_a_jump():
    machine = GrokkingStateMachine(jump_threshold=0.5, jump_window=100)
    steps_and_vals = [(10, 0.0), (20, 0.125), (30, 0.25), (40, 0.375), (50, 0.5), (60, 0.625)]  # 0.125 each
    for step, val in steps_and_vals:
        machine.update(step, val, 1.0)
    assert machine.step_of("grokking") == 50  # 0.5 above the value at step 10, four evaluations earlier


def test_a_rise_spread_beyond_the_window_is_not_a_jump():
    machine = GrokkingStateMachine(jump_threshold=0.5, jump_window=30)
    for step, val in [(10, 0.0), (20, 0.125), (30, 0.25), (40, 0.375), (50, 0.5), (60, 0.625)]:
        machine.update(step, val, 1.0)
    assert not machine.grokked


def test_slow_rise_is_not_a_jump_and_converges_without_stopping():
    def slow(step: int) -> float:  # from 0.05 to 1.0 over 10000 steps: 0.095 per 1000-step window
        return min(1.0, 0.05 + 0.95 * max(0, step - 1000) / 10000)

    machine = feed(GrokkingStateMachine(jump_threshold=0.2, jump_window=1000), range(10, 12001, 10), val=slow)
    assert phases_entered(machine) == ["memorizing", "converged"]
    assert not machine.grokked
    assert not machine.should_stop  # stopping needs grokking by default


def test_converged_without_grokking_stops_when_grokking_is_not_required():
    machine = GrokkingStateMachine(stop_requires_grokking=False, patience=2)
    for step in (10, 20, 30):
        machine.update(step, 0.99, 1.0)
    assert machine.phase == "converged"
    assert machine.should_stop


def test_converged_after_grokking_should_stop():
    machine = feed(GrokkingStateMachine(), range(10, 2001, 10))
    assert machine.should_stop


def test_detection_does_not_depend_on_validation_frequency():
    every_step = feed(GrokkingStateMachine(), range(1, 2001))
    every_50 = feed(GrokkingStateMachine(), range(50, 2001, 50))
    for phase in ("grokking", "converged"):
        dense, sparse = every_step.step_of(phase), every_50.step_of(phase)
        assert dense is not None and sparse is not None
        assert 0 <= sparse - dense < 50 * every_50.patience, phase
    assert every_step.mark_steps.keys() == every_50.mark_steps.keys() == {0.5, 0.9, 0.95}
    for mark, step in every_step.mark_steps.items():
        assert 0 <= every_50.mark_steps[mark] - step < 50


def test_validation_sparser_than_the_window_still_sees_the_jump():
    machine = GrokkingStateMachine(jump_threshold=0.2, jump_window=100)
    for step, val in [(2000, 0.05), (4000, 0.05), (6000, 0.6)]:
        machine.update(step, val, 1.0)
    assert machine.step_of("grokking") == 6000
    assert machine.transitions[-1].val_before == 0.05


def test_window_in_evaluations_counts_evaluations_not_steps():
    rising = [(1000 * k, 0.125 * k) for k in range(7)]  # 0.125 per evaluation, 1000 steps apart
    short = GrokkingStateMachine(jump_threshold=0.5, jump_window=3, jump_window_unit="evaluations")
    long = GrokkingStateMachine(jump_threshold=0.5, jump_window=4, jump_window_unit="evaluations")
    for step, val in rising:
        short.update(step, val, 1.0)
        long.update(step, val, 1.0)
    assert not short.grokked
    assert long.step_of("grokking") == 4000  # 0.5 above the value at step 0, four evaluations earlier


# ---------------------------------------------------------------------- marks
def test_marks_record_the_first_step_at_which_validation_reaches_them():
    machine = GrokkingStateMachine(marks=(0.5, 0.9))
    for step, val in [(10, 0.2), (20, 0.55), (30, 0.4), (40, 0.6), (50, 0.91)]:
        machine.update(step, val, 1.0)
    assert machine.mark_steps == {0.5: 20, 0.9: 50}


def test_unreached_marks_are_absent():
    machine = GrokkingStateMachine(marks=(0.5, 0.95))
    machine.update(10, 0.6, 1.0)
    assert machine.mark_steps == {0.5: 10}


def test_update_reports_the_marks_reached_and_transitions_of_that_evaluation():
    machine = GrokkingStateMachine(jump_threshold=0.2, marks=(0.5,))
    machine.update(10, 0.05, 1.0)
    update = machine.update(20, 0.6, 1.0)
    assert update.marks_reached == (0.5,)
    assert [t.phase for t in update.transitions] == ["grokking"]
    assert update.gap == pytest.approx(0.4)
    assert update.phase == "grokking"


# ---------------------------------------------------------------------- input handling
def test_non_finite_validation_value_is_ignored():
    machine = GrokkingStateMachine()
    machine.update(10, 0.05, 1.0)
    assert machine.update(20, float("nan"), 1.0).ignored
    assert machine.evaluations == 1


def test_second_evaluation_at_the_same_step_is_ignored():
    machine = GrokkingStateMachine(patience=2, stop_requires_grokking=False)
    machine.update(10, 0.99, 1.0)
    assert machine.update(10, 0.99, 1.0).ignored
    assert machine.phase == "warming_up"


def test_missing_train_value_enters_no_train_phase():
    machine = GrokkingStateMachine(patience=1)
    machine.update(10, 0.99, None)
    assert machine.phase == "warming_up"
    assert machine.mark_steps == {0.5: 10, 0.9: 10, 0.95: 10}


def test_step_going_back_raises():
    machine = GrokkingStateMachine()
    machine.update(20, 0.1, 1.0)
    with pytest.raises(ValueError, match="`step` went back"):
        machine.update(10, 0.1, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"jump_threshold": 0.0}, "`jump_threshold` must be a finite number > 0"),
        ({"jump_threshold": float("nan")}, "`jump_threshold` must be a finite number"),
        ({"jump_window": 0}, "`jump_window` must be an integer >= 1"),
        ({"jump_window": 2.5}, "`jump_window` must be an integer >= 1"),
        ({"jump_window_unit": "epochs"}, "`jump_window_unit` must be one of"),
        ({"convergence_gap": -0.1}, "`convergence_gap` must be a finite number >= 0"),
        ({"patience": 0}, "`patience` must be an integer >= 1"),
        ({"memorization_threshold": "high"}, "`memorization_threshold` must be a finite number"),
        ({"marks": (0.5, float("inf"))}, r"`marks\[1\]` must be a finite number"),
        ({"marks": "0.5"}, "`marks` must be a number or a list of numbers"),
        ({"mode": "maximize"}, r"`mode` must be one of \['max', 'min'\]"),
        ({"stop_requires_grokking": "false"}, "`stop_requires_grokking` must be True or False"),
    ],
)
def test_invalid_arguments_raise_a_message_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrokkingStateMachine(**kwargs)


# ---------------------------------------------------------------------- state
def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_loads_with_weights_only():
    machine = feed(GrokkingStateMachine(), range(10, 1201, 10))
    state = _roundtrip(machine.state_dict())
    restored = GrokkingStateMachine()
    restored.load_state_dict(state)
    assert restored.phase == machine.phase
    assert restored.transitions == machine.transitions
    assert restored.mark_steps == machine.mark_steps


@pytest.mark.parametrize("resume_at", [500, 1050, 1150, 1200])  # memorizing, before the jump, grokking, mid-streak
def test_resume_in_the_middle_makes_the_same_decisions(resume_at):
    steps = list(range(10, 2001, 10))
    uninterrupted = feed(GrokkingStateMachine(), steps)

    first = feed(GrokkingStateMachine(), [s for s in steps if s <= resume_at])
    resumed = GrokkingStateMachine()
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    feed(resumed, [s for s in steps if s > resume_at])

    assert resumed.transitions == uninterrupted.transitions
    assert resumed.mark_steps == uninterrupted.mark_steps
    assert resumed.should_stop == uninterrupted.should_stop


def test_loading_an_unknown_state_format_raises():
    with pytest.raises(ValueError, match="state format"):
        GrokkingStateMachine().load_state_dict({"format": 99})


def test_transition_round_trips_through_a_plain_dict():
    transition = Transition("grokking", 812, "memorizing", 0.31, 0.58, 1.0)
    assert Transition.from_dict(transition.to_dict()) == transition


def test_phases_are_listed_in_order():
    assert PHASES == ("warming_up", "memorizing", "grokking", "converged")


# ---------------------------------------------------------------------- grokking signal
def test_default_grokking_signal_is_the_relative_loss_gap_clipped_at_zero():
    assert default_grokking_signal(train_loss=0.5, val_loss=2.0) == pytest.approx(0.75)
    assert default_grokking_signal(train_loss=2.0, val_loss=0.5) == 0.0
    assert default_grokking_signal(train_loss=0.0, val_loss=0.0) == 0.0
    assert default_grokking_signal(train_loss=float("nan"), val_loss=1.0) == 0.0
