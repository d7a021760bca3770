"""MONAI/ignite engine parts for metric learning with subspace learners (MML, DSL) and single-learner baselines.

- :class:`MetricLearningTrainer` — MONAI's ``SupervisedTrainer`` (its own iteration) wired for metric learning:
  :func:`metric_prepare_batch`, the :class:`SubspaceRoutingLoss` (each batch, drawn from one cluster, trains its
  learner's embedding subspace) and epoch/iteration handlers.
- :class:`PrecisionInferer` — bf16 autocast (AMX on CPU) and channels_last for the trainer's and the evaluators'
  forward passes; outputs come back in float32, so losses and metrics are computed in fp32.
- :class:`EmbeddingMetric` — an ignite metric for a MONAI ``SupervisedEvaluator``: NMI (key metric) or the full
  retrieval/clustering set on the validation embeddings.
- :class:`SubspaceHandler` — re-clustering every N epochs; DSL's split on a validation-NMI plateau; the final
  fine-tune phase. Logs every epoch: K, each learner's neurons, cluster sizes, and the reason for each split.
- :class:`Checkpointer` — atomic ``last.pt`` every epoch and ``best.pt`` on the best validation NMI (model,
  optimiser, loss parameters, learner assignment, RNG state, engine state); resumes a killed run.
- :class:`MetricsLogger` — one JSON line per epoch.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.engines import IterationEvents, SupervisedTrainer
from monai.inferers import Inferer
from monai.utils import look_up_option

from medsim.errors import MedsimError

from medsim.engines.runs import load_checkpoint
from medsim.engines.subspaces import (SubspaceState, cluster_counts, embed_loader, equal_slices, neuron_scores,
                                      split_learner)

__all__ = ["MetricLearningTrainer", "SubspaceRoutingLoss", "metric_prepare_batch", "PrecisionInferer",
           "EmbeddingMetric", "SubspaceHandler", "Checkpointer", "MetricsLogger", "RNGState", "atomic_torch_save"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`medsim.errors.atomic_path` (never half a file, no temp file left behind).

    Only plain data is saved (tensors, numbers, strings, lists, dicts: :func:`medsim.engines.runs.plain_state`),
    so the file loads weights-only (:func:`medsim.engines.runs.load_checkpoint`)."""
    from medsim.engines.runs import plain_state
    from medsim.errors import atomic_path

    with atomic_path(path) as tmp:
        torch.save(plain_state(obj), tmp)
    return Path(path)


class RNGState:
    """torch / numpy / python RNG states as a checkpointable object."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain values only (numpy's key array as a tensor), so checkpoints load with weights_only=True
        return {"torch": torch.get_rng_state(),
                "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                          float(gauss)],
                "python": random.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
        random.setstate(tuple(state["python"]) if isinstance(state["python"], list) else state["python"])


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

    Used as ``inferer`` of :class:`MetricLearningTrainer` and of MONAI's ``SupervisedEvaluator`` (one object in the
    bundle: ``train#inferer``), so training and validation run at the same precision.
    """

    def __init__(self, amp: bool = False, dtype: str | torch.dtype = "bfloat16", channels_last: bool = False):
        super().__init__()
        name = look_up_option(str(dtype).replace("torch.", ""), ("bfloat16", "float16"))
        self.amp, self.dtype, self.channels_last = bool(amp), getattr(torch, name), bool(channels_last)
        self._converted: set[tuple[int, torch.memory_format]] = set()

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.channels_last and inputs.ndim in (4, 5):
            fmt = torch.channels_last if inputs.ndim == 4 else torch.channels_last_3d
            if isinstance(network, torch.nn.Module) and (id(network), fmt) not in self._converted:
                network.to(memory_format=fmt)  # in place: the optimiser keeps the same Parameters
                self._converted.add((id(network), fmt))
            inputs = inputs.contiguous(memory_format=fmt)
        if not self.amp:
            return network(inputs, *args, **kwargs)
        with torch.autocast(inputs.device.type, dtype=self.dtype):
            out = network(inputs, *args, **kwargs)
        return _float32(out)

    def __repr__(self) -> str:
        return f"PrecisionInferer(amp={self.amp}, dtype={self.dtype}, channels_last={self.channels_last})"


