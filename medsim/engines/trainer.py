"""MONAI/ignite engine parts for embedders, and DSL/MML's subspace learners on MONAI's ``SupervisedTrainer``.

- :class:`PrecisionInferer` — bf16 autocast (AMX on CPU) and channels_last for the trainer's and the evaluators'
  forward passes; outputs come back in float32, so losses and metrics are computed in fp32.
- :class:`EmbeddingMetric` — an ignite metric for a MONAI ``SupervisedEvaluator``: NMI (key metric) or the full
  retrieval/clustering set on the validation embeddings.
- :class:`SubspaceRoutingLoss` — DSL/MML's loss wrapper: each batch, drawn from one cluster, trains its learner's
  slice of the embedding.
- :class:`SubspaceHandler` — re-clustering every N epochs; DSL's split on a validation-NMI plateau; the final
  fine-tune phase. Adds K, each learner's neurons, cluster sizes and the reason for each split to the epoch's
  record (:class:`~medsim.engines.handlers.EpochRecorder`).

The trainer itself is MONAI's ``SupervisedTrainer`` (prepare_batch from :mod:`medsim.engines.batches`, the
method-independent handlers of :mod:`medsim.engines.handlers`); a bundle that is not DSL uses none of the
subspace parts.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.inferers import Inferer
from monai.utils import look_up_option

from medsim.engines.batches import BatchLoss
from medsim.engines.distributed import broadcast_module, broadcast_object, is_distributed, is_main_process, unwrap
from medsim.engines.handlers import EpochRecorder
from medsim.engines.sampling import ClusterBatchSampler
from medsim.engines.subspaces import (CLUSTER_FEATURES, SubspaceState, cluster_counts, cluster_features, equal_slices,
                                      match_clusters, neuron_scores, split_learner)

__all__ = ["SubspaceRoutingLoss", "PrecisionInferer", "EmbeddingMetric", "AttentionSpread", "SubspaceHandler"]

logger = logging.getLogger(__name__)


def _float32(out: Any) -> Any:
    """Floating tensors of a network output (tensor, mapping or sequence) as float32; everything else unchanged."""
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, Mapping):
        return {k: _float32(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_float32(v) for v in out)
    return out


class PrecisionInferer(Inferer):
    """Forward pass under ``torch.autocast`` and/or in channels_last memory format; outputs in float32.

    MONAI's engines autocast only on CUDA (``torch.autocast("cuda")``); this inferer autocasts on the inputs'
    device, so bf16 runs on CPUs with AMX (bf16 GEMM about 5x fp32 on this project's CPU) as well as on GPUs. The
    network's floating outputs are cast back to float32, so the loss, the metrics and the backward pass of the loss
    run in fp32 (only the network's own ops run in bf16, by autocast's op lists). bf16 needs no loss scaling;
    float16 would need a ``GradScaler`` in training and is accepted for inference only.

    Args:
        amp: run the forward pass under autocast.
        dtype: autocast dtype, ``"bfloat16"`` (default) or ``"float16"``.
        channels_last: convert the network's 4-D/5-D weights (once) and each 4-D/5-D input batch to channels_last
            (channels_last_3d for 3-D data): oneDNN's and cuDNN's fast convolution layout.

    Used as ``inferer`` of MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` (one object in the bundle:
    ``train#inferer``), so training and validation run at the same precision.
    """

    def __init__(self, amp: bool = False, dtype: str | torch.dtype = "bfloat16", channels_last: bool = False):
        super().__init__()
        name = look_up_option(str(dtype).replace("torch.", ""), ("bfloat16", "float16"))
        self.amp, self.dtype, self.channels_last = bool(amp), getattr(torch, name), bool(channels_last)
        self._converted: set[tuple[int, torch.memory_format]] = set()

    def _layout(self, x: Any, network: Callable[..., Any]) -> Any:
        if not (self.channels_last and torch.is_tensor(x) and x.ndim in (4, 5)):
            return x
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        if isinstance(network, torch.nn.Module) and (id(network), fmt) not in self._converted:
            network.to(memory_format=fmt)  # in place: the optimiser keeps the same Parameters
            self._converted.add((id(network), fmt))
        return x.contiguous(memory_format=fmt)

    def __call__(self, inputs: torch.Tensor | Sequence[torch.Tensor], network: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> Any:
        """``inputs``: one batch (B, C, *spatial), or a list of views (each (B, C, *spatial_v); SSL methods)."""
        views = isinstance(inputs, (list, tuple))
        inputs = type(inputs)(self._layout(v, network) for v in inputs) if views else self._layout(inputs, network)
        if not self.amp:
            return network(inputs, *args, **kwargs)
        device = (inputs[0] if views else inputs).device
        with torch.autocast(device.type, dtype=self.dtype):
            out = network(inputs, *args, **kwargs)
        return _float32(out)

    def __repr__(self) -> str:
        return f"PrecisionInferer(amp={self.amp}, dtype={self.dtype}, channels_last={self.channels_last})"


class SubspaceRoutingLoss(BatchLoss):
    """The loss of subspace learners (MML, DSL; Sanakoyeu et al. 2019) as a MONAI loss object.

    Called as ``loss(outputs, target)`` with the network's output dict and
    :func:`~medsim.engines.batches.metric_prepare_batch`'s target: each batch is drawn from one cluster
    (:class:`~medsim.engines.sampling.ClusterBatchSampler`; its first item's cluster in ``subspaces.assignment``),
    and ``routed`` sees only that cluster's learner's neurons, re-normalised, (B, D_k). With one learner (or in the
    fine-tune phase) the embedding passes unchanged. The call convention of ``routed`` is :class:`BatchLoss`'s.
    """

    def __init__(self, routed: Callable[..., torch.Tensor], subspaces: SubspaceState):
        super().__init__(routed)
        self.subspaces = subspaces

    def forward(self, outputs: Mapping[str, torch.Tensor], target: Mapping[str, Any]) -> torch.Tensor:
        y, index = target["label"], target.get("index")
        first = int(index[0]) if index is not None else 0
        asg = self.subspaces.assignment
        cluster = int(asg[first]) if len(asg) > first else 0
        emb = outputs["embedding"]
        neurons = self.subspaces.neurons_for_cluster(cluster, emb.shape[1])
        if len(neurons) < emb.shape[1]:
            emb = F.normalize(emb[:, neurons], dim=1)
        return self.call({**outputs, "embedding": emb}, y)


def _embedding_label_logits(o: Mapping[str, Any]) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    return o["pred"]["embedding"], o["label"], o["pred"].get("logits")


class EmbeddingMetric(Metric):
    """Retrieval/clustering metrics over all validation embeddings (ignite ``Metric`` for MONAI evaluators).

    ``mode="nmi"`` computes NMI (faiss k-means with the number of classes; the default model-selection metric),
    ``mode="all"`` returns a mapping ``{prefix + name: value}`` with NMI, AMI, R@1/2/4/8, MAP@R, P@1 and the
    class-balanced R@1 and MAP@R — plus
    accuracy, balanced accuracy and macro-F1 when the network has ``logits``.
    """

    def __init__(self, mode: str = "nmi", prefix: str = "val_", seed: int = 0,
                 output_transform: Callable = _embedding_label_logits):
        self.mode, self.prefix, self.seed = mode, prefix, seed
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._emb: list[torch.Tensor] = []
        self._lab: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []

    def update(self, output: tuple[torch.Tensor, ...]) -> None:
        emb, lab, *rest = output
        self._emb.append(F.normalize(emb.detach().float(), dim=1).cpu())
        self._lab.append(torch.as_tensor(lab).detach().cpu())
        if rest and rest[0] is not None:
            self._logits.append(rest[0].detach().float().cpu())

    def compute(self) -> float | dict[str, float]:
        from medsim.metrics.classification import classification_metrics
        from medsim.metrics.retrieval import class_balanced_retrieval, evaluate_embeddings, nmi_ami, usable_ks

        emb = torch.cat(self._emb).numpy()
        lab = torch.cat(self._lab).numpy()
        if self.mode == "nmi":
            return float(nmi_ami(emb, lab, seed=self.seed)["nmi"])
        res = evaluate_embeddings(emb, lab, ks=usable_ks(len(emb)), seed=self.seed)
        res.update(class_balanced_retrieval(emb, lab))
        if self._logits:
            res.update(classification_metrics(lab, torch.cat(self._logits).numpy()))
        return {self.prefix + k: float(v) for k, v in res.items()}


def _attention(o: Mapping[str, Any]) -> torch.Tensor | None:
    return o["pred"].get("attention")


class AttentionSpread(Metric):
    """How much the attention map depends on the image: the per-cell standard deviation of the maps across the
    validation images, averaged over the cells (a scalar; 0 = every image gets the same map).

    Issue 12 found DSL's 4×4 map differing by at most 0.05 between HAM10000 images (std 0.0003 by epoch 20): a map
    that does not depend on the image localises nothing. Attached to the validation evaluator as
    ``val_attention_spread``, it lands in ``metrics.jsonl`` every epoch. Maps of different sizes across batches
    are not expected (one eval preprocessing); a network without ``attention`` reports NaN.
    """

    def __init__(self, output_transform: Callable = _attention):
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._maps: list[torch.Tensor] = []

    def update(self, output: torch.Tensor | None) -> None:
        if output is not None:
            self._maps.append(output.detach().float().flatten(1).cpu())  # (B, cells)

    def compute(self) -> float:
        if not self._maps:
            return float("nan")
        maps = torch.cat(self._maps)
        return float(maps.std(0, unbiased=False).mean()) if len(maps) > 1 else 0.0


class SubspaceHandler:
    """Drives learners and data assignment (attach to the trainer *after* the ValidationHandler and the
    :class:`~medsim.engines.handlers.EpochRecorder`, *before* the Checkpointer and MetricsLogger).

    Args:
        subspaces: the shared :class:`SubspaceState` (also held by the :class:`SubspaceRoutingLoss` and the batch
            sampler; checkpointed as ``subspaces``).
        record: the run's :class:`~medsim.engines.handlers.EpochRecorder`; each epoch's record gets ``phase``,
            ``K``, ``learner_neurons``, ``cluster_sizes`` and ``events`` (the reason for each split).
        mode: ``"dsl"`` (K grows from 1) or ``"mml"`` (fixed ``k``; ``k=1`` is plain single-learner training).
        validator: the evaluator whose ``val_nmi`` drives DSL (and, by default, model selection).
        cluster_loader: deterministic (no augmentation) loader over the training items, yielding ``index``.
        score_loader: loader for neuron scoring; its batches must mix classes. Default: class-balanced batches
            (``score_batch_size`` images, ``score_m_per_class`` per class) of ``cluster_loader``'s dataset, one
            cluster — the training sampler's batches without augmentation. ``score_batches`` caps the batches
            scored (default: one pass, N // score_batch_size).
        loss_function: the training loss (for neuron scores: the exploring learner's own loss on its slice).
        cluster_features: what k-means re-clusters on — ``"penultimate"`` (the pooled features before the
            embedding layer, as the divide-and-conquer code; the default: on HAM10000 DSL reached test NMI
            17.1 ± 2.7 vs 16.2 ± 0.5 with ``"learner"`` over 3 seeds — within the seed spread,
            ``benchmarks/results/dsl_table1.md``), ``"learner"`` (the embedding
            normalised per learner, so the re-initialised neurons of a fresh split do not dominate) or
            ``"embedding"`` (one L2 norm over all D; medsim before issue 12); see
            :func:`~medsim.engines.subspaces.cluster_features`.
        k: number of learners for MML.
        max_k, patience, threshold, min_neurons: DSL's split rule; ``quantile`` (optional) replaces the fixed
            threshold by a quantile of the exploring learner's scores (see :func:`split_learner`); ``grace``: extra
            epochs a fresh split gets before the plateau rule judges it (re-initialised neurons and a new
            clustering first cost validation NMI); ``reset_optimizer``: zero the optimiser's running moments
            (Adam's exp_avg / exp_avg_sq) of the re-initialised rows, so they do not inherit the old neurons'.
        recluster_every: epochs between re-clusterings (exploration phase).
        finetune_epochs: the last epochs train the whole embedding on batches that mix all the training data.
        min_delta: smallest NMI gain that counts as an improvement (DSL's plateau rule; model selection is the
            recorder's).
        max_failed_splits: plateaus at which a split may fail (no two parts at the threshold) before splitting
            stops for good; after a failed attempt the plateau count restarts (issue 12: one failure used to stop
            DSL for the rest of the run).
    """

    def __init__(self, validator: Engine, cluster_loader: Any, loss_function: Callable, *, subspaces: SubspaceState,
                 record: EpochRecorder, mode: str = "dsl",
                 k: int = 1, max_k: int = 8, patience: int = 3, threshold: float = 0.5, min_neurons: int = 8,
                 recluster_every: int = 2, finetune_epochs: int = 2, min_delta: float = 1e-3,
                 score_loader: Any = None, score_batches: int | None = None, seed: int = 0,
                 quantile: float | None = None, grace: int = 0,
                 reset_optimizer: bool = False, max_failed_splits: int = 3, cluster_features: str = "penultimate",
                 score_batch_size: int = 32, score_m_per_class: int = 4):
        if mode not in ("dsl", "mml"):
            raise ValueError(f"mode must be 'dsl' or 'mml', got mode={mode!r}")
        self.validator, self.cluster_loader, self.loss_function = validator, cluster_loader, loss_function
        self.score_loader = score_loader or self._class_mixed_loader(cluster_loader, score_batch_size,
                                                                     score_m_per_class, seed)
        self.mode, self.k, self.max_k, self.patience = mode, k, max_k, patience
        self.threshold, self.min_neurons, self.recluster_every = threshold, min_neurons, recluster_every
        self.finetune_epochs, self.min_delta, self.score_batches, self.seed = finetune_epochs, min_delta, \
            score_batches, seed
        self.subspaces, self.record = subspaces, record
        self.quantile = quantile
        if grace < 0:
            raise ValueError(f"grace must be >= 0 epochs, got {grace}")
        self.grace, self.reset_optimizer = int(grace), bool(reset_optimizer)
        if max_failed_splits < 1:
            raise ValueError(f"max_failed_splits must be >= 1, got {max_failed_splits}")
        self.max_failed_splits = int(max_failed_splits)
        self.cluster_features = look_up_option(cluster_features, CLUSTER_FEATURES)

    @staticmethod
    def _class_mixed_loader(cluster_loader: Any, batch_size: int, m_per_class: int, seed: int) -> Any:
        """Class-balanced batches over ``cluster_loader``'s dataset (MONAI datasets keep their items in ``data``);
        ``cluster_loader`` itself when the items' labels cannot be read."""
        from monai.data import DataLoader

        dataset = getattr(cluster_loader, "dataset", None)
        items = getattr(dataset, "data", None)
        try:
            labels = [int(d["label"]) for d in items]
        except (TypeError, KeyError, ValueError):
            logger.warning("neuron scores: cannot read the labels of the cluster loader's dataset (%s has no `data` "
                           "items with an integer `label`), so DSL scores on the cluster loader itself; if its "
                           "batches hold one class each the scores are zero — pass score_loader= with class-mixed "
                           "batches", type(dataset).__name__)
            return cluster_loader
        sampler = ClusterBatchSampler(labels, None, batch_size=batch_size, m_per_class=m_per_class, seed=seed)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=getattr(cluster_loader, "num_workers", 0))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    # -- steps
    def _recluster(self, engine: Engine, epoch: int) -> list[int]:
        from medsim.metrics.retrieval import kmeans

        st = self.subspaces
        dataset = getattr(self.cluster_loader, "dataset", None)
        if st.k == 1 and dataset is not None:  # one cluster: nothing to embed (single learners, DSL before a split)
            st.assignment = np.zeros(len(dataset), dtype=np.int64)
            return cluster_counts(st.assignment, 1)
        asg = None
        if is_main_process():  # several processes: rank 0 embeds and clusters, every rank routes with its result
            feats, index = cluster_features(unwrap(engine.network), self.cluster_loader, engine.state.device,
                                            self.cluster_features, st.learners)
            asg = np.zeros(int(index.max()) + 1, dtype=np.int64)
            if st.k > 1:
                labels, _ = kmeans(feats, st.k, seed=self.seed + epoch)
                asg[index] = labels
                if st.assignment.shape == asg.shape and st.assignment.max(initial=0) > 0:
                    asg = match_clusters(st.assignment, asg, st.k)  # learners keep their data across re-clusterings
        st.assignment = broadcast_object(asg)
        return cluster_counts(st.assignment, st.k)

    def started(self, engine: Engine) -> None:
        st = self.subspaces
        if engine.state.epoch > 0:  # resumed: the Checkpointer restored learners and assignment
            return
        dim = unwrap(engine.network).embedding_dim
        st.learners = equal_slices(dim, self.k) if self.mode == "mml" else [list(range(dim))]
        sizes = self._recluster(engine, 0)
        logger.info("start: %s with K=%d learners of %s neurons; clusters %s", self.mode, st.k,
                    [len(ln) for ln in st.learners], sizes)

    def epoch_completed(self, engine: Engine) -> None:
        st = self.subspaces
        epoch, max_epochs = engine.state.epoch, engine.state.max_epochs
        metrics = dict(self.validator.state.metrics) if self.validator.state is not None else {}
        nmi = float(metrics.get("val_nmi", float("nan")))
        rec = self.record.current
        rec.update({"phase": st.phase, "K": st.k, "learner_neurons": [len(ln) for ln in st.learners],
                    "cluster_sizes": cluster_counts(st.assignment, st.k) if st.phase == "explore"
                    else [int(len(st.assignment))]})
        improved = nmi > st.best_nmi + self.min_delta
        if nmi > st.best_nmi:
            st.best_nmi = nmi
        st.bad_epochs = 0 if improved else st.bad_epochs + 1
        events = []
        if st.phase == "explore":
            if self.mode == "dsl" and st.splitting and st.bad_epochs >= self.patience:
                events.append(self._try_split(engine, epoch))
            elif st.k > 1 and epoch % self.recluster_every == 0:
                events.append(f"re-clustered into {st.k}: sizes {self._recluster(engine, epoch)}")
            stopped = self.mode == "dsl" and not st.splitting
            left = max_epochs - epoch  # epochs still to train: none after the last one, so no fine-tune to announce
            if left > 0 and (stopped or left <= self.finetune_epochs):
                if st.phase != "finetune" and (self.mode == "dsl" or self.k > 1):
                    st.phase = "finetune"
                    # one cluster again: batches mix all the data (the sampler reads this assignment)
                    st.assignment = np.zeros_like(st.assignment)
                    why = "splitting stopped" if stopped else f"last {left} epoch{'s' if left > 1 else ''}"
                    events.append(f"final fine-tune of the whole embedding on all data ({why})")
        if is_distributed():  # rank 0's state is the run's (every rank decided alike on the same inputs)
            st.load_state_dict(broadcast_object(st.state_dict()))
        rec["events"] = events
        for e in events:  # MetricsLogger's epoch line shows them at INFO
            logger.debug("epoch %d: %s", epoch, e)

    def _try_split(self, engine: Engine, epoch: int) -> str:
        st = self.subspaces
        plateau = f"val NMI has not improved for {st.bad_epochs} epochs (best {st.best_nmi:.4f})"
        if st.nmi_at_last_split is not None and st.best_nmi <= st.nmi_at_last_split + self.min_delta:
            st.splitting = False
            return (f"stop splitting: {plateau}, no better than before the last split "
                    f"({st.nmi_at_last_split:.4f})")
        if st.k >= self.max_k:
            st.splitting = False
            return f"stop splitting: {plateau} and K reached max_k={self.max_k}"
        sampler = getattr(self.score_loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        net = unwrap(engine.network)
        scores = neuron_scores(net, self.score_loader, self.loss_function, engine.state.device,
                               max_batches=self.score_batches, neurons=st.learners[-1])
        parts = split_learner(st, scores, threshold=self.threshold, min_neurons=self.min_neurons,
                              quantile=self.quantile)
        rule = f"threshold {self.threshold}" if self.quantile is None else f"score quantile {self.quantile}"
        if parts is None:
            st.failed_splits += 1
            why = (f"{plateau}, but the exploring learner's {len(st.learners[-1])} neurons cannot form two parts "
                   f"of >= {self.min_neurons} at {rule}")
            if st.failed_splits >= self.max_failed_splits:
                st.splitting = False
                return f"stop splitting: {why} ({st.failed_splits} failed attempts)"
            st.bad_epochs = 0  # the scores change as training goes on: try again at the next plateau
            return (f"no split: {why}; retry at the next plateau (attempt {st.failed_splits} of "
                    f"{self.max_failed_splits})")
        keep, reset = parts
        index = torch.as_tensor(reset, device=net.embed.weight.device)
        net.reset_neurons(index)
        broadcast_module(net.embed)  # rank 0's fresh neurons on every rank
        if self.reset_optimizer:
            for param in (net.embed.weight, net.embed.bias):
                for value in engine.optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value[index] = 0
        st.nmi_at_last_split = st.best_nmi
        st.bad_epochs = -self.grace
        sizes = self._recluster(engine, epoch)
        return (f"split: {plateau}; {len(keep)} neurons above the {rule} form learner {st.k - 1}, "
                f"{len(reset)} re-initialised as learner {st.k}; K={st.k}; re-clustered: sizes {sizes}")
