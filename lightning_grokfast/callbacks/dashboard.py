"""GrokkingDashboardCallback: a TensorBoard dashboard for grokking, and the accuracy-over-steps figure.

With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` the run registers a custom-scalars layout (a
"Grokking" section: train vs validation accuracy, train vs validation loss, their gap, Grokfast's ``lamb``/``alpha``,
slow vs raw gradient norm, total weight norm), writes milestones as text, and at the end of training logs a figure
of train/validation accuracy over optimizer steps on a log-scaled step axis (TensorBoard's own charts have no log
step axis). The figure is also saved as a PNG next to the logs. Other loggers, several loggers or none work too:
then only the metrics are logged and the PNG lands in ``trainer.log_dir``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_grokfast.callbacks.detector import GrokkingDetectorCallback
from lightning_grokfast.callbacks.tracking import TrainMetricTracker
from lightning_grokfast.callbacks.utils import is_logging_step
from lightning_grokfast.core.validation import check_bool, require

DEFAULT_MARKS: tuple[float, ...] = (0.5, 0.9, 0.95)
_STATE_FORMAT = 1


def grokking_layout(
    train_metric: str = "train_acc",
    val_metric: str = "val_acc",
    train_loss: str = "train_loss",
    val_loss: str = "val_loss",
    section: str = "Grokking",
) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout of the grokking dashboard, as ``TensorBoard``'s ``add_custom_scalars`` takes it.

    Each chart lists regular expressions of scalar tags, which TensorBoard applies with ``re.match``; a tag logged
    both per step and per epoch by Lightning (``train_acc_step``, ``train_acc_epoch``) matches as well as the plain
    name, and ``gap``/``lamb``/``alpha``/``phase`` charts take the tag under any prefix (``grokfast/lamb``).

    Args:
        train_metric: name of the logged training accuracy.
        val_metric: name of the logged validation accuracy.
        train_loss: name of the logged training loss.
        val_loss: name of the logged validation loss.
        section: title of the dashboard section.

    Returns:
        ``{section: {chart title: ["Multiline", [tag regex, ...]]}}``.

    Example::

        logger.experiment.add_custom_scalars(grokking_layout())

    """

    def tag(name: str) -> str:
        return f"^{_escape(name)}(_step|_epoch)?$"

    return {
        section: {
            "accuracy: train vs validation": ["Multiline", [tag(train_metric), tag(val_metric)]],
            "loss: train vs validation": ["Multiline", [tag(train_loss), tag(val_loss)]],
            "generalization gap (train - validation accuracy)": ["Multiline", [r"^(.*/)?gap$"]],
            "Grokfast lamb / alpha": ["Multiline", [r"^(.*/)?(lamb|ma_lamb|alpha)$"]],
            "gradient norm: slow (filtered) vs raw": ["Multiline", [r"^(.*/)?(grad_norm|slow_norm)$"]],
            "total weight norm": ["Multiline", [r"^grokking/weight_norm$"]],
            "grokking phase": ["Multiline", [r"^(.*/)?phase$"]],
        }
    }


def _escape(name: str) -> str:
    """``re.escape`` that leaves ``/`` alone (TensorBoard shows the regex; ``\\/`` reads badly)."""
    return "".join("\\" + c if c in ".^$*+?{}[]\\|()" else c for c in name)


def first_steps_reaching(
    steps: Sequence[int], values: Sequence[float], marks: Iterable[float] = DEFAULT_MARKS
) -> dict[float, int | None]:
    """The first step at which ``values`` reaches each mark.

    Args:
        steps: the step of each value, in increasing order.
        values: the measured values (e.g. validation accuracy).
        marks: thresholds to look for.

    Returns:
        ``{mark: first step with value >= mark, or None if never reached}``.

    Example::

        first_steps_reaching([10, 20, 30], [0.1, 0.6, 0.97])  # {0.5: 20, 0.9: 30, 0.95: 30}

    """
    reached: dict[float, int | None] = {}
    for mark in marks:
        reached[float(mark)] = next((int(s) for s, v in zip(steps, values) if v >= mark), None)
    return reached


