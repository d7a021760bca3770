"""DSL/MML mechanics on toy problems where the right answer is known."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from medsim.engines.sampling import ClusterBatchSampler
from medsim.engines.subspaces import SubspaceState, equal_slices, neuron_scores, split_learner
from medsim.engines.handlers import EpochRecorder
from medsim.engines.trainer import SubspaceHandler as _SubspaceHandler


class ToyEmbedder(nn.Module):
    """embedding = W x (no normalisation), the interface the handlers use."""

    def __init__(self, d_in=6, dim=16):
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.embedding_dim = dim

    def forward(self, x):
        return {"embedding": self.embed(x)}

    @torch.no_grad()
    def reset_neurons(self, index):
        self.embed.weight[index] = 0.123
        self.embed.bias[index] = 0.0


def _loader(n=40, d_in=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.arange(n) % 4
    return [{"image": x[i:i + 10], "label": y[i:i + 10], "index": torch.arange(i, i + 10)} for i in range(0, n, 10)]


def _relevant_loss(relevant):
    def loss(e, y, logits=None):  # only the `relevant` neurons influence the loss
        return (e[:, relevant] ** 2).sum()
    return loss


def test_neuron_scores_find_the_neurons_the_loss_uses():
    torch.manual_seed(0)
    net = ToyEmbedder()
    with torch.no_grad():  # relevant neurons share one weight row: equal scores
        net.embed.weight[[2, 5, 11]] = net.embed.weight[2].clone()
        net.embed.bias[[2, 5, 11]] = net.embed.bias[2].clone()
    s = neuron_scores(net, _loader(), _relevant_loss([2, 5, 11]), "cpu")
    assert s.shape == (16,)
    np.testing.assert_allclose(s[[2, 5, 11]].numpy(), 1.0, atol=1e-6)
    assert float(s[[i for i in range(16) if i not in (2, 5, 11)]].abs().max()) == 0.0
    assert all(p.grad is None for p in net.parameters())  # no gradients left behind


def test_neuron_score_formula_against_a_loop():
    torch.manual_seed(1)
    net = ToyEmbedder()
    loader = _loader()
    loss = lambda e, y, logits=None: ((e - 0.3) ** 3).sum()  # noqa: E731
    s = neuron_scores(net, loader, loss, "cpu")
    total = torch.zeros(16)
    for b in loader:
        e = net.embed(b["image"]).detach()
        total += (3 * (e - 0.3) ** 2 * e).sum(0)  # dL/de_i * e_i, summed over samples (signed)
    raw = (total / 40).abs()  # |mean|, as the DSL authors' code (issue 12)
    np.testing.assert_allclose(s.numpy(), ((raw - raw.min()) / (raw.max() - raw.min())).numpy(), atol=1e-5)


def test_split_keeps_high_scoring_neurons_and_resets_the_rest():
    st = SubspaceState(learners=[list(range(16))])
    scores = torch.zeros(16)
    scores[[1, 3, 4, 8, 9, 10, 12, 15]] = torch.tensor([0.9, 1.0, 0.8, 0.7, 0.95, 0.6, 0.51, 0.99])
    keep, reset = split_learner(st, scores, threshold=0.5, min_neurons=4)
    assert keep == [1, 3, 4, 8, 9, 10, 12, 15]
    assert reset == [0, 2, 5, 6, 7, 11, 13, 14]
    assert st.learners == [keep, reset] and st.k == 2
    # the second split works inside the exploring learner only, scaled within it
    scores2 = torch.zeros(16)
    scores2[[0, 2, 5, 6]] = 1.0
    scores2[[1, 3]] = 50.0  # large scores of the frozen learner must not matter
    keep2, reset2 = split_learner(st, scores2, threshold=0.5, min_neurons=2)
    assert keep2 == [0, 2, 5, 6] and reset2 == [7, 11, 13, 14] and st.k == 3
    assert split_learner(st, scores2, threshold=0.5, min_neurons=3) is None  # 4 neurons cannot make 2×3


def test_quantile_split_keeps_the_top_share_when_one_neuron_dominates():
    """Scores as on a trained margin-loss embedding: one neuron dominates the min–max scale, so a fixed 0.2 keeps
    too few to split; the median cut keeps the top half."""
    scores = torch.cat([torch.linspace(0.01, 0.1, 31), torch.tensor([1.0])])
    assert split_learner(SubspaceState(learners=[list(range(32))]), scores, threshold=0.2, min_neurons=4) is None
    st = SubspaceState(learners=[list(range(32))])
    keep, reset = split_learner(st, scores, quantile=0.5, min_neurons=4)
    assert keep == list(range(16, 32)) and reset == list(range(16)) and st.k == 2
    with pytest.raises(ValueError, match="quantile must be in"):
        split_learner(SubspaceState(learners=[list(range(32))]), scores, quantile=1.0)


def test_equal_slices():
    assert equal_slices(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="k=11, dim=10"):
        equal_slices(10, 11)


def test_state_roundtrip():
    st = SubspaceState(learners=[[0, 1], [2, 3]], assignment=np.array([0, 1, 1]), phase="finetune", best_nmi=0.4)
    other = SubspaceState(learners=[])
    other.load_state_dict(st.state_dict())
    assert other.learners == st.learners and other.assignment.tolist() == [0, 1, 1]
    assert other.phase == "finetune" and other.best_nmi == 0.4


def SubspaceHandler(validator, *args, subspaces=None, **kw):  # noqa: N802 - the handler, with its recorder
    """A SubspaceHandler whose epoch end first runs the EpochRecorder's (the bundle's handler order)."""
    rec = EpochRecorder(validator)
    h = _SubspaceHandler(validator, *args, subspaces=subspaces, record=rec, **kw)
    handler_end = h.epoch_completed

    def epoch_completed(engine):
        rec.epoch_completed(engine)
        handler_end(engine)

    h.epoch_completed = epoch_completed
    return h


def _engine(net, st, epoch, max_epochs=20):
    return SimpleNamespace(subspaces=st, network=net, epoch_loss=[1.0],
                           state=SimpleNamespace(epoch=epoch, max_epochs=max_epochs, device="cpu"))


def test_dsl_handler_splits_on_plateau_and_stops_when_splits_stop_helping():
    torch.manual_seed(0)
    net = ToyEmbedder(dim=16)
    st = SubspaceState(learners=[])
    validator = SimpleNamespace(state=SimpleNamespace(metrics={"val_nmi": 0.5}))
    h = SubspaceHandler(validator, _loader(), _relevant_loss(list(range(8))), subspaces=st, mode="dsl", patience=2,
                        min_neurons=2, max_k=4, finetune_epochs=0)
    h.started(_engine(net, st, 0))
    assert st.k == 1 and st.assignment.tolist() == [0] * 40
    h.epoch_completed(_engine(net, st, 1))  # first value: improvement
    h.epoch_completed(_engine(net, st, 2))  # plateau 1
    assert st.k == 1
    before = net.embed.weight.detach().clone()
    h.epoch_completed(_engine(net, st, 3))  # plateau 2 = patience: split
    assert st.k == 2
    assert "split: val NMI has not improved for 2 epochs" in h.record.history[-1]["events"][0]
    assert sorted(st.assignment.tolist()) != [0] * 40 and set(st.assignment.tolist()) == {0, 1}
    reset = st.learners[-1]
    assert torch.all(net.embed.weight[reset] == 0.123)  # re-initialised
    kept = st.learners[0]
    assert torch.equal(net.embed.weight[kept], before[kept])  # untouched
    # NMI never beats the value at the split: after `patience` more epochs splitting stops, fine-tune starts
    h.epoch_completed(_engine(net, st, 4))
    h.epoch_completed(_engine(net, st, 5))
    assert st.k == 2 and not st.splitting and st.phase == "finetune"
    assert "no better than before the last split" in h.record.history[-1]["events"][0]
    assert st.neurons_for_cluster(1, 16) == list(range(16))


def test_split_grace_and_optimizer_reset():
    """``grace`` gives a fresh split extra epochs before it is judged; ``reset_optimizer`` zeroes Adam's moments of
    the re-initialised rows only."""
    torch.manual_seed(0)
    net = ToyEmbedder(dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    _relevant_loss(list(range(16)))(net(torch.randn(4, 6))["embedding"], None).backward()
    opt.step()  # Adam now holds non-zero exp_avg / exp_avg_sq for every row
    st = SubspaceState(learners=[])
    validator = SimpleNamespace(state=SimpleNamespace(metrics={"val_nmi": 0.5}))
    h = SubspaceHandler(validator, _loader(), _relevant_loss(list(range(8))), subspaces=st, mode="dsl", patience=2,
                        min_neurons=2, max_k=4, finetune_epochs=0, grace=2, reset_optimizer=True)

    def eng(epoch):
        e = _engine(net, st, epoch)
        e.optimizer = opt
        return e

    h.started(eng(0))
    for epoch in (1, 2, 3):
        h.epoch_completed(eng(epoch))
    assert st.k == 2
    reset, kept = st.learners[-1], st.learners[0]
    for key in ("exp_avg", "exp_avg_sq"):
        m = opt.state[net.embed.weight][key]
        assert torch.all(m[reset] == 0) and torch.all(m[kept] != 0)
        assert torch.all(opt.state[net.embed.bias][key][reset] == 0)
    for epoch in (4, 5, 6, 7):  # grace 2 + patience 2: judged only after the 4th epoch without improvement
        assert st.splitting
        h.epoch_completed(eng(epoch))
    assert not st.splitting and "no better than before the last split" in h.record.history[-1]["events"][0]
    with pytest.raises(ValueError, match="grace must be >= 0"):
        SubspaceHandler(validator, _loader(), _relevant_loss([0]), subspaces=st, grace=-1)


def test_mml_handler_reclusters_every_n_epochs_and_finetunes_at_the_end():
    net = ToyEmbedder(dim=16)
    st = SubspaceState(learners=[])
    validator = SimpleNamespace(state=SimpleNamespace(metrics={"val_nmi": 0.5}))
    h = SubspaceHandler(validator, _loader(), _relevant_loss([0]), subspaces=st, mode="mml", k=4, recluster_every=2,
                        finetune_epochs=2)
    h.started(_engine(net, st, 0, max_epochs=6))
    assert st.learners == equal_slices(16, 4) and set(st.assignment.tolist()) == {0, 1, 2, 3}
    h.epoch_completed(_engine(net, st, 1, 6))
    assert h.record.history[-1]["events"] == []
    h.epoch_completed(_engine(net, st, 2, 6))
    assert h.record.history[-1]["events"][0].startswith("re-clustered into 4")
    h.epoch_completed(_engine(net, st, 3, 6))
    h.epoch_completed(_engine(net, st, 4, 6))
    assert st.phase == "finetune" and st.k == 4
    assert h.record.history[-1]["cluster_sizes"] != [40]  # epoch 4 itself still trained the learners
    h.epoch_completed(_engine(net, st, 5, 6))
    assert h.record.history[-1]["cluster_sizes"] == [40] and h.record.history[-1]["phase"] == "finetune"


def test_cluster_batches_single_cluster_constant_length_reproducible():
    labels = np.repeat(np.arange(5), 30)
    asg = np.random.default_rng(1).integers(0, 3, 150)
    s = ClusterBatchSampler(labels, lambda: asg, batch_size=16, m_per_class=4, seed=7)
    s.set_epoch(3)
    a = list(s)
    s.set_epoch(3)
    assert list(s) == a
    s.set_epoch(4)
    assert list(s) != a
    assert len(a) == len(s) == 150 // 16
    assert all(len(set(asg[b])) == 1 for b in a)
    assert all(np.bincount(labels[b]).max() <= 4 for b in a)  # m per class
    asg2 = np.zeros(150, dtype=int)
    assert len(ClusterBatchSampler(labels, lambda: asg2, batch_size=16)) == len(s)  # epoch length fixed


def test_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path):
    from medsim.engines.handlers import Checkpointer
    from medsim.errors import MedsimError

    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    ck = Checkpointer(tmp_path, {"network": ToyEmbedder()})
    engine = SimpleNamespace(state=SimpleNamespace(epoch=0, iteration=0))
    with pytest.raises(MedsimError, match=r"last\.pt: .*cannot resume .*another --output directory"):
        ck.load(engine)


def test_model_selection_follows_the_configured_metric():
    """best.pt marks ("improved") follow select_metric, not NMI, when a bundle says so; the value survives a
    checkpoint round trip; a metric the evaluator does not report is a clear error. The recorder also keeps the
    epoch's mean loss."""
    metrics = {"val_nmi": 0.5, "val_balanced_accuracy": 0.3}
    validator = SimpleNamespace(state=SimpleNamespace(metrics=metrics))
    rec = EpochRecorder(validator, select_metric="val_balanced_accuracy")
    for epoch, (nmi, bacc) in enumerate([(0.5, 0.3), (0.9, 0.2), (0.1, 0.4), (0.2, 0.35)], start=1):
        metrics.update(val_nmi=nmi, val_balanced_accuracy=bacc)
        engine = SimpleNamespace(state=SimpleNamespace(epoch=epoch, output={"loss": torch.tensor(float(epoch))}))
        rec.epoch_started(engine)
        rec.iteration_completed(engine)
        rec.epoch_completed(engine)
    assert [r["improved"] for r in rec.history] == [True, False, True, False] and rec.best_selected == 0.4
    assert [r["loss"] for r in rec.history] == [1.0, 2.0, 3.0, 4.0] and rec.current["val_nmi"] == 0.2
    fresh = EpochRecorder(validator)
    fresh.load_state_dict(rec.state_dict())
    assert fresh.best_selected == 0.4 and fresh.history == rec.history
    bad = EpochRecorder(validator, select_metric="val_auc")
    with pytest.raises(KeyError, match="select_metric 'val_auc' is not among the validation metrics"):
        bad.epoch_completed(SimpleNamespace(state=SimpleNamespace(epoch=5)))


