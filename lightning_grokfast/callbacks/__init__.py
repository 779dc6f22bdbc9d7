"""Lightning callbacks and what only they use (this layer imports Lightning; the core does not).

* :mod:`~lightning_grokfast.callbacks.grokfast`: :class:`~lightning_grokfast.GrokfastCallback`.
* :mod:`~lightning_grokfast.callbacks.detector`: :class:`~lightning_grokfast.GrokkingDetectorCallback`.
* :mod:`~lightning_grokfast.callbacks.auto`: :func:`~lightning_grokfast.auto_grokfast`, the ``auto`` rule (both
  callbacks above).
* :mod:`~lightning_grokfast.callbacks.phases`: the detector's state machine (plain Python).
* :mod:`~lightning_grokfast.callbacks.tracking`: the train-metric tracker shared by the detector and the dashboard.
* :mod:`~lightning_grokfast.callbacks.dashboard`: :class:`~lightning_grokfast.GrokkingDashboardCallback`.
* :mod:`~lightning_grokfast.callbacks.utils`: small helpers over Lightning's Trainer.
"""