def plot_grokking(
    train_steps: Sequence[int],
    train_values: Sequence[float],
    val_steps: Sequence[int],
    val_values: Sequence[float],
    mark_steps: dict[float, int | None] | None = None,
    transitions: Sequence[tuple[int, str]] = (),
    title: str | None = None,
) -> Any:
    """Draw train and validation accuracy over optimizer steps on a log-scaled step axis.

    Args:
        train_steps: optimizer step of each training accuracy (steps ``<= 0`` are not drawn: log axis).
        train_values: training accuracy per step.
        val_steps: optimizer step of each validation accuracy.
        val_values: validation accuracy.
        mark_steps: ``{mark: first step the validation accuracy reached it}``; drawn as dashed vertical lines
            named in the legend.
        transitions: ``(step, phase name)`` of the grokking phase transitions; drawn as dotted vertical lines
            named in the legend.
        title: figure title (default: the step at which the highest reached mark was first met).

    Returns:
        A :class:`matplotlib.figure.Figure` drawn with the Agg canvas (no pyplot, no global backend change).

    Example::

        fig = plot_grokking(steps, train_acc, val_steps, val_acc, {0.95: 1160})
        fig.savefig("grokking_accuracy.png")

    """
    figure = require("matplotlib.figure", "dashboard", "The grokking figure").Figure(figsize=(8, 4.5), dpi=120)
    require("matplotlib.backends.backend_agg", "dashboard", "The grokking figure").FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    train = [(s, v) for s, v in zip(train_steps, train_values) if s > 0 and math.isfinite(v)]
    val = [(s, v) for s, v in zip(val_steps, val_values) if s > 0 and math.isfinite(v)]
    if train:
        axes.plot(*zip(*train), color="tab:blue", linewidth=0.8, alpha=0.6, label="train accuracy")
    if val:
        axes.plot(*zip(*val), color="tab:red", linewidth=1.6, label="validation accuracy")
    mark_steps = mark_steps or {}
    reached_marks = sorted((mark, step) for mark, step in mark_steps.items() if step is not None and step > 0)
    for i, (mark, step) in enumerate(reached_marks):
        shade = 0.75 - 0.55 * (i + 1) / len(reached_marks)  # darker for higher marks
        axes.axvline(step, color=str(shade), linestyle="--", linewidth=1.0, label=f"validation {mark:g} at step {step}")
    phase_colors = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink")
    for i, (step, phase) in enumerate(t for t in transitions if t[0] > 0):
        axes.axvline(
            step, color=phase_colors[i % len(phase_colors)], linestyle=":", linewidth=1.4, label=f"{phase} @ {step}"
        )
    if train or val:
        axes.set_xscale("log")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("optimizer step (log scale)")
    axes.set_ylabel("accuracy")
    axes.grid(True, which="both", alpha=0.25)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left", fontsize=8)
    if title is None:
        reached = [(m, s) for m, s in mark_steps.items() if s is not None]
        title = f"validation accuracy {max(reached)[0]:g} at step {max(reached)[1]}" if reached else "grokking"
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def total_weight_norm(module: torch.nn.Module) -> Tensor:
    """The L2 norm of all parameters of ``module`` together (one ``_foreach_norm`` per device and dtype).

    Args:
        module: the model.

    Returns:
        A 0-dim float32 tensor on the first parameter's device (0 for a module without parameters).

    Example::

        >>> import torch
        >>> from lightning_grokfast.callbacks.dashboard import total_weight_norm
        >>> layer = torch.nn.Linear(3, 1, bias=False)
        >>> _ = torch.nn.init.ones_(layer.weight)
        >>> round(float(total_weight_norm(layer)) ** 2, 4)
        3.0
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for param in module.parameters():
        groups.setdefault((param.device, param.dtype), []).append(param.detach())
    if not groups:
        return torch.zeros(())
    device = next(iter(groups))[0]
    squares = [
        torch.stack(torch._foreach_norm(tensors)).float().square().sum().to(device) for tensors in groups.values()
    ]
    return torch.stack(squares).sum().sqrt()


def _find_detector(trainer: pl.Trainer) -> GrokkingDetectorCallback | None:
    """The grokking detector among the Trainer's callbacks, or ``None``."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    return next((c for c in callbacks if isinstance(c, GrokkingDetectorCallback)), None)


