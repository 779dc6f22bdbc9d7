"""The engine of the grokking benchmarks: tasks, methods, one ``Trainer.fit`` per run, summaries, tables, figures.

``grokking.py`` (the paper's table on modular multiplication) and ``grokking_leaderboard.py`` (every method at
matched weight decay on every built-in task) are thin command lines over this module.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_grokfast import GrokfastCallback, GrokkingDetectorCallback
from lightning_grokfast.callbacks.auto import AUTO_BACKOFF, AUTO_FILTER
from lightning_grokfast.tasks import (
    DigitsDataModule,
    GrokTransformer,
    MLPClassifier,
    ModularArithmeticDataModule,
    SparseParityDataModule,
)
from lightning_grokfast.tasks.base import warmup_schedule

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_BASELINE_STEPS = 39_890  # modular multiplication p=97, no filter, weight decay 0 (official repository)


# ---------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A built-in task with its model, its matched weight decay, its accuracy marks (the last is the target)."""

    name: str
    label: str
    build: Callable[[int, float, str, bool], tuple[pl.LightningModule, pl.LightningDataModule]]
    weight_decay: float
    marks: tuple[float, ...]
    max_steps: int
    val_every: int
    ema: dict[str, Any]
    command: str  # the lightning-grokfast config of the task's no-filter run


def _modular(seed: int, weight_decay: float, loss: str, smoke: bool) -> tuple[Any, Any]:
    data = ModularArithmeticDataModule(p=23 if smoke else 97, batch_size=64 if smoke else 512, seed=seed)
    size = {"dim": 32, "num_heads": 2, "num_layers": 1} if smoke else {}
    return GrokTransformer(num_tokens=data.num_tokens, weight_decay=weight_decay, loss=loss, **size), data


def _parity(seed: int, weight_decay: float, loss: str, smoke: bool) -> tuple[Any, Any]:
    data = SparseParityDataModule(num_bits=30, k=3, num_train=200 if smoke else 1000, batch_size=1000, seed=seed)
    model = MLPClassifier(30, 2, hidden=32 if smoke else 512, optimizer="adamw", weight_decay=weight_decay, loss=loss)
    return model, data


def _digits(seed: int, weight_decay: float, loss: str, smoke: bool) -> tuple[Any, Any]:
    data = DigitsDataModule(num_train=500, batch_size=500, seed=seed)
    hidden = 32 if smoke else 200
    model = MLPClassifier(
        64, 10, hidden=hidden, depth=2, init_scale=16.0, optimizer="adamw", weight_decay=weight_decay, loss=loss
    )
    return model, data


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "modular",
            "x*y mod 97, transformer, Adam",
            _modular,
            0.005,
            (0.5, 0.9, 0.95),
            3000,
            10,
            {"filter": "ema", "alpha": 0.98, "lamb": 2.0},
            "configs/baseline.yaml --model.weight_decay 0.005",
        ),
        Task(
            "parity",
            "sparse parity (n=30, k=3, 1,000 train), MLP, AdamW",
            _parity,
            1.0,
            (0.6, 0.9, 0.95),
            15000,
            50,
            {"filter": "ema", "alpha": 0.98, "lamb": 2.0},
            "configs/parity_baseline.yaml",
        ),
        Task(
            "digits",
            "digits (500 train), MLP x16 init, AdamW",
            _digits,
            1.0,
            (0.5, 0.8, 0.9),
            5000,
            25,
            {"filter": "ema", "alpha": 0.8, "lamb": 0.1},  # the paper's MNIST setting
            "configs/digits_baseline.yaml",
        ),
    )
}


