"""Filter state of sharded parameters (DTensor: FSDP2 ``fully_shard``, tensor parallel).

The filter is element-wise, so each rank filters its own gradient shard with plain local tensors. Only the
checkpoint sees DTensors: :func:`to_global` wraps a record's local tensors into DTensors sharded like the parameter
(an MA window ``(window, *shape)`` is sharded on the parameter's dimension shifted by one), so
``torch.distributed.checkpoint`` writes and reads each rank's shard without ever gathering the whole state.
:func:`to_local` takes them apart again on load; DCP has already resharded them to the current layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_grokfast.core.config import FilterConfig
from lightning_grokfast.core.state import ParamState

__all__ = ["check_saved_state", "is_dtensor", "is_state_init_step", "local", "saved_state", "to_global", "to_local"]


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``.

    Args:
        tensor: any object.

    Returns:
        ``True`` for a DTensor.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.sharding import is_dtensor
        >>> is_dtensor(torch.ones(2))
        False
    """
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that shares its storage), or the tensor itself.

    Args:
        tensor: a tensor or a DTensor.

    Returns:
        A plain tensor.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.sharding import local
        >>> t = torch.ones(2)
        >>> local(t) is t
        True
    """
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


def _wrap(local_tensor: Tensor, param: Any, leading: int) -> Tensor:
    """``local_tensor`` as a DTensor laid out like ``param`` with ``leading`` extra dimensions in front."""
    from torch.distributed.tensor import Shard

    placements = [Shard(p.dim + leading) if isinstance(p, Shard) else p for p in param.placements]
    shape = (*local_tensor.shape[:leading], *param.shape)
    return type(param).from_local(
        local_tensor,
        param.device_mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def to_global(record: ParamState, param: Tensor) -> ParamState:
    """The record with its local tensors wrapped as DTensors sharded like ``param`` (a DTensor).

    An MA window ``(window, *shape)`` is sharded on the parameter's dimension plus one.

    Args:
        record: a record of local tensors.
        param: the DTensor parameter the record belongs to.

    Returns:
        A new record of DTensors.

    Example::

        record = to_global(filter.states[name], param)  # what a distributed checkpoint saves
    """
    return dataclasses.replace(
        record,
        ema=None if record.ema is None else _wrap(record.ema, param, 0),
        ma_history=None if record.ma_history is None else _wrap(record.ma_history, param, 1),
        ma_sum=None if record.ma_sum is None else _wrap(record.ma_sum, param, 0),
    )


def to_local(record: ParamState) -> ParamState:
    """The record with DTensors replaced by their local shards (plain tensors are kept).

    Args:
        record: a record, of DTensors or plain tensors.

    Returns:
        A new record of plain tensors.

    Example::

        >>> from lightning_grokfast.core.sharding import to_local
        >>> from lightning_grokfast.core.state import ParamState
        >>> to_local(ParamState()).ema is None
        True
    """
    return dataclasses.replace(
        record,
        ema=None if record.ema is None else local(record.ema),
        ma_history=None if record.ma_history is None else local(record.ma_history),
        ma_sum=None if record.ma_sum is None else local(record.ma_sum),
    )


def is_state_init_step(optimizer: Any) -> bool:
    """Whether an ``optimizer.step()`` about to run is torch's state-initialising step, not a training step.

    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (used by Fabric's and Lightning's
    FSDP2/ModelParallel checkpoints) runs ``_init_optim_state`` on an optimizer without state: every gradient set to
    zeros, every ``lr`` set to 0, one ``step()``. Filtering it would start the EMA at zero and advance the MA window.
    A genuine step looks the same only if its state is empty, its ``lr`` is 0 *and* all its gradients are zero.

    Args:
        optimizer: the optimizer about to step.

    Returns:
        ``True`` when the step is torch's state-initialising step.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.sharding import is_state_init_step
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> w.grad = torch.ones(2)
        >>> is_state_init_step(torch.optim.Adam([w], lr=1e-3))
        False
    """
    if optimizer.state:
        return False
    groups = optimizer.param_groups
    if any(float(g.get("lr", 0.0)) != 0.0 for g in groups):
        return False
    grads = [p.grad for g in groups for p in g["params"]]
    return all(g is not None for g in grads) and not any(bool(local(g).any()) for g in grads)


def saved_state(path: Any, optimizer_key: str, prefix: str) -> dict[str, dict[str, tuple[int, ...] | None]] | None:
    """What a ``torch.distributed.checkpoint`` directory holds under ``{optimizer_key}.state.{param}.{prefix}*``.

    Reads only the checkpoint's metadata (no tensor data).

    Args:
        path: the checkpoint directory (anything else gives ``None``).
        optimizer_key: the optimizer's key in the checkpoint (e.g. ``"optimizer_states.0"``).
        prefix: the key prefix of the filter state (``"grokfast_"``).

    Returns:
        ``{param name: {key without prefix: global size (None for non-tensors)}}``, or ``None`` when ``path`` is not
        a distributed checkpoint directory.

    Example::

        >>> from lightning_grokfast.core.sharding import saved_state
        >>> saved_state(None, "optimizer_states.0", "grokfast_") is None
        True
    """
    if path is None or not Path(path).is_dir():
        return None
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception:  # not a DCP directory (or unreadable): let the loader report it
        return None
    start = f"{optimizer_key}.state."
    found: dict[str, dict[str, tuple[int, ...] | None]] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(start):
            continue
        name, _, field = key[len(start) :].rpartition(".")
        if field.startswith(prefix):
            size = getattr(meta, "size", None)
            found.setdefault(name, {})[field[len(prefix) :]] = None if size is None else tuple(size)
    return found


def check_saved_state(
    saved: Mapping[str, Mapping[str, tuple[int, ...] | None]], names: Sequence[str], config: FilterConfig, path: Any
) -> list[str]:
    """Check a checkpoint's filter state (from :func:`saved_state`) against the filter about to load it.

    Args:
        saved: what :func:`saved_state` read from the checkpoint.
        names: the names of the parameters the filter is about to load state for.
        config: the filter's configuration.
        path: the checkpoint, for the error message.

    Returns:
        The ``names`` the checkpoint has no filter state for (saved without Grokfast, or excluded then).

    Raises:
        ValueError: If the checkpoint's state was made by another kind of filter or another ``window_size``.

    Example::

        >>> from lightning_grokfast import FilterConfig
        >>> from lightning_grokfast.core.sharding import check_saved_state
        >>> check_saved_state({}, ["w"], FilterConfig(), "ckpt")
        ['w']
    """
    for name in names:
        entry = saved.get(name)
        if not entry:
            continue
        kinds = "+".join(k for k, field in (("ema", "ema"), ("ma", "ma_sum")) if field in entry) or "none"
        if ("ema" in entry) != config.uses_ema or ("ma_sum" in entry) != config.uses_ma:
            raise ValueError(
                f"The checkpoint {str(path)!r} holds Grokfast state for {name!r} made by filter={kinds!r}; this filter"
                f" is {config.filter!r}. Resume with the same `filter`, or start a new run from the model weights."
            )
        window = entry.get("ma_history")
        if config.uses_ma and window is not None and window[0] != config.window_size:
            raise ValueError(
                f"The checkpoint {str(path)!r} holds Grokfast state for {name!r} with window_size={window[0]}; this"
                f" filter has window_size={config.window_size}. Resume with the same `window_size`."
            )
    return [name for name in names if not saved.get(name)]
