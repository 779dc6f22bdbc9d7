"""Overhead sections (b) and (c): the filter alone against a copy, and the optimizer step, on large models."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from overhead_common import (
    FilterSpec,
    Settings,
    anchor_classes,
    filter_specs,
    median,
    optimizer_state_bytes,
    timed,
)
from reference import (
    gradfilter_ema_reference,
    gradfilter_ma_reference,
    prefilled_ma_state,
    reference_state_bytes,
)
from torch import Tensor, nn

from lightning_grokfast import GradientFilter


# ---------------------------------------------------------------------------------------------------- (b), (c) large
class FlatModel(nn.Module):
    """Parameters in the shapes of a 4-layer transformer of width ``dim`` (about ``12 * dim**2`` per layer)."""

    def __init__(self, total: int, device: torch.device, layers: int = 4) -> None:
        super().__init__()
        dim = max(8, round(math.sqrt(total / (12 * layers)) / 8) * 8)
        shapes = {
            "qkv_weight": (3 * dim, dim),
            "qkv_bias": (3 * dim,),
            "proj_weight": (dim, dim),
            "proj_bias": (dim,),
            "norm1_weight": (dim,),
            "norm1_bias": (dim,),
            "fc1_weight": (4 * dim, dim),
            "fc1_bias": (4 * dim,),
            "fc2_weight": (dim, 4 * dim),
            "fc2_bias": (dim,),
            "norm2_weight": (dim,),
            "norm2_bias": (dim,),
        }
        generator = torch.Generator().manual_seed(0)
        self.weights = nn.ParameterDict(
            {
                f"layer{i}_{name}": nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device))
                for i in range(layers)
                for name, shape in shapes.items()
            }
        )
        self.dim = dim


@dataclass
class GradBench:
    """Parameters with gradients and a pristine copy of the gradients, restored (and timed) before every call."""

    model: FlatModel
    device: torch.device
    pristine: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.pristine = [
            (torch.randn(p.shape, generator=generator) * 1e-3).to(self.device) for p in self.model.parameters()
        ]
        for p, g in zip(self.model.parameters(), self.pristine):
            p.grad = g.clone()

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.model.parameters()]

    def restore(self) -> None:
        torch._foreach_copy_(self.grads(), self.pristine)

    def measure(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(time of restoring the gradients with one ``foreach_copy_``, time of ``fn``)."""
        return timed(self.restore, self.device), timed(fn, self.device)


def ours_filter(
    bench: GradBench, spec: FilterSpec, found_inf: bool, **extra: Any
) -> tuple[GradientFilter, Callable[[], Any]]:
    kwargs = {**spec.ours, **extra}
    filt = GradientFilter(kwargs.pop("filter"), **kwargs)
    names = bench.names
    verdict = torch.zeros((), device=bench.device) if found_inf else None
    for _ in range(spec.window):  # fill the window (no amplification, gradients untouched)
        filt.step(names, bench.grads(), amplify=False, found_inf=torch.zeros((), device=bench.device))
    return filt, lambda: filt.step(names, bench.grads(), found_inf=verdict)


def ema_floor(bench: GradBench) -> Callable[[], None]:
    """The EMA's maths alone, as two foreach calls and nothing else (no check, no grouping): its foreach floor.

    The state is made once, here: the published algorithm rebinds ``p.grad`` to a new tensor at every call, so
    nothing may be keyed by the gradient objects (a state made again at each call would time an allocation).
    """
    state = [g.clone() for g in bench.grads()]

    def step() -> None:
        grads = bench.grads()
        torch._foreach_lerp_(state, grads, 0.02)
        torch._foreach_add_(grads, state, alpha=2.0)

    return step


def reference_filter(bench: GradBench, spec: FilterSpec) -> tuple[dict[str, Any], Callable[[], Any]]:
    assert spec.reference is not None
    holder: dict[str, Any] = {"state": prefilled_ma_state(bench.model, spec.window) if spec.window else None}
    function = gradfilter_ma_reference if spec.window else gradfilter_ema_reference

    def call() -> None:
        holder["state"] = function(bench.model, holder["state"], **spec.reference)

    return holder, call


