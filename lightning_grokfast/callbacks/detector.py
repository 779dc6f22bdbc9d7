"""Grokking detection: the Lightning callback that drives the state machine of :mod:`.phases`.

:class:`GrokkingDetectorCallback` reads the metrics
from the Trainer, makes every rank feed the machine the same numbers, boosts the
:class:`~lightning_grokfast.callbacks.grokfast.GrokfastCallback`'s ``lamb`` when grokking starts, adapts its ``alpha``
(optionally) and stops the run once train and validation have converged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_grokfast.callbacks.grokfast import GrokfastCallback
from lightning_grokfast.callbacks.phases import (  # re-exported: the detector's public vocabulary
    GROKKING,
    MEMORIZING,
    PHASES,
    DetectorUpdate,
    GrokkingStateMachine,
    Transition,
    default_grokking_signal,
)
from lightning_grokfast.callbacks.tracking import TrainMetricTracker, lookup
from lightning_grokfast.core.validation import check_bool, check_number

__all__ = [
    "PHASES",
    "DetectorUpdate",
    "GrokkingDetectorCallback",
    "GrokkingStateMachine",
    "Transition",
    "default_grokking_signal",
]

_STATE_FORMAT = 1


class GrokkingDetectorCallback(Callback):
    r"""Tell when the model grokked, amplify more once it generalizes, and stop when train and validation meet.

    After every validation of ``trainer.fit`` (the sanity check is skipped) the callback feeds a
    :class:`GrokkingStateMachine` with ``trainer.global_step``, the validation metric and the train metric, and
    reacts to its events:

    - on entering ``"grokking"``: multiplies the :class:`~lightning_grokfast.GrokfastCallback`'s ``lamb`` (and
      ``ma_lamb``) by ``lambda_boost``, capped at ``max_lamb``;
    - with ``instability_backoff`` below 1: whenever the train metric (its mean since the previous validation)
      falls more than ``instability_drop`` below its best since memorization (rises above it, with
      ``mode="min"``), multiplies ``lamb`` and ``ma_lamb`` by ``instability_backoff``: the amplification has made
      training unstable (see "Which filter for my task?", the ``auto`` rule);
    - on ``"converged"`` (after grokking, unless ``stop_requires_grokking=False``): asks the Trainer to stop, if
      ``stop_on_convergence``;
    - with ``adaptive_alpha``: after every validation, sets the GrokfastCallback's ``alpha`` to
      ``alpha_0 * exp(-kappa * s)``, ``s`` being the grokking signal (default :func:`default_grokking_signal`
      of the train and validation losses, clipped at 0).

    The phases and how a jump is recognised are described in :class:`GrokkingStateMachine`.

    **Which values are read.** Metric names are looked up in ``trainer.callback_metrics``; a plain name that is
    missing falls back to ``<name>_epoch``, then ``<name>_step`` (``self.log(..., on_step=True, on_epoch=True)``).
    The validation metric (and loss) is the value the validation just computed. Lightning runs the end-of-epoch
    validation *before* the train epoch ends, so epoch-level train metrics are still the previous epoch's at that
    point. The callback therefore reads the train metric (and loss) after every training batch and uses the mean
    of the values seen since the previous validation (for a metric logged only at epoch end, that is the latest
    finished epoch's value; before the first epoch ends there is none, and the train phases wait).

    **Distributed.** Each rank sees its own metrics unless they were logged with ``sync_dist=True``. Before the
    state machine is fed, the readings are averaged over the ranks, so every rank feeds identical numbers and
    makes identical decisions (boost, alpha, stop); the stop decision is also reduced like ``EarlyStopping``'s.

    **Outputs.** :attr:`phase`, :attr:`transitions` (list of :class:`Transition`) and :attr:`mark_steps`
    (``{mark: first step}``). Each transition is announced once on rank zero (``"grokking detected at step 812:
    val_acc 0.31 -> 0.58"``). Logged to every logger after each validation: ``detector/phase`` (index in
    :data:`PHASES`), ``detector/gap``, ``detector/lamb``, ``detector/alpha``, ``detector/grokking_signal``; at a
    transition ``detector/<phase>_step``, at a mark ``detector/mark_<mark>_step``; TensorBoard loggers also get
    the announcements as text under ``detector/transitions``.

    Args:
        train_metric: name of the train metric (higher is better, e.g. accuracy).
        val_metric: name of the validation metric (higher is better).
        train_loss_metric: name of the train loss (read only for the default adaptive-alpha signal).
        val_loss_metric: name of the validation loss (read only for the default adaptive-alpha signal).
        memorization_threshold: train value from which the train metric counts as high.
        jump_threshold: minimal rise, ``> 0``, of the validation metric within the jump window that counts as
            the grokking jump.
        jump_window: length of the jump window, an integer ``>= 1``, in ``jump_window_unit``.
        jump_window_unit: ``"steps"`` (optimizer steps) or ``"evaluations"``.
        convergence_gap: largest ``train - val``, ``>= 0``, that counts as converged.
        patience: consecutive evaluations, ``>= 1``, with a small gap needed to call the run converged.
        lambda_boost: factor, ``>= 0``, applied to the GrokfastCallback's ``lamb`` when grokking is detected
            (``1.0``: no boost).
        max_lamb: cap, ``>= 0``, for the boosted ``lamb`` (``None``: no cap).
        instability_backoff: factor in ``[0, 1]`` applied to the GrokfastCallback's ``lamb`` and ``ma_lamb`` each
            time the train metric, once memorized (``memorization_threshold``), falls more than
            ``instability_drop`` below its best (``1.0``: off).
        instability_drop: fall, ``> 0``, of the train metric from its best (in the metric's units) that counts as
            unstable training.
        adaptive_alpha: adapt the GrokfastCallback's ``alpha`` to the grokking signal after each validation.
        kappa: decay rate, ``>= 0``, of the adaptive alpha.
        grokking_signal: ``(trainer, pl_module) -> float`` replacing the default signal (averaged over ranks,
            clipped at 0; a non-finite value leaves ``alpha`` unchanged).
        stop_on_convergence: ask the Trainer to stop once converged (``False``: only report).
        stop_requires_grokking: stop only after a ``"grokking"`` phase was seen.
        marks: validation values whose first crossing step is recorded in :attr:`mark_steps`.
        strict: raise if a needed metric is missing (``False``: warn and skip the evaluation). Under DDP the
            ranks agree first: if any rank misses it, every rank raises (or, with ``False``, a value that some ranks
            have is averaged over those ranks, and an evaluation no rank has is skipped by all).
        verbose: announce transitions and marks on rank zero.
        mode: ``"max"`` when higher is better (accuracies), ``"min"`` when lower is better (losses), as
            ``EarlyStopping``'s ``mode``; see :class:`GrokkingStateMachine`. A metric named like a loss, or a value
            outside ``[0, 1]``, with ``mode="max"`` is reported once (almost always a mistake).

    Raises:
        ValueError: If an argument is out of its range (the message names it and the range).
        MisconfigurationException: At setup, if boosting or adaptive alpha is asked for and no
            ``GrokfastCallback`` is among the Trainer's callbacks (or, for adaptive alpha, it has no EMA).
        RuntimeError: If ``strict`` and a needed metric is not in ``trainer.callback_metrics``; the message lists
            the metrics that exist.

    Example::

        from lightning_grokfast import GrokfastCallback, GrokkingDetectorCallback

        detector = GrokkingDetectorCallback(train_metric="train_acc", val_metric="val_acc", lambda_boost=2.0)
        trainer = L.Trainer(callbacks=[GrokfastCallback(), detector])
        trainer.fit(model)
        print(detector.phase, detector.transitions, detector.mark_steps)

    """

    def __init__(
        self,
        train_metric: str = "train_acc",
        val_metric: str = "val_acc",
        train_loss_metric: str = "train_loss",
        val_loss_metric: str = "val_loss",
        memorization_threshold: float = 0.9,
        jump_threshold: float = 0.2,
        jump_window: int = 1000,
        jump_window_unit: str = "steps",
        convergence_gap: float = 0.05,
        patience: int = 3,
        lambda_boost: float = 1.0,
        max_lamb: float | None = None,
        instability_backoff: float = 1.0,
        instability_drop: float = 0.02,
        adaptive_alpha: bool = False,
        kappa: float = 0.1,
        grokking_signal: Callable[[pl.Trainer, pl.LightningModule], float] | None = None,
        stop_on_convergence: bool = True,
        stop_requires_grokking: bool = True,
        marks: float | Sequence[float] = (0.5, 0.9, 0.95),
        strict: bool = True,
        verbose: bool = True,
        mode: str = "max",
    ) -> None:
        super().__init__()
        for name, value in (
            ("train_metric", train_metric),
            ("val_metric", val_metric),
            ("train_loss_metric", train_loss_metric),
            ("val_loss_metric", val_loss_metric),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty metric name, got {value!r}.")
        self.train_metric = train_metric
        self.val_metric = val_metric
        self.train_loss_metric = train_loss_metric
        self.val_loss_metric = val_loss_metric
        self.machine = GrokkingStateMachine(
            memorization_threshold=memorization_threshold,
            jump_threshold=jump_threshold,
            jump_window=jump_window,
            jump_window_unit=jump_window_unit,
            convergence_gap=convergence_gap,
            patience=patience,
            marks=marks,
            stop_requires_grokking=stop_requires_grokking,
            mode=mode,
        )
        self.lambda_boost = check_number(lambda_boost, "lambda_boost", low=0.0)
        self.max_lamb = None if max_lamb is None else check_number(max_lamb, "max_lamb", low=0.0)
        self.instability_backoff = check_number(instability_backoff, "instability_backoff", low=0.0, high=1.0)
        self.instability_drop = check_number(instability_drop, "instability_drop", low=0.0, low_inclusive=False)
        #: the best train reading since memorization, signed so that higher is better (the instability back-off)
        self.best_train: float | None = None
        self.adaptive_alpha = check_bool(adaptive_alpha, "adaptive_alpha")
        self.kappa = check_number(kappa, "kappa", low=0.0)
        if grokking_signal is not None and not callable(grokking_signal):
            raise ValueError(
                f"`grokking_signal` must be a callable (trainer, pl_module) -> float, got {grokking_signal!r}."
            )
        self.grokking_signal = grokking_signal
        self.stop_on_convergence = check_bool(stop_on_convergence, "stop_on_convergence")
        self.strict = check_bool(strict, "strict")
        self.verbose = check_bool(verbose, "verbose")

        self.alpha_0: list[float] | None = None  # the GrokfastCallbacks' alphas at the start of fitting
        self.last_signal: float | None = None
        self._grokfast: list[GrokfastCallback] = []
        #: the train metrics since the last validation (the dashboard reads the same tracker when present)
        self.tracker = TrainMetricTracker()
        self.tracker.watch(train_metric)
        if self.adaptive_alpha and grokking_signal is None:
            self.tracker.watch(train_loss_metric)
        self._flushed: dict[str, list[tuple[int, float]]] = {}
        self._warned: set[str] = set()
        self._missing_now: list[str] = []

    # ------------------------------------------------------------------ what it knows
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(train_metric=self.train_metric, val_metric=self.val_metric)

    @property
    def phase(self) -> str:
        """The current phase, one of :data:`PHASES`."""
        return self.machine.phase

    @property
    def transitions(self) -> list[Transition]:
        """Every phase change so far, oldest first: :class:`Transition` with ``.phase``, ``.step``, ``.previous``,
        ``.val_before``, ``.val_after`` and ``.train``."""
        return self.machine.transitions

    @property
    def mark_steps(self) -> dict[float, int]:
        """``{mark: first global step at which the validation metric was >= mark}``; unreached marks are absent."""
        return self.machine.mark_steps

    @property
    def boosts_lamb(self) -> bool:
        """Whether grokking multiplies ``lamb`` (``lambda_boost != 1``)."""
        return self.lambda_boost != 1.0

    @property
    def backs_off(self) -> bool:
        """Whether unstable training multiplies ``lamb`` (``instability_backoff != 1``)."""
        return self.instability_backoff != 1.0

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._grokfast = [cb for cb in trainer.callbacks if isinstance(cb, GrokfastCallback)]  # type: ignore[attr-defined]
        if stage != TrainerFn.FITTING.value:
            return
        wanted = [
            what
            for what, on in (
                ("lambda_boost", self.boosts_lamb),
                ("instability_backoff", self.backs_off),
                ("adaptive_alpha", self.adaptive_alpha),
            )
            if on
        ]
        if wanted and not self._grokfast:
            raise MisconfigurationException(
                f"GrokkingDetectorCallback was configured with {' and '.join(wanted)}, which act on a GrokfastCallback,"
                " but there is none among the Trainer's callbacks. Add one, e.g."
                " `Trainer(callbacks=[GrokfastCallback(), GrokkingDetectorCallback(...)])`, or set lambda_boost=1.0,"
                " instability_backoff=1.0 and adaptive_alpha=False."
            )
        if self.adaptive_alpha and any(cb.filter == "ma" for cb in self._grokfast):
            raise MisconfigurationException(
                "GrokkingDetectorCallback(adaptive_alpha=True) adapts the EMA momentum `alpha`, but a GrokfastCallback"
                " uses filter='ma', which has none. Use filter='ema' or 'ema+ma', or adaptive_alpha=False."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a checkpoint's state (loaded before this hook) already holds alpha_0
        if self.alpha_0 is None or len(self.alpha_0) != len(self._grokfast):
            self.alpha_0 = [cb.alpha for cb in self._grokfast]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.tracker.record(trainer.global_step, trainer.callback_metrics)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._missing_now = []
        self._flushed = self.tracker.flush(trainer.global_step)
        readings = self._read(trainer, pl_module)
        # every rank reaches this collective, whatever it read: no rank may skip it alone
        (val, train, signal), missing_anywhere = self._agree_over_ranks(trainer, readings, bool(self._missing_now))
        if missing_anywhere and self.strict:
            raise RuntimeError(self._missing_message(trainer))
        if val is None:
            return
        self._check_mode(val, train)
        update = self.machine.update(trainer.global_step, val, train)
        if not update.ignored:
            self._react(trainer, update, signal, self._fell(train))

    def _fell(self, train: float | None) -> tuple[float, float] | None:
        """``(best before, train)`` if the train reading fell more than ``instability_drop`` below the best one
        since it first reached ``memorization_threshold``, else ``None``; keeps that best. Before, nothing is
        watched: a metric that is still being learned goes up and down."""
        if train is None or not math.isfinite(train):
            return None
        sign = 1.0 if self.machine.mode == "max" else -1.0
        best = self.best_train
        if best is None and sign * train < sign * self.machine.memorization_threshold:
            return None
        self.best_train = sign * train if best is None else max(best, sign * train)
        if best is None or sign * train >= best - self.instability_drop:
            return None
        return sign * best, train

    def _react(
        self, trainer: pl.Trainer, update: DetectorUpdate, signal: float | None, fell: tuple[float, float] | None
    ) -> None:
        """Boost, back off, adapt alpha, announce, log and (maybe) stop, after an evaluation the machine took."""
        lamb_before = self._grokfast[0].lamb if self._grokfast else None
        messages: list[str] = []
        if self.backs_off and fell is not None and self._grokfast:
            for cb in self._grokfast:
                cb.boost_lamb(self.instability_backoff)
            messages.append(
                f"{self.train_metric} {'fell' if self.machine.mode == 'max' else 'rose'} from {fell[0]:.4g} to"
                f" {fell[1]:.4g} at step {update.step}:"
                f" lamb {lamb_before:g} -> {self._grokfast[0].lamb:g}"
            )
            lamb_before = self._grokfast[0].lamb
        if self.boosts_lamb and any(t.phase == GROKKING for t in update.transitions):
            for cb in self._grokfast:
                cb.boost_lamb(self.lambda_boost, self.max_lamb)
        if self.adaptive_alpha and signal is not None:
            self.last_signal = max(0.0, signal)
            for cb, alpha_0 in zip(self._grokfast, self.alpha_0 or []):
                cb.alpha = alpha_0 * math.exp(-self.kappa * self.last_signal)
        messages += [self._describe(t, lamb_before) for t in update.transitions]
        messages += [f"{self.val_metric} reached {m:g} at step {update.step}" for m in update.marks_reached]
        if self.verbose:
            for message in messages:
                rank_zero_info(f"GrokkingDetectorCallback: {message}")
        self._log(trainer, update, messages)
        if self.stop_on_convergence:
            # the machines are fed identical numbers on every rank; reduce anyway, as EarlyStopping does
            should_stop = trainer.strategy.reduce_boolean_decision(self.machine.should_stop, all=False)
            trainer.should_stop = trainer.should_stop or should_stop

    def _check_mode(self, val: float, train: float | None) -> None:
        """Report once a "higher is better" detector that watches what looks like a loss."""
        if self.machine.mode != "max":
            return
        names = [n for n in (self.val_metric, self.train_metric) if "loss" in n.lower()]
        outside = [v for v in (val, train) if v is not None and not 0.0 <= v <= 1.0]
        if names or outside:
            self._warn_once(
                "mode",
                "GrokkingDetectorCallback(mode='max') treats its metrics as higher-is-better accuracies, but"
                + (f" {names} look like losses" if names else f" it read values outside [0, 1] ({outside[0]:g})")
                + ". For a loss pass mode='min' (and thresholds in the loss's units), or watch an accuracy.",
            )

    # ------------------------------------------------------------------ reading metrics
    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[float | None]:
        """``[val, train, signal]`` of this rank (``None`` where missing; nothing raises before the ranks agree)."""
        metrics = trainer.callback_metrics
        val = self._required(metrics, self.val_metric, "validation metric")
        train = self._train_reading(metrics, self.train_metric, trainer, "train metric")
        signal = None
        if self.adaptive_alpha:
            if self.grokking_signal is not None:
                signal = float(self.grokking_signal(trainer, pl_module))
            else:
                val_loss = self._required(metrics, self.val_loss_metric, "validation loss")
                train_loss = self._train_reading(metrics, self.train_loss_metric, trainer, "train loss")
                if val_loss is not None and train_loss is not None:
                    signal = default_grokking_signal(train_loss, val_loss)
        return [val, train, signal if signal is not None and math.isfinite(signal) else None]

    def _train_reading(self, metrics: Mapping[str, Any], name: str, trainer: pl.Trainer, what: str) -> float | None:
        mean = self.tracker.mean(self._flushed, name)
        if mean is not None:
            return mean
        value = _resolve(metrics, name)
        if value is not None:
            return float(value)
        if trainer.current_epoch == 0:
            # an epoch-level train metric only exists once the first training epoch has ended
            self._warn_once(
                f"{what}:{name}",
                f"GrokkingDetectorCallback: the {what} `{name}` is not available yet (if it is logged only at epoch"
                " end it will be after the first epoch); the phases that need it wait. Available metrics:"
                f" {_names(metrics)}.",
            )
            return None
        self._missing(metrics, name, what)
        return None

    def _required(self, metrics: Mapping[str, Any], name: str, what: str) -> float | None:
        value = _resolve(metrics, name)
        if value is None:
            self._missing(metrics, name, what)
            return None
        return float(value)

    def _missing(self, metrics: Mapping[str, Any], name: str, what: str) -> None:
        """Record a missing metric of this rank (raised, or warned, once the ranks have agreed)."""
        self._missing_now.append(
            f"the {what} `{name}` (also looked for `{name}_epoch` and `{name}_step`);"
            f" available metrics: {_names(metrics)}"
        )
        if not self.strict:  # a per-rank fact: warned on the rank that has it, not only on rank zero
            self._warn_once(f"missing:{name}", f"GrokkingDetectorCallback: {self._missing_now[-1]}.", every_rank=True)

    def _missing_message(self, trainer: pl.Trainer) -> str:
        where = f" on rank {trainer.global_rank}" if self._missing_now else " on another rank"
        detail = "; ".join(self._missing_now) if self._missing_now else "a metric it needs"
        return (
            f"GrokkingDetectorCallback is missing {detail}{where} (not in `trainer.callback_metrics`). Log it on"
            " every rank (e.g. `self.log(name, value, sync_dist=True)`), pass a metric that exists, or use"
            " strict=False to skip such evaluations."
        )

    def _warn_once(self, key: str, message: str, every_rank: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if every_rank:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            else:
                rank_zero_warn(message, category=RuntimeWarning)

    @staticmethod
    def _agree_over_ranks(
        trainer: pl.Trainer, readings: list[float | None], missing: bool
    ) -> tuple[list[float | None], bool]:
        """Average each reading over the ranks that have it and learn whether any rank missed a metric: one
        all-reduce that every rank takes, so every rank gets the same numbers and makes the same decisions."""
        if trainer.world_size <= 1:
            return readings, missing
        rows = [[0.0, 0.0] if r is None else [r, 1.0] for r in readings] + [[float(missing), 1.0]]
        table = torch.tensor(rows, dtype=torch.float64, device=trainer.strategy.root_device)
        table = trainer.strategy.reduce(table, reduce_op="sum")
        *values, (missing_ranks, _) = table.tolist()
        return [float(total / count) if count > 0 else None for total, count in values], missing_ranks > 0

    # ------------------------------------------------------------------ reporting
    def _describe(self, transition: Transition, lamb_before: float | None) -> str:
        step, after = transition.step, transition.val_after
        if transition.phase == MEMORIZING:
            return (
                f"memorization detected at step {step}: {self.train_metric} {_fmt(transition.train)},"
                f" {self.val_metric} {after:.2f}"
            )
        if transition.phase == GROKKING:
            message = (
                f"grokking detected at step {step}: {self.val_metric} {_fmt(transition.val_before)} -> {after:.2f}"
            )
            if self.boosts_lamb and self._grokfast and lamb_before is not None:
                message += f"; lamb {lamb_before:g} -> {self._grokfast[0].lamb:g}"
            return message
        stopping = "; stopping" if self.stop_on_convergence and self.machine.should_stop else ""
        return (
            f"converged at step {step}: {self.train_metric} {_fmt(transition.train)}, {self.val_metric} {after:.2f}"
            f" (gap <= {self.machine.convergence_gap:g} for {self.machine.patience} evaluations){stopping}"
        )

    def _log(self, trainer: pl.Trainer, update: DetectorUpdate, messages: list[str]) -> None:
        if not trainer.loggers:
            return
        metrics: dict[str, float] = {"detector/phase": float(PHASES.index(update.phase))}
        if update.gap is not None:
            metrics["detector/gap"] = update.gap
        if self._grokfast:
            metrics["detector/lamb"] = self._grokfast[0].lamb
            metrics["detector/alpha"] = self._grokfast[0].alpha
        if self.adaptive_alpha and self.last_signal is not None:
            metrics["detector/grokking_signal"] = self.last_signal
        for transition in update.transitions:
            metrics[f"detector/{transition.phase}_step"] = float(transition.step)
        for mark in update.marks_reached:
            metrics[f"detector/mark_{mark:g}_step"] = float(update.step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=update.step)
            if messages and isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                for message in messages:
                    logger.experiment.add_text("detector/transitions", message, global_step=update.step)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "machine": self.machine.state_dict(),
            "alpha_0": None if self.alpha_0 is None else list(self.alpha_0),
            "last_signal": self.last_signal,
            "tracker": self.tracker.state_dict(),
            "best_train": self.best_train,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"Unknown GrokkingDetectorCallback state format {state_dict.get('format')!r}.")
        self.machine.load_state_dict(state_dict["machine"])
        alpha_0 = state_dict["alpha_0"]
        self.alpha_0 = None if alpha_0 is None else [float(a) for a in alpha_0]
        self.last_signal = _optional_float(state_dict["last_signal"])
        self.best_train = _optional_float(state_dict.get("best_train"))
        if "tracker" in state_dict:
            self.tracker.load_state_dict(state_dict["tracker"])
        else:  # 0.1: one (sum, count) per metric; restored as `count` copies of the mean
            sums, counts = state_dict.get("train_sums", {}), state_dict.get("train_counts", {})
            pending = [[0, n, float(sums[n]) / int(c)] for n, c in counts.items() for _ in range(int(c)) if int(c)]
            self.tracker.load_state_dict({"pending": pending})


# ---------------------------------------------------------------------- helpers
def _resolve(metrics: Mapping[str, Any], name: str) -> Any:
    """``metrics[name]``, else ``metrics[name + "_epoch"]``, else ``metrics[name + "_step"]``, else ``None``."""
    return lookup(metrics, name)


def _names(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}`" for k in sorted(metrics)) or "(none)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
