"""The ``auto`` rule: the detector's instability back-off and ``auto_grokfast``, on scripted metrics and on a real
task."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_grokfast import GrokfastCallback, GrokkingDetectorCallback, auto_grokfast
from lightning_grokfast.callbacks.auto import AUTO_FILTER
from tests.test_detector_callback import LambProbe, Script, ScriptedModule, make_trainer

#: fitted at 1.0, unstable from step 100 (0.9) to step 130, back to 1.0 after
UNSTABLE = Script((0, 1.0), (100, 0.9), (130, 1.0))
FLAT = Script((0, 0.5))


def _run(train_acc, max_steps: int = 200, **detector_kwargs):
    grokfast = GrokfastCallback(filter="ema+ma", lamb=2.0, ma_lamb=4.0)
    kwargs = {"instability_backoff": 0.5, "stop_on_convergence": False, **detector_kwargs}
    detector = GrokkingDetectorCallback(**kwargs)
    probe = LambProbe(grokfast)
    make_trainer([grokfast, detector, probe], max_steps=max_steps).fit(
        ScriptedModule(val_acc=FLAT, train_acc=train_acc)
    )
    return grokfast, detector, probe


def test_lamb_halves_at_each_validation_that_sees_the_train_metric_below_its_best():
    grokfast, detector, probe = _run(UNSTABLE)
    # validations every 10 steps read the mean since the previous one: 0.9 at 110, 120, 130; 1.0 again from 140
    assert {probe.lamb_at_step[s] for s in range(110)} == {2.0}
    assert probe.lamb_at_step[110] == 1.0
    assert probe.lamb_at_step[120] == 0.5
    assert {probe.lamb_at_step[s] for s in range(130, 200)} == {0.25}
    assert grokfast.ma_lamb == 4.0 / 8
    assert detector.best_train == 1.0


def test_a_fall_within_instability_drop_or_a_stable_metric_changes_nothing():
    for script, drop in ((UNSTABLE, 0.2), (Script((0, 1.0)), 0.02)):
        grokfast, _, _ = _run(script, instability_drop=drop)
        assert (grokfast.lamb, grokfast.ma_lamb) == (2.0, 4.0)


def test_falls_before_memorization_are_not_watched():
    # still learning: 0.5, a fall to 0.3, then memorized (>= 0.9) at step 100 and stable
    grokfast, detector, _ = _run(Script((0, 0.5), (50, 0.3), (100, 1.0)))
    assert (grokfast.lamb, grokfast.ma_lamb) == (2.0, 4.0)
    assert detector.best_train == 1.0


def test_backoff_is_off_by_default():
    grokfast = GrokfastCallback(lamb=2.0)
    detector = GrokkingDetectorCallback(stop_on_convergence=False)
    make_trainer([grokfast, detector], max_steps=200).fit(ScriptedModule(val_acc=FLAT, train_acc=UNSTABLE))
    assert not detector.backs_off
    assert grokfast.lamb == 2.0


def test_in_min_mode_a_rising_loss_is_the_fall():
    loss = Script((0, 0.01), (100, 0.5), (110, 0.01))
    grokfast, detector, _ = _run(loss, mode="min", memorization_threshold=0.1, instability_drop=0.1, verbose=False)
    assert grokfast.lamb == 1.0
    assert detector.best_train == pytest.approx(-0.01)  # kept signed, higher is better


def test_the_announcement_names_the_metric_the_fall_and_the_new_lamb(caplog):
    with caplog.at_level("INFO"):
        _run(UNSTABLE, max_steps=115, verbose=True)
    assert "train_acc fell from 1 to 0.9 at step 110: lamb 2 -> 1" in caplog.text


def test_resumed_run_backs_off_like_an_uninterrupted_one(tmp_path):
    def run(max_steps: int, ckpt_path=None):
        grokfast = GrokfastCallback(lamb=2.0)
        detector = GrokkingDetectorCallback(instability_backoff=0.5, stop_on_convergence=False)
        trainer = make_trainer([grokfast, detector], max_steps=max_steps)
        trainer.fit(ScriptedModule(val_acc=FLAT, train_acc=UNSTABLE), ckpt_path=ckpt_path)
        return trainer, grokfast, detector

    trainer, _, _ = run(max_steps=115)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed_grokfast, resumed = run(max_steps=200, ckpt_path=tmp_path / "mid.ckpt")
    _, full_grokfast, full = run(max_steps=200)
    assert resumed.best_train == full.best_train == 1.0
    assert resumed_grokfast.lamb == full_grokfast.lamb == 0.25


def test_backoff_without_a_grokfast_callback_raises_a_clear_error():
    detector = GrokkingDetectorCallback(instability_backoff=0.5)
    with pytest.raises(MisconfigurationException, match="instability_backoff"):
        make_trainer([detector], max_steps=20).fit(ScriptedModule())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"instability_backoff": 1.5}, r"`instability_backoff` must be a number in \[0, 1\]"),
        ({"instability_backoff": -0.5}, r"`instability_backoff` must be a number in \[0, 1\]"),
        ({"instability_drop": 0.0}, "`instability_drop` must be a finite number > 0"),
    ],
)
def test_invalid_backoff_arguments_raise_a_message_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrokkingDetectorCallback(**kwargs)


def test_auto_grokfast_is_the_measured_rule_with_overrides():
    grokfast, detector = auto_grokfast()
    assert isinstance(grokfast, GrokfastCallback) and isinstance(detector, GrokkingDetectorCallback)
    assert (grokfast.filter, grokfast.config.window_size, grokfast.lamb) == ("ma", 100, 5.0)
    assert (detector.instability_backoff, detector.instability_drop) == (0.5, 0.02)
    assert not detector.stop_on_convergence
    grokfast, detector = auto_grokfast(
        train_metric="train_loss",
        val_metric="val_loss",
        mode="min",
        memorization_threshold=0.01,
        instability_drop=0.05,
        exclude="bias",
    )
    assert (detector.train_metric, detector.machine.mode, detector.instability_drop) == ("train_loss", "min", 0.05)
    assert detector.machine.memorization_threshold == 0.01
    assert grokfast.selection.exclude[0].pattern == "bias"
    assert auto_grokfast(lamb=3.0)[0].lamb == 3.0
    with pytest.raises(ValueError, match="instability_drop"):
        auto_grokfast(instability_drop=-1.0)
    assert AUTO_FILTER["filter"] == "ma"


def _digits_steps_to(callbacks, mark: float, seed: int = 1, max_steps: int = 1000) -> int | None:
    """Steps for the digits task (the leaderboard's: 500 images, MLP x16 init, AdamW wd 1) to reach ``mark``."""
    from lightning_grokfast.tasks import DigitsDataModule, MLPClassifier

    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(num_train=500, batch_size=500, seed=seed)
    model = MLPClassifier(64, 10, hidden=200, depth=2, init_scale=16.0, optimizer="adamw", weight_decay=1.0)
    reached: list[int] = []

    class StopAtMark(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if float(trainer.callback_metrics["val_acc"]) >= mark:
                reached.append(trainer.global_step)
                trainer.should_stop = True

    make_trainer([*callbacks, StopAtMark()], max_steps=max_steps, val_every=25).fit(model, datamodule=data)
    return reached[0] if reached else None


def test_auto_reaches_95_percent_on_digits_sooner_than_no_filter_and_than_plain_ma():
    # measured (benchmarks/safe_default.py, seed 1): no filter 900 steps, MA 975, auto 625
    auto = _digits_steps_to(auto_grokfast(verbose=False), 0.95)
    none = _digits_steps_to([], 0.95)
    assert auto is not None and none is not None
    assert auto < none
