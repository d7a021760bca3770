"""Subspace learners: which embedding neurons each learner owns, which data each learner sees, and how DSL grows K.

- **MML** (divide and conquer, Sanakoyeu et al., CVPR 2019): the D-dim embedding is cut into K equal slices; every
  few epochs the training data are clustered (k-means on the full embedding) into K groups and cluster c trains
  slice c only; a final phase fine-tunes the whole embedding on batches that mix all the data again.
- **DSL** (Dynamic Subspace Learners, MIDL 2022): start with K = 1 learner owning all neurons. When validation NMI
  has not improved for ``patience`` epochs, score the neurons of the exploring learner by
  s(e_i) = |mean over samples of ∂L/∂e_i · e_i| (Molchanov et al. 2017; the learner's own loss on class-mixed
  training batches, min–max scaled); the neurons above ``threshold`` become a learner of their own, the rest are
  re-initialised and keep exploring; K += 1 and the data are re-clustered into K groups. Splitting stops at ``max_k``, when too few neurons are left, or when a split did
  not improve validation NMI; then the whole embedding is fine-tuned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SubspaceState", "equal_slices", "neuron_scores", "split_learner", "cluster_counts", "match_clusters",
           "learner_normalized", "cluster_features", "CLUSTER_FEATURES"]

logger = logging.getLogger(__name__)


def equal_slices(dim: int, k: int) -> list[list[int]]:
    """K contiguous, near-equal neuron slices of a ``dim``-neuron embedding (MML)."""
    if not 1 <= k <= dim:
        raise ValueError(f"need 1 <= k <= embedding dim, got k={k}, dim={dim}")
    return [a.tolist() for a in np.array_split(np.arange(dim), k)]


@dataclass
class SubspaceState:
    """Learner → neuron sets, item → cluster assignment, and the DSL bookkeeping. Checkpointable."""

    learners: list[list[int]]
    assignment: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (N_train,) cluster id
    phase: str = "explore"  # "explore" (learners train on their clusters) | "finetune" (whole embedding, all data)
    best_nmi: float = -1.0
    bad_epochs: int = 0
    nmi_at_last_split: float | None = None
    splitting: bool = True
    failed_splits: int = 0  # plateaus at which the exploring learner could not be split (DSL retries)

    @property
    def k(self) -> int:
        return len(self.learners)

    def neurons_for_cluster(self, cluster: int, dim: int) -> list[int]:
        """The neurons a batch of ``cluster`` trains: its learner's, or all of them when fine-tuning."""
        if self.phase == "finetune" or self.k == 1:
            return list(range(dim))
        return self.learners[int(cluster) % self.k]

    def state_dict(self) -> dict[str, Any]:
        return {"learners": self.learners, "assignment": torch.as_tensor(self.assignment), "phase": self.phase,
                "best_nmi": self.best_nmi, "bad_epochs": self.bad_epochs, "nmi_at_last_split": self.nmi_at_last_split,
                "splitting": self.splitting, "failed_splits": self.failed_splits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learners = [list(map(int, ln)) for ln in state["learners"]]
        self.assignment = np.asarray(state["assignment"], dtype=np.int64)
        self.phase = state["phase"]
        self.best_nmi = float(state["best_nmi"])
        self.bad_epochs = int(state["bad_epochs"])
        self.nmi_at_last_split = state["nmi_at_last_split"]
        self.splitting = bool(state["splitting"])
        self.failed_splits = int(state.get("failed_splits", 0))  # checkpoints from before issue 12: none


def neuron_scores(network: torch.nn.Module, loader: Iterable[dict], loss_fn: Callable, device: torch.device | str,
                  *, max_batches: int | None = None, neurons: Sequence[int] | None = None) -> torch.Tensor:
    """s(e_i) = |mean over a pass of ∂L/∂e_i · e_i| for each embedding neuron i (D,), min–max scaled to [0, 1].

    The first-order Taylor estimate of the loss change when neuron i is removed (Molchanov et al., ICLR 2017),
    averaged over the samples *before* the absolute value, as the DSL authors' code does (it then L2-normalises
    and min–max scales; L2 first does not change a min–max scaling). Averaging |·| per sample instead (medsim
    before issue 12) tracks E[e_i²] for losses that ignore the embedding's length (Σ_i e_i g_i = 0 per sample),
    so one offset neuron wins.

    Args:
        loader: batches with ``image`` and ``label``; they must mix classes (a class-sorted pass gives batches of one
            class, i.e. no pairs and zero gradient) — the DSL bundle scores on class-balanced batches of the
            training items (:class:`~medsim.engines.sampling.ClusterBatchSampler` with one cluster).
        neurons: the learner being scored: the loss is that learner's own, on its slice of the embedding
            re-normalised (as :class:`~medsim.engines.trainer.SubspaceRoutingLoss` trains it); scores of the other
            neurons are 0 before scaling. None: the loss on the whole embedding.

    No optimiser step is made and parameter gradients are cleared afterwards. In a multi-process run
    (:mod:`medsim.engines.distributed`) each rank scores every world-size-th batch and the sums are all-reduced:
    the scores of one process that scored every batch. ``network`` must be the unwrapped module (not DDP).
    """
    from medsim.engines.distributed import all_reduce_sum, rank, world_size

    was_training = network.training
    network.eval()
    total, n = None, 0
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        if b % world_size() != rank():  # several processes: each scores its share of the batches, summed below
            continue
        x, y = batch["image"].to(device), torch.as_tensor(batch["label"]).to(device)
        out = network(x)
        raw = out["embedding"]
        raw.retain_grad()
        emb = raw if neurons is None else F.normalize(raw[:, list(neurons)], dim=1)
        loss = loss_fn(emb, y, out.get("logits"))
        if not loss.requires_grad:
            continue
        loss.backward()
        if raw.grad is None:
            continue
        contrib = (raw.grad * raw).detach().float().sum(0)  # ∂L/∂e_i · e_i, summed over the samples (signed)
        total = contrib if total is None else total + contrib
        n += raw.shape[0]
    network.zero_grad(set_to_none=True)
    network.train(was_training)
    if world_size() > 1:  # every rank takes part, with zeros when its share produced no gradient
        dev = next(network.parameters()).device  # NCCL reduces device tensors
        total = all_reduce_sum(torch.zeros(int(network.embedding_dim), device=dev) if total is None else total)
        n = int(all_reduce_sum(torch.tensor(float(n), device=dev)).item())
        total = None if n == 0 else total
    if total is None or n == 0:
        raise RuntimeError("no batch produced a loss with gradients: cannot score neurons")
    s = (total / n).abs()
    scored = torch.arange(len(s)) if neurons is None else torch.as_tensor(list(neurons))
    lo, hi = s[scored].min(), s[scored].max()
    out = torch.zeros_like(s)
    out[scored] = (s[scored] - lo) / (hi - lo).clamp_min(1e-12)
    return out


def split_learner(state: SubspaceState, scores: torch.Tensor, *, threshold: float = 0.5,
                  min_neurons: int = 8, quantile: float | None = None) -> tuple[list[int], list[int]] | None:
    """Split the exploring (last) learner: neurons whose score, min–max scaled within that learner, exceeds
    ``threshold`` stay as a learner of their own; the rest become the new exploring learner (the caller resets
    them). Returns (kept, reset) or ``None`` when either part would have fewer than ``min_neurons``.

    ``quantile`` (e.g. 0.5) replaces the fixed threshold by that quantile of the learner's scores, so the top
    ``1 − quantile`` of its neurons are kept. The paper only says "high-scoring neurons"; on trained margin-loss
    embeddings the scores are dominated by a handful of neurons (HAM10000: max 1.0, 99th percentile 0.40, median
    0.06 after min–max scaling, so 4 of 128 pass 0.2 and no split can form), which a rank-based cut does not mind.
    """
    free = torch.as_tensor(state.learners[-1])
    s = scores[free]
    s = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12)
    if quantile is not None:
        if not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
        threshold = float(torch.quantile(s.double(), float(quantile)))
    keep = free[s > threshold].tolist()
    reset = free[s <= threshold].tolist()
    if len(keep) < min_neurons or len(reset) < min_neurons:
        return None
    state.learners[-1] = sorted(keep)
    state.learners.append(sorted(reset))
    return keep, reset