def test_embedding_metric_adds_classification_metrics_for_logits():
    from medsim.engines import EmbeddingMetric
    from medsim.metrics.classification import classification_metrics

    torch.manual_seed(0)
    emb, labels, logits = torch.randn(30, 8), torch.arange(30) % 3, torch.randn(30, 3)
    m = EmbeddingMetric(mode="all")
    m.reset()
    m.update((emb[:15], labels[:15], logits[:15]))
    m.update((emb[15:], labels[15:], logits[15:]))
    res = m.compute()
    ref = classification_metrics(labels.numpy(), logits.numpy())
    assert res["val_balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"])
    assert res["val_accuracy"] == pytest.approx(ref["accuracy"]) and "val_R@1" in res
    m.reset()
    m.update((emb, labels, None))  # an embedder without logits
    assert "val_accuracy" not in m.compute()


@pytest.mark.parametrize("mode", ["mml", "dsl"])
def test_no_final_fine_tune_announced_without_epochs_left(mode):
    """The fine-tune phase starts only when epochs remain after this one, and says how many: a 1-epoch run has
    none (no "last 2 epochs" message), a 2-epoch run has 1."""
    validator = SimpleNamespace(state=SimpleNamespace(metrics={"val_nmi": 0.5}))
    for max_epochs, expected in ((1, None), (2, "last 1 epoch)")):
        st = SubspaceState(learners=[])
        h = SubspaceHandler(validator, _loader(), _relevant_loss([0]), subspaces=st, mode=mode, k=4, recluster_every=5,
                            finetune_epochs=2, min_neurons=2)
        net = ToyEmbedder(dim=16)
        h.started(_engine(net, st, 0, max_epochs))
        h.epoch_completed(_engine(net, st, 1, max_epochs))
        fine = [e for e in h.record.history[-1]["events"] if "final fine-tune" in e]
        if expected is None:
            assert fine == [] and st.phase == "explore"
        else:
            assert len(fine) == 1 and fine[0].endswith(expected) and st.phase == "finetune"


