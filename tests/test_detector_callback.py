"""Specification of GrokkingDetectorCallback inside a Trainer, with modules that log scripted metrics."""

from __future__ import annotations

import io
import logging
import math
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_grokfast import GrokfastCallback, GrokkingDetectorCallback
from lightning_grokfast.callbacks.detector import _resolve
from lightning_grokfast.tasks import GrokTransformer, ModularArithmeticDataModule

# ---------------------------------------------------------------------- scripted metrics


class Script:
    """Piecewise-constant metric: ``Script((0, 0.05), (100, 0.8))`` is 0.05 before step 100 and 0.8 from it on."""

    def __init__(self, *points: tuple[int, float]) -> None:
        self.points = sorted(points)

    def __call__(self, step: int) -> float:
        return next(value for start, value in reversed(self.points) if step >= start)


MEMORIZED = Script((0, 1.0))
#: chance level until step 100, jumps to 0.8 (grokking), reaches 1.0 at step 200 (converged at 220, patience 3)
GROKS = Script((0, 0.05), (100, 0.8), (200, 1.0))


class ScriptedModule(pl.LightningModule):
    """A linear layer trained on noise, logging scripted metrics indexed by ``self.global_step``.

    Args:
        val_acc: the validation metric; a list gives one script per rank.
        train_acc: the train metric (logged at every training step).
        train_loss, val_loss: constant losses to log (``None``: not logged).
        train_acc_on_epoch: also log the train metric at epoch level (as the built-in task does).

    """

    def __init__(
        self,
        val_acc=GROKS,
        train_acc=MEMORIZED,
        train_loss: float | None = None,
        val_loss: float | None = None,
        train_acc_on_epoch: bool = False,
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.val_acc = val_acc
        self.train_acc = train_acc
        self.train_loss = train_loss
        self.val_loss = val_loss
        self.train_acc_on_epoch = train_acc_on_epoch

    def training_step(self, batch, batch_idx):
        self.log("train_acc", self.train_acc(self.global_step), on_step=True, on_epoch=self.train_acc_on_epoch)
        if self.train_loss is not None:
            self.log("train_loss", self.train_loss)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        script = self.val_acc[self.global_rank] if isinstance(self.val_acc, list) else self.val_acc
        self.log("val_acc", script(self.global_step))
        if self.val_loss is not None:
            self.log("val_loss", self.val_loss)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 2, generator=torch.Generator().manual_seed(0))))

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 2)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_trainer(callbacks, max_steps: int = 300, val_every: int | None = 10, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer validating every ``val_every`` steps (``None``: at the end of every epoch)."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "val_check_interval": val_every or 1.0,
        "check_val_every_n_epoch": None if val_every else 1,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


class LambProbe(pl.Callback):
    """Records the GrokfastCallback's ``lamb`` used at every optimizer step."""

    def __init__(self, grokfast: GrokfastCallback) -> None:
        self.grokfast = grokfast
        self.lamb_at_step: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lamb_at_step[trainer.global_step] = self.grokfast.lamb


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def detector_values(self, key: str) -> dict[int | None, float]:
        return {step: metrics[key] for step, metrics in self.records if key in metrics}


# ---------------------------------------------------------------------- lambda boost
def test_boost_multiplies_grokfast_lamb_from_the_step_after_grokking_is_detected():
    grokfast = GrokfastCallback(lamb=2.0)
    detector = GrokkingDetectorCallback(lambda_boost=3.0, stop_on_convergence=False)
    probe = LambProbe(grokfast)
    make_trainer([grokfast, detector, probe], max_steps=150).fit(ScriptedModule())
    assert detector.transitions[1].phase == "grokking"
    assert detector.transitions[1].step == 100
    assert {probe.lamb_at_step[s] for s in range(100)} == {2.0}
    assert {probe.lamb_at_step[s] for s in range(100, 150)} == {6.0}
    assert grokfast.filters[0].lamb == 6.0


def test_boost_is_capped_at_max_lamb():
    grokfast = GrokfastCallback(lamb=2.0)
    detector = GrokkingDetectorCallback(lambda_boost=10.0, max_lamb=5.0)
    make_trainer([grokfast, detector], max_steps=150).fit(ScriptedModule())
    assert grokfast.lamb == 5.0


def test_boost_is_applied_once():
    grokfast = GrokfastCallback(lamb=2.0)
    detector = GrokkingDetectorCallback(lambda_boost=2.0, stop_on_convergence=False)
    make_trainer([grokfast, detector], max_steps=300).fit(ScriptedModule())
    assert grokfast.lamb == 4.0


def test_boost_without_a_grokfast_callback_raises_a_clear_error():
    detector = GrokkingDetectorCallback(lambda_boost=2.0)
    with pytest.raises(MisconfigurationException, match=r"lambda_boost.*there is none among the Trainer's callbacks"):
        make_trainer([detector], max_steps=10).fit(ScriptedModule())


def test_no_boost_needs_no_grokfast_callback():
    detector = GrokkingDetectorCallback()
    make_trainer([detector], max_steps=150).fit(ScriptedModule())
    assert detector.phase == "grokking"


# ---------------------------------------------------------------------- stopping
def test_stop_is_requested_at_the_convergence_step():
    detector = GrokkingDetectorCallback(patience=3)
    trainer = make_trainer([detector], max_steps=1000)
    trainer.fit(ScriptedModule())
    assert [(t.phase, t.step) for t in detector.transitions] == [
        ("memorizing", 10),
        ("grokking", 100),
        ("converged", 220),
    ]
    assert trainer.global_step == 220


def test_stop_on_convergence_false_only_reports():
    detector = GrokkingDetectorCallback(stop_on_convergence=False)
    trainer = make_trainer([detector], max_steps=300)
    trainer.fit(ScriptedModule())
    assert detector.phase == "converged"
    assert trainer.global_step == 300


def test_convergence_without_grokking_does_not_stop_by_default():
    detector = GrokkingDetectorCallback()
    trainer = make_trainer([detector], max_steps=100)
    trainer.fit(ScriptedModule(val_acc=Script((0, 1.0))))
    assert detector.phase == "converged"
    assert trainer.global_step == 100


def test_convergence_without_grokking_stops_when_grokking_is_not_required():
    detector = GrokkingDetectorCallback(stop_requires_grokking=False, patience=2)
    trainer = make_trainer([detector], max_steps=100)
    trainer.fit(ScriptedModule(val_acc=Script((0, 1.0))))
    assert trainer.global_step == 20


# ---------------------------------------------------------------------- reading metrics
def test_sanity_check_validation_is_skipped():
    detector = GrokkingDetectorCallback()
    make_trainer([detector], max_steps=10, num_sanity_val_steps=1).fit(ScriptedModule())
    assert detector.machine.evaluations == 1


def test_validation_outside_fit_is_ignored():
    detector = GrokkingDetectorCallback()
    make_trainer([detector]).validate(ScriptedModule(), verbose=False)
    assert detector.machine.evaluations == 0


def test_missing_metric_error_lists_the_available_metrics():
    detector = GrokkingDetectorCallback(val_metric="val_accuracy")
    with pytest.raises(RuntimeError, match=r"`val_accuracy`.*available metrics: `train_acc`, `val_acc`"):
        make_trainer([detector], max_steps=10).fit(ScriptedModule())


def test_missing_metric_with_strict_false_warns_and_skips_the_evaluation():
    detector = GrokkingDetectorCallback(val_metric="val_accuracy", strict=False)
    with pytest.warns(RuntimeWarning, match="val_accuracy"):
        make_trainer([detector], max_steps=20).fit(ScriptedModule())
    assert detector.machine.evaluations == 0


def test_train_metric_is_the_mean_of_the_steps_since_the_previous_validation():
    alternating = Script(*((s, 1.0 if s % 2 else 0.8) for s in range(200)))  # mean 0.9 over any 10 steps
    detector = GrokkingDetectorCallback(memorization_threshold=0.9)
    make_trainer([detector], max_steps=20).fit(ScriptedModule(train_acc=alternating))
    assert detector.transitions[0].phase == "memorizing"
    assert detector.transitions[0].train == pytest.approx(0.9)


def test_train_metric_logged_on_step_and_epoch_is_found():
    detector = GrokkingDetectorCallback()
    make_trainer([detector], max_steps=150).fit(ScriptedModule(train_acc_on_epoch=True))
    assert [t.phase for t in detector.transitions] == ["memorizing", "grokking"]


def test_metric_name_falls_back_to_epoch_then_step_names():
    assert _resolve({"acc": 1, "acc_epoch": 2, "acc_step": 3}, "acc") == 1
    assert _resolve({"acc_epoch": 2, "acc_step": 3}, "acc") == 2
    assert _resolve({"acc_step": 3}, "acc") == 3
    assert _resolve({"other": 4}, "acc") is None


# ---------------------------------------------------------------------- adaptive alpha
def test_adaptive_alpha_follows_the_loss_based_grokking_signal():
    grokfast = GrokfastCallback(alpha=0.98)
    detector = GrokkingDetectorCallback(adaptive_alpha=True, kappa=0.5, stop_on_convergence=False)
    make_trainer([grokfast, detector], max_steps=20).fit(ScriptedModule(train_loss=0.5, val_loss=2.0))
    signal = (2.0 - 0.5) / 2.0
    assert detector.last_signal == pytest.approx(signal)
    assert grokfast.alpha == pytest.approx(0.98 * math.exp(-0.5 * signal))
    assert grokfast.filters[0].alpha == pytest.approx(grokfast.alpha)
    assert detector.alpha_0 == [0.98]


def test_adaptive_alpha_with_a_user_signal():
    grokfast = GrokfastCallback(alpha=0.9)
    detector = GrokkingDetectorCallback(adaptive_alpha=True, kappa=1.0, grokking_signal=lambda trainer, module: 0.25)
    make_trainer([grokfast, detector], max_steps=20).fit(ScriptedModule())
    assert grokfast.alpha == pytest.approx(0.9 * math.exp(-0.25))


def test_adaptive_alpha_with_a_moving_average_filter_raises():
    detector = GrokkingDetectorCallback(adaptive_alpha=True)
    with pytest.raises(MisconfigurationException, match="filter='ma'"):
        make_trainer([GrokfastCallback(filter="ma"), detector], max_steps=10).fit(ScriptedModule())


# ---------------------------------------------------------------------- reporting
def test_transitions_are_announced_once_in_plain_words(caplog):
    detector = GrokkingDetectorCallback(stop_on_convergence=False)
    with caplog.at_level(logging.INFO):
        make_trainer([detector], max_steps=300).fit(ScriptedModule())
    messages = [r.getMessage() for r in caplog.records]
    grokking = [m for m in messages if "grokking detected" in m]
    assert grokking == ["GrokkingDetectorCallback: grokking detected at step 100: val_acc 0.05 -> 0.80"]
    assert sum("converged at step 220" in m for m in messages) == 1
    assert sum("val_acc reached 0.5 at step 100" in m for m in messages) == 1


def test_phase_gap_lamb_and_transition_steps_are_logged_to_the_loggers():
    logger = RecordingLogger()
    detector = GrokkingDetectorCallback(lambda_boost=2.0, stop_on_convergence=False)
    make_trainer([GrokfastCallback(lamb=1.5), detector], max_steps=300, logger=logger).fit(ScriptedModule())
    phase = logger.detector_values("detector/phase")
    assert phase[90] == 1.0 and phase[100] == 2.0 and phase[300] == 3.0
    assert logger.detector_values("detector/gap")[100] == pytest.approx(0.2)
    assert logger.detector_values("detector/lamb") == {step: 1.5 if step < 100 else 3.0 for step in phase}
    assert logger.detector_values("detector/alpha")[100] == pytest.approx(0.98)
    assert logger.detector_values("detector/grokking_step") == {100: 100.0}
    assert logger.detector_values("detector/converged_step") == {220: 220.0}
    assert logger.detector_values("detector/mark_0.95_step") == {200: 200.0}


def test_tensorboard_logger_receives_the_announcements_as_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="", version="")
    make_trainer([GrokkingDetectorCallback()], max_steps=150, logger=logger).fit(ScriptedModule())
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path)).Reload()
    texts = [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("detector/transitions/text_summary")
    ]
    assert (100, "grokking detected at step 100: val_acc 0.05 -> 0.80") in texts
    assert (100, "val_acc reached 0.5 at step 100") in texts