# ---------------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One row: a filter (``"ema"`` means the task's EMA setting), detector, optimizer anchor, loss, weight decay."""

    name: str
    label: str
    grokfast: dict[str, Any] | str | None = None
    detector: dict[str, Any] | None = None
    anchor: str | None = None
    loss: str = "cross_entropy"
    weight_decay: float | None = None  # None: the task's matched weight decay
    needs: tuple[str, ...] = ()  # GrokfastCallback arguments this row needs (added on main by the lead)
    #: more callbacks of the row, built from its GrokfastCallback (a rule that steers ``lamb``, say)
    extra: Callable[[GrokfastCallback], list[Callback]] | None = None

    def grokfast_kwargs(self, task: Task) -> dict[str, Any] | None:
        if self.grokfast is None:
            return None
        if isinstance(self.grokfast, str):
            return {**task.ema, **METHOD_EXTRAS.get(self.grokfast, {})}
        return dict(self.grokfast)


METHOD_EXTRAS = {"ema": {}, "ema_orthogonal": {"orthogonal": True}}
MA = {"filter": "ma", "window_size": 100, "lamb": 5.0}
EMA_MA = {"filter": "ema+ma", "alpha": 0.98, "lamb": 2.0, "window_size": 100, "ma_lamb": 5.0}
#: The back-off of ``auto_grokfast``: ``lamb`` x0.5 each time the train metric falls 0.02 below its best.
BACKOFF = {k: v for k, v in AUTO_BACKOFF.items() if k != "stop_on_convergence"}  # run_one never stops
#: The rows of both the leaderboard and the safe-default study.
SHARED_ROWS = (
    Method("none", "no filter"),
    Method("ema", "Grokfast EMA", grokfast="ema"),
    Method("ma", "Grokfast MA (w 100, lamb 5)", grokfast=MA),
    Method("ema_ma", "Grokfast EMA+MA", grokfast=EMA_MA),
)
AUTO_ROW = Method("auto", "auto (MA, lamb x0.5 at each train drop)", grokfast=AUTO_FILTER, detector=BACKOFF)


def missing_requirement(method: Method) -> str | None:
    """Why ``method`` cannot run here (an anchor package or a GrokfastCallback argument is missing), or None."""
    if method.anchor:
        module = "grokfast_pytorch" if method.anchor == "grokfastadamw" else "grokadamw"
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (`pip install -e .[bench]`)"
    parameters = inspect.signature(GrokfastCallback).parameters
    absent = [name for name in method.needs if name not in parameters]
    return f"GrokfastCallback has no {absent} yet" if absent else None


