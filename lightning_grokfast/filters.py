"""Grokfast gradient filters in pure PyTorch (no Lightning import).

A filter keeps, for every named gradient it sees, a low-pass ("slow") component of that gradient over
optimizer steps and adds it back, in place: ``g <- g + lamb * slow(g)``.

* ``"ema"``: ``slow <- alpha * slow + (1 - alpha) * g``, with ``slow`` starting at the first gradient.
* ``"ma"``: the mean (or sum) of the last ``window_size`` gradients, kept as a running sum over a ring
  buffer so each step costs the same whatever the window.
* ``"ema+ma"``: both, each computed from the raw gradient, each with its own amplification.

Work is grouped by device, dtype and amplification and done with one ``torch._foreach_*`` call per group.
Non-finite gradients never enter the state: on CPU the step is skipped in Python (reading a CPU tensor is
no device synchronization); on accelerators a synchronization-free ``torch.where`` path keeps the state
unchanged instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_grokfast.validation import check_alpha, check_int, check_lamb, resolve_state_dtype

FILTER_NAMES = ("ema", "ma", "ema+ma")
MA_AGGREGATIONS = ("mean", "sum")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STATE_FORMAT = 1


@dataclass
class StepInfo:
    """What one filter step saw. Tensors stay on their device; nothing here forces a synchronization.

    Attributes:
        finite: 0-dim bool tensor, ``True`` when every gradient was finite and the state was updated.
        grad_norm: L2 norm of the raw gradients, or ``None`` when it was not asked for.
        slow_norm: L2 norm of the slow component that was (or would have been) added, before ``lamb``.
        amplified: whether the slow component was added to the gradients.

    """

    finite: Tensor
    grad_norm: Tensor | None = None
    slow_norm: Tensor | None = None
    amplified: bool = False


@dataclass
class _Term:
    """A slow term added to the gradients: ``lamb * unit * tensors`` (``unit`` is 1/count for an MA mean)."""

    tensors: list[Tensor]
    unit: float
    lamb: float


@dataclass
class _Group:
    """Gradients of one device, dtype and lamb scale, with their state tensors in the same order."""

    device: torch.device
    grad_dtype: torch.dtype
    state_dtype: torch.dtype
    lamb_scale: float
    positions: list[int]
    names: list[str]
    ema: list[Tensor] = field(default_factory=list)
    ema_weights: list[float] | None = None  # 1.0 for parameters seen for the first time
    ma_sum: list[Tensor] = field(default_factory=list)
    ma_slots: list[list[Tensor]] = field(default_factory=list)  # slot-major ring buffer of views
    ma_count: int = 0
    ma_index: int = 0


class GradientFilter:
    r"""Low-pass filter of gradients over optimizer steps, amplifying the slow part in place.

    Args:
        filter: ``"ema"``, ``"ma"`` (windowed moving average) or ``"ema+ma"`` (both).
        alpha: EMA momentum in ``[0, 1)``; ``slow <- alpha * slow + (1 - alpha) * g``.
        lamb: amplification of the EMA (``"ema"``, ``"ema+ma"``) or of the MA (``"ma"``), ``>= 0``.
        window_size: number of past gradients in the moving average, ``>= 1``.
        ma_lamb: amplification of the MA term with ``filter="ema+ma"``, ``>= 0`` (default 5.0).
        warmup: with a moving average, add nothing until the window is full (as in the reference).
        filter_type: ``"mean"`` or ``"sum"`` of the window.
        normalize: divide the amplified gradient by ``1 + lamb`` (``1 + lamb + ma_lamb`` for both), so the
            update keeps the size of the unfiltered one.
        state_dtype: dtype of the state for float16/bfloat16 gradients (``None``: the gradient's dtype).
            Gradients of other dtypes keep state in their own dtype.
        resum_every: recompute the moving-average running sum from its window every this many steps, so
            rounding drift cannot build up. Default ``10 * window_size``.

    Raises:
        ValueError: If an argument is out of its range.

    Example::

        filt = GradientFilter("ema", alpha=0.98, lamb=2.0)
        loss.backward()
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        filt.step([n for n, _ in named], [p.grad for _, p in named])  # amplifies the gradients in place
        optimizer.step()

    """

    def __init__(
        self,
        filter: str = "ema",
        *,
        alpha: float = 0.98,
        lamb: float = 2.0,
        window_size: int = 100,
        ma_lamb: float = 5.0,
        warmup: bool = True,
        filter_type: str = "mean",
        normalize: bool = False,
        state_dtype: str | torch.dtype | None = torch.float32,
        resum_every: int | None = None,
    ) -> None:
        if filter not in FILTER_NAMES:
            raise ValueError(f"`filter` must be one of {FILTER_NAMES}, got {filter!r}.")
        if filter_type not in MA_AGGREGATIONS:
            raise ValueError(f"`filter_type` must be one of {MA_AGGREGATIONS}, got {filter_type!r}.")
        self.filter = filter
        self.alpha = alpha
        self.lamb = lamb
        self.ma_lamb = ma_lamb
        self.window_size = check_int(window_size, "window_size", low=1)
        self.warmup = bool(warmup)
        self.filter_type = filter_type
        self.normalize = bool(normalize)
        self.state_dtype = resolve_state_dtype(state_dtype)
        self.resum_every = check_int(resum_every, "resum_every", low=1) if resum_every is not None else 10 * window_size
        #: Use the synchronization-free ``torch.where`` path (``None``: only for tensors not on the CPU).
        self.sync_free: bool | None = None
        self._lamb_scales: dict[str, float] = {}
        self._ema: dict[str, Tensor] = {}
        self._ema_started: set[str] = set()
        self._ma_history: dict[str, Tensor] = {}
        self._ma_sum: dict[str, Tensor] = {}
        self._ma_count: dict[str, int] = {}
        self._ma_index: dict[str, int] = {}
        self._plan_key: tuple[str, ...] | None = None
        self._plan: list[_Group] = []
        self.steps = 0
        self.skipped_steps = 0
        self._skipped_on_device: Tensor | None = None

    # ------------------------------------------------------------------ settings
    @property
    def uses_ema(self) -> bool:
        return self.filter in ("ema", "ema+ma")

    @property
    def uses_ma(self) -> bool:
        return self.filter in ("ma", "ema+ma")

    @property
    def alpha(self) -> float:
        """EMA momentum; may be changed between steps."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_alpha(value)

    @property
    def lamb(self) -> float:
        """Amplification of the EMA (or of the MA with ``filter="ma"``); may be changed between steps."""
        return self._lamb

    @lamb.setter
    def lamb(self, value: float) -> None:
        self._lamb = check_lamb(value)

    @property
    def ma_lamb(self) -> float:
        """Amplification of the MA term with ``filter="ema+ma"``."""
        return self._ma_lamb

    @ma_lamb.setter
    def ma_lamb(self, value: float) -> None:
        self._ma_lamb = check_lamb(value, "ma_lamb")

    def set_lamb_scales(self, scales: dict[str, float]) -> None:
        """Multiply ``lamb`` by ``scales[name]`` for the named gradients (others: 1.0)."""
        for name, scale in scales.items():
            check_lamb(scale, f"lamb scale of {name!r}")
        self._flush()
        self._lamb_scales = dict(scales)

    def _amplifications(self, group: _Group) -> tuple[float, float]:
        """The (EMA, MA) multipliers of the slow terms for this group, before normalization."""
        if self.filter == "ema":
            return self._lamb * group.lamb_scale, 0.0
        if self.filter == "ma":
            return 0.0, self._lamb * group.lamb_scale
        return self._lamb * group.lamb_scale, self._ma_lamb * group.lamb_scale

    # ------------------------------------------------------------------ plans
    def _state_dtype_for(self, grad: Tensor) -> torch.dtype:
        if self.state_dtype is not None and grad.dtype in _LOW_PRECISION:
            return self.state_dtype
        return grad.dtype

    def _plan_for(self, names: tuple[str, ...], grads: Sequence[Tensor]) -> list[_Group]:
        """The groups for this set of names, rebuilt only when the set changes."""
        if names is self._plan_key or names == self._plan_key:
            return self._plan
        self._flush()
        by_key: dict[tuple[Any, ...], _Group] = {}
        for pos, (name, grad) in enumerate(zip(names, grads)):
            scale = self._lamb_scales.get(name, 1.0)
            state_dtype = self._state_dtype_for(grad)
            ma_key = (self._ma_count.get(name, 0), self._ma_index.get(name, 0)) if self.uses_ma else None
            key = (grad.device, grad.dtype, state_dtype, scale, ma_key)
            group = by_key.get(key)
            if group is None:
                group = by_key[key] = _Group(grad.device, grad.dtype, state_dtype, scale, [], [])
                if ma_key is not None:
                    group.ma_count, group.ma_index = ma_key
            group.positions.append(pos)
            group.names.append(name)
        plan = list(by_key.values())
        for group in plan:
            self._bind_state(group, [grads[p] for p in group.positions])
        self._plan_key, self._plan = names, plan
        return plan

    def _bind_state(self, group: _Group, grads: list[Tensor]) -> None:
        """Point the group's lists at the per-name state tensors, creating them for new names."""
        fresh = []
        for name, grad in zip(group.names, grads):
            if grad.is_sparse:
                raise ValueError(f"Sparse gradients are not supported (parameter {name!r}).")
            if self.uses_ema:
                slow = self._ema.get(name)
                fresh.append(name not in self._ema_started)
                if slow is None:
                    slow = self._ema[name] = torch.zeros_like(grad, dtype=group.state_dtype)
                self._check_shape(name, slow, grad)
                group.ema.append(slow)
            if self.uses_ma:
                history = self._ma_history.get(name)
                if history is None:
                    history = torch.zeros((self.window_size, *grad.shape), dtype=group.state_dtype, device=grad.device)
                    self._ma_history[name] = history
                    self._ma_sum[name] = torch.zeros_like(grad, dtype=group.state_dtype)
                self._check_shape(name, history[0], grad)
                group.ma_sum.append(self._ma_sum[name])
        if self.uses_ema and any(fresh):
            group.ema_weights = [1.0 if is_new else 1.0 - self._alpha for is_new in fresh]
        if self.uses_ma:
            histories = [self._ma_history[name] for name in group.names]
            group.ma_slots = [[h[k] for h in histories] for k in range(self.window_size)]

    @staticmethod
    def _check_shape(name: str, state: Tensor, grad: Tensor) -> None:
        if state.shape != grad.shape or state.device != grad.device:
            raise ValueError(
                f"Filter state for {name!r} has shape {tuple(state.shape)} on {state.device}, but its gradient has"
                f" shape {tuple(grad.shape)} on {grad.device}. Was the state loaded for a different model?"
            )

    def _flush(self) -> None:
        """Write the per-group moving-average counters back to their names and drop the plan."""
        if self.uses_ma:
            for group in self._plan:
                for name in group.names:
                    self._ma_count[name] = group.ma_count
                    self._ma_index[name] = group.ma_index
        self._plan_key, self._plan = None, []

    # ------------------------------------------------------------------ the step
    def step(
        self,
        names: Sequence[str],
        grads: Sequence[Tensor],
        *,
        amplify: bool = True,
        found_inf: Tensor | None = None,
        compute_norms: bool = False,
    ) -> StepInfo:
        """Update the state from ``grads`` and, if ``amplify``, add the slow part to them in place.

        Args:
            names: one stable name per gradient (the state is keyed by it).
            grads: the gradients, modified in place.
            amplify: add the slow part to the gradients (``False``: only update the state).
            found_inf: a verdict that is already known (e.g. from the AMP scaler): a tensor that is non-zero
                when some gradient is not finite. Without it the filter checks the gradients itself.
            compute_norms: also return the norms of the raw gradient and of the slow component.

        Returns:
            A :class:`StepInfo`.

        Raises:
            ValueError: If ``names`` and ``grads`` differ in length or a state does not match its gradient.

        """
        if len(names) != len(grads):
            raise ValueError(f"Got {len(names)} names for {len(grads)} gradients.")
        if not grads:
            return StepInfo(finite=torch.ones((), dtype=torch.bool))
        plan = self._plan_for(tuple(names), grads)
        group_grads = [list(grads)] if len(plan) == 1 else [[grads[p] for p in group.positions] for group in plan]

        raw_norms = None
        if found_inf is None or compute_norms:
            raw_norms = [self._norm(g, group) for g, group in zip(group_grads, plan)]
        finite = (found_inf == 0).reshape(()) if found_inf is not None else _all_finite(raw_norms)
        grad_norm = _global_norm(raw_norms, finite.device) if compute_norms else None

        sync_free = self.sync_free if self.sync_free is not None else any(g.device.type != "cpu" for g in grads)
        self.steps += 1
        if sync_free:
            skipped = (~finite).to(torch.int64)
            self._skipped_on_device = skipped if self._skipped_on_device is None else self._skipped_on_device + skipped
            where_finite = finite
        else:
            if not bool(finite):  # a CPU tensor: reading it synchronizes nothing
                self.skipped_steps += 1
                return StepInfo(finite=finite, grad_norm=grad_norm)
            where_finite = None

        slow_sq = []
        amplified = False
        for group, grads_of_group in zip(plan, group_grads):
            same_dtype = group.state_dtype == group.grad_dtype
            src = grads_of_group if same_dtype else [g.to(group.state_dtype) for g in grads_of_group]
            terms = self._update_state(group, src, where_finite)
            if compute_norms:
                slow_sq.append(_slow_norm_sq(terms, finite.device))
            if amplify and terms:
                self._amplify(grads_of_group, terms, same_dtype)
                amplified = True
        slow_norm = torch.stack(slow_sq).sum().sqrt() if slow_sq else None
        return StepInfo(finite=finite, grad_norm=grad_norm, slow_norm=slow_norm, amplified=amplified)

    @staticmethod
    def _norm(grads: list[Tensor], group: _Group) -> Tensor:
        if group.grad_dtype in _LOW_PRECISION:
            norms = torch._foreach_norm(grads, dtype=torch.float32)
        else:
            norms = torch._foreach_norm(grads)
        return torch.linalg.vector_norm(torch.stack(norms))

    def _update_state(self, group: _Group, src: list[Tensor], finite: Tensor | None) -> list[_Term]:
        """Advance the state with ``src``; return the slow terms to add to the gradients."""
        lamb_ema, lamb_ma = self._amplifications(group)
        terms = []
        if self.uses_ema:
            safe = src if finite is None else [torch.where(finite, g, s) for g, s in zip(src, group.ema)]
            if group.ema_weights is not None:  # first gradient of some names: the EMA starts at it
                torch._foreach_lerp_(group.ema, safe, group.ema_weights)
                group.ema_weights = None
                self._ema_started.update(group.names)
            else:
                torch._foreach_lerp_(group.ema, safe, 1.0 - self._alpha)
            terms.append(_Term(group.ema, 1.0, lamb_ema))
        if self.uses_ma:
            oldest = group.ma_slots[group.ma_index]
            if finite is None:
                torch._foreach_sub_(group.ma_sum, oldest)
                torch._foreach_add_(group.ma_sum, src)
                torch._foreach_copy_(oldest, src)
            else:  # a skipped step adds an exact zero and rewrites the slot with itself
                safe = [torch.where(finite, g, o) for g, o in zip(src, oldest)]
                torch._foreach_add_(group.ma_sum, torch._foreach_sub(safe, oldest))
                torch._foreach_copy_(oldest, safe)
            group.ma_index = (group.ma_index + 1) % self.window_size
            group.ma_count = min(group.ma_count + 1, self.window_size)
            if self.steps % self.resum_every == 0:  # a schedule that survives checkpoints
                self._resum(group)
            if not (self.warmup and group.ma_count < self.window_size):
                unit = 1.0 / group.ma_count if self.filter_type == "mean" else 1.0
                terms.append(_Term(group.ma_sum, unit, lamb_ma))
        return terms

    @staticmethod
    def _resum(group: _Group) -> None:
        """Recompute the running sum from the window, discarding accumulated rounding error."""
        torch._foreach_zero_(group.ma_sum)
        for slot in group.ma_slots:
            torch._foreach_add_(group.ma_sum, slot)

    def _amplify(self, grads: list[Tensor], terms: list[_Term], same_dtype: bool) -> None:
        """``g <- g + sum(lamb * unit * state)``, divided by ``1 + sum(lamb)`` with ``normalize``."""
        denominator = 1.0 + sum(t.lamb for t in terms) if self.normalize else 1.0
        if self.normalize:
            if len(terms) == 1 and terms[0].unit == 1.0 and same_dtype:
                # (g + lamb * s) / (1 + lamb) == lerp(g, s, lamb / (1 + lamb)): one pass
                torch._foreach_lerp_(grads, terms[0].tensors, terms[0].lamb / denominator)
                return
            torch._foreach_mul_(grads, 1.0 / denominator)
        for term in terms:
            coef = term.lamb * term.unit / denominator
            if coef == 0.0:
                continue
            if same_dtype:
                torch._foreach_add_(grads, term.tensors, alpha=coef)
            else:
                torch._foreach_add_(grads, [(t * coef).to(g.dtype) for t, g in zip(term.tensors, grads)])

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget all state (the next gradient starts the filters afresh)."""
        self._plan_key, self._plan = None, []
        self._ema.clear()
        self._ema_started.clear()
        self._ma_history.clear()
        self._ma_sum.clear()
        self._ma_count.clear()
        self._ma_index.clear()
        self.steps = 0
        self.skipped_steps = 0
        self._skipped_on_device = None

    @property
    def skipped_steps_for_logging(self) -> float | Tensor:
        """Steps skipped for non-finite gradients, as a float or (on the synchronization-free path) a device
        tensor, so logging it never synchronizes."""
        if self._skipped_on_device is None:
            return float(self.skipped_steps)
        return self._skipped_on_device.float() + self.skipped_steps

    @property
    def total_skipped_steps(self) -> int:
        """Steps whose gradients were not finite (reads a device counter: not for the hot path)."""
        on_device = int(self._skipped_on_device.item()) if self._skipped_on_device is not None else 0
        return self.skipped_steps + on_device

    def state_dict(self) -> dict[str, Any]:
        """All state, keyed by gradient name; loads with ``torch.load(..., weights_only=True)``."""
        self._flush()
        params: dict[str, dict[str, Any]] = {}
        for name in sorted(set(self._ema) | set(self._ma_history)):
            entry: dict[str, Any] = {}
            if name in self._ema:
                entry["ema"] = self._ema[name].detach().clone()
                entry["ema_started"] = name in self._ema_started
            if name in self._ma_history:
                entry["ma_history"] = self._ma_history[name].detach().clone()
                entry["ma_sum"] = self._ma_sum[name].detach().clone()
                entry["ma_count"] = self._ma_count.get(name, 0)
                entry["ma_index"] = self._ma_index.get(name, 0)
            params[name] = entry
        return {
            "format": _STATE_FORMAT,
            "filter": self.filter,
            "window_size": self.window_size,
            "alpha": self._alpha,
            "lamb": self._lamb,
            "ma_lamb": self._ma_lamb,
            "steps": self.steps,
            "skipped_steps": self.total_skipped_steps,
            "params": params,
        }

    def load_state_dict(self, state: dict[str, Any], *, load_hyperparameters: bool = True) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state: a dict from :meth:`state_dict`.
            load_hyperparameters: also restore ``alpha``, ``lamb`` and ``ma_lamb`` (they may have been changed
                during training, e.g. by the grokking detector).

        Raises:
            ValueError: If the state was saved by a different kind of filter or window size.

        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"Unknown Grokfast filter state format {state.get('format')!r}.")
        if state["filter"] != self.filter:
            raise ValueError(f"The state was saved by filter={state['filter']!r}, this filter is {self.filter!r}.")
        if self.uses_ma and state["window_size"] != self.window_size:
            raise ValueError(
                f"The state was saved with window_size={state['window_size']}, this filter has {self.window_size}."
            )
        self.reset()
        if load_hyperparameters:
            self.alpha, self.lamb, self.ma_lamb = state["alpha"], state["lamb"], state["ma_lamb"]
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        for name, entry in state["params"].items():
            if "ema" in entry:
                self._ema[name] = entry["ema"].clone()
                if entry.get("ema_started", True):
                    self._ema_started.add(name)
            if "ma_history" in entry:
                self._ma_history[name] = entry["ma_history"].clone()
                self._ma_sum[name] = entry["ma_sum"].clone()
                self._ma_count[name] = int(entry["ma_count"])
                self._ma_index[name] = int(entry["ma_index"])

    def state_names(self) -> set[str]:
        """Names that have filter state."""
        return set(self._ema) | set(self._ma_history)

    def place(self, devices: dict[str, torch.device]) -> GradientFilter:
        """Move each named state to the given device (e.g. its parameter's, after loading a checkpoint)."""
        self._flush()
        for store in (self._ema, self._ma_history, self._ma_sum):
            for name, tensor in store.items():
                if name in devices:
                    store[name] = tensor.to(devices[name])
        return self

    def state_bytes(self) -> int:
        """Bytes of tensor state currently held."""
        stores = (self._ema, self._ma_history, self._ma_sum)
        return sum(t.numel() * t.element_size() for store in stores for t in store.values())


def _all_finite(norms: list[Tensor]) -> Tensor:
    """0-dim bool tensor: every norm is finite (moves flags to the first device, no synchronization)."""
    device = norms[0].device
    return torch.stack([n.to(device) for n in norms]).isfinite().all()


def _global_norm(norms: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack([n.to(device) for n in norms]).square().sum().sqrt()


def _slow_norm_sq(terms: list[_Term], device: torch.device) -> Tensor:
    """Squared norm of the slow component: the lamb-weighted mean of the terms' ``unit * tensors``."""
    if not terms:
        return torch.zeros((), device=device)
    total_lamb = sum(t.lamb for t in terms)
    weights = [t.lamb / total_lamb if total_lamb else 1.0 / len(terms) for t in terms]
    combined = torch._foreach_mul(terms[0].tensors, weights[0] * terms[0].unit)
    for term, weight in zip(terms[1:], weights[1:]):
        torch._foreach_add_(combined, term.tensors, alpha=weight * term.unit)
    norms = torch._foreach_norm(combined)
    return torch.stack(norms).float().square().sum().to(device)
