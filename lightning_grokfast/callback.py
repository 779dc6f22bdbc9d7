"""GrokfastCallback: the Lightning glue around a :class:`~lightning_grokfast.filters.GradientFilter`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from lightning_grokfast.filters import FILTER_NAMES, MA_AGGREGATIONS, GradientFilter
from lightning_grokfast.lightning_utils import is_logging_step, scaler_found_inf, trainer_scaler
from lightning_grokfast.validation import check_alpha, check_lamb, compile_pattern, resolve_state_dtype

_STATE_FORMAT = 1


@dataclass
class _OptimizerEntry:
    """What the callback keeps for one optimizer: its filtered parameters, their names and the filter."""

    index: int
    params: list[Tensor]
    names: tuple[str, ...]
    filter: GradientFilter
    last_global_step: int = -1


class GrokfastCallback(Callback):
    r"""Amplify the slow (low-pass filtered) part of every gradient before each optimizer step (Grokfast).

    In ``on_before_optimizer_step`` — after backward, gradient accumulation and AMP unscaling, before gradient
    clipping and ``optimizer.step()`` — each gradient ``g`` of the stepping optimizer's parameters becomes
    ``g + lamb * slow(g)``. Every optimizer has its own filter state, updated once per its own step. Gradient
    clipping (``gradient_clip_val``) therefore applies to the amplified gradient.

    Args:
        filter: ``"ema"`` (exponential moving average), ``"ma"`` (windowed moving average) or ``"ema+ma"``.
        alpha: EMA momentum in ``[0, 1)``. Paper default 0.98.
        lamb: amplification ``>= 0`` of the EMA (or of the MA with ``filter="ma"``). Paper: 2.0 (EMA), 5.0 (MA).
        window_size: moving-average window ``>= 1`` (paper: 100).
        ma_lamb: amplification of the MA term with ``filter="ema+ma"``.
        warmup: with a moving average, add nothing until the window is full.
        filter_type: ``"mean"`` or ``"sum"`` of the moving-average window.
        start_step: first ``trainer.global_step`` at which the slow part is added (the state is updated from
            the first step on, so the filter is warm when amplification starts).
        enabled: on/off switch, also settable during training (off: gradients and state are left alone).
        normalize: divide the amplified gradient by ``1 + lamb`` so the update keeps the unfiltered size.
        exclude: regular expressions; parameters whose name matches any (``re.search``) are not filtered,
            e.g. ``["bias", "norm"]``.
        lamb_scale: ``{pattern: factor}``; parameters whose name matches a pattern (first match wins) use
            ``lamb * factor`` (and ``ma_lamb * factor``).
        state_dtype: dtype of the state for float16/bfloat16 gradients (``None``: keep the gradient's dtype).
        log_stats: on Lightning's logging steps, log ``grokfast/lamb``, ``alpha``, ``grad_norm``,
            ``slow_norm``, ``slow_to_grad_ratio`` and ``skipped_steps``.
        resum_every: steps between exact re-summations of the moving-average running sum (default
            ``10 * window_size``).

    Raises:
        ValueError: If an argument is out of its range (the message names it and the range).

    Example::

        from lightning_grokfast import GrokfastCallback

        trainer = L.Trainer(callbacks=[GrokfastCallback(filter="ema", alpha=0.98, lamb=2.0)])
        trainer.fit(model)

    """

    def __init__(
        self,
        filter: str = "ema",
        alpha: float = 0.98,
        lamb: float = 2.0,
        window_size: int = 100,
        ma_lamb: float = 5.0,
        warmup: bool = True,
        filter_type: str = "mean",
        start_step: int = 0,
        enabled: bool = True,
        normalize: bool = False,
        exclude: list[str] | None = None,
        lamb_scale: dict[str, float] | None = None,
        state_dtype: str | torch.dtype | None = "float32",
        log_stats: bool = True,
        resum_every: int | None = None,
    ) -> None:
        super().__init__()
        if filter not in FILTER_NAMES:
            raise ValueError(f"`filter` must be one of {list(FILTER_NAMES)}, got {filter!r}.")
        if filter_type not in MA_AGGREGATIONS:
            raise ValueError(f"`filter_type` must be one of {list(MA_AGGREGATIONS)}, got {filter_type!r}.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"`start_step` must be an integer >= 0, got {start_step!r}.")
        self.filter = filter
        self._alpha = check_alpha(alpha)
        self._lamb = check_lamb(lamb)
        self._ma_lamb = check_lamb(ma_lamb, "ma_lamb")
        self.start_step = start_step
        self.enabled = bool(enabled)
        self.log_stats = bool(log_stats)
        self.exclude = [compile_pattern(p, "exclude") for p in (exclude or [])]
        if lamb_scale is not None and not isinstance(lamb_scale, dict):
            raise ValueError(f"`lamb_scale` must be a mapping of name pattern to factor, got {lamb_scale!r}.")
        self.lamb_scale = [
            (compile_pattern(p, "lamb_scale"), check_lamb(f, f"lamb_scale[{p!r}]"))
            for p, f in (lamb_scale or {}).items()
        ]
        self._filter_kwargs: dict[str, Any] = {
            "window_size": window_size,
            "warmup": warmup,
            "filter_type": filter_type,
            "normalize": normalize,
            "state_dtype": resolve_state_dtype(state_dtype),
            "resum_every": resum_every,
        }
        # validate the remaining arguments now, by building a filter once
        self._make_filter()
        self._entries: dict[int, _OptimizerEntry] = {}
        self._pending_state: dict[str, Any] = {}
        self._sharded = False

    # ------------------------------------------------------------------ hyperparameters
    @property
    def state_key(self) -> str:
        return self._generate_state_key(filter=self.filter)

    @property
    def alpha(self) -> float:
        """EMA momentum, settable during training (e.g. by an adaptive-alpha schedule)."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_alpha(value)
        for entry in self._entries.values():
            entry.filter.alpha = self._alpha

    @property
    def lamb(self) -> float:
        """Amplification factor, settable during training (e.g. boosted by the grokking detector)."""
        return self._lamb

    @lamb.setter
    def lamb(self, value: float) -> None:
        self._lamb = check_lamb(value)
        for entry in self._entries.values():
            entry.filter.lamb = self._lamb

    @property
    def ma_lamb(self) -> float:
        """Amplification of the moving-average term with ``filter="ema+ma"``."""
        return self._ma_lamb

    @ma_lamb.setter
    def ma_lamb(self, value: float) -> None:
        self._ma_lamb = check_lamb(value, "ma_lamb")
        for entry in self._entries.values():
            entry.filter.ma_lamb = self._ma_lamb

    def boost_lamb(self, factor: float, max_lamb: float | None = None) -> float:
        """Multiply every amplification (``lamb`` and ``ma_lamb``) by ``factor``, capped at ``max_lamb``.

        Returns:
            The new ``lamb``.

        """
        check_lamb(factor, "factor")
        cap = float("inf") if max_lamb is None else check_lamb(max_lamb, "max_lamb")
        self.lamb = min(self._lamb * factor, max(cap, self._lamb))
        self.ma_lamb = min(self._ma_lamb * factor, max(cap, self._ma_lamb))
        return self._lamb

    @property
    def filters(self) -> dict[int, GradientFilter]:
        """The filter of each optimizer seen so far, by its index in ``trainer.optimizers``."""
        return {entry.index: entry.filter for entry in self._entries.values()}

    def _make_filter(self) -> GradientFilter:
        return GradientFilter(
            self.filter, alpha=self._alpha, lamb=self._lamb, ma_lamb=self._ma_lamb, **self._filter_kwargs
        )

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy_names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if "DeepSpeedStrategy" in strategy_names:
            raise MisconfigurationException(
                "GrokfastCallback does not support DeepSpeed: with ZeRO the gradients are partitioned (`p.grad` is"
                " None in `on_before_optimizer_step`) and DeepSpeed accumulates micro-batches itself, so the filter"
                " would run on no gradient or on every micro-batch. Use DDP or FSDP."
            )
        self._sharded = bool(strategy_names & {"FSDPStrategy", "ModelParallelStrategy"})
        if self._sharded:
            rank_zero_warn(
                "GrokfastCallback under FSDP filters each rank's gradient shard (correct, the filter is element-wise),"
                " but its state is per shard and is not saved in checkpoints: a resumed run restarts the filter."
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self.enabled:
            return
        entry = self._entries.get(id(optimizer))
        if entry is None:
            entry = self._register(trainer, pl_module, optimizer)
        global_step = trainer.global_step
        if entry.last_global_step == global_step:
            raise MisconfigurationException(
                "GrokfastCallback saw `on_before_optimizer_step` twice for the same optimizer within one optimizer step"
                f" (global_step={global_step}). This happens when the closure is evaluated several times per step, e.g."
                " with LBFGS; the filter would be updated more than once per step. Such optimizers are not supported."
            )
        entry.last_global_step = global_step

        params = entry.params
        grads = [p.grad for p in params]
        names = entry.names
        if not all(g is not None for g in grads):
            present = [i for i, g in enumerate(grads) if g is not None]
            names = tuple(names[i] for i in present)
            grads = [grads[i] for i in present]
            if not grads:
                return

        compute_norms = self.log_stats and is_logging_step(trainer)
        info = entry.filter.step(
            names,
            grads,
            amplify=global_step >= self.start_step,
            found_inf=scaler_found_inf(trainer_scaler(trainer), optimizer),
            compute_norms=compute_norms,
        )
        if compute_norms:
            self._log(pl_module, entry, info.grad_norm, info.slow_norm)

    def _register(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> _OptimizerEntry:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise MisconfigurationException(
                "GrokfastCallback does not support LBFGS: its closure is evaluated several times per step, so there is"
                " no single gradient per step to filter."
            )
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), len(self._entries))
        names_by_id = {id(p): n for n, p in pl_module.named_parameters()}
        params: list[Tensor] = []
        names: list[str] = []
        for g, group in enumerate(optimizer.param_groups):
            for j, param in enumerate(group["params"]):
                name = names_by_id.get(id(param), f"optimizer{index}.group{g}.param{j}")
                if any(p.search(name) for p in self.exclude):
                    continue
                params.append(param)
                names.append(name)
        filt = self._make_filter()
        filt.set_lamb_scales(
            {
                n: next(f for p, f in self.lamb_scale if p.search(n))
                for n in names
                if any(p.search(n) for p, _ in self.lamb_scale)
            }
        )
        pending = self._pending_state.pop(str(index), None)
        if pending is not None:
            _check_matches(pending, dict(zip(names, params)), index)
            filt.load_state_dict(pending, load_hyperparameters=False)
            filt.place({name: param.device for name, param in zip(names, params)})
        entry = _OptimizerEntry(index, params, tuple(names), filt)
        self._entries[id(optimizer)] = entry
        return entry

    def _log(
        self, pl_module: pl.LightningModule, entry: _OptimizerEntry, grad_norm: Tensor | None, slow_norm: Tensor | None
    ) -> None:
        prefix = "grokfast/" if entry.index == 0 else f"grokfast/optimizer{entry.index}/"
        metrics: dict[str, Any] = {
            f"{prefix}lamb": self._lamb,
            f"{prefix}skipped_steps": entry.filter.skipped_steps_for_logging,
        }
        if self.filter != "ma":
            metrics[f"{prefix}alpha"] = self._alpha
        if self.filter == "ema+ma":
            metrics[f"{prefix}ma_lamb"] = self._ma_lamb
        if grad_norm is not None:
            metrics[f"{prefix}grad_norm"] = grad_norm
        if slow_norm is not None:
            metrics[f"{prefix}slow_norm"] = slow_norm
            if grad_norm is not None:
                metrics[f"{prefix}slow_to_grad_ratio"] = slow_norm / grad_norm.clamp_min(1e-30)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, prog_bar=False, batch_size=1)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        filters: dict[str, Any] = dict(self._pending_state)
        if not self._sharded:
            for entry in self._entries.values():
                filters[str(entry.index)] = entry.filter.state_dict()
        return {
            "format": _STATE_FORMAT,
            "filter": self.filter,
            "alpha": self._alpha,
            "lamb": self._lamb,
            "ma_lamb": self._ma_lamb,
            "enabled": self.enabled,
            "filters": filters,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"Unknown GrokfastCallback state format {state_dict.get('format')!r}.")
        if state_dict["filter"] != self.filter:
            raise ValueError(
                f"The checkpoint's GrokfastCallback used filter={state_dict['filter']!r},"
                f" this one uses {self.filter!r}."
            )
        self.alpha, self.lamb, self.ma_lamb = state_dict["alpha"], state_dict["lamb"], state_dict["ma_lamb"]
        self.enabled = bool(state_dict["enabled"])
        self._entries.clear()
        self._pending_state = dict(state_dict["filters"])


def _check_matches(state: dict[str, Any], params: dict[str, Tensor], index: int) -> None:
    """Raise if the saved filter state does not fit the optimizer's parameters."""
    saved = state["params"]
    missing = sorted(set(saved) - set(params))
    problems = []
    if missing:
        problems.append(f"the checkpoint has filter state for parameters this model's optimizer lacks: {missing[:10]}")
    for name, entry in saved.items():
        if name in params:
            shape = tuple(entry["ema"].shape if "ema" in entry else entry["ma_history"].shape[1:])
            if shape != tuple(params[name].shape):
                problems.append(f"{name!r} has shape {tuple(params[name].shape)} but its saved state has shape {shape}")
    if problems:
        raise ValueError(f"Cannot resume GrokfastCallback state for optimizer {index}: " + "; ".join(problems[:10]))
