"""GrokfastCallback: the Lightning glue around the filter core (:mod:`lightning_grokfast.core.binding`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_grokfast.callbacks.utils import is_logging_step, trainer_scaler
from lightning_grokfast.core.amp import scaler_found_inf
from lightning_grokfast.core.binding import OptimizerBinding, ParamSelection
from lightning_grokfast.core.config import FilterConfig, TunableSettings
from lightning_grokfast.core.filters import GradientFilter, StepInfo, check_structure
from lightning_grokfast.core.metrics import filter_metrics
from lightning_grokfast.core.validation import as_pattern_factors, as_pattern_list, check_bool, check_int, check_lamb

_STATE_FORMAT = 2
#: The user's configuration saved with each checkpoint (compared with the constructor's on resume).
_USER_FIELDS = ("start_step", "enabled", "exclude", "lamb_scale")


class GrokfastCallback(TunableSettings, Callback):
    r"""Amplify the slow (low-pass filtered) part of every gradient before each optimizer step (Grokfast).

    In ``on_before_optimizer_step`` (after backward, gradient accumulation and AMP unscaling, before gradient
    clipping and ``optimizer.step()``) each gradient ``g`` of the stepping optimizer's parameters becomes
    ``g + lamb * slow(g)``. Every optimizer has its own filter state, updated once per its own step; parameters added
    to an optimizer during training (``add_param_group``) are filtered from their first gradient on. The per-parameter
    filter state is saved with the optimizer's state in every checkpoint (sharded like it under FSDP2).

    Args:
        filter: ``"ema"``, ``"ma"`` (windowed moving average), ``"ema+ma"``, or ``"none"`` (only ``orthogonal``).
        alpha: EMA momentum in ``[0, 1)``. Paper default 0.98.
        lamb: amplification ``>= 0`` of the EMA (or of the MA with ``filter="ma"``). Paper: 2.0 (EMA), 5.0 (MA).
        window_size: moving-average window ``>= 1`` (paper: 100).
        ma_lamb: amplification of the MA term with ``filter="ema+ma"``.
        warmup: with a moving average, add nothing until the window is full.
        filter_type: ``"mean"`` or ``"sum"`` of the moving-average window.
        start_step: first ``trainer.global_step`` at which the slow part is added (the state is updated from the
            first step on, so the filter is warm when amplification starts).
        enabled: on/off switch, also settable during training (off: gradients and state are left alone).
        normalize: divide the amplified gradient by ``1 + lamb`` so the update keeps the unfiltered size.
        exclude: a regular expression or a list of them; parameters whose name matches any (``re.search``) are not
            filtered, e.g. ``"bias"`` or ``["bias", "norm"]``.
        lamb_scale: ``{pattern: factor}``; parameters whose name matches a pattern (first match wins) use
            ``lamb * factor`` (and ``ma_lamb * factor``).
        state_dtype: dtype of the EMA and MA-window state: for float16/bfloat16 gradients (default float32), and
            for every gradient when it is a 16-bit dtype (``"bfloat16"`` halves the state of a float32 model; the
            MA running sum stays float32). ``None``: the gradient's dtype.
        log_stats: on Lightning's logging steps, log ``grokfast/lamb``, ``alpha``, ``grad_norm``, ``slow_norm``,
            ``slow_to_grad_ratio``, ``skipped_steps`` (and ``guard_scale`` with the divergence guard).
        resum_every: updates between exact re-summations of the moving-average running sum (default
            ``10 * window_size``).
        check_finite: skip a step whose gradients are not all finite (state unchanged, nothing added).
        orthogonal: ⊥Grad: remove from each gradient its component along its parameter (norm kept), before filtering.
        max_amplified_ratio: divergence guard: bound the added slow term's norm by this multiple of the raw
            gradient's running norm (``None``: off).
        speedup: the authors' rule of thumb for a target acceleration ``N``: sets ``alpha`` (``alpha**N = 0.1``)
            and/or ``window_size`` (``N``) for the filter; leave ``alpha``/``window_size`` at their defaults then.
        compile: with ``filter="ema"`` or ``"ma"``, fuse the state update and its amplification into one kernel
            per tensor with ``torch.compile`` (see :class:`~lightning_grokfast.core.config.FilterConfig`); the first
            step compiles.

    Raises:
        ValueError: If an argument is out of its range (the message names it and the range).

    Example::

        from lightning_grokfast import GrokfastCallback

        trainer = L.Trainer(callbacks=[GrokfastCallback(filter="ema", alpha=0.98, lamb=2.0)])
        trainer.fit(model)

    On resume the configuration you pass wins; what training itself changed (``lamb`` boosted by the grokking
    detector, an adaptive ``alpha``) is restored when the checkpoint was written with the same configuration.
    A difference between the two is reported once.

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
        exclude: str | list[str] | None = None,
        lamb_scale: dict[str, float] | None = None,
        state_dtype: str | torch.dtype | None = "float32",
        log_stats: bool = True,
        resum_every: int | None = None,
        check_finite: bool = True,
        orthogonal: bool = False,
        max_amplified_ratio: float | None = None,
        speedup: float | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.config = FilterConfig.from_arguments(
            filter,
            speedup=speedup,
            alpha=alpha,
            lamb=lamb,
            window_size=window_size,
            ma_lamb=ma_lamb,
            warmup=warmup,
            filter_type=filter_type,
            normalize=normalize,
            state_dtype=state_dtype,
            resum_every=resum_every,
            check_finite=check_finite,
            orthogonal=orthogonal,
            max_amplified_ratio=max_amplified_ratio,
            compile=compile,
        )
        self.start_step = check_int(start_step, "start_step")
        self._enabled = check_bool(enabled, "enabled")
        self.log_stats = check_bool(log_stats, "log_stats")
        self.selection = ParamSelection(
            as_pattern_list(exclude, "exclude"), as_pattern_factors(lamb_scale, "lamb_scale")
        )
        self._user = {
            "config": self.config.to_dict(),
            "start_step": self.start_step,
            "enabled": self.enabled,
            "exclude": [p.pattern for p in self.selection.exclude],
            "lamb_scale": [[p.pattern, f] for p, f in self.selection.lamb_scale],
        }
        self._bindings: dict[int, OptimizerBinding] = {}
        self._indices: dict[int, int] = {}
        self._last_step: dict[int, int] = {}
        self._restored: dict[str, Any] = {}
        self._sharded = False

    @classmethod
    def from_speedup(cls, speedup: float, filter: str = "ema", **kwargs: Any) -> GrokfastCallback:
        """A callback tuned by the authors' rule of thumb for a target acceleration ``speedup`` (``N``).

        ``N`` is how many times sooner generalization should come: the filter averages over about ``N`` steps
        (``window_size = N``; for the EMA, ``alpha**N = 0.1``). ``N`` sets the time scale only; ``lamb`` is still
        yours (paper: 2 for the EMA, 5 for the MA).

        Args:
            speedup: the target acceleration ``N``, a number > 1.
            filter: ``"ema"`` (sets ``alpha``), ``"ma"`` (sets ``window_size``) or ``"ema+ma"`` (both).
            **kwargs: every other :class:`GrokfastCallback` argument.

        Raises:
            ValueError: If ``speedup`` is not a number > 1, or an argument is out of its range.

        Example::

            GrokfastCallback.from_speedup(100)                     # alpha = 0.1 ** (1 / 100) = 0.977
            GrokfastCallback.from_speedup(50, filter="ma", lamb=5)  # window_size = 50

        Returns:
            The callback.
        """
        return cls(filter=filter, speedup=speedup, **kwargs)

    # ------------------------------------------------------------------ settings
    @property
    @override
    def state_key(self) -> str:
        extra: dict[str, Any] = {}
        if self._user["exclude"]:
            extra["exclude"] = self._user["exclude"]
        if self._user["lamb_scale"]:
            extra["lamb_scale"] = self._user["lamb_scale"]
        return self._generate_state_key(filter=self.config.filter, **extra)

    @property
    def filter(self) -> str:
        return self.config.filter

    @property
    def enabled(self) -> bool:
        """On/off switch, settable during training. Off, gradients and filter state are left alone and the
        parameters are free for another filter (e.g. a second callback taking over)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = check_bool(value, "enabled")
        if not self._enabled:
            for binding in self._bindings.values():
                binding.unclaim()

    def boost_lamb(self, factor: float, max_lamb: float | None = None) -> float:
        """Multiply every amplification (``lamb`` and ``ma_lamb``) by ``factor``, capped at ``max_lamb``.

        A value already above the cap is not lowered.

        Args:
            factor: the multiplier, ``>= 0``.
            max_lamb: the cap, ``>= 0``, or ``None`` for no cap.

        Returns:
            The new ``lamb``.

        Raises:
            ValueError: If ``factor`` or ``max_lamb`` is negative or not finite.
        """
        factor = check_lamb(factor, "factor")
        cap = float("inf") if max_lamb is None else check_lamb(max_lamb, "max_lamb")
        self.lamb = min(self.lamb * factor, max(cap, self.lamb))
        self.ma_lamb = min(self.ma_lamb * factor, max(cap, self.ma_lamb))
        return self.lamb

    @property
    def exclude(self) -> list[re.Pattern[str]]:
        """The compiled ``exclude`` patterns."""
        return self.selection.exclude

    @property
    def lamb_scale(self) -> list[tuple[re.Pattern[str], float]]:
        """The compiled ``(pattern, factor)`` pairs of ``lamb_scale``."""
        return self.selection.lamb_scale

    @property
    def filters(self) -> dict[int, GradientFilter]:
        """The filter of each optimizer seen so far, by its index in ``trainer.optimizers``."""
        return {self._indices[key]: binding.filter for key, binding in self._bindings.items()}

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if "DeepSpeedStrategy" in names:
            raise MisconfigurationException(
                "GrokfastCallback does not support DeepSpeed: with ZeRO the gradients are partitioned (`p.grad` is"
                " None in `on_before_optimizer_step`) and DeepSpeed accumulates micro-batches itself, so the filter"
                " would run on no gradient or on every micro-batch. Use DDP, FSDP or ModelParallelStrategy."
            )
        self._sharded = bool(names & {"FSDPStrategy", "ModelParallelStrategy"})

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind_all(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self.enabled:
            return
        binding = self._bindings.get(id(optimizer)) or self._bind(trainer, pl_module, optimizer)
        step = trainer.global_step  # a chain of Lightning properties: read once per step
        self._check_once_per_step(step, optimizer)
        compute_norms = self.log_stats and is_logging_step(trainer)
        info = binding.step(
            amplify=step >= self.start_step,
            found_inf=self._found_inf(trainer, binding),
            compute_norms=compute_norms,
        )
        if compute_norms and info is not None:
            self._log(pl_module, binding, info)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for binding in self._bindings.values():
            binding.unclaim()  # keeps the checkpoint link: `trainer.save_checkpoint` after `fit` still saves the state

    # ------------------------------------------------------------------ binding optimizers
    def _bind_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind every optimizer before Lightning restores optimizer state (so the filter state is read back)."""
        current = {id(opt) for opt in trainer.optimizers}
        stale = [key for key in self._bindings if key not in current]
        if stale:
            had_state = any(self._bindings[key].filter.states for key in stale)
            for key in stale:
                self._bindings.pop(key).release()
                self._indices.pop(key, None)
            if had_state:
                rank_zero_info(
                    "GrokfastCallback: this fit has new optimizers, so its filters start afresh (as the optimizers'"
                    " own state does). Resume from a checkpoint to continue a run."
                )
        for optimizer in trainer.optimizers:
            if id(optimizer) not in self._bindings:
                self._bind(trainer, pl_module, optimizer)
            else:  # the same optimizer again: continue, re-reading its parameters
                self._bindings[id(optimizer)].refresh(_names(pl_module))

    def _bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> OptimizerBinding:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise MisconfigurationException(
                "GrokfastCallback does not support LBFGS: its closure is evaluated several times per step, so there is"
                " no single gradient per step to filter."
            )
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), len(self._bindings))
        try:
            binding = OptimizerBinding(
                optimizer,
                self.config,
                names=_names(pl_module),
                selection=self.selection,
                prefix=f"optimizer{index}.",
                owner=f"GrokfastCallback(state_key={self.state_key!r})",
                # sharded checkpoints: the path Lightning loads (set when the strategy loads it, after on_fit_start)
                resume_source=lambda: (trainer.ckpt_path, f"optimizer_{index}"),
            )
            if self.enabled:
                binding.claim()  # overlapping callbacks fail at the start of fit, not at their first step
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self._bindings[id(optimizer)] = binding
        self._indices[id(optimizer)] = index
        self._restore_counters(binding, index)
        return binding

    def _check_once_per_step(self, step: int, optimizer: Optimizer) -> None:
        if self._last_step.get(id(optimizer)) == step:
            raise MisconfigurationException(
                "GrokfastCallback saw `on_before_optimizer_step` twice for the same optimizer within one optimizer step"
                f" (global_step={step}). This happens when the closure is evaluated several times per"
                " step, e.g. with LBFGS; the filter would be updated more than once per step. Not supported."
            )
        self._last_step[id(optimizer)] = step

    def _found_inf(self, trainer: pl.Trainer, binding: OptimizerBinding) -> Tensor | None:
        """The AMP scaler's verdict; under sharding without one, every rank's verdict, so all ranks agree."""
        try:
            found_inf = scaler_found_inf(trainer_scaler(trainer), binding.optimizer)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        if found_inf is None and self._sharded and self.config.check_finite and trainer.world_size > 1:
            found_inf = binding.local_found_inf()
            found_inf = trainer.strategy.reduce(found_inf, reduce_op="sum")
        return found_inf

    def _log(self, pl_module: pl.LightningModule, binding: OptimizerBinding, info: StepInfo) -> None:
        index = self._indices.get(id(binding.optimizer), 0)
        prefix = "grokfast/" if index == 0 else f"grokfast/optimizer{index}/"
        metrics = filter_metrics(binding.filter, info, prefix)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, prog_bar=False, batch_size=1)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        counters = {str(self._indices[k]): b.filter.counters() for k, b in self._bindings.items()}
        return {
            "format": _STATE_FORMAT,
            **self.config.structure(),
            "user": self._user,
            "tunables": self.config.tunables(),
            "counters": {**self._restored.get("counters", {}), **counters},
            "legacy_filters": self._restored.get("legacy_filters", {}),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("format")
        if version not in (1, _STATE_FORMAT):
            raise ValueError(
                f"Unknown GrokfastCallback state format {version!r}: this release (0.2) reads checkpoints of"
                " lightning-grokfast 0.1 (format 1) and 0.2 (format 2)."
            )
        if version == 1:  # 0.1 kept no window size here (its filter states are checked when they load)
            check_structure({**state_dict, "window_size": self.config.window_size}, self.config, "checkpoint")
        else:
            check_structure(state_dict, self.config, "GrokfastCallback state in the checkpoint")
        if version == 1:  # 0.1 kept the filter state here, by optimizer index and parameter name
            saved_user, tunables = None, {k: state_dict[k] for k in ("alpha", "lamb", "ma_lamb")}
            self._restored = {"legacy_filters": dict(state_dict["filters"]), "counters": {}}
        else:
            saved_user, tunables = state_dict["user"], state_dict["tunables"]
            self._restored = {"legacy_filters": dict(state_dict.get("legacy_filters", {}))}
            self._restored["counters"] = dict(state_dict.get("counters", {}))
        self._apply_restored_settings(saved_user, tunables, version)
        for key, binding in self._bindings.items():  # bound already (strategies that restore after setup)
            self._restore_counters(binding, self._indices[key])

    def _apply_restored_settings(
        self, saved_user: Mapping[str, Any] | None, tunables: Mapping[str, Any], version: int
    ) -> None:
        """The constructor's configuration wins; training's own changes are restored if the configuration matches."""
        differences = _differences(saved_user, self._user) if saved_user is not None else []
        if saved_user is not None and not differences:
            for name, value in tunables.items():
                setattr(self.config, name, value)
            return
        if saved_user is None:
            differences = [
                f"{k}: checkpoint {tunables[k]!r}, now {getattr(self.config, k)!r}"
                for k in ("alpha", "lamb", "ma_lamb")
                if float(tunables[k]) != float(getattr(self.config, k))
            ]
        if differences:
            rank_zero_warn(
                "GrokfastCallback: the configuration passed now differs from the checkpoint's"
                f" ({'; '.join(differences)}). The configuration passed now is used"
                + (" (a 0.1 checkpoint does not say which values training changed)." if version == 1 else ".")
            )

    def _restore_counters(self, binding: OptimizerBinding, index: int) -> None:
        counters = self._restored.get("counters", {}).get(str(index))
        if counters is not None:
            binding.filter.load_counters(counters)
        legacy = self._restored.get("legacy_filters", {}).pop(str(index), None)
        if legacy is not None:
            _load_legacy(binding, legacy, index)


def _names(pl_module: pl.LightningModule) -> dict[int, str]:
    return {id(p): n for n, p in pl_module.named_parameters()}


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    out = []
    for key in ("config", *_USER_FIELDS):
        before, after = saved.get(key), now.get(key)
        if key == "config" and isinstance(before, Mapping) and isinstance(after, Mapping):
            out += [
                f"{k}: checkpoint {before.get(k)!r}, now {v!r}"
                for k, v in after.items()
                if before.get(k, _FIELD_DEFAULTS.get(k)) != v  # a field newer than the checkpoint: its default
            ]
        elif _plain(before) != _plain(after):
            out.append(f"{key}: checkpoint {before!r}, now {after!r}")
    return out


_FIELD_DEFAULTS = FilterConfig().to_dict()


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _load_legacy(binding: OptimizerBinding, state: Mapping[str, Any], index: int) -> None:
    """Load the per-name filter state a 0.1 checkpoint kept in the callback state."""
    params = dict(zip(binding.names, binding.params))
    problems = []
    missing = sorted(set(state["params"]) - set(params))
    if missing:
        problems.append(f"the checkpoint has filter state for parameters this model's optimizer lacks: {missing[:10]}")
    for name, entry in state["params"].items():
        if name in params:
            shape = tuple(entry["ema"].shape if "ema" in entry else entry["ma_history"].shape[1:])
            if shape != tuple(params[name].shape):
                problems.append(f"{name!r} has shape {tuple(params[name].shape)} but its saved state has shape {shape}")
    if problems:
        raise ValueError(f"Cannot resume GrokfastCallback state for optimizer {index}: " + "; ".join(problems[:10]))
    binding.filter.load_state_dict(state, load_hyperparameters=False)
    binding.filter.place({name: param.device for name, param in params.items()})