class GrokkingDashboardCallback(Callback):
    r"""Record train/validation accuracy over optimizer steps and lay out a grokking dashboard in TensorBoard.

    During ``fit`` it

    * registers a custom-scalars layout (see :func:`grokking_layout`) with every
      :class:`~lightning.pytorch.loggers.TensorBoardLogger`, so TensorBoard's "Custom Scalars" tab opens with a
      ready "Grokking" section;
    * logs ``grokking/weight_norm`` (L2 norm of all parameters) on logging steps and ``grokking/gap`` (mean
      training accuracy since the previous validation minus validation accuracy) after each validation;
    * writes a text line when the validation accuracy first reaches each of ``marks`` (unless a grokking detector,
      which announces them itself, is among the callbacks);
    * at the end of training, draws :func:`plot_grokking` (log-scaled step axis, marks and the phase transitions
      of a :class:`~lightning_grokfast.GrokkingDetectorCallback` if one is present), logs it as the image
      ``grokking/accuracy`` and saves it as ``figure_name`` in the TensorBoard log directory (else in
      ``trainer.log_dir``).

    Only global rank zero writes. Loggers other than TensorBoard receive the metrics only; with no logger, only
    the PNG is written.

    Args:
        train_metric: name under which the LightningModule logs its training accuracy.
        val_metric: name under which it logs its validation accuracy.
        train_loss: name of the logged training loss (for the layout).
        val_loss: name of the logged validation loss (for the layout).
        marks: validation accuracies whose first step is recorded and marked on the figure.
        log_weight_norm: log ``grokking/weight_norm``.
        figure_name: file name of the PNG (``None``: no PNG and no figure).
        section: title of the custom-scalars section.

    Raises:
        ValueError: If a mark is not in ``(0, 1]``.

    Example::

        from lightning_grokfast import GrokfastCallback, GrokkingDashboardCallback

        trainer = L.Trainer(callbacks=[GrokfastCallback(), GrokkingDashboardCallback()])
        trainer.fit(model, datamodule=dm)
        print(trainer.callbacks[1].mark_steps)  # {0.5: 1030, 0.9: 1140, 0.95: 1160}

    """

    def __init__(
        self,
        train_metric: str = "train_acc",
        val_metric: str = "val_acc",
        train_loss: str = "train_loss",
        val_loss: str = "val_loss",
        marks: Sequence[float] = DEFAULT_MARKS,
        log_weight_norm: bool = True,
        figure_name: str | None = "grokking_accuracy.png",
        section: str = "Grokking",
    ) -> None:
        super().__init__()
        marks = tuple(float(m) for m in marks)
        if any(not 0.0 < m <= 1.0 for m in marks):
            raise ValueError(f"`marks` must lie in (0, 1], got {marks!r}.")
        self.train_metric = train_metric
        self.val_metric = val_metric
        self.train_loss = train_loss
        self.val_loss = val_loss
        self.marks = tuple(sorted(marks))
        self.log_weight_norm = check_bool(log_weight_norm, "log_weight_norm")
        self.figure_name = figure_name
        self.section = section
        self.train_steps: list[int] = []
        self.train_values: list[float] = []
        self.val_steps: list[int] = []
        self.val_values: list[float] = []
        self.figure_path: str | None = None
        # replaced by the detector's tracker when there is one: one host transfer per validation for both
        self._tracker = TrainMetricTracker()
        self._records = True
        self._last_flushed: list[tuple[int, float]] | None = None
        self._registered: set[int] = set()
        self._announced: set[float] = set()

    # ------------------------------------------------------------------ results
    @property
    def layout(self) -> dict[str, dict[str, list[Any]]]:
        """The custom-scalars layout this callback registers."""
        return grokking_layout(self.train_metric, self.val_metric, self.train_loss, self.val_loss, self.section)

    @property
    def mark_steps(self) -> dict[float, int | None]:
        """First optimizer step at which the validation accuracy reached each mark (``None``: not reached)."""
        return first_steps_reaching(self.val_steps, self.val_values, self.marks)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(train_metric=self.train_metric, val_metric=self.val_metric)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detector = _find_detector(trainer)
        self._tracker = detector.tracker if detector is not None else TrainMetricTracker()
        self._tracker.watch(self.train_metric)
        self._records = detector is None  # with a detector, the detector records after each batch
        if not trainer.is_global_zero:
            return
        for logger in _tensorboard_loggers(trainer):
            if id(logger) not in self._registered:
                logger.experiment.add_custom_scalars(self.layout)
                self._registered.add(id(logger))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._records:
            self._tracker.record(trainer.global_step, trainer.callback_metrics)
        if self.log_weight_norm and is_logging_step(trainer):
            pl_module.log(
                "grokking/weight_norm", total_weight_norm(pl_module), on_step=True, on_epoch=False, batch_size=1
            )

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        new_train = self._flush_train(trainer.global_step)
        value = trainer.callback_metrics.get(self.val_metric)
        if value is None:
            return
        val_acc = float(value)
        step = trainer.global_step
        self.val_steps.append(step)
        self.val_values.append(val_acc)
        if new_train:
            gap = sum(new_train) / len(new_train) - val_acc
            pl_module.log("grokking/gap", gap, on_step=False, on_epoch=True, batch_size=1)
        if trainer.is_global_zero and _find_detector(trainer) is None:  # a detector announces marks itself
            for mark in self.marks:
                if val_acc >= mark and mark not in self._announced:
                    self._announced.add(mark)
                    for logger in _tensorboard_loggers(trainer):
                        logger.experiment.add_text(
                            "grokking/milestones", f"{self.val_metric} reached {mark:g} at step {step}", step
                        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tensorboard = _tensorboard_loggers(trainer)
        # `trainer.log_dir` is a collective call: every rank makes it
        self._finish(trainer, tensorboard[0].log_dir if tensorboard else trainer.log_dir)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # an interrupted run (Ctrl-C) still gets its figure; no collective call here, the other ranks may be gone
        if isinstance(exception, KeyboardInterrupt):
            self._finish(trainer, _local_log_dir(trainer))

    # ------------------------------------------------------------------ internals
    def _flush_train(self, step: int = -1) -> list[float]:
        """Move the train values recorded since the last validation into the history (one host transfer per
        validation, shared with the detector)."""
        flushed = self._tracker.flush(step).get(self.train_metric, [])
        if flushed is not self._last_flushed:
            self._last_flushed = flushed
            self.train_steps.extend(s for s, _ in flushed)
            self.train_values.extend(v for _, v in flushed)
        return [v for _, v in flushed]

    def _finish(self, trainer: pl.Trainer, directory: str | None) -> None:
        self._flush_train()
        tensorboard = _tensorboard_loggers(trainer)
        if not trainer.is_global_zero or not (self.train_steps or self.val_steps):
            return
        detector = _find_detector(trainer)
        mark_steps = self.mark_steps
        transitions: list[tuple[int, str]] = []
        if detector is not None:
            transitions = [(t.step, t.phase) for t in detector.transitions]
            mark_steps.update({float(m): s for m, s in detector.mark_steps.items()})
        step = trainer.global_step
        summary = ", ".join(f"{m:g}: {s if s is not None else 'not reached'}" for m, s in mark_steps.items())
        for logger in tensorboard:
            text = f"first step with {self.val_metric} >= mark: {summary}"
            if transitions:
                text += "  \nphase transitions: " + ", ".join(f"{p} @ {s}" for s, p in transitions)
            logger.experiment.add_text("grokking/summary", text, step)
        if self.figure_name is None:
            rank_zero_info(f"Grokking dashboard: {self.val_metric} first reached {summary}.")
            return
        figure = plot_grokking(
            self.train_steps, self.train_values, self.val_steps, self.val_values, mark_steps, transitions
        )
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            self.figure_path = os.path.join(directory, self.figure_name)
            figure.savefig(self.figure_path)
        for logger in tensorboard:
            logger.experiment.add_figure("grokking/accuracy", figure, step, close=False)
            logger.experiment.flush()
        rank_zero_info(
            f"Grokking dashboard: {self.val_metric} first reached {summary}."
            + (f" Figure: {self.figure_path}" if self.figure_path else "")
        )

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush_train()
        return {
            "format": _STATE_FORMAT,
            "train_steps": list(self.train_steps),
            "train_values": list(self.train_values),
            "val_steps": list(self.val_steps),
            "val_values": list(self.val_values),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"Unknown GrokkingDashboardCallback state format {state_dict.get('format')!r}.")
        self.train_steps = list(state_dict["train_steps"])
        self.train_values = list(state_dict["train_values"])
        self.val_steps = list(state_dict["val_steps"])
        self.val_values = list(state_dict["val_values"])
        self._announced = {m for m, s in self.mark_steps.items() if s is not None}


def _tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def _local_log_dir(trainer: pl.Trainer) -> str | None:
    """Where the figure goes, like ``trainer.log_dir`` but without its broadcast."""
    tensorboard = _tensorboard_loggers(trainer)
    if tensorboard:
        return tensorboard[0].log_dir
    if trainer.loggers:
        return getattr(trainer.loggers[0], "log_dir", None) or trainer.loggers[0].save_dir
    return trainer.default_root_dir
