"""Each SSL loss against its paper's formula written out by hand; W-MSE whitening; false-negative elimination."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medsim.ssl import (METHODS, BarlowTwinsLoss, BYOLLoss, MoCoLoss, NTXentLoss, SimSiamLoss, VICRegLoss, WMSELoss,
                        get_method, whiten)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _ntxent_by_hand(z1, z2, tau, eliminated=frozenset()):
    """SimCLR Eq. 1 over 2N anchors; ``eliminated`` holds (anchor, sample) pairs left out of the denominator."""
    z = torch.cat([z1, z2])
    n2, n = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        den = sum(math.exp(_cos(z[i], z[k]) / tau) for k in range(n2) if k != i and (i, k) not in eliminated)
        total += -math.log(math.exp(_cos(z[i], z[j]) / tau) / den)
    return total / n2


def test_ntxent_matches_the_formula_for_two_and_three_views():
    torch.manual_seed(0)
    z1, z2, z3 = torch.randn(3, 6, 5).unbind(0)
    loss = NTXentLoss(temperature=0.5)
    assert float(loss({"z": [z1, z2]}, {})) == pytest.approx(_ntxent_by_hand(z1, z2, 0.5), rel=1e-5)
    # V = 3: each positive pair (a, p) with the negatives of a (other images) in the denominator
    z, b = torch.cat([z1, z2, z3]), 6
    terms = []
    for a in range(18):
        for p in range(18):
            if p != a and p % b == a % b:
                neg = sum(math.exp(_cos(z[a], z[k]) / 0.5) for k in range(18) if k % b != a % b)
                pos = math.exp(_cos(z[a], z[p]) / 0.5)
                terms.append(-math.log(pos / (pos + neg)))
    assert float(loss({"z": [z1, z2, z3]}, None)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_moco_infonce_against_the_queue():
    torch.manual_seed(1)
    q, k, queue = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1), F.normalize(
        torch.randn(10, 8), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    got = MoCoLoss(temperature=0.2)({"q": q, "k": k, "queue": queue}, {"label": torch.arange(4)})
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_byol_and_simsiam_match_their_formulas():
    torch.manual_seed(2)
    p1, p2, z1, z2 = torch.randn(4, 5, 6).unbind(0)
    byol = sum(2 - 2 * _cos(p1[b], z2[b]) + 2 - 2 * _cos(p2[b], z1[b]) for b in range(5)) / 5
    assert float(BYOLLoss()({"p": [p1, p2], "z_target": [z1, z2]}, {})) == pytest.approx(byol, rel=1e-5)
    simsiam = sum(-0.5 * _cos(p1[b], z2[b]) - 0.5 * _cos(p2[b], z1[b]) for b in range(5)) / 5
    z1g, z2g = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = SimSiamLoss()({"p": [p1.requires_grad_(), p2], "z": [z1g, z2g]}, {})
    assert float(loss.detach()) == pytest.approx(simsiam, rel=1e-5)
    loss.backward()
    assert z1g.grad is None and z2g.grad is None and p1.grad is not None  # stop-gradient on z
    loss = SimSiamLoss(stop_gradient=False)({"p": [p1, p2], "z": [z1g, z2g]}, {})
    loss.backward()
    assert z1g.grad is not None


def test_barlow_twins_with_explicit_c_ij():
    torch.manual_seed(3)
    z1, z2 = torch.randn(2, 16, 4).unbind(0)
    n, d, lambd = 16, 4, 5e-3
    def std_col(z, i):
        m = sum(float(z[b, i]) for b in range(n)) / n
        s = math.sqrt(sum((float(z[b, i]) - m) ** 2 for b in range(n)) / n)
        return [(float(z[b, i]) - m) / s for b in range(n)]
    a = [std_col(z1, i) for i in range(d)]
    c = [[sum(a[i][b] * x for b, x in enumerate(std_col(z2, j))) / n for j in range(d)] for i in range(d)]
    expected = sum((1 - c[i][i]) ** 2 for i in range(d)) + lambd * sum(
        c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    assert float(BarlowTwinsLoss()({"z": [z1, z2]}, {})) == pytest.approx(expected, rel=1e-4)


def test_vicreg_with_explicit_terms():
    torch.manual_seed(4)
    z1, z2 = (torch.randn(2, 12, 5) * torch.tensor([0.5, 1.0, 2.0, 0.1, 1.5])).unbind(0)
    def v(z):
        return sum(max(0.0, 1 - math.sqrt(float(z[:, j].var()) + 1e-4)) for j in range(5)) / 5
    def c(z):
        zc = z - z.mean(0)
        cov = zc.T @ zc / 11
        return sum(float(cov[i, j]) ** 2 for i in range(5) for j in range(5) if i != j) / 5
    inv = sum(float((z1[b] - z2[b]).pow(2).sum()) for b in range(12)) / (12 * 5)
    expected = 25 * inv + 25 * (v(z1) + v(z2)) / 2 + 1 * (c(z1) + c(z2))
    assert float(VICRegLoss()({"z": [z1, z2]}, {})) == pytest.approx(expected, rel=1e-4)


def test_whitening_gives_identity_covariance_and_wmse_matches_its_formula():
    torch.manual_seed(5)
    x = torch.randn(64, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) + 3
    w = whiten(x)
    assert torch.allclose(w.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(w.T @ w / 63, torch.eye(6, dtype=torch.float64), atol=1e-10)
    z1, z2 = torch.randn(2, 16, 4, dtype=torch.float64).unbind(0)
    w1, w2 = whiten(z1), whiten(z2)  # one group = the whole batch: the permutation does not matter
    expected = sum(float((F.normalize(w1[b], dim=0) - F.normalize(w2[b], dim=0)).pow(2).sum()) for b in range(16)) / 16
    assert float(WMSELoss(w_size=16)({"z": [z1, z2]}, {})) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="multiple of it"):
        WMSELoss(w_size=5)({"z": [z1, z2]}, {})


def _planted_duplicate(b=6, d=8):
    """Two views of b images; image 3 is a near copy of image 0 (a false negative of image 0)."""
    torch.manual_seed(6)
    base = torch.randn(b, d)
    base[3] = base[0] + 0.01 * torch.randn(d)
    return base + 0.3 * torch.randn(b, d), base + 0.3 * torch.randn(b, d)


def test_simclr_elimination_removes_the_planted_duplicate_and_lowers_the_loss():
    z1, z2 = _planted_duplicate()
    plain = float(NTXentLoss(temperature=0.5)({"z": [z1, z2]}, {}))
    fnc = float(NTXentLoss(temperature=0.5, fnc="elimination", fnc_k=2)({"z": [z1, z2]}, {}))
    # anchors of image 0 (samples 0, 6) lose both views of image 3 (3, 9) and vice versa
    eliminated = {(a, k) for a in (0, 6) for k in (3, 9)} | {(a, k) for a in (3, 9) for k in (0, 6)}
    # ... and every other anchor loses its own two most similar negatives: compute them the paper's way
    z = torch.cat([z1, z2])
    for a in range(12):
        if a in (0, 3, 6, 9):
            continue
        support = z[(a + 6) % 12]
        scores = {k: _cos(support, z[k]) for k in range(12) if k % 6 != a % 6}
        eliminated |= {(a, k) for k in sorted(scores, key=scores.get)[-2:]}
    assert fnc == pytest.approx(_ntxent_by_hand(z1, z2, 0.5, eliminated), rel=1e-5)
    assert fnc < plain
    # threshold-only rule: only the duplicate clears it
    only_dup = float(NTXentLoss(temperature=0.5, fnc="elimination", fnc_k=None, fnc_threshold=0.8)({"z": [z1, z2]}, {}))
    dup = {(a, k) for a in (0, 6) for k in (3, 9)} | {(a, k) for a in (3, 9) for k in (0, 6)}
    assert only_dup == pytest.approx(_ntxent_by_hand(z1, z2, 0.5, dup), rel=1e-5)
    assert only_dup < plain


def test_moco_elimination_drops_the_duplicate_queue_entry():
    torch.manual_seed(7)
    q, k = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    queue = F.normalize(torch.randn(10, 8), dim=1)
    queue[4] = F.normalize(k[1] + 0.01 * torch.randn(8), dim=0)  # a false negative of image 1 sits in the queue
    pred = {"q": q, "k": k, "queue": queue}
    plain = float(MoCoLoss()(pred, {}))
    fnc = float(MoCoLoss(fnc="elimination", fnc_k=1, fnc_threshold=0.9)(pred, {}))
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[1, 4] = False
    expected = 0.0
    for b in range(3):
        logits = torch.cat([(q[b] * k[b]).sum(0, keepdim=True), q[b] @ queue[keep[b]].T]) / 0.2
        expected += float(-F.log_softmax(logits, 0)[0])
    assert fnc == pytest.approx(expected / 3, rel=1e-5) and fnc < plain


def test_options_are_checked_and_the_registry_suggests():
    with pytest.raises(ValueError, match="elimination"):
        NTXentLoss(fnc="eliminaton")
    with pytest.raises(ValueError, match="neither"):
        MoCoLoss(fnc="elimination", fnc_k=None)
    with pytest.raises(ValueError, match="missing"):
        BYOLLoss()({"z": []}, {})
    with pytest.raises(ValueError, match="byol"):
        get_method("byo")
    assert set(METHODS) == {"simclr", "moco_v2", "byol", "simsiam", "barlow_twins", "vicreg", "wmse"}