def test_resuming_a_complete_run_says_it_is_complete(tmp_path, caplog):
    """last.pt at epoch >= max_epochs: a warning says nothing will be trained and how to start a new run; a run
    with epochs left logs its resume at INFO."""
    import logging

    from medsim.engines.handlers import Checkpointer

    ck = Checkpointer(tmp_path, {"network": ToyEmbedder()})
    ck.save(SimpleNamespace(state=SimpleNamespace(epoch=3, iteration=30)))
    with caplog.at_level(logging.INFO, logger="medsim"):
        engine = SimpleNamespace(state=SimpleNamespace(epoch=0, iteration=0, max_epochs=1))
        ck.load(engine)
        assert engine.state.epoch == 3
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "already complete" in warned[0].getMessage()
        assert "--output NEW_DIR" in warned[0].getMessage() and "epoch 3 and max_epochs is 1" in warned[0].getMessage()
        caplog.clear()
        ck.load(SimpleNamespace(state=SimpleNamespace(epoch=0, iteration=0, max_epochs=5)))
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (logging.INFO, f"resumed from {tmp_path / 'last.pt'} at epoch 3")]


def test_match_clusters_keeps_each_learner_on_its_data():
    """Issue 12: k-means numbers clusters arbitrarily; matching (Hungarian on overlaps) gives a relabelled but
    otherwise equal clustering back its old numbers, and after a split the new cluster gets the new learner."""
    from medsim.engines.subspaces import match_clusters

    rng = np.random.default_rng(0)
    old = rng.integers(0, 4, 200)
    perm = np.array([2, 0, 3, 1])
    assert np.array_equal(match_clusters(old, perm[old], 4), old)  # a pure relabelling is undone
    noisy = perm[old].copy()
    flip = rng.random(200) < 0.1
    noisy[flip] = rng.integers(0, 4, flip.sum())
    kept = (match_clusters(old, noisy, 4) == old).mean()
    assert kept >= 0.85 and (noisy == old).mean() < 0.5  # without matching most items would change learner
    two = np.repeat([0, 1], 50)  # K=2 -> 3 after a split: cluster "2" of the old 1 is the new learner
    new = np.concatenate([np.full(50, 2), np.full(25, 0), np.full(25, 1)])
    got = match_clusters(two, new, 3)
    assert got[:50].tolist() == [0] * 50 and set(got[50:75]) == {1} and set(got[75:]) == {2}


