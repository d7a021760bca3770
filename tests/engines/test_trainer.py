"""MetricLearningTrainer is MONAI's SupervisedTrainer plus wiring: prepare_batch, the routing loss, handlers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.engines import IterationEvents, SupervisedTrainer
from torch import nn

from medsim.engines import MetricLearningTrainer, SubspaceRoutingLoss, SubspaceState, metric_prepare_batch


class Linear(nn.Module):
    def __init__(self, d_in=6, dim=8):
        super().__init__()
        self.embed = nn.Linear(d_in, dim)

    def forward(self, x):
        return {"embedding": self.embed(x), "logits": x[:, :3]}


def _batches(values=(1.0, 1.0)):
    return [{"image": torch.full((4, 6), v) + torch.arange(6.0), "label": torch.tensor([0, 0, 1, 1]),
             "index": torch.arange(4 * i, 4 * i + 4)} for i, v in enumerate(values)]


def test_the_iteration_is_monais_own():
    assert "_iteration" not in MetricLearningTrainer.__dict__
    assert MetricLearningTrainer._iteration is SupervisedTrainer._iteration


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
    trainer = MetricLearningTrainer(torch.device("cpu"), 1, _batches(), net, torch.optim.Adam(net.parameters()),
                                    lambda e, y, logits=None: torch.tensor(0.5),
                                    subspaces=SubspaceState(learners=[list(range(8))]))
    trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert trainer.epoch_loss == [0.5, 0.5]


def test_events_fire_and_a_nonfinite_loss_stops_before_the_backward_pass():
    net = Linear()
    fired = []
    trainer = MetricLearningTrainer(torch.device("cpu"), 1, _batches((1.0, float("nan"))), net,
                                    torch.optim.SGD(net.parameters(), lr=0.1),
                                    lambda e, y, logits=None: e.sum(),
                                    subspaces=SubspaceState(learners=[list(range(8))]))
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
    MetricLearningTrainer(torch.device("cpu"), 2, _batches(), net, torch.optim.SGD(net.parameters(), lr=0.01), inner,
                          subspaces=SubspaceState(learners=[list(range(8))])).run()
    assert inner.calls == [(0, 2), (1, 2)]
