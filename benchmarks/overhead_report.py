"""The markdown tables of the overhead benchmark (measurements only; the targets are in the README)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from overhead_common import (
    Settings,
    filter_specs,
    fmt_bytes,
    fmt_ms,
)

# ---------------------------------------------------------------------------------------------------- report
# The paper's latency per step (official code, GTX 1080 Ti, modular multiplication): no filter 0.15 s.
PAPER_STEP_RATIO = {"ema": 0.15 / 0.15, "ma": 0.37 / 0.15}


def headline_table(results: dict[str, Any], settings: Settings) -> list[str]:
    """One table with the paper, the published algorithm, ours and the anchors side by side."""
    small, large = settings.windows
    trainer = results.get("trainer", {})
    variants, anchors = trainer.get("variants", {}), trainer.get("anchors") or {}
    big = results.get("large", {})
    filters, rows = big.get("filters", {}), big.get("optimizer", {}).get("rows", {})

    def step(key: str) -> str:
        return ratio_spread(variants.get(key)) if key in variants else "n/a"

    def copy(name: str) -> str:
        return copy_spread(filters[name]) if name in filters else "n/a"

    def opt(name: str, which: str = "to_adamw") -> str:
        return ratio_spread(rows[name][which]) if name in rows and which in rows[name] else "n/a"

    def state(key: str) -> str:
        return fmt_bytes(variants[key].get("state_bytes_per_param")) if key in variants else "n/a"

    size = f"{big['params'] / 1e6:.0f}M" if big else "n/a"
    ma = results.get("ma", {})
    ma_size = f"{ma['params'] / 1e6:.1f}M" if ma else "n/a"
    ma_window = ma.get("window", small)

    def ma_copy(name: str) -> str:
        return copy_spread(ma["filters"][name]) if ma and name in ma["filters"] else "n/a"

    ema_ours = copy("ours EMA (check)") + " check; " + copy("ours EMA (found_inf)") + " found_inf"
    opt_ours = opt("ours EMA (check) + AdamW") + " check; " + opt("ours EMA (found_inf) + AdamW") + " found_inf"
    gfa_opt = opt("GrokFastAdamW on") + "; its own on / off " + opt("GrokFastAdamW on", "to_own_off")
    return [
        "**Side by side** (ratios; median and min-max over rounds)",
        "",
        "| figure | paper (official code, GPU) | published algorithm | lightning-grokfast | GrokFastAdamW"
        " | GrokAdamW |",
        "|---|---|---|---|---|---|",
        f"| EMA: training step / no filter (Trainer) | {PAPER_STEP_RATIO['ema']:.2f}x (0.15 s -> 0.15 s)"
        f" | {step('reference/ema')} | {step('ours/ema')} | {ratio_spread(anchors.get('GrokFastAdamW on / off'))}"
        f" (grokfast on / off) | {ratio_spread(anchors.get('GrokAdamW / torch AdamW'))} (/ torch AdamW) |",
        f"| MA w{small}: training step / no filter (Trainer) | {PAPER_STEP_RATIO['ma']:.2f}x (0.15 s -> 0.37 s)"
        f" | {step(f'reference/ma{small}')} | {step(f'ours/ma{small}')} | no MA | no MA |",
        f"| MA w{large}: training step / no filter (Trainer) | | {step(f'reference/ma{large}')}"
        f" | {step(f'ours/ma{large}')} | no MA | no MA |",
        f"| EMA filter alone / `foreach_copy_`, {size} params | | {copy('reference EMA')} | {ema_ours}"
        " | inside its step | inside its step |",
        f"| EMA floor (`lerp_` + `add_` only) / `foreach_copy_`, {size} params | | |"
        f" {copy('floor: lerp_ + add_ (2 foreach calls)')}"
        f"; compile=True {copy('ours EMA compile=True (check)')} | | |",
        f"| MA w{ma_window} filter alone / `foreach_copy_`, {ma_size} params | | |"
        f" {ma_copy(f'ours MA w{ma_window} (check)')} check;"
        f" floor (4 foreach calls) {ma_copy('floor: sub_, copy_, add_, add_ (4 foreach calls)')} | no MA | no MA |",
        f"| optimizer step with EMA / torch AdamW, {size} params | | {opt('reference EMA + AdamW')} (+ AdamW)"
        f" | {opt_ours} (+ AdamW) | {gfa_opt} | {opt('GrokAdamW')} |",
        f"| state bytes per parameter, EMA / MA w{small} / MA w{large} | | {state('reference/ema')} /"
        f" {state(f'reference/ma{small}')} / {state(f'reference/ma{large}')} | {state('ours/ema')} /"
        f" {state(f'ours/ma{small}')} / {state(f'ours/ma{large}')}"
        f" | {fmt_bytes(rows.get('GrokFastAdamW on', {}).get('state_bytes_per_param_beyond_adamw'))}"
        f" | {fmt_bytes(rows.get('GrokAdamW', {}).get('state_bytes_per_param_beyond_adamw'))} |",
        "",
    ]


def markdown(results: dict[str, Any], settings: Settings) -> str:
    """The README tables."""
    specs = filter_specs(settings.windows)
    shown = ("trainer", "large", "ma")
    lines: list[str] = headline_table(results, settings) if any(k in results for k in shown) else []
    if "glue" in results:
        lines += glue_table(results["glue"])
    for section, title in (
        ("trainer", "Training step of the paper's model through `Trainer.fit` (step with filter / step without)"),
        ("loop", "Training step of the paper's model in a plain PyTorch loop (step with filter / step without)"),
    ):
        if section not in results:
            continue
        variants = results[section]["variants"]
        base = statistics.median(v["baseline_step_s"] for v in variants.values())
        lines += [
            f"**{title}**, no-filter step {fmt_ms(base)} (median of blocks; spread = min-max over rounds)",
            "",
            "| filter | ours | published algorithm | state bytes/param: ours | published |",
            "|---|---|---|---|---|",
        ]
        for spec in specs:
            ours, ref = variants.get(f"ours/{spec.key}"), variants.get(f"reference/{spec.key}")
            lines.append(
                f"| {spec.label} | {ratio_spread(ours)} | {ratio_spread(ref) if ref else 'n/a'} "
                f"| {fmt_bytes(ours.get('state_bytes_per_param') if ours else None)} "
                f"| {fmt_bytes(ref.get('state_bytes_per_param') if ref else None)} |"
            )
        if section == "loop":
            lines += [
                "",
                "Filter call alone, timed inside the loop, as a share of the no-filter step: "
                + ", ".join(
                    f"{key} {100 * row['filter_share']:.2f} %"
                    for key, row in variants.items()
                    if not math.isnan(row.get("filter_share", math.nan))
                ),
            ]
        if "ours/ema_compile" in variants:
            row = variants["ours/ema_compile"]
            lines.append(
                f"| EMA, `compile=True` | {ratio_spread(row)} | n/a | {fmt_bytes(row.get('state_bytes_per_param'))} | |"
            )
        anchors = results[section].get("anchors") or {}
        for name, row in anchors.items():
            lines.append(f"| anchor: {name} | {ratio_spread(row)} | | | |")
        lines.append("")
    if "large" in results:
        large = results["large"]
        lines += [
            f"**Filter alone on {large['params'] / 1e6:.1f}M parameters / one `torch._foreach_copy_` of the same"
            f" gradients** (copy {fmt_ms(large['copy_s'])})",
            "",
            "| variant | filter / copy (median, min-max) |",
            "|---|---|",
        ]
        for name, row in large["filters"].items():
            lines.append(f"| {name} | {copy_spread(row)} |")
        lines += [
            "",
            f"**Optimizer step on {large['params'] / 1e6:.1f}M parameters / plain `torch.optim.AdamW` step**"
            f" (AdamW {fmt_ms(large['optimizer']['AdamW_s'])}, its state"
            f" {fmt_bytes(large['optimizer']['AdamW_state_bytes_per_param'])} bytes/param) and state beyond AdamW's",
            "",
            "| optimizer step | / AdamW (median, min-max over rounds) | state bytes/param beyond AdamW |",
            "|---|---|---|",
        ]
        for name, row in large["optimizer"]["rows"].items():
            extra = f"; on / off: {ratio_spread(row['to_own_off'])}" if "to_own_off" in row else ""
            lines.append(
                f"| {name} | {ratio_spread(row['to_adamw'])}{extra}"
                f" | {fmt_bytes(row['state_bytes_per_param_beyond_adamw'])} |"
            )
        lines.append("")
    if "ma" in results:
        ma = results["ma"]
        lines += [
            f"**MA window {ma['window']} alone on {ma['params'] / 1e6:.2f}M parameters / one `torch._foreach_copy_`**"
            " (memory floor: 6 tensor passes, 3x a copy's 2)",
            "",
            "| variant | filter / copy (median, min-max) | state bytes/param |",
            "|---|---|---|",
        ]
        for name, row in ma["filters"].items():
            lines.append(f"| {name} | {copy_spread(row)} | {fmt_bytes(row['state_bytes_per_param'])} |")
        lines += ["", *memory_table(ma["state_bytes"])]
    if "window" in results:
        window = results["window"]
        lines += [
            f"**Every filter alone on {window['params'] / 1e6:.2f}M parameters / one `torch._foreach_copy_`**"
            " (the largest window must fit in memory)",
            "",
            "| variant | filter / copy (median, min-max) | state bytes/param |",
            "|---|---|---|",
        ]
        for name, row in window["filters"].items():
            lines.append(f"| {name} | {copy_spread(row)} | {fmt_bytes(row['state_bytes_per_param'])} |")
        lines.append("")
    return "\n".join(lines)


def glue_table(glue: dict[str, Any]) -> list[str]:
    """Entry point / bare filter step on the paper's model (steps alternate within one run)."""
    lines = [
        f"**Glue: entry point / bare `GradientFilter.step` on the paper's model** (medians over {glue['steps']}"
        " alternating steps; goal: at most 1.0x + noise)",
        "",
        "| entry point | filter | entry point | bare filter step | ratio | glue |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in glue["variants"].items():
        entry = key.split("/")[0]
        lines.append(
            f"| {entry} | {row['label']} | {fmt_ms(row['entry_s'])} | {fmt_ms(row['filter_s'])}"
            f" | {row['ratio']:.2f}x | {fmt_ms(row['glue_s'])} |"
        )
    return [*lines, ""]


def memory_table(table: dict[str, dict[str, float]]) -> list[str]:
    """Bytes of filter state per parameter by filter, gradient dtype and ``state_dtype`` (exact counts)."""
    lines = [
        "**Filter state, bytes per parameter** (`state_dtype`; the MA running sum is float32 in every column)",
        "",
        "| filter / gradient dtype | float32 (default) | bfloat16 | None (gradient's dtype) |",
        "|---|---|---|---|",
    ]
    for key, row in table.items():
        lines.append(
            f"| {key} | {fmt_bytes(row['float32'])} | {fmt_bytes(row['bfloat16'])} | {fmt_bytes(row['None'])} |"
        )
    return [*lines, ""]


def ratio_spread(row: dict[str, float] | None) -> str:
    if not row or math.isnan(row.get("ratio", math.nan)):
        return "n/a"
    return f"{row['ratio']:.3f}x ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})"


def copy_spread(row: dict[str, float]) -> str:
    return f"{row['ratio_to_copy']:.2f}x ({row['ratio_to_copy_min']:.2f}-{row['ratio_to_copy_max']:.2f})"
