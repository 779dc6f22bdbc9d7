"""The filter state inside ``optimizer.state_dict()``: per parameter, beside the optimizer's own state.

Whatever checkpoints the optimizer then checkpoints the filter: ``torch.save(optimizer.state_dict())`` in a plain
loop, Fabric's and Lightning's checkpoints, and (because every entry is keyed by its parameter) the sharded
checkpoints of FSDP2, where each rank writes and reads only its own shard.

Two torch hooks do the work, so the optimizer's live state is never touched:

* a ``state_dict`` post-hook copies each filtered parameter's entry dict and adds the filter's tensors under
  ``grokfast_*`` keys (live tensors, as the optimizer's own state is);
* a ``load_state_dict`` pre-hook takes those keys out again *before* torch casts floating state to the
  parameter's dtype (a float32 EMA of a bfloat16 parameter stays float32) and hands them to the filter.

The optimizer's own per-parameter dicts never receive a ``grokfast_*`` key, so optimizers that initialise their
state only when it is empty (``torch.optim.Adam`` does) are unaffected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_grokfast.core.filters import GradientFilter, ParamState
from lightning_grokfast.core.sharding import is_dtensor, to_global, to_local

__all__ = ["STATE_PREFIX", "OptimizerStateLink", "RoundedStateWarning", "param_index_map", "unwrap_optimizer"]

#: Prefix of the filter's keys in an optimizer state entry.
STATE_PREFIX = "grokfast_"


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` inside wrappers that keep it as ``.optimizer``.

    Lightning's ``LightningOptimizer``, Fabric's optimizer and Accelerate's ``AcceleratedOptimizer`` are such wrappers.

    Args:
        optimizer: an optimizer or a wrapper of one (nested up to 8 levels).

    Returns:
        The innermost ``torch.optim.Optimizer``.

    Raises:
        ValueError: If no ``torch.optim.Optimizer`` is found.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.optim_state import unwrap_optimizer
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> unwrap_optimizer(optimizer) is optimizer
        True
    """
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"`optimizer` must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}.")
    return optimizer


def param_index_map(
    param_groups: Sequence[Mapping[str, Any]], saved_groups: Sequence[Mapping[str, Any]]
) -> Iterator[tuple[Any, Tensor]]:
    """Pairs ``(saved index, parameter)`` in torch's order: saved group ``i``'s ``params`` list against group ``i``.

    Args:
        param_groups: the optimizer's live parameter groups.
        saved_groups: the ``param_groups`` of a state dict (parameters as indices).

    Returns:
        An iterator of ``(index in the state dict, parameter)``.

    Example::

        >>> import torch
        >>> from lightning_grokfast.core.optim_state import param_index_map
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> optimizer = torch.optim.SGD([w], lr=0.1)
        >>> [(i, p is w) for i, p in param_index_map(optimizer.param_groups, optimizer.state_dict()["param_groups"])]
        [(0, True)]
    """
    for group, saved in zip(param_groups, saved_groups):
        yield from zip(saved["params"], group["params"])


class RoundedStateWarning(UserWarning):
    """The filter adopted state that ``optimizer.load_state_dict`` had cast to 16-bit parameters' dtype.

    Args:
        dtype: the parameters' dtype the state was rounded to (``"bfloat16"`` or ``"float16"``).
        advice: how to resume exactly in the caller's setting.

    Example::

        import warnings

        with warnings.catch_warnings(record=True) as caught:
            handle = attach_grokfast(optimizer)  # after optimizer.load_state_dict(saved), bf16 parameters
        rounded = [w for w in caught if issubclass(w.category, RoundedStateWarning)]

    """

    def __init__(self, dtype: str, advice: str = "Attach first, then load, to resume exactly.") -> None:
        self.dtype = dtype
        super().__init__(
            f"optimizer.load_state_dict() ran before the Grokfast filter was attached and cast its state to the"
            f" parameters' dtype ({dtype}): the filter resumes from that rounded state. {advice}"
        )


