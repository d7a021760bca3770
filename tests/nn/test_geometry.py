"""Attention-map geometry derived from the layers (medsim.nn.geometry): analytic values for every model, a model
that looks at a known patch peaks at the cell the geometry says, and torch upsampling == the NumPy localizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medsim.runtime.geometry import AttentionGeometry, resample_attention
from medsim.nn import ABEEmbedder, Embedder, FineGrainedMIL, LossAttentionNet, upsample_attention
from medsim.nn.geometry import Resize, trace_geometry


def _axes(g: AttentionGeometry) -> list[tuple[int, float, float, float]]:
    return [(a.cells, a.centre, a.stride, a.receptive_field) for a in g.axes]


def test_loss_attention_geometry_is_the_analytic_patch_grid():
    # 64 px, stem stride 1 (max-pool removed), layer2 stride 2 → 32×32 trunk; trunk cell f is centred on input
    # index 2f (3×3 pad-1 stride-2 conv: window [2f-1, 2f+1]); unpadded 9×9 stride-4 patch i covers trunk cells
    # 4i..4i+8, centre 4i+4 → input index 8i+8 → continuous 8i+8.5: 8.5 … 48.5 of 64 (13–76 %), 6 cells
    net = LossAttentionNet("resnet18", n_classes=2, widen_factor=0.125, patch_channels=8)
    g = net.attention_geometry((64, 64))
    # receptive field: stem 7×7 (7) + layer1 4 convs (+8) + layer2 first conv at stride 1 (+2) then 3 convs at
    # stride 2 (+12) + layer3, layer4 8 convs at stride 2 (+32) = 61; 9×9 patch conv at stride 2 (+16) = 77
    assert _axes(g) == [(6, 8.5, 8.0, 77.0)] * 2
    np.testing.assert_allclose(g.axes[0].centres() / 64, [0.1328125, 0.2578125, 0.3828125, 0.5078125, 0.6328125,
                                                          0.7578125])
    stretched = AttentionGeometry.stretch((6, 6), (64, 64))
    np.testing.assert_allclose(stretched.axes[0].centres() / 64, (np.arange(6) + 0.5) / 6)  # 8 … 92 %
    # resnet10 (the benchmark's) has the same grid, a smaller receptive field; the capsule head the same grid
    assert _axes(LossAttentionNet("resnet10", n_classes=2, widen_factor=0.125, patch_channels=8)
                 .attention_geometry((64, 64))) == [(6, 8.5, 8.0, 49.0)] * 2
    caps = LossAttentionNet("resnet10", n_classes=2, widen_factor=0.125, head="capsule", primary_channels=2,
                            primary_dim=2, capsule_channels=2, capsule_dim=4)
    assert _axes(caps.attention_geometry((64, 64))) == [(6, 8.5, 8.0, 49.0)] * 2
    # a 96-px input: 48 trunk cells, (48 - 9) // 4 + 1 = 10 patches, same centres
    assert _axes(net.attention_geometry((96, 64)))[0] == (10, 8.5, 8.0, 77.0)


def test_resnet_embedders_geometry():
    # stem 7×7/2 pad 3, max-pool 3/2 pad 1, layer2, layer3 stride 2: every "same" stride-2 layer centres output j
    # on input index 2j, so layer3 cell j is centred at index 16j (continuous 16j + 0.5), not at 16j + 8
    dsl = Embedder("resnet18", widen_factor=0.125)
    # ResNet-18 layer3 receptive field 211 px (+ DSL attention's two 3×3 convs at stride 16: +64)
    assert _axes(dsl.attention_geometry((64, 64))) == [(4, 0.5, 16.0, 275.0)] * 2
    assert _axes(Embedder("resnet18", widen_factor=0.125, attention="none").attention_geometry((64, 64))) == \
        [(4, 0.5, 16.0, 211.0)] * 2
    abe = ABEEmbedder("resnet18", widen_factor=0.125)  # attention trunk: two 3×3 convs → +64, 1×1 heads
    assert _axes(abe.attention_geometry((64, 64))) == [(4, 0.5, 16.0, 275.0)] * 2
    ct = Embedder("resnet10", spatial_dims=3, in_channels=1, widen_factor=0.125)
    g = ct.attention_geometry((32, 32, 16))
    assert g.grid == (2, 2, 1) and [a.centre for a in g.axes] == [0.5] * 3 and [a.stride for a in g.axes] == [16.0] * 3


def test_fine_grained_mil_geometry_includes_the_global_resize():
    # 192 → 96 (bilinear, align_corners=False): global pixel g sits at input index 2g + 0.5; trunk cell j at
    # global index 16j → input index 32j + 0.5 → continuous 32j + 1
    net = FineGrainedMIL(3, widen_factor=0.125, global_size=96, n_instances=0)
    g = net.attention_geometry((192, 160))
    assert g.grid == (6, 6)
    assert (g.axes[0].centre, g.axes[0].stride) == (1.0, 32.0)
    assert g.axes[1].centre == pytest.approx(0.5 * 160 / 96)  # (16j + 0.5)·160/96 in continuous pixels
    assert g.axes[1].stride == pytest.approx(16 * 160 / 96)


def test_trace_rules_and_errors():
    # unpadded conv then a strided pool: offsets add in input pixels, strides multiply
    g = trace_geometry((20,), nn.Conv1d(1, 1, 5), nn.MaxPool1d(2))
    assert _axes(g) == [(8, 3.0, 2.0, 6.0)]  # conv: 16 cells centred at 2..17; pool: (2+3)/2 = 2.5 → +0.5
    assert _axes(trace_geometry((10,), Resize((10,)))) == [(10, 0.5, 1.0, 1.0)]  # same size: no-op

    class Strange(nn.Module):  # a container whose child changes the grid: no rule for the order
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(1, 1, 3, stride=2, padding=1)

    with pytest.raises(NotImplementedError, match="Strange"):
        trace_geometry((16, 16), Strange())
    with pytest.raises(NotImplementedError, match="AdaptiveAvgPool2d"):
        trace_geometry((16, 16), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ValueError, match="smaller than its 9-cell window"):
        trace_geometry((8, 8), nn.Conv2d(1, 1, 9))


@pytest.mark.parametrize("name", ["loss", "dsl", "abe", "gated", "ct3d"])
def test_geometry_grid_is_the_attention_output_shape(name):
    torch.manual_seed(0)
    model, size = {
        "loss": lambda: (LossAttentionNet("resnet10", n_classes=2, widen_factor=0.125, patch_channels=8), (72, 64)),
        "dsl": lambda: (Embedder("resnet10", widen_factor=0.125), (80, 48)),
        "abe": lambda: (ABEEmbedder("resnet10", widen_factor=0.125), (64, 64)),
        "gated": lambda: (FineGrainedMIL(2, widen_factor=0.125, global_size=(64, 48), n_instances=1), (100, 70)),
        "ct3d": lambda: (Embedder("resnet10", spatial_dims=3, in_channels=1, widen_factor=0.125), (32, 24, 16)),
    }[name]()
    with torch.no_grad():
        att = model.eval()(torch.rand(1, model.in_channels, *size))["attention"]
    assert model.attention_geometry(size).grid == tuple(att.shape[2:])


def _box_filter_net(net: nn.Module) -> nn.Module:
    """Every conv an all-positive box filter, BatchNorm the identity, classifier all ones: each output cell is a
    positive, symmetric weighting of the input around the centre its layers give it."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                m.reset_parameters()
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return net.eval()


