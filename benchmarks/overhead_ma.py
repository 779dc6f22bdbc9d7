"""Overhead section ``ma``: the moving average alone against a copy and its floor, and the state bytes table."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from overhead_common import Settings, filter_specs, median
from overhead_large import FlatModel, GradBench, ours_filter

from lightning_grokfast import GradientFilter


# ---------------------------------------------------------------------------------------------------- (b) ma
def run_ma_section(settings: Settings) -> dict[str, Any]:
    """MA alone / ``foreach_copy_`` on ``--params`` parameters, with the largest window up to 100 that fits.

    A step touches one slot of the window whatever its size, so the cost is the same for any window far beyond the
    cache: ``--params`` (50M) parameters get the largest window up to the paper's 100 whose float32 copies fit in
    ``--ma-memory-gb`` (7 to 10 in 6 GB), as long as that is at least 4 slots; otherwise (a small budget) window
    100 on as many parameters as fit. Variants, interleaved over ``6 * --large-rounds`` rounds: ours with the
    finiteness check (default), with a bfloat16 window, with ``compile=True``, and the floor as foreach calls (sub,
    copy, add, add over a ring of slots: the running-sum update and the amplification, nothing else). The
    found_inf (AMP) variant is in the ``window`` section.
    """
    device = settings.device
    small = settings.windows[0]
    copies = 3.6 if settings.compile else 2.6  # float32 windows held at once (the bfloat16 one counts half)
    fits = int(settings.ma_memory_gb * 1e9 / (4 * settings.params) / copies) - 1  # slots beside the sum
    if fits >= 4:
        small, numel = min(small, fits), settings.params
    else:
        numel = min(settings.params, int(settings.ma_memory_gb * 1e9 / (4 * (small + 1)) / copies))
    bench = GradBench(FlatModel(numel, device), device)
    numel = bench.numel
    spec = filter_specs((small, settings.windows[1]))[1]
    print(f"[overhead] ma: {numel / 1e6:.2f}M parameters, window {small}")
    ours, ours_step = ours_filter(bench, spec, found_inf=False)
    bf16, bf16_step = ours_filter(bench, spec, found_inf=False, state_dtype="bfloat16")
    sums = [torch.zeros_like(g) for g in bench.grads()]
    windows = [g.new_zeros((small, *g.shape)) for g in bench.grads()]
    position = [0]

    def floor() -> None:  # a ring of `small` slots, as the filter's: each slot is cold when its turn comes
        grads, index = bench.grads(), position[0]
        slots = [w[index] for w in windows]
        position[0] = (index + 1) % small
        torch._foreach_sub_(sums, slots)
        torch._foreach_copy_(slots, grads)
        torch._foreach_add_(sums, slots)
        torch._foreach_add_(grads, sums, alpha=0.05)

    variants: dict[str, Callable[[], Any]] = {
        f"ours MA w{small} (check)": ours_step,
        f"ours MA w{small} bf16 window (check)": bf16_step,
        "floor: sub_, copy_, add_, add_ (4 foreach calls)": floor,
    }
    if settings.compile:
        _, fused_step = ours_filter(bench, spec, found_inf=False, compile=True)
        start = time.perf_counter()
        fused_step()  # compiles
        print(f"[overhead] ma: compiled the fused MA step in {time.perf_counter() - start:.0f} s")
        variants[f"ours MA w{small} compile=True (check)"] = fused_step
    held = {
        f"ours MA w{small} (check)": ours.state_bytes(),
        f"ours MA w{small} bf16 window (check)": bf16.state_bytes(),
    }
    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in variants}
    for r in range(6 * settings.large_rounds + 2):  # cheap rounds; many, as the spread is wide
        for key, fn in variants.items():
            copy_s, fn_s = bench.measure(fn)
            if r > 1:
                samples[key].append((copy_s, fn_s))
    out: dict[str, Any] = {"params": numel, "tensors": len(bench.params), "window": small, "filters": {}}
    out["state_bytes"] = state_bytes_table(settings)
    for key, rows in samples.items():
        ratios = [fn_s / c_s for c_s, fn_s in rows]
        out["filters"][key] = {
            "time_s": median([s[1] for s in rows]),
            "copy_s": median([s[0] for s in rows]),
            "ratio_to_copy": median(ratios),
            "ratio_to_copy_min": min(ratios),
            "ratio_to_copy_max": max(ratios),
            "state_bytes_per_param": held[key] / numel if key in held else math.nan,
        }
    return out


def state_bytes_table(settings: Settings) -> dict[str, dict[str, float]]:
    """Bytes of filter state per parameter, for every filter x gradient dtype x ``state_dtype`` (exact counts)."""
    model = FlatModel(20_000, torch.device("cpu"))
    numel = sum(p.numel() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    out: dict[str, dict[str, float]] = {}
    for spec in filter_specs(settings.windows):
        for grad_dtype in (torch.float32, torch.bfloat16):
            for state_dtype in ("float32", "bfloat16", None):
                kwargs = dict(spec.ours)
                filt = GradientFilter(kwargs.pop("filter"), **kwargs, state_dtype=state_dtype)
                filt.step(names, [torch.zeros_like(p, dtype=grad_dtype) for p in model.parameters()], amplify=False)
                key = f"{spec.key} / grads {str(grad_dtype).removeprefix('torch.')}"
                out.setdefault(key, {})[str(state_dtype)] = filt.state_bytes() / numel
    return out