# ---------------------------------------------------------------------- state
def test_callback_state_dict_loads_with_weights_only():
    grokfast = GrokfastCallback()
    detector = GrokkingDetectorCallback(adaptive_alpha=True, lambda_boost=2.0)
    make_trainer([grokfast, detector], max_steps=150).fit(ScriptedModule(train_loss=0.1, val_loss=1.0))
    buffer = io.BytesIO()
    torch.save(detector.state_dict(), buffer)
    buffer.seek(0)
    restored = GrokkingDetectorCallback(adaptive_alpha=True, lambda_boost=2.0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.transitions == detector.transitions
    assert restored.mark_steps == detector.mark_steps
    assert restored.alpha_0 == detector.alpha_0


def test_resumed_run_makes_the_same_decisions_as_an_uninterrupted_one(tmp_path):
    def run(max_steps: int, ckpt_path=None):
        grokfast = GrokfastCallback(lamb=2.0)
        detector = GrokkingDetectorCallback(lambda_boost=2.0, adaptive_alpha=True)
        trainer = make_trainer([grokfast, detector], max_steps=max_steps)
        trainer.fit(ScriptedModule(train_loss=0.1, val_loss=1.0), ckpt_path=ckpt_path)
        return trainer, grokfast, detector

    trainer, _, interrupted = run(max_steps=210)  # in the middle of the convergence streak (200, 210, 220)
    assert interrupted.phase == "grokking"
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed_trainer, resumed_grokfast, resumed = run(max_steps=1000, ckpt_path=tmp_path / "mid.ckpt")
    full_trainer, full_grokfast, full = run(max_steps=1000)

    assert resumed.transitions == full.transitions
    assert resumed.mark_steps == full.mark_steps
    assert resumed_trainer.global_step == full_trainer.global_step == 220
    assert resumed_grokfast.lamb == full_grokfast.lamb == 4.0
    assert resumed_grokfast.alpha == pytest.approx(full_grokfast.alpha)
    assert resumed.alpha_0 == full.alpha_0 == [0.98]


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambda_boost": -1.0}, "`lambda_boost` must be a finite number >= 0"),
        ({"lambda_boost": float("inf")}, "`lambda_boost` must be a finite number"),
        ({"max_lamb": -0.5}, "`max_lamb` must be a finite number >= 0"),
        ({"kappa": -0.1}, "`kappa` must be a finite number >= 0"),
        ({"jump_threshold": -0.1}, "`jump_threshold` must be a finite number > 0"),
        ({"patience": 0}, "`patience` must be an integer >= 1"),
        ({"val_metric": ""}, "`val_metric` must be a non-empty metric name"),
        ({"grokking_signal": 0.5}, "`grokking_signal` must be a callable"),
    ],
)
def test_invalid_arguments_raise_a_message_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrokkingDetectorCallback(**kwargs)


