"""The ``lightning-grokfast`` command.

* :mod:`~lightning_grokfast.cli.fit`: the LightningCLI with Grokfast built in (``fit``, ``validate``, ...).
* :mod:`~lightning_grokfast.cli.tune`: ``lightning-grokfast tune``, the search of Grokfast settings on Optuna.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import ArgsType

__all__ = ["main"]


def main(args: ArgsType = None) -> None:
    """Run the ``lightning-grokfast`` command.

    Args:
        args: the command line without the program name; ``None`` reads ``sys.argv``.

    Example::

        from lightning_grokfast.cli import main

        main(["fit", "--config", "ema.yaml", "--trainer.max_steps", "10"])
        main(["tune", "--config", "ema.yaml", "--n-trials", "20"])

    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["tune"]:
        from lightning_grokfast.cli.tune import main as tune_main

        tune_main(argv[1:])
        return
    from lightning_grokfast.cli.fit import main as fit_main

    fit_main(args)


def __getattr__(name: str) -> object:
    # The LightningCLI classes stay importable from ``lightning_grokfast.cli`` without loading them at import time.
    if name in {"GrokfastCLI", "TaskCLI", "TASK_TRAINER_DEFAULTS"}:
        from lightning_grokfast.cli import fit

        return getattr(fit, name)
    raise AttributeError(f"module 'lightning_grokfast.cli' has no attribute {name!r}")
