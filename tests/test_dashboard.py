"""GrokkingDashboardCallback: TensorBoard layout, grokking scalars, milestones and the accuracy figure."""

from __future__ import annotations

import csv
import math
import re
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from lightning_grokfast import GrokfastCallback, GrokkingDashboardCallback, GrokkingDetectorCallback
from lightning_grokfast.callbacks.dashboard import first_steps_reaching, plot_grokking
from lightning_grokfast.tasks import GrokTransformer, ModularArithmeticDataModule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TensorBoardRun = tuple[pl.Trainer, GrokkingDashboardCallback]
CsvRun = tuple[pl.Trainer, pl.LightningModule]


# ---------------------------------------------------------------------- reading TensorBoard event files back
def read_events(log_dir: str | Path) -> EventAccumulator:
    """Load every scalar, image and tensor (text, custom-scalars layout) of the event files in ``log_dir``."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def read_layout(events: EventAccumulator) -> layout_pb2.Layout:
    """The custom-scalars layout (stored as a string tensor of the ``custom_scalars`` plugin)."""
    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")
    (event,) = events.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())


def read_texts(events: EventAccumulator, tag: str) -> list[str]:
    return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in events.Tensors(f"{tag}/text_summary")]


def read_csv_metrics(log_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------- a small real run
def tiny_task(batch_size: int = 16) -> tuple[GrokTransformer, ModularArithmeticDataModule]:
    datamodule = ModularArithmeticDataModule(p=11, batch_size=batch_size)
    model = GrokTransformer(num_tokens=datamodule.num_tokens, dim=16, num_heads=2, num_layers=1, lr=3e-3)
    return model, datamodule


def fit(tmp_path: Path, callbacks: list[Callback], logger: object = True, max_steps: int = 8, **kwargs: object):
    pl.seed_everything(0)
    model, datamodule = tiny_task()
    trainer = pl.Trainer(
        max_steps=max_steps,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(model, datamodule=datamodule)
    return trainer, model


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> TensorBoardRun:
    """8 steps (2 epochs of 4) with Grokfast, the dashboard (marks 0.01 and 0.99) and the TensorBoard logger."""
    dashboard = GrokkingDashboardCallback(marks=(0.01, 0.99))
    trainer, _ = fit(tmp_path_factory.mktemp("tensorboard"), [GrokfastCallback(), dashboard])
    return trainer, dashboard


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> CsvRun:
    """8 steps with the dashboard and a CSVLogger only."""
    root = tmp_path_factory.mktemp("csv")
    return fit(root, [GrokkingDashboardCallback()], logger=CSVLogger(root))


class InterruptAt(Callback):
    """Press Ctrl-C (raise KeyboardInterrupt) after the given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


# ---------------------------------------------------------------------- TensorBoard
def test_layout_has_grokking_section_with_every_chart(tensorboard_run: TensorBoardRun) -> None:
    trainer, _ = tensorboard_run
    layout = read_layout(read_events(trainer.logger.log_dir))
    (section,) = layout.category
    assert section.title == "Grokking"
    titles = [chart.title for chart in section.chart]
    for words in ("accuracy", "loss", "gap", "lamb / alpha", "slow (filtered) vs raw", "weight norm"):
        assert any(words in title for title in titles), (words, titles)


def test_layout_regexes_match_logged_tags_as_tensorboard_applies_them(tensorboard_run: TensorBoardRun) -> None:
    trainer, _ = tensorboard_run
    events = read_events(trainer.logger.log_dir)
    scalar_tags = events.Tags()["scalars"]
    for chart in read_layout(events).category[0].chart:
        if chart.title == "grokking phase":  # logged by the detector, not present here
            continue
        for regex in chart.multiline.tag:
            # TensorBoard's custom-scalars plugin filters tags with re.match
            assert any(re.match(regex, tag) for tag in scalar_tags), (chart.title, regex, scalar_tags)


