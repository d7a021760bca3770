"""The one attention registry and factory (medsim.nn.attention): every registered name on one contract (timm's sweep
in tests/test_models.py is the model), "did you mean", old names, and the two meanings of "gated" kept apart."""

from __future__ import annotations

import pytest
import torch

from medsim.nn import ATTENTION_ALIASES, ATTENTIONS, FineGrainedMIL, LossAttentionNet, create_attention
from medsim.nn.fine_grained_attention import GatedAttention, minmax_normalize
from medsim.nn.mil_attention import MILAttention, MILGatedAttention


@pytest.mark.parametrize("name", sorted(ATTENTIONS) + sorted(ATTENTION_ALIASES))
@pytest.mark.parametrize("dims", [2, 3])
def test_every_registered_name_keeps_the_shape_channels_first(name, dims):
    torch.manual_seed(0)
    m = create_attention(name, 12, spatial_dims=dims)
    spatial = (5, 4, 3)[:dims]  # C differs from every spatial size: a channels-last mistake changes a shape
    x = torch.rand(2, 12, *spatial, requires_grad=True)
    feats, att = m(x)
    assert feats.shape == x.shape and att.shape == (2, 1, *spatial)
    assert float(att.detach().min()) >= 0.0 and float(att.detach().max()) <= 1.0 + 1e-6
    (feats.sum() + att.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match=rf"expected a {dims + 2}-D \(B, C, \*spatial\) batch, got shape \(12, 5\)"):
        m(torch.rand(12, 5))


def test_unknown_names_answer_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'fan_gated'"):
        create_attention("fan_gatd", 8)
    with pytest.raises(ValueError, match="did you mean 'mil_gated'"):
        create_attention("mil_gatd", 8)


def test_old_names_and_the_two_gated_meanings():
    """``gated`` was Fan et al.'s module for FineGrainedMIL and Ilse et al.'s MIL pooling for LossAttentionNet: now
    ``fan_gated`` and ``mil_gated``, and each model still reads its old name as it did."""
    assert ATTENTION_ALIASES == {"gated": "fan_gated"}
    assert isinstance(create_attention("gated", 8), GatedAttention)
    tiny = {"backbone": "resnet10", "widen_factor": 0.25}
    fine_grained = FineGrainedMIL(3, attention="gated", cut="layer2", global_size=32, local_size=16, **tiny)
    assert isinstance(fine_grained.attention, GatedAttention)
    assert type(LossAttentionNet(n_classes=2, pooling="gated", patch_channels=8, **tiny).pooling) is MILGatedAttention
    assert type(LossAttentionNet(n_classes=2, pooling="attention", patch_channels=8, **tiny).pooling) is MILAttention
    assert LossAttentionNet(n_classes=2, pooling="loss", patch_channels=8, **tiny).pooling is None


@pytest.mark.parametrize("name", ["mil_attention", "mil_gated"])
def test_mil_weights_follow_ilse_eq8_eq9(name):
    torch.manual_seed(0)
    m = create_attention(name, 6, hidden=4)
    x = torch.randn(2, 6, 3, 4)
    _, att = m(x)
    h = x.flatten(2).transpose(1, 2)  # (B, M, C): one instance per cell
    with torch.no_grad():
        z = torch.tanh(h @ m.V.weight.T + m.V.bias)
        if name == "mil_gated":
            z = z * torch.sigmoid(h @ m.U.weight.T + m.U.bias)
        ref = torch.softmax((z @ m.w.weight.T + m.w.bias).squeeze(-1), dim=1)
    torch.testing.assert_close(att.detach().flatten(1), ref)
    torch.testing.assert_close(att.detach().flatten(1).sum(1), torch.ones(2))


def test_fine_grained_mil_reads_omega_from_the_features_of_any_module():
    """With the one ``none`` module (features unchanged, a map of ones) FineGrainedMIL's map is still Ω: the
    channel mean of the trunk features, min–max scaled (what its former own "none" module returned)."""
    torch.manual_seed(0)
    net = FineGrainedMIL(3, backbone="resnet10", widen_factor=0.25, cut="layer2", global_size=32, local_size=16,
                         attention="none", n_instances=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        omega = net.trunk(x).mean(1, keepdim=True)
    torch.testing.assert_close(out["omega"], omega)
    torch.testing.assert_close(out["attention"], minmax_normalize(omega))