def run_large_section(settings: Settings) -> dict[str, Any]:
    """(b) EMA filters alone / copy and (c) optimizer steps / AdamW on ``--params`` parameters, interleaved."""
    device = settings.device
    bench = GradBench(FlatModel(settings.params, device), device)
    ema = filter_specs(settings.windows)[0]
    numel = bench.numel
    print(f"[overhead] large: {numel / 1e6:.1f}M parameters in {len(bench.params)} tensors on {device}")
    adamw = torch.optim.AdamW(bench.params, lr=1e-5, weight_decay=0.01)
    ours, ours_step = ours_filter(bench, ema, found_inf=False)
    ours_amp, ours_amp_step = ours_filter(bench, ema, found_inf=True)
    _, ours_bf16_step = ours_filter(bench, ema, found_inf=False, state_dtype="bfloat16")
    ref_holder, ref_step = reference_filter(bench, ema)

    def norm_pass() -> None:
        torch._foreach_norm(bench.grads())

    variants: dict[str, Callable[[], Any]] = {
        "filter/ours EMA (check)": ours_step,
        "filter/ours EMA (found_inf)": ours_amp_step,
        "filter/ours EMA bf16 state (check)": ours_bf16_step,
        "filter/reference EMA": ref_step,
        "filter/foreach_norm pass": norm_pass,
        "filter/floor: lerp_ + add_ (2 foreach calls)": ema_floor(bench),
        "optimizer/AdamW": adamw.step,
        "optimizer/ours EMA (check) + AdamW": lambda: (ours_step(), adamw.step()),
        "optimizer/ours EMA (found_inf) + AdamW": lambda: (ours_amp_step(), adamw.step()),
        "optimizer/reference EMA + AdamW": lambda: (ref_step(), adamw.step()),
    }
    if settings.compile:
        _, ours_fused_step = ours_filter(bench, ema, found_inf=False, compile=True)
        ours_fused_step()  # starts the EMA (foreach path)
        start = time.perf_counter()
        ours_fused_step()  # compiles
        print(f"[overhead] large: compiled the fused EMA step in {time.perf_counter() - start:.0f} s")
        variants["filter/ours EMA compile=True (check)"] = ours_fused_step
        variants["optimizer/ours EMA compile=True (check) + AdamW"] = lambda: (ours_fused_step(), adamw.step())
    anchor_optimizers: dict[str, torch.optim.Optimizer] = {}
    classes = anchor_classes() if settings.anchors else None
    if classes is not None:
        grokfast_adamw, grok_adamw = classes
        gfa = grokfast_adamw(bench.params, lr=1e-5, weight_decay=0.01, grokfast_alpha=0.98, grokfast_lamb=2.0)
        gaw = grok_adamw(bench.params, lr=1e-5, weight_decay=0.01, alpha_init=0.98, lamb=2.0, gradient_clipping=0.0)
        anchor_optimizers = {"GrokFastAdamW on": gfa, "GrokAdamW": gaw}
        variants["optimizer/GrokFastAdamW off"] = lambda: (gfa.turn_off_grokfast(), gfa.step())
        variants["optimizer/GrokFastAdamW on"] = lambda: (gfa.turn_on_grokfast(), gfa.step())
        variants["optimizer/GrokAdamW"] = gaw.step

    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in variants}
    for r in range(settings.large_rounds + 2):  # rounds 0 and 1: warm-up (first steps allocate state)
        for key, fn in variants.items():
            copy_s, fn_s = bench.measure(fn)
            if r > 1:
                samples[key].append((copy_s, fn_s))

    def paired(key: str, reference: str) -> dict[str, float]:
        ratios = [a[1] / b[1] for a, b in zip(samples[key], samples[reference])]
        return {"ratio": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}

    out: dict[str, Any] = {
        "params": numel,
        "tensors": len(bench.params),
        "copy_s": median([s[0] for key in samples for s in samples[key]]),
        "filters": {},
    }
    for key in variants:
        if key.startswith("filter/"):
            ratios = [fn_s / c_s for c_s, fn_s in samples[key]]
            out["filters"][key.removeprefix("filter/")] = {
                "time_s": median([s[1] for s in samples[key]]),
                "copy_s": median([s[0] for s in samples[key]]),
                "ratio_to_copy": median(ratios),
                "ratio_to_copy_min": min(ratios),
                "ratio_to_copy_max": max(ratios),
            }
    adamw_bytes = optimizer_state_bytes(adamw)
    beyond_adamw = {
        "ours EMA (check) + AdamW": ours.state_bytes(),
        "ours EMA (found_inf) + AdamW": ours_amp.state_bytes(),
        "ours EMA compile=True (check) + AdamW": ours.state_bytes(),
        "reference EMA + AdamW": reference_state_bytes(ref_holder["state"]),
        "GrokFastAdamW off": 0,
    }
    for name, optimizer in anchor_optimizers.items():
        beyond_adamw[name] = optimizer_state_bytes(optimizer) - adamw_bytes
    out["optimizer"] = {
        "AdamW_s": median([s[1] for s in samples["optimizer/AdamW"]]),
        "AdamW_state_bytes_per_param": adamw_bytes / numel,
        "rows": {},
    }
    for key in variants:
        if key.startswith("optimizer/") and key != "optimizer/AdamW":
            name = key.removeprefix("optimizer/")
            out["optimizer"]["rows"][name] = {
                "time_s": median([s[1] for s in samples[key]]),
                "to_adamw": paired(key, "optimizer/AdamW"),
                "state_bytes_per_param_beyond_adamw": beyond_adamw.get(name, math.nan) / numel,
            }
    if classes is not None:
        out["optimizer"]["rows"]["GrokFastAdamW on"]["to_own_off"] = paired(
            "optimizer/GrokFastAdamW on", "optimizer/GrokFastAdamW off"
        )
    return out


