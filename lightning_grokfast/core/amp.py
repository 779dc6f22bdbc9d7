"""Reading the AMP gradient scaler's verdict, wrapped in one place (pure torch).

Reads the private ``GradScaler._per_optimizer_states`` (``"stage"`` and ``"found_inf_per_device"``); a test in
``tests/test_private_apis.py`` fails loudly if that structure changes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer


def scaler_found_inf(scaler: torch.amp.GradScaler | None, optimizer: Optimizer) -> Tensor | None:
    """The AMP scaler's own verdict on this optimizer's gradients, if it has unscaled them (no synchronization).

    Args:
        scaler: the gradient scaler, or ``None``.
        optimizer: the optimizer about to step.

    Returns:
        A tensor that is non-zero when some gradient was not finite, or ``None`` when the gradients were not
        unscaled by ``scaler`` (no scaler, disabled, or not yet unscaled).

    Raises:
        ValueError: If the optimizer unscales inside ``step()`` (a fused optimizer), so a filter running before
            ``step()`` would see scaled gradients.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.amp import scaler_found_inf
        >>> scaler_found_inf(None, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)) is None
        True
    """
    if scaler is None or not scaler.is_enabled():
        return None
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ValueError(
            f"{type(optimizer).__name__} unscales its gradients inside `step()` (a fused optimizer), so under"
            " 16-mixed precision a Grokfast filter would see scaled gradients. Use `fused=False`, or bf16-mixed"
            " precision."
        )
    state = scaler._per_optimizer_states.get(id(optimizer))
    if not state or state.get("stage") is None or state["stage"].name != "UNSCALED":
        return None
    per_device = list(state["found_inf_per_device"].values())
    if not per_device:
        return None
    device = per_device[0].device
    return torch.stack([f.to(device) for f in per_device]).sum()
