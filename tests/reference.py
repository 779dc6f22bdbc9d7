"""Straightforward reference Grokfast filters for the tests: one tensor at a time, the window re-summed every step."""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor


class ReferenceEMA:
    """``m <- alpha * m + (1 - alpha) * g`` (m starts at the first gradient); ``g <- g + lamb * m``."""

    def __init__(self, alpha: float, lamb: float) -> None:
        self.alpha, self.lamb = alpha, lamb
        self.slow: dict[str, Tensor] = {}

    def __call__(self, named_grads: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, grad in named_grads.items():
            if name not in self.slow:
                self.slow[name] = grad.detach().clone()
            else:
                self.slow[name] = self.slow[name] * self.alpha + grad.detach() * (1 - self.alpha)
            out[name] = grad + self.lamb * self.slow[name]
        return out


class ReferenceMA:
    """Mean (or sum) of the last ``window_size`` gradients, re-summed from a deque every step."""

    def __init__(self, window_size: int, lamb: float, warmup: bool = True, filter_type: str = "mean") -> None:
        self.window_size, self.lamb, self.warmup, self.filter_type = window_size, lamb, warmup, filter_type
        self.history: dict[str, deque[Tensor]] = {}

    def __call__(self, named_grads: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, grad in named_grads.items():
            window = self.history.setdefault(name, deque(maxlen=self.window_size))
            window.append(grad.detach().clone())
            if self.warmup and len(window) < self.window_size:
                out[name] = grad.clone()
                continue
            total = torch.stack(list(window)).sum(0)
            slow = total / len(window) if self.filter_type == "mean" else total
            out[name] = grad + self.lamb * slow
        return out
