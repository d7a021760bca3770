"""Each loss against a loop written from its formula (all triplets / pairs of a small batch)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from medsim.losses import ClassificationLoss, MetricLoss, make_loss


def _batch(seed=0, n=12, d=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y = torch.arange(n) % classes
    return e, y


def _triplets(y):
    n = len(y)
    return [(a, p, q) for a, p, q in itertools.product(range(n), repeat=3)
            if a != p and y[a] == y[p] and y[a] != y[q]]


def test_margin_loss_formula():
    from pytorch_metric_learning import losses

    e, y = _batch()
    beta = torch.tensor([1.0, 1.1, 1.3])
    loss = MetricLoss(losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2, learn_beta=True, num_classes=3))
    with torch.no_grad():
        loss.loss.beta.copy_(beta)
    d = torch.cdist(e, e)
    pos, neg = [], []
    for a, p, q in _triplets(y):
        b = beta[y[a]]
        pos.append(F.relu(d[a, p] - b + 0.2))
        neg.append(F.relu(b - d[a, q] + 0.2))
    pos, neg = torch.stack(pos), torch.stack(neg)
    expected = (pos.sum() + neg.sum()) / ((pos > 0).sum() + (neg > 0).sum())
    torch.testing.assert_close(loss(e, y), expected, atol=1e-5, rtol=1e-5)


def test_margin_beta_is_learnable_per_class():
    loss = make_loss("margin", n_classes=5)
    params = list(loss.parameters())
    assert len(params) == 1 and params[0].shape == (5,) and params[0].requires_grad
    e, y = _batch(n=20, classes=5)
    e.requires_grad_(True)
    loss(e, y).backward()
    assert params[0].grad is not None


def test_triplet_loss_formula():
    from pytorch_metric_learning import losses

    e, y = _batch(1)
    loss = MetricLoss(losses.TripletMarginLoss(margin=0.1))
    d = torch.cdist(e, e)
    per = torch.stack([F.relu(d[a, p] - d[a, q] + 0.1) for a, p, q in _triplets(y)])
    torch.testing.assert_close(loss(e, y), per[per > 0].mean(), atol=1e-5, rtol=1e-5)


def test_contrastive_loss_formula():
    e, y = _batch(2)
    loss = make_loss("contrastive")  # pos margin 0, neg margin 0.5, Euclidean
    d = torch.cdist(e, e)
    n = len(y)
    pos = torch.stack([d[i, j] for i in range(n) for j in range(n) if i != j and y[i] == y[j]])
    neg = torch.stack([F.relu(0.5 - d[i, j]) for i in range(n) for j in range(n) if y[i] != y[j]])
    expected = pos[pos > 0].mean() + (neg[neg > 0].mean() if (neg > 0).any() else 0.0)
    torch.testing.assert_close(loss(e, y), expected, atol=1e-5, rtol=1e-5)


def test_contrastive_abe_is_eq10_of_the_abe_paper():
    """Eq. 10: y·D² + (1 − y)·[m_c − D²]+ with m_c = 1 over all pairs i ≠ j (PML: the positive and the negative
    pairs averaged separately, zero losses included)."""
    e, y = _batch(2)
    loss = make_loss("contrastive_abe")
    d2 = torch.cdist(e, e) ** 2
    n = len(y)
    pos = torch.stack([d2[i, j] for i in range(n) for j in range(n) if i != j and y[i] == y[j]])
    neg = torch.stack([F.relu(1.0 - d2[i, j]) for i in range(n) for j in range(n) if y[i] != y[j]])
    torch.testing.assert_close(loss(e, y), pos.mean() + neg.mean(), atol=1e-5, rtol=1e-5)


def test_classifier_loss_is_cross_entropy():
    e, y = _batch()
    logits = torch.randn(len(y), 3)
    torch.testing.assert_close(ClassificationLoss()(e, y, logits), -F.log_softmax(logits, 1)[range(len(y)), y].mean())
    with pytest.raises(ValueError, match="needs logits"):
        ClassificationLoss()(e, y)


def test_distance_weighted_miner_is_used_and_loss_is_finite():
    loss = make_loss("margin", n_classes=3)
    assert type(loss.miner).__name__ == "DistanceWeightedMiner"
    e, y = _batch(n=30)
    assert torch.isfinite(loss(e, y))


def test_bad_names_and_shapes():
    with pytest.raises(ValueError, match="did you mean 'triplet'"):
        make_loss("triplett")
    with pytest.raises(ValueError, match=r"expected embedding \(B, D\)"):
        make_loss("triplet")(torch.randn(4), torch.zeros(4))
