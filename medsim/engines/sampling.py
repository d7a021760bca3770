"""Batches drawn from one cluster at a time, m images per class, a fixed batch size, reproducible per (seed, epoch).

Divide-and-conquer metric learning (Sanakoyeu et al., CVPR 2019; DSL, MIDL 2022) trains learner c only on the data
of cluster c, so every batch comes from a single cluster; margin/triplet losses need positives, so each batch takes
``m_per_class`` images of each class it draws. As in the divide-and-conquer reference sampler, a batch always holds
``batch_size`` images: ``batch_size / m`` classes are drawn (with replacement when the cluster holds fewer classes),
and a class smaller than ``m`` is drawn with replacement. A class with a single image in a cluster gives no positive
pair, so it is not drawn there (the reference code takes such images out of the cluster too) unless the cluster has
no other class. The order depends only on (seed, epoch, assignment), so a resumed run replays the same batches.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ClusterBatchSampler", "ShuffleBatchSampler", "BATCH_SHARES"]

#: how the epoch's batches are shared between clusters (``batches_per_cluster`` may also be an int)
BATCH_SHARES = ("proportional", "equal")


class ClusterBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; all indices of a batch share one cluster; every batch has ``batch_size``.

    Args:
        labels: (N,) class of each item.
        assignment: callable returning the current (N,) cluster of each item (DSL/MML re-clustering changes it);
            None (a single learner, every bundle that is not DSL/MML): one cluster, i.e. class-balanced batches of
            ``m_per_class`` images per class over the whole training set.
        batch_size: images per batch (always; classes and images are drawn with replacement when needed).
        m_per_class: images of each drawn class (≥ 2 gives positives for margin/triplet losses).
        seed: base seed; call :meth:`set_epoch` each epoch (the trainer does).
        batches_per_cluster: ``"proportional"`` (N // batch_size batches per epoch, shared by cluster size — a
            small cluster's learner gets few updates), ``"equal"`` (the same N // batch_size batches shared
            equally, so every learner gets the same number of updates whatever its cluster's size), or an int
            (that many batches for every cluster, K × int per epoch).
    """

    def __init__(self, labels: Sequence[int], assignment: Callable[[], np.ndarray] | None = None, batch_size: int = 32,
                 m_per_class: int = 4, seed: int = 0, batches_per_cluster: str | int = "proportional"):
        if batch_size < 2 or m_per_class < 1:
            raise ValueError(f"need batch_size >= 2 and m_per_class >= 1, got {batch_size}, {m_per_class}")
        if isinstance(batches_per_cluster, str):
            if batches_per_cluster not in BATCH_SHARES:
                raise ValueError(f"batches_per_cluster must be one of {BATCH_SHARES} or a positive int, "
                                 f"got {batches_per_cluster!r}")
        elif int(batches_per_cluster) < 1:
            raise ValueError(f"batches_per_cluster must be >= 1, got {batches_per_cluster}")
        self.labels = np.asarray(labels)
        self.assignment = assignment
        self.batch_size = batch_size
        self.m = m_per_class
        self.seed = seed
        self.batches_per_cluster = batches_per_cluster
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _quota(self, clusters: np.ndarray) -> dict[int, int]:
        """Batches per non-empty cluster (see ``batches_per_cluster``); at least one each."""
        ids, sizes = np.unique(clusters, return_counts=True)
        if not isinstance(self.batches_per_cluster, str):
            return {int(c): int(self.batches_per_cluster) for c in ids}
        total = max(1, len(self.labels) // self.batch_size)
        weights = sizes if self.batches_per_cluster == "proportional" else np.ones_like(sizes)
        share = weights / weights.sum() * total
        quota = np.maximum(1, np.floor(share).astype(int))
        for i in np.argsort(-(share - np.floor(share)), kind="stable"):  # largest remainder
            if quota.sum() >= total:
                break
            quota[i] += 1
        while quota.sum() > total and (quota > 1).any():
            quota[np.argmax(quota)] -= 1
        return {int(c): int(q) for c, q in zip(ids, quota)}

    def _clusters(self) -> np.ndarray:
        if self.assignment is None:
            return np.zeros(self.labels.shape, dtype=np.int64)
        clusters = np.asarray(self.assignment())
        return clusters if clusters.shape == self.labels.shape else np.zeros(self.labels.shape, dtype=np.int64)

    def _cluster_batches(self, idx: np.ndarray, n_batches: int, rng: np.random.Generator) -> list[list[int]]:
        """``n_batches`` batches of ``batch_size`` from the items ``idx`` of one cluster."""
        members = {int(lab): idx[self.labels[idx] == lab] for lab in np.unique(self.labels[idx])}
        classes = [lab for lab, items in members.items() if len(items) >= 2] or list(members)
        queues: dict[int, list[int]] = {lab: [] for lab in classes}
        n_classes = -(-self.batch_size // self.m)
        batches = []
        for _ in range(n_batches):
            drawn = rng.choice(classes, size=n_classes, replace=len(classes) < n_classes)
            batch: list[int] = []
            for lab in drawn:
                items, queue = members[int(lab)], queues[int(lab)]
                if len(items) < self.m:  # too few images for m distinct ones: with replacement
                    batch.extend(int(i) for i in rng.choice(items, size=self.m, replace=True))
                    continue
                if len(queue) < self.m:  # refill the class's queue in a fresh order (every image once per pass)
                    queue.extend(rng.permutation(items).tolist())
                batch.extend(int(i) for i in queue[:self.m])
                del queue[:self.m]
            batches.append(batch[:self.batch_size])
        return batches

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        clusters = self._clusters()
        batches: list[list[int]] = []
        for c, n_batches in self._quota(clusters).items():
            batches += self._cluster_batches(np.flatnonzero(clusters == c), n_batches, rng)
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the batches are drawn on the first next(), i.e. after the trainer's EPOCH_STARTED
        # handler has called set_epoch, so a resumed run draws the same batches as the original
        yield from self._batches()

    def __len__(self) -> int:
        return int(sum(self._quota(self._clusters()).values()))


class ShuffleBatchSampler(Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` dataset indices, drawn from (``seed``, epoch) only — the label-free
    bundles' sampler when several processes train (each takes its slice of every batch:
    :class:`~medsim.engines.distributed.RankBatchSampler`), where a DataLoader's ``shuffle=True`` would draw from
    each process's own RNG. A resumed run draws the same batches.

    Args:
        n: dataset size.
        batch_size: items per batch (the last incomplete batch is dropped).
        seed: base seed; :meth:`set_epoch` each epoch (the trainer's hooks do).
        num_samples: items per epoch (default ``n``); with ``replacement`` drawn independently (like
            ``torch.utils.data.RandomSampler(replacement=True, num_samples=...)``), otherwise a permutation.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, num_samples: int | None = None,
                 replacement: bool = False):
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.num_samples = int(num_samples) if num_samples is not None else self.n
        if not replacement and self.num_samples > self.n:
            raise ValueError(f"num_samples={self.num_samples} > n={self.n} needs replacement=True")
        self.replacement = bool(replacement)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        idx = (rng.integers(0, self.n, size=self.num_samples) if self.replacement
               else rng.permutation(self.n)[: self.num_samples])
        for b in range(len(self)):
            yield [int(i) for i in idx[b * self.batch_size:(b + 1) * self.batch_size]]

    def __len__(self) -> int:
        return self.num_samples // self.batch_size
