"""How much sooner the paper's model groks with Grokfast, trained through the real Lightning Trainer.

Task and model are the paper's: ``x * y mod 97`` (x in [0, 97), y in [1, 97)), a random half for training, the
2-layer width-128 decoder-only transformer, Adam (lr 1e-3, betas 0.9/0.98, coupled weight decay, 10 warm-up
updates), batch 512. Each run is a ``Trainer.fit`` that validates on the whole validation half every
``--val-every`` optimizer steps, records the first step and the wall-clock time (from the start of training,
validation included) at which validation accuracy reaches 50 %, 90 % and 95 %, and stops at 95 % or at its step
cap. A seed sets the train/validation split and the initialization (``seed_everything``).

Configurations (``--configs``):

``baseline_wd0``, ``baseline_wd0.005``, ``baseline_wd0.01``
    No filter; the paper's baseline uses weight decay 0, the filtered runs 0.005 (EMA) and 0.01 (MA), so the
    baseline is also run at those, to separate the filter's effect from the weight decay's. Capped at
    ``--max-steps-baseline`` (the paper needs 39,890 steps at weight decay 0: "not reached by N" is a result).
``ema``
    ``GrokfastCallback(filter="ema", alpha=0.98, lamb=2.0)``, weight decay 0.005.
``ma``
    ``GrokfastCallback(filter="ma", window_size=100, lamb=5.0)``, weight decay 0.01.
``ema_detector``
    ``ema`` plus ``GrokkingDetectorCallback(lambda_boost=1.5, max_lamb=4.0)`` (the boost of
    ``configs/ema_detector.yaml``; its own convergence stop is off so every run stops at the same 95 % mark).
``grokfastadamw``, ``grokadamw`` (not in the default set: ``--configs all``)
    The PyPI anchors as the optimizer, with the paper's numbers given to their arguments of the same name
    (lr 1e-3, betas 0.9/0.98, weight_decay 0.005, alpha 0.98, lamb 2) and their other defaults; their weight
    decay is decoupled and, for GrokFastAdamW, not multiplied by lr, so it is not the same regularization.

Modes: default (seeds 0 1 2, about 40 minutes on a 2-core CPU), ``--quick`` (seed 0, small caps),
``--smoke`` (tiny task, seconds, for the tests). Prints a markdown table and writes
``benchmarks/results/grokking{,_quick,_smoke}.{json,png,md}``; the JSON is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_grokfast import GrokfastCallback
from lightning_grokfast.tasks import GrokTransformer, ModularArithmeticDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, quiet_lightning

RESULTS = Path(__file__).resolve().parent / "results"
MARKS = (0.5, 0.9, 0.95)
PAPER_BASELINE_STEPS = 39_890  # modular multiplication p=97, no filter, weight decay 0 (official repository)


@dataclass(frozen=True)
class RunConfig:
    """One row of the table."""

    name: str
    label: str
    weight_decay: float
    grokfast: dict[str, Any] | None = None
    detector: dict[str, Any] | None = None
    anchor: str | None = None
    paper_steps_95: int | None = None

    @property
    def is_baseline(self) -> bool:
        return self.grokfast is None and self.anchor is None


EMA = {"filter": "ema", "alpha": 0.98, "lamb": 2.0}
CONFIGS: dict[str, RunConfig] = {
    c.name: c
    for c in (
        RunConfig("baseline_wd0", "no filter, wd 0", 0.0, paper_steps_95=PAPER_BASELINE_STEPS),
        RunConfig("baseline_wd0.005", "no filter, wd 0.005", 0.005),
        RunConfig("baseline_wd0.01", "no filter, wd 0.01", 0.01),
        RunConfig("ema", "EMA alpha 0.98 lamb 2, wd 0.005", 0.005, grokfast=EMA, paper_steps_95=910),
        RunConfig(
            "ma",
            "MA window 100 lamb 5, wd 0.01",
            0.01,
            grokfast={"filter": "ma", "window_size": 100, "lamb": 5.0},
            paper_steps_95=790,
        ),
        RunConfig(
            "ema_detector",
            "EMA + detector boost (x1.5, max lamb 4), wd 0.005",
            0.005,
            grokfast=EMA,
            detector={"lambda_boost": 1.5, "max_lamb": 4.0},
        ),
        RunConfig("grokfastadamw", "anchor: GrokFastAdamW (grokfast-pytorch)", 0.005, anchor="grokfastadamw"),
        RunConfig("grokadamw", "anchor: GrokAdamW (grokadamw)", 0.005, anchor="grokadamw"),
    )
}
DEFAULT_CONFIGS = ["baseline_wd0", "baseline_wd0.005", "baseline_wd0.01", "ema", "ma", "ema_detector"]


@dataclass
class Settings:
    """Sizes and caps of one benchmark invocation."""

    mode: str = "full"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_steps: int = 5000
    max_steps_baseline: int = 3000
    val_every: int = 10
    p: int = 97
    dim: int = 128
    num_layers: int = 2
    batch_size: int = 512
    device: str = "cpu"
    progress_every: int = 0

    @classmethod
    def for_mode(cls, mode: str) -> Settings:
        if mode == "quick":
            return cls(mode=mode, seeds=[0], max_steps=2500, max_steps_baseline=1500)
        if mode == "smoke":
            return cls(
                mode=mode, seeds=[0], max_steps=12, max_steps_baseline=6, val_every=3, p=23, dim=32, batch_size=64
            )
        return cls()

    def cap(self, config: RunConfig) -> int:
        return self.max_steps_baseline if config.is_baseline else self.max_steps


# ---------------------------------------------------------------------------------------------------- one run
class MilestoneCallback(Callback):
    """Records the first step and time at which validation accuracy reaches each mark; stops at the last mark.

    Args:
        marks: validation accuracies to record, ascending.
        metric: the validation metric in ``trainer.callback_metrics``.

    """

    def __init__(self, marks: tuple[float, ...] = MARKS, metric: str = "val_acc", progress_every: int = 0) -> None:
        self.progress_every = progress_every
        self.marks = marks
        self.metric = metric
        self.steps: dict[float, int] = {}
        self.seconds: dict[float, float] = {}
        self.curve: list[tuple[int, float, float]] = []  # (step, val_acc, train_acc)
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        val = float(metrics[self.metric])
        train = metrics.get("train_acc_step", metrics.get("train_acc", torch.tensor(math.nan)))
        step = trainer.global_step
        self.curve.append((step, val, float(train)))
        for mark in self.marks:
            if mark not in self.steps and val >= mark:
                self.steps[mark] = step
                self.seconds[mark] = time.perf_counter() - self._start
        if self.progress_every and step % self.progress_every < trainer.val_check_interval:
            print(f"[grokking] step {step}: val_acc {val:.4f} train_acc {float(train):.4f}", flush=True)
        if val >= self.marks[-1]:
            trainer.should_stop = True


class _AnchorModel(GrokTransformer):
    """The paper's model with a PyPI anchor as its optimizer (same linear warm-up)."""

    anchor: str = ""

    def configure_optimizers(self):  # type: ignore[override]
        warnings.filterwarnings("ignore", module="grokadamw")
        warnings.filterwarnings("ignore", message=".*autocast.*")
        hp = self.hparams
        common = {"lr": hp.lr, "betas": tuple(hp.betas), "weight_decay": hp.weight_decay}
        if self.anchor == "grokfastadamw":
            from grokfast_pytorch import GrokFastAdamW

            optimizer = GrokFastAdamW(self.parameters(), grokfast_alpha=0.98, grokfast_lamb=2.0, **common)
        else:
            import logging

            level = logging.getLogger().level
            from grokadamw import GrokAdamW  # its import sets the root logger to INFO

            logging.getLogger().setLevel(level)
            optimizer = GrokAdamW(self.parameters(), alpha_init=0.98, lamb=2.0, **common)
        warmup = hp.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _detector_class() -> type[Callback] | None:
    try:
        from lightning_grokfast import GrokkingDetectorCallback
    except ImportError:
        return None
    return GrokkingDetectorCallback


