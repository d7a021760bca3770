"""The one Embedder contract (medsim.nn.base) for every model: the input check, the typed output, the named trunk
(and state_dict keys unchanged from the models before the base class: checkpoints and exports load as before)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medsim.nn import ABEEmbedder, Embedder, EmbedderBase, FineGrainedMIL, LossAttentionNet

#: state_dict keys and shapes of these configurations, recorded from the models as they were before EmbedderBase
#: (commit ecf5380) — the names checkpoints and exported models carry
KEYS = json.loads((Path(__file__).parent / "state_dict_keys.json").read_text())


IMG, VOL, BIG, MID = (2, 3, 64, 64), (1, 1, 32, 32, 32), (2, 3, 128, 112), (2, 3, 96, 96)


def _configs():
    yield "embedder_dsl", lambda: Embedder("resnet10", embedding_dim=32, n_classes=3), IMG
    yield "embedder_none", lambda: Embedder("resnet10", embedding_dim=32, attention="none"), IMG
    yield "embedder_3d", lambda: Embedder("resnet10", spatial_dims=3, in_channels=1, embedding_dim=16), VOL
    yield "abe", lambda: ABEEmbedder("resnet10", embedding_dim=32, n_learners=4), IMG
    for a in ["gated", "se", "spatial", "channel", "dual", "gc", "none"]:
        yield f"fgmil_{a}", (lambda a=a: FineGrainedMIL(3, backbone="resnet10", attention=a, n_instances=2)), BIG
    yield "fgmil_plain", lambda: FineGrainedMIL(3, backbone="resnet10", attention="none", n_instances=0), MID
    for p in ["loss", "mean", "attention", "gated"]:
        yield f"lossattn_{p}", (lambda p=p: LossAttentionNet("resnet10", n_classes=3, pooling=p, patch_channels=32,
                                                             mil_hidden=16)), IMG
    yield "lossattn_capsule", lambda: LossAttentionNet("resnet10", n_classes=3, head="capsule", primary_channels=4,
                                                       primary_dim=4, capsule_channels=4, capsule_dim=8), IMG
    yield "lossattn_embed", lambda: LossAttentionNet("resnet10", n_classes=2, head="sigmoid", embedding_dim=16,
                                                     patch_channels=32), IMG


CONFIGS = {name: (make, shape) for name, make, shape in _configs()}
OLD_TRUNK = {Embedder: "backbone", ABEEmbedder: "spatial", LossAttentionNet: "backbone", FineGrainedMIL: "trunk"}


def test_the_pinned_configurations_are_the_tested_ones():
    assert set(CONFIGS) == set(KEYS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_keys_are_unchanged(name):
    net = CONFIGS[name][0]()
    got = [f"{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in net.state_dict().items()]
    assert got == KEYS[name]


@pytest.mark.parametrize("name", ["embedder_dsl", "embedder_3d", "abe", "fgmil_gated", "lossattn_gated",
                                  "lossattn_capsule"])
def test_output_contract_trunk_and_input_check(name):
    make, shape = CONFIGS[name]
    torch.manual_seed(0)
    net = make().eval()
    assert isinstance(net, EmbedderBase)
    old = OLD_TRUNK[type(net)]
    assert net.trunk is getattr(net, old) and type(net).trunk_key == old
    if old != "trunk":
        with pytest.raises(AttributeError, match=f"read-only alias of '{old}'"):
            net.trunk = torch.nn.Identity()

    x = torch.randn(*shape)
    with torch.no_grad():
        out = net(x)
    emb, att = out["embedding"], out["attention"]
    assert emb.shape == (shape[0], net.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(shape[0]))
    assert att.shape[:2] == (shape[0], 1) and float(att.min()) >= 0.0 and float(att.max()) <= 1.0 + 1e-6
    geometry = net.attention_geometry(shape[2:])
    assert geometry.grid == tuple(att.shape[2:])
    geometry.check_grid(att.shape[2:])
    if "logits" in out:
        assert out["logits"].shape[0] == shape[0] and out["logits"].ndim == 2

    # the one input check, from the base class: layout expected and shape received
    dims = len(shape) - 2
    stars = ", ".join([r"\*"] * dims)
    layout = rf"expected a \(B, {net.in_channels}, {stars}\) batch"
    bad_channels = (shape[0], net.in_channels + 1, *shape[2:])
    with pytest.raises(ValueError, match=layout + rf", got shape \({', '.join(map(str, bad_channels))}\)"):
        net(torch.randn(*bad_channels))
    with pytest.raises(ValueError, match=layout + r", got shape \(3, 8\)"):
        net(torch.randn(3, 8))


def test_old_targets_still_build_through_the_run_record_rules():
    """run.json records name the classes by their old module paths; those resolve (re-exports under medsim.nn)."""
    from medsim.engines.runs import build_spec
    from medsim.nn import fine_grained_mil, gated_attention

    assert gated_attention.FineGrainedMIL is fine_grained_mil.FineGrainedMIL
    net = build_spec({"_target_": "medsim.nn.gated_attention.FineGrainedMIL", "n_classes": 3, "backbone": "resnet10",
                      "widen_factor": 0.25, "cut": "layer2", "global_size": 32, "local_size": 16})
    assert isinstance(net, FineGrainedMIL)
    net = build_spec({"_target_": "medsim.nn.loss_attention.LossAttentionNet", "n_classes": 2, "backbone": "resnet10",
                      "widen_factor": 0.25, "patch_channels": 8, "pooling": "gated"})
    assert isinstance(net, LossAttentionNet)
