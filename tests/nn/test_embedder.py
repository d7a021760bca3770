"""The Embedder contract and the DSL attention module."""

from __future__ import annotations

import pytest
import torch

from medsim.nn import DSLAttention, Embedder, create_attention, upsample_attention


def test_contract_2d_with_logits():
    m = Embedder("resnet10", embedding_dim=32, n_classes=5, widen_factor=0.25).eval()
    out = m(torch.randn(3, 3, 64, 64))
    assert set(out) == {"embedding", "attention", "logits"}
    assert out["embedding"].shape == (3, 32) and out["logits"].shape == (3, 5)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))
    assert out["attention"].shape == (3, 1, 4, 4)  # layer3: 1/16 of the input
    assert float(out["attention"].min()) >= 0 and float(out["attention"].max()) <= 1


def test_contract_3d():
    m = Embedder("resnet10", spatial_dims=3, in_channels=1, embedding_dim=16, widen_factor=0.25).eval()
    out = m(torch.randn(2, 1, 32, 32, 32))
    assert set(out) == {"embedding", "attention"}
    assert out["attention"].shape == (2, 1, 2, 2, 2)
    assert upsample_attention(out["attention"], (32, 32, 32)).shape == (2, 1, 32, 32, 32)


def test_attention_multiplies_features():
    att = DSLAttention(8)
    x = torch.randn(2, 8, 5, 5)
    feats, a = att(x)
    torch.testing.assert_close(feats, x * a)
    assert a.shape == (2, 1, 5, 5)
    with pytest.raises(ValueError, match=r"expected a 4-D"):
        att(torch.randn(8, 5, 5))


def test_attention_changes_the_embedding():
    torch.manual_seed(0)
    m = Embedder("resnet10", embedding_dim=16, widen_factor=0.25).eval()
    x = torch.randn(2, 3, 64, 64)
    a = m(x)["embedding"]
    with torch.no_grad():
        m.attention.net[-1].bias.fill_(-20.0)  # attention ≈ 0 everywhere: features vanish
    b = m(x)["embedding"]
    assert not torch.allclose(a, b, atol=1e-3)


def test_reset_neurons_touches_only_those_rows():
    torch.manual_seed(0)
    m = Embedder("resnet10", embedding_dim=16, widen_factor=0.25)
    w = m.embed.weight.detach().clone()
    m.reset_neurons(torch.tensor([1, 5]))
    changed = (m.embed.weight != w).any(1)
    assert changed.nonzero().flatten().tolist() == [1, 5]


def test_factory_and_input_checks():
    assert isinstance(create_attention("dsl", 4), DSLAttention)
    with pytest.raises(ValueError, match="did you mean 'dsl'"):
        create_attention("dls", 4)
    with pytest.raises(ValueError, match=r"expected a \(B, 3, \*, \*\) batch, got shape \(2, 1, 64, 64\)"):
        Embedder("resnet10", widen_factor=0.25)(torch.randn(2, 1, 64, 64))
