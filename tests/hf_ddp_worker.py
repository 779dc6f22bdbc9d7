"""One rank of a 2-process (gloo) Hugging Face Trainer run with GrokfastTrainerCallback (launched by torchrun).

Writes ``rank{r}.pt``: the rank's filter state and weights, for tests/test_hf.py to compare across ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers

from lightning_grokfast import GrokfastTrainerCallback


def main(out: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 32, (32, 8), generator=torch.Generator().manual_seed(0))
    callback = GrokfastTrainerCallback(filter="ema+ma", alpha=0.8, lamb=1.0, window_size=3, ma_lamb=1.0)
    args = transformers.TrainingArguments(
        output_dir=str(out / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        seed=0,
    )
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    assert callback.handle is not None
    state = {
        "world_size": trainer.args.world_size,
        "steps": callback.handle.filter.steps,
        "filter": {n: s.to_dict() for n, s in callback.handle.filter.states.items()},
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    torch.save(state, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
