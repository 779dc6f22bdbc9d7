"""The phases of grokking as a pure-Python state machine: numbers in, events out (no Lightning, no torch).

:class:`GrokkingStateMachine` takes the optimizer step, the validation metric and the train metric after each
validation and returns events: phase transitions and marks reached. It can be tested on scripted metric sequences;
:class:`~lightning_grokfast.callbacks.detector.GrokkingDetectorCallback` feeds it inside a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_grokfast.core.validation import as_float_list, check_bool, check_choice, check_int, check_number

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

    Example::

        >>> from lightning_grokfast import GrokkingStateMachine
        >>> machine = GrokkingStateMachine()
        >>> update = machine.update(100, 0.05, 1.0)
        >>> [(t.phase, t.step) for t in update.transitions]
        [('memorizing', 100)]
    """

    phase: str
    step: int
    previous: str
    val_before: float | None
    val_after: float
    train: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (what :meth:`GrokkingStateMachine.state_dict` stores).

        Returns:
            The fields as plain values.
        """
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
        """The inverse of :meth:`to_dict`.

        Args:
            data: a dict from :meth:`to_dict`.

        Returns:
            The transition.
        """
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

    Example::

        >>> from lightning_grokfast import GrokkingStateMachine
        >>> update = GrokkingStateMachine(marks=(0.5,)).update(100, 0.6, 1.0)
        >>> update.phase, update.marks_reached
        ('memorizing', (0.5,))
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
        self.memorization_threshold = check_number(memorization_threshold, "memorization_threshold")
        self.jump_threshold = check_number(jump_threshold, "jump_threshold", low=0.0, low_inclusive=False)
        self.jump_window = check_int(jump_window, "jump_window", low=1)
        self.jump_window_unit = check_choice(jump_window_unit, "jump_window_unit", JUMP_WINDOW_UNITS)
        self.convergence_gap = check_number(convergence_gap, "convergence_gap", low=0.0)
        self.patience = check_int(patience, "patience", low=1)
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
        """The step at which ``phase`` was entered, or ``None``.

        Args:
            phase: one of :data:`PHASES`.

        Returns:
            The optimizer step, or ``None`` when the phase was not entered.
        """
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
        step = check_int(step, "step", low=0)
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
        """Everything needed to continue; plain types only (loads with ``torch.load(weights_only=True)``).

        Returns:
            The phase, the transitions, the marks reached, the jump window and the counters.
        """
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

        Args:
            state: a dict from :meth:`state_dict`.
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

    Args:
        train_loss: the training loss.
        val_loss: the validation loss.

    Returns:
        The signal, in ``[0, 1]``.

    Example::

        >>> from lightning_grokfast.callbacks.phases import default_grokking_signal
        >>> default_grokking_signal(train_loss=0.1, val_loss=2.0)
        0.95
    """
    largest = max(val_loss, train_loss)
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)) or largest <= 0.0:
        return 0.0
    return max(0.0, (val_loss - train_loss) / largest)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
