"""Training is MONAI's plain SupervisedTrainer plus wiring: prepare_batch, the loss adapter / DSL's routing loss,
and medsim's method-independent handlers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.engines import IterationEvents, SupervisedTrainer
from torch import nn

from medsim.engines import (BatchLoss, EpochRecorder, PrecisionInferer, SubspaceRoutingLoss, SubspaceState,
                            TrainingHooks, metric_prepare_batch, views_prepare_batch)


def make_trainer(max_epochs, batches, net, optimizer, loss, *, sampler=None, transform=None, inferer=None):
    """What a bundle's train#trainer builds: MONAI's SupervisedTrainer, medsim's prepare_batch and handlers."""
    record = EpochRecorder()
    trainer = SupervisedTrainer(torch.device("cpu"), max_epochs, batches, net, optimizer, BatchLoss(loss),
                                prepare_batch=metric_prepare_batch, decollate=False, optim_set_to_none=True,
                                inferer=inferer or PrecisionInferer(),
                                train_handlers=[TrainingHooks(sampler, transform, seed=0), record])
    return trainer, record


class Linear(nn.Module):
    def __init__(self, d_in=6, dim=8):
        super().__init__()
        self.embed = nn.Linear(d_in, dim)

    def forward(self, x):
        return {"embedding": self.embed(x), "logits": x[:, :3]}


def _batches(values=(1.0, 1.0)):
    return [{"image": torch.full((4, 6), v) + torch.arange(6.0), "label": torch.tensor([0, 0, 1, 1]),
             "index": torch.arange(4 * i, 4 * i + 4)} for i, v in enumerate(values)]


def test_bundles_train_with_monais_own_trainer():
    """No medsim trainer class: every bundle's train#trainer is MONAI's SupervisedTrainer."""
    import json
    from pathlib import Path

    import medsim.engines

    assert not hasattr(medsim.engines, "MetricLearningTrainer")
    cfg = json.loads((Path(__file__).parents[2] / "bundles" / "isic_dsl" / "configs" / "train.json").read_text())
    assert cfg["train"]["trainer"]["_target_"] == "SupervisedTrainer"


def test_prepare_batch_carries_labels_and_indices():
    x, target = metric_prepare_batch(_batches()[1], torch.device("cpu"))
    assert x.shape == (4, 6) and target["label"].tolist() == [0, 0, 1, 1] and target["index"].tolist() == [4, 5, 6, 7]
    _, target = metric_prepare_batch({"image": torch.zeros(2, 6), "label": [1, 2]})
    assert target["index"] is None and target["label"].tolist() == [1, 2]


def test_routing_loss_gives_the_batch_clusters_learner_renormalised():
    seen = {}

    def inner(emb, y, logits=None):
        seen.update(emb=emb, y=y, logits=logits)
        return emb.sum()

    st = SubspaceState(learners=[[0, 1, 2], [3, 4, 5, 6, 7]], assignment=np.array([0, 0, 1, 1, 1]))
    loss = SubspaceRoutingLoss(inner, st)
    emb = torch.randn(3, 8)
    out = {"embedding": emb, "logits": torch.ones(3, 2)}
    loss(out, {"label": torch.tensor([0, 1, 1]), "index": torch.tensor([2, 0, 1])})  # first item 2: cluster 1
    torch.testing.assert_close(seen["emb"], F.normalize(emb[:, [3, 4, 5, 6, 7]], dim=1))
    assert seen["logits"] is out["logits"]
    loss(out, {"label": torch.tensor([0, 1, 1]), "index": None})  # no index: cluster 0
    torch.testing.assert_close(seen["emb"], F.normalize(emb[:, [0, 1, 2]], dim=1))
    st.phase = "finetune"  # whole embedding, unchanged
    loss(out, {"label": torch.tensor([0, 1, 1]), "index": torch.tensor([2, 0, 1])})
    assert seen["emb"] is emb


def test_routing_loss_hands_outputs_losses_the_whole_dict_with_the_routed_embedding():
    class OutputsLoss(nn.Module):
        takes_outputs = True

        def forward(self, outputs, labels):
            self.keys, self.emb = sorted(outputs), outputs["embedding"]
            return outputs["embedding"].sum()

    inner = OutputsLoss()
    st = SubspaceState(learners=[[0, 1], [2, 3]], assignment=np.array([1]))
    SubspaceRoutingLoss(inner, st)({"embedding": torch.randn(2, 4), "attention": torch.ones(2, 1, 2, 2)},
                                   {"label": torch.tensor([0, 1]), "index": torch.tensor([0, 0])})
    assert inner.keys == ["attention", "embedding"] and inner.emb.shape == (2, 2)


def test_a_loss_without_gradient_changes_nothing():
    torch.manual_seed(0)
    net = Linear()
    before = [p.detach().clone() for p in net.parameters()]
    trainer, record = make_trainer(1, _batches(), net, torch.optim.Adam(net.parameters()),
                                   lambda e, y, logits=None: torch.tensor(0.5))
    trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert record.epoch_loss == [0.5, 0.5] and record.current["loss"] == 0.5


