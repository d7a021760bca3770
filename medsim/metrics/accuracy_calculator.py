"""pytorch-metric-learning's ``AccuracyCalculator`` with the metrics medsim reports added: Recall@K and seeded,
k-means++ NMI/AMI next to PML's own MAP@R and Precision@1.

PML adds a metric as a ``calculate_<name>`` method plus its name in :meth:`requires_knn` (or
:meth:`requires_clustering`); k-NN search and clustering are pluggable (``knn_func``, ``kmeans_func``). So
:class:`EmbeddingAccuracyCalculator` only adds ``recall_at_<K>`` for each ``K`` of ``ks`` and plugs in

* :class:`FlatKNN`: exact faiss search, ``IndexFlatIP`` on L2-normalised rows for ``metric="cosine"``,
  ``IndexFlatL2`` for ``"euclidean"`` (PML's ``FaissKNN`` removes each query's own *index* in leave-one-out mode,
  so exact duplicates of a query still count as neighbours);
* :class:`SeededKMeans`: :func:`medsim.metrics.retrieval.kmeans` (faiss, k-means++ init, fixed seed), so NMI is
  deterministic and equals the clustering the DSL trainer uses; PML's ``calculate_NMI``/``calculate_AMI``
  (scikit-learn's scores) do the rest.

Inputs are checked once, in :meth:`EmbeddingAccuracyCalculator.get_accuracy` (shapes, NaN/inf, label counts,
with errors that name the bad value), and labels of any comparable type are encoded to int codes (PML itself
casts labels to float). Conventions: Recall@K counts a query whose label has no other example in the reference
set as a miss; PML's MAP@R and Precision@1 leave such "lone" queries out (NaN if all are lone).

The torch-free functions in :mod:`medsim.metrics.retrieval` (``evaluate_embeddings``, ``recall_at_k``, ...)
are thin wrappers over this class; this module imports torch and pytorch-metric-learning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterator, Sequence

import faiss
import numpy as np
import torch
from pytorch_metric_learning.utils import accuracy_calculator as pml_accuracy
from pytorch_metric_learning.utils import common_functions as pml_common
from pytorch_metric_learning.utils.inference import FaissKNN

from medsim.metrics.retrieval import DEFAULT_KS, check_inputs, check_ks, check_metric, kmeans, l2_normalize

__all__ = ["EmbeddingAccuracyCalculator", "FlatKNN", "SeededKMeans"]


def _l2_normalized(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(l2_normalize(t.detach().cpu().float().numpy())).to(t.device)


class FlatKNN(FaissKNN):
    """Exact faiss k-NN for PML: cosine = inner product of L2-normalised rows (all-zero rows stay zero)."""

    def __init__(self, metric: str = "cosine"):
        self.metric = check_metric(metric)
        super().__init__(index_init_fn=faiss.IndexFlatIP if self.metric == "cosine" else faiss.IndexFlatL2)

    def __call__(self, query: torch.Tensor, k: int, reference: torch.Tensor | None = None,
                 ref_includes_query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.metric == "cosine":
            query = _l2_normalized(query)
            reference = None if reference is None else _l2_normalized(reference)
        return super().__call__(query, k, reference, ref_includes_query)


class SeededKMeans:
    """PML ``kmeans_func``: :func:`medsim.metrics.retrieval.kmeans` with a fixed seed and initialisation."""

    def __init__(self, seed: int = 0, init: str = "k-means++", niter: int = 20):
        self.seed, self.init, self.niter = seed, init, niter

    def __call__(self, x: torch.Tensor, num_clusters: int) -> torch.Tensor:
        assignments, _ = kmeans(x.detach().cpu().numpy(), num_clusters, seed=self.seed, init=self.init,
                                niter=self.niter)
        return torch.from_numpy(assignments).to(x.device)


@contextlib.contextmanager
def _quiet_pml(quiet: bool) -> Iterator[None]:
    """Silence PML's "None of the query labels are in the reference set" when every query is lone (the
    documented result is 0 for Recall@K and NaN for MAP@R / P@1)."""
    level = pml_common.LOGGER.level
    if quiet:
        pml_common.LOGGER.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pml_common.LOGGER.setLevel(level)


class EmbeddingAccuracyCalculator(pml_accuracy.AccuracyCalculator):
    """PML's ``AccuracyCalculator`` plus ``recall_at_<K>`` metrics, seeded faiss k-means and exact faiss k-NN.

    Metric names: PML's (``NMI``, ``AMI``, ``precision_at_1``, ``mean_average_precision_at_r``, ...) and
    ``recall_at_<K>`` for each K in ``ks`` (Song et al. 2016: the fraction of queries with at least one
    same-label item among their K nearest neighbours; reported by DSL as R@1/2/4/8).

    Args:
        ks: the Recall@K cut-offs (positive ints; ``()`` for none).
        metric: ``"cosine"`` or ``"euclidean"``, for the default ``knn_func`` (:class:`FlatKNN`).
        seed: k-means seed for NMI/AMI (default ``kmeans_func``, :class:`SeededKMeans`).
        kmeans_init: ``"k-means++"`` (default) or ``"random"`` (see :func:`medsim.metrics.retrieval.kmeans`).
        k: neighbours searched, as in PML (default ``"max_bin_count"``, which MAP@R needs); raised to
            ``max(ks)`` when Recall@K is computed.
        device: where PML puts the tensors (default CPU: faiss-cpu search, no round trip through CUDA).
        **kwargs: the rest of PML's arguments (``include``, ``exclude``, ``avg_of_avgs``, ``knn_func``, ...).

    Example:
        >>> calc = EmbeddingAccuracyCalculator(ks=(1, 4), include=("NMI", "recall_at_1", "recall_at_4"))
        >>> calc.get_accuracy(embeddings, labels)  # leave-one-out: {"NMI": ..., "recall_at_1": ..., ...}
    """

    def __init__(self, ks: int | Sequence[int] = DEFAULT_KS, *, metric: str = "cosine", seed: int = 0,
                 kmeans_init: str = "k-means++", k: int | str | None = "max_bin_count",
                 device: torch.device | None = None, knn_func: Any = None, kmeans_func: Any = None,
                 **kwargs: Any):
        empty = isinstance(ks, (tuple, list)) and len(ks) == 0
        self.ks = () if empty else tuple(dict.fromkeys(check_ks(ks)))
        for kk in self.ks:  # PML collects every ``calculate_*`` attribute (dir() sees instance attributes)
            setattr(self, f"calculate_recall_at_{kk}", functools.partial(self._recall_at, kk))
        super().__init__(
            k=k,
            device=torch.device("cpu") if device is None else device,
            knn_func=FlatKNN(metric) if knn_func is None else knn_func,
            kmeans_func=SeededKMeans(seed, kmeans_init) if kmeans_func is None else kmeans_func,
            **kwargs,
        )

    def requires_knn(self) -> list[str]:
        return super().requires_knn() + [f"recall_at_{kk}" for kk in self.ks]

    def _recall_at(self, kk: int, knn_labels: torch.Tensor, query_labels: torch.Tensor, **kwargs: Any) -> Any:
        """Recall@K over all queries (a lone query is a miss)."""
        query_labels = query_labels[:, None]
        hit = torch.any(self.label_comparison_fn(query_labels, knn_labels[:, :kk]), dim=1)
        return pml_accuracy.maybe_get_avg_of_avgs(hit.double(), query_labels, self.avg_of_avgs,
                                                  self.return_per_class)

    def determine_k(self, bin_counts: torch.Tensor, num_reference_embeddings: int,
                    ref_includes_query: bool) -> int:
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        recall_ks = [kk for kk in self.ks if f"recall_at_{kk}" in self.get_curr_metrics()]
        if recall_ks:
            check_ks(recall_ks, num_reference_embeddings - int(ref_includes_query))
            k = max(k, *recall_ks)
        return k

    def get_accuracy(self, query: Any, query_labels: Any, reference: Any = None, reference_labels: Any = None,
                     ref_includes_query: bool = False, include: Sequence[str] = (),
                     exclude: Sequence[str] = ()) -> dict[str, Any]:
        """PML's ``get_accuracy`` on checked inputs (numpy arrays or tensors; labels of any comparable type).

        Without ``reference`` every query is searched against the other queries (leave-one-out).
        """
        q, qc, g, gc = check_inputs(query, query_labels, reference, reference_labels,
                                    names=("query", "query_labels", "reference", "reference_labels"))
        if g is None:
            all_lone = np.bincount(qc).max() < 2
        else:
            all_lone = not np.isin(qc, gc).any()
        with _quiet_pml(bool(all_lone)):
            return super().get_accuracy(
                torch.from_numpy(q), torch.from_numpy(qc),
                None if g is None else torch.from_numpy(g), None if gc is None else torch.from_numpy(gc),
                ref_includes_query, include=tuple(include), exclude=tuple(exclude))