# ---------------------------------------------------------------------------------------------------- one run
class MilestoneCallback(Callback):
    """Records the first step and time at which validation accuracy reaches each mark; stops at the last mark.

    Args:
        marks: validation accuracies to record, ascending.
        metric: the validation metric in ``trainer.callback_metrics``.
        progress_every: print the accuracies about every this many steps (0: never).

    """

    def __init__(self, marks: tuple[float, ...], metric: str = "val_acc", progress_every: int = 0) -> None:
        self.marks = marks
        self.metric = metric
        self.progress_every = progress_every
        self.steps: dict[float, int] = {}
        self.seconds: dict[float, float] = {}
        self.curve: list[tuple[int, float, float]] = []  # (step, val_acc, train_acc)
        self._start = time.perf_counter()
        self._elapsed_before = 0.0  # training seconds of the run this one continues
        self.continued_at: list[int] = []  # steps at which the run was continued from a checkpoint

    @property
    def elapsed(self) -> float:
        """Seconds of training so far, including those before a resume."""
        return time.perf_counter() - self._start

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter() - self._elapsed_before
        if trainer.global_step > 0:
            self.continued_at.append(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "seconds": self.seconds,
            "curve": self.curve,
            "elapsed": self.elapsed,
            "continued_at": self.continued_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.seconds = dict(state_dict["steps"]), dict(state_dict["seconds"])
        self.curve = [(int(s), float(v), float(t)) for s, v, t in state_dict["curve"]]
        self._elapsed_before = float(state_dict["elapsed"])
        self.continued_at = list(state_dict.get("continued_at", []))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        val = float(metrics[self.metric])
        train = float(metrics.get("train_acc_step", metrics.get("train_acc", torch.tensor(math.nan))))
        step = trainer.global_step
        self.curve.append((step, val, train))
        for mark in self.marks:
            if mark not in self.steps and val >= mark:
                self.steps[mark] = step
                self.seconds[mark] = self.elapsed
        if self.progress_every and step % self.progress_every < trainer.val_check_interval:
            print(f"[grokking] step {step}: val_acc {val:.4f} train_acc {train:.4f}", flush=True)
        if val >= self.marks[-1]:
            trainer.should_stop = True


def use_anchor_optimizer(model: pl.LightningModule, anchor: str) -> None:
    """Make ``model`` train with a PyPI anchor (GrokFastAdamW or GrokAdamW) and the same warm-up.

    The paper's numbers go to their arguments of the same name (alpha 0.98, lamb 2) and the model's lr and betas
    to theirs. Both decay the weights decoupled, as AdamW: GrokAdamW by ``lr * weight_decay`` per step, so it gets
    the model's ``weight_decay``; GrokFastAdamW by ``weight_decay`` itself (not multiplied by lr), so it gets
    ``lr * weight_decay``: the same decay per step as AdamW with the model's weight decay. (On the modular task the
    other rows use Adam's coupled L2 weight decay, a different regulariser.)
    """
    hp = model.hparams

    def configure_optimizers(self: pl.LightningModule) -> dict[str, Any]:
        warnings.filterwarnings("ignore", module="grokadamw")
        warnings.filterwarnings("ignore", message=".*autocast.*")
        common = {"lr": hp["lr"], "betas": tuple(hp["betas"])}
        if anchor == "grokfastadamw":
            from grokfast_pytorch import GrokFastAdamW

            optimizer = GrokFastAdamW(
                self.parameters(),
                grokfast_alpha=0.98,
                grokfast_lamb=2.0,
                weight_decay=hp["lr"] * hp["weight_decay"],
                **common,
            )
        else:
            level = logging.getLogger().level
            from grokadamw import GrokAdamW  # its import sets the root logger to INFO

            logging.getLogger().setLevel(level)
            optimizer = GrokAdamW(
                self.parameters(), alpha_init=0.98, lamb=2.0, weight_decay=hp["weight_decay"], **common
            )
        return {"optimizer": optimizer, "lr_scheduler": warmup_schedule(optimizer, hp["warmup_steps"])}

    model.configure_optimizers = MethodType(configure_optimizers, model)  # type: ignore[method-assign]


@dataclass
class Settings:
    """Caps and sizes of one benchmark invocation."""

    mode: str = "full"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_steps: int | None = None  # None: the task's own cap
    val_every: int | None = None  # None: the task's own interval
    progress_every: int = 0
    checkpoint_dir: str | None = None  # save each run there; a run with a save there continues from it
    checkpoint_every: int = 1000


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint-dir`` / ``--checkpoint-every``: long runs that survive being stopped."""
    parser.add_argument(
        "--checkpoint-dir", help="save each run there every --checkpoint-every steps; a run saved there continues"
    )
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="steps between saves (default 1000)")


class SaveAfterValidation(Callback):
    """Saves ``path`` after a validation at least ``every`` steps after the last save (written, then renamed).

    After the validation, not after the training batch (where ``ModelCheckpoint(every_n_train_steps=...)`` saves),
    so the saved milestones include that validation, which a resumed run does not repeat.

    Args:
        path: the checkpoint file, overwritten at each save.
        every: minimum optimizer steps between saves.

    """

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every, self._saved_at = path, every, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_at = trainer.global_step  # a continued run starts from a save at this step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_step - self._saved_at < self.every:
            return
        partial = self.path.with_suffix(".partial")
        trainer.save_checkpoint(partial)
        partial.replace(self.path)  # a run stopped while saving keeps the previous save
        self._saved_at = trainer.global_step


def _checkpointing(task: Task, method: Method, seed: int, settings: Settings) -> tuple[list[Callback], Path | None]:
    """The saving callback of one run and the checkpoint it continues from (neither without ``checkpoint_dir``)."""
    if settings.checkpoint_dir is None:
        return [], None
    path = Path(settings.checkpoint_dir) / f"{task.name}-{method.name}-seed{seed}.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    saving: list[Callback] = [SaveAfterValidation(path, settings.checkpoint_every)]
    if not path.exists():
        return saving, None
    print(f"[grokking] continuing {task.name}/{method.name} seed {seed} from {path}", flush=True)
    return saving, path


def run_one(
    task: Task, method: Method, seed: int, settings: Settings, weight_decay: float | None = None, cap: int | None = None
) -> dict[str, Any]:
    """Train ``method`` on ``task`` with one seed (split and initialisation); return milestones and curve."""
    pl.seed_everything(seed, verbose=False)
    if weight_decay is None:
        weight_decay = task.weight_decay if method.weight_decay is None else method.weight_decay
    model, datamodule = task.build(seed, weight_decay, method.loss, settings.mode == "smoke")
    if method.anchor:
        use_anchor_optimizer(model, method.anchor)
    milestones = MilestoneCallback(task.marks, progress_every=settings.progress_every)
    callbacks: list[Callback] = [milestones]
    grokfast_kwargs = method.grokfast_kwargs(task)
    grokfast = GrokfastCallback(**grokfast_kwargs) if grokfast_kwargs else None
    if grokfast is not None:
        callbacks.append(grokfast)
    if grokfast is not None and method.extra is not None:
        callbacks.extend(method.extra(grokfast))
    detector = None
    if method.detector:
        detector = GrokkingDetectorCallback(
            train_metric="train_acc", val_metric="val_acc", stop_on_convergence=False, verbose=False, **method.detector
        )
        callbacks.append(detector)
    cap = cap or settings.max_steps or task.max_steps
    saving, resume_from = _checkpointing(task, method, seed, settings)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cap,
        max_epochs=-1,
        val_check_interval=settings.val_every or task.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks + saving,
    )
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    except SystemExit:  # Ctrl-C (Lightning then exits 1) or SIGTERM (SIGTERMException): keep what was measured
        if not trainer.interrupted:
            raise
    result: dict[str, Any] = {
        "task": task.name,
        "config": method.name,
        "seed": seed,
        "weight_decay": weight_decay,
        "cap": trainer.global_step if trainer.interrupted else cap,  # a stopped run says "not by" where it stopped
        "steps_run": trainer.global_step,
        "wall_s": milestones.elapsed,
        "steps_to": {str(m): milestones.steps.get(m) for m in task.marks},
        "seconds_to": {str(m): milestones.seconds.get(m) for m in task.marks},
        "final_val_acc": milestones.curve[-1][1] if milestones.curve else None,
        "curve": milestones.curve,
    }
    if milestones.continued_at:
        result["continued_at"] = milestones.continued_at
    if trainer.interrupted:
        result["interrupted"] = True
        result["cap_requested"] = cap
    if grokfast is not None:
        result["final_lamb"] = grokfast.lamb
    if detector is not None:
        result["detector"] = [{"phase": t.phase, "step": t.step} for t in detector.transitions]
    print(f"[grokking] {task.name}/{method.name} seed {seed}: steps to {result['steps_to']}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------- summary
def _median(values: list[float]) -> float:
    return statistics.median(values) if all(math.isfinite(v) for v in values) else statistics.median_low(values)


def summarize_marks(rows: list[dict[str, Any]], marks: tuple[float, ...]) -> dict[str, Any]:
    """Per mark: how many runs reached it, median and range of steps and seconds (unreached counts as inf)."""
    out: dict[str, Any] = {"seeds": sorted(r["seed"] for r in rows), "cap": max(r["cap"] for r in rows), "marks": {}}
    out["by_seed"] = {str(r["seed"]): {"cap": r["cap"], "steps_to": r["steps_to"]} for r in rows}
    for mark in map(str, marks):
        steps = sorted(math.inf if r["steps_to"][mark] is None else r["steps_to"][mark] for r in rows)
        secs = sorted(math.inf if r["seconds_to"][mark] is None else r["seconds_to"][mark] for r in rows)
        out["marks"][mark] = {
            "reached": sum(math.isfinite(s) for s in steps),
            "steps_median": _median(steps),
            "steps_min": steps[0],
            "steps_max": steps[-1],
            "seconds_median": _median(secs),
            "seconds_min": secs[0],
            "seconds_max": secs[-1],
        }
    return out


def cell(mark: dict[str, Any], cap: int, unit: str = "steps") -> str:
    """``median (min - max)`` of steps or seconds, ``not reached by N`` / ``n/a`` when no run reached the mark."""
    if mark["reached"] == 0:
        return f"not reached by {cap:,}" if unit == "steps" else "n/a"
    if unit == "steps":
        values = [f"{v:,.0f}" if math.isfinite(v) else f"> {cap:,}" for v in (mark[f"steps_{k}"] for k in KEYS)]
    else:
        values = [f"{v:.0f} s" if math.isfinite(v) else "not reached" for v in (mark[f"seconds_{k}"] for k in KEYS)]
    med, lo, hi = values
    return med if lo == hi else f"{med} ({lo} - {hi})"


KEYS = ("median", "min", "max")


def speedup(base: dict[str, Any] | None, steps: float, mark: str) -> str:
    """Baseline steps / ours at ``mark``; a lower bound (``>``) when the baseline hit its cap."""
    if base is None or not math.isfinite(steps):
        return ""
    base_steps = base["marks"][mark]["steps_median"]
    if math.isfinite(base_steps):
        return f"{base_steps / steps:.1f}x"
    return f"> {base['cap'] / steps:.1f}x" if base["cap"] > steps else ""


def paired_speedups(base: dict[str, Any] | None, entry: dict[str, Any], mark: str) -> str:
    """Per seed that both rows ran, the baseline's steps to ``mark`` / this row's, as ``seed: ratio`` in seed order.

    ``> r``: the baseline did not reach the mark by its cap (a lower bound); ``< r``: this row did not (an upper
    bound); ``n/a``: neither did. Unlike a ratio of medians, each figure compares one seed's two runs.
    """
    if base is None:
        return ""
    cells = []
    for seed in sorted(set(base["by_seed"]) & set(entry["by_seed"]), key=int):
        theirs, ours = base["by_seed"][seed], entry["by_seed"][seed]
        b, o = theirs["steps_to"][mark], ours["steps_to"][mark]
        if b is not None and o is not None:
            cells.append(f"{seed}: {b / o:.1f}x")
        elif o is not None:
            cells.append(f"{seed}: > {theirs['cap'] / o:.1f}x")
        elif b is not None:
            cells.append(f"{seed}: < {b / ours['cap']:.1f}x")
        else:
            cells.append(f"{seed}: n/a")
    return ", ".join(cells)


def row_commands(runs: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, str]:
    """Per table row (``key(run)``), the distinct commands that made its runs, in order, as one markdown cell."""
    found: dict[str, list[str]] = {}
    for run in runs:
        commands = found.setdefault(key(run), [])
        if run.get("command") and run["command"] not in commands:
            commands.append(run["command"])
    return {row: "<br>".join(f"`{c}`" for c in commands) for row, commands in found.items()}


def plot_curves(ax: Any, runs: list[dict[str, Any]], labels: dict[str, str], title: str, target: float) -> None:
    """Validation (solid) and train-batch (dashed) accuracy of every run, one colour per row, log step axis."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    for i, name in enumerate(labels):
        for j, run in enumerate(r for r in runs if r["config"] == name):
            if not run["curve"]:
                continue
            steps, val, train = zip(*[(max(s, 1), v, t) for s, v, t in run["curve"]])
            ax.plot(steps, val, color=colors(i % 10), alpha=0.85, lw=1.1, label=labels[name] if j == 0 else None)
            ax.plot(steps, train, color=colors(i % 10), alpha=0.25, lw=0.7, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy")
    ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=6, loc="upper left")
    ax.set_title(title, fontsize=9)
