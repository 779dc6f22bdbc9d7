"""Grokfast with manual optimization and two optimizers.

``GrokfastCallback`` runs in ``on_before_optimizer_step``, which Lightning calls for every ``optimizer.step()``, in
manual optimization too. Each optimizer gets its own filter state, updated once per its own step; the filter of
the second optimizer logs under ``grokfast/optimizer1/``. Here the embeddings are trained by Adam and the rest of
the transformer by AdamW with weight decay.

Note: in manual optimization ``trainer.global_step`` counts the steps of all optimizers, so each batch advances it
by two here (``max_steps=4000`` is 2,000 batches).

    python examples/manual_optimization.py            # full run
    python examples/manual_optimization.py --tiny     # a few steps on a tiny task, to check the set-up
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_grokfast import GrokfastCallback, GrokkingDashboardCallback
from lightning_grokfast.tasks import GrokTransformer, ModularArithmeticDataModule


class TwoOptimizerTransformer(GrokTransformer):
    """The built-in transformer, trained manually: embeddings by Adam, everything else by AdamW."""

    def __init__(self, num_tokens: int = 99, weight_decay: float = 0.005, lr: float = 1e-3) -> None:
        super().__init__(num_tokens=num_tokens, weight_decay=weight_decay, lr=lr)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        embedding_optimizer, body_optimizer = self.optimizers()
        inputs, targets = batch
        logits = self(inputs)
        loss = nn.functional.cross_entropy(logits, targets)
        embedding_optimizer.zero_grad()
        body_optimizer.zero_grad()
        self.manual_backward(loss)
        # each step() goes through Lightning, so GrokfastCallback filters this optimizer's gradients first
        embedding_optimizer.step()
        body_optimizer.step()
        self.train_acc(logits, targets)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        embeddings = [*self.token_embedding.parameters(), *self.position_embedding.parameters()]
        embedding_ids = {id(p) for p in embeddings}
        body = [p for p in self.parameters() if id(p) not in embedding_ids]
        betas = tuple(self.hparams.betas)
        return [
            torch.optim.Adam(embeddings, lr=self.hparams.lr, betas=betas),
            torch.optim.AdamW(body, lr=self.hparams.lr, betas=betas, weight_decay=self.hparams.weight_decay),
        ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Grokfast with manual optimization and two optimizers.")
    parser.add_argument("--tiny", action="store_true", help="run a few steps on a tiny task (seconds)")
    parser.add_argument("--max-steps", type=int, default=4000, help="optimizer steps (two per batch)")
    parser.add_argument("--root-dir", default=".", help="where lightning_logs/ is written")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    datamodule = ModularArithmeticDataModule(operation="*", p=11 if args.tiny else 97)
    model = TwoOptimizerTransformer(num_tokens=datamodule.num_tokens)
    dashboard = GrokkingDashboardCallback()
    trainer = pl.Trainer(
        max_steps=6 if args.tiny else args.max_steps,
        log_every_n_steps=1 if args.tiny else 10,
        default_root_dir=args.root_dir,
        enable_checkpointing=not args.tiny,
        callbacks=[GrokfastCallback(filter="ema", alpha=0.98, lamb=2.0), dashboard],
    )
    trainer.fit(model, datamodule=datamodule)
    print(f"steps to 95% validation accuracy: {dashboard.mark_steps[0.95]}; figure: {dashboard.figure_path}")


if __name__ == "__main__":
    main()
