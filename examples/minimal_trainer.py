"""Grokfast with a plain Lightning ``Trainer``: add one callback, and the model groks in about a thousand steps.

The built-in task (modular multiplication mod 97, the Grokfast paper's 2-layer transformer) memorizes its training
half within a few hundred steps; with the EMA filter the validation accuracy follows soon after instead of tens of
thousands of steps later. The dashboard callback records both curves and saves ``grokking_accuracy.png``.

    python examples/minimal_trainer.py            # full run, a minute or two on a laptop CPU
    python examples/minimal_trainer.py --tiny     # a few steps on a tiny task, to check the set-up
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_grokfast import GrokfastCallback, GrokkingDashboardCallback
from lightning_grokfast.tasks import GrokTransformer, ModularArithmeticDataModule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Grokfast with a plain Lightning Trainer.")
    parser.add_argument("--tiny", action="store_true", help="run 3 steps on a tiny task (seconds)")
    parser.add_argument("--max-steps", type=int, default=2000, help="optimizer steps of the full run")
    parser.add_argument("--root-dir", default=".", help="where lightning_logs/ is written")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    datamodule = ModularArithmeticDataModule(operation="*", p=11 if args.tiny else 97)
    # the paper's EMA setting uses weight decay 0.005
    model = GrokTransformer(num_tokens=datamodule.num_tokens, weight_decay=0.005)
    dashboard = GrokkingDashboardCallback()
    trainer = pl.Trainer(
        max_steps=3 if args.tiny else args.max_steps,
        log_every_n_steps=1 if args.tiny else 10,
        default_root_dir=args.root_dir,
        enable_checkpointing=not args.tiny,
        # the whole change is this callback: the paper's EMA filter, alpha 0.98, lamb 2.0
        callbacks=[GrokfastCallback(filter="ema", alpha=0.98, lamb=2.0), dashboard],
    )
    trainer.fit(model, datamodule=datamodule)
    print(f"steps to 95% validation accuracy: {dashboard.mark_steps[0.95]}; figure: {dashboard.figure_path}")


if __name__ == "__main__":
    main()
