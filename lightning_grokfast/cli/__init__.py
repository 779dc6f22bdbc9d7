"""The ``lightning-grokfast`` command.

* :mod:`~lightning_grokfast.cli.fit`: the LightningCLI with Grokfast built in (``fit``, ``validate``, ...).
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType

__all__ = ["main"]


def main(args: ArgsType = None) -> None:
    """Run the ``lightning-grokfast`` command.

    Args:
        args: the command line without the program name; ``None`` reads ``sys.argv``.

    Example::

        from lightning_grokfast.cli import main

        main(["fit", "--config", "ema.yaml", "--trainer.max_steps", "10"])

    """
    from lightning_grokfast.cli.fit import main as fit_main

    fit_main(args)


def __getattr__(name: str) -> object:
    # The LightningCLI classes stay importable from ``lightning_grokfast.cli`` without loading them at import time.
    if name in {"GrokfastCLI", "TaskCLI", "TASK_TRAINER_DEFAULTS"}:
        from lightning_grokfast.cli import fit

        return getattr(fit, name)
    raise AttributeError(f"module 'lightning_grokfast.cli' has no attribute {name!r}")