@pytest.mark.parametrize("cell", [(0, 0), (5, 1), (2, 4), (5, 5)])
def test_loss_attention_peaks_at_the_cell_whose_declared_centre_holds_the_blob(cell):
    """A bright 3×3 blob on the declared centre of patch ``cell`` (dark elsewhere): the patch whose receptive
    field is centred there responds most. At the stretched centre of the same cell the blob would fall into the
    territory of another patch (checked for the edge cells)."""
    net = _box_filter_net(LossAttentionNet("resnet10", n_classes=2, widen_factor=0.125, patch_channels=8))
    g = net.attention_geometry((64, 64))
    x = torch.zeros(1, 3, 64, 64)
    cx, cy = (int(ax.centres()[c]) for ax, c in zip(g.axes, cell))  # pixel index whose centre is the cell centre
    x[:, :, max(cx - 1, 0):cx + 2, max(cy - 1, 0):cy + 2] = 1.0
    with torch.no_grad():
        att = net(x)["attention"][0, 0]
    assert np.unravel_index(int(att.argmax()), att.shape) == cell
    if cell == (5, 5):  # the stretched grid puts cell 5 at 58.2 px, where patch 5's own window does not reach
        assert AttentionGeometry.stretch((6, 6), (64, 64)).axes[0].centres()[5] - g.axes[0].centres()[5] > 9


@pytest.mark.parametrize("cell", [(3, 1), (0, 3), (2, 2)])
def test_embedder_trunk_peaks_at_the_cell_whose_declared_centre_holds_the_blob(cell):
    """The same for the ResNet trunk of DSL / ABE (layer3 cells at 0.5, 16.5, 32.5, 48.5 px of 64). The trunk's
    features are tested: DSL attention's 3×3 convs on the 4×4 grid blur neighbouring cells, so with box filters
    they favour interior cells whatever the input (a property of the head, not of where the cells sit)."""
    net = _box_filter_net(Embedder("resnet10", widen_factor=0.125))
    g = net.attention_geometry((64, 64))
    assert list(g.axes[0].centres()) == [0.5, 16.5, 32.5, 48.5]
    x = torch.zeros(1, 3, 64, 64)
    cx, cy = (int(ax.centres()[c]) for ax, c in zip(g.axes, cell))
    x[:, :, max(cx - 1, 0):cx + 2, max(cy - 1, 0):cy + 2] = 1.0
    with torch.no_grad():
        feats = net.backbone(x)[0].sum(0)
    assert np.unravel_index(int(feats.argmax()), feats.shape) == cell


@pytest.mark.parametrize("dims", [2, 3])
def test_upsample_attention_with_geometry_equals_the_numpy_localizer(dims):
    rng = np.random.default_rng(dims)
    if dims == 2:
        g = LossAttentionNet("resnet10", n_classes=2, widen_factor=0.125, patch_channels=8).attention_geometry((64, 48))
        size = (150, 110)
    else:
        g = Embedder("resnet10", spatial_dims=3, in_channels=1, widen_factor=0.125).attention_geometry((48, 32, 32))
        size = (48, 32, 32)
    att = rng.random((2, 1, *g.grid))
    got = upsample_attention(torch.from_numpy(att), size, g).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b, 0], resample_attention(att[b, 0], size, g), atol=1e-12)
    # without a geometry both stretch: F.interpolate(align_corners=False) == the NumPy stretch
    plain = upsample_attention(torch.from_numpy(att), size).numpy()
    np.testing.assert_allclose(plain[0, 0], resample_attention(att[0, 0], size), atol=1e-10)
    with pytest.raises(Exception, match="declares a"):
        upsample_attention(torch.from_numpy(att[..., :1]), size, g)
