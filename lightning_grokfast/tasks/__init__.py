"""Built-in tasks that really grok: modular arithmetic (the paper's), sparse parity and digits with a large init."""

from lightning_grokfast.tasks.base import ClassificationTask, SplitDataModule
from lightning_grokfast.tasks.digits import DigitsDataModule
from lightning_grokfast.tasks.mlp import MLPClassifier
from lightning_grokfast.tasks.modular import (
    OPERATIONS,
    EpochPermutationSampler,
    GrokTransformer,
    ModularArithmeticDataModule,
    make_modular_dataset,
    paper_random_stream,
)
from lightning_grokfast.tasks.parity import SparseParityDataModule, make_sparse_parity_dataset

__all__ = [
    "OPERATIONS",
    "ClassificationTask",
    "DigitsDataModule",
    "EpochPermutationSampler",
    "GrokTransformer",
    "MLPClassifier",
    "ModularArithmeticDataModule",
    "SparseParityDataModule",
    "SplitDataModule",
    "make_modular_dataset",
    "make_sparse_parity_dataset",
    "paper_random_stream",
]