class OptimizerStateLink:
    """Keeps one :class:`~lightning_grokfast.GradientFilter`'s state in an optimizer's ``state_dict``.

    Args:
        optimizer: the optimizer (wrappers with ``.optimizer`` are unwrapped).
        filter: the filter whose state travels.
        extras: optional pair ``(get, set)`` of callables for filter-wide plain values stored under the top-level
            key ``"grokfast"`` of the state dict (``attach_grokfast`` keeps its counters there; the Lightning
            callback keeps them in its own callback state instead).
        placeholders: build a zero record for a sharded (DTensor) parameter that has no state yet, so that a load
            template (``torch.distributed.checkpoint``'s) has the right entries to fill; it may return ``None`` to leave
            a parameter out (the checkpoint being loaded has no state for it). ``None``: no placeholders.
        before_access: called first in both hooks (the owner re-reads the optimizer's parameters there, e.g. after
            another callback re-added parameter groups just before a checkpoint is loaded).

    Example::

        >>> import torch
        >>> from lightning_grokfast import GradientFilter
        >>> from lightning_grokfast.core.optim_state import OptimizerStateLink
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> optimizer, filt = torch.optim.SGD([w], lr=0.1), GradientFilter("ema")
        >>> link = OptimizerStateLink(optimizer, filt)
        >>> link.track(["w"], [w])
        >>> _ = filt.step(["w"], [torch.ones(2)])
        >>> sorted(k for k in optimizer.state_dict()["state"][0] if k.startswith("grokfast"))  # doctest: +ELLIPSIS
        ['grokfast_ema', ...]
    """

    def __init__(
        self,
        optimizer: Any,
        filter: GradientFilter,
        *,
        extras: tuple[Callable[[], dict[str, Any]], Callable[[Mapping[str, Any]], None]] | None = None,
        placeholders: Callable[[Tensor], ParamState | None] | None = None,
        before_access: Callable[[], Any] | None = None,
    ) -> None:
        self.optimizer = unwrap_optimizer(optimizer)
        self._before_access = before_access
        self.filter = filter
        self._extras = extras
        self._placeholders = placeholders
        self._names: dict[int, str] = {}
        self._params: dict[int, Tensor] = {}
        self._handles = [
            self.optimizer.register_state_dict_post_hook(self._on_state_dict),
            self.optimizer.register_load_state_dict_pre_hook(self._on_load_state_dict),
        ]

    def track(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        """Declare the filtered parameters and the names their filter state is keyed by (replaces the last call).

        Args:
            names: one name per parameter.
            params: the parameters, in the order of ``names``.
        """
        self._names = {id(p): n for n, p in zip(names, params)}
        self._params = {id(p): p for p in params}

    def remove(self) -> None:
        """Detach the hooks (the optimizer's state dicts no longer carry the filter state)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def adopt(self) -> bool:
        """Take over filter state that ``optimizer.load_state_dict`` loaded before this link existed.

        A script that rebuilds its optimizer loads the saved state first and attaches the filter after (the Hugging
        Face Trainer does the same: it restores ``optimizer.pt`` before any callback sees the optimizer). Torch then
        keeps the filter's ``grokfast_*`` entries in ``optimizer.state`` and its counters in the first parameter
        group; this moves them into the filter, exactly as the load pre-hook would have, and leaves the optimizer's
        own state as if the filter had been attached before the load.

        Returns:
            Whether any filter state was found and taken.

        Raises:
            ValueError: If the loaded state was made by another filter kind, window size or parameter shape (the
                same error as a load after attaching).

        """
        optimizer = self.optimizer
        index_of: dict[int, int] = {}
        params_by_index: dict[int, Tensor] = {}
        groups: list[dict[str, Any]] = []
        for group in optimizer.param_groups:
            indices = []
            for param in group["params"]:
                if id(param) not in index_of:
                    index_of[id(param)] = len(index_of)
                    params_by_index[index_of[id(param)]] = param
                indices.append(index_of[id(param)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
        state = {
            index_of[id(param)]: dict(entry)
            for param, entry in optimizer.state.items()
            if id(param) in index_of and any(str(k).startswith(STATE_PREFIX) for k in entry)
        }
        if not state and not any("grokfast" in g for g in groups):
            return False
        rounded = [n for n in (self._widen(params_by_index[i], e) for i, e in state.items()) if n is not None]
        if rounded:
            warnings.warn(RoundedStateWarning(rounded[0]), stacklevel=3)
        stripped = self._on_load_state_dict(optimizer, {"state": state, "param_groups": groups})
        for index in state:
            param = params_by_index[index]
            rest = stripped["state"].get(index)
            if rest:
                optimizer.state[param] = rest
            else:  # the optimizer had no state of its own yet: leave it empty, so it initialises as usual
                del optimizer.state[param]
        for group in optimizer.param_groups:
            group.pop("grokfast", None)
        return True

    def _widen(self, param: Tensor, entry: dict[str, Any]) -> str | None:
        """Undo the dtype of torch's cast of loaded state to a 16-bit parameter (the values stay rounded).

        Returns the parameter's dtype when the entry was narrowed, else ``None``.
        """
        if param.dtype not in (torch.float16, torch.bfloat16):
            return None
        wide = self.filter.config.state_dtype
        targets = {"ma_sum": torch.float32}
        if isinstance(wide, torch.dtype) and wide.itemsize > param.element_size():
            targets.update({"ema": wide, "ma_history": wide})
        narrowed = False
        for key, dtype in targets.items():
            value = entry.get(STATE_PREFIX + key)
            if isinstance(value, Tensor) and value.dtype != dtype:
                entry[STATE_PREFIX + key] = value.to(dtype)
                narrowed = True
        return str(param.dtype).removeprefix("torch.") if narrowed else None

    # ------------------------------------------------------------------ hooks
    def _on_state_dict(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._before_access is not None:
            self._before_access()
        states = self.filter.states
        for index, param in param_index_map(optimizer.param_groups, state_dict["param_groups"]):
            name = self._names.get(id(param))
            if name is None:
                continue
            record = states.get(name)
            sharded = is_dtensor(param)
            if record is None and sharded and self._placeholders is not None:
                record = self._placeholders(param)  # a load template needs every entry it will be filled with
            if record is None:
                continue
            if sharded:
                record = to_global(record, param)
            entry = dict(state_dict["state"].get(index, {}))
            entry.update({STATE_PREFIX + key: value for key, value in record.to_dict().items()})
            state_dict["state"][index] = entry
        if self._extras is not None:
            extras = self._extras[0]()
            state_dict["grokfast"] = extras
            if state_dict["param_groups"]:
                # A copy in the first group: torch.distributed.checkpoint's get_optimizer_state_dict keeps only
                # "state" and "param_groups", and a plain load_state_dict before the filter is attached keeps a
                # group's extra keys (and drops top-level ones), so adopt() finds the counters there.
                state_dict["param_groups"][0] = {**state_dict["param_groups"][0], "grokfast": extras}
        return state_dict

    def _on_load_state_dict(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._before_access is not None:
            self._before_access()
        by_index = dict(param_index_map(optimizer.param_groups, state_dict["param_groups"]))
        state: dict[Any, Any] = {}
        loaded: dict[str, ParamState] = {}
        for index, entry in state_dict["state"].items():
            param = by_index.get(index)
            name = None if param is None else self._names.get(id(param))
            ours = {k.removeprefix(STATE_PREFIX): v for k, v in entry.items() if k.startswith(STATE_PREFIX)}
            if name is None or not ours:
                state[index] = entry
                continue
            assert param is not None
            loaded[name] = _placed(ParamState.from_dict(ours), param, name, self.filter)
            rest = {k: v for k, v in entry.items() if not k.startswith(STATE_PREFIX)}
            if rest:
                state[index] = rest
        if loaded:  # a checkpoint without filter state (0.1, or written without Grokfast) leaves the filter alone
            self.filter.drop_state(list(self._names.values()))
        for name, record in loaded.items():
            self.filter.set_state(name, record)
        groups = state_dict.get("param_groups", [])
        in_groups = [g["grokfast"] for g in groups if "grokfast" in g]  # sharded: see _on_state_dict
        extras = state_dict.get("grokfast", in_groups[0] if in_groups else None)
        if self._extras is not None and extras is not None:
            self._extras[1](extras)
        out = {k: v for k, v in state_dict.items() if k != "grokfast"}
        out["state"] = state
        if in_groups:  # never into the optimizer's live param_groups
            out["param_groups"] = [{k: v for k, v in g.items() if k != "grokfast"} for g in groups]
        return out


def _placed(record: ParamState, param: Tensor, name: str, filt: GradientFilter) -> ParamState:
    """The loaded record on its parameter's device, checked against the filter's kind and window."""
    config = filt.config
    if (record.ema is not None) != config.uses_ema or (record.ma_sum is not None) != config.uses_ma:
        saved = "+".join(k for k, t in (("ema", record.ema), ("ma", record.ma_sum)) if t is not None) or "none"
        raise ValueError(
            f"The checkpoint's Grokfast state for {name!r} was made by filter={saved!r}; this filter is"
            f" {config.filter!r}. Resume with the same `filter`, or start the filter afresh without the checkpoint."
        )
    if record.ma_history is not None and record.ma_history.shape[0] != config.window_size:
        raise ValueError(
            f"The checkpoint's Grokfast state for {name!r} has window_size={record.ma_history.shape[0]}; this filter"
            f" has window_size={config.window_size}."
        )
    if record.shape() != tuple(param.shape):
        raise ValueError(
            f"The checkpoint's Grokfast state for {name!r} has shape {record.shape()},"
            f" its parameter {tuple(param.shape)}."
        )
    if is_dtensor(param):  # DCP has already resharded the state to this run's layout
        record = to_local(record)
        param = param.to_local()  # type: ignore[attr-defined]
    return record if _on_device(record, param.device) else record.to(param.device)


def _on_device(record: ParamState, device: torch.device) -> bool:
    return all(t.device == device for t in record.tensors())
