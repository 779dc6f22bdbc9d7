"""Wall-clock time of one ``lightning-grokfast tune`` study run by 1 worker and by 2 workers on one SQLite file.

Every trial costs the same (the search space is one filter with ``lamb`` drawn from a narrow range and the target
cannot be reached, so each trial trains exactly ``--steps`` steps), so the comparison measures the workers, not the
sampler's luck. The settings differ from trial to trial on purpose: ``tune`` does not train a setting it has already
finished again, so a fixed setting would time one training and many look-ups. One worker runs
``--trials`` trials; then two workers, started together on a new storage file, run ``--trials / 2`` each.

    python benchmarks/grokking_tune_workers.py --trials 8 --steps 1000    # writes results/grokking_tune_workers.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "lightning_grokfast" / "configs" / "digits_baseline.yaml"


def run_workers(workers: int, trials_each: int, steps: int, folder: Path) -> float:
    """Seconds from starting ``workers`` tune processes on a fresh storage to the last one's end."""
    space = folder / "space.yaml"
    space.write_text("filter: ma\nwindow_size: [73]\nlamb: {low: 2.0, high: 2.3}\n")
    storage = f"sqlite:///{folder / f'workers{workers}.db'}"
    command = [sys.executable, "-c", "from lightning_grokfast.cli import main; main()", "tune", "--config", str(CONFIG)]
    command += ["--storage", storage, "--n-trials", str(trials_each), "--search-space", str(space)]
    command += ["--target", "1.01", "--pruner", "none", "--sampler", "random", f"--trainer.max_steps={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    processes = [
        subprocess.Popen([*command, "--sampler-seed", str(worker)], env=env, stdout=subprocess.DEVNULL)
        for worker in range(workers)
    ]
    if any(p.wait() != 0 for p in processes):
        raise SystemExit(f"a worker failed: {' '.join(command)}")
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name="digits_baseline", storage=storage)
    assert len(study.trials) == workers * trials_each
    settings = {trial.params["lamb"] for trial in study.trials}
    assert len(settings) == len(study.trials), "two trials drew the same setting: one of them was not trained"
    return seconds


def main(argv: list[str] | None = None) -> None:
    """Time 1 worker x N trials and 2 workers x N/2 trials; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="trials of the study (default 8)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of every trial (default 1000)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        one = run_workers(1, args.trials, args.steps, Path(folder))
        two = run_workers(2, args.trials // 2, args.steps, Path(folder))
    load_after = os.getloadavg()[0]
    command = " ".join(["python benchmarks/grokking_tune_workers.py", *(argv if argv is not None else sys.argv[1:])])
    table = (
        f"<!-- {command} -->\n"
        f"| workers | trials | wall clock | speed-up |\n|---|---|---|---|\n"
        f"| 1 | {args.trials} | {one:.0f} s | 1.0x |\n"
        f"| 2 | {args.trials} ({args.trials // 2} each) | {two:.0f} s | {one / two:.2f}x |\n"
        f"\nDigits task (`configs/digits_baseline.yaml`), {args.steps} steps per trial, one thread per worker,"
        f" {os.cpu_count()} CPU cores; load average {load_before:.1f} before, {load_after:.1f} after.\n"
    )
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "grokking_tune_workers.md").write_text(table)


if __name__ == "__main__":
    main()