def run_one(config: RunConfig, seed: int, settings: Settings) -> dict[str, Any]:
    """Train one configuration with one seed; return its milestones and curve."""
    pl.seed_everything(seed, verbose=False)
    datamodule = ModularArithmeticDataModule(operation="*", p=settings.p, batch_size=settings.batch_size, seed=seed)
    model_class = _AnchorModel if config.anchor else GrokTransformer
    model = model_class(
        num_tokens=datamodule.num_tokens,
        dim=settings.dim,
        num_layers=settings.num_layers,
        weight_decay=config.weight_decay,
    )
    if config.anchor:
        model.anchor = config.anchor
    milestones = MilestoneCallback(progress_every=settings.progress_every)
    callbacks: list[Callback] = [milestones]
    grokfast = GrokfastCallback(**config.grokfast) if config.grokfast else None
    if grokfast is not None:
        callbacks.append(grokfast)
    detector = None
    if config.detector:
        detector_class = _detector_class()
        if detector_class is None:
            raise RuntimeError("lightning_grokfast.GrokkingDetectorCallback is not available")
        detector = detector_class(
            train_metric="train_acc",
            val_metric="val_acc",
            stop_on_convergence=False,
            verbose=False,
            **config.detector,
        )
        callbacks.append(detector)
    cap = settings.cap(config)
    trainer = pl.Trainer(
        accelerator="gpu" if settings.device == "cuda" else settings.device,
        devices=1,
        max_steps=cap,
        max_epochs=-1,
        val_check_interval=settings.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    result: dict[str, Any] = {
        "config": config.name,
        "seed": seed,
        "cap": cap,
        "steps_run": trainer.global_step,
        "wall_s": wall,
        "steps_to": {str(m): milestones.steps.get(m) for m in MARKS},
        "seconds_to": {str(m): milestones.seconds.get(m) for m in MARKS},
        "final_val_acc": milestones.curve[-1][1] if milestones.curve else None,
        "curve": milestones.curve,
    }
    if grokfast is not None:
        result["final_lamb"] = grokfast.lamb
    if detector is not None:
        result["detector"] = {
            "phase": detector.phase,
            "transitions": [{"phase": t.phase, "step": t.step} for t in detector.transitions],
        }
    return result


# ---------------------------------------------------------------------------------------------------- summary
def _median_low(values: list[float]) -> float:
    return statistics.median(values) if all(math.isfinite(v) for v in values) else statistics.median_low(values)


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per configuration and mark: median and spread of the steps and seconds over seeds (unreached = inf)."""
    out: dict[str, Any] = {}
    for name in names:
        rows = [r for r in runs if r["config"] == name]
        if not rows:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rows], "cap": max(r["cap"] for r in rows), "marks": {}}
        for mark in map(str, MARKS):
            steps = sorted(math.inf if r["steps_to"][mark] is None else r["steps_to"][mark] for r in rows)
            secs = sorted(math.inf if r["seconds_to"][mark] is None else r["seconds_to"][mark] for r in rows)
            entry["marks"][mark] = {
                "reached": sum(math.isfinite(s) for s in steps),
                "steps_median": _median_low(steps),
                "steps_min": steps[0],
                "steps_max": steps[-1],
                "seconds_median": _median_low(secs),
                "seconds_min": secs[0],
                "seconds_max": secs[-1],
            }
        out[name] = entry
    return out


def _steps(value: float, cap: int) -> str:
    return f"{value:,.0f}" if math.isfinite(value) else f"> {cap:,}"


def _cell(mark: dict[str, Any], cap: int, unit: str = "steps") -> str:
    n = mark["reached"]
    if unit == "steps":
        med, lo, hi = (_steps(mark[f"steps_{k}"], cap) for k in ("median", "min", "max"))
    else:
        med, lo, hi = (
            f"{mark[f'seconds_{k}']:.0f} s" if math.isfinite(mark[f"seconds_{k}"]) else "not reached"
            for k in ("median", "min", "max")
        )
    if n == 0:
        return f"not reached by {cap:,}" if unit == "steps" else "n/a"
    return med if lo == hi else f"{med} ({lo} - {hi})"


def _speedup(summary: dict[str, Any], baseline: str | None, steps: float) -> str:
    """Baseline steps to 95 % / ours; a lower bound when the baseline hit its cap; "" when nothing can be said."""
    if baseline is None or baseline not in summary or not math.isfinite(steps):
        return ""
    base = summary[baseline]["marks"]["0.95"]["steps_median"]
    if math.isfinite(base):
        return f"{base / steps:.1f}x"
    cap = summary[baseline]["cap"]
    return f"> {cap / steps:.1f}x" if cap > steps else f"(cap {cap:,} too low)"


def markdown(summary: dict[str, Any], settings: Settings) -> str:
    """The README table."""
    lines = [
        f"Optimizer steps to validation accuracy marks, median (min - max) over {len(settings.seeds)} seed(s);"
        f' wall-clock time includes validation every {settings.val_every} steps; "not reached by N": N is the'
        " run's step cap. Speed-up: steps to 95 % without filter / with.",
        "",
        "| run | 50 % | 90 % | 95 % | time to 95 % | reached 95 % | speed-up vs no filter wd 0 | vs no filter,"
        " same wd | paper: steps to 95 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    baselines = {CONFIGS[n].weight_decay: n for n in summary if CONFIGS[n].is_baseline}
    for name, entry in summary.items():
        config, cap, marks = CONFIGS[name], entry["cap"], entry["marks"]
        steps = marks["0.95"]["steps_median"]
        vs_wd0 = vs_same = ""
        if not config.is_baseline:
            vs_wd0 = _speedup(summary, baselines.get(0.0), steps)
            vs_same = _speedup(summary, baselines.get(config.weight_decay), steps)
        paper = f"{config.paper_steps_95:,}" if config.paper_steps_95 else ""
        if config.paper_steps_95 and not config.is_baseline:
            paper += f" ({PAPER_BASELINE_STEPS / config.paper_steps_95:.0f}x vs wd 0)"
        reached = f"{marks['0.95']['reached']}/{len(entry['seeds'])}"
        lines.append(
            f"| {config.label} | {_cell(marks['0.5'], cap)} | {_cell(marks['0.9'], cap)} | {_cell(marks['0.95'], cap)}"
            f" | {_cell(marks['0.95'], cap, 'seconds')} | {reached} | {vs_wd0} | {vs_same} | {paper} |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Validation-accuracy curves (left) and median steps to 95 % with min-max bars, log scale (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.get_cmap("tab10")
    names = list(summary)
    for i, name in enumerate(names):
        for j, run in enumerate(r for r in runs if r["config"] == name):
            if not run["curve"]:
                continue
            steps, val, train = zip(*[(max(s, 1), v, t) for s, v, t in run["curve"]])
            label = CONFIGS[name].label if j == 0 else None
            curves.plot(steps, val, color=colors(i), alpha=0.85, lw=1.2, label=label)
            curves.plot(steps, train, color=colors(i), alpha=0.3, lw=0.8, ls="--")
    curves.set_xscale("log")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("validation accuracy")
    curves.axhline(0.95, color="grey", lw=0.8, ls=":")
    curves.legend(fontsize=7, loc="upper left")
    curves.set_title("x*y mod 97: validation (solid) and train batch (dashed) accuracy, every seed")
    paper_labelled = False
    for i, name in enumerate(names):
        mark, cap = summary[name]["marks"]["0.95"], summary[name]["cap"]
        reached = math.isfinite(mark["steps_median"])
        height = mark["steps_median"] if reached else cap
        lo = mark["steps_min"] if math.isfinite(mark["steps_min"]) else cap
        hi = mark["steps_max"] if math.isfinite(mark["steps_max"]) else cap
        bars.bar(i, height, color=colors(i), hatch=None if reached else "//", alpha=1.0 if reached else 0.4)
        bars.errorbar(i, height, yerr=[[height - lo], [hi - height]], color="black", capsize=4)
        bars.text(i, height * 1.1, f"{height:,.0f}" if reached else f"> {cap:,}", ha="center", fontsize=8)
        paper = CONFIGS[name].paper_steps_95
        if paper:
            bars.plot(
                [i], [paper], marker="x", color="black", ms=8, label="paper's steps" if not paper_labelled else None
            )
            paper_labelled = True
    bars.axhline(PAPER_BASELINE_STEPS, color="grey", ls="--", lw=0.8)
    bars.text(-0.4, PAPER_BASELINE_STEPS * 0.8, "paper: no filter, wd 0: 39,890", ha="left", va="top", fontsize=8)
    bars.set_yscale("log")
    bars.set_ylim(bottom=100)
    if paper_labelled:
        bars.legend(fontsize=8, loc="lower right")
    bars.set_xticks(range(len(names)), [CONFIGS[n].name for n in names], rotation=25, ha="right", fontsize=8)
    bars.set_ylabel("steps to 95 % validation accuracy (median, min-max)")
    bars.set_title("hatched: not reached by the cap")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected configurations and seeds; write JSON, PNG and the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="seed 0 only, caps 2500 (filtered) / 1500 (no filter)")
    mode.add_argument("--smoke", action="store_true", help="tiny task and a few steps (for the tests)")
    parser.add_argument("--configs", nargs="+", help=f"names from {list(CONFIGS)}, or 'all' (default: no anchors)")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--max-steps", type=int, help="step cap of filtered runs (default 5000)")
    parser.add_argument("--max-steps-baseline", type=int, help="step cap of the no-filter runs (default 3000)")
    parser.add_argument("--val-every", type=int, help="validate every this many optimizer steps (default 10)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--resume", action="store_true", help="keep finished runs of the same settings in the JSON")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", help="file name stem of the results (default: grokking, grokking_quick, ...)")
    parser.add_argument("--progress-every", type=int, default=0, help="print validation accuracy every N steps")
    args = parser.parse_args(argv)

    settings = Settings.for_mode("smoke" if args.smoke else "quick" if args.quick else "full")
    for name in ("seeds", "max_steps", "max_steps_baseline", "val_every"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only add contention on a busy machine
    names = _resolve_configs(args.configs, smoke=args.smoke)
    quiet_lightning()

    stem = args.stem or {"full": "grokking", "quick": "grokking_quick", "smoke": "grokking_smoke"}[settings.mode]
    settings.progress_every = args.progress_every
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{stem}.json"
    runs = _previous_runs(json_path, settings) if args.resume else []
    done = {(r["config"], r["seed"]) for r in runs}
    command = " ".join(["python", "benchmarks/grokking.py", *(argv if argv is not None else sys.argv[1:])])
    report: dict[str, Any] = {}
    started = time.perf_counter()
    for name in names:
        for seed in settings.seeds:
            if (name, seed) in done:
                continue
            result = run_one(CONFIGS[name], seed, settings)
            runs.append(result)
            reached = {m: result["steps_to"][m] for m in result["steps_to"]}
            print(f"[grokking] {name} seed {seed}: steps to {reached}, {result['wall_s']:.0f} s", flush=True)
            report = _report(command, settings, names, runs, time.perf_counter() - started)
            json_path.write_text(json.dumps(report, indent=1) + "\n")
    if not report:
        report = _report(command, settings, names, runs, time.perf_counter() - started)
    table = markdown(report["summary"], settings)
    print()
    print(table)
    (args.out_dir / f"{stem}.md").write_text(f"<!-- {command} -->\n{table}")
    plot(runs, report["summary"], args.out_dir / f"{stem}.png")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[grokking] wrote {json_path}, {stem}.md and {stem}.png")
    return report


def _resolve_configs(requested: list[str] | None, smoke: bool) -> list[str]:
    if not requested:
        names = list(DEFAULT_CONFIGS)
    elif requested == ["all"]:
        names = list(CONFIGS)
    else:
        unknown = [n for n in requested if n not in CONFIGS]
        if unknown:
            raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)} or 'all'")
        names = list(requested)
    if any(CONFIGS[n].detector for n in names) and _detector_class() is None:
        if not smoke:
            raise SystemExit("ema_detector needs lightning_grokfast.GrokkingDetectorCallback, which is missing")
        print("[grokking] SKIPPING ema_detector: lightning_grokfast.GrokkingDetectorCallback is not available")
        names = [n for n in names if not CONFIGS[n].detector]
    anchors = [n for n in names if CONFIGS[n].anchor]
    for name in anchors:
        module = "grokfast_pytorch" if name == "grokfastadamw" else "grokadamw"
        try:
            __import__(module)
        except ImportError:
            print(f"[grokking] SKIPPING {name}: {module} is not installed (`pip install -e .[bench]`)")
            names.remove(name)
    return names


def _previous_runs(path: Path, settings: Settings) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    if _comparable(previous.get("settings", {})) != _comparable(_settings_dict(settings)):
        print(f"[grokking] --resume: {path} has other settings; starting afresh")
        return []
    return previous["runs"]


def _settings_dict(settings: Settings) -> dict[str, Any]:
    return asdict(settings)


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != "seeds"}


def _report(
    command: str, settings: Settings, names: list[str], runs: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    return {
        "command": command,
        "settings": _settings_dict(settings),
        "configs": {n: asdict(CONFIGS[n]) for n in names},
        "environment": environment(settings.device),
        "seconds": seconds,
        "summary": summarize(runs, names),
        "runs": runs,
    }


if __name__ == "__main__":
    main()
