"""ABE-M (attention-based ensemble): the Embedder contract, Eq. 7 wiring, and masks confined to known regions."""

from __future__ import annotations

import pytest
import torch

from medsim.nn.abe import ABEEmbedder


def _tiny(**kw) -> ABEEmbedder:
    torch.manual_seed(0)
    return ABEEmbedder("resnet10", widen_factor=0.25, **{"embedding_dim": 24, "n_learners": 3, **kw}).eval()


def test_contract_2d():
    m = _tiny()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 64))
    assert set(out) == {"embedding", "attention", "learner_attention", "learner_embeddings"}
    assert out["embedding"].shape == (2, 24) and out["learner_embeddings"].shape == (2, 3, 8)
    assert out["attention"].shape == (2, 1, 4, 4) and out["learner_attention"].shape == (2, 3, 4, 4)  # layer3: 1/16
    torch.testing.assert_close(out["learner_embeddings"].norm(dim=-1), torch.ones(2, 3))
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(2))
    # ensemble = concatenation of the learners / sqrt(M); attention = mean of the learners' maps
    torch.testing.assert_close(out["embedding"], out["learner_embeddings"].flatten(1) / 3 ** 0.5)
    torch.testing.assert_close(out["attention"], out["learner_attention"].mean(1, keepdim=True))
    assert 0 <= float(out["learner_attention"].min()) and float(out["learner_attention"].max()) <= 1


def test_contract_3d_and_cut_layer4():
    m = ABEEmbedder("resnet10", spatial_dims=3, in_channels=1, widen_factor=0.25, embedding_dim=8,
                    n_learners=2).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 1, 32, 32, 32))
    assert out["embedding"].shape == (2, 8) and out["learner_attention"].shape == (2, 2, 2, 2, 2)
    m4 = _tiny(cut="layer4")  # G = GAP + linear only
    assert len(m4.global_stages) == 0 and m4.embed.in_features == m4.channels
    with torch.no_grad():
        assert m4(torch.randn(2, 3, 64, 64))["attention"].shape == (2, 1, 2, 2)


def test_masks_have_the_shape_of_s_output_per_channel():
    m = _tiny()
    feats = m.spatial(torch.randn(2, 3, 64, 64))
    masks = m.learner_masks(feats)
    assert masks.shape == (2, 3, *feats.shape[1:])  # (B, M, C, h, w): one per-channel mask per learner


def test_known_mask_biases_show_in_the_maps():
    m = _tiny(n_learners=2, embedding_dim=8)
    with torch.no_grad():
        for head, b in zip(m.attention_heads, (20.0, -20.0)):
            head.weight.zero_()
            head.bias.fill_(b)
        out = m(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(out["learner_attention"][:, 0], torch.ones(2, 4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["learner_attention"][:, 1], torch.zeros(2, 4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["attention"], torch.full((2, 1, 4, 4), 0.5), atol=1e-6, rtol=0)


def test_a_learner_ignores_features_its_mask_removes():
    """Eq. 7: B_m = G(S(x) ∘ A_m). Learner 0 sees only the right half, learner 1 everything: changing S's output in
    the left half changes learner 1's embedding but not learner 0's."""
    m = _tiny(n_learners=2, embedding_dim=8)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, m.channels, 4, 4, generator=g)
    masks = torch.ones(2, 2, m.channels, 4, 4)
    masks[:, 0, :, :, :2] = 0.0
    changed = feats.clone()
    changed[..., :2] += torch.randn(2, m.channels, 4, 2, generator=g)
    with torch.no_grad():
        a, b = m.embed_learners(feats, masks), m.embed_learners(changed, masks)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-3


def test_input_and_argument_errors():
    with pytest.raises(ValueError, match=r"divisible by n_learners .* embedding_dim=30, n_learners=4"):
        ABEEmbedder("resnet10", widen_factor=0.25, embedding_dim=30, n_learners=4)
    with pytest.raises(ValueError, match="n_learners must be >= 1, got n_learners=0"):
        ABEEmbedder("resnet10", widen_factor=0.25, n_learners=0)
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 64, 64\)"):
        _tiny()(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="layer3"):
        ABEEmbedder("resnet10", widen_factor=0.25, cut="layer5")


def test_toy_divergence_keeps_learners_apart_and_without_it_they_collapse():
    """The ABE paper's ablation in miniature: trained with the divergence loss the learners embed an image
    differently (low cosine between learners); without it they drift to the same embedding."""
    from pytorch_metric_learning import distances, losses, reducers

    from medsim.losses import MetricLoss
    from medsim.losses.divergence import ABELoss

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, 32, 32, generator=g)
        y = torch.arange(64) % 4
        for c in range(4):  # one bright quadrant per class
            r, q = divmod(c, 2)
            x[y == c, :, 16 * r:16 * r + 16, 16 * q:16 * q + 16] += 2.0
        cos = {}
        for lam in (1.0, 0.0):
            net = _tiny(embedding_dim=16, n_learners=2).train()
            loss = ABELoss(MetricLoss(losses.ContrastiveLoss(  # ABE's Eq. 10
                pos_margin=0.0, neg_margin=1.0, distance=distances.LpDistance(power=2),
                reducer=reducers.MeanReducer())), n_learners=2, lambda_div=lam)
            opt = torch.optim.Adam(net.parameters(), lr=2e-3)
            for step in range(40):
                idx = torch.randperm(64, generator=g)[:32]
                opt.zero_grad()
                loss(net(x[idx]), y[idx]).backward()
                opt.step()
            with torch.no_grad():
                e = net.eval()(x)["learner_embeddings"]
            cos[lam] = float((e[:, 0] * e[:, 1]).sum(-1).mean())
    finally:
        torch.set_num_threads(n)
    # m_div = 1 asks for ‖B_p − B_q‖² ≥ 1, i.e. cosine ≤ 0.5 between unit learner embeddings
    assert cos[1.0] < 0.4 and cos[0.0] > 0.9 and cos[0.0] - cos[1.0] > 0.5, cos
