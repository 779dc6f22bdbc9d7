"""Built-in tasks that really grok."""

from lightning_grokfast.tasks.modular import (
    OPERATIONS,
    GrokTransformer,
    ModularArithmeticDataModule,
    make_modular_dataset,
)

__all__ = ["OPERATIONS", "GrokTransformer", "ModularArithmeticDataModule", "make_modular_dataset"]