def metric_prepare_batch(batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                         non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """MONAI ``prepare_batch`` for metric learning: ``(image, {"label", "index"})``.

    The target carries the batch's item indices next to the labels, so the routing loss
    (:class:`SubspaceRoutingLoss`) can look up the batch's cluster."""
    x = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
    y = torch.as_tensor(batchdata["label"]).to(device=device, non_blocking=non_blocking)
    index = batchdata.get("index")
    return x, {"label": y, "index": None if index is None else torch.as_tensor(index)}


class SubspaceRoutingLoss(torch.nn.Module):
    """The loss of subspace learners (MML, DSL; Sanakoyeu et al. 2019) as a MONAI loss object.

    Called as ``loss(outputs, target)`` with the network's output dict and :func:`metric_prepare_batch`'s target:
    each batch is drawn from one cluster (:class:`~medsim.engines.sampling.ClusterBatchSampler`; its first item's
    cluster in ``subspaces.assignment``), and ``routed`` sees only that cluster's learner's neurons, re-normalised.
    With one learner (or in the fine-tune phase) the embedding passes unchanged.

    ``routed`` is called as ``routed(embedding, labels, logits)``, or, when it has ``takes_outputs = True`` (losses of
    attention models: ABE divergence, gated-attention fusion, loss-based attention), as ``routed(outputs, labels)``
    with the whole output dict and the routed embedding under ``"embedding"``. A loss without a gradient (nothing to
    learn from the batch) is returned as a leaf that requires one, so the step changes nothing.
    """

    def __init__(self, routed: Callable[..., torch.Tensor], subspaces: SubspaceState):
        super().__init__()
        self.routed, self.subspaces = routed, subspaces

    def forward(self, outputs: Mapping[str, torch.Tensor], target: Mapping[str, Any]) -> torch.Tensor:
        y, index = target["label"], target.get("index")
        first = int(index[0]) if index is not None else 0
        asg = self.subspaces.assignment
        cluster = int(asg[first]) if len(asg) > first else 0
        emb = outputs["embedding"]
        neurons = self.subspaces.neurons_for_cluster(cluster, emb.shape[1])
        if len(neurons) < emb.shape[1]:
            emb = F.normalize(emb[:, neurons], dim=1)
        if getattr(self.routed, "takes_outputs", False):
            loss = self.routed({**outputs, "embedding": emb}, y)
        else:
            loss = self.routed(emb, y, outputs.get("logits"))
        return loss if loss.requires_grad else loss.detach().requires_grad_()


class MetricLearningTrainer(SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` set up for embedders; its iteration is MONAI's own (inferer, AMP, gradient
    accumulation, FORWARD/LOSS/BACKWARD events).

    What makes it metric learning is wiring: ``prepare_batch`` = :func:`metric_prepare_batch`, the loss wrapped in a
    :class:`SubspaceRoutingLoss` (each batch, drawn from one cluster, trains its cluster's learner), and handlers:
    a non-finite loss stops training before the backward pass; at each epoch start the batch sampler, a loss with
    ``set_epoch(epoch, max_epochs)`` (epoch from 0; weight schedules) and the augmentation are told the epoch; the
    epoch's losses are collected in ``epoch_loss`` for the subspace handler's record.

    The forward pass goes through ``inferer`` (a :class:`PrecisionInferer` for bf16 autocast / channels_last);
    the loss sees float32 outputs.

    Extra args:
        subspaces: the shared :class:`SubspaceState`.
        batch_sampler: its ``set_epoch`` is called at each epoch start (reproducible batches on resume).
        transform: the training augmentation, re-seeded from (seed, epoch) at each epoch start.
        amp, amp_kwargs, channels_last: without an ``inferer``, build ``PrecisionInferer(amp,
            amp_kwargs["dtype"] (default bfloat16), channels_last)``. MONAI's own AMP path (CUDA autocast + fp16
            ``GradScaler``) is not used.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Any, network: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, loss_function: Callable, *, subspaces: SubspaceState,
                 batch_sampler: Any = None, transform: Any = None, seed: int = 0, amp: bool = False,
                 amp_kwargs: Mapping[str, Any] | None = None, channels_last: bool = False, **kwargs: Any):
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("prepare_batch", metric_prepare_batch)
        kwargs.setdefault("optim_set_to_none", True)
        if kwargs.get("inferer") is None:
            kwargs["inferer"] = PrecisionInferer(amp, dtype=dict(amp_kwargs or {}).get("dtype", "bfloat16"),
                                                 channels_last=channels_last)
        elif amp or channels_last:
            raise ValueError(f"give either an inferer ({kwargs['inferer']!r}) or amp={amp}/channels_last="
                             f"{channels_last}, not both: set amp/channels_last on the PrecisionInferer")
        if not isinstance(loss_function, SubspaceRoutingLoss):
            loss_function = SubspaceRoutingLoss(loss_function, subspaces)
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, loss_function, **kwargs)
        self.subspaces = subspaces
        self.batch_sampler = batch_sampler
        self.transform = transform
        self.seed = seed
        self.epoch_loss: list[float] = []
        self.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        self.add_event_handler(IterationEvents.LOSS_COMPLETED, self._check_finite)
        self.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._collect_loss)

    def _epoch_started(self, engine: Engine) -> None:
        self.epoch_loss = []
        self.epoch_t0 = time.perf_counter()
        if self.batch_sampler is not None and hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(engine.state.epoch)
        loss = self.loss_function.routed
        if hasattr(loss, "set_epoch"):  # loss-weight schedules (Eq. 3 of gated attention, ramp-ups)
            loss.set_epoch(engine.state.epoch - 1, engine.state.max_epochs)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            # augmentation depends on (seed, epoch) only, so a resumed run augments exactly as the original
            self.transform.set_random_state(seed=(self.seed * 100_003 + engine.state.epoch) % 2**32)

    def _check_finite(self, engine: Engine) -> None:
        loss = engine.state.output["loss"].detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at epoch {engine.state.epoch}, iteration "
                                     f"{engine.state.iteration}: stopping (lower the learning rate?)")

    def _collect_loss(self, engine: Engine) -> None:
        # the output keeps the value, not the graph (handlers read float(output["loss"]))
        engine.state.output["loss"] = engine.state.output["loss"].detach()
        self.epoch_loss.append(float(engine.state.output["loss"]))


def _embedding_label_logits(o: Mapping[str, Any]) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    return o["pred"]["embedding"], o["label"], o["pred"].get("logits")


class EmbeddingMetric(Metric):
    """Retrieval/clustering metrics over all validation embeddings (ignite ``Metric`` for MONAI evaluators).

    ``mode="nmi"`` computes NMI (faiss k-means with the number of classes; the default model-selection metric),
    ``mode="all"`` returns a mapping ``{prefix + name: value}`` with NMI, AMI, R@1/2/4/8, MAP@R and P@1 — plus
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
        from medsim.metrics.retrieval import evaluate_embeddings, nmi_ami, usable_ks

        emb = torch.cat(self._emb).numpy()
        lab = torch.cat(self._lab).numpy()
        if self.mode == "nmi":
            return float(nmi_ami(emb, lab, seed=self.seed)["nmi"])
        res = evaluate_embeddings(emb, lab, ks=usable_ks(len(emb)), seed=self.seed)
        if self._logits:
            res.update(classification_metrics(lab, torch.cat(self._logits).numpy()))
        return {self.prefix + k: float(v) for k, v in res.items()}


class SubspaceHandler:
    """Drives learners and data assignment (attach to the trainer *after* the ValidationHandler).

    Args:
        mode: ``"dsl"`` (K grows from 1) or ``"mml"`` (fixed ``k``; ``k=1`` is plain single-learner training).
        validator: the evaluator whose ``val_nmi`` drives DSL (and, by default, model selection).
        cluster_loader: deterministic (no augmentation) loader over the training items, yielding ``index``.
        score_loader: loader for neuron scoring (defaults to ``cluster_loader``).
        loss_function: the training loss (for neuron scores).
        k: number of learners for MML.
        max_k, patience, threshold, min_neurons: DSL's split rule; ``quantile`` (optional) replaces the fixed
            threshold by a quantile of the exploring learner's scores (see :func:`split_learner`); ``grace``: extra
            epochs a fresh split gets before the plateau rule judges it (re-initialised neurons and a new
            clustering first cost validation NMI); ``reset_optimizer``: zero the optimiser's running moments
            (Adam's exp_avg / exp_avg_sq) of the re-initialised rows, so they do not inherit the old neurons'.
        recluster_every: epochs between re-clusterings (exploration phase).
        finetune_epochs: the last epochs train the whole embedding on all data.
        min_delta: smallest NMI gain that counts as an improvement.
        select_metric: the validation metric whose best epoch is written to ``best.pt`` (``val_nmi``; classifier
            models use e.g. ``val_balanced_accuracy``, which the evaluator's ``EmbeddingMetric(mode="all")``
            reports when the network has logits). Higher is better.
    """

    def __init__(self, validator: Engine, cluster_loader: Any, loss_function: Callable, *, mode: str = "dsl",
                 k: int = 1, max_k: int = 8, patience: int = 3, threshold: float = 0.5, min_neurons: int = 8,
                 recluster_every: int = 2, finetune_epochs: int = 2, min_delta: float = 1e-3,
                 score_loader: Any = None, score_batches: int | None = None, seed: int = 0,
                 select_metric: str = "val_nmi", quantile: float | None = None, grace: int = 0,
                 reset_optimizer: bool = False):
        if mode not in ("dsl", "mml"):
            raise ValueError(f"mode must be 'dsl' or 'mml', got mode={mode!r}")
        self.validator, self.cluster_loader, self.loss_function = validator, cluster_loader, loss_function
        self.score_loader = score_loader or cluster_loader
        self.mode, self.k, self.max_k, self.patience = mode, k, max_k, patience
        self.threshold, self.min_neurons, self.recluster_every = threshold, min_neurons, recluster_every
        self.finetune_epochs, self.min_delta, self.score_batches, self.seed = finetune_epochs, min_delta, \
            score_batches, seed
        self.select_metric = select_metric
        self.quantile = quantile
        if grace < 0:
            raise ValueError(f"grace must be >= 0 epochs, got {grace}")
        self.grace, self.reset_optimizer = int(grace), bool(reset_optimizer)

    def attach(self, engine: MetricLearningTrainer) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    # -- steps
    def _recluster(self, engine: MetricLearningTrainer, epoch: int) -> list[int]:
        from medsim.metrics.retrieval import kmeans

        st = engine.subspaces
        dataset = getattr(self.cluster_loader, "dataset", None)
        if st.k == 1 and dataset is not None:  # one cluster: nothing to embed (single learners, DSL before a split)
            st.assignment = np.zeros(len(dataset), dtype=np.int64)
            return cluster_counts(st.assignment, 1)
        emb, _, index = embed_loader(engine.network, self.cluster_loader, engine.state.device)
        n = int(index.max()) + 1
        asg = np.zeros(n, dtype=np.int64)
        if st.k > 1:
            labels, _ = kmeans(emb, st.k, seed=self.seed + epoch)
            asg[index] = labels
        st.assignment = asg
        return cluster_counts(asg, st.k)

    def started(self, engine: MetricLearningTrainer) -> None:
        st = engine.subspaces
        if st.history:  # resumed: the checkpoint restored learners and assignment
            return
        dim = engine.network.embedding_dim
        st.learners = equal_slices(dim, self.k) if self.mode == "mml" else [list(range(dim))]
        sizes = self._recluster(engine, 0)
        logger.info("start: %s with K=%d learners of %s neurons; clusters %s", self.mode, st.k,
                    [len(ln) for ln in st.learners], sizes)

    def epoch_completed(self, engine: MetricLearningTrainer) -> None:
        st = engine.subspaces
        epoch, max_epochs = engine.state.epoch, engine.state.max_epochs
        metrics = dict(self.validator.state.metrics) if self.validator.state is not None else {}
        nmi = float(metrics.get("val_nmi", float("nan")))
        rec: dict[str, Any] = {"epoch": epoch, "phase": st.phase, "K": st.k,
                               "loss": float(np.mean(engine.epoch_loss)) if engine.epoch_loss else None,
                               "learner_neurons": [len(ln) for ln in st.learners],
                               "cluster_sizes": cluster_counts(st.assignment, st.k) if st.phase == "explore"
                               else [int(len(st.assignment))],
                               **{k: round(float(v), 5) for k, v in metrics.items() if isinstance(v, (int, float))}}
        improved = nmi > st.best_nmi + self.min_delta
        if nmi > st.best_nmi:
            st.best_nmi = nmi
        st.bad_epochs = 0 if improved else st.bad_epochs + 1
        # model selection (best.pt): validation NMI by default; classifier bundles select on e.g. balanced accuracy
        sel = nmi if self.select_metric == "val_nmi" else float(metrics.get(self.select_metric, float("nan")))
        if self.select_metric != "val_nmi" and self.select_metric not in metrics:
            raise KeyError(f"select_metric '{self.select_metric}' is not among the validation metrics "
                           f"{sorted(metrics)}")
        rec["improved"] = bool(not np.isnan(sel) and sel >= st.best_selected)
        if rec["improved"]:
            st.best_selected = sel
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
                    why = "splitting stopped" if stopped else f"last {left} epoch{'s' if left > 1 else ''}"
                    events.append(f"final fine-tune of the whole embedding on all data ({why})")
        rec["events"] = events
        st.history.append(rec)
        for e in events:  # MetricsLogger's epoch line shows them at INFO
            logger.debug("epoch %d: %s", epoch, e)

    def _try_split(self, engine: MetricLearningTrainer, epoch: int) -> str:
        st = engine.subspaces
        plateau = f"val NMI has not improved for {st.bad_epochs} epochs (best {st.best_nmi:.4f})"
        if st.nmi_at_last_split is not None and st.best_nmi <= st.nmi_at_last_split + self.min_delta:
            st.splitting = False
            return (f"stop splitting: {plateau}, no better than before the last split "
                    f"({st.nmi_at_last_split:.4f})")
        if st.k >= self.max_k:
            st.splitting = False
            return f"stop splitting: {plateau} and K reached max_k={self.max_k}"
        scores = neuron_scores(engine.network, self.score_loader, self.loss_function, engine.state.device,
                               max_batches=self.score_batches)
        parts = split_learner(st, scores, threshold=self.threshold, min_neurons=self.min_neurons,
                              quantile=self.quantile)
        rule = f"threshold {self.threshold}" if self.quantile is None else f"score quantile {self.quantile}"
        if parts is None:
            st.splitting = False
            return (f"stop splitting: {plateau}, but the exploring learner's {len(st.learners[-1])} neurons "
                    f"cannot form two parts of >= {self.min_neurons} at {rule}")
        keep, reset = parts
        index = torch.as_tensor(reset, device=engine.network.embed.weight.device)
        engine.network.reset_neurons(index)
        if self.reset_optimizer:
            for param in (engine.network.embed.weight, engine.network.embed.bias):
                for value in engine.optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value[index] = 0
        st.nmi_at_last_split = st.best_nmi
        st.bad_epochs = -self.grace
        sizes = self._recluster(engine, epoch)
        return (f"split: {plateau}; {len(keep)} neurons above the {rule} form learner {st.k - 1}, "
                f"{len(reset)} re-initialised as learner {st.k}; K={st.k}; re-clustered: sizes {sizes}")


class Checkpointer:
    """Atomic checkpoints: ``last.pt`` at every epoch end, ``best.pt`` when the subspace handler's model-selection
    metric (validation NMI unless ``select_metric`` says otherwise) reaches its best.

    Holds the state of every object in ``objects`` (anything with ``state_dict``/``load_state_dict``) plus the
    engine's epoch/iteration. With ``resume=True`` a run whose ``last.pt`` exists continues from it.
    """

    def __init__(self, save_dir: str | os.PathLike, objects: Mapping[str, Any], *, resume: bool = True,
                 subspaces: SubspaceState | None = None):
        self.save_dir = Path(save_dir)
        self._record: dict[str, Any] | None = None
        self.objects = dict(objects)
        self.resume = resume
        self.subspaces = subspaces

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _payload(self, engine: Engine) -> dict[str, Any]:
        payload = {"engine": {"epoch": engine.state.epoch, "iteration": engine.state.iteration},
                   **{k: v.state_dict() for k, v in self.objects.items()}}
        if self._record is None and (self.save_dir / "run.json").is_file():
            from medsim.engines.runs import load_run_record

            self._record = load_run_record(self.save_dir)  # read once; checked like any run record
        if self._record is not None:  # the run record (network + eval preprocessing spec) travels along
            payload["run_record"] = self._record
        return payload

    def save(self, engine: Engine) -> None:
        payload = self._payload(engine)
        atomic_torch_save(payload, self.save_dir / "last.pt")
        hist = self.subspaces.history if self.subspaces is not None else []
        if hist and hist[-1].get("improved"):
            atomic_torch_save(payload, self.save_dir / "best.pt")

    def load(self, engine: Engine) -> None:
        path = self.save_dir / "last.pt"
        if not (self.resume and path.is_file()):
            return
        try:
            ckpt = load_checkpoint(path)
        except MedsimError as e:
            raise MedsimError(f"{e}; cannot resume from it — train into another --output directory, or delete it "
                              "to start over") from e
        try:
            for k, obj in self.objects.items():
                if k in ckpt:
                    obj.load_state_dict(ckpt[k])
            epoch, iteration = int(ckpt["engine"]["epoch"]), int(ckpt["engine"]["iteration"])
        except Exception as e:  # a checkpoint of another configuration, or without its engine record
            raise MedsimError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                              f"train into another --output directory, or delete it to start over") from e
        engine.state.epoch, engine.state.iteration = epoch, iteration
        max_epochs = getattr(engine.state, "max_epochs", None)
        if max_epochs is not None and engine.state.epoch >= max_epochs:
            logger.warning("%s is already complete: last.pt is at epoch %d and max_epochs is %d, so nothing is "
                           "trained and the test result is that of the existing best.pt. To start a new run, train "
                           "into a new folder (medsim train --output NEW_DIR; monai.bundle: --output_dir NEW_DIR) or "
                           "delete this one; to train on, raise max_epochs above %d.", self.save_dir,
                           engine.state.epoch, max_epochs, engine.state.epoch)
        else:
            logger.info("resumed from %s at epoch %d", path, engine.state.epoch)


class MetricsLogger:
    """One JSON line per epoch (``metrics.jsonl``): the subspace handler's record (K, learners, clusters,
    events/split reasons, loss, validation metrics)."""

    def __init__(self, path: str | os.PathLike, subspaces: SubspaceState, echo: bool = True):
        self.path = Path(path)
        self.subspaces = subspaces
        self.echo = echo

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.subspaces.history:
            return
        rec = self.subspaces.history[-1]
        if hasattr(engine, "epoch_t0"):  # wall time of the epoch: training, validation, re-clustering, splits
            rec["seconds"] = round(time.perf_counter() - engine.epoch_t0, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.echo:
            logger.info("epoch %d/%d  K=%d  loss %.4f  val NMI %.4f  R@1 %.4f%s", rec["epoch"],
                        engine.state.max_epochs, rec["K"], rec["loss"] or float("nan"),
                        rec.get("val_nmi", float("nan")), rec.get("val_R@1", float("nan")),
                        "".join(f"\n    {e}" for e in rec["events"]))
