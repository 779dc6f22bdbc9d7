"""How large a block should the tiled CPU filter step use? EMA and MA step / a copy, by block size.

The filter step on a large CPU group runs the state update and the amplification block by block
(``ops.ema_amplify_tiled_``, ``ops.ma_amplify_tiled_``), so that each block of the gradient and of the state is
still in cache when it is used the second time. This sweeps the block size on ``--params`` parameters (48 tensors in
transformer shapes, float32, random gradients) against the untiled foreach calls, each timed / one
``torch._foreach_copy_`` of the same gradients, interleaved over ``--rounds`` rounds (median and min-max of the
paired ratios). The MA window has ``--window`` slots (its per-step cost does not depend on the window size).

Run ``python benchmarks/overhead_tiles.py --threads 1`` (about a minute on 50M parameters; 2.5 GB of memory).
Writes ``results/overhead_tiles.{json,md}``; ``lightning_grokfast.core.ops.TILE_ELEMENTS`` is the chosen block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment
from overhead_common import RESULTS, median

from lightning_grokfast.core import ops

BLOCKS = (65536, 131072, 262144, 524288, 1048576, 4194304)


def shapes(params: int) -> list[int]:
    """48 tensor sizes summing to about ``params`` (4 per layer of a 12-layer transformer: 3 large, 1 small)."""
    dim = int((params / 12 / 12) ** 0.5)
    return [n for _ in range(12) for n in (3 * dim * dim, dim * dim, 8 * dim * dim, dim)]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Sweep the block sizes, print the table, write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    pristine = [torch.randn(n, generator=generator) * 1e-3 for n in shapes(args.params)]
    grads = [g.clone() for g in pristine]
    ema = [g.clone() for g in pristine]
    ma_sum = [g * args.window for g in pristine]
    windows = [g.expand(args.window, -1).clone() for g in pristine]
    step = {"ma": 0}

    def slot() -> list[Tensor]:
        step["ma"] = (step["ma"] + 1) % args.window
        return [w[step["ma"]] for w in windows]

    def ema_untiled() -> None:
        ops.ema_update_(ema, grads, 0.02)
        ops.add_scaled_(grads, ema, 2.0)

    def ma_untiled() -> None:
        ops.ma_update_(ma_sum, slot(), grads)
        ops.add_scaled_(grads, ma_sum, 5.0 / args.window)

    variants: dict[str, Callable[[], None]] = {"ema untiled (2 foreach calls)": ema_untiled}
    for block in BLOCKS:
        variants[f"ema block {block // 1024} Ki"] = lambda b=block: ops.ema_amplify_tiled_(ema, grads, 0.02, 2.0, b)
    variants["ma untiled (4 foreach calls)"] = ma_untiled
    for block in BLOCKS:
        variants[f"ma block {block // 1024} Ki"] = lambda b=block: ops.ma_amplify_tiled_(
            ma_sum, slot(), grads, 5.0 / args.window, b
        )
    ratios: dict[str, list[float]] = {key: [] for key in variants}
    for r in range(args.rounds + 1):  # round 0: warm-up
        for key, fn in variants.items():
            copy_s = timed(lambda: torch._foreach_copy_(grads, pristine))
            fn_s = timed(fn)
            if r:
                ratios[key].append(fn_s / copy_s)
    rows = {k: {"ratio": median(v), "min": min(v), "max": max(v)} for k, v in ratios.items()}
    command = " ".join(["python", "benchmarks/overhead_tiles.py", *(argv if argv is not None else sys.argv[1:])])
    report = {
        "command": command,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "params": sum(p.numel() for p in pristine),
        "environment": environment("cpu"),
        "rows": rows,
    }
    lines = [f"<!-- {command} -->", "| variant | step / copy (median, min-max) |", "|---|---|"]
    lines += [f"| {k} | {r['ratio']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) |" for k, r in rows.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "overhead_tiles.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "overhead_tiles.md").write_text(table)
    return report


if __name__ == "__main__":
    main()
