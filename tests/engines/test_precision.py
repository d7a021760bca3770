"""bf16 autocast and channels_last through PrecisionInferer, in the training step and in evaluation."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedEvaluator
from torch import nn

from monai.engines import SupervisedTrainer

from medsim.engines import BatchLoss, PrecisionInferer, TrainingHooks, metric_prepare_batch


class ConvEmbedder(nn.Module):
    """Tiny conv embedder with the Embedder output contract."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.embed = nn.Linear(8, dim)
        self.embedding_dim = dim

    def forward(self, x):
        f = torch.relu(self.conv(x))
        return {"embedding": nn.functional.normalize(self.embed(f.mean((2, 3))), dim=1),
                "attention": f.mean(1, keepdim=True)}


def _batches(n_batches=2, b=8):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(b, 3, 16, 16, generator=g), "label": torch.arange(b) % 4,
             "index": torch.arange(i * b, (i + 1) * b)} for i in range(n_batches)]


def _spy(net):
    """Record the conv's input memory format and output dtype on every forward, and the loss's input dtype."""
    seen = {"conv_out": [], "conv_in_cl": [], "loss_in": []}

    def hook(mod, inp, out):
        seen["conv_out"].append(out.dtype)
        seen["conv_in_cl"].append(inp[0].is_contiguous(memory_format=torch.channels_last)
                                  and not inp[0].is_contiguous())

    net.conv.register_forward_hook(hook)
    return seen


def _train_one_epoch(inferer=None, **kw):
    torch.manual_seed(0)
    net = ConvEmbedder()
    seen = _spy(net)

    def loss(emb, y, logits=None):
        seen["loss_in"].append(emb.dtype)
        return ((emb[:, None] - emb[None]) ** 2).sum(-1)[y[:, None] != y[None]].neg().mean()

    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=_batches(),
                                network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                loss_function=BatchLoss(loss), prepare_batch=metric_prepare_batch, decollate=False,
                                inferer=inferer or PrecisionInferer(**kw), train_handlers=[TrainingHooks()])
    trainer.run()
    return net, trainer, seen


@pytest.mark.parametrize("how", ["kwargs", "inferer"])
def test_amp_runs_the_training_step_under_bf16_autocast_and_the_loss_in_fp32(how):
    if how == "kwargs":
        net, trainer, seen = _train_one_epoch(amp=True, dtype="bfloat16")
    else:
        net, trainer, seen = _train_one_epoch(PrecisionInferer(amp=True, dtype="bfloat16"))
    assert seen["conv_out"] == [torch.bfloat16] * 2
    assert seen["loss_in"] == [torch.float32] * 2
    assert torch.isfinite(trainer.state.output["loss"])
    assert all(p.dtype == torch.float32 for p in net.parameters())  # autocast: weights and grads stay fp32


def test_amp_off_is_plain_fp32():
    _, trainer, seen = _train_one_epoch()
    assert seen["conv_out"] == [torch.float32] * 2 and seen["conv_in_cl"] == [False] * 2
    assert torch.isfinite(trainer.state.output["loss"])


def test_bf16_training_stays_close_to_fp32():
    fp32, *_ = _train_one_epoch()
    bf16, *_ = _train_one_epoch(amp=True)
    for a, b in zip(fp32.parameters(), bf16.parameters()):
        assert torch.allclose(a, b, atol=0.05), (a - b).abs().max()
    torch.manual_seed(0)
    init = ConvEmbedder()  # the same start: both runs really trained, and bf16 really computed differently
    assert any(not torch.equal(a, i) for a, i in zip(bf16.parameters(), init.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fp32.parameters(), bf16.parameters()))


def test_channels_last_converts_weights_and_inputs():
    net, trainer, seen = _train_one_epoch(amp=True, channels_last=True)
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last) and not net.conv.weight.is_contiguous()
    assert seen["conv_in_cl"] == [True] * 2 and seen["conv_out"] == [torch.bfloat16] * 2
    assert torch.isfinite(trainer.state.output["loss"])


def test_evaluator_with_the_same_inferer_runs_in_bf16_and_returns_fp32():
    net = ConvEmbedder()
    seen = _spy(net)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=_batches(1), network=net,
                                    inferer=PrecisionInferer(amp=True, channels_last=True), decollate=False)
    evaluator.run()
    assert seen["conv_out"] == [torch.bfloat16] and seen["conv_in_cl"] == [True]
    pred = evaluator.state.output["pred"]
    assert pred["embedding"].dtype == torch.float32 and pred["attention"].dtype == torch.float32


def test_unknown_dtype_names_the_options():
    with pytest.raises(ValueError, match="bfloat16"):
        PrecisionInferer(amp=True, dtype="bf16")


def test_the_bundle_switches_reach_trainer_and_validator(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config("bundles/isic_dsl/configs/train.json")
    parser.update({"output_dir": str(tmp_path), "amp": True, "channels_last": True, "device": "$torch.device('cpu')"})
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert isinstance(trainer.inferer, PrecisionInferer) and evaluator.inferer is trainer.inferer
    assert trainer.inferer.amp and trainer.inferer.dtype == torch.bfloat16 and trainer.inferer.channels_last