def test_events_fire_and_a_nonfinite_loss_stops_before_the_backward_pass():
    net = Linear()
    fired = []
    trainer, _ = make_trainer(1, _batches((1.0, float("nan"))), net, torch.optim.SGD(net.parameters(), lr=0.1),
                              lambda e, y, logits=None: e.sum())
    for ev in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED, IterationEvents.BACKWARD_COMPLETED):
        trainer.add_event_handler(ev, lambda engine, ev=ev: fired.append(ev))
    with pytest.raises(FloatingPointError, match="non-finite loss nan at epoch 1, iteration 2"):
        trainer.run()
    # the check is the trainer's first LOSS_COMPLETED handler: iteration 2 stops there, before any backward pass
    assert fired == [IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
                     IterationEvents.BACKWARD_COMPLETED, IterationEvents.FORWARD_COMPLETED]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_epoch_start_tells_the_unwrapped_loss_the_epoch():
    class Scheduled(nn.Module):
        calls: list = []

        def set_epoch(self, epoch, max_epochs):
            self.calls.append((epoch, max_epochs))

        def forward(self, e, y, logits=None):
            return e.sum()

    net, inner = Linear(), Scheduled()
    make_trainer(2, _batches(), net, torch.optim.SGD(net.parameters(), lr=0.01), inner)[0].run()
    assert inner.calls == [(0, 2), (1, 2)]


def test_epoch_start_seeds_the_sampler_and_the_augmentation_from_seed_and_epoch():
    class Spy:
        def __init__(self):
            self.calls = []

        def set_epoch(self, epoch):
            self.calls.append(("epoch", epoch))

        def set_random_state(self, seed=None):
            self.calls.append(("seed", seed))

    sampler, transform, net = Spy(), Spy(), Linear()
    make_trainer(2, _batches(), net, torch.optim.SGD(net.parameters(), lr=0.01), lambda e, y, logits=None: e.sum(),
                 sampler=sampler, transform=transform)[0].run()
    assert sampler.calls == [("epoch", 1), ("epoch", 2)] and transform.calls == [("seed", 1), ("seed", 2)]


def test_views_prepare_batch_two_views_multicrop_and_3d_correspondences():
    """One prepare_batch for every multi-view step: two views, multi-crop of mixed sizes, 3-D crops whose
    correspondence (each crop's box in the volume) travels in the target; non-tensors never reach the loss."""
    g = torch.randn(4, 3, 32, 32)
    two = {"views": [g, g.flip(-1)], "label": torch.arange(4), "index": torch.arange(4), "name": ["a"] * 4}
    x, t = views_prepare_batch(two, torch.device("cpu"))
    assert len(x) == 2 and x[1].shape == (4, 3, 32, 32) and sorted(t) == ["index", "label"]
    multi = {"views": [g, g, torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]}
    x, t = views_prepare_batch(multi)
    assert [v.shape[-1] for v in x] == [32, 32, 16, 16] and t == {}
    boxes = [torch.tensor([[0, 0, 0, 8, 8, 8]] * 2), torch.tensor([[4, 4, 4, 12, 12, 12]] * 2)]
    vol = {"views": [torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8)], "boxes": boxes}
    x, t = views_prepare_batch(vol)
    assert x[0].ndim == 5 and [b.tolist() for b in t["boxes"]] == [b.tolist() for b in boxes]
    stacked = {"views": torch.randn(4, 2, 3, 8, 8)}  # equal-size views collated into one tensor (B, V, ...)
    assert [v.shape for v in views_prepare_batch(stacked)[0]] == [(4, 3, 8, 8)] * 2
    with pytest.raises(KeyError, match="multi-view dataset"):
        views_prepare_batch({"image": g})
    with pytest.raises(ValueError, match=">= 2"):
        views_prepare_batch({"views": [g]})
    with pytest.raises(ValueError, match="share the batch size"):
        views_prepare_batch({"views": [g, g[:2]]})


def test_a_two_view_step_trains_through_monais_trainer_with_bf16():
    """A joint-embedding step (two views in, one loss on both) runs in the plain SupervisedTrainer, under the
    bf16 PrecisionInferer, with the loss in fp32."""

    class TwoView(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8))

        def forward(self, views):
            return {"z": [self.net(v) for v in views]}

    seen = []

    def loss(pred, target):
        seen.append([z.dtype for z in pred["z"]])
        z1, z2 = (F.normalize(z, dim=1) for z in pred["z"])
        return (2 - 2 * (z1 * z2).sum(1)).mean()

    torch.manual_seed(0)
    net = TwoView()
    batches = [{"views": [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]} for _ in range(3)]
    before = [p.detach().clone() for p in net.parameters()]
    trainer = SupervisedTrainer(torch.device("cpu"), 1, batches, net, torch.optim.SGD(net.parameters(), lr=0.1), loss,
                                prepare_batch=views_prepare_batch, decollate=False,
                                inferer=PrecisionInferer(amp=True, channels_last=True),
                                train_handlers=[TrainingHooks(), EpochRecorder()])
    trainer.run()
    assert seen == [[torch.float32, torch.float32]] * 3
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
