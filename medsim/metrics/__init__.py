"""Evaluation metrics for embeddings: k-means NMI/AMI, Recall@K, MAP@R, Precision@1 (see :mod:`.retrieval`)."""

from medsim.metrics.retrieval import (
    DEFAULT_KS,
    evaluate_embeddings,
    kmeans,
    map_at_r_precision_at_1,
    metrics_table,
    nmi_ami,
    recall_at_k,
)

__all__ = [
    "DEFAULT_KS",
    "evaluate_embeddings",
    "kmeans",
    "map_at_r_precision_at_1",
    "metrics_table",
    "nmi_ami",
    "recall_at_k",
]