def test_the_final_fine_tune_mixes_all_data_again():
    """Issue 12: entering the fine-tune phase resets the assignment to one cluster, so the batch sampler stops
    drawing every batch from a single cluster."""
    validator = SimpleNamespace(state=SimpleNamespace(metrics={"val_nmi": 0.5}))
    st = SubspaceState(learners=[])
    h = SubspaceHandler(validator, _loader(), _relevant_loss([0]), subspaces=st, mode="mml", k=4, recluster_every=1,
                        finetune_epochs=1, min_neurons=2)
    net = ToyEmbedder(dim=16)
    h.started(_engine(net, st, 0, 3))
    h.epoch_completed(_engine(net, st, 1, 3))
    assert len(set(st.assignment.tolist())) > 1 and st.phase == "explore"
    h.epoch_completed(_engine(net, st, 2, 3))
    assert st.phase == "finetune" and set(st.assignment.tolist()) == {0}
    labels = np.arange(len(st.assignment)) % 3
    sampler = ClusterBatchSampler(labels, lambda: st.assignment, batch_size=8, m_per_class=2)
    assert len(sampler) == len(labels) // 8  # one cluster: the whole set, no per-cluster quotas


def test_neuron_scores_average_before_the_absolute_value():
    """Issue 12: a neuron whose per-sample contributions cancel (here: e_0 = 5 everywhere, gradient +1/-1 in turn)
    scores 0; the per-sample |.| of before ranked it first (5 vs 1) although removing it changes nothing."""

    class Fixed(torch.nn.Module):
        embedding_dim = 2

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return {"embedding": x * self.w}

    x = torch.tensor([[5.0, 1.0]] * 4)
    loader = [{"image": x, "label": torch.tensor([0, 1, 0, 1])}]
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss = lambda e, y, logits=None: (e[:, 0] * sign).sum() + e[:, 1].sum()  # noqa: E731
    s = neuron_scores(Fixed(), loader, loss, "cpu")
    assert s.tolist() == [0.0, 1.0]


