"""Built-in tasks that really grok: modular arithmetic (the paper's), S5 composition, sparse parity, digits and
MNIST-1D with a large init, and teacher-student regression."""

from lightning_grokfast.tasks.base import (
    ClassificationTask,
    RegressionTask,
    SplitDataModule,
    TaskModule,
    split_table,
)
from lightning_grokfast.tasks.digits import DigitsDataModule
from lightning_grokfast.tasks.mlp import MLPClassifier, MLPRegressor, build_mlp
from lightning_grokfast.tasks.mnist_1d import MNIST1DDataModule, make_mnist1d_dataset
from lightning_grokfast.tasks.modular import (
    OPERATIONS,
    EpochPermutationSampler,
    GrokTransformer,
    ModularArithmeticDataModule,
    make_modular_dataset,
    paper_random_stream,
)
from lightning_grokfast.tasks.parity import SparseParityDataModule, make_sparse_parity_dataset
from lightning_grokfast.tasks.permutations import (
    PermutationGroupDataModule,
    make_permutation_dataset,
    permutations_of,
)
from lightning_grokfast.tasks.regression import TeacherStudentDataModule, make_teacher_student_dataset

__all__ = [
    "OPERATIONS",
    "ClassificationTask",
    "DigitsDataModule",
    "EpochPermutationSampler",
    "GrokTransformer",
    "MLPClassifier",
    "MLPRegressor",
    "MNIST1DDataModule",
    "ModularArithmeticDataModule",
    "PermutationGroupDataModule",
    "RegressionTask",
    "SparseParityDataModule",
    "SplitDataModule",
    "TaskModule",
    "TeacherStudentDataModule",
    "build_mlp",
    "make_mnist1d_dataset",
    "make_modular_dataset",
    "make_permutation_dataset",
    "make_sparse_parity_dataset",
    "make_teacher_student_dataset",
    "paper_random_stream",
    "permutations_of",
    "split_table",
]