def match_clusters(previous: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Relabel a fresh k-means clustering so each cluster keeps the learner whose data it overlaps most.

    k-means numbers its clusters arbitrarily, so without matching, consecutive re-clusterings hand learner c a
    different part of the data each time (measured on HAM10000: ~16 % of items kept their cluster). As in the
    reference divide-and-conquer code (Sanakoyeu et al. 2019), new clusters are matched to old ones by the
    Hungarian algorithm on the overlap counts. After a DSL split (``previous`` has k - 1 clusters) the unmatched
    new cluster gets the new learner's index k - 1.

    Args:
        previous: (N,) the last assignment (cluster ids < k).
        labels: (N,) the new k-means labels in [0, k).
        k: number of clusters now.

    Returns:
        (N,) ``labels`` renumbered.
    """
    from scipy.optimize import linear_sum_assignment

    previous, labels = np.asarray(previous, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if previous.shape != labels.shape or len(labels) == 0:
        return labels
    k_old = int(previous.max()) + 1
    overlap = np.zeros((k_old, k), dtype=np.int64)
    np.add.at(overlap, (previous, labels), 1)
    old_ids, new_ids = linear_sum_assignment(-overlap)  # maximise the items that stay with their learner
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[new_ids] = old_ids
    free = [c for c in range(k) if c not in set(old_ids.tolist())]
    for new in range(k):
        if mapping[new] < 0:
            mapping[new] = free.pop(0)
    return mapping[labels]


def cluster_counts(assignment: np.ndarray, k: int) -> list[int]:
    return np.bincount(np.asarray(assignment, dtype=np.int64), minlength=k).tolist()


def loader_outputs(network: torch.nn.Module, loader: Iterable[dict], device: torch.device | str,
                   keys: Sequence[str] = ("embedding",)) -> dict[str, np.ndarray]:
    """The network's outputs ``keys`` over a loader (eval mode, no gradients) plus ``label`` (N,) and ``index``
    (N,) item indices; ``embedding`` is L2-normalised; ``penultimate`` is the input of the network's ``embed``
    layer (the pooled, attended features, (N, F)); keys a network does not return are left out."""
    was_training = network.training
    network.eval()
    got: dict[str, list[torch.Tensor]] = {}
    pooled: list[torch.Tensor] = []
    embed = getattr(network, "embed", None)
    hook = (embed.register_forward_pre_hook(lambda _m, args: pooled.append(args[0].detach().float().cpu()))
            if "penultimate" in keys and isinstance(embed, torch.nn.Module) else None)
    try:
        with torch.no_grad():
            for batch in loader:
                out = network(batch["image"].to(device))
                for k in keys:
                    if k in out:
                        v = out[k].float()
                        got.setdefault(k, []).append((F.normalize(v, dim=1) if k == "embedding" else v).cpu())
                if pooled:
                    got.setdefault("penultimate", []).append(pooled.pop())
                got.setdefault("label", []).append(torch.as_tensor(batch["label"]).cpu())
                got.setdefault("index", []).append(torch.as_tensor(batch["index"]).cpu() if "index" in batch else
                                                   torch.arange(len(batch["label"])))
    finally:
        if hook is not None:
            hook.remove()
        network.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in got.items()}


def embed_loader(network: torch.nn.Module, loader: Iterable[dict], device: torch.device | str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings (N, D), labels (N,), item indices (N,)) of a loader, in eval mode without gradients."""
    out = loader_outputs(network, loader, device)
    return out["embedding"], out["label"], out["index"]


def learner_normalized(embedding: np.ndarray, learners: Sequence[Sequence[int]]) -> np.ndarray:
    """Each learner's slice of ``embedding`` (N, D) L2-normalised and weighted 1/√K, concatenated in the learners'
    order (N, Σ|learner|): every learner counts equally in a distance, whatever the raw scale of its neurons.

    After a DSL split the re-initialised neurons start with larger raw outputs than the trained ones (HAM10000:
    norm 0.98 vs 0.42), so one L2 norm over all D neurons lets the untrained learner dominate k-means.
    """
    parts = [embedding[:, list(ln)] for ln in learners]
    k = len(parts)
    return np.concatenate([p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) / np.sqrt(k)
                           for p in parts], axis=1).astype(np.float32)


