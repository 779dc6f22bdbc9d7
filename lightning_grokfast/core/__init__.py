"""The filter core: tensors in, tensors out; imports torch alone (never Lightning, transformers or optuna).

Modules, one job each:

* :mod:`~lightning_grokfast.core.ops`: stateless ``torch._foreach_*`` maths of one step.
* :mod:`~lightning_grokfast.core.state`: :class:`~lightning_grokfast.core.state.ParamState`, one parameter's record.
* :mod:`~lightning_grokfast.core.config`: :class:`~lightning_grokfast.FilterConfig`, the one validated
  configuration.
* :mod:`~lightning_grokfast.core.validation`: argument checks with errors that name the argument and its range.
* :mod:`~lightning_grokfast.core.filters`: :class:`~lightning_grokfast.GradientFilter`, groups tensors
  by device and dtype and runs the ops.
* :mod:`~lightning_grokfast.core.optim_state`: the filter state inside ``optimizer.state_dict()``.
* :mod:`~lightning_grokfast.core.sharding`: DTensor shards under FSDP2 / tensor parallelism.
* :mod:`~lightning_grokfast.core.binding`: which parameters of an optimizer are filtered, under which names.
* :mod:`~lightning_grokfast.core.amp`: the ``GradScaler`` overflow verdict.
"""
