"""LossAttentionNet (Shi et al., TIP 2021) and its MIL pooling baselines (Ilse et al. 2018): trunk surgery, Eq. 5/6
weights against loops written from the formulas, image logits = weighted patch logits, shared classifier,
footprints, and a toy problem whose class-bearing patch is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medsim.nn.loss_attention import (POOLINGS, LossAttentionNet, capsule_loss_based_weights, flat_resnet,
                                      loss_based_weights)

SMALL = {"backbone": "resnet10", "cut": "layer1", "widen_factor": 0.25, "strided": (), "patch_channels": 8}
CAPS = {"primary_channels": 4, "primary_dim": 3, "capsule_channels": 5, "capsule_dim": 6}


def _net(**kw) -> LossAttentionNet:
    torch.manual_seed(0)
    return LossAttentionNet(n_classes=3, **{**SMALL, **kw}).eval()


def _eq5_loop(p: torch.Tensor, xi: float) -> torch.Tensor:
    """Eq. 5a written out: α̂_j = ‖p_j‖ / Σ_m ‖p_m‖; α_j = max(0, α̂_j − ξ/M), renormalised."""
    out = torch.zeros(p.shape[:2], dtype=torch.float64)
    for b in range(p.shape[0]):
        m = p.shape[1]
        norms = [math.sqrt(sum(float(v) ** 2 for v in p[b, j])) for j in range(m)]
        kept = [max(0.0, n / sum(norms) - xi / m) for n in norms]
        for j in range(m):
            out[b, j] = kept[j] / sum(kept)
    return out


def test_flat_resnet_removes_pooling_and_strides():
    trunk, c, s = flat_resnet("resnet18", cut="layer3", widen_factor=0.25, strided=("conv1",))
    assert not any(isinstance(m, nn.MaxPool2d) for m in trunk.modules()) and s == 2 and c == 64
    assert trunk(torch.randn(1, 3, 40, 40)).shape == (1, 64, 20, 20)
    trunk, _, s = flat_resnet("resnet10", cut="layer4", widen_factor=0.25, strided=("layer2", "layer4"))
    assert s == 4 and trunk(torch.randn(1, 3, 40, 40)).shape[-2:] == (10, 10)
    trunk, _, s = flat_resnet("resnet10", cut="layer2", widen_factor=0.25, strided=("layer3",))  # beyond the cut
    assert s == 1 and trunk(torch.randn(1, 3, 21, 21)).shape[-2:] == (21, 21)
    with pytest.raises(ValueError, match="did you mean 'layer2'"):
        flat_resnet(strided=("layr2",))


@pytest.mark.parametrize("head,pooling", [("softmax", "loss"), ("sigmoid", "loss"), ("softmax", "mean"),
                                          ("softmax", "attention"), ("softmax", "gated"), ("capsule", "loss")])
def test_shapes_and_contract(head, pooling):
    net = _net(head=head, pooling=pooling, **(CAPS if head == "capsule" else {}))
    out = net(torch.randn(2, 3, 21, 21))  # trunk 21×21 -> 9×9 stride-4 patch conv -> 4×4 = 16 patches
    d = 6 if head == "capsule" else 8
    assert out["logits"].shape == (2, 3) and out["patch_logits"].shape == (2, 16, 3)
    assert out["patch_weights"].shape == (2, 16) and out["attention"].shape == (2, 1, 4, 4)
    assert out["embedding"].shape == (2, d) and net.embedding_dim == d
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out["patch_weights"].sum(1), torch.ones(2))
    att = out["attention"].flatten(1)
    assert att.min() >= 0 and torch.allclose(att.amax(1), torch.ones(2))
    torch.testing.assert_close(att, out["patch_weights"] / out["patch_weights"].amax(1, keepdim=True))
    if head == "capsule":
        assert out["capsule_logits"].shape == (2, 16, 5, 3) and out["capsule_weights"].shape == (2, 16, 5)
    assert _net(embedding_dim=5, pooling=pooling if head != "capsule" else "loss")(torch.randn(1, 3, 21, 21))[
        "embedding"].shape == (1, 5)


@pytest.mark.parametrize("xi", [0.0, 0.1, 0.6, 1.0])
def test_eq5_weights_against_a_loop(xi):
    torch.manual_seed(1)
    p = torch.randn(3, 7, 4, dtype=torch.float64)
    w = loss_based_weights(p, xi)
    torch.testing.assert_close(w, _eq5_loop(p, xi))
    if xi == 0.0:  # no threshold: the L2,1 shares themselves
        torch.testing.assert_close(w, p.norm(dim=2) / p.norm(dim=2).sum(1, keepdim=True))
    if xi >= 0.6:
        assert (w == 0).any() and (w > 0).sum(1).min() >= 1  # trivial patches removed, never all of them


def test_model_uses_eq5_shared_classifier_and_weighted_sum():
    net = _net(xi=0.3)
    x = torch.randn(2, 3, 21, 21)
    with torch.no_grad():
        out = net(x)
        h = net.patch_features(net.backbone(x)).flatten(2).transpose(1, 2)  # (B, M, C) patch features
    # the patch logits come from the image classifier's own parameters Θ, b
    torch.testing.assert_close(out["patch_logits"], h @ net.classifier.weight.T + net.classifier.bias)
    torch.testing.assert_close(out["patch_weights"], _eq5_loop(out["patch_logits"].double(), 0.3).float())
    for b in range(2):  # image logits = Σ_j α_j p_j, written as a loop
        z = sum(out["patch_weights"][b, j] * out["patch_logits"][b, j] for j in range(16))
        torch.testing.assert_close(out["logits"][b], z)
        pooled = sum(out["patch_weights"][b, j] * h[b, j] for j in range(16))  # and = Θ(Σ α_j h_j) + b
        torch.testing.assert_close(out["logits"][b], net.classifier(pooled), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["embedding"][b], pooled / pooled.norm())


def test_mil_poolings_follow_ilse():
    for pooling in ("attention", "gated"):
        net = _net(pooling=pooling)
        x = torch.randn(2, 3, 21, 21)
        with torch.no_grad():
            out = net(x)
            h = net.patch_features(net.backbone(x)).flatten(2).transpose(1, 2)
            pool = net.pooling
            for b in range(2):
                scores = []
                for j in range(16):
                    v = torch.tanh(pool.V.weight @ h[b, j] + pool.V.bias)
                    if pooling == "gated":
                        v = v * torch.sigmoid(pool.U.weight @ h[b, j] + pool.U.bias)
                    scores.append(float(pool.w.weight[0] @ v + pool.w.bias[0]))
                e = [math.exp(s) for s in scores]
                torch.testing.assert_close(out["patch_weights"][b], torch.tensor([v / sum(e) for v in e]))
    out = _net(pooling="mean")(torch.randn(2, 3, 21, 21))
    torch.testing.assert_close(out["patch_weights"], torch.full((2, 16), 1 / 16))
    torch.testing.assert_close(out["logits"], out["patch_logits"].mean(1))


def test_capsule_eq6_against_a_loop():
    net = _net(head="capsule", xi=0.5, **CAPS)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 21, 21))
    p = out["capsule_logits"].double()  # (B, M, R, K)
    b_, m, r, _ = p.shape
    for b in range(b_):
        norms = [[float(p[b, j, k].norm()) for k in range(r)] for j in range(m)]
        total = sum(map(sum, norms))
        patch = [max(0.0, sum(row) / total - 0.5 / m) for row in norms]
        patch = [a / sum(patch) for a in patch]
        caps = [[norms[j][k] / total * (1.0 if patch[j] > 0 else 0.0) for k in range(r)] for j in range(m)]
        s = sum(map(sum, caps))
        torch.testing.assert_close(out["patch_weights"][b].double(), torch.tensor(patch, dtype=torch.float64),
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out["capsule_weights"][b].double(), torch.tensor(caps, dtype=torch.float64) / s,
                                   atol=1e-6, rtol=1e-5)
        z = sum(out["capsule_weights"][b, j, k] * out["capsule_logits"][b, j, k] for j in range(m) for k in range(r))
        torch.testing.assert_close(out["logits"][b], z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["patch_logits"], out["capsule_logits"].sum(2))
    pw, cw = capsule_loss_based_weights(p, 0.0)
    torch.testing.assert_close(cw, p.norm(dim=-1) / p.norm(dim=-1).sum((1, 2), keepdim=True))


def test_gradients_reach_trunk_classifier_and_pooling():
    from medsim.losses.loss_attention import LossAttentionLoss

    for kw in ({}, {"pooling": "gated"}, {"head": "capsule", **CAPS}):
        net = _net(**kw).train()
        loss = LossAttentionLoss()(net(torch.randn(4, 3, 21, 21)), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        named = dict(net.named_parameters())
        assert named["backbone.0.weight"].grad.abs().sum() > 0 and named["classifier.weight"].grad.abs().sum() > 0
        if kw.get("pooling") == "gated":
            assert named["pooling.U.weight"].grad.abs().sum() > 0
        if kw.get("head") == "capsule":
            assert named["primary_threshold"].grad is not None


def test_footprint_fraction_against_boxes():
    net = _net(strided=("conv1",), cut="layer1")  # trunk stride 2: patch (i, j) covers rows [8i, 8i + 18)
    mask = (torch.rand(2, 1, 42, 42, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    frac = net.patch_footprint_fraction(mask)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 42, 42))["patch_weights"].shape[1] == frac.shape[1] == 16  # 21 cells -> 4×4
    for b in range(2):
        for i in range(4):
            for j in range(4):
                box = mask[b, 0, 8 * i:8 * i + 18, 8 * j:8 * j + 18]
                assert float(frac[b, 4 * i + j]) == pytest.approx(float(box.mean()), abs=1e-6)


def test_bad_inputs_and_options():
    with pytest.raises(ValueError, match="did you mean 'gated'"):
        _net(pooling="gatd")
    with pytest.raises(ValueError, match="did you mean 'capsule'"):
        _net(head="capsul")
    with pytest.raises(ValueError, match="xi=1.5"):
        _net(xi=1.5)
    with pytest.raises(ValueError, match="pooling='mean'"):
        _net(head="capsule", pooling="mean")
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 21, 21\)"):
        _net()(torch.zeros(2, 1, 21, 21))
    with pytest.raises(ValueError, match="smaller than the 9×9 patch conv"):
        _net()(torch.zeros(1, 3, 8, 8))
    assert set(POOLINGS) == {"loss", "mean", "attention", "gated"}


def _toy(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """16×16 noise images on a 4×4 grid of 4×4 cells; one random cell holds a 2×2 blob whose channel is the
    class (0 or 1). Returns images, labels and the index of the class-bearing cell (= patch index)."""
    x = 0.3 * torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    cell = torch.randint(0, 16, (n,), generator=g)
    for i in range(n):
        r, c = divmod(int(cell[i]), 4)
        x[i, int(y[i]), 4 * r + 1:4 * r + 3, 4 * c + 1:4 * c + 3] += 3.0
    return x, y, cell


@pytest.fixture
def one_thread():
    """Many tiny steps: one torch thread avoids thread thrashing on a CPU shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("head", ["softmax", "capsule"])
def test_toy_highest_weight_patch_is_the_class_bearing_one(one_thread, head):
    from medsim.losses.loss_attention import LossAttentionLoss

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # non-overlapping 4×4 patches (patch conv 4×4, stride 4) so that "the" class-bearing patch is unique
    net = LossAttentionNet("resnet10", n_classes=2, cut="layer1", widen_factor=0.25, strided=(), patch_channels=16,
                           patch_kernel=4, patch_stride=4, head=head)
    loss = LossAttentionLoss(gamma_max=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(150):
        x, y, _ = _toy(32, g)
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
    x, y, cell = _toy(200, g)
    with torch.no_grad():
        out = net.eval()(x)
    assert (out["logits"].argmax(1) == y).float().mean() >= 0.9
    assert (out["patch_weights"].argmax(1) == cell).float().mean() >= 0.9
