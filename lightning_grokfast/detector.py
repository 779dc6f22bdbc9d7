"""Grokking detection: a pure-Python state machine and the Lightning callback that feeds it.

:class:`GrokkingStateMachine` takes numbers (the optimizer step, the validation metric and the train metric after
each validation) and returns events: phase transitions and accuracy marks reached. It knows nothing about
Lightning and can be tested on scripted metric sequences. :class:`GrokkingDetectorCallback` reads the metrics
from the Trainer, makes every rank feed the machine the same numbers, boosts the
:class:`~lightning_grokfast.callback.GrokfastCallback`'s ``lamb`` when grokking starts, adapts its ``alpha``
(optionally) and stops the run once train and validation have converged.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_grokfast.callback import GrokfastCallback
from lightning_grokfast.validation import as_float_list, check_bool, check_choice

#: The phases, in the only order in which they can be entered.
PHASES: tuple[str, ...] = ("warming_up", "memorizing", "grokking", "converged")
WARMING_UP, MEMORIZING, GROKKING, CONVERGED = PHASES
JUMP_WINDOW_UNITS: tuple[str, ...] = ("steps", "evaluations")
#: ``"max"``: higher is better (accuracies); ``"min"``: lower is better (losses), as ``EarlyStopping``'s ``mode``.
MODES: tuple[str, ...] = ("max", "min")

_STATE_FORMAT = 1


@dataclass(frozen=True)
class Transition:
    """One phase change, as recorded by :class:`GrokkingStateMachine`.

    Attributes:
        phase: the phase entered (one of :data:`PHASES`).
        step: the optimizer step (``trainer.global_step``) of the evaluation at which it was entered.
        previous: the phase left.
        val_before: for ``"grokking"``, the lowest validation value within the jump window (where the jump
            started); otherwise the previous evaluation's value (``None`` at the first evaluation).
        val_after: the validation value at ``step``.
        train: the train value at ``step`` (``None`` if it was not available).

    """

    phase: str
    step: int
    previous: str
    val_before: float | None
    val_after: float
    train: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (what :meth:`GrokkingStateMachine.state_dict` stores)."""
        return {
            "phase": self.phase,
            "step": self.step,
            "previous": self.previous,
            "val_before": self.val_before,
            "val_after": self.val_after,
            "train": self.train,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transition:
        return cls(
            phase=str(data["phase"]),
            step=int(data["step"]),
            previous=str(data["previous"]),
            val_before=_optional_float(data["val_before"]),
            val_after=float(data["val_after"]),
            train=_optional_float(data.get("train")),
        )


@dataclass(frozen=True)
class DetectorUpdate:
    """What one :meth:`GrokkingStateMachine.update` produced.

    Attributes:
        step: the optimizer step of the evaluation.
        phase: the phase after the update.
        gap: ``train - val`` (``None`` without a train value).
        transitions: phases entered at this evaluation, in order (usually none, at most a few).
        marks_reached: accuracy marks the validation value reached for the first time at this evaluation.
        ignored: ``True`` if the evaluation was ignored (non-finite value, or a second one at the same step).

    """

    step: int
    phase: str
    gap: float | None = None
    transitions: tuple[Transition, ...] = field(default_factory=tuple)
    marks_reached: tuple[float, ...] = field(default_factory=tuple)
    ignored: bool = False


class GrokkingStateMachine:
    r"""Follow a run through the phases of grokking, from the metrics after each validation.

    Phases (entered in this order only; a phase can be skipped, never re-entered):

    - ``"warming_up"``: the start, until the train metric is high.
    - ``"memorizing"``: the train metric is ``>= memorization_threshold`` while the validation metric trails it by
      more than ``convergence_gap``.
    - ``"grokking"``: during memorization the validation metric jumped: it rose by at least ``jump_threshold``
      above its lowest value within the last ``jump_window`` steps (or evaluations), counting only evaluations
      made while memorizing. The previous evaluation always counts as inside the window, so a jump is seen
      however rarely validation runs, and a rise spread over several evaluations is seen as soon as the window's
      total reaches the threshold, however often validation runs. Fluctuations smaller than ``jump_threshold``
      are never a jump, and neither is a rise that happens while the train metric is still rising (before
      memorization).
    - ``"converged"``: the train metric is ``>= memorization_threshold`` and ``train - val <= convergence_gap`` at
      ``patience`` consecutive evaluations. Reached from any earlier phase (e.g. a slow rise that never jumped).

    With ``mode="max"`` (default) the metrics are "higher is better" (accuracies; the default thresholds assume
    values in ``[0, 1]``). With ``mode="min"`` they are "lower is better" (losses): the train metric is high (the
    model memorized) when ``train <= memorization_threshold``, a jump is a *fall* of the validation metric by at
    least ``jump_threshold``, the gap is ``val - train``, and a mark is reached when ``val <= mark``.

    Args:
        memorization_threshold: train value from which the train metric counts as high.
        jump_threshold: minimal rise of the validation metric, ``> 0``, that counts as a jump.
        jump_window: length of the jump window, an integer ``>= 1``, in ``jump_window_unit``.
        jump_window_unit: ``"steps"`` (optimizer steps: independent of how often validation runs) or
            ``"evaluations"``.
        convergence_gap: largest ``train - val``, ``>= 0``, that counts as converged.
        patience: consecutive evaluations, ``>= 1``, with a small gap needed to enter ``"converged"``.
        marks: validation values whose first crossing (``val >= mark``) is recorded in :attr:`mark_steps`.
        stop_requires_grokking: :attr:`should_stop` only after a ``"grokking"`` phase (``False``: as soon as
            converged).
        mode: ``"max"`` (higher is better) or ``"min"`` (lower is better).

    Raises:
        ValueError: If an argument is out of its range (the message names it and the range).

    Example::

        machine = GrokkingStateMachine(jump_threshold=0.2, jump_window=500)
        for step, train_acc, val_acc in history:
            for transition in machine.update(step, val_acc, train_acc).transitions:
                print(f"{transition.phase} at step {transition.step}")
        machine.mark_steps  # {0.5: 812, 0.9: 870}

    """

    def __init__(
        self,
        memorization_threshold: float = 0.9,
        jump_threshold: float = 0.2,
        jump_window: int = 1000,
        jump_window_unit: str = "steps",
        convergence_gap: float = 0.05,
        patience: int = 3,
        marks: float | Sequence[float] = (0.5, 0.9, 0.95),
        stop_requires_grokking: bool = True,
        mode: str = "max",
    ) -> None:
        self.mode = check_choice(mode, "mode", MODES)
        self._sign = 1.0 if mode == "max" else -1.0
        self.memorization_threshold = _check_finite(memorization_threshold, "memorization_threshold")
        self.jump_threshold = _check_finite(jump_threshold, "jump_threshold", low=0.0, low_inclusive=False)
        self.jump_window = _check_int(jump_window, "jump_window", low=1)
        if jump_window_unit not in JUMP_WINDOW_UNITS:
            raise ValueError(f"`jump_window_unit` must be one of {list(JUMP_WINDOW_UNITS)}, got {jump_window_unit!r}.")
        self.jump_window_unit = jump_window_unit
        self.convergence_gap = _check_finite(convergence_gap, "convergence_gap", low=0.0)
        self.patience = _check_int(patience, "patience", low=1)
        self.marks: tuple[float, ...] = tuple(sorted(set(as_float_list(marks, "marks"))))
        self.stop_requires_grokking = check_bool(stop_requires_grokking, "stop_requires_grokking")
        self.reset()

    def reset(self) -> None:
        """Forget everything: back to ``"warming_up"`` with no history."""
        self._phase = WARMING_UP
        self._transitions: list[Transition] = []
        self._mark_steps: dict[float, int] = {}
        self._window: list[tuple[int, float]] = []  # (step, val) of the evaluations inside the jump window
        self._small_gap_count = 0
        self._evaluations = 0
        self._last_step: int | None = None
        self._last_gap: float | None = None

    # ------------------------------------------------------------------ what it knows
    @property
    def phase(self) -> str:
        """The current phase, one of :data:`PHASES`."""
        return self._phase

    @property
    def transitions(self) -> list[Transition]:
        """Every phase change so far, oldest first (a copy)."""
        return list(self._transitions)

    @property
    def mark_steps(self) -> dict[float, int]:
        """``{mark: first step at which val >= mark}`` for the marks reached so far (a copy)."""
        return dict(self._mark_steps)

    @property
    def grokked(self) -> bool:
        """Whether the ``"grokking"`` phase was entered."""
        return any(t.phase == GROKKING for t in self._transitions)

    @property
    def should_stop(self) -> bool:
        """Converged, and (unless ``stop_requires_grokking=False``) after grokking."""
        return self._phase == CONVERGED and (self.grokked or not self.stop_requires_grokking)

    @property
    def evaluations(self) -> int:
        """Number of evaluations taken into account."""
        return self._evaluations

    @property
    def last_gap(self) -> float | None:
        """``train - val`` (``val - train`` with ``mode="min"``) at the last evaluation (``None`` without a train
        value)."""
        return self._last_gap

    def step_of(self, phase: str) -> int | None:
        """The step at which ``phase`` was entered, or ``None``."""
        return next((t.step for t in self._transitions if t.phase == phase), None)

    # ------------------------------------------------------------------ the update
    def update(self, step: int, val: float, train: float | None = None) -> DetectorUpdate:
        """Take the metrics of one evaluation into account.

        Args:
            step: the optimizer step (``trainer.global_step``) at which validation ran; never smaller than the
                previous one. A second evaluation at the same step is ignored.
            val: the validation metric. A non-finite value (NaN, inf) is ignored.
            train: the train metric, or ``None`` if it is not known (then no phase that needs it is entered).

        Returns:
            A :class:`DetectorUpdate` with the transitions and marks of this evaluation.

        Raises:
            ValueError: If ``step`` is smaller than the previous evaluation's.

        """
        step = _check_int(step, "step", low=0)
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"`step` went back from {self._last_step} to {step}; evaluations must come in order.")
        sign = self._sign  # "min" mode runs the same machine on negated values
        raw_val, raw_train = float(val), None if train is None or not math.isfinite(float(train)) else float(train)
        val, train = sign * raw_val, None if raw_train is None else sign * raw_train
        if not math.isfinite(val) or step == self._last_step:
            return DetectorUpdate(step=step, phase=self._phase, ignored=True)
        previous_val = self._window[-1][1] if self._window else None
        self._last_step = step
        self._evaluations += 1
        gap = None if train is None else train - val
        self._last_gap = gap

        transitions: list[Transition] = []

        def enter(phase: str, val_before: float | None) -> None:
            before = None if val_before is None else sign * val_before
            transitions.append(Transition(phase, step, self._phase, before, raw_val, raw_train))
            self._phase = phase

        train_high = train is not None and train >= sign * self.memorization_threshold
        small_gap = train_high and gap is not None and gap <= self.convergence_gap
        if self._phase == WARMING_UP and train_high and not small_gap:
            enter(MEMORIZING, previous_val)
        memorizing_since = self.step_of(MEMORIZING)  # None if entered just now: no earlier memorizing evaluation
        if self._phase == MEMORIZING and memorizing_since is not None:
            window_low = self._lowest_in_window(step, memorizing_since)
            if window_low is not None and val - window_low >= self.jump_threshold:
                enter(GROKKING, window_low)
        self._small_gap_count = self._small_gap_count + 1 if small_gap else 0
        if self._phase != CONVERGED and self._small_gap_count >= self.patience:
            enter(CONVERGED, previous_val)
        self._transitions.extend(transitions)
        self._push(step, val)

        reached = tuple(m for m in self.marks if m not in self._mark_steps and val >= sign * m)
        for mark in reached:
            self._mark_steps[mark] = step
        return DetectorUpdate(step, self._phase, gap, tuple(transitions), reached)

    def _lowest_in_window(self, step: int, since: int) -> float | None:  # (in the machine's "max" orientation)
        """Lowest validation value of the earlier evaluations inside the window (the previous one always is) that
        were made at or after step ``since`` (while memorizing)."""
        if not self._window:
            return None
        if self.jump_window_unit == "steps":
            inside = [(s, v) for s, v in self._window[:-1] if s >= step - self.jump_window]
        else:
            inside = self._window[-self.jump_window : -1]
        inside.append(self._window[-1])
        return min((v for s, v in inside if s >= since), default=None)

    def _push(self, step: int, val: float) -> None:
        self._window.append((step, val))
        if self.jump_window_unit == "steps":
            # keep what can still be inside the window of a later evaluation, and always the latest
            while len(self._window) > 1 and self._window[0][0] < step - self.jump_window:
                self._window.pop(0)
        else:
            del self._window[: -self.jump_window]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue; plain types only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "format": _STATE_FORMAT,
            "phase": self._phase,
            "transitions": [t.to_dict() for t in self._transitions],
            "mark_steps": [[mark, step] for mark, step in sorted(self._mark_steps.items())],
            "window": [[s, v] for s, v in self._window],
            "small_gap_count": self._small_gap_count,
            "evaluations": self._evaluations,
            "last_step": self._last_step,
            "last_gap": self._last_gap,
            "mode": self.mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: If the state has an unknown format or phase.

        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"Unknown grokking state machine state format {state.get('format')!r}.")
        if state.get("mode", "max") != self.mode:
            raise ValueError(
                f"The state was saved with mode={state.get('mode', 'max')!r}, this machine has {self.mode!r}."
            )
        if state["phase"] not in PHASES:
            raise ValueError(f"Unknown phase {state['phase']!r} in the state; expected one of {list(PHASES)}.")
        self.reset()
        self._phase = str(state["phase"])
        self._transitions = [Transition.from_dict(t) for t in state["transitions"]]
        self._mark_steps = {float(m): int(s) for m, s in state["mark_steps"]}
        self._window = [(int(s), float(v)) for s, v in state["window"]]
        self._small_gap_count = int(state["small_gap_count"])
        self._evaluations = int(state["evaluations"])
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        self._last_gap = _optional_float(state["last_gap"])


