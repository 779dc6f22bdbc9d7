"""Drop-in replacements for the two functions of the Grokfast paper's code, on the same filter core.

Same arguments, defaults and contract as the published ``gradfilter_ema`` and ``gradfilter_ma``: call after
``loss.backward()`` and before ``optimizer.step()``, pass the returned ``grads`` back in on the next call. What
differs: the moving average costs O(1) per step whatever the window (a running sum instead of re-summing a deque),
all parameters are updated with a few ``torch._foreach_*`` calls, and a step whose gradients are not all finite is
skipped instead of poisoning the state.

Example::

    from lightning_grokfast.integrations.functional import gradfilter_ema

    grads = None
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        grads = gradfilter_ema(model, grads=grads, alpha=0.98, lamb=2.0)
        optimizer.step()
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_grokfast.core.config import FilterConfig
from lightning_grokfast.core.filters import GradientFilter

__all__ = ["FilterState", "gradfilter_ema", "gradfilter_ma"]


class FilterState(dict):  # type: ignore[type-arg]
    """The ``grads`` value the functions return and take back: parameter name -> slow gradient (EMA or window mean).

    The mapping is refreshed after every call (read-only in spirit: the filter's own state is in ``.filter``).

    Args:
        filter: the filter whose slow gradients the mapping shows.

    Example::

        >>> import torch
        >>> from lightning_grokfast.integrations.functional import gradfilter_ema
        >>> model = torch.nn.Linear(2, 1)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> grads = gradfilter_ema(model)
        >>> sorted(grads)
        ['bias', 'weight']
    """

    def __init__(self, filter: GradientFilter) -> None:
        super().__init__()
        self.filter = filter

    def _refresh(self) -> None:
        self.clear()
        for name, state in self.filter.states.items():
            if state.ema is not None:
                self[name] = state.ema
            elif state.ma_sum is not None and state.ma_count:
                self[name] = state.ma_sum / state.ma_count


def _named_grads(m: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p.grad) for n, p in m.named_parameters() if p.requires_grad and p.grad is not None]
    return [n for n, _ in named], [g for _, g in named]  # type: ignore[misc]


def _state_for(grads: Any, config: FilterConfig, function: str) -> FilterState:
    if grads is None:
        return FilterState(GradientFilter(config=config))
    if not isinstance(grads, FilterState):
        raise ValueError(
            f"`grads` must be None or the value {function} returned on the previous call, got {type(grads).__name__}."
        )
    if grads.filter.config.structure() != config.structure():
        raise ValueError(
            f"`grads` was made by {grads.filter.config.structure()}, this call asks for {config.structure()}:"
            " start again with grads=None to change the filter or its window."
        )
    return grads


def gradfilter_ema(
    m: nn.Module, grads: FilterState | None = None, alpha: float = 0.98, lamb: float = 2.0
) -> FilterState:
    """EMA Grokfast filter (the paper's Algorithm 2): ``g <- g + lamb * ema(g)``, in place on every ``p.grad``.

    Args:
        m: the model; every parameter with ``requires_grad`` and a gradient is filtered.
        grads: ``None`` on the first call, then what the previous call returned.
        alpha: EMA momentum in ``[0, 1)``.
        lamb: amplification ``>= 0``.

    Returns:
        The filter state to pass back in (a dict of parameter name -> EMA).

    Raises:
        ValueError: If an argument is out of range or ``grads`` is not what a previous call returned.

    Example::

        >>> import torch
        >>> from lightning_grokfast.integrations.functional import gradfilter_ema
        >>> model = torch.nn.Linear(2, 1)
        >>> grads = None
        >>> for _ in range(2):
        ...     model(torch.ones(1, 2)).sum().backward()
        ...     grads = gradfilter_ema(model, grads=grads, alpha=0.98, lamb=2.0)
        ...     model.zero_grad()
    """
    state = _state_for(grads, FilterConfig("ema", alpha=alpha, lamb=lamb, state_dtype=None), "gradfilter_ema")
    state.filter.alpha, state.filter.lamb = alpha, lamb
    names, tensors = _named_grads(m)
    state.filter.step(names, tensors)
    state._refresh()
    return state


def gradfilter_ma(
    m: nn.Module,
    grads: FilterState | None = None,
    window_size: int = 100,
    lamb: float = 5.0,
    filter_type: str = "mean",
    warmup: bool = True,
    trigger: bool = False,
) -> FilterState:
    """Moving-average Grokfast filter (the paper's Algorithm 1), O(1) per step whatever ``window_size``.

    Args:
        m: the model; every parameter with ``requires_grad`` and a gradient is filtered.
        grads: ``None`` on the first call, then what the previous call returned.
        window_size: number of past gradients averaged.
        lamb: amplification ``>= 0``.
        filter_type: ``"mean"`` or ``"sum"`` of the window.
        warmup: add nothing until the window is full.
        trigger: with ``warmup``, only record gradients, add nothing (as the published function: ignored without
            ``warmup``).

    Returns:
        The filter state to pass back in (a dict of parameter name -> window mean).

    Raises:
        ValueError: If an argument is out of range or ``grads`` is not what a previous call returned.

    Example::

        >>> import torch
        >>> from lightning_grokfast.integrations.functional import gradfilter_ma
        >>> model = torch.nn.Linear(2, 1)
        >>> grads = None
        >>> for _ in range(2):
        ...     model(torch.ones(1, 2)).sum().backward()
        ...     grads = gradfilter_ma(model, grads=grads, window_size=100, lamb=5.0)
        ...     model.zero_grad()
    """
    config = FilterConfig(
        "ma", window_size=window_size, lamb=lamb, filter_type=filter_type, warmup=warmup, state_dtype=None
    )
    state = _state_for(grads, config, "gradfilter_ma")
    state.filter.lamb = lamb
    state.filter.config.filter_type, state.filter.config.warmup = filter_type, warmup
    names, tensors = _named_grads(m)
    state.filter.step(names, tensors, amplify=not (warmup and trigger))
    state._refresh()
    return state
