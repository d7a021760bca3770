"""Losses on one embedding: a pytorch-metric-learning (PML) loss with its miner, the cross-entropy baseline, and a
weighted sum of several (PML's ``MultipleLosses`` pattern). Every loss and its parameters are named in the bundle
config (``_target_`` + keyword arguments), e.g. ``bundles/isic_dsl/configs/train.json``'s ``metric_loss``:

==================  ==================================================================================
``metric_loss``     PML ``MarginLoss`` (learnable β per class) + ``DistanceWeightedMiner`` (Wu et al. 2017,
(isic_dsl)          "Sampling matters", as PML implements it; the divide-and-conquer code has its own sampler)
``triplet.json``    PML ``TripletMarginLoss`` + semi-hard ``TripletMarginMiner``
``contrastive.json``  PML ``ContrastiveLoss`` (pos margin 0, neg margin 0.5 on Euclidean distances)
isic_abe            ABE's Eq. 10 (Kim et al. 2018): PML ``ContrastiveLoss`` on *squared* Euclidean distances,
``contrastive.json``  m_c = 1, ``MeanReducer`` (every pair counts, zero losses included). Eq. 10 divides the sum
                    over all pairs by one N; PML averages the positive and the negative pairs separately and
                    adds the two means — the same terms, weighted per pair type.
``classifier.json`` cross-entropy on the logits head (:class:`ClassificationLoss`)
==================  ==================================================================================
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from medsim.losses.base import EmbeddingLoss

__all__ = ["MetricLoss", "ClassificationLoss", "CombinedLoss"]


class MetricLoss(EmbeddingLoss):
    """A PML loss (``losses.*``, or PML's ``MultipleLosses``) with an optional PML miner."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner

    def compute_loss(self, embedding: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None
                     ) -> torch.Tensor:
        tuples = self.miner(embedding, labels) if self.miner is not None else None
        return self.loss(embedding, labels, tuples)


class ClassificationLoss(EmbeddingLoss):
    """Cross-entropy on ``logits`` (the classification-network baseline of DSL's Table 1)."""

    def __init__(self):
        super().__init__()
        self.ce = nn.CrossEntropyLoss()

    def compute_loss(self, embedding: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None
                     ) -> torch.Tensor:
        if logits is None:
            raise ValueError("the classifier loss needs logits: build the Embedder with n_classes")
        return self.ce(logits, labels)


class CombinedLoss(EmbeddingLoss):
    """Σ_i w_i · loss_i(embedding, labels, logits) — e.g. a metric loss plus the cross-entropy head.

    Args:
        losses: a list of :class:`EmbeddingLoss`, or a dict name → loss (names appear in ``last``).
        weights: one weight per loss (a list, or a dict with the same names); default 1 each.
    """

    def __init__(self, losses: Sequence[nn.Module] | Mapping[str, nn.Module],
                 weights: Sequence[float] | Mapping[str, float] | None = None):
        super().__init__()
        named = dict(losses) if isinstance(losses, Mapping) else {str(i): v for i, v in enumerate(losses)}
        if not named:
            raise ValueError("CombinedLoss needs at least one loss")
        if weights is None:
            w = {k: 1.0 for k in named}
        elif isinstance(weights, Mapping):
            if set(weights) != set(named):
                raise ValueError(f"weights name {sorted(weights)}, losses name {sorted(named)}")
            w = {k: float(v) for k, v in weights.items()}
        else:
            if len(weights) != len(named):
                raise ValueError(f"got {len(weights)} weights for {len(named)} losses")
            w = {k: float(v) for k, v in zip(named, weights)}
        self.losses = nn.ModuleDict(named)
        self.weights = w
        self.last: dict[str, float] = {}

    def compute_loss(self, embedding: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None
                     ) -> torch.Tensor:
        parts = {k: loss(embedding, labels, logits) for k, loss in self.losses.items()}
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        return sum(self.weights[k] * v for k, v in parts.items())
