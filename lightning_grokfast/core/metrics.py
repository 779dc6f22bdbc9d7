"""The numbers a filter step reports, under the names every entry point logs them by (torch alone)."""

from __future__ import annotations

from torch import Tensor

from lightning_grokfast.core.filters import GradientFilter
from lightning_grokfast.core.state import StepInfo

__all__ = ["filter_metrics"]


def filter_metrics(
    filter: GradientFilter, info: StepInfo | None, prefix: str = "grokfast/"
) -> dict[str, float | Tensor]:
    """The settings and step statistics of ``filter``, keyed ``{prefix}lamb``, ``{prefix}slow_norm``, ...

    Settings (``lamb``; ``alpha`` with an EMA; ``ma_lamb`` with ``"ema+ma"``) and ``skipped_steps`` are floats; the
    norms of ``info`` stay device tensors (no synchronization here), present only when the step computed them.

    Args:
        filter: the filter whose settings and counters are reported.
        info: the last step's :class:`~lightning_grokfast.StepInfo` (``None``: settings and counters only).
        prefix: prepended to every key.

    Returns:
        ``{name: value}``: ``lamb``, ``skipped_steps``, and where they apply ``alpha``, ``ma_lamb``, ``grad_norm``,
        ``slow_norm``, ``slow_to_grad_ratio`` and ``guard_scale``.

    Example::

        from lightning_grokfast import GradientFilter
        from lightning_grokfast.core.metrics import filter_metrics

        filter_metrics(GradientFilter("ema"), None)  # {'grokfast/lamb': 2.0, 'grokfast/skipped_steps': 0.0, ...}

    """
    config = filter.config
    metrics: dict[str, float | Tensor] = {
        f"{prefix}lamb": float(config.lamb),
        f"{prefix}skipped_steps": float(filter.skipped_steps),
    }
    if config.uses_ema:
        metrics[f"{prefix}alpha"] = float(config.alpha)
    if config.filter == "ema+ma":
        metrics[f"{prefix}ma_lamb"] = float(config.ma_lamb)
    if info is None:
        return metrics
    if info.grad_norm is not None:
        metrics[f"{prefix}grad_norm"] = info.grad_norm
    if info.slow_norm is not None:
        metrics[f"{prefix}slow_norm"] = info.slow_norm
        if info.grad_norm is not None:
            metrics[f"{prefix}slow_to_grad_ratio"] = info.slow_norm / info.grad_norm.clamp_min(1e-30)
    if info.guard_scale is not None:
        metrics[f"{prefix}guard_scale"] = info.guard_scale
    return metrics
