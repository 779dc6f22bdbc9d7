"""The drop-in functions against the published ones: time per call of ``gradfilter_ema`` / ``gradfilter_ma``.

``lightning_grokfast.integrations.functional`` (same arguments and contract as the paper's functions, O(1) moving
average, non-finite guard) against the published algorithm as written in ``benchmarks/reference.py`` (one Python
iteration per parameter, the window re-summed every step), on the paper's transformer and on a 5M-parameter MLP. Windows
start full (the steady state). Prints a markdown table and writes ``benchmarks/results/dropin.{json,md}``.

    python benchmarks/dropin.py              # about 2 minutes on a 2-core CPU
    python benchmarks/dropin.py --smoke      # seconds: tiny model, few calls (for the tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import environment
from reference import gradfilter_ema_reference, gradfilter_ma_reference, prefilled_ma_state
from torch import nn

from lightning_grokfast.integrations.functional import gradfilter_ema, gradfilter_ma
from lightning_grokfast.tasks import GrokTransformer

RESULTS = Path(__file__).resolve().parent / "results"


def models(smoke: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    if smoke:
        return {"tiny MLP": nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))}
    mlp = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(5)])
    return {"paper transformer": GrokTransformer(num_tokens=99, num_classes=97), "5M MLP": mlp}


def time_calls(model: nn.Module, call: Callable[[Any], Any], state: Any, calls: int) -> float:
    """Median seconds of ``state = call(state)`` with fresh gradients before each call (not timed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]
    times = []
    for _ in range(calls):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        start = time.perf_counter()
        state = call(state)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm(model: nn.Module, call: Callable[[Any], Any], steps: int) -> Any:
    """Run ``steps`` calls (to fill our window); returns the state."""
    state = None
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        state = call(state)
    return state


def measure(name: str, model: nn.Module, window: int | None, calls: int) -> dict[str, Any]:
    if window is None:
        ours = time_calls(
            model, lambda s: gradfilter_ema(model, grads=s), warm(model, lambda s: gradfilter_ema(model, s), 1), calls
        )
        published = time_calls(model, lambda s: gradfilter_ema_reference(model, s), None, calls)
        kind = "EMA"
    else:
        ours_state = warm(model, lambda s: gradfilter_ma(model, grads=s, window_size=window), window)
        ours = time_calls(model, lambda s: gradfilter_ma(model, grads=s, window_size=window), ours_state, calls)
        del ours_state
        full = prefilled_ma_state(model, window)
        published = time_calls(model, lambda s: gradfilter_ma_reference(model, s, window_size=window), full, calls)
        kind = f"MA, window {window}"
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params": params, "filter": kind, "ours_s": ours, "published_s": published}


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | filter | ours (`lightning_grokfast.integrations.functional`) | published algorithm | speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['params'] / 1e6:.2f}M) | {r['filter']} | {r['ours_s'] * 1e3:.2f} ms |"
            f" {r['published_s'] * 1e3:.2f} ms | {r['published_s'] / r['ours_s']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few calls")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per cell (median reported)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    calls = 3 if args.smoke else args.calls
    rows = []
    for name, model in models(args.smoke).items():
        windows: list[int | None] = [None, 100] if name == "5M MLP" else [None, 100, 1000]
        for window in [None, 4] if args.smoke else windows:
            rows.append(measure(name, model, window, calls))
            print(render(rows[-1:]).splitlines()[-1], flush=True)
    table = render(rows)
    print(table)
    stem = "dropin_smoke" if args.smoke else "dropin"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.md").write_text(table)
    record = {"rows": rows, "environment": environment("cpu"), "command": "python benchmarks/dropin.py"}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
