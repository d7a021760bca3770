"""LossAttentionLoss (Shi et al., TIP 2021, Eqs. 9–10): each term against a loop written from the formula, the
Gaussian ramp-up, multi-hot labels, errors."""

from __future__ import annotations

import math

import pytest
import torch

from medsim.losses.loss_attention import LossAttentionLoss, gaussian_rampup


def _outputs(b: int = 4, m: int = 5, k: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(b, m, generator=g)
    w[0, :2] = 0.0  # patches removed by ξ
    return {"logits": torch.randn(b, k, generator=g, dtype=torch.float64),
            "patch_logits": torch.randn(b, m, k, generator=g, dtype=torch.float64),
            "patch_weights": (w / w.sum(1, keepdim=True)).double()}


def _log_softmax(v: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(x) for x in v))
    return [x - lse for x in v]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _eq9_loop(out, y, w: float) -> float:
    """−1/|B| Σ_i [ y_iᵀ log s(z_i) + w Σ_j α_ij y_iᵀ log s(p_ij) ]."""
    total = 0.0
    for i in range(len(y)):
        t = int(y[i])
        total += _log_softmax(out["logits"][i].tolist())[t]
        total += w * sum(float(out["patch_weights"][i, j]) * _log_softmax(out["patch_logits"][i, j].tolist())[t]
                         for j in range(out["patch_logits"].shape[1]))
    return -total / len(y)


def _eq10_loop(out, targets, w: float) -> float:
    """1/|B| Σ_i [ −Σ_k (y log σ(z) + (1−y) log(1−σ(z))) + w Σ_j α_ij min_{k: y_ik=1} −log σ(p_ijk) ]."""
    total = 0.0
    b, m, k = out["patch_logits"].shape
    for i in range(b):
        for c in range(k):
            z, y = float(out["logits"][i, c]), float(targets[i, c])
            total -= y * _log_sigmoid(z) + (1 - y) * _log_sigmoid(-z)
        labels = [c for c in range(k) if targets[i, c] == 1]
        if labels:
            total += w * sum(float(out["patch_weights"][i, j]) *
                             min(-_log_sigmoid(float(out["patch_logits"][i, j, c])) for c in labels)
                             for j in range(m))
    return total / b


@pytest.mark.parametrize("gamma", [0.0, 0.1, 2.0])
def test_softmax_eq9_against_loop(gamma):
    out, y = _outputs(), torch.tensor([0, 2, 1, 2])
    loss = LossAttentionLoss("softmax", gamma_max=gamma)(out, y)
    assert float(loss) == pytest.approx(_eq9_loop(out, y, gamma), rel=1e-10)
    if gamma == 0.0:
        assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(out["logits"], y)), rel=1e-10)


def test_sigmoid_eq10_with_multi_hot_labels():
    out = _outputs(b=4, k=4, seed=1)
    targets = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    crit = LossAttentionLoss("sigmoid", gamma_max=0.7)
    assert float(crit(out, targets)) == pytest.approx(_eq10_loop(out, targets, 0.7), rel=1e-10)
    # the patch term takes the image label a patch agrees with most (min over labels), not the sum
    assert crit.last["patch"] < float(sum(
        (-torch.nn.functional.logsigmoid(out["patch_logits"][i]) * targets[i]).sum(1) @ out["patch_weights"][i]
        for i in range(4))) / 4
    # class indices are one-hot labels
    y = torch.tensor([2, 0, 1, 3])
    assert float(crit(out, y)) == pytest.approx(_eq10_loop(out, torch.eye(4, dtype=torch.float64)[y], 0.7),
                                                rel=1e-10)


def test_gaussian_rampup_values():
    assert gaussian_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert gaussian_rampup(40, 80) == pytest.approx(math.exp(-1.25))
    assert gaussian_rampup(80, 80) == 1.0 and gaussian_rampup(150, 80) == 1.0 and gaussian_rampup(3, 0) == 1.0
    crit = LossAttentionLoss(gamma_max=0.1, rampup=0.4)  # the paper: 80 of 200 epochs
    assert crit.weight == 0.1  # full weight until a schedule is set
    crit.set_epoch(0, 200)
    assert crit.weight == pytest.approx(0.1 * math.exp(-5))
    crit.set_epoch(20, 200)
    assert crit.weight == pytest.approx(0.1 * math.exp(-5 * 0.75 ** 2))
    crit.set_epoch(80, 200)
    assert crit.weight == pytest.approx(0.1)
    crit.set_epoch(3, 10)  # short runs: T over the first 4 epochs
    assert crit.weight == pytest.approx(0.1 * math.exp(-5 * 0.25 ** 2))
    out, y = _outputs(), torch.tensor([0, 2, 1, 2])
    assert float(crit(out, y)) == pytest.approx(_eq9_loop(out, y, crit.weight), rel=1e-10)


def test_gradient_flows_through_the_weights():
    out = {k: v.clone().requires_grad_(True) for k, v in _outputs().items()}
    LossAttentionLoss(gamma_max=0.5)(out, torch.tensor([0, 2, 1, 2])).backward()
    assert all(out[k].grad.abs().sum() > 0 for k in out)


def test_errors_name_the_problem():
    crit = LossAttentionLoss()
    with pytest.raises(ValueError, match=r"missing \['patch_logits', 'patch_weights'\]"):
        crit({"logits": torch.zeros(2, 3)}, torch.tensor([0, 1]))
    out = _outputs()
    with pytest.raises(ValueError, match=r"class indices of shape \(4,\)"):
        crit(out, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"multi-hot \(4, 3\), got \(4, 2\)"):
        LossAttentionLoss("sigmoid")(out, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="did you mean 'sigmoid'"):
        LossAttentionLoss("sigmod")
    with pytest.raises(ValueError, match="gamma_max=-1"):
        LossAttentionLoss(gamma_max=-1)
    assert LossAttentionLoss.takes_outputs is True
