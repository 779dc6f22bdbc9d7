"""Grokfast for the Hugging Face ``transformers.Trainer`` (extra ``[hf]``): one callback, exact resume.

:class:`GrokfastTrainerCallback` attaches :func:`~lightning_grokfast.attach_grokfast` to the Trainer's optimizer when
training begins. The filter state travels in ``optimizer.pt`` (inside ``optimizer.state_dict()``), and since the
Trainer restores ``optimizer.pt`` before any callback sees the optimizer, the attach adopts the state already loaded:
``trainer.train(resume_from_checkpoint=...)`` continues the filter where it stopped.

Where the filter sits in a Trainer step: backward (accumulated over ``gradient_accumulation_steps``) -> gradient
clipping (``max_grad_norm``) -> the filter (``g <- g + lamb * slow(g)``, on the clipped gradients) ->
``optimizer.step()``. The filter therefore sees clipped gradients, and the amplified gradient is not clipped again.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import torch

from lightning_grokfast.core.config import FilterConfig, TunableSettings
from lightning_grokfast.core.metrics import filter_metrics
from lightning_grokfast.core.optim_state import RoundedStateWarning, unwrap_optimizer
from lightning_grokfast.core.validation import as_pattern_factors, as_pattern_list, check_int, require
from lightning_grokfast.integrations.hook import GrokfastHandle, attach_grokfast

transformers = require("transformers", "hf", "lightning_grokfast.integrations.hf")

__all__ = ["GrokfastTrainerCallback"]

_TRAINER_ADVICE = (
    "To resume exactly, create the optimizer yourself and pass it as `Trainer(optimizers=(optimizer, None))`:"
    " the callback then attaches before the Trainer loads."
)


class GrokfastTrainerCallback(transformers.TrainerCallback, TunableSettings):  # type: ignore[misc,name-defined]
    r"""Grokfast in a Hugging Face ``transformers.Trainer``: ``callbacks=[GrokfastTrainerCallback()]``.

    Before every optimizer step each gradient ``g`` becomes ``g + lamb * slow(g)`` (EMA, windowed moving average or
    both), through the same filter core as :class:`~lightning_grokfast.GrokfastCallback` and
    :func:`~lightning_grokfast.attach_grokfast`. Resuming with ``trainer.train(resume_from_checkpoint=...)`` continues
    the filter exactly (its state is in ``optimizer.pt``). Gradient accumulation filters once per optimizer step;
    ``max_grad_norm`` clips before the filter. At every logging step the filter's numbers are added to the Trainer's
    logs (``grokfast/lamb``, ``grokfast/alpha``, ``grokfast/slow_norm``, ``grokfast/grad_norm``, ...), so they reach
    every ``report_to`` integration and ``trainer.state.log_history``.

    Args:
        filter: ``"ema"``, ``"ma"``, ``"ema+ma"`` or ``"none"``.
        alpha: EMA momentum, in ``[0, 1)``.
        lamb: amplification of the slow part, ``>= 0``.
        window_size: moving-average window, ``>= 1``.
        ma_lamb: amplification of the MA term with ``filter="ema+ma"``.
        warmup: MA only: add nothing until the window is full.
        filter_type: MA aggregation, ``"mean"`` or ``"sum"``.
        normalize: scale the slow part to the gradient's norm.
        state_dtype: dtype of the filter state of 16-bit gradients (``"float32"``, ``"bfloat16"``, or ``None``).
        resum_every: re-sum the MA window exactly every this many steps (``None``: the default schedule).
        check_finite: skip a step whose gradients are not all finite (one host read of a flag per step).
        orthogonal: remove from each gradient its component along its parameter first (⊥Grad).
        max_amplified_ratio: divergence guard: cap the added term's norm at this multiple of the gradient's.
        exclude: regular expression(s); parameters whose name matches are not filtered.
        lamb_scale: ``{pattern: factor}``: parameters whose name matches use ``lamb * factor`` (first match wins).
        start_step: first optimizer step (from 0) at which the slow part is added.
        speedup: set ``alpha``/``window_size`` by the authors' rule for a target acceleration (see
            :meth:`from_speedup`).
        compile: fuse each tensor's EMA or MA step into one ``torch.compile`` kernel.

    Raises:
        ValueError: If an argument is out of its range (at construction).
        ImportError: If ``transformers`` is not installed (``pip install "lightning-grokfast[hf]"``).

    Example::

        from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
        from lightning_grokfast.integrations.hf import GrokfastTrainerCallback

        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2))
        trainer = Trainer(
            model=model,
            args=TrainingArguments("out", max_steps=1000, report_to="tensorboard"),
            train_dataset=dataset,
            callbacks=[GrokfastTrainerCallback(filter="ema", alpha=0.98, lamb=2.0)],
        )
        trainer.train()  # later: trainer.train(resume_from_checkpoint=True) resumes the filter too

    """

    def __init__(
        self,
        filter: str = "ema",
        *,
        alpha: float = 0.98,
        lamb: float = 2.0,
        window_size: int = 100,
        ma_lamb: float = 5.0,
        warmup: bool = True,
        filter_type: str = "mean",
        normalize: bool = False,
        state_dtype: str | torch.dtype | None = "float32",
        resum_every: int | None = None,
        check_finite: bool = True,
        orthogonal: bool = False,
        max_amplified_ratio: float | None = None,
        exclude: str | list[str] | None = None,
        lamb_scale: dict[str, float] | None = None,
        start_step: int = 0,
        speedup: float | None = None,
        compile: bool = False,
    ) -> None:
        self.config = FilterConfig.from_arguments(
            filter,
            speedup=speedup,
            alpha=alpha,
            lamb=lamb,
            window_size=window_size,
            ma_lamb=ma_lamb,
            warmup=warmup,
            filter_type=filter_type,
            normalize=normalize,
            state_dtype=state_dtype,
            resum_every=resum_every,
            check_finite=check_finite,
            orthogonal=orthogonal,
            max_amplified_ratio=max_amplified_ratio,
            compile=compile,
        )
        as_pattern_list(exclude, "exclude")  # validated now, not at the first step
        as_pattern_factors(lamb_scale, "lamb_scale")
        self.exclude = exclude
        self.lamb_scale = lamb_scale
        self.start_step = check_int(start_step, "start_step")
        self.handle: GrokfastHandle | None = None
        self._logged_step = -1

    @classmethod
    def from_speedup(cls, speedup: float, filter: str = "ema", **kwargs: Any) -> GrokfastTrainerCallback:
        """A callback tuned by the authors' rule of thumb for a target acceleration ``speedup`` (``N``).

        The filter averages over about ``N`` steps (``window_size = N``; for the EMA, ``alpha**N = 0.1``); ``lamb``
        is still yours.

        Args:
            speedup: the target acceleration ``N``, a number > 1.
            filter: ``"ema"`` (sets ``alpha``), ``"ma"`` (sets ``window_size``) or ``"ema+ma"`` (both).
            **kwargs: every other :class:`GrokfastTrainerCallback` argument.

        Returns:
            The callback.

        Raises:
            ValueError: If ``speedup`` is not a number > 1, or an argument is out of its range.

        Example::

            GrokfastTrainerCallback.from_speedup(100)  # alpha = 0.1 ** (1 / 100) = 0.977

        """
        return cls(filter, speedup=speedup, **kwargs)

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Attach already when the Trainer was given its optimizer (``Trainer(optimizers=(optimizer, ...))``).

        A checkpoint is then loaded through the filter's own load hook, which keeps the float32 state of bfloat16
        or float16 parameters exactly (an attach after the load finds it cast to the parameters' dtype).
        """
        if kwargs.get("optimizer") is not None:
            self._attach(kwargs.get("model"), kwargs["optimizer"])

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Attach to the Trainer's optimizer, adopting the filter state a resume has just loaded into it."""
        self._attach(kwargs.get("model"), kwargs.get("optimizer"))
        self._log_before_reporters()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Leave the model's parameters free for another filter (a later Trainer on the same model)."""
        if self.handle is not None:
            self.handle.unclaim()  # the hook stays: a second `train()` continues, and claims them again

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Ask the filter for its gradient norms only on the steps the Trainer will log."""
        if self.handle is not None:
            self.handle.compute_norms = _logs_at(state.global_step + 1, args, state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the filter's numbers to a training log (and to its entry in ``state.log_history``)."""
        if self.handle is None or logs is None or "loss" not in logs or self._logged_step == state.global_step:
            return
        self._logged_step = state.global_step
        metrics = {
            k: float(v.item()) if isinstance(v, torch.Tensor) else v
            for k, v in filter_metrics(self.handle.filter, self.handle.last_info).items()
        }
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    # ------------------------------------------------------------------ helpers
    def _attach(self, model: Any, optimizer: Any) -> None:
        if optimizer is None:
            raise RuntimeError("GrokfastTrainerCallback: the Trainer began training without an optimizer to filter.")
        if self.handle is not None and self.handle.attached:
            if self.handle.optimizer is unwrap_optimizer(optimizer):
                return  # train() called again on the same Trainer: the filter goes on
            self.handle.remove()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.handle = attach_grokfast(
                optimizer,
                config=self.config,
                model=model if isinstance(model, torch.nn.Module) else None,
                exclude=self.exclude,
                lamb_scale=self.lamb_scale,
                start_step=self.start_step,
            )
        for caught_warning in caught:  # the Trainer loaded the checkpoint before this attach: say how to avoid it
            message = caught_warning.message
            if isinstance(message, RoundedStateWarning):
                message = RoundedStateWarning(message.dtype, _TRAINER_ADVICE)
            warnings.warn(message, stacklevel=2)

    def _log_before_reporters(self) -> None:
        """Move this callback ahead of the ``report_to`` callbacks, so that they receive the numbers it adds.

        The Trainer calls its callbacks in order, the reporters (created from ``report_to``) before the user's, and
        passes none of them the list; it is found as the list that holds this callback and the Trainer's
        ``DefaultFlowCallback``.
        """
        flow = transformers.trainer_callback.DefaultFlowCallback
        for holder in gc.get_referrers(self):
            if isinstance(holder, list) and any(isinstance(c, flow) for c in holder):
                holder.remove(self)
                first_reporter = next((i for i, c in enumerate(holder) if not isinstance(c, flow)), len(holder))
                holder.insert(first_reporter, self)


def _logs_at(step: int, args: Any, state: Any) -> bool:
    """Whether the Trainer logs after optimizer step ``step`` (as its ``DefaultFlowCallback`` decides)."""
    strategy = str(getattr(args, "logging_strategy", "steps")).lower()
    if step == 1 and getattr(args, "logging_first_step", False):
        return True
    every = getattr(state, "logging_steps", None) or getattr(args, "logging_steps", 0)
    return "steps" in strategy and bool(every) and step % int(every or 1) == 0
