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
    """(name, make(**kwargs) -> model, input shape); kwargs (``return_features``) go to the constructor."""
    yield "embedder_dsl", lambda **kw: Embedder("resnet10", embedding_dim=32, n_classes=3, **kw), IMG
    yield "embedder_none", lambda **kw: Embedder("resnet10", embedding_dim=32, attention="none", **kw), IMG
    yield "embedder_3d", lambda **kw: Embedder("resnet10", spatial_dims=3, in_channels=1, embedding_dim=16, **kw), VOL
    yield "abe", lambda **kw: ABEEmbedder("resnet10", embedding_dim=32, n_learners=4, **kw), IMG
    for a in ["gated", "se", "spatial", "channel", "dual", "gc", "none"]:
        yield f"fgmil_{a}", (lambda a=a, **kw: FineGrainedMIL(3, backbone="resnet10", attention=a, n_instances=2,
                                                              **kw)), BIG
    yield "fgmil_plain", lambda **kw: FineGrainedMIL(3, backbone="resnet10", attention="none", n_instances=0, **kw), MID
    for p in ["loss", "mean", "attention", "gated"]:
        yield f"lossattn_{p}", (lambda p=p, **kw: LossAttentionNet("resnet10", n_classes=3, pooling=p,
                                                                   patch_channels=32, mil_hidden=16, **kw)), IMG
    yield "lossattn_capsule", lambda **kw: LossAttentionNet("resnet10", n_classes=3, head="capsule", primary_channels=4,
                                                            primary_dim=4, capsule_channels=4, capsule_dim=8, **kw), IMG
    yield "lossattn_embed", lambda **kw: LossAttentionNet("resnet10", n_classes=2, head="sigmoid", embedding_dim=16,
                                                          patch_channels=32, **kw), IMG


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


