"""What Grokfast costs per optimizer step: ours, the paper's algorithm as published, and the PyPI anchors.

Six sections, each reported as ratios (times are printed next to them only to show the scale):

``glue``
    What the entry points cost around the maths on the paper's model: ``GrokfastCallback.on_before_optimizer_step``
    (in a real ``Trainer.fit``) and the ``attach_grokfast`` pre-hook (in a plain loop), each against a bare
    ``GradientFilter.step`` on the same gradients, alternating step by step (see ``overhead_glue.py``).
``trainer``
    Whole training step of the paper's model (``GrokTransformer`` on ``x*y mod 97``, batch 512) through the real
    ``lightning.pytorch.Trainer`` (no validation, no logger): step time with a filter / step time without. Our
    filters live in one ``fit`` (the published ones in another); a scheduler switches one of them on for a block of
    steps (one epoch), then none for a block, and so on (A/B/A/B). Off means ``enabled=False``: the hook returns at
    its first line. The figure is the median over rounds of (median step time of a filter block / median of the
    no-filter block just before it).
    The anchors are optimizers, so they get their own ``fit``: ``GrokFastAdamW`` with grokfast switched on and off
    between blocks, and ``GrokAdamW`` against ``torch.optim.AdamW`` (one optimizer object stepping either).
``loop``
    The same measurement in a plain PyTorch loop (no Lightning, no metrics): a smaller denominator, so a stricter
    ratio.
``large``
    About 50M parameters in transformer-like shapes with random gradients: (b) filter time alone divided by the
    time of one ``torch._foreach_copy_`` of the same gradients (the memory-traffic floor; measured just before each
    filter call, paired); (c) optimizer-step time with grokfast / plain ``torch.optim.AdamW`` for ours (filter +
    AdamW), the published algorithm (+ AdamW), ``GrokFastAdamW`` and ``GrokAdamW``; bytes of state per parameter
    beyond AdamW's. Also the EMA with a bfloat16 state, with ``compile=True`` (one fused kernel per tensor; the
    compile time is printed), and its foreach floor (``lerp_`` + ``add_``, nothing else).
``ma``
    MA window 100 alone / ``foreach_copy_`` on as many parameters as its window fits in ``--ma-memory-gb``: the
    default (check), AMP (found_inf), a bfloat16 window, and its foreach floor (sub, copy, add, add); and the
    exact bytes of state per parameter for every filter x gradient dtype x ``state_dtype``.
``window``
    Every filter, moving averages included, alone / ``foreach_copy_`` on as many parameters as the largest window
    allows within ``--ma-memory-gb``, one filter at a time (so MA w=100 and w=1000 run on the same tensors).

Our filter is measured two ways: "check" is the default (it verifies the gradients are finite with a
``_foreach_norm`` pass), "found_inf" is the AMP path (the scaler already knows, ``found_inf`` is passed in).
Moving averages are timed full (steady state): ours with ``warmup=False`` in the training sections (same work per
step as a full window), or pre-filled through ``step(amplify=False)``; the published one with a pre-filled window.

Run ``python benchmarks/overhead.py`` (all sections, under 10 minutes on a quiet 2-core CPU), ``--sections trainer
loop``, ``--smoke`` (seconds, for the tests), ``--device cuda``, ``--no-compile``.
Prints markdown tables and writes ``benchmarks/results/overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported by path
from common import environment, quiet_lightning
from overhead_common import (
    RESULTS,
    SECTIONS,
    Settings,
    block_schedule,
    paired_ratios,
)
from overhead_glue import run_glue_section
from overhead_large import (
    run_large_section,
    run_window_section,
)
from overhead_ma import run_ma_section
from overhead_report import (
    markdown,
)
from overhead_training import (
    run_loop_section,
    run_trainer_section,
)

__all__ = ["block_schedule", "main", "paired_ratios"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected sections, print the tables, write JSON and markdown."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (for the tests)")
    parser.add_argument("--rounds", type=int, help="A/B rounds of the training-step sections (default 5)")
    parser.add_argument("--params", type=int, help="parameters of the large section (default 50M)")
    parser.add_argument("--ma-memory-gb", type=float, help="memory for the largest window in `window` (default 6)")
    parser.add_argument("--large-rounds", type=int, help="interleaved rounds in `large` (default 5)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-anchors", action="store_true", help="leave out GrokFastAdamW and GrokAdamW")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile=True EMA row in `large`")
    parser.add_argument("--glue-steps", type=int, help="alternating steps per run in `glue` (default 200)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    settings = Settings.smoke_settings(device) if args.smoke else Settings(device=device)
    for name in ("rounds", "params", "ma_memory_gb", "large_rounds", "glue_steps"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.anchors = not args.no_anchors
    settings.compile = settings.compile and not args.no_compile
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only add contention on a busy machine
    quiet_lightning()

    runners = {
        "glue": run_glue_section,
        "trainer": run_trainer_section,
        "loop": run_loop_section,
        "large": run_large_section,
        "ma": run_ma_section,
        "window": run_window_section,
    }
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for section in SECTIONS:
        if section in args.sections:
            section_start = time.perf_counter()
            results[section] = runners[section](settings)
            gc.collect()
            print(f"[overhead] {section} done in {time.perf_counter() - section_start:.0f} s")
    report = {
        "command": " ".join(["python", "benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(settings).items() if k != "device"} | {"device": str(device)},
        "environment": environment(settings.device),
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    table = markdown(results, settings)
    print()
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "overhead_smoke" if settings.smoke else "overhead"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out_dir / f"{stem}.md").write_text(f"<!-- {report['command']} -->\n{table}\n")
    print(f"[overhead] wrote {args.out_dir / stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