def test_a_failed_split_is_retried_at_the_next_plateau():
    """Issue 12: when the exploring learner cannot be split (threshold too high for its scores), DSL waits for the
    next plateau and tries again, up to max_failed_splits, instead of stopping for good after one failure."""
    torch.manual_seed(0)
    validator = SimpleNamespace(state=SimpleNamespace(metrics={"val_nmi": 0.5}))
    st = SubspaceState(learners=[])
    h = SubspaceHandler(validator, _loader(), _relevant_loss(list(range(8))), subspaces=st, mode="dsl", patience=1,
                        min_neurons=9, max_k=4, finetune_epochs=0, max_failed_splits=2)  # 16 neurons: never 2 x 9
    net = ToyEmbedder(dim=16)
    h.started(_engine(net, st, 0))
    h.epoch_completed(_engine(net, st, 1))  # first value: improvement
    h.epoch_completed(_engine(net, st, 2))  # plateau: split fails, retry later
    assert st.splitting and st.failed_splits == 1 and "retry at the next plateau" in h.record.history[-1]["events"][0]
    h.epoch_completed(_engine(net, st, 3))  # plateau again: second failure stops splitting
    assert not st.splitting and "2 failed attempts" in h.record.history[-1]["events"][0]
    other = SubspaceState(learners=[])
    other.load_state_dict(st.state_dict())
    assert other.failed_splits == 2
    with pytest.raises(ValueError, match="max_failed_splits"):
        SubspaceHandler(validator, _loader(), _relevant_loss([0]), subspaces=st, max_failed_splits=0)


