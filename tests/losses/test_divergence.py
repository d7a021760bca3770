"""ABE's divergence loss (Eq. 9) and full objective (Eq. 8) against loops written from the paper's formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsim.losses import ClassificationLoss
from medsim.losses.divergence import ABELoss, divergence_loss



def metric(name: str, n_classes: int | None = None):
    """The per-learner metric losses the bundles configure (isic_dsl's margin, its contrastive variant, and
    isic_abe's contrastive variant = ABE's Eq. 10)."""
    from pytorch_metric_learning import distances, losses, miners, reducers

    from medsim.losses import MetricLoss

    if name == "margin":
        return MetricLoss(losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2, learn_beta=True, num_classes=n_classes),
                          miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4))
    if name == "contrastive":
        return MetricLoss(losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5, distance=distances.LpDistance()))
    return MetricLoss(losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=distances.LpDistance(power=2),
                                             reducer=reducers.MeanReducer()))

def _learners(seed=0, b=6, m=4, d=5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, m, d, generator=g), dim=-1)


def _div_loop(e: torch.Tensor, m_div: float) -> torch.Tensor:
    total = torch.zeros(())
    for i in range(e.shape[0]):
        for p in range(e.shape[1]):
            for q in range(p + 1, e.shape[1]):
                total = total + torch.clamp(m_div - torch.sum((e[i, p] - e[i, q]) ** 2), min=0)
    return total / e.shape[0]


@pytest.mark.parametrize("m_div", [1.0, 2.5])
def test_divergence_matches_the_pair_loop(m_div):
    e = _learners()
    torch.testing.assert_close(divergence_loss(e, m_div), _div_loop(e, m_div))
    assert float(divergence_loss(e[:, :1], m_div)) == 0.0  # one learner: no self pairs


def test_far_apart_learners_give_zero_divergence_and_no_gradient():
    e = torch.eye(4)[None].repeat(3, 1, 1).requires_grad_(True)  # orthogonal learners: ‖a − b‖² = 2 > m_div
    loss = divergence_loss(e, 1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(e.grad.abs().max()) == 0.0
    same = torch.ones(3, 4, 4) / 2  # identical learners: every pair pays the full margin
    assert float(divergence_loss(same, 1.0)) == pytest.approx(6.0)


def test_abe_loss_is_the_sum_of_per_learner_pml_losses_plus_divergence():
    from pytorch_metric_learning import distances, losses

    e = _learners(1, b=12, m=3, d=6)
    y = torch.arange(12) % 3
    abe = ABELoss(metric("contrastive"), n_learners=3, m_div=1.0, lambda_div=0.7)
    pml = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5, distance=distances.LpDistance())
    expected = sum(pml(e[:, m], y) for m in range(3)) + 0.7 * _div_loop(e, 1.0)
    torch.testing.assert_close(abe({"learner_embeddings": e, "embedding": e.flatten(1)}, y), expected)
    nodiv = ABELoss(metric("contrastive"), n_learners=3, lambda_div=0.0)
    torch.testing.assert_close(nodiv({"learner_embeddings": e}, y), expected - 0.7 * _div_loop(e, 1.0))


def test_margin_loss_per_learner_has_its_own_betas():
    from pytorch_metric_learning import losses, miners

    from medsim.losses import MetricLoss

    e = _learners(2, b=16, m=2, d=6)
    y = torch.arange(16) % 4
    abe = ABELoss(metric("margin", 4), n_learners=2)
    assert [tuple(p.shape) for p in abe.parameters()] == [(4,), (4,)]
    torch.manual_seed(3)  # the distance-weighted miner samples: same seed, same order of draws
    got = abe({"learner_embeddings": e}, y)
    torch.manual_seed(3)
    ref = [MetricLoss(losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2, learn_beta=True, num_classes=4),
                      miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)) for _ in range(2)]
    expected = sum(r(e[:, m], y) for m, r in enumerate(ref)) + divergence_loss(e, 1.0)
    torch.testing.assert_close(got, expected)


def test_gradient_reaches_every_learners_attention_conv():
    from medsim.nn.abe import ABEEmbedder

    torch.manual_seed(0)
    net = ABEEmbedder("resnet10", widen_factor=0.25, embedding_dim=12, n_learners=3)
    out = net(torch.randn(8, 3, 32, 32))
    divergence_loss(out["learner_embeddings"], 1.0).backward(retain_graph=True)
    assert all(float(h.weight.grad.abs().sum()) > 0 for h in net.attention_heads)  # divergence alone reaches each
    net.zero_grad()
    ABELoss(metric("contrastive_abe"), n_learners=3, lambda_div=0.0)(out, torch.arange(8) % 2).backward()
    assert all(float(h.weight.grad.abs().sum()) > 0 for h in net.attention_heads)  # Eq. 10 alone reaches each


def test_errors_name_the_problem():
    abe = ABELoss(metric("contrastive"), n_learners=2)
    with pytest.raises(ValueError, match=r"learner_embeddings.*got keys \['embedding'\]"):
        abe({"embedding": torch.randn(4, 8)}, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 2, d\), got shape \(4, 3, 5\)"):
        abe({"learner_embeddings": _learners(b=4, m=3)}, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, M, d\), got shape \(4, 5\)"):
        divergence_loss(torch.randn(4, 5))
    with pytest.raises(ValueError, match="ClassificationLoss"):
        ABELoss(ClassificationLoss())