# ---------------------------------------------------------------------- distributed
class SameDecisionsOnEveryRank(pl.Callback):
    """Asserted inside each DDP worker: every rank boosted, stopped and recorded the same, at the expected step."""

    def __init__(self, grokfast: GrokfastCallback, detector: GrokkingDetectorCallback) -> None:
        self.grokfast = grokfast
        self.detector = detector

    def on_fit_end(self, trainer, pl_module):
        mine = (
            trainer.global_step,
            self.grokfast.lamb,
            [(t.phase, t.step) for t in self.detector.transitions],
            self.detector.mark_steps,
        )
        everyone = [None] * trainer.world_size
        torch.distributed.all_gather_object(everyone, mine)
        assert all(other == everyone[0] for other in everyone), everyone
        assert mine == (
            220,
            4.0,
            [("memorizing", 10), ("grokking", 100), ("converged", 220)],
            {0.5: 100, 0.9: 200, 0.95: 200},
        ), mine


@pytest.mark.timeout(120)
def test_ddp_ranks_with_different_metrics_boost_and_stop_identically():
    # rank 0 jumps to 1.0 at step 100, rank 1 stays at chance until 200: their mean (0.525) jumps at 100; without
    # averaging, rank 1 would see no jump, boost nothing and not stop, while rank 0 would boost and stop
    per_rank = [Script((0, 0.05), (100, 1.0)), Script((0, 0.05), (200, 1.0))]
    grokfast = GrokfastCallback(lamb=2.0)
    detector = GrokkingDetectorCallback(lambda_boost=2.0)
    trainer = make_trainer(
        [grokfast, detector, SameDecisionsOnEveryRank(grokfast, detector)],
        max_steps=1000,
        strategy="ddp_fork",
        devices=2,
    )
    start = time.monotonic()
    trainer.fit(ScriptedModule(val_acc=per_rank))
    assert trainer.state.finished
    assert time.monotonic() - start < 120