def test_attention_spread_is_zero_for_image_independent_maps():
    """Issue 12: the validation metric that shows whether the attention map depends on the image."""
    from medsim.engines import AttentionSpread

    m = AttentionSpread()
    m.reset()
    same = torch.rand(1, 1, 4, 4).expand(6, 1, 4, 4)
    m.update(same[:3])
    m.update(same[3:])
    assert m.compute() == pytest.approx(0.0, abs=1e-7)
    m.reset()
    maps = torch.rand(8, 1, 4, 4)
    m.update(maps)
    assert m.compute() == pytest.approx(float(maps.flatten(1).std(0, unbiased=False).mean()), rel=1e-6)
    m.reset()
    m.update(None)
    assert np.isnan(m.compute())


def test_cluster_batches_have_the_batch_size_whatever_the_cluster_holds():
    """Issue 12: a cluster holding two classes used to give batches of 2 × m images (one class: m images and zero
    loss); batches now always hold batch_size images (classes drawn with replacement), a class smaller than m is
    drawn with replacement, and a class with one image in a cluster (no positive pair) is not drawn there."""
    labels = np.array([0] * 20 + [1] * 3 + [2] + [3] * 30 + [4] * 30)
    asg = np.array([0] * 24 + [1] * 60)  # cluster 0: classes 0 (20), 1 (3 < m), 2 (a single image)
    s = ClusterBatchSampler(labels, lambda: asg, batch_size=16, m_per_class=4, seed=3)
    batches = list(s)
    assert all(len(b) == 16 for b in batches)
    in0 = [b for b in batches if asg[b[0]] == 0]
    assert in0 and all(set(asg[b]) == {0} for b in in0)
    drawn = np.concatenate([labels[b] for b in in0])
    assert 2 not in drawn and {0, 1} <= set(drawn.tolist())
    assert all(np.bincount(labels[b]).max() % 4 == 0 for b in batches)  # m images per drawn class
    only = ClusterBatchSampler(np.arange(6), None, batch_size=8, m_per_class=2)  # every class a single image
    assert all(len(b) == 8 for b in only)


@pytest.mark.parametrize("share, expected", [("proportional", {0: 9, 1: 1}), ("equal", {0: 5, 1: 5}),
                                             (3, {0: 3, 1: 3})])
def test_batches_per_cluster_is_configurable(share, expected):
    """Issue 12: by default a small cluster's learner got batches in proportion to its size (here 1 of 10);
    ``equal`` gives every learner the same number of updates, an int fixes the count per cluster."""
    labels = np.arange(160) % 4
    asg = np.array([0] * 150 + [1] * 10)
    s = ClusterBatchSampler(labels, lambda: asg, batch_size=16, m_per_class=4, batches_per_cluster=share)
    got = np.bincount([asg[b[0]] for b in s], minlength=2)
    assert dict(enumerate(got.tolist())) == expected and len(s) == sum(expected.values())
    with pytest.raises(ValueError, match="batches_per_cluster"):
        ClusterBatchSampler(labels, batches_per_cluster="some")