def test_figure_is_logged_as_image_and_saved_as_png_next_to_the_events(tensorboard_run: TensorBoardRun) -> None:
    trainer, dashboard = tensorboard_run
    log_dir = Path(trainer.logger.log_dir)
    (image,) = read_events(log_dir).Images("grokking/accuracy")
    assert image.step == trainer.global_step
    assert image.width > 0 and image.height > 0
    assert dashboard.figure_path == str(log_dir / "grokking_accuracy.png")
    assert (log_dir / "grokking_accuracy.png").read_bytes().startswith(PNG_MAGIC)


def test_summary_text_lists_the_first_step_of_each_mark(tensorboard_run: TensorBoardRun) -> None:
    trainer, dashboard = tensorboard_run
    (summary,) = read_texts(read_events(trainer.logger.log_dir), "grokking/summary")
    assert f"0.01: {dashboard.mark_steps[0.01]}," in summary and "0.99: not reached" in summary


def test_milestone_text_is_written_when_val_accuracy_first_reaches_a_mark(tensorboard_run: TensorBoardRun) -> None:
    trainer, dashboard = tensorboard_run
    texts = read_texts(read_events(trainer.logger.log_dir), "grokking/milestones")
    assert texts == [f"val_acc reached 0.01 at step {dashboard.mark_steps[0.01]}"]


def test_history_counts_optimizer_steps(tensorboard_run: TensorBoardRun) -> None:
    _, dashboard = tensorboard_run
    assert dashboard.train_steps == list(range(1, 9))
    assert dashboard.val_steps == [4, 8]
    assert all(0.0 <= v <= 1.0 for v in dashboard.train_values + dashboard.val_values)


def test_detector_transitions_and_marks_are_taken_from_the_real_detector(tmp_path: Path) -> None:
    detector = GrokkingDetectorCallback(
        marks=[0.0, 0.99], memorization_threshold=0.0, convergence_gap=0.0, stop_on_convergence=False
    )
    dashboard = GrokkingDashboardCallback()
    trainer, _ = fit(tmp_path, [detector, dashboard])
    assert dashboard._tracker is detector.tracker  # one tracker, one host transfer per validation
    assert dashboard.train_steps == list(range(1, 9))  # recorded by the detector, read by both
    events = read_events(trainer.logger.log_dir)
    (summary,) = read_texts(events, "grokking/summary")
    assert detector.mark_steps == {0.0: 4} and "0: 4" in summary
    for transition in detector.transitions:
        assert f"{transition.phase} @ {transition.step}" in summary
    # the detector announces marks itself, so the dashboard writes no milestone text
    assert "grokking/milestones/text_summary" not in events.Tags()["tensors"]


# ---------------------------------------------------------------------- logged values
def test_weight_norm_is_the_norm_of_all_parameters(csv_run: CsvRun) -> None:
    trainer, model = csv_run
    rows = [r for r in read_csv_metrics(trainer.logger.log_dir) if r.get("grokking/weight_norm")]
    # the last value is logged after the last optimizer step, so it is the norm of the final parameters
    expected = torch.cat([p.detach().flatten() for p in model.parameters()]).norm().item()
    assert len(rows) == 8
    assert float(rows[-1]["grokking/weight_norm"]) == pytest.approx(expected, rel=1e-5)


def test_gap_is_mean_train_accuracy_since_last_validation_minus_val_accuracy(csv_run: CsvRun) -> None:
    # 55 training equations at batch 16: 4 steps per epoch, a validation after each epoch
    trainer, _ = csv_run
    rows = read_csv_metrics(trainer.logger.log_dir)
    train_acc = {int(r["step"]): float(r["train_acc_step"]) for r in rows if r.get("train_acc_step")}
    gaps = [(int(r["step"]), float(r["grokking/gap"]), float(r["val_acc"])) for r in rows if r.get("grokking/gap")]
    assert [step for step, _, _ in gaps] == [3, 7]
    previous = -1
    for step, gap, val_acc in gaps:
        epoch_train = [acc for s, acc in train_acc.items() if previous < s <= step]
        assert len(epoch_train) == 4
        assert gap == pytest.approx(sum(epoch_train) / 4 - val_acc, abs=1e-6)
        previous = step