def default_grokking_signal(train_loss: float, val_loss: float) -> float:
    """The grokking signal of GrokAdamW: ``(val_loss - train_loss) / max(val_loss, train_loss)``, clipped at 0.

    It is close to 1 while the model memorizes (train loss far below validation loss) and falls to 0 as the
    validation loss catches up. Non-finite or all-zero losses give 0.

    """
    largest = max(val_loss, train_loss)
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)) or largest <= 0.0:
        return 0.0
    return max(0.0, (val_loss - train_loss) / largest)


class GrokkingDetectorCallback(Callback):
    r"""Tell when the model grokked, amplify more once it generalizes, and stop when train and validation meet.

    After every validation of ``trainer.fit`` (the sanity check is skipped) the callback feeds a
    :class:`GrokkingStateMachine` with ``trainer.global_step``, the validation metric and the train metric, and
    reacts to its events:

    - on entering ``"grokking"``: multiplies the :class:`~lightning_grokfast.GrokfastCallback`'s ``lamb`` (and
      ``ma_lamb``) by ``lambda_boost``, capped at ``max_lamb``;
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
        self.lambda_boost = _check_finite(lambda_boost, "lambda_boost", low=0.0)
        self.max_lamb = None if max_lamb is None else _check_finite(max_lamb, "max_lamb", low=0.0)
        self.adaptive_alpha = check_bool(adaptive_alpha, "adaptive_alpha")
        self.kappa = _check_finite(kappa, "kappa", low=0.0)
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
        self._train_sums: dict[str, Tensor | float] = {}
        self._train_counts: dict[str, int] = {}
        self._warned: set[str] = set()
        self._missing_now: list[str] = []

    # ------------------------------------------------------------------ what it knows
    @property
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
        return self.lambda_boost != 1.0

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._grokfast = [cb for cb in trainer.callbacks if isinstance(cb, GrokfastCallback)]  # type: ignore[attr-defined]
        if stage != TrainerFn.FITTING.value:
            return
        wanted = [
            what for what, on in (("lambda_boost", self.boosts_lamb), ("adaptive_alpha", self.adaptive_alpha)) if on
        ]
        if wanted and not self._grokfast:
            raise MisconfigurationException(
                f"GrokkingDetectorCallback was configured with {' and '.join(wanted)}, which act on a GrokfastCallback,"
                " but there is none among the Trainer's callbacks. Add one, e.g."
                " `Trainer(callbacks=[GrokfastCallback(), GrokkingDetectorCallback(...)])`, or set lambda_boost=1.0"
                " and adaptive_alpha=False."
            )
        if self.adaptive_alpha and any(cb.filter == "ma" for cb in self._grokfast):
            raise MisconfigurationException(
                "GrokkingDetectorCallback(adaptive_alpha=True) adapts the EMA momentum `alpha`, but a GrokfastCallback"
                " uses filter='ma', which has none. Use filter='ema' or 'ema+ma', or adaptive_alpha=False."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a checkpoint's state (loaded before this hook) already holds alpha_0
        if self.alpha_0 is None or len(self.alpha_0) != len(self._grokfast):
            self.alpha_0 = [cb.alpha for cb in self._grokfast]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        names = [self.train_metric]
        if self.adaptive_alpha and self.grokking_signal is None:
            names.append(self.train_loss_metric)
        metrics = trainer.callback_metrics
        for name in names:
            value = _resolve(metrics, name)
            if value is None:
                continue
            value = value.detach().reshape(-1)[0] if isinstance(value, Tensor) else float(value)
            # summed on the metric's device: no host synchronization per batch
            self._train_sums[name] = self._train_sums.get(name, 0.0) + value
            self._train_counts[name] = self._train_counts.get(name, 0) + 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._missing_now = []
        readings = self._read(trainer, pl_module)
        self._reset_train_readings()
        # every rank reaches this collective, whatever it read: no rank may skip it alone
        (val, train, signal), missing_anywhere = self._agree_over_ranks(trainer, readings, bool(self._missing_now))
        if missing_anywhere and self.strict:
            raise RuntimeError(self._missing_message(trainer))
        if val is None:
            return
        self._check_mode(val, train)
        update = self.machine.update(trainer.global_step, val, train)
        if not update.ignored:
            self._react(trainer, update, signal)

    def _react(self, trainer: pl.Trainer, update: DetectorUpdate, signal: float | None) -> None:
        """Boost, adapt alpha, announce, log and (maybe) stop, after an evaluation the machine took."""
        lamb_before = self._grokfast[0].lamb if self._grokfast else None
        if self.boosts_lamb and any(t.phase == GROKKING for t in update.transitions):
            for cb in self._grokfast:
                cb.boost_lamb(self.lambda_boost, self.max_lamb)
        if self.adaptive_alpha and signal is not None:
            self.last_signal = max(0.0, signal)
            for cb, alpha_0 in zip(self._grokfast, self.alpha_0 or []):
                cb.alpha = alpha_0 * math.exp(-self.kappa * self.last_signal)
        messages = [self._describe(t, lamb_before) for t in update.transitions]
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
        count = self._train_counts.get(name, 0)
        if count:
            return float(self._train_sums[name]) / count
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

    def _reset_train_readings(self) -> None:
        self._train_sums.clear()
        self._train_counts.clear()

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
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "machine": self.machine.state_dict(),
            "alpha_0": None if self.alpha_0 is None else list(self.alpha_0),
            "last_signal": self.last_signal,
            "train_sums": {name: float(total) for name, total in self._train_sums.items()},
            "train_counts": dict(self._train_counts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"Unknown GrokkingDetectorCallback state format {state_dict.get('format')!r}.")
        self.machine.load_state_dict(state_dict["machine"])
        alpha_0 = state_dict["alpha_0"]
        self.alpha_0 = None if alpha_0 is None else [float(a) for a in alpha_0]
        self.last_signal = _optional_float(state_dict["last_signal"])
        self._train_sums = {str(k): float(v) for k, v in state_dict["train_sums"].items()}
        self._train_counts = {str(k): int(v) for k, v in state_dict["train_counts"].items()}


# ---------------------------------------------------------------------- helpers
def _resolve(metrics: Mapping[str, Any], name: str) -> Any:
    """``metrics[name]``, else ``metrics[name + "_epoch"]``, else ``metrics[name + "_step"]``, else ``None``."""
    for key in (name, f"{name}_epoch", f"{name}_step"):
        if key in metrics:
            return metrics[key]
    return None


def _names(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}`" for k in sorted(metrics)) or "(none)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_finite(value: Any, name: str, low: float | None = None, low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}.")
    return float(value)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return value