# ---------------------------------------------------------------------------------------------------- (b) window
def run_window_section(settings: Settings) -> dict[str, Any]:
    """Every filter alone / ``foreach_copy_`` on parameters sized so the largest window fits the memory budget."""
    device = settings.device
    largest = max(settings.windows)
    numel = min(settings.params, int(settings.ma_memory_gb * 1e9 / (4 * (largest + 1))))
    bench = GradBench(FlatModel(numel, device), device)
    numel = bench.numel
    print(f"[overhead] window: {numel / 1e6:.2f}M parameters, windows {settings.windows}, one filter at a time")
    out: dict[str, Any] = {"params": numel, "tensors": len(bench.params), "filters": {}}
    for spec in filter_specs(settings.windows):
        kinds: list[tuple[str, Callable[[], tuple[Any, Callable[[], Any]]]]] = [
            (f"ours {spec.key} (check)", lambda spec=spec: ours_filter(bench, spec, found_inf=False)),
            (f"ours {spec.key} (found_inf)", lambda spec=spec: ours_filter(bench, spec, found_inf=True)),
        ]
        if spec.reference is not None:
            kinds.append((f"reference {spec.key}", lambda spec=spec: reference_filter(bench, spec)))
        for label, make in kinds:
            state, call = make()
            samples = [bench.measure(call) for _ in range(settings.window_iters + 2)][2:]
            ratios = [fn_s / c_s for c_s, fn_s in samples]
            held = state.state_bytes() if isinstance(state, GradientFilter) else reference_state_bytes(state["state"])
            out["filters"][label] = {
                "filter": spec.key,
                "time_s": median([s[1] for s in samples]),
                "copy_s": median([s[0] for s in samples]),
                "ratio_to_copy": median(ratios),
                "ratio_to_copy_min": min(ratios),
                "ratio_to_copy_max": max(ratios),
                "state_bytes_per_param": held / numel,
            }
            del state, call
            gc.collect()  # free this filter's window before the next one
    return out