def test_neuron_scores_use_the_learners_own_loss_on_its_renormalised_slice():
    """Issue 12: the exploring learner is scored with its own loss (its slice of the embedding, re-normalised, as
    the routing loss trains it); the other learners' neurons score 0. Checked against the formula by hand."""
    torch.manual_seed(2)
    net = ToyEmbedder()
    loader = _loader()
    learner = [3, 4, 5, 6, 7, 8, 9, 10]
    w = torch.linspace(-1, 1, len(learner))
    loss = lambda e, y, logits=None: ((e * w) ** 2).sum()  # noqa: E731  # e: the learner's (B, 8) slice
    s = neuron_scores(net, loader, loss, "cpu", neurons=learner)
    total = torch.zeros(16)
    for b in loader:
        raw = net.embed(b["image"]).detach().requires_grad_(True)
        sl = torch.nn.functional.normalize(raw[:, learner], dim=1)
        (g,) = torch.autograd.grad(((sl * w) ** 2).sum(), raw)
        total += (g * raw).sum(0).detach()
    ref = (total / 40).abs()[learner]
    np.testing.assert_allclose(s[learner].numpy(), ((ref - ref.min()) / (ref.max() - ref.min())).numpy(), atol=1e-5)
    assert float(s[[i for i in range(16) if i not in learner]].abs().max()) == 0.0


def test_neuron_scores_are_taken_on_class_mixed_batches():
    """Issue 12: the cluster loader is an unshuffled pass; on a class-sorted training set its batches hold one class
    each, so a margin/contrastive loss has no negatives and the scores were computed from zero gradients. The
    handler now scores on class-balanced batches of the same dataset."""
    from monai.data import DataLoader, Dataset

    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.randn(6, generator=g), "label": i // 10, "index": i} for i in range(40)]  # sorted
    cluster_loader = DataLoader(Dataset(items), batch_size=10, shuffle=False)
    assert all(len(set(b["label"].tolist())) == 1 for b in cluster_loader)
    validator = SimpleNamespace(state=SimpleNamespace(metrics={"val_nmi": 0.5}))
    h = SubspaceHandler(validator, cluster_loader, _relevant_loss([0]), subspaces=SubspaceState(learners=[]),
                        score_batch_size=8, score_m_per_class=2)
    batches = list(h.score_loader)
    assert len(batches) == 40 // 8 and all(len(set(b["label"].tolist())) == 4 for b in batches)


@pytest.mark.parametrize("kind", ["embedding", "learner", "penultimate"])
def test_cluster_features(kind):
    """Issue 12: after a split the re-initialised neurons (raw outputs much larger than the trained ones') dominate
    one L2 norm over the whole embedding; per-learner normalisation weighs every learner equally; the penultimate
    features are the pooled inputs of the embedding layer (the divide-and-conquer code's choice)."""
    from medsim.engines.subspaces import cluster_features, learner_normalized

    torch.manual_seed(0)
    net = ToyEmbedder()
    with torch.no_grad():
        net.embed.weight[8:] *= 20  # the "fresh" learner: raw outputs 20x larger
    learners = [list(range(8)), list(range(8, 16))]
    feats, index = cluster_features(net, _loader(), "cpu", kind, learners)
    assert index.tolist() == list(range(40))
    x = torch.cat([b["image"] for b in _loader()])
    if kind == "penultimate":
        np.testing.assert_allclose(feats, torch.nn.functional.normalize(x, dim=1).numpy(), atol=1e-6)
        return
    e = torch.nn.functional.normalize(net.embed(x), dim=1).detach().numpy()
    share_fresh = np.linalg.norm(feats[:, 8:], axis=1) ** 2
    if kind == "embedding":
        assert share_fresh.min() > 0.9  # the fresh learner takes > 90 % of every distance
    else:
        np.testing.assert_allclose(share_fresh, 0.5, atol=1e-6)  # each learner half
        np.testing.assert_allclose(feats, learner_normalized(e, learners), atol=1e-6)
