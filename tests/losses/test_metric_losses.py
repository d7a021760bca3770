"""Each loss against a loop written from its formula (all triplets / pairs of a small batch). The losses are built
from the bundles' own configs (``_target_`` + keyword arguments), so the configs are what is checked."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medsim.losses import ClassificationLoss, CombinedLoss, MetricLoss

ROOT = Path(__file__).resolve().parents[2]


def bundle_loss(bundle: str = "isic_dsl", variant: str | None = None, key: str = "metric_loss", n_classes: int = 3):
    """The loss a bundle (variant) configures, built by MONAI's ConfigParser with ``n_classes`` classes."""
    from monai.bundle import ConfigParser

    from medsim.engines.workflow import _bundle_files

    parser = ConfigParser(ConfigParser.load_config_files(_bundle_files(ROOT / "bundles" / bundle, variant)))
    parser["classes"] = [str(i) for i in range(n_classes)]
    return parser.get_parsed_content(key)


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
    loss = bundle_loss(n_classes=5)
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
    loss = bundle_loss(variant="contrastive")  # pos margin 0, neg margin 0.5, Euclidean
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
    loss = bundle_loss("isic_abe", "contrastive")
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
    loss = bundle_loss(n_classes=3)
    assert type(loss.miner).__name__ == "DistanceWeightedMiner" and type(loss.loss).__name__ == "MarginLoss"
    e, y = _batch(n=30)
    assert torch.isfinite(loss(e, y))


def test_every_variant_configures_its_loss():
    assert isinstance(bundle_loss(key="loss"), MetricLoss)  # isic_dsl: the margin loss
    triplet = bundle_loss(variant="triplet")
    assert type(triplet.loss).__name__ == "TripletMarginLoss" and triplet.miner.type_of_triplets == "semihard"
    assert isinstance(bundle_loss(variant="classifier", key="loss"), ClassificationLoss)
    e, y = _batch(1)
    d = torch.cdist(e, e)
    per = torch.stack([F.relu(d[a, p] - d[a, q] + 0.1) for a, p, q in _triplets(y)])
    hard = per[(per > 0)]  # the semi-hard miner keeps only triplets with d_ap < d_an < d_ap + margin
    semi = torch.stack([F.relu(d[a, p] - d[a, q] + 0.1) for a, p, q in _triplets(y) if d[a, p] < d[a, q]])
    torch.testing.assert_close(triplet(e, y), semi[semi > 0].mean(), atol=1e-5, rtol=1e-5)
    assert hard.numel() >= semi[semi > 0].numel()


def test_combined_loss_is_the_weighted_sum():
    e, y = _batch()
    logits = torch.randn(len(y), 3)
    metric, ce = bundle_loss(variant="contrastive"), ClassificationLoss()
    both = CombinedLoss({"metric": metric, "ce": ce}, weights={"metric": 0.5, "ce": 2.0})
    torch.testing.assert_close(both(e, y, logits), 0.5 * metric(e, y) + 2.0 * ce(e, y, logits))
    assert set(both.last) == {"metric", "ce"}
    with pytest.raises(ValueError, match="2 weights for 1 losses"):
        CombinedLoss([ce], weights=[1.0, 2.0])


def test_bad_shapes_are_checked_once_in_the_base():
    from pytorch_metric_learning import losses

    for loss in (MetricLoss(losses.TripletMarginLoss()), ClassificationLoss(), CombinedLoss([ClassificationLoss()])):
        with pytest.raises(ValueError, match=r"expected embedding \(B, D\)"):
            loss(torch.randn(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"expected logits \(B, C\)"):
        ClassificationLoss()(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.randn(3, 2))
