"""Classification metrics for models with a ``logits`` head (classifier baseline, gated-attention MIL,
loss-based attention), from scikit-learn: accuracy, balanced accuracy (mean per-class recall — the number to read
on imbalanced data such as HAM10000, two thirds nevi) and macro-F1."""

from __future__ import annotations

import numpy as np

__all__ = ["classification_metrics"]


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """``labels`` (N,) ints and ``logits`` (N, C) → ``{"accuracy", "balanced_accuracy", "macro_f1"}``.

    Balanced accuracy and macro-F1 average over the classes present in ``labels`` (scikit-learn's conventions).
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y = np.asarray(labels).ravel()
    z = np.asarray(logits)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"expected labels (N,) and logits (N, C), got {y.shape} and {z.shape}")
    if y.size == 0:
        raise ValueError("no samples to score")
    pred = z.argmax(1)
    return {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=np.unique(y), zero_division=0))}