# ------------------------------------------------------------------------------------ dense features (issue 10)
def _build(name: str, **kw) -> tuple[EmbedderBase, torch.Tensor]:
    """The configuration ``name`` (seed 0, eval mode, ``kw`` to the constructor) and its input (seed 1)."""
    make, shape = CONFIGS[name]
    torch.manual_seed(0)
    net = make(**kw).eval()
    torch.manual_seed(1)
    return net, torch.randn(*shape)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_features_are_off_by_default_and_change_nothing(name):
    """Off (the default, or ``return_features=False``): no ``features`` and the outputs of the model without the
    option; on: the same outputs, bit for bit, plus ``features``; the state_dict stays the pinned one."""
    default, x = _build(name)
    off, _ = _build(name, return_features=False)
    on, _ = _build(name, return_features=True)
    assert default.return_features is False and off.return_features is False and on.return_features is True
    with torch.no_grad():
        ref, got_off, got_on = default(x), off(x), on(x)
    assert "features" not in ref and set(got_off) == set(ref) and set(got_on) == set(ref) | {"features"}
    for k in ref:
        assert torch.equal(got_off[k], ref[k]) and torch.equal(got_on[k], ref[k]), k
    got = [f"{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in on.state_dict().items()]
    assert got == KEYS[name]
    on.return_features = False  # a plain attribute: switchable on a built (e.g. loaded) model
    with torch.no_grad():
        assert "features" not in on(x)


def _head_from_features(net: EmbedderBase, f: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Recompute one output of ``net`` from its trunk features ``f`` with the model's own head: (key, value)."""
    if isinstance(net, Embedder):
        attended, _ = net.attention(f)
        return "embedding", torch.nn.functional.normalize(net.embed(attended.flatten(2).mean(-1)), dim=1)
    if isinstance(net, ABEEmbedder):
        learners = net.embed_learners(f, net.learner_masks(f))
        return "embedding", learners.flatten(1) / net.n_learners ** 0.5
    if isinstance(net, FineGrainedMIL):
        attended, _, _ = net.attend(f)
        return "global_logits", net.global_classifier(attended.flatten(2).mean(-1))
    return "logits", (net._capsules(f) if net.head == "capsule" else net._patches(f))["logits"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_features_are_the_trunk_output_the_head_reads_and_carry_gradients(name):
    net, x = _build(name, return_features=True)
    seen: list[torch.Tensor] = []
    hook = net.trunk.register_forward_hook(lambda module, args, output: seen.append(output))
    out = net(x)
    hook.remove()
    f = out["features"]
    assert len(seen) == 1 and f is seen[0]  # the trunk's output tensor itself, not a copy
    assert f.dtype == x.dtype and f.device == x.device and f.requires_grad

    # the documented shape: (B, F, *s_trunk); *s_trunk is the attention grid except for LossAttentionNet's patches
    att = out["attention"]
    assert f.ndim == x.ndim and f.shape[0] == x.shape[0]
    if isinstance(net, LossAttentionNet):
        k, s = net.patch_kernel, net.patch_stride
        assert tuple(att.shape[2:]) == tuple((n - k) // s + 1 for n in f.shape[2:])
        assert tuple(f.shape[2:]) == tuple(-(-n // net.trunk_stride) for n in x.shape[2:])
    else:
        assert f.shape[2:] == att.shape[2:]

    # the trunk called directly gives it, and the model's head recomputes an output from it exactly
    with torch.no_grad():
        g = x if not isinstance(net, FineGrainedMIL) else torch.nn.functional.interpolate(
            x, size=net.global_size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(net.trunk(g), f, rtol=0, atol=0)
        key, value = _head_from_features(net, f)
        torch.testing.assert_close(value, out[key], rtol=0, atol=0)

    # gradients: the head's outputs reach the features, and a loss on the features reaches the trunk
    torch.manual_seed(2)
    head_loss = (out["embedding"] * torch.randn_like(out["embedding"])).sum()
    (g_f,) = torch.autograd.grad(head_loss, f, retain_graph=True)
    assert g_f.shape == f.shape and torch.isfinite(g_f).all() and g_f.abs().sum() > 0
    params = [p for p in net.trunk.parameters() if p.requires_grad]
    grads = torch.autograd.grad(f.square().mean(), params)
    assert all(torch.isfinite(gr).all() for gr in grads) and grads[0].abs().sum() > 0  # grads[0]: the stem conv


@pytest.mark.parametrize("name", ["embedder_dsl", "abe", "fgmil_plain", "lossattn_loss"])
def test_features_follow_the_input_dtype(name):
    net, x = _build(name, return_features=True)
    with torch.no_grad():
        out = net.double()(x.double())
    assert out["features"].dtype == torch.float64 and out["embedding"].dtype == torch.float64


def test_a_model_that_does_not_report_features_says_so():
    class NoFeatures(EmbedderBase):
        def __init__(self, return_features: bool = False):
            super().__init__(return_features=return_features)
            self.in_channels, self.embedding_dim = 3, 4
            self.trunk = torch.nn.Conv2d(3, 4, 1)

        def compute(self, x):
            f = self.trunk(x)
            return {"embedding": f.mean((2, 3)), "attention": torch.ones_like(f[:, :1])}

    x = torch.randn(2, 3, 8, 8)
    assert "features" not in NoFeatures()(x)
    with pytest.raises(NotImplementedError, match=r"NoFeatures.compute does not report .*self.add_features"):
        NoFeatures(return_features=True)(x)


def test_onnx_export_leaves_features_out(tmp_path):
    """Export writes the contract's graph outputs only: a model built with ``return_features=True`` exports as the
    same (embedding, attention, logits) graph."""
    pytest.importorskip("onnx")
    from medsim.export.onnx_export import OUTPUT_ORDER, export_module

    net, x = _build("embedder_dsl", return_features=True)
    info = export_module(net, x, tmp_path / "model.onnx", exporter="legacy")
    assert "features" not in OUTPUT_ORDER and list(info["output_names"]) == ["embedding", "attention", "logits"]
    assert net.return_features  # export does not switch it off behind the caller's back
