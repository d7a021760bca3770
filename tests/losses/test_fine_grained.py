"""Eq. 3 of gated-attention fine-grained classification (Fan et al., MICCAI 2020) against the formula by hand, and
its λ schedule (1, minus 0.1 every 20 epochs; or compressed to the run)."""

from __future__ import annotations

import math

import pytest
import torch

from medsim.losses.fine_grained import FineGrainedLoss, lambda_schedule


def _ce(logits: list[float], label: int) -> float:
    return -math.log(math.exp(logits[label]) / sum(math.exp(v) for v in logits))


def test_loss_matches_eq3_by_hand():
    g = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]])
    f = torch.tensor([[0.0, 1.0, -0.5], [1.5, -0.2, 0.3], [0.4, 0.4, 2.0]])
    y = torch.tensor([0, 2, 1])
    loss = FineGrainedLoss(step_epochs=20)
    for epoch, lam in ((0, 1.0), (19, 1.0), (20, 0.9), (45, 0.8)):
        loss.set_epoch(epoch, 200)
        want = sum(lam * _ce(g[i].tolist(), int(y[i])) + (1 - lam) * _ce(f[i].tolist(), int(y[i]))
                   for i in range(3)) / 3  # λ L_G + (1 − λ) L_F, each the batch-mean cross-entropy
        got = loss({"global_logits": g, "logits": f, "embedding": torch.zeros(3, 4)}, y)
        assert loss.lam == pytest.approx(lam) and float(got) == pytest.approx(want, rel=1e-6)


def test_gradient_goes_to_the_fusion_head_only_once_lambda_drops():
    g = torch.randn(4, 3, requires_grad=True)
    f = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss = FineGrainedLoss(step_epochs=None)
    loss.set_epoch(0, 10)  # λ = 1: only the global term
    loss({"global_logits": g, "logits": f}, y).backward()
    assert f.grad is None and float(g.grad.abs().sum()) > 0
    loss.set_epoch(5, 10)  # λ = 0.5
    loss({"global_logits": g, "logits": f}, y).backward()
    assert float(f.grad.abs().sum()) > 0
    assert FineGrainedLoss.takes_outputs is True


def test_schedule_values():
    # the paper: λ = 1, reduced by 0.1 after every 20 training epochs
    assert [lambda_schedule(e) for e in (0, 19, 20, 39, 40, 100, 199, 200, 260)] == pytest.approx(
        [1.0, 1.0, 0.9, 0.9, 0.8, 0.5, 0.1, 0.0, 0.0])
    assert lambda_schedule(100, min_lambda=0.6) == 0.6
    # compressed to the run: ten equal phases of max_epochs / 10
    assert [lambda_schedule(e, 6, step_epochs=None) for e in range(6)] == pytest.approx(
        [1.0, 0.9, 0.7, 0.5, 0.4, 0.2])
    assert [lambda_schedule(e, 10, step_epochs=None) for e in range(10)] == pytest.approx(
        [1.0 - 0.1 * e for e in range(10)])
    assert lambda_schedule(3, 8, step_epochs=2) == 0.9  # an explicit step ignores max_epochs
    fixed = FineGrainedLoss(fixed_lambda=0.3)
    fixed.set_epoch(50, 100)
    assert fixed.lam == 0.3


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="missing \\['global_logits'\\]"):
        FineGrainedLoss()({"logits": torch.zeros(2, 3)}, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(2, 3\), \(2, 4\)"):
        FineGrainedLoss()({"global_logits": torch.zeros(2, 3), "logits": torch.zeros(2, 4)}, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="max_epochs"):
        lambda_schedule(2, None, step_epochs=None)
    with pytest.raises(ValueError, match="epoch=-1"):
        lambda_schedule(-1)
    with pytest.raises(ValueError, match="fixed_lambda=2"):
        FineGrainedLoss(fixed_lambda=2)
