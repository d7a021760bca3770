"""Embedding-quality metrics for metric learning: k-means NMI/AMI, Recall@K, MAP@R and Precision@1.

These are the numbers reported by the metric-learning papers medsim follows:

* **NMI** (and AMI) of a k-means clustering of the embeddings with ``k`` = number of classes, and
  **Recall@K** for ``K`` in (1, 2, 4, 8) — Song et al. 2016 ("Deep Metric Learning via Lifted Structured
  Feature Embedding"), Sanakoyeu et al. 2019 ("Divide and Conquer the Embedding Space for Metric Learning"),
  Dynamic Subspace Learners (DSL).
* **MAP@R** and **Precision@1** — Musgrave, Belongie & Lim 2020 ("A Metric Learning Reality Check"), computed
  with pytorch-metric-learning's :class:`~pytorch_metric_learning.utils.accuracy_calculator.AccuracyCalculator`.

:func:`kmeans` is also what the trainer uses to re-cluster the data (DSL / divide-and-conquer), so it is
deterministic for a given seed.

Inputs are numpy arrays or torch tensors (tensors are converted with ``.detach().cpu().numpy()``; this module
never imports torch itself — only :func:`map_at_r_precision_at_1` does, through pytorch-metric-learning).
Labels may be any hashable 1-D values (ints, strings); they are compared for equality only.

Threads: faiss' OpenMP thread count is process-global. By default these functions leave it alone (faiss uses
all cores). Pass ``threads=n`` to use ``n`` threads for one call; the previous setting is restored afterwards
(not thread-safe if other Python threads use faiss at the same time).
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Any, Iterator, Mapping, Sequence

import faiss
import numpy as np

__all__ = [
    "kmeans",
    "nmi_ami",
    "recall_at_k",
    "map_at_r_precision_at_1",
    "evaluate_embeddings",
    "metrics_table",
    "DEFAULT_KS",
    "usable_ks",
]

#: the Recall@K cut-offs of Song et al. 2016 and the papers that follow it
DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)
_METRICS = ("cosine", "euclidean")
#: k-means initialisations -> the faiss ClusteringInitMethod constant's name
_INITS = {"k-means++": "ClusteringInitMethod_KMEANS_PLUS_PLUS", "random": "ClusteringInitMethod_RANDOM"}


# --------------------------------------------------------------------------------------------- input checks


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy array from a numpy array / torch tensor / sequence (torch is only touched if already imported)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: cannot convert {type(x).__name__} to an array ({e})") from e


def _check_embeddings(x: Any, name: str = "embeddings") -> np.ndarray:
    """(N, D) C-contiguous float32, finite, N >= 1, D >= 1."""
    a = _to_numpy(x, name)
    if a.ndim != 2:
        raise ValueError(f"expected 2-D {name} (N, D), got shape {tuple(a.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected non-empty {name} (N >= 1, D >= 1), got shape {tuple(a.shape)}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
            or a.dtype == np.bool_):
        raise ValueError(f"expected numeric {name}, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))
        raise ValueError(f"{name} contain {len(bad)} non-finite value(s) (NaN/inf), first at row {int(bad[0, 0])}")
    return a


def _check_labels(y: Any, n: int, name: str = "labels", emb_name: str = "embeddings") -> np.ndarray:
    """1-D labels of length n, returned as int64 codes 0..C-1 (so equality is exact whatever the dtype)."""
    a = _to_numpy(y, name)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"expected 1-D {name} (N,), got shape {tuple(a.shape)}")
    if len(a) != n:
        raise ValueError(f"{name} and {emb_name} disagree on N: {len(a)} labels for {n} embeddings")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name} contain NaN/inf")
    return a


def _codes(*label_arrays: np.ndarray) -> list[np.ndarray]:
    """Encode several label arrays with one shared vocabulary -> int64 codes."""
    try:
        _, inv = np.unique(np.concatenate(label_arrays), return_inverse=True)
    except TypeError as e:  # mixed, unorderable types
        raise ValueError(f"labels must be mutually comparable values: {e}") from e
    inv = inv.astype(np.int64).ravel()
    out, start = [], 0
    for a in label_arrays:
        out.append(inv[start:start + len(a)])
        start += len(a)
    return out


def _check_ks(ks: int | Sequence[int], gallery_size: int) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    ks_t = tuple(ks)
    if not ks_t:
        raise ValueError("ks must contain at least one K, got ()")
    for k in ks_t:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"each K in ks must be a positive int, got {k!r} in ks={ks_t!r}")
    if max(ks_t) > gallery_size:
        raise ValueError(
            f"K={max(ks_t)} exceeds the gallery size {gallery_size} (ks={ks_t!r}); "
            "use smaller K or more samples")
    return tuple(int(k) for k in ks_t)


def _check_metric(metric: str) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    return metric


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero (similarity 0 to everything)."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(x / norms, dtype=np.float32)


@contextlib.contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set faiss' (process-global) OpenMP thread count; ``None`` leaves it alone."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


# --------------------------------------------------------------------------------------------------- k-means


def kmeans(
    x: Any,
    k: int,
    *,
    seed: int = 0,
    niter: int = 20,
    nredo: int = 1,
    spherical: bool = False,
    init: str = "k-means++",
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-means with :class:`faiss.Kmeans`: cluster ``x`` into ``k`` groups.

    Used for the NMI evaluation and for re-clustering the training data into ``k`` subspaces / learners
    (Sanakoyeu et al. 2019, "Divide and Conquer the Embedding Space for Metric Learning"; Dynamic Subspace
    Learners). Deterministic for a given ``seed`` (and thread count). With ``N > 256 k`` faiss trains on a
    seeded random subset of ``256 k`` points; every point is still assigned.

    Initialisation defaults to k-means++ (faiss' ``ClusteringInitMethod_KMEANS_PLUS_PLUS``, in faiss 1.15),
    not faiss' (and pytorch-metric-learning's ``FaissKMeans``) default of ``k`` uniformly drawn points: with
    random init and ``nredo=1``, perfectly separated classes often end in a local optimum (two seeds in one
    class), e.g. NMI ~0.5-0.9 instead of 1.0 on 4-20 well-separated blobs. ``init="random"`` reproduces the
    papers' faiss setup;
    on a faiss without k-means++ the call warns and falls back to random.

    Args:
        x: (N, D) embeddings, float32 (other numeric dtypes / torch tensors are converted).
        k: number of clusters, 1 <= k <= N. ``k == 1`` gives all-zero assignments and the mean as centroid.
        seed: faiss' random seed (initial centroids, subsampling).
        niter: Lloyd iterations per run.
        nredo: independent runs; the one with the lowest objective is kept.
        spherical: normalise the centroids after each iteration and assign by inner product (use on
            L2-normalised embeddings for cosine k-means).
        init: ``"k-means++"`` (default) or ``"random"``.
        threads: faiss OpenMP threads for this call only (restored afterwards); ``None``: faiss' default.

    Returns:
        ``(assignments, centroids)``: (N,) int64 cluster ids in ``[0, k)`` and (k, D) float32 centroids.

    Raises:
        ValueError: bad shape / non-finite values, ``k < 1`` or ``k > N``, bad ``niter`` / ``nredo`` / ``init``.
    """
    xs = _check_embeddings(x, "x")
    n, d = xs.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"k-means needs at least as many points as clusters: N={n} points, k={k} clusters")
    for nm, v in (("niter", niter), ("nredo", nredo)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {tuple(_INITS)}, got {init!r}")
    init_method = getattr(faiss, _INITS[init], None)
    if init_method is None:
        warnings.warn(f"faiss {getattr(faiss, '__version__', '?')} has no {init} initialisation; using random",
                      RuntimeWarning, stacklevel=2)
    if k == 1:  # nothing to optimise; faiss handles it too, this is exact and cheap
        c = xs.astype(np.float64).mean(axis=0, keepdims=True)
        norm = float(np.linalg.norm(c))
        if spherical and norm > 0:
            c = c / norm
        return np.zeros(n, dtype=np.int64), c.astype(np.float32)
    with _faiss_threads(threads):
        km = faiss.Kmeans(
            d, k, niter=int(niter), nredo=int(nredo), spherical=bool(spherical), seed=int(seed),
            verbose=False,
            # only silences faiss' "please provide at least 39*k points" warning: evaluation sets often have
            # ~10-60 images per class; the clustering itself is unchanged.
            min_points_per_centroid=1,
            **({} if init_method is None else {"init_method": init_method}),
        )
        km.train(xs)
        _, assignments = km.assign(xs)
    return assignments.astype(np.int64, copy=False), np.ascontiguousarray(km.centroids, dtype=np.float32)


def nmi_ami(
    embeddings: Any, labels: Any, *, seed: int = 0, init: str = "k-means++", threads: int | None = None
) -> dict[str, float]:
    """Normalised and adjusted mutual information between k-means clusters and the class labels.

    k-means (:func:`kmeans`, faiss) with ``k`` = number of distinct labels on the raw embeddings, then
    :func:`sklearn.metrics.normalized_mutual_info_score` (arithmetic normalisation, scikit-learn's default) and
    :func:`sklearn.metrics.adjusted_mutual_info_score`. The NMI protocol of Song et al. 2016 / Sanakoyeu et al.
    2019 (DSL reports the same); AMI corrects NMI for chance.

    Args:
        embeddings: (N, D). Normalise them yourself first if the model's embeddings live on the sphere.
        labels: (N,) class labels.
        seed: k-means seed.
        init: k-means initialisation, ``"k-means++"`` or ``"random"`` (see :func:`kmeans`).
        threads: faiss threads for this call (see module docstring).

    Returns:
        ``{"nmi": float, "ami": float}`` (full precision).
    """
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    x = _check_embeddings(embeddings)
    (y,) = _codes(_check_labels(labels, len(x)))
    k = int(y.max()) + 1
    assignments, _ = kmeans(x, k, seed=seed, init=init, threads=threads)
    return {
        "nmi": float(normalized_mutual_info_score(y, assignments)),
        "ami": float(adjusted_mutual_info_score(y, assignments)),
    }


# -------------------------------------------------------------------------------------------------- Recall@K


def _knn(
    query: np.ndarray, gallery: np.ndarray, k: int, metric: str, exclude_self: bool
) -> np.ndarray:
    """(Nq, k) gallery indices of the k nearest neighbours, best first (faiss exact search).

    With ``exclude_self`` (query set == gallery set) it searches k + 1 neighbours and removes each query's own
    *index* from its row (if the query is not among them, because exact duplicates / rounding put other items
    first, the last column is dropped instead). Duplicates of the query therefore stay in the result.
    """
    if metric == "cosine":
        query, gallery = _l2_normalize(query), _l2_normalize(gallery)
        index: faiss.Index = faiss.IndexFlatIP(query.shape[1])
    else:
        index = faiss.IndexFlatL2(query.shape[1])
    index.add(gallery)
    kk = k + 1 if exclude_self else k
    _, nn = index.search(query, kk)
    if (nn < 0).any():  # pragma: no cover - cannot happen for kk <= ntotal on a flat index
        raise RuntimeError("faiss returned fewer neighbours than requested")
    if not exclude_self:
        return nn
    is_self = nn == np.arange(len(query))[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    return nn[~is_self].reshape(len(query), k)


def recall_at_k(
    embeddings: Any,
    labels: Any,
    ks: int | Sequence[int] = DEFAULT_KS,
    *,
    metric: str = "cosine",
    gallery_embeddings: Any = None,
    gallery_labels: Any = None,
    threads: int | None = None,
) -> dict[str, float]:
    """Recall@K: the fraction of queries with at least one same-label item among their K nearest neighbours.

    The retrieval metric of Song et al. 2016 (reported by Sanakoyeu et al. 2019 and DSL as R@1/2/4/8). Exact
    search with faiss: ``IndexFlatIP`` on L2-normalised vectors for ``metric="cosine"``, ``IndexFlatL2`` for
    ``metric="euclidean"``. (pytorch-metric-learning has no Recall@K: its ``precision_at_1`` equals R@1 only.)

    * Leave-one-out (default, ``gallery_* = None``): every sample is a query against all *other* samples. The
      query is excluded by index, not by distance, so exact duplicates of it still count as neighbours.
    * Query / gallery (``gallery_embeddings`` and ``gallery_labels`` given): ``embeddings`` are the queries,
      searched in the gallery; nothing is excluded.

    Queries whose label has no other example in the gallery can never be hits and count as misses (unlike
    :func:`map_at_r_precision_at_1`, where pytorch-metric-learning drops them). Ties in distance are broken by
    faiss (normally the lower gallery index first).

    Args:
        embeddings: (N, D) query embeddings.
        labels: (N,) query labels.
        ks: the cut-offs K, each 1 <= K <= gallery size (N - 1 in leave-one-out mode).
        metric: ``"cosine"`` or ``"euclidean"``.
        gallery_embeddings: (M, D) gallery embeddings, or ``None`` for leave-one-out.
        gallery_labels: (M,) gallery labels (given together with ``gallery_embeddings``).
        threads: faiss threads for this call (see module docstring).

    Returns:
        ``{"R@1": float, "R@2": ..., ...}`` in the order of ``ks`` (full precision).
    """
    metric = _check_metric(metric)
    q = _check_embeddings(embeddings)
    ql = _check_labels(labels, len(q))
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("give both gallery_embeddings and gallery_labels, or neither "
                         f"(got gallery_embeddings={'None' if gallery_embeddings is None else 'array'}, "
                         f"gallery_labels={'None' if gallery_labels is None else 'array'})")
    if gallery_embeddings is None:
        g, exclude_self = q, True
        (qc,) = _codes(ql)
        gc = qc
        gallery_size = len(q) - 1
    else:
        g = _check_embeddings(gallery_embeddings, "gallery_embeddings")
        gl = _check_labels(gallery_labels, len(g), "gallery_labels", "gallery_embeddings")
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"embeddings and gallery_embeddings differ in dimension D: "
                             f"{q.shape[1]} vs {g.shape[1]}")
        qc, gc = _codes(ql, gl)
        exclude_self = False
        gallery_size = len(g)
    ks_t = _check_ks(ks, gallery_size)
    with _faiss_threads(threads):
        nn = _knn(q, g, max(ks_t), metric, exclude_self)
    hit = gc[nn] == qc[:, None]                    # (Nq, Kmax)
    first_hit_cum = np.cumsum(hit, axis=1) > 0     # (Nq, Kmax): a hit within the first j+1
    return {f"R@{k}": float(first_hit_cum[:, k - 1].mean()) for k in ks_t}


# ------------------------------------------------------------------------------------------- MAP@R and P@1


def map_at_r_precision_at_1(
    embeddings: Any, labels: Any, *, metric: str = "cosine"
) -> dict[str, float]:
    """MAP@R and Precision@1 (Musgrave et al. 2020, "A Metric Learning Reality Check"), leave-one-out.

    For each query, R = the number of *other* samples with its label; MAP@R = mean over queries of
    ``(1/R) * sum_{i=1..R} P(i) * rel(i)`` over its first R neighbours (P(i) = precision at rank i, rel(i) = 1 if
    the i-th neighbour has the query's label). Precision@1 = fraction of queries whose nearest other sample
    shares its label (= R@1 but for the convention below).

    Computed by pytorch-metric-learning's ``AccuracyCalculator(include=("mean_average_precision_at_r",
    "precision_at_1"), k="max_bin_count", device=cpu)`` with ``get_accuracy(query, query_labels)`` and no
    reference: that sets ``ref_includes_query=True``, so its FaissKNN searches k + 1 neighbours and removes each
    query's own index (duplicates are kept). Its k-NN is faiss ``IndexFlatL2``, so for ``metric="cosine"`` the
    embeddings are L2-normalised first (same ranking as cosine similarity).

    PML conventions: queries whose class has a single sample ("lone" queries) are *left out* of both averages;
    if every query is lone the values are NaN. Labels are passed as int codes (PML casts labels to float32).

    Args:
        embeddings: (N, D), N >= 2.
        labels: (N,).
        metric: ``"cosine"`` or ``"euclidean"``.

    Returns:
        ``{"map_at_r": float, "precision_at_1": float}`` (full precision; NaN if all classes are singletons).
    """
    metric = _check_metric(metric)
    x = _check_embeddings(embeddings)
    (y,) = _codes(_check_labels(labels, len(x)))
    if len(x) < 2:
        raise ValueError(f"MAP@R needs at least 2 embeddings, got N={len(x)}")
    if metric == "cosine":
        x = _l2_normalize(x)

    import logging

    import torch  # pytorch-metric-learning needs it anyway
    from pytorch_metric_learning.utils import common_functions as pml_common
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(
        include=("mean_average_precision_at_r", "precision_at_1"),
        k="max_bin_count",
        device=torch.device("cpu"),  # faiss-cpu; avoids moving everything to CUDA and back on GPU hosts
    )
    pml_logger = pml_common.LOGGER
    level = pml_logger.level
    if np.bincount(y).max() < 2:  # all lone: PML warns and returns NaN; keep the log quiet, result is NaN
        pml_logger.setLevel(logging.ERROR)
    try:
        acc = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    finally:
        pml_logger.setLevel(level)
    return {"map_at_r": float(acc["mean_average_precision_at_r"]),
            "precision_at_1": float(acc["precision_at_1"])}


# ------------------------------------------------------------------------------------------------- combined


def _round(v: Any, digits: int | None) -> Any:
    if digits is None or not isinstance(v, float) or math.isnan(v):
        return v
    return round(v, digits)


def usable_ks(n: int, ks: Sequence[int] = DEFAULT_KS) -> tuple[int, ...]:
    """The cut-offs of ``ks`` that a leave-one-out evaluation of ``n`` samples can report (K <= n - 1)."""
    return tuple(k for k in ks if k <= n - 1) or (1,)


def evaluate_embeddings(
    embeddings: Any,
    labels: Any,
    *,
    ks: int | Sequence[int] = DEFAULT_KS,
    seed: int = 0,
    metric: str = "cosine",
    digits: int | None = 4,
    threads: int | None = None,
) -> dict[str, float]:
    """All embedding metrics of one evaluation split (leave-one-out retrieval on the split itself).

    Args:
        embeddings: (N, D).
        labels: (N,).
        ks: Recall@K cut-offs (each <= N - 1).
        seed: k-means seed for NMI/AMI.
        metric: ``"cosine"`` or ``"euclidean"`` for Recall@K and MAP@R/P@1 (NMI/AMI cluster the raw embeddings).
        digits: round the returned floats to this many decimals (for JSON/logs; ``None`` keeps full precision).
            Everything is computed at full precision.
        threads: faiss threads for this call (see module docstring).

    Returns:
        ``{"nmi", "ami", "R@1", ..., "map_at_r", "precision_at_1"}`` -> float.
    """
    x = _check_embeddings(embeddings)
    y = _check_labels(labels, len(x))
    out: dict[str, float] = {}
    out.update(nmi_ami(x, y, seed=seed, threads=threads))
    out.update(recall_at_k(x, y, ks, metric=metric, threads=threads))
    with _faiss_threads(threads):
        out.update(map_at_r_precision_at_1(x, y, metric=metric))
    return {k: _round(v, digits) for k, v in out.items()}


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{float(v):.4f}"
    return str(v).replace("|", "\\|")


def metrics_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of several runs: one row per run name, one column per metric.

    Columns are the union of the metric names in first-seen order; a metric a run lacks is left blank.
    Floats are shown with 4 decimals.

    Args:
        results: ``{run_name: {metric: value}}``, e.g. ``{"dsl-k4": evaluate_embeddings(...)}``.

    Returns:
        The table as a string (header, separator, rows), no trailing newline.
    """
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a mapping {{run name: {{metric: value}}}}, got {type(results).__name__}")
    columns: list[str] = []
    for name, row in results.items():
        if not isinstance(row, Mapping):
            raise ValueError(f"results[{name!r}] must be a mapping {{metric: value}}, got {type(row).__name__}")
        for c in row:
            if c not in columns:
                columns.append(c)
    header = ["run", *map(_fmt, columns)]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for name, row in results.items():
        cells = [_fmt(name)] + [_fmt(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
