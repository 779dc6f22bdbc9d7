"""Grokfast state under FSDP2 on CPU processes (gloo): bytes per rank, and checkpoint save/load time with vs without it.

An MLP of ``--layers`` square ``Linear(--width, --width)`` layers (4 x 1024: 4.2M parameters) is sharded with
``fully_shard`` over ``--ranks`` processes, trained ``--steps`` steps with Adam and ``attach_grokfast``, then
checkpointed the way Fabric and Lightning's ``ModelParallelStrategy`` do it (``get_model_state_dict`` /
``get_optimizer_state_dict`` + ``torch.distributed.checkpoint.save``, and ``dcp.load`` into a template +
``set_optimizer_state_dict``). Two optimizers over the same sharded parameters hold the same Adam state; only one
carries the filter, so "with" / "without" differ by the filter state alone. Save and load are repeated
``--repeats`` times, alternating with and without; the medians are reported. During save and load every
``DTensor.full_tensor`` / ``redistribute`` call is counted (a gather of the state would go through them).
``benchmarks/sharded.py`` measures the same through Lightning's Trainer (separate fits with and without).

    python benchmarks/sharded_dcp.py            # EMA and MA (window 10), 2 ranks, 4 x 1024 (~2 min on 2 cores)
    python benchmarks/sharded_dcp.py --smoke    # tiny, writes sharded_dcp_smoke.*
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment

from lightning_grokfast import attach_grokfast

RESULTS = Path(__file__).parent / "results"


def count_gathers() -> dict[str, int]:
    """Count ``DTensor.full_tensor`` and ``redistribute`` calls from now on."""
    counts = {"full_tensor": 0, "redistribute": 0}
    for name in counts:
        original = getattr(DTensor, name)

        def counting(self: Any, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        setattr(DTensor, name, counting)
    return counts


def timed(fn: Any) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def save(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(path))


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def worker(rank: int, args: argparse.Namespace, kind: str, tmp: str, queue: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{kind}", rank=rank, world_size=args.ranks)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    plain = torch.optim.Adam(model.parameters(), lr=1e-4)
    filtered = torch.optim.Adam(model.parameters(), lr=1e-4)
    handle = attach_grokfast(filtered, kind, model=model, window_size=args.window)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        for optimizer in (filtered, plain):  # same gradients each: the two Adam states have the same size
            optimizer.zero_grad()
            model(torch.randn(16, args.width, generator=gen)).square().mean().backward()
            optimizer.step()
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    total_numel = sum(p.numel() for p in model.parameters())
    root = Path(tmp) / kind
    times: dict[str, list[float]] = {"save_with": [], "save_without": [], "load_with": [], "load_without": []}
    counts = count_gathers()
    for rep in range(args.repeats):
        for label, optimizer in (("with", filtered), ("without", plain)):
            path = root / f"{label}-{rep}"
            times[f"save_{label}"].append(timed(functools.partial(save, model, optimizer, path)))
            times[f"load_{label}"].append(timed(functools.partial(load, model, optimizer, path)))
    sizes = {label: dir_bytes(root / f"{label}-0") for label in ("with", "without")}
    queue.put(
        {
            "rank": rank,
            "local_numel": local_numel,
            "total_numel": total_numel,
            "state_bytes": handle.filter.state_bytes(),
            "filter_steps": handle.filter.steps,
            "gathers_during_checkpointing": dict(counts),
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "checkpoint_bytes": sizes,
        }
    )
    dist.barrier()
    dist.destroy_process_group()


def run_kind(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="grokfast-sharded-")
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(r, args, kind, tmp, queue)) for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        reports = sorted((queue.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"a worker exited with {proc.exitcode}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parts = kind.split("+")  # float32 state: the EMA; the window and its running sum
    per_element = 4 * (("ema" in parts) + (args.window + 1) * ("ma" in parts))
    for report in reports:
        report["expected_state_bytes"] = per_element * report["local_numel"]
    return {"kind": kind, "ranks": reports}


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.ranks} CPU processes (gloo), FSDP2 `fully_shard`, {results[0]['ranks'][0]['total_numel']:,} parameters"
        f" ({args.layers} x Linear({args.width}, {args.width})), Adam; medians of {args.repeats} save/load rounds.",
        "",
        "| filter | rank | shard params | filter state bytes | expected | save with / without (s) | "
        "load with / without (s) | checkpoint bytes with / without | gathers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for r in result["ranks"]:
            t, b = r["median_s"], r["checkpoint_bytes"]
            gathers = sum(r["gathers_during_checkpointing"].values())
            lines.append(
                f"| {result['kind']} | {r['rank']} | {r['local_numel']:,} | {r['state_bytes']:,} |"
                f" {r['expected_state_bytes']:,} | {t['save_with']:.3f} / {t['save_without']:.3f} |"
                f" {t['load_with']:.3f} / {t['load_without']:.3f} | {b['with']:,} / {b['without']:,} | {gathers} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["ema", "ma"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round; writes sharded_dcp_smoke.*")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.width, args.window, args.steps, args.repeats = 2, 16, 3, 2, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = [run_kind(args, kind) for kind in args.kinds]
    text = table(results, args)
    print(text)
    name = "sharded_dcp_smoke" if args.smoke else "sharded_dcp"
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/sharded_dcp.py " + " ".join(sys.argv[1:])
    record = {"command": command.strip(), "settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
    record["environment"] = environment("cpu")
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1))
    (args.out / f"{name}.md").write_text(f"`{command.strip()}`\n\n{text}")


if __name__ == "__main__":
    main()
