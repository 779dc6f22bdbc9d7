"""Grokfast gradient filters in pure PyTorch (no Lightning import).

A filter keeps, for every named gradient it sees, a low-pass ("slow") component of that gradient over optimizer
steps and adds it back, in place: ``g <- g + lamb * slow(g)``.

* ``"ema"``: ``slow <- alpha * slow + (1 - alpha) * g``, with ``slow`` starting at the first gradient.
* ``"ma"``: the mean (or sum) of the last ``window_size`` gradients, kept as a running sum over a ring buffer so
  each step costs the same whatever the window.
* ``"ema+ma"``: both, each computed from the raw gradient, each with its own amplification.
* ``"none"``: no slow component (only the gradient transforms, e.g. ``orthogonal``).

The state of each gradient is one :class:`ParamState` record. Work is grouped by device, dtype, amplification and
window position, and done with the foreach functions of :mod:`lightning_grokfast.core.ops`, one call per group. A step
whose gradients are not all finite is skipped whole, on every device alike: the state is unchanged, the window
does not advance, nothing is added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from lightning_grokfast.core import groups, ops
from lightning_grokfast.core.config import FILTER_NAMES, MA_AGGREGATIONS, FilterConfig, TunableSettings
from lightning_grokfast.core.groups import Group, Term
from lightning_grokfast.core.state import ParamState, StepInfo
from lightning_grokfast.core.validation import check_lamb

__all__ = ["FILTER_NAMES", "MA_AGGREGATIONS", "FilterConfig", "GradientFilter", "ParamState", "StepInfo"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STATE_FORMAT = 2
#: Momentum of the raw gradient's running norm that the divergence guard compares against.
GUARD_NORM_MOMENTUM = 0.99


class GradientFilter(TunableSettings):
    r"""Low-pass filter of gradients over optimizer steps, amplifying the slow part in place.

    Args:
        filter: ``"ema"``, ``"ma"``, ``"ema+ma"`` or ``"none"`` (see :class:`~lightning_grokfast.FilterConfig`).
        config: a :class:`~lightning_grokfast.FilterConfig` to share (then pass no other argument).
        **kwargs: the other fields of :class:`~lightning_grokfast.FilterConfig` (``alpha``, ``lamb``,
            ``window_size``, ``ma_lamb``, ``warmup``, ``filter_type``, ``normalize``, ``state_dtype``, ``resum_every``,
            ``check_finite``, ``orthogonal``, ``max_amplified_ratio``, ``compile``).

    Raises:
        ValueError: If an argument is out of its range, or both ``config`` and other arguments are given.

    Example::

        filt = GradientFilter("ema", alpha=0.98, lamb=2.0)
        loss.backward()
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        filt.step([n for n, _ in named], [p.grad for _, p in named])  # amplifies the gradients in place
        optimizer.step()

    """

    def __init__(self, filter: str | None = None, *, config: FilterConfig | None = None, **kwargs: Any) -> None:
        if config is not None:
            if filter is not None or kwargs:
                raise ValueError("Pass either `config` or the filter arguments to GradientFilter, not both.")
            self.config = config
        else:
            self.config = FilterConfig("ema" if filter is None else filter, **kwargs)
        self._states: dict[str, ParamState] = {}
        self._lamb_scales: dict[str, float] = {}
        self._plan_key: tuple[str, ...] | None = None
        self._plan: list[Group] = []
        self._guard_norm: Tensor | None = None
        self._scalars: dict[tuple[float, float, torch.device], tuple[Tensor, Tensor]] = {}
        self.steps = 0
        self.skipped_steps = 0

    # ------------------------------------------------------------------ settings (owned by the config)
    @property
    def filter(self) -> str:
        return self.config.filter

    @property
    def window_size(self) -> int:
        return self.config.window_size

    @property
    def uses_ema(self) -> bool:
        return self.config.uses_ema

    @property
    def uses_ma(self) -> bool:
        return self.config.uses_ma

    def set_lamb_scales(self, scales: Mapping[str, float]) -> None:
        """Multiply ``lamb`` by ``scales[name]`` for the named gradients (others: 1.0).

        Args:
            scales: ``{gradient name: factor >= 0}``; replaces the previous scales.

        Raises:
            ValueError: If a factor is negative or not finite.
        """
        self._lamb_scales = {name: check_lamb(scale, f"lamb scale of {name!r}") for name, scale in scales.items()}
        self._invalidate()

    # ------------------------------------------------------------------ plans
    def _invalidate(self) -> None:
        self._plan_key, self._plan = None, []

    def _state_dtype_for(self, grad: Tensor) -> torch.dtype:
        """``state_dtype`` for 16-bit gradients, and for every gradient when it is itself a 16-bit dtype."""
        dtype = self.config.state_dtype
        if isinstance(dtype, torch.dtype) and (grad.dtype in _LOW_PRECISION or dtype in _LOW_PRECISION):
            return dtype
        return grad.dtype

    def _plan_for(self, names: tuple[str, ...], grads: Sequence[Tensor]) -> list[Group]:
        """The groups for this list of names, rebuilt (in O(parameters)) only when the list changes."""
        if names is self._plan_key or names == self._plan_key:
            return self._plan
        by_key: dict[tuple[Any, ...], Group] = {}
        resum = self.config.resum_interval
        for pos, (name, grad) in enumerate(zip(names, grads)):
            if grad.is_sparse:
                raise ValueError(f"Sparse gradients are not supported (parameter {name!r}).")
            state = self._state_for(name, grad)
            scale = self._lamb_scales.get(name, 1.0)
            window = (state.ma_count, state.ma_index, state.ma_updates % resum) if self.uses_ma else None
            key = (grad.device, grad.dtype, scale, window)
            group = by_key.get(key)
            if group is None:
                group = by_key[key] = Group(grad.dtype, self._state_dtype_for(grad), scale, [], [])
            group.positions.append(pos)
            group.states.append(state)
        plan = list(by_key.values())
        for group in plan:
            group.ema = [s.ema for s in group.states if s.ema is not None]
            group.ma_sum = [s.ma_sum for s in group.states if s.ma_sum is not None]
            group.windows = [s.ma_history for s in group.states if s.ma_history is not None]
            group.ema_started = all(s.ema_started for s in group.states)
            group.tiled = groups.is_tiled(group, [grads[p] for p in group.positions])
        self._plan_key, self._plan = names, plan
        return plan

    def _state_for(self, name: str, grad: Tensor) -> ParamState:
        """The record of ``name``, created (zeros, not started) for a name seen for the first time.

        A record restored from a checkpoint made with another ``state_dtype`` is converted to this filter's (once,
        when the plan is built), so a run can switch to a bfloat16 state on resume.
        """
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = self.empty_state(grad)
        _check_state_fits(name, state, grad, self.config)
        dtype = self._state_dtype_for(grad)
        if state.ema is not None and state.ema.dtype != dtype:
            state.ema = state.ema.to(dtype)
        if state.ma_history is not None and state.ma_history.dtype != dtype:
            assert state.ma_sum is not None  # a window always has its running sum
            state.ma_history = state.ma_history.to(dtype)
            torch.sum(state.ma_history, dim=0, dtype=state.ma_sum.dtype, out=state.ma_sum)  # what the window keeps
        return state

    def empty_state(self, like: Tensor) -> ParamState:
        """A fresh record for a gradient shaped, placed and typed like ``like`` (nothing seen yet).

        Args:
            like: a gradient (or its parameter).

        Returns:
            The record, with zero tensors for the state this filter keeps.
        """
        state_dtype = self._state_dtype_for(like)
        state = ParamState()
        if self.uses_ema:
            state.ema = torch.zeros_like(like, dtype=state_dtype)
        if self.uses_ma:
            sum_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
            state.ma_history = like.new_zeros((self.window_size, *like.shape), dtype=state_dtype)
            state.ma_sum = torch.zeros_like(like, dtype=sum_dtype)
        return state

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(
        self,
        names: Sequence[str],
        grads: Sequence[Tensor],
        *,
        params: Sequence[Tensor] | None = None,
        amplify: bool = True,
        found_inf: Tensor | None = None,
        compute_norms: bool = False,
    ) -> StepInfo:
        """Update the state from ``grads`` and, if ``amplify``, add the slow part to them in place.

        Args:
            names: one stable name per gradient (the state is keyed by it).
            grads: the gradients, modified in place.
            params: the parameters of ``grads`` (needed by ``orthogonal``).
            amplify: add the slow part to the gradients (``False``: only update the state).
            found_inf: a verdict that is already known (e.g. from the AMP scaler): a tensor that is non-zero when
                some gradient is not finite. Without it the filter checks the gradients itself (``check_finite``).
            compute_norms: also return the norms of the raw gradient and of the slow component.

        Returns:
            A :class:`StepInfo`.

        Raises:
            ValueError: If ``names`` and ``grads`` (or ``params``) differ in length, a state does not match its
                gradient, or ``orthogonal`` is on and ``params`` is missing.

        Runs under ``torch.no_grad()``, as an optimizer step does: with ``orthogonal`` the gradients are combined
        with the parameters, which require grad, and autograd would otherwise chain every step's result (the
        gradient and the filter state) to the previous one, holding every step's tensors in memory.

        """
        if len(names) != len(grads) or (params is not None and len(params) != len(grads)):
            raise ValueError(
                f"Got {len(names)} names and {len(params or grads)} parameters for {len(grads)} gradients."
            )
        if self.config.orthogonal and params is None:
            raise ValueError("`orthogonal=True` needs the parameters: pass `params=` to GradientFilter.step.")
        if not grads:
            return StepInfo(finite=torch.ones((), dtype=torch.bool))
        plan = self._plan_for(tuple(names), grads)
        group_grads = [list(grads)] if len(plan) == 1 else [[grads[p] for p in g.positions] for g in plan]
        device = grads[0].device

        need_norms = compute_norms or self.config.max_amplified_ratio is not None
        if need_norms:
            raw_sq = [ops.squared_norms(gg) for gg in group_grads]
        elif self._checks_itself(found_inf):  # the norms' finiteness is the verdict: no need to square them
            raw_sq = [ops.norms(gg) for gg in group_grads]
        else:
            raw_sq = []
        finite = self._verdict(found_inf, raw_sq, device)
        grad_norm = ops.global_norm(raw_sq, device) if need_norms else None
        self.steps += 1
        if finite is not None and not bool(finite):  # one host read of a flag (free on CPU and under AMP)
            self.skipped_steps += 1
            return StepInfo(finite=finite, grad_norm=grad_norm if compute_norms else None)
        finite = finite if finite is not None else torch.ones((), dtype=torch.bool, device=device)

        if self.config.orthogonal and params is not None:
            group_params = [list(params)] if len(plan) == 1 else [[params[p] for p in g.positions] for g in plan]
            for gg, pp in zip(group_grads, group_params):
                ops.orthogonalize_(gg, pp)

        inline = amplify and self._adds_while_updating()
        terms = [self._update_state(group, gg, inline) for group, gg in zip(plan, group_grads)]
        slow_norm = groups.slow_norm(terms, device) if compute_norms else None
        guard = self._guard_scale(terms, grad_norm, device) if grad_norm is not None else None
        amplified = False
        if amplify:
            for gg, group_terms in zip(group_grads, terms):
                amplified |= self._amplify(gg, group_terms, guard)
        return StepInfo(
            finite=finite,
            grad_norm=grad_norm if compute_norms else None,
            slow_norm=slow_norm,
            amplified=amplified,
            guard_scale=guard if amplified else None,
        )

    def local_found_inf(self, grads: Sequence[Tensor]) -> Tensor:
        """Whether some of ``grads`` is not finite, as a float tensor (for an all-reduce across ranks).

        Args:
            grads: this rank's gradients (or shards).

        Returns:
            A 0-dim float tensor on the gradients' device: 1.0 when some element is not finite, else 0.0.
        """
        if not grads:
            return torch.zeros(())
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        device = grads[0].device
        finite = ops.all_finite([ops.squared_norms(g) for g in by_kind.values()], device)
        return (~finite).float()

    def _checks_itself(self, found_inf: Tensor | None) -> bool:
        return found_inf is None and self.config.check_finite

    def _verdict(self, found_inf: Tensor | None, raw_sq: list[Tensor], device: torch.device) -> Tensor | None:
        """0-dim bool tensor: all gradients finite (``None`` when nobody checks)."""
        if found_inf is not None:
            return (found_inf == 0).reshape(()).to(device)
        if self.config.check_finite:
            return ops.all_finite(raw_sq, device)
        return None

    def _adds_while_updating(self) -> bool:
        """Whether the slow term may be added to the gradients as the state is updated (one filter, added as is).

        Then ``compile=True`` runs the update and the addition as one compiled kernel, and a large CPU group runs
        them block by block (:func:`~lightning_grokfast.core.ops.ema_amplify_tiled_`).
        """
        config = self.config
        return config.filter in ("ema", "ma") and not config.normalize and config.max_amplified_ratio is None

    def _update_state(self, group: Group, grads: list[Tensor], inline: bool = False) -> list[Term]:
        """Advance the group's state with ``grads``; return the slow terms ``(tensors, coefficient)`` to add.

        With ``inline`` (and an EMA already started, or a full MA window) the term is added here: by the compiled
        fused kernel with ``compile=True``, else block by block for a large CPU group.
        """
        config = self.config
        lamb_ema, lamb_ma = config.amplifications(group.lamb_scale)
        fuse, tile = inline and config.compile, inline and not config.compile and group.tiled
        terms: list[Term] = []
        if config.uses_ema and (fuse or tile) and group.ema_started and lamb_ema != 0.0:
            if fuse:
                weight, coef = self._fused_scalars(1.0 - config.alpha, lamb_ema, grads[0].device)
                ops.compiled_ema_amplify()(group.ema, grads, weight, coef)
            else:
                ops.ema_amplify_tiled_(group.ema, grads, 1.0 - config.alpha, lamb_ema)
            terms.append(Term(group.ema, lamb_ema, 1.0, added=True))
        elif config.uses_ema:
            src = grads if group.state_dtype == group.grad_dtype else [g.to(group.state_dtype) for g in grads]
            if group.ema_started:
                ops.ema_update_(group.ema, src, 1.0 - config.alpha)
            else:  # the EMA of a new gradient starts at it
                fresh = [not s.ema_started for s in group.states]
                ops.ema_update_(group.ema, src, [1.0 if f else 1.0 - config.alpha for f in fresh])
                for state in group.states:
                    state.ema_started = True
                group.ema_started = True
            terms.append(Term(group.ema, lamb_ema, 1.0))
        if config.uses_ma:
            first = group.states[0]
            index, count = (first.ma_index + 1) % config.window_size, min(first.ma_count + 1, config.window_size)
            updates = first.ma_updates + 1
            resum = updates % config.resum_interval == 0
            added = not (config.warmup and count < config.window_size)
            unit = 1.0 / count if config.filter_type == "mean" else 1.0
            slot = group.slot(first.ma_index)
            add_now = (fuse or tile) and added and not resum and lamb_ma * unit != 0.0
            if add_now and fuse:
                ops.compiled_ma_amplify()(
                    group.ma_sum, slot, grads, self._fused_scalars(0.0, lamb_ma * unit, grads[0].device)[1]
                )
            elif add_now:
                ops.ma_amplify_tiled_(group.ma_sum, slot, grads, lamb_ma * unit)
            else:
                ops.ma_update_(group.ma_sum, slot, grads)
            for state in group.states:
                state.ma_index, state.ma_count, state.ma_updates = index, count, updates
            if resum:
                ops.ma_resum_(group.ma_sum, group.windows)
            if added:
                terms.append(Term(group.ma_sum, lamb_ma, unit, added=add_now))
        return terms

    def _fused_scalars(self, weight: float, coef: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """``weight`` and ``coef`` as 0-dim float32 tensors on ``device``, reused while their values stay the same."""
        key = (weight, coef, device)
        cached = self._scalars.get(key)
        if cached is None:
            if len(self._scalars) > 16:
                self._scalars.clear()
            cached = self._scalars[key] = (
                torch.tensor(weight, dtype=torch.float32, device=device),
                torch.tensor(coef, dtype=torch.float32, device=device),
            )
        return cached

    def _guard_scale(self, terms: list[list[Term]], grad_norm: Tensor, device: torch.device) -> Tensor | None:
        """Divergence guard: factor ``<= 1`` bounding the added term by ``ratio`` times the raw running norm."""
        ratio = self.config.max_amplified_ratio
        if ratio is None:
            return None
        running = self._guard_norm
        if running is None:
            running = grad_norm.detach().clone()
        else:  # (a resumed running norm arrives on the CPU)
            running = running.to(grad_norm.device).lerp_(grad_norm, 1 - GUARD_NORM_MOMENTUM)
        self._guard_norm = running
        added = groups.added_norm(terms, device)
        scale = (ratio * running / added.clamp_min(1e-30)).clamp(max=1.0)
        return torch.where(added.isfinite(), scale, torch.zeros_like(scale))

    def _amplify(self, grads: list[Tensor], terms: list[Term], guard: Tensor | None) -> bool:
        """``g <- (g + sum(lamb * unit * state)) / denominator``; returns whether anything was added."""
        if any(t.added for t in terms):
            return True
        active = [t for t in terms if t.coef != 0.0]
        if not active:
            return False
        denominator = 1.0
        if self.config.normalize:
            denominator = 1.0 + sum(t.lamb for t in active)
            torch._foreach_mul_(grads, 1.0 / denominator)
        for term in active:
            coef = term.coef / denominator
            if guard is None:
                ops.add_scaled_(grads, term.tensors, coef)
            else:
                ops.add_guarded_(grads, term.tensors, coef, guard)
        return True

    # ------------------------------------------------------------------ state
    @property
    def states(self) -> Mapping[str, ParamState]:
        """The state record of every name seen (read-only view; use :meth:`set_state` to change it)."""
        return MappingProxyType(self._states)

    def set_state(self, name: str, state: ParamState) -> None:
        """Replace the record of ``name`` (e.g. restored from a checkpoint).

        Args:
            name: the gradient's name.
            state: its new record.
        """
        self._states[name] = state
        self._invalidate()

    def drop_state(self, names: Sequence[str]) -> None:
        """Forget the records of ``names``.

        Args:
            names: the gradients' names; unknown names are ignored.
        """
        for name in names:
            self._states.pop(name, None)
        self._invalidate()

    def reset(self) -> None:
        """Forget all state (the next gradient starts the filters afresh)."""
        self._states.clear()
        self._guard_norm = None
        self._invalidate()
        self.steps = 0
        self.skipped_steps = 0

    @property
    def skipped_steps_for_logging(self) -> float:
        """Steps skipped for non-finite gradients, as a float."""
        return float(self.skipped_steps)

    @property
    def total_skipped_steps(self) -> int:
        """Steps whose gradients were not finite."""
        return self.skipped_steps

    def counters(self) -> dict[str, Any]:
        """Filter-wide counters as plain values (steps, skipped steps, the guard's running norm).

        Returns:
            The counters, for :meth:`load_counters`.
        """
        guard = None if self._guard_norm is None else float(self._guard_norm)
        return {"steps": self.steps, "skipped_steps": self.skipped_steps, "guard_norm": guard}

    def load_counters(self, counters: Mapping[str, Any]) -> None:
        """Restore what :meth:`counters` returned.

        Args:
            counters: the counters.
        """
        self.steps = int(counters.get("steps", 0))
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        guard = counters.get("guard_norm")
        self._guard_norm = None if guard is None else torch.tensor(float(guard))

    def state_dict(self) -> dict[str, Any]:
        """All state, keyed by gradient name; loads with ``torch.load(..., weights_only=True)``.

        Tensors are the live state (as ``torch.optim.Optimizer.state_dict`` does): save or copy it before further
        steps.

        Returns:
            The settings the state depends on, the counters and one entry per gradient name.
        """
        return {
            "format": _STATE_FORMAT,
            **self.config.structure(),
            **self.config.tunables(),
            **self.counters(),
            "params": {name: self._states[name].to_dict() for name in sorted(self._states)},
        }

    def load_state_dict(self, state: Mapping[str, Any], *, load_hyperparameters: bool = True) -> None:
        """Restore what :meth:`state_dict` returned (also the format of lightning-grokfast 0.1).

        Args:
            state: a dict from :meth:`state_dict`.
            load_hyperparameters: also restore ``alpha``, ``lamb`` and ``ma_lamb`` (they may have been changed
                during training, e.g. by the grokking detector).

        Raises:
            ValueError: If the state was saved by a different kind of filter or window size.

        """
        version = state.get("format")
        if version not in (1, _STATE_FORMAT):
            raise ValueError(f"Unknown Grokfast filter state format {version!r} (this release reads formats 1 and 2).")
        check_structure(state, self.config, "filter state")
        self.reset()
        if load_hyperparameters:
            self.alpha, self.lamb, self.ma_lamb = state["alpha"], state["lamb"], state["ma_lamb"]
        self.load_counters(state)
        for name, entry in state["params"].items():
            record = ParamState.from_dict(entry)
            if version == 1 and record.ma_sum is not None:  # 0.1 kept no update count; its re-sum followed `steps`
                record.ma_updates = self.steps
            self._states[name] = record

    def state_names(self) -> set[str]:
        """Names that have filter state.

        Returns:
            The names.
        """
        return set(self._states)

    def place(self, devices: Mapping[str, torch.device]) -> GradientFilter:
        """Move each named state to the given device (e.g. its parameter's, after loading a checkpoint).

        Args:
            devices: ``{gradient name: device}``; names without state are ignored.

        Returns:
            This filter.
        """
        for name, device in devices.items():
            if name in self._states:
                self._states[name] = self._states[name].to(device)
        self._invalidate()
        return self

    def state_bytes(self) -> int:
        """Bytes of tensor state currently held.

        Returns:
            The sum of ``numel * element_size`` over every state tensor.
        """
        return sum(t.numel() * t.element_size() for s in self._states.values() for t in s.tensors())


def check_structure(saved: Mapping[str, Any], config: FilterConfig, what: str) -> None:
    """Raise if state saved as ``saved`` (with ``filter`` and ``window_size`` keys) cannot serve ``config``.

    Raises:
        ValueError: If the filter kind or (for a moving average) the window size differ.

    """
    if saved["filter"] != config.filter:
        raise ValueError(f"The {what} was saved by filter={saved['filter']!r}, this filter is {config.filter!r}.")
    if config.uses_ma and saved.get("window_size") != config.window_size:
        raise ValueError(
            f"The {what} was saved with window_size={saved.get('window_size')}, this filter has {config.window_size}."
        )


def _check_state_fits(name: str, state: ParamState, grad: Tensor, config: FilterConfig) -> None:
    tensors = [t for t in (state.ema, state.ma_sum) if t is not None]
    if any(t.shape != grad.shape or t.device != grad.device for t in tensors):
        t = tensors[0]
        raise ValueError(
            f"Filter state for {name!r} has shape {tuple(t.shape)} on {t.device}, but its gradient has shape"
            f" {tuple(grad.shape)} on {grad.device}. Was the state loaded for a different model?"
        )
    if (state.ema is None) == config.uses_ema or (state.ma_sum is None) == config.uses_ma:
        raise ValueError(f"Filter state for {name!r} was made by another kind of filter than {config.filter!r}.")