#: what DSL/MML re-clustering runs k-means on (see :func:`cluster_features`)
CLUSTER_FEATURES = ("embedding", "learner", "penultimate")


def cluster_features(network: torch.nn.Module, loader: Iterable[dict], device: torch.device | str, kind: str,
                     learners: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The features k-means re-clusters the training items on, and their item indices (N,).

    ``kind``: ``"embedding"`` — the L2-normalised embedding (medsim before issue 12); ``"learner"`` — the embedding
    normalised per learner (:func:`learner_normalized`); ``"penultimate"`` — the pooled backbone features before the
    embedding layer, as the divide-and-conquer reference code clusters (``use_penultimate=True``), L2-normalised.
    """
    if kind not in CLUSTER_FEATURES:
        raise ValueError(f"cluster features must be one of {CLUSTER_FEATURES}, got {kind!r}")
    keys = ("embedding", "penultimate") if kind == "penultimate" else ("embedding",)
    out = loader_outputs(network, loader, device, keys)
    if kind == "penultimate":
        if "penultimate" not in out:
            raise ValueError("cluster features 'penultimate' need a network with an `embed` layer")
        feats = out["penultimate"]
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    elif kind == "learner":
        feats = learner_normalized(out["embedding"], learners)
    else:
        feats = out["embedding"]
    return np.ascontiguousarray(feats, dtype=np.float32), out["index"]
