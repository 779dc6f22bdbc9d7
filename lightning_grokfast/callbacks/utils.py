"""Lightning- and torch-internal details that several callbacks need, each wrapped in exactly one place.

Where this module reads a private attribute of Lightning or torch (named in each function's docstring), a test
in ``tests/test_private_apis.py`` fails loudly if that attribute changes, instead of the callbacks silently
falling back.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_grokfast.core.amp import scaler_found_inf

__all__ = ["is_logging_step", "scaler_found_inf", "trainer_scaler"]


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning logs ``on_step`` metrics at the current step.

    Reads the private ``trainer._logger_connector.should_update_logs``; falls back to ``log_every_n_steps``
    arithmetic if it is missing.

    Args:
        trainer: the Trainer.

    Returns:
        ``True`` at the steps where ``self.log(..., on_step=True)`` values are written.

    Example::

        if is_logging_step(trainer):
            pl_module.log("grokfast/lamb", callback.lamb)
    """
    if not trainer.loggers:
        return False
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except (AttributeError, NotImplementedError):
        every = int(getattr(trainer, "log_every_n_steps", 0))
        return every > 0 and (trainer.global_step + 1) % every == 0


def trainer_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The Trainer's AMP gradient scaler (``16-mixed``), or ``None``.

    Args:
        trainer: the Trainer.

    Returns:
        The ``GradScaler`` of the Trainer's precision plugin, or ``None`` without one.

    Example::

        found_inf = scaler_found_inf(trainer_scaler(trainer), optimizer)
    """
    return getattr(trainer.precision_plugin, "scaler", None)
