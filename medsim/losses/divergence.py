"""The divergence loss of ABE-M and the full ABE objective (Kim et al., ECCV 2018, "Attention-based Ensemble for
Deep Metric Learning", Sec. 3.4).

    L = Σ_m L_metric,(m) + λ_div · L_div                                   (Eq. 8)
    L_div = Σ_i Σ_{p,q} max(0, m_div − d(B_p(x_i), B_q(x_i))²)            (Eq. 9)

with B_m(x_i) the embedding of image x_i by learner m ("self pairs"), d the Euclidean distance, m_div = 1 and
λ_div = 1 in the paper.
"""

from __future__ import annotations

import copy

from typing import Mapping

import torch
from torch import nn

from medsim.losses.base import OutputsLoss

__all__ = ["divergence_loss", "ABELoss"]


def divergence_loss(learner_embeddings: torch.Tensor, m_div: float = 1.0) -> torch.Tensor:
    """Eq. 9 of ABE: hinge on the squared distance between the embeddings of one image by two learners.

    Normalisation: each unordered pair p < q counts once ((p, q) and (q, p) are the same self pair, and p = q
    only adds the constant m_div), and the sum over images is averaged over the batch. Eq. 9 writes a sum over
    images, but it is weighted by λ_div = 1 against the contrastive loss of Eq. 10, which the paper normalises by
    1/N; the mean keeps the two terms on the same per-image scale, independent of the batch size.

    With L2-normalised learner embeddings ‖a − b‖² = 2 − 2 cos(a, b), so m_div = 1 stops pushing a self pair once
    its cosine similarity is at most 0.5.

    Args:
        learner_embeddings: (B, M, d), the M learners' embeddings of each image.
        m_div: the margin m_div.

    Returns:
        scalar: mean over images of Σ_{p<q} max(0, m_div − ‖B_p(x) − B_q(x)‖²); 0 for M = 1.
    """
    if learner_embeddings.ndim != 3:
        raise ValueError(f"expected learner embeddings (B, M, d), got shape {tuple(learner_embeddings.shape)}")
    m = learner_embeddings.shape[1]
    p, q = torch.triu_indices(m, m, offset=1, device=learner_embeddings.device)
    sq = (learner_embeddings[:, p] - learner_embeddings[:, q]).pow(2).sum(-1)  # (B, M(M-1)/2)
    return torch.relu(m_div - sq).sum(1).mean()


class ABELoss(OutputsLoss):
    """Eq. 8 of ABE: one metric loss per learner, summed, plus λ_div · :func:`divergence_loss`.

    Called through :class:`medsim.engines.BatchLoss` (or DSL's routing loss) as ``loss(outputs, labels)``
    (``takes_outputs``) with
    the model's output dict; it reads ``outputs["learner_embeddings"]`` (B, M, d) of
    :class:`medsim.nn.abe.ABEEmbedder`. The paper trains each learner with its own contrastive loss (Eq. 10);
    here each learner gets its own copy of ``metric`` (so a margin loss learns a β per class and learner).

    Args:
        metric: the metric loss of one learner (a :class:`~medsim.losses.MetricLoss` built in the config, e.g.
            isic_dsl's ``metric_loss``; isic_abe's ``contrastive`` variant gives the paper's Eq. 10); it is copied
            ``n_learners`` times.
        n_learners: M.
        m_div: divergence margin (paper: 1).
        lambda_div: divergence weight (paper: 1; 0 = the "without divergence loss" ablation of Table 2).
    """

    required_outputs = ("learner_embeddings",)

    def __init__(self, metric: nn.Module, *, n_learners: int = 4, m_div: float = 1.0, lambda_div: float = 1.0):
        super().__init__()
        if n_learners < 1:
            raise ValueError(f"n_learners must be >= 1, got n_learners={n_learners}")
        if type(metric).__name__ == "ClassificationLoss":
            raise ValueError("ABELoss needs a metric loss on each learner's embedding; got a ClassificationLoss")
        self.metric = nn.ModuleList(copy.deepcopy(metric) for _ in range(n_learners))
        self.n_learners, self.m_div, self.lambda_div = n_learners, float(m_div), float(lambda_div)

    def compute_loss(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        emb = outputs["learner_embeddings"]
        if emb.ndim != 3 or emb.shape[1] != self.n_learners:
            raise ValueError(f"expected learner embeddings (B, {self.n_learners}, d), got shape {tuple(emb.shape)}")
        loss = sum(metric(emb[:, m], labels) for m, metric in enumerate(self.metric))
        if self.lambda_div:
            loss = loss + self.lambda_div * divergence_loss(emb, self.m_div)
        return loss
