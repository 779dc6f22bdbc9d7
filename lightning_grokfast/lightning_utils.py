"""Lightning- and torch-internal details that several callbacks need, each wrapped in exactly one place.

Where this module reads a private attribute of Lightning or torch (named in each function's docstring), a test
in ``tests/test_private_apis.py`` fails loudly if that attribute changes, instead of the callbacks silently
falling back.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning logs ``on_step`` metrics at the current step.

    Reads the private ``trainer._logger_connector.should_update_logs``; falls back to ``log_every_n_steps``
    arithmetic if it is missing.
    """
    if not trainer.loggers:
        return False
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except (AttributeError, NotImplementedError):
        return trainer.log_every_n_steps > 0 and (trainer.global_step + 1) % trainer.log_every_n_steps == 0


def scaler_found_inf(scaler: torch.amp.GradScaler | None, optimizer: Optimizer) -> Tensor | None:
    """The AMP scaler's own verdict on this optimizer's gradients, if it has unscaled them (no synchronization).

    Reads the private ``GradScaler._per_optimizer_states[id(optimizer)]`` (``"stage"`` and
    ``"found_inf_per_device"``).

    Returns:
        A tensor that is non-zero when some gradient was not finite, or ``None`` when the gradients were not
        unscaled by ``scaler`` (no scaler, or not yet unscaled).

    Raises:
        MisconfigurationException: If the optimizer unscales inside ``step()`` (a fused optimizer), so a filter
            running before ``step()`` would see scaled gradients.

    """
    if scaler is None or not scaler.is_enabled():
        return None
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        raise MisconfigurationException(
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


def trainer_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The Trainer's AMP gradient scaler (``16-mixed``), or ``None``."""
    return getattr(trainer.precision_plugin, "scaler", None)
