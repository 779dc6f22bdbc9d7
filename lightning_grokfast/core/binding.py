"""One optimizer bound to one filter: which parameters are filtered, under which names, and their checkpoint link.

Shared by every entry point that filters an optimizer's gradients (``GrokfastCallback`` and ``attach_grokfast``):
they decide *when* to call :meth:`OptimizerBinding.step`; this module decides *which* gradients. Pure torch.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_grokfast.core.config import FilterConfig
from lightning_grokfast.core.filters import GradientFilter, ParamState, StepInfo
from lightning_grokfast.core.optim_state import STATE_PREFIX, OptimizerStateLink, unwrap_optimizer
from lightning_grokfast.core.sharding import check_saved_state, is_dtensor, local, saved_state

__all__ = ["OptimizerBinding", "ParamSelection"]

# id(parameter) -> the binding that filters it (a gradient must never be filtered twice). A live binding holds its
# parameters, so their ids cannot be reused while the entry exists.
_OWNERS: weakref.WeakValueDictionary[int, OptimizerBinding] = weakref.WeakValueDictionary()


class ParamSelection:
    """Which parameters a filter takes, by name: ``exclude`` patterns and per-pattern ``lamb`` factors.

    Args:
        exclude: compiled patterns; a parameter whose name matches any (``re.search``) is not filtered.
        lamb_scale: compiled ``(pattern, factor)`` pairs; the first match multiplies that parameter's amplification.

    Example::

        selection = ParamSelection([re.compile(r"bias$")], [(re.compile(r"^embed"), 0.5)])
        selection.takes("layer.bias")  # False
        selection.scales(["embed.weight", "head.weight"])  # {"embed.weight": 0.5}

    """

    def __init__(
        self, exclude: Sequence[re.Pattern[str]] = (), lamb_scale: Sequence[tuple[re.Pattern[str], float]] = ()
    ) -> None:
        self.exclude = list(exclude)
        self.lamb_scale = list(lamb_scale)

    def takes(self, name: str) -> bool:
        """Whether the parameter called ``name`` is filtered.

        Args:
            name: the parameter's name.

        Returns:
            ``False`` when an ``exclude`` pattern matches it.
        """
        return not any(p.search(name) for p in self.exclude)

    def scales(self, names: Sequence[str]) -> dict[str, float]:
        """The ``lamb`` factor of each name that a ``lamb_scale`` pattern matches (first match wins).

        Args:
            names: parameter names.

        Returns:
            ``{name: factor}`` for the matched names only.
        """
        out = {}
        for name in names:
            factor = next((f for p, f in self.lamb_scale if p.search(name)), None)
            if factor is not None:
                out[name] = factor
        return out


class OptimizerBinding:
    """The filtered parameters of one optimizer, their names, their filter and its checkpoint link.

    Parameters are de-duplicated by identity (a tied weight listed twice is filtered once), and the optimizer's
    parameter groups are re-read whenever their layout changes, so parameters added during training
    (``add_param_group``, e.g. by Lightning's ``BackboneFinetuning``) are filtered from their first gradient on.

    Args:
        optimizer: the optimizer (wrappers with ``.optimizer`` are unwrapped).
        config: the filter configuration (shared, not copied).
        names: parameter names by ``id(param)``; unnamed parameters are called ``{prefix}group{g}.param{j}``.
        selection: which parameters are taken and their ``lamb`` factors.
        prefix: prefix of the fallback names.
        owner: a description of who binds (used in error messages), e.g. ``"GrokfastCallback(filter='ema')"``.
        extras: passed to :class:`~lightning_grokfast.core.optim_state.OptimizerStateLink`.
        placeholders: build zero state for sharded parameters without state in ``state_dict()`` (load templates);
            default: the filter's fresh state for the local shard.
        resume_source: returns ``(checkpoint path, optimizer key)`` of a distributed checkpoint about to be loaded
            (or ``None``): its metadata is checked against this filter before a load template is built, so that a
            different ``filter``/``window_size`` fails with a clear error and parameters the checkpoint has no
            filter state for start afresh with a warning (instead of failing deep inside the loader).

    A binding *claims* its parameters when it first filters them (or when :meth:`claim` is called): a gradient
    claimed by two live bindings would be amplified twice, so that raises.

    Example::

        names = {id(p): n for n, p in model.named_parameters()}
        binding = OptimizerBinding(optimizer, FilterConfig("ema"), names=names)
        loss.backward()
        binding.step()  # filters the gradients present now
        optimizer.step()

    """

    def __init__(
        self,
        optimizer: Any,
        config: FilterConfig,
        *,
        names: Mapping[int, str] | None = None,
        selection: ParamSelection | None = None,
        prefix: str = "",
        owner: str = "a Grokfast filter",
        extras: tuple[Callable[[], dict[str, Any]], Callable[[Mapping[str, Any]], None]] | None = None,
        placeholders: Callable[[Tensor], ParamState | None] | None = None,
        resume_source: Callable[[], tuple[Any, str] | None] | None = None,
    ) -> None:
        self.optimizer = unwrap_optimizer(optimizer)
        self.filter = GradientFilter(config=config)
        self.selection = selection or ParamSelection()
        self.owner = owner
        self._names = dict(names or {})
        self._prefix = prefix
        self._layout: tuple[int, ...] = ()
        self.params: list[Tensor] = []
        self.names: tuple[str, ...] = ()
        self._claimed = False
        self.sharded = False
        self._resume_source = resume_source
        self._checked: dict[tuple[str, str], set[str] | None] = {}
        self._name_by_id: dict[int, str] = {}
        self.link = OptimizerStateLink(
            self.optimizer,
            self.filter,
            extras=extras,
            placeholders=placeholders or self._placeholder,
            before_access=self.refresh,
        )
        self.refresh()
        #: warn once when a step finds no gradient at all (entry points where that means a misplaced filter)
        self.warn_when_empty = False
        self._warned_empty = False

    def refresh(self, names: Mapping[int, str] | None = None) -> bool:
        """Re-read the optimizer's parameters if their layout changed (or new ``names`` are given).

        Args:
            names: new parameter names by ``id(param)`` (``None``: keep the current ones).

        Returns:
            Whether the filtered parameters changed.

        Raises:
            ValueError: If this binding has claimed its parameters and a newly seen one is claimed by another.

        """
        if names is not None:
            self._names = dict(names)
        layout = tuple(len(g["params"]) for g in self.optimizer.param_groups)
        if layout == self._layout and names is None:
            return False
        params: list[Tensor] = []
        param_names: list[str] = []
        seen: set[int] = set()
        for g, group in enumerate(self.optimizer.param_groups):
            for j, param in enumerate(group["params"]):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                name = self._names.get(id(param), f"{self._prefix}group{g}.param{j}")
                if self.selection.takes(name):
                    params.append(param)
                    param_names.append(name)
        if self._claimed:
            self._claim(params, param_names)
        self.sharded = any(is_dtensor(p) for p in params)
        if self.sharded and self.filter.config.orthogonal:
            raise ValueError(
                "`orthogonal=True` needs whole-tensor inner products, but these parameters are sharded (DTensor):"
                " ⊥Grad under FSDP2/tensor parallelism is not supported."
            )
        self._layout, self.params, self.names = layout, params, tuple(param_names)
        self._name_by_id = {id(p): n for p, n in zip(params, param_names)}
        self.filter.set_lamb_scales(self.selection.scales(param_names))
        self.link.track(self.names, self.params)
        return True

    def adopt(self) -> bool:
        """Take over filter state that ``optimizer.load_state_dict`` loaded before this binding existed.

        See :meth:`~lightning_grokfast.core.optim_state.OptimizerStateLink.adopt`.

        Returns:
            Whether any filter state was found and taken.

        Raises:
            ValueError: If that state was made by another filter kind or window size.

        """
        return self.link.adopt()

    def claim(self) -> None:
        """Mark the parameters as filtered by this binding (done by the first :meth:`step` at the latest).

        Raises:
            ValueError: If another binding filters one of them.

        """
        self._claim(self.params, list(self.names))
        self._claimed = True

    def _claim(self, params: list[Tensor], names: list[str]) -> None:
        owners = [(n, _OWNERS.get(id(p))) for n, p in zip(names, params)]
        clashes = [(n, o) for n, o in owners if o is not None and o is not self]
        if clashes:
            other = clashes[0][1]
            raise ValueError(
                f"{self.owner} and {other.owner} would both filter the gradients of {[n for n, _ in clashes][:5]}"
                f" (each gradient would be amplified twice). Give each filter a disjoint set of parameters, e.g. with"
                " `exclude` patterns."
            )
        for param in self.params:
            _OWNERS.pop(id(param), None)
        for param in params:
            _OWNERS[id(param)] = self

    def step(
        self, *, amplify: bool = True, found_inf: Tensor | None = None, compute_norms: bool = False
    ) -> StepInfo | None:
        """Filter the gradients present now (parameters without one are left alone, their state too).

        Args:
            amplify: add the slow part (``False``: only update the state, e.g. before ``start_step``).
            found_inf: the grad scaler's overflow verdict (0-dim tensor), replacing the filter's own finite check.
            compute_norms: fill the norms of the returned :class:`~lightning_grokfast.StepInfo`.

        Returns:
            The filter's :class:`~lightning_grokfast.StepInfo`, or ``None`` when no parameter has a gradient (with
            ``warn_when_empty``, warned once per binding, since a filter that never finds a gradient does nothing).

        Raises:
            ValueError: If another binding already filters one of these parameters.

        """
        self.refresh()
        if not self._claimed:
            self.claim()
        params, names = self.params, self.names
        grads = [p.grad for p in params]
        if self.sharded:  # the filter is element-wise: each rank filters its own shard, as plain tensors
            params = [local(p) for p in params]
            grads = [None if g is None else local(g) for g in grads]
        if any(g is None for g in grads):
            present = [i for i, g in enumerate(grads) if g is not None]
            if not present:
                self._warn_nothing_to_filter()
                return None
            params = [params[i] for i in present]
            names = tuple(names[i] for i in present)
            grads = [grads[i] for i in present]
        return self.filter.step(
            names,
            grads,  # type: ignore[arg-type]
            params=params if self.filter.config.orthogonal else None,
            amplify=amplify,
            found_inf=found_inf,
            compute_norms=compute_norms,
        )

    def _warn_nothing_to_filter(self) -> None:
        if self.warn_when_empty and not self._warned_empty and self.params:
            self._warned_empty = True
            warnings.warn(
                f"{self.owner}: the optimizer stepped, but none of its {len(self.params)} filtered parameters had a"
                " gradient, so this step was not filtered (gradients zeroed with set_to_none before the step, or"
                " computed after the filter ran). This is said once.",
                stacklevel=4,
            )

    def _placeholder(self, param: Tensor) -> ParamState | None:
        """Zero state for a sharded parameter's load template; ``None`` where the checkpoint being loaded has none."""
        if not self.filter.states and self._resume_source is not None:  # no state yet: this may be a load template
            allowed = self._names_with_saved_state()
            if allowed is not None and self._name_by_id.get(id(param)) not in allowed:
                return None
        return self.filter.empty_state(local(param))

    def _names_with_saved_state(self) -> set[str] | None:
        """The sharded parameters whose filter state the checkpoint about to be loaded holds (None: no such load)."""
        source = self._resume_source() if self._resume_source is not None else None
        if source is None or source[0] is None:
            return None
        key = (str(source[0]), source[1])
        if key not in self._checked:
            saved = saved_state(source[0], source[1], STATE_PREFIX)
            if saved is None:
                self._checked[key] = None
            else:
                names = [n for n, p in zip(self.names, self.params) if is_dtensor(p)]
                fresh = check_saved_state(saved, names, self.filter.config, source[0])
                if fresh:
                    warnings.warn(
                        f"The checkpoint {key[0]!r} holds no Grokfast state for {fresh[:5]}"
                        f"{' and others' if len(fresh) > 5 else ''} (saved without Grokfast or before it was"
                        " checkpointed under sharding): their filters start afresh.",
                        stacklevel=2,
                    )
                self._checked[key] = set(names) - set(fresh)
        return self._checked[key]

    def local_found_inf(self) -> Tensor:
        """Whether some gradient of this rank (its shard, if sharded) is not finite.

        Returns:
            A 0-dim tensor, 1.0 when a gradient is not finite, else 0.0 (summed over ranks by the caller).
        """
        return self.filter.local_found_inf([local(p.grad) for p in self.params if p.grad is not None])

    def release(self) -> None:
        """Remove the checkpoint hooks and give the parameters free for another filter."""
        self.link.remove()
        self.unclaim()

    def unclaim(self) -> None:
        """Give the parameters free for another filter (e.g. when training with this binding is over)."""
        self._claimed = False
        for param in self.params:
            if _OWNERS.get(id(param)) is self:
                del _OWNERS[id(param)]
