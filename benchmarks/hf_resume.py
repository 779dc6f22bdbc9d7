"""How far a resumed Hugging Face Trainer run ends from the uninterrupted one, per filter kind.

A tiny GPT-2 built from a config (no download), 8 optimizer steps straight vs 4 steps + ``resume_from_checkpoint``
+ 4 steps, on CPU; prints the largest absolute weight difference. Two ways to attach Grokfast:

* ``recipe``: the 0.2 README's recipe, ``attach_grokfast(optimizer)`` in a ``TrainerCallback.on_train_begin``;
* ``callback``: ``GrokfastTrainerCallback``.

    python benchmarks/hf_resume.py recipe callback
    # the same recipe on another release, e.g. the 0.3 layout before issue 18:
    git worktree add /tmp/before layout-0.3 && PYTHONPATH=/tmp/before python benchmarks/hf_resume.py recipe
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

import lightning_grokfast
from lightning_grokfast import attach_grokfast

KINDS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "ema": dict(filter="ema", alpha=0.8, lamb=2.0),
    "ma": dict(filter="ma", window_size=3, lamb=2.0),
    "ema+ma": dict(filter="ema+ma", alpha=0.8, lamb=1.0, window_size=3, ma_lamb=1.0),
}


class ReadmeRecipe(TrainerCallback):
    """Attach in ``on_train_begin``, as the 0.2 README said."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):  # type: ignore[no-untyped-def]
        attach_grokfast(optimizer, model=model, **self.settings)


def run(way: str, settings: dict[str, Any] | None, out: Path, resume: Path | None = None) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, 16, (32, 8), generator=torch.Generator().manual_seed(0))
    callbacks: list[TrainerCallback] = []
    if settings is not None:
        callbacks = [
            ReadmeRecipe(settings) if way == "recipe" else lightning_grokfast.GrokfastTrainerCallback(**settings)
        ]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks).train(
        resume_from_checkpoint=None if resume is None else str(resume)
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ways", nargs="+", choices=["recipe", "callback"])
    logging.set_verbosity_error()
    for way in parser.parse_args().ways:
        for kind, settings in KINDS.items():
            with tempfile.TemporaryDirectory() as tmp:
                straight = run(way, settings, Path(tmp) / "straight")
                resumed = run(way, settings, Path(tmp) / "resumed", Path(tmp) / "straight" / "checkpoint-4")
            difference = max(float((p - q).abs().max()) for p, q in zip(straight.parameters(), resumed.parameters()))
            print(f"{way:8s} {kind:6s} max |straight - resumed| = {difference:.3g}")


if __name__ == "__main__":
    main()
