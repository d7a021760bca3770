"""Batches drawn from one cluster at a time, m images per class, reproducible per (seed, epoch).

Divide-and-conquer metric learning trains learner c only on the data of cluster c, so every batch must come from
a single cluster; margin/triplet losses need positives, so each batch takes ``m_per_class`` images of each class it
draws. The order depends only on (seed, epoch, assignment), so a resumed run replays the same batches.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ClusterBatchSampler"]


class ClusterBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; all indices of a batch share one cluster.

    Args:
        labels: (N,) class of each item.
        assignment: callable returning the current (N,) cluster of each item (DSL/MML re-clustering changes it);
            None (a single learner, every bundle that is not DSL/MML): one cluster, i.e. class-balanced batches of
            ``m_per_class`` images per class over the whole training set.
        batch_size: images per batch.
        m_per_class: images of each drawn class (≥ 2 gives positives for margin/triplet losses).
        seed: base seed; call :meth:`set_epoch` each epoch (the trainer does).
    """

    def __init__(self, labels: Sequence[int], assignment: Callable[[], np.ndarray] | None = None, batch_size: int = 32,
                 m_per_class: int = 4, seed: int = 0):
        if batch_size < 2 or m_per_class < 1:
            raise ValueError(f"need batch_size >= 2 and m_per_class >= 1, got {batch_size}, {m_per_class}")
        self.labels = np.asarray(labels)
        self.assignment = assignment
        self.batch_size = batch_size
        self.m = m_per_class
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _quota(self, clusters: np.ndarray) -> dict[int, int]:
        """Batches per cluster: N // batch_size in all (a constant epoch length whatever the clustering), shared
        in proportion to cluster size by largest remainder, at least one per non-empty cluster."""
        total = max(1, len(self.labels) // self.batch_size)
        ids, sizes = np.unique(clusters, return_counts=True)
        share = sizes / sizes.sum() * total
        quota = np.maximum(1, np.floor(share).astype(int))
        for i in np.argsort(-(share - np.floor(share))):
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

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        clusters = self._clusters()
        batches: list[list[int]] = []
        for c, n_batches in self._quota(clusters).items():
            idx = np.flatnonzero(clusters == c)
            by_class = {lab: rng.permutation(idx[self.labels[idx] == lab]).tolist()
                        for lab in np.unique(self.labels[idx])}
            for _ in range(n_batches):
                batch: list[int] = []
                for lab in rng.permutation(list(by_class)):
                    if len(batch) >= self.batch_size:
                        break
                    pool = by_class[lab]
                    if len(pool) < self.m:  # refill from the class (in a fresh order) when it runs low
                        pool.extend(rng.permutation(idx[self.labels[idx] == lab]).tolist())
                    take = min(self.m, self.batch_size - len(batch))
                    batch.extend(int(i) for i in pool[:take])
                    del pool[:take]
                batches.append(batch)
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the batches are drawn on the first next(), i.e. after the trainer's EPOCH_STARTED
        # handler has called set_epoch, so a resumed run draws the same batches as the original
        yield from self._batches()

    def __len__(self) -> int:
        return int(sum(self._quota(self._clusters()).values()))