def test_history_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    dashboard = GrokkingDashboardCallback()
    trainer, model = fit(tmp_path, [dashboard], max_steps=4)
    checkpoint = tmp_path / "after4.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = GrokkingDashboardCallback()
    _, datamodule = tiny_task()
    trainer = pl.Trainer(
        max_steps=8,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[resumed],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=checkpoint)
    assert resumed.val_steps == [4, 8]
    assert resumed.train_steps == list(range(1, 9))


def test_interrupted_run_still_saves_the_figure(tmp_path: Path) -> None:
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C ends in sys.exit(1)
            fit(tmp_path, [GrokkingDashboardCallback(), InterruptAt(3)], logger=False)
    finally:
        signal.signal(signal.SIGINT, sigint_handler)  # Lightning ignores SIGINT after the first one
    assert (tmp_path / "grokking_accuracy.png").read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------------- other loggers
def test_csv_logger_run_saves_png_in_the_csv_log_dir(csv_run: CsvRun) -> None:
    trainer, _ = csv_run
    assert (Path(trainer.logger.log_dir) / "grokking_accuracy.png").read_bytes().startswith(PNG_MAGIC)


def test_run_without_logger_saves_png_in_default_root_dir(tmp_path: Path) -> None:
    dashboard = GrokkingDashboardCallback()
    fit(tmp_path, [dashboard], logger=False)
    assert (tmp_path / "grokking_accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert dashboard.val_steps == [4, 8]


def test_every_tensorboard_logger_gets_layout_and_figure_and_png_is_saved_once(tmp_path: Path) -> None:
    loggers = [TensorBoardLogger(tmp_path, name="first"), CSVLogger(tmp_path), TensorBoardLogger(tmp_path, name="b")]
    fit(tmp_path, [GrokkingDashboardCallback()], logger=loggers)
    for logger in (loggers[0], loggers[2]):
        events = read_events(logger.log_dir)
        assert read_layout(events).category[0].title == "Grokking"
        assert events.Images("grokking/accuracy")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png")) == [
        Path("first/version_0/grokking_accuracy.png")
    ]


# ---------------------------------------------------------------------- pure helpers
def test_first_steps_reaching_returns_the_first_crossing_or_none() -> None:
    steps, values = [10, 20, 30, 40], [0.1, 0.6, 0.4, 0.97]
    assert first_steps_reaching(steps, values, (0.5, 0.95, 0.99)) == {0.5: 20, 0.95: 40, 0.99: None}


def test_plot_has_log_step_axis_and_a_line_per_reached_mark_and_transition() -> None:
    figure = plot_grokking(
        [1, 2, 10, 100], [0.1, 0.5, 1.0, 1.0], [10, 100], [0.05, 0.97], {0.5: 100, 0.9: None}, [(50, "grokking")]
    )
    (axes,) = figure.axes
    assert axes.get_xscale() == "log"
    vertical = [line for line in axes.get_lines() if len(set(line.get_xdata())) == 1]
    assert sorted(line.get_xdata()[0] for line in vertical) == [50, 100]
    assert "0.5 at step 100" in axes.get_title()


def test_marks_outside_the_unit_interval_are_rejected() -> None:
    with pytest.raises(ValueError, match="marks"):
        GrokkingDashboardCallback(marks=(0.5, 1.5))


def test_non_finite_values_are_left_out_of_the_figure() -> None:
    figure = plot_grokking([1, 2], [0.5, math.nan], [2], [0.5])
    (train_line, _) = figure.axes[0].get_lines()
    assert list(train_line.get_xdata()) == [1]