# ---------------------------------------------------------------------- a real run
class StopAtMark(pl.Callback):
    """Ends the run once the detector recorded ``mark`` (keeps the test short)."""

    def __init__(self, detector: GrokkingDetectorCallback, mark: float) -> None:
        self.detector = detector
        self.mark = mark

    def on_validation_end(self, trainer, pl_module):
        if self.mark in self.detector.mark_steps:
            trainer.should_stop = True


@pytest.mark.timeout(120)
def test_detector_fires_on_a_real_modular_arithmetic_run():
    # x * y mod 31 on 80% of the table (seed 1), a one-layer transformer with strong weight decay: train accuracy
    # passes 0.9 near step 330 while validation is near 0.05; validation then climbs from about 0.25 to 0.5 within
    # the jump window (step ~920). About 20 s on one CPU thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic, hence the same trajectory, on any machine
    try:
        pl.seed_everything(1, verbose=False)
        datamodule = ModularArithmeticDataModule(operation="*", p=31, train_fraction=0.8, seed=1)
        model = GrokTransformer(
            num_tokens=datamodule.num_tokens, dim=64, num_layers=1, lr=1e-3, weight_decay=1.0, optimizer="adamw"
        )
        detector = GrokkingDetectorCallback(jump_threshold=0.2, jump_window=200)
        callbacks = [GrokfastCallback("ema", alpha=0.98, lamb=2.0), detector, StopAtMark(detector, 0.5)]
        trainer = make_trainer(callbacks, max_steps=1200, val_every=None, check_val_every_n_epoch=5)
        trainer.fit(model, datamodule=datamodule)
    finally:
        torch.set_num_threads(threads)

    phases = [t.phase for t in detector.transitions]
    assert phases[:2] == ["memorizing", "grokking"], detector.transitions
    memorizing, grokking = detector.transitions[:2]
    assert memorizing.val_after < 0.3 <= memorizing.train
    assert grokking.step > memorizing.step
    assert grokking.val_after - grokking.val_before >= 0.2
    assert 0.5 in detector.mark_steps
    assert detector.mark_steps[0.5] >= grokking.step
