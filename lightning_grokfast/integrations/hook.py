"""Grokfast in any training loop that calls ``optimizer.step()``: plain PyTorch, Fabric, Hugging Face, ...

:func:`attach_grokfast` registers an optimizer step pre-hook that filters the gradients just before each step, and
keeps the filter state in ``optimizer.state_dict()``. Pure torch: no Lightning import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_grokfast.core.amp import scaler_found_inf
from lightning_grokfast.core.binding import OptimizerBinding, ParamSelection
from lightning_grokfast.core.config import FilterConfig, TunableSettings
from lightning_grokfast.core.filters import GradientFilter, StepInfo
from lightning_grokfast.core.optim_state import unwrap_optimizer
from lightning_grokfast.core.sharding import is_state_init_step
from lightning_grokfast.core.validation import as_pattern_factors, as_pattern_list, check_bool, check_int

__all__ = ["GrokfastHandle", "attach_grokfast"]


class GrokfastHandle(TunableSettings):
    """What :func:`attach_grokfast` returns: the live settings, the filter, and :meth:`remove`.

    Attributes:
        config: the filter's :class:`~lightning_grokfast.FilterConfig` (``lamb``, ``alpha``, ... settable).
        start_step: first optimizer step (counted from 0) at which the slow part is added.
        enabled: on/off switch (off: gradients and state are left alone).
        last_info: the :class:`~lightning_grokfast.StepInfo` of the last step (device tensors).

    Args:
        optimizer: the optimizer (or a wrapper holding one as ``.optimizer``).
        config: the filter configuration (shared, not copied).
        model: names the parameters (``None``: ``group{g}.param{j}``).
        selection: which parameters are filtered, and their ``lamb`` factors.
        start_step: first optimizer step at which the slow part is added.
        scaler: the ``GradScaler`` whose overflow verdict replaces the filter's own check.
        compute_norms: keep the raw and slow gradient norms of each step in ``last_info``.

    Raises:
        ValueError: If the optimizer's ``step`` requires a closure, or state loaded into it does not fit this filter.

    Example::

        handle = attach_grokfast(optimizer, filter="ema", model=model)  # builds the handle
        handle.lamb = 3.0  # live: the next step uses it
        handle.remove()

    """

    def __init__(
        self,
        optimizer: Any,
        config: FilterConfig,
        *,
        model: nn.Module | None,
        selection: ParamSelection,
        start_step: int,
        scaler: torch.amp.GradScaler | None,
        compute_norms: bool,
    ) -> None:
        _refuse_closure_only(unwrap_optimizer(optimizer))
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else None
        self.config = config
        self.start_step = start_step
        self.enabled = True
        self.scaler = scaler
        self.compute_norms = compute_norms
        self.last_info: StepInfo | None = None
        self._binding = OptimizerBinding(
            optimizer,
            config,
            names=names,
            selection=selection,
            owner=f"attach_grokfast(filter={config.filter!r})",
            extras=(self._counters, self._load_counters),
        )
        self.optimizer = self._binding.optimizer
        self._binding.warn_when_empty = True  # (in Lightning, a training_step returning None skips on purpose)
        try:  # state that optimizer.load_state_dict() loaded before this attach (load-then-attach scripts)
            self._binding.adopt()
        except ValueError:
            self._binding.release()
            raise
        self._hook: RemovableHandle | None = self.optimizer.register_step_pre_hook(self._before_step)

    # ------------------------------------------------------------------ settings
    @property
    def filter(self) -> GradientFilter:
        """The gradient filter (its ``states``, ``steps``, ``skipped_steps``)."""
        return self._binding.filter

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def remove(self) -> None:
        """Detach: the optimizer steps on raw gradients again and its state dicts no longer carry filter state."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self._binding.release()

    def unclaim(self) -> None:
        """Leave the parameters free for another filter until this handle's next step (which claims them again).

        The hook and the checkpoint link stay, e.g. when a Hugging Face ``trainer.train()`` ends: another trainer may
        then filter the same model, while this optimizer's state dict still carries the filter state.
        """
        self._binding.unclaim()

    # ------------------------------------------------------------------ the hook
    def _before_step(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.enabled or is_state_init_step(self.optimizer):
            return None
        # torch passes step()'s own arguments, the optimizer first: args == (optimizer, closure?)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._filter()
            return None
        # The closure computes the gradients inside step(), after this hook: filter them when it returns.
        wrapped = self._filtering(closure)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    def _filter(self) -> None:
        self.last_info = self._binding.step(
            amplify=self.filter.steps >= self.start_step,
            found_inf=scaler_found_inf(self.scaler, self.optimizer),
            compute_norms=self.compute_norms,
        )

    def _filtering(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` followed by one filter step, on its first call (optimizers that take an optional closure call
        it once per step)."""
        calls = 0

        def filtered_closure() -> Any:
            nonlocal calls
            loss = closure()
            calls += 1
            if calls == 1:
                self._filter()
            return loss

        return filtered_closure

    def _counters(self) -> dict[str, Any]:
        return {**self.filter.counters(), **self.config.structure(), **self.config.tunables()}

    def _load_counters(self, saved: Mapping[str, Any]) -> None:
        self.filter.load_counters(saved)


def _refuse_closure_only(optimizer: torch.optim.Optimizer) -> None:
    """Optimizers whose ``step`` needs a closure evaluate it several times per step (LBFGS: once per line-search
    point), each time with new raw gradients; filtering one of them would not be Grokfast, so they are refused."""
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"attach_grokfast cannot filter {type(optimizer).__name__}: its step() requires a closure, which it may"
            " evaluate several times per step, each time computing new gradients after the step pre-hook has run;"
            " there is no single gradient per step to filter. Use an optimizer whose step() takes the gradients as"
            " they are (SGD, Adam, AdamW, ...), or call a lightning_grokfast GradientFilter inside your closure."
        )


def attach_grokfast(
    optimizer: Any,
    filter: str = "ema",
    *,
    model: nn.Module | None = None,
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
    scaler: torch.amp.GradScaler | None = None,
    compute_norms: bool = False,
    config: FilterConfig | None = None,
) -> GrokfastHandle:
    r"""Filter the gradients of ``optimizer`` before each of its steps (Grokfast), in any training loop.

    Registers a step pre-hook: whenever ``optimizer.step()`` runs, each gradient ``g`` of its parameters first becomes
    ``g + lamb * slow(g)``. Under ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` unscales first and skips
    ``optimizer.step()`` on overflow, so the filter sees unscaled gradients and never an overflow step. The filter
    state is saved by ``optimizer.state_dict()`` and restored by ``optimizer.load_state_dict()``.

    Args:
        optimizer: a ``torch.optim.Optimizer``, or a wrapper holding one as ``.optimizer`` (Fabric, Accelerate).
        filter: ``"ema"``, ``"ma"``, ``"ema+ma"`` or ``"none"``.
        model: gives the parameters their names (for ``exclude``, ``lamb_scale`` and readable errors); without it,
            parameters are called ``group{g}.param{j}``.
        alpha: EMA momentum, in ``[0, 1)``.
        lamb: amplification of the slow part (of the EMA, or of the MA with ``filter="ma"``), ``>= 0``.
        window_size: moving-average window, ``>= 1``.
        ma_lamb: amplification of the MA term with ``filter="ema+ma"``, ``>= 0``.
        warmup: MA only: add nothing until the window is full.
        filter_type: MA aggregation, ``"mean"`` or ``"sum"``.
        normalize: scale the slow part to the gradient's norm.
        state_dtype: dtype of the EMA and MA-window state (``"float32"``, ``"bfloat16"``; ``None``: the gradient's).
        resum_every: re-sum the MA window exactly every this many steps (``None``: the default schedule).
        check_finite: skip a step whose gradients are not all finite (one host read of a flag per step).
        orthogonal: remove from each gradient its component along its parameter first (⊥Grad).
        max_amplified_ratio: divergence guard: cap the added term's norm at this multiple of the gradient's norm.
        exclude: a regular expression or a list of them; parameters whose name matches any are not filtered.
        lamb_scale: ``{pattern: factor}``; parameters whose name matches a pattern (first match wins) use
            ``lamb * factor``.
        start_step: first optimizer step (counted from 0) at which the slow part is added; the state is updated from
            the first step on.
        scaler: the ``GradScaler`` used with ``scaler.step(optimizer)``; its verdict replaces the filter's own
            finite check (one pass over the gradients less).
        compute_norms: keep the raw and slow gradient norms of each step in ``handle.last_info``.
        config: a ready :class:`~lightning_grokfast.FilterConfig` instead of the individual settings.

    Returns:
        A :class:`GrokfastHandle`: ``handle.lamb``/``handle.alpha`` are settable, ``handle.remove()`` detaches.

    Raises:
        ValueError: If an argument is out of its range, or a parameter is already filtered by another filter.

    Example::

        from lightning_grokfast import attach_grokfast

        handle = attach_grokfast(optimizer, filter="ema", alpha=0.98, lamb=2.0, model=model)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()  # the gradients are filtered first
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, "ckpt.pt")
        handle.remove()

    """
    if config is None:
        config = FilterConfig(
            filter,
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
        )
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module or None, got {type(model).__name__}.")
    selection = ParamSelection(as_pattern_list(exclude, "exclude"), as_pattern_factors(lamb_scale, "lamb_scale"))
    if (exclude or lamb_scale) and model is None:
        raise ValueError("`exclude` and `lamb_scale` select parameters by name: pass `model=` to name them.")
    return GrokfastHandle(
        optimizer,
        config,
        model=model,
        selection=selection,
        start_step=check_int(start_step, "start_step"),
        scaler=scaler,
        compute_norms=check_bool(compute_norms, "compute_norms"),
    )
