"""The Grokfast filters as the paper publishes them, written from its description for benchmarking.

These are deliberately the straightforward algorithms of the paper (arXiv 2405.20233, Algorithms 1 and 2), not
fast ones: one Python iteration per parameter, a fresh tensor for every intermediate, and a moving average that
keeps ``window_size`` raw gradients per parameter and adds all of them up again at every step. They are the
yardstick for ``lightning_grokfast.core.filters.GradientFilter`` (same numbers, less work) in ``benchmarks/overhead.py``
and in ``tests/test_benchmarks.py``.

Both functions take the model and the filter state of the previous call (``None`` on the first call), update
``p.grad`` of every parameter that has one by *rebinding* it to a new tensor (the raw gradient object is left
untouched, so a window may hold it), and return the new state::

    state = None
    for batch in data:
        loss(model, batch).backward()
        state = gradfilter_ema_reference(model, state, alpha=0.98, lamb=2.0)
        optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer

EmaState = dict[str, Tensor]
MaState = dict[str, deque[Tensor]]


def _parameters_with_grad(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.grad is not None]


# ---------------------------------------------------------------------- the algorithm, one tensor at a time
def ema_step(state: EmaState, name: str, grad: Tensor, alpha: float, lamb: float) -> Tensor:
    """One EMA update of ``name`` (the average starts at its first gradient); returns ``grad + lamb * ema``."""
    grad = grad.detach()
    if name not in state:
        state[name] = grad.clone()
    else:
        state[name] = state[name] * alpha + grad * (1.0 - alpha)
    return grad + state[name] * lamb


def ma_step(
    window: deque[Tensor], grad: Tensor, lamb: float, filter_type: str, warmup: bool, trigger: bool = False
) -> Tensor:
    """Append ``grad`` to its window, re-sum the whole window (O(window), as published); return the filtered
    gradient (``grad`` itself while warming up, or with ``trigger`` under ``warmup``)."""
    window.append(grad.detach())
    if warmup and (len(window) < (window.maxlen or 0) or trigger):
        return grad
    total = sum(window)  # O(window) additions, every step, as published
    slow = total / len(window) if filter_type == "mean" else total
    return grad + slow * lamb


class ReferenceEMA:
    """The EMA filter as a function of a dict of gradients (for the tests): ``{name: grad} -> {name: filtered}``."""

    def __init__(self, alpha: float, lamb: float) -> None:
        self.alpha, self.lamb = alpha, lamb
        self.slow: EmaState = {}

    def __call__(self, named_grads: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: ema_step(self.slow, n, g, self.alpha, self.lamb) for n, g in named_grads.items()}


class ReferenceMA:
    """The moving-average filter as a function of a dict of gradients (for the tests)."""

    def __init__(self, window_size: int, lamb: float, warmup: bool = True, filter_type: str = "mean") -> None:
        self.window_size, self.lamb, self.warmup, self.filter_type = window_size, lamb, warmup, filter_type
        self.history: MaState = {}

    def __call__(self, named_grads: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, grad in named_grads.items():
            window = self.history.setdefault(name, deque(maxlen=self.window_size))
            out[name] = ma_step(window, grad, self.lamb, self.filter_type, self.warmup)
        return out


@torch.no_grad()
def gradfilter_ema_reference(
    model: nn.Module, state: EmaState | None = None, alpha: float = 0.98, lamb: float = 2.0
) -> EmaState:
    """EMA filter, one parameter at a time: ``m <- alpha * m + (1 - alpha) * g`` then ``g <- g + lamb * m``.

    The average starts at the first gradient (the first update is ``alpha * g + (1 - alpha) * g``).

    Args:
        model: the module whose ``p.grad`` are filtered (rebound to new tensors).
        state: the dict returned by the previous call, or ``None`` on the first call.
        alpha: EMA momentum.
        lamb: amplification of the slow component.

    Returns:
        The updated state: parameter name -> slow gradient.

    """
    state = {} if state is None else state
    for name, p in _parameters_with_grad(model):
        p.grad = ema_step(state, name, p.grad, alpha, lamb)
    return state


@torch.no_grad()
def gradfilter_ma_reference(
    model: nn.Module,
    state: MaState | None = None,
    window_size: int = 100,
    lamb: float = 5.0,
    filter_type: str = "mean",
    warmup: bool = True,
    trigger: bool = False,
) -> MaState:
    """Windowed moving-average filter: keep the last ``window_size`` gradients, re-sum them at every step.

    Args:
        model: the module whose ``p.grad`` are filtered (rebound to new tensors).
        state: the dict returned by the previous call, or ``None`` on the first call.
        window_size: number of gradients kept per parameter.
        lamb: amplification of the slow component.
        filter_type: ``"mean"`` (divide the window's sum by its length) or ``"sum"``.
        warmup: add nothing until the window is full.
        trigger: with ``warmup``, only record the window, add nothing (as the published function).

    Returns:
        The updated state: parameter name -> deque of the raw gradients in the window (the gradient tensors
        themselves, not copies).

    Raises:
        ValueError: If ``filter_type`` is neither ``"mean"`` nor ``"sum"``.

    """
    if filter_type not in ("mean", "sum"):
        raise ValueError(f"`filter_type` must be 'mean' or 'sum', got {filter_type!r}.")
    state = {} if state is None else state
    for name, p in _parameters_with_grad(model):
        window = state.setdefault(name, deque(maxlen=window_size))
        p.grad = ma_step(window, p.grad, lamb, filter_type, warmup, trigger)
    return state


def prefilled_ma_state(model: nn.Module, window_size: int) -> MaState:
    """A moving-average state whose windows are already full of zero gradients (distinct tensors).

    For timing the steady state of :func:`gradfilter_ma_reference` without first running ``window_size`` steps.
    """
    return {
        name: deque((torch.zeros_like(p) for _ in range(window_size)), maxlen=window_size)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def reference_state_bytes(state: EmaState | MaState | None) -> int:
    """Bytes held by a reference filter's state (each distinct tensor storage counted once)."""
    if not state:
        return 0
    seen: dict[int, int] = {}
    for value in state.values():
        for tensor in value if isinstance(value, deque) else (value,):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


class ReferenceGrokfastCallback(Callback):
    """Runs a reference filter in ``on_before_optimizer_step`` (what the paper's loop does after ``backward``).

    Args:
        filter: ``"ema"`` or ``"ma"``.
        prefill: start the moving average with a full window of zeros (to time the steady state at once).
        **kwargs: passed to :func:`gradfilter_ema_reference` or :func:`gradfilter_ma_reference`.

    Raises:
        ValueError: If ``filter`` is unknown.

    Example::

        trainer = L.Trainer(callbacks=[ReferenceGrokfastCallback("ma", window_size=100, lamb=5.0)])

    """

    def __init__(self, filter: str = "ema", prefill: bool = False, **kwargs: Any) -> None:
        if filter not in ("ema", "ma"):
            raise ValueError(f"`filter` must be 'ema' or 'ma', got {filter!r}.")
        self.filter = filter
        self.prefill = prefill
        self.kwargs = kwargs
        self.enabled = True
        self.state: EmaState | MaState | None = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self.enabled:
            return
        if self.state is None and self.prefill and self.filter == "ma":
            self.state = prefilled_ma_state(pl_module, self.kwargs.get("window_size", 100))
        if self.filter == "ema":
            self.state = gradfilter_ema_reference(pl_module, self.state, **self.kwargs)  # type: ignore[arg-type]
        else:
            self.state = gradfilter_ma_reference(pl_module, self.state, **self.kwargs)  # type: ignore[arg-type]

    def state_bytes(self) -> int:
        """Bytes of filter state currently held."""
        return reference_state_bytes(self.state)
