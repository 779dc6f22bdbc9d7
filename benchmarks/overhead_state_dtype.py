"""Does a bfloat16 filter state change grokking? Steps to 95 % on the modular task, float32 state vs bfloat16.

The paper's model and task (``x*y mod 97``, the paper's seeds, split and batch order, float32 training), one
``Trainer.fit`` per run (``benchmarks/grokking_common.run_one``), with ``GrokfastCallback(state_dtype=...)``:

* EMA (alpha 0.98, lamb 2, weight decay 0.005), state float32 vs bfloat16 (4 vs 2 bytes per parameter);
* MA (window 100, lamb 5, weight decay 0.01), window float32 vs bfloat16 (404 vs 204 bytes per parameter; the
  running sum stays float32).

Run ``python benchmarks/overhead_state_dtype.py`` (EMA and MA, seeds 0 1 2: 12 runs of about 1-3 minutes each on
one CPU core) or ``--filters ema --seeds 0``. Writes ``results/state_dtype_grokking.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, quiet_lightning
from grokking_common import TASKS, Method, Settings, run_one
from overhead_common import RESULTS

ROWS: dict[str, tuple[dict[str, Any], float]] = {
    "ema": ({"filter": "ema", "alpha": 0.98, "lamb": 2.0}, 0.005),
    "ma": ({"filter": "ma", "window_size": 100, "lamb": 5.0}, 0.01),
}
DTYPES = ("float32", "bfloat16")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (filter, state dtype, seed), print the table, write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filters", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, help="cap per run (default: the task's, 3000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stem", default="state_dtype_grokking")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    task = TASKS["modular"]
    settings = Settings(seeds=args.seeds, max_steps=args.max_steps)
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    started = time.perf_counter()
    for key in args.filters:
        kwargs, weight_decay = ROWS[key]
        for seed in args.seeds:
            for dtype in DTYPES:
                method = Method(f"{key}_{dtype}", f"{key} state {dtype}", grokfast={**kwargs, "state_dtype": dtype})
                result = run_one(task, method, seed, settings, weight_decay=weight_decay)
                runs.append({**result, "filter": key, "state_dtype": dtype})
                report = write(runs, argv, args.out_dir, args.stem, time.perf_counter() - started)  # after every run
    print(markdown(runs))
    return report


def write(
    runs: list[dict[str, Any]], argv: list[str] | None, out_dir: Path, stem: str, seconds: float
) -> dict[str, Any]:
    """Write the JSON (every run so far, without curves) and the markdown table."""
    command = " ".join(["python", "benchmarks/overhead_state_dtype.py", *(argv if argv is not None else sys.argv[1:])])
    report = {
        "command": command,
        "environment": environment("cpu"),
        "seconds": seconds,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(f"<!-- {command} -->\n{markdown(runs)}\n")
    return report


def markdown(runs: list[dict[str, Any]]) -> str:
    """One row per (filter, seed): steps to 95 % with float32 state and with bfloat16 state."""
    lines = [
        "| filter | seed | steps to 95 %, float32 state | bfloat16 state | final val acc f32 / bf16 |",
        "|---|---|---|---|---|",
    ]
    by_key = {(r["filter"], r["seed"], r["state_dtype"]): r for r in runs}
    for key, seed in dict.fromkeys((r["filter"], r["seed"]) for r in runs):
        f32, bf16 = by_key.get((key, seed, "float32")), by_key.get((key, seed, "bfloat16"))

        def steps(run: dict[str, Any] | None) -> str:
            if run is None:
                return "n/a"
            reached = run["steps_to"].get("0.95")
            return str(reached) if reached is not None else f"not by {run['cap']}"

        def acc(run: dict[str, Any] | None) -> str:
            return "n/a" if run is None or run["final_val_acc"] is None else f"{run['final_val_acc']:.3f}"

        lines.append(f"| {key} | {seed} | {steps(f32)} | {steps(bf16)} | {acc(f32)} / {acc(bf16)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
