"""Grokfast in a Hugging Face ``transformers.Trainer``: one callback, and resume continues the filter.

Trains a small GPT-2 (built from a config, nothing downloaded) as a language model on ``a + b = c (mod 23)``
equations, with half of them held out, then resumes from the middle checkpoint to show that the resumed run ends with
exactly the uninterrupted run's weights. Needs ``pip install "lightning-grokfast[hf]"``.

    python examples/hf_trainer.py           # 160 steps (and 80 resumed), under a minute on a laptop CPU
    python examples/hf_trainer.py --tiny    # a few steps on fewer equations (the test)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from lightning_grokfast.integrations.hf import GrokfastTrainerCallback


class Equations(torch.utils.data.Dataset):
    """``a b = c`` as 4 tokens (``=`` is token ``p``); the loss is on the answer token only."""

    def __init__(self, pairs: torch.Tensor, p: int) -> None:
        a, b = pairs[:, 0], pairs[:, 1]
        self.tokens = torch.stack([a, b, torch.full_like(a, p), (a + b) % p], dim=1)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = torch.full_like(self.tokens[i], -100)
        labels[-1] = self.tokens[i, -1]
        return {"input_ids": self.tokens[i], "labels": labels}


def make_data(p: int) -> tuple[Equations, Equations]:
    pairs = torch.cartesian_prod(torch.arange(p), torch.arange(p))
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    half = len(order) // 2
    return Equations(pairs[order[:half]], p), Equations(pairs[order[half:]], p)


def make_trainer(out: Path, steps: int, p: int, train: Equations, *, resume_check: bool) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=p + 1, n_positions=4, n_embd=32, n_layer=2, n_head=4))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=64,
        learning_rate=3e-3,
        weight_decay=0.1,
        warmup_steps=10,
        save_strategy="steps",
        save_steps=steps // 2 if resume_check else steps,
        logging_steps=max(1, steps // 8),
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    grokfast = GrokfastTrainerCallback(filter="ema", alpha=0.98, lamb=2.0)
    return Trainer(model=model, args=args, train_dataset=train, callbacks=[grokfast])


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Equations) -> float:
    logits = model(input_ids=data.tokens[:, :-1]).logits[:, -1]
    return float((logits.argmax(-1) == data.tokens[:, -1]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps on a small task (for the tests)")
    parser.add_argument("--out", type=Path, default=Path("hf_trainer_out"))
    options = parser.parse_args()
    p, steps = (7, 8) if options.tiny else (23, 160)
    train, held_out = make_data(p)

    straight = make_trainer(options.out / "straight", steps, p, train, resume_check=True)
    straight.train()
    train_acc, held_out_acc = accuracy(straight.model, train), accuracy(straight.model, held_out)
    print(f"train accuracy {train_acc:.3f}, held-out accuracy {held_out_acc:.3f}")

    # A second Trainer resumes from the middle checkpoint: the filter state comes back with optimizer.pt.
    resumed = make_trainer(options.out / "resumed", steps, p, train, resume_check=True)
    resumed.train(resume_from_checkpoint=str(options.out / "straight" / f"checkpoint-{steps // 2}"))
    same = all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))
    print(f"resumed run ends with the uninterrupted run's weights: {same}")
    if not same:
        raise SystemExit("the resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
