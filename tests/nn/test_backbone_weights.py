"""make_backbone(weights=...) / Embedder(backbone_weights=...): a local state_dict loaded weights-only into the trunk,
strict on the trunk's tensors, with errors that name the file and the keys."""

from __future__ import annotations

import os

import pytest
import torch
from monai.networks import nets

from medsim.errors import MedsimError
from medsim.nn import Embedder, make_backbone

TINY = dict(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, widen_factor=0.25, pretrained=False)


def _resnet(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = nets.resnet10(**{**TINY, **kw})
    with torch.no_grad():  # non-default BN statistics, so they are checked too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net


def _assert_trunk_equals(trunk: torch.nn.Module, resnet: torch.nn.Module, stages: list[str]) -> None:
    theirs = resnet.state_dict()
    ours = trunk.state_dict()
    names = {str(i): s for i, s in enumerate(stages)}
    for k, v in ours.items():
        head, _, rest = k.partition(".")
        torch.testing.assert_close(v, theirs[f"{names[head]}.{rest}"], rtol=0, atol=0)


def test_resnet_state_dict_loads_into_the_trunk_and_the_rest_is_ignored(tmp_path):
    resnet = _resnet(feed_forward=True, num_classes=7)  # has layer3, layer4 and fc: after the cut
    torch.save(resnet.state_dict(), tmp_path / "ssl.pt")
    trunk, _ = make_backbone("resnet10", cut="layer2", widen_factor=0.25, weights=tmp_path / "ssl.pt")
    _assert_trunk_equals(trunk, resnet, ["conv1", "bn1", "act", "maxpool", "layer1", "layer2"])
    fresh, _ = make_backbone("resnet10", cut="layer2", widen_factor=0.25)
    assert not torch.equal(fresh[0].weight, trunk[0].weight)  # the file did something
    x = torch.randn(2, 3, 32, 32)
    r = resnet.eval()
    with torch.no_grad():  # and it computes what the ResNet computes up to the cut
        torch.testing.assert_close(trunk.eval()(x), r.layer2(r.layer1(r.maxpool(r.act(r.bn1(r.conv1(x)))))))


def test_trunk_state_dict_loads_too_and_embedder_passes_the_file_on(tmp_path):
    donor = Embedder("resnet10", widen_factor=0.25, cut="layer3", embedding_dim=16)
    torch.save(donor.backbone.state_dict(), tmp_path / "trunk.pt")  # keys 0.weight, 4.0.conv1.weight, ...
    net = Embedder("resnet10", widen_factor=0.25, cut="layer3", embedding_dim=16,
                   backbone_weights=str(tmp_path / "trunk.pt"))
    for (k, a), b in zip(donor.backbone.state_dict().items(), net.backbone.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_missing_num_batches_tracked_is_fine(tmp_path):
    resnet = _resnet(feed_forward=False)
    state = {k: v for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pt")
    trunk, _ = make_backbone("resnet10", cut="layer3", widen_factor=0.25, weights=tmp_path / "w.pt")
    _assert_trunk_equals(trunk, resnet, ["conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3"])


def test_wrong_shapes_name_the_file_and_the_keys(tmp_path):
    torch.save(_resnet(widen_factor=0.5).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(MedsimError) as e:
        make_backbone("resnet10", cut="layer2", widen_factor=0.25, weights=tmp_path / "wide.pt")
    msg = str(e.value)
    assert str(tmp_path / "wide.pt") in msg and "widen_factor=0.25" in msg
    assert "of another shape" in msg and "conv1.weight (32, 3, 7, 7) vs (16, 3, 7, 7)" in msg


def test_missing_and_prefixed_keys_are_named(tmp_path):
    state = _resnet().state_dict()
    del state["layer1.0.conv2.weight"]
    torch.save(state, tmp_path / "holes.pt")
    with pytest.raises(MedsimError, match=r"1 missing \(layer1\.0\.conv2\.weight\)"):
        make_backbone("resnet10", cut="layer1", widen_factor=0.25, weights=tmp_path / "holes.pt")
    torch.save({f"module.{k}": v for k, v in _resnet().state_dict().items()}, tmp_path / "ddp.pt")
    with pytest.raises(MedsimError, match=r"missing .* unknown \(module\.conv1\.weight.*prefix 'module\.'"):
        make_backbone("resnet10", cut="layer1", widen_factor=0.25, weights=tmp_path / "ddp.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(MedsimError, match=r"list\.pt: a backbone weights file holds the ResNet's state_dict .* list"):
        make_backbone("resnet10", cut="layer1", widen_factor=0.25, weights=tmp_path / "list.pt")
    with pytest.raises(MedsimError, match=r"nope\.pt: backbone weights file not found"):
        make_backbone("resnet10", weights=tmp_path / "nope.pt")


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_a_payload_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    state = _resnet().state_dict()
    state["evil"] = _Boom(marker)
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(MedsimError, match=r"evil\.pt: refused: not a weights-only backbone weights file .*system"):
        Embedder("resnet10", widen_factor=0.25, backbone_weights=tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_run_record_rebuilds_the_network_without_the_weights_file(tmp_path):
    """backbone_weights only initialises: export/evaluate rebuild the network for its checkpoint, on a machine that
    may not have the file."""
    from medsim.engines.runs import build_spec

    net = build_spec({"_target_": "medsim.nn.Embedder", "backbone": "resnet10", "widen_factor": 0.25,
                      "embedding_dim": 8, "backbone_weights": str(tmp_path / "gone.pt")})
    assert isinstance(net, Embedder)
