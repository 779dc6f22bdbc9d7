"""The ``auto`` rule: the Grokfast setting we measured as the safest single choice across our task suite.

It is two callbacks over the library's parts, nothing of its own: a
:class:`~lightning_grokfast.GrokfastCallback` with the moving-average filter (window 100, ``lamb`` 5, the paper's
MA setting) and a :class:`~lightning_grokfast.GrokkingDetectorCallback` that, once the training set is fitted,
halves ``lamb`` each time the train metric falls ``instability_drop`` below its best (the amplification made
training unstable), and does not stop the run. Its evidence and limits are in "Which filter for my task?"
(``benchmarks/safe_default.py``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_grokfast.callbacks.detector import GrokkingDetectorCallback
from lightning_grokfast.callbacks.grokfast import GrokfastCallback

__all__ = ["AUTO_BACKOFF", "AUTO_FILTER", "auto_grokfast"]

#: The ``GrokfastCallback`` arguments of the ``auto`` rule.
AUTO_FILTER: dict[str, Any] = {"filter": "ma", "window_size": 100, "lamb": 5.0}
#: The ``GrokkingDetectorCallback`` arguments of the ``auto`` rule's back-off.
AUTO_BACKOFF: dict[str, Any] = {"instability_backoff": 0.5, "instability_drop": 0.02, "stop_on_convergence": False}


def auto_grokfast(
    train_metric: str = "train_acc",
    val_metric: str = "val_acc",
    mode: str = "max",
    memorization_threshold: float = 0.9,
    instability_drop: float = AUTO_BACKOFF["instability_drop"],
    verbose: bool = True,
    **grokfast_kwargs: Any,
) -> list[Callback]:
    """The callbacks of the ``auto`` rule: MA Grokfast whose ``lamb`` backs off when training becomes unstable.

    Args:
        train_metric: the train metric the back-off watches (logged per step, e.g. ``self.log("train_acc", ...,
            on_step=True)``); higher is better unless ``mode="min"``.
        val_metric: the validation metric (the detector also reports the phases and marks of the run with it).
        mode: ``"max"`` for accuracies, ``"min"`` for losses or errors.
        memorization_threshold: train value from which the training set counts as fitted; the back-off watches
            the train metric from then on (with a loss, the value of a fitted training set, e.g. ``0.01``).
        instability_drop: fall of ``train_metric`` from its best, ``> 0``, that halves ``lamb``, in the metric's
            units (0.02: two points of accuracy; scale it to your metric's range with a loss).
        verbose: announce each back-off and the detector's transitions on rank zero.
        **grokfast_kwargs: other :class:`~lightning_grokfast.GrokfastCallback` arguments (``exclude``,
            ``state_dtype``...), or overrides of the rule's filter settings.

    Returns:
        ``[GrokfastCallback, GrokkingDetectorCallback]``, for ``Trainer(callbacks=...)``.

    Raises:
        ValueError: If an argument is out of its range (the message names it).

    Example::

        from lightning_grokfast import auto_grokfast

        trainer = L.Trainer(callbacks=auto_grokfast())
        trainer.fit(model)  # the model logs train_acc (per step) and val_acc

    """
    grokfast = GrokfastCallback(**{**AUTO_FILTER, **grokfast_kwargs})
    detector = GrokkingDetectorCallback(
        train_metric=train_metric,
        val_metric=val_metric,
        mode=mode,
        memorization_threshold=memorization_threshold,
        verbose=verbose,
        **{**AUTO_BACKOFF, "instability_drop": instability_drop},
    )
    return [grokfast, detector]
