"""freeze_batchnorm / FrozenBatchNorm: BatchNorm's eval-mode output whatever the mode, nothing learned, the same
state_dict keys, and an Embedder with frozen BN still exports to ONNX."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsim.nn import Embedder, FrozenBatchNorm, freeze_batchnorm


def _trained_bn(kind: type[nn.Module], c: int = 6, **kw) -> nn.Module:
    """A BatchNorm with non-trivial affine values and running statistics (from a few train-mode batches)."""
    torch.manual_seed(0)
    bn = kind(c, **kw)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
        shape = {nn.BatchNorm1d: (8, c, 5), nn.BatchNorm2d: (8, c, 5, 5), nn.BatchNorm3d: (8, c, 3, 3, 3)}[kind]
        for _ in range(3):
            bn.train()(torch.randn(shape) * 3 + 1)
    return bn


@pytest.mark.parametrize("kind, shape", [(nn.BatchNorm1d, (4, 6)), (nn.BatchNorm1d, (4, 6, 7)),
                                         (nn.BatchNorm2d, (4, 6, 9, 9)), (nn.BatchNorm3d, (4, 6, 5, 5, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_output_is_batchnorm_in_eval_mode_and_ignores_train(kind, shape, affine):
    bn = _trained_bn(kind, affine=affine)
    frozen = freeze_batchnorm(bn)
    assert isinstance(frozen, FrozenBatchNorm)
    x = torch.randn(shape) * 2 + 0.5
    expected = bn.eval()(x)
    frozen.train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    torch.testing.assert_close(frozen(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(frozen(x * 5), bn(x * 5), rtol=0, atol=1e-5)  # not batch statistics
    for k, v in frozen.state_dict().items():  # nothing updated by a train-mode forward
        assert torch.equal(v, before[k]), k
    assert list(frozen.parameters()) == []


def test_state_dict_keys_match_and_load_both_ways():
    bn = _trained_bn(nn.BatchNorm2d)
    frozen = FrozenBatchNorm(6)
    assert list(frozen.state_dict()) == list(bn.state_dict())
    frozen.load_state_dict(bn.state_dict())  # strict
    torch.testing.assert_close(frozen.running_var, bn.running_var)
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(frozen(x), bn.eval()(x), rtol=0, atol=1e-6)
    fresh = nn.BatchNorm2d(6)
    fresh.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(fresh.weight.detach(), bn.weight.detach())
    assert list(FrozenBatchNorm(6, affine=False).state_dict()) == list(nn.BatchNorm2d(6, affine=False).state_dict())


def test_no_gradients_to_the_frozen_values_but_through_them():
    net = freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 6, 3), _trained_bn(nn.BatchNorm2d), nn.ReLU()))
    assert isinstance(net[1], FrozenBatchNorm)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and net[0].weight.grad is not None  # the conv before it still learns
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias"]


def test_wrong_input_and_untracked_batchnorm_are_named():
    with pytest.raises(ValueError, match=r"expected a 4-D \(B, C, \.\.\.\) input, got shape \(6, 4, 4\)"):
        freeze_batchnorm(nn.BatchNorm2d(6))(torch.randn(6, 4, 4))
    with pytest.raises(ValueError, match=r"cannot freeze 1 .*track_running_stats=False"):
        freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6, track_running_stats=False)))


def _trained_stats(net: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)


def test_embedder_freeze_bn_equals_its_eval_mode_and_keeps_keys():
    torch.manual_seed(0)
    plain = Embedder("resnet10", widen_factor=0.25, embedding_dim=16, n_classes=3)
    _trained_stats(plain)
    frozen = Embedder("resnet10", widen_factor=0.25, embedding_dim=16, n_classes=3, freeze_bn=True)
    frozen.load_state_dict(plain.state_dict())  # strict: same keys
    assert list(frozen.state_dict()) == list(plain.state_dict())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, FrozenBatchNorm) for m in frozen.backbone.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in plain.backbone.modules()) > 0
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = plain.eval()(x)
        got = frozen.train()(x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5)


def test_embedder_with_frozen_bn_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from medsim.export.onnx_export import check_parity, export_module

    torch.manual_seed(0)
    plain = Embedder("resnet10", widen_factor=0.25, embedding_dim=16, cut="layer2")
    _trained_stats(plain)
    net = Embedder("resnet10", widen_factor=0.25, embedding_dim=16, freeze_bn=True, cut="layer2")
    net.load_state_dict(plain.state_dict())  # non-trivial statistics in the frozen layers
    export_module(net, torch.randn(2, 3, 32, 32), tmp_path / "model.onnx")
    report = check_parity(tmp_path / "model.onnx", net, torch.randn(5, 3, 32, 32), batch_sizes=(1, 3), atol=1e-4,
                          threads=1)
    assert all(0.0 <= d <= 1e-4 for d in report["max_abs_diff"].values()), report
