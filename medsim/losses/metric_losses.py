"""Loss factory over pytorch-metric-learning (PML), plus the cross-entropy baseline.

Every loss here has one call signature, ``loss(embedding (B, D), labels (B,), logits (B, C) | None) -> scalar``,
so the trainer can route any embedding subspace (DSL / MML learners) through it.

==============  =======================================================================================
``margin``      PML ``MarginLoss`` with learnable β per class and ``DistanceWeightedMiner`` sampling (Wu et
                al. 2017, "Sampling matters"; used by divide-and-conquer MML and DSL)
``triplet``     PML ``TripletMarginLoss`` with semi-hard ``TripletMarginMiner``
``contrastive`` PML ``ContrastiveLoss`` (pos margin 0, neg margin 0.5 on Euclidean distances)
``contrastive_abe``  ABE's Eq. 10 (Kim et al. 2018): PML ``ContrastiveLoss`` on *squared* Euclidean distances,
                m_c = 1, ``MeanReducer`` (every pair counts, zero losses included). Eq. 10 divides the sum over
                all pairs by one N; PML averages the positive and the negative pairs separately and adds the two
                means — the same terms, weighted per pair type.
``classifier``  cross-entropy on the logits head; the embedding is the penultimate layer
==============  =======================================================================================
"""

from __future__ import annotations

from typing import Any

import torch
from monai.utils import look_up_option
from torch import nn

__all__ = ["LOSSES", "MetricLoss", "ClassificationLoss", "make_loss"]

LOSSES = ("margin", "triplet", "contrastive", "contrastive_abe", "classifier")


class MetricLoss(nn.Module):
    """A PML loss with an optional PML miner. ``forward(embedding, labels, logits=None)``."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None
                ) -> torch.Tensor:
        if embedding.ndim != 2 or labels.shape[0] != embedding.shape[0]:
            raise ValueError(f"expected embedding (B, D) and labels (B,), got {tuple(embedding.shape)} and "
                             f"{tuple(labels.shape)}")
        tuples = self.miner(embedding, labels) if self.miner is not None else None
        return self.loss(embedding, labels, tuples)


class ClassificationLoss(nn.Module):
    """Cross-entropy on ``logits`` (the classification-network baseline of DSL's Table 1)."""

    def __init__(self):
        super().__init__()
        self.ce = nn.CrossEntropyLoss()

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None
                ) -> torch.Tensor:
        if logits is None:
            raise ValueError("the classifier loss needs logits: build the Embedder with n_classes")
        return self.ce(logits, labels)


def make_loss(name: str = "margin", *, n_classes: int | None = None, margin: float | None = None,
              beta: float = 1.2, learn_beta: bool = True, **kwargs: Any) -> nn.Module:
    """Build a loss by name (see :data:`LOSSES`). ``n_classes`` gives margin loss one learnable β per class."""
    from pytorch_metric_learning import distances, losses, miners

    name = look_up_option(name, LOSSES)
    if name == "margin":
        loss = losses.MarginLoss(margin=0.2 if margin is None else margin, nu=0.0, beta=beta,
                                 learn_beta=learn_beta, num_classes=n_classes if learn_beta else None, **kwargs)
        return MetricLoss(loss, miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4))
    if name == "triplet":
        return MetricLoss(losses.TripletMarginLoss(margin=0.1 if margin is None else margin, **kwargs),
                          miners.TripletMarginMiner(margin=0.1 if margin is None else margin, type_of_triplets="semihard"))
    if name == "contrastive_abe":
        from pytorch_metric_learning import reducers

        return MetricLoss(losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0 if margin is None else margin,
                                                 distance=distances.LpDistance(power=2),
                                                 reducer=reducers.MeanReducer(), **kwargs))
    if name == "contrastive":
        return MetricLoss(losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5 if margin is None else margin,
                                                 distance=distances.LpDistance(), **kwargs))
    return ClassificationLoss()
