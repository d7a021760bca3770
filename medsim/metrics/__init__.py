"""Evaluation metrics for embeddings: k-means NMI/AMI, Recall@K, MAP@R, Precision@1 (see :mod:`.retrieval`).

:class:`EmbeddingAccuracyCalculator` (pytorch-metric-learning's ``AccuracyCalculator`` with these metrics) is
loaded on first use, so ``import medsim.metrics`` does not import torch.
"""

from typing import Any

from medsim.metrics.retrieval import (
    class_balanced_retrieval,
    DEFAULT_KS,
    evaluate_embeddings,
    kmeans,
    map_at_r_precision_at_1,
    metrics_table,
    nmi_ami,
    recall_at_k,
)

__all__ = [
    "class_balanced_retrieval",
    "DEFAULT_KS",
    "EmbeddingAccuracyCalculator",
    "evaluate_embeddings",
    "kmeans",
    "map_at_r_precision_at_1",
    "metrics_table",
    "nmi_ami",
    "recall_at_k",
]


def __getattr__(name: str) -> Any:
    if name == "EmbeddingAccuracyCalculator":
        from medsim.metrics.accuracy_calculator import EmbeddingAccuracyCalculator

        return EmbeddingAccuracyCalculator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
