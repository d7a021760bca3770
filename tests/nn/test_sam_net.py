"""medsim.nn.SAMNet: the Embedder contract with SAM's dense global / local maps (Yan et al., TMI 2022), and map
geometries that say where each cell sits on the input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsim.nn import SAMNet


def _net(**kw):
    return SAMNet("resnet10", widen_factor=0.25, global_dim=16, local_dim=8, **kw).eval()


@pytest.mark.parametrize("stem,strides", [(2, (16, 4)), (1, (8, 2))])
def test_outputs_and_strides(stem, strides):
    torch.manual_seed(0)
    net = _net(conv1_t_stride=stem)
    x = torch.randn(2, 1, 32, 32, 24)
    with torch.no_grad():
        out = net(x)
    size = (32, 32, 24)
    for name, stride, dim in (("global", strides[0], 16), ("local", strides[1], 8)):
        geom = net.map_geometry(name, size)
        assert out[name].shape == (2, dim, *geom.grid)
        assert geom.grid == tuple(-(-n // stride) for n in size)  # "same" strided convs round up
        assert all(a.stride == stride and a.centre == 0.5 for a in geom.axes)  # cell i centred on voxel stride * i
        assert torch.allclose(out[name].norm(dim=1), torch.ones(()), atol=1e-5)
    assert out["embedding"].shape == (2, 16)
    assert torch.allclose(out["embedding"], F.normalize(out["global"].flatten(2).mean(-1), dim=1), atol=1e-6)
    att = out["attention"]
    assert att.shape == (2, 1, *out["local"].shape[2:]) and 0 <= float(att.min()) and float(att.max()) <= 1
    mean = F.normalize(out["local"].flatten(2).mean(-1), dim=1)
    want = (1 - torch.einsum("bcxyz,bc->bxyz", out["local"], mean)) / 2
    assert torch.allclose(att[:, 0], want, atol=1e-6)
    assert net.attention_geometry(size) == net.map_geometry("local", size)


def test_levels_input_check_and_features():
    with pytest.raises(ValueError, match="before the global level"):
        SAMNet("resnet10", local_level="layer3", global_level="layer2")
    net = _net(return_features=True, global_level="layer2")
    out = net(torch.randn(1, 1, 16, 16, 16))
    assert out["global"].shape[2:] == out["features"].shape[2:] == (2, 2, 2)
    with pytest.raises(ValueError, match=r"\(B, 1, \*, \*, \*\)"):
        net(torch.randn(1, 1, 16, 16))
