"""Embedding-quality metrics for metric learning: k-means NMI/AMI, Recall@K, MAP@R and Precision@1.

These are the numbers reported by the metric-learning papers medsim follows:

* **NMI** (and AMI) of a k-means clustering of the embeddings with ``k`` = number of classes, and
  **Recall@K** for ``K`` in (1, 2, 4, 8) — Song et al. 2016 ("Deep Metric Learning via Lifted Structured
  Feature Embedding"), Sanakoyeu et al. 2019 ("Divide and Conquer the Embedding Space for Metric Learning"),
  Dynamic Subspace Learners (DSL).
* **MAP@R** and **Precision@1** — Musgrave, Belongie & Lim 2020 ("A Metric Learning Reality Check").

All of them are computed by one pytorch-metric-learning ``AccuracyCalculator`` subclass,
:class:`medsim.metrics.accuracy_calculator.EmbeddingAccuracyCalculator` (PML's NMI/AMI/MAP@R/P@1 plus
Recall@K, with faiss k-NN and this module's seeded :func:`kmeans`); the functions here check their inputs and
call it, so :func:`evaluate_embeddings` runs one k-NN search and one clustering.

:func:`kmeans` is also what the trainer uses to re-cluster the data (DSL / divide-and-conquer), so it is
deterministic for a given seed.

Inputs are numpy arrays or torch tensors (tensors are converted with ``.detach().cpu().numpy()``). Importing
this module does not import torch; the metric functions do, through pytorch-metric-learning (``kmeans`` and
:func:`metrics_table` never do). Labels may be any hashable 1-D values (ints, strings); they are compared for
equality only.

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
    "class_balanced_retrieval",
    "kmeans",
    "nmi_ami",
    "recall_at_k",
    "map_at_r_precision_at_1",
    "evaluate_embeddings",
    "metrics_table",
    "DEFAULT_KS",
    "usable_ks",
    "check_inputs",
    "check_ks",
    "check_metric",
    "l2_normalize",
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


def check_inputs(
    embeddings: Any,
    labels: Any,
    gallery_embeddings: Any = None,
    gallery_labels: Any = None,
    *,
    names: tuple[str, str, str, str] = ("embeddings", "labels", "gallery_embeddings", "gallery_labels"),
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Checked queries (and gallery): ``(q, q_codes, g, g_codes)``, ``g = g_codes = None`` without a gallery.

    Embeddings become (N, D) C-contiguous finite float32; labels become int64 codes of one shared vocabulary.
    ``names`` are the argument names the error messages use.
    """
    qn, qln, gn, gln = names
    q = _check_embeddings(embeddings, qn)
    ql = _check_labels(labels, len(q), qln, qn)
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError(f"give both {gn} and {gln}, or neither "
                         f"(got {gn}={'None' if gallery_embeddings is None else 'array'}, "
                         f"{gln}={'None' if gallery_labels is None else 'array'})")
    if gallery_embeddings is None:
        (qc,) = _codes(ql)
        return q, qc, None, None
    g = _check_embeddings(gallery_embeddings, gn)
    gl = _check_labels(gallery_labels, len(g), gln, gn)
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"{qn} and {gn} differ in dimension D: {q.shape[1]} vs {g.shape[1]}")
    qc, gc = _codes(ql, gl)
    return q, qc, g, gc


def check_ks(ks: int | Sequence[int], gallery_size: int | None = None) -> tuple[int, ...]:
    """Recall@K cut-offs as a tuple of positive ints, each <= ``gallery_size`` (if given)."""
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    ks_t = tuple(ks)
    if not ks_t:
        raise ValueError("ks must contain at least one K, got ()")
    for k in ks_t:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"each K in ks must be a positive int, got {k!r} in ks={ks_t!r}")
    if gallery_size is not None and max(ks_t) > gallery_size:
        raise ValueError(
            f"K={max(ks_t)} exceeds the gallery size {gallery_size} (ks={ks_t!r}); "
            "use smaller K or more samples")
    return tuple(int(k) for k in ks_t)


def check_metric(metric: str) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    return metric


def l2_normalize(x: np.ndarray) -> np.ndarray:
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
    x, y, _, _ = check_inputs(embeddings, labels)
    return _accuracy(x, y, ("NMI", "AMI"), threads=threads, ks=(), seed=seed, kmeans_init=init)


# -------------------------------------------------------------------------- the PML AccuracyCalculator subclass

#: PML metric name -> the key medsim reports (``recall_at_<K>`` -> ``R@<K>``)
_KEYS = {"NMI": "nmi", "AMI": "ami", "mean_average_precision_at_r": "map_at_r", "precision_at_1": "precision_at_1"}


def _accuracy(
    q: np.ndarray,
    qc: np.ndarray,
    include: Sequence[str],
    g: np.ndarray | None = None,
    gc: np.ndarray | None = None,
    *,
    threads: int | None = None,
    **calculator_kwargs: Any,
) -> dict[str, float]:
    """Run :class:`~medsim.metrics.accuracy_calculator.EmbeddingAccuracyCalculator` on checked inputs.

    Leave-one-out without a gallery. Returns the metrics of ``include`` in that order under medsim's keys.
    """
    from medsim.metrics.accuracy_calculator import EmbeddingAccuracyCalculator  # imports torch

    calc = EmbeddingAccuracyCalculator(include=tuple(dict.fromkeys(include)), **calculator_kwargs)
    with _faiss_threads(threads):
        acc = calc.get_accuracy(q, qc, g, gc)
    return {_KEYS.get(m, m.replace("recall_at_", "R@")): float(acc[m]) for m in include}


# -------------------------------------------------------------------------------------------------- Recall@K


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
    ``metric="euclidean"``. (pytorch-metric-learning has no Recall@K: its ``precision_at_1`` equals R@1 only;
    :class:`~medsim.metrics.accuracy_calculator.EmbeddingAccuracyCalculator` adds it as ``recall_at_<K>``.)

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
    metric = check_metric(metric)
    q, qc, g, gc = check_inputs(embeddings, labels, gallery_embeddings, gallery_labels)
    ks_t = check_ks(ks, len(q) - 1 if g is None else len(g))
    return _accuracy(q, qc, [f"recall_at_{k}" for k in ks_t], g, gc, threads=threads, ks=ks_t, metric=metric,
                     k=max(ks_t))


# ------------------------------------------------------------------------------------------- MAP@R and P@1


def map_at_r_precision_at_1(
    embeddings: Any, labels: Any, *, metric: str = "cosine"
) -> dict[str, float]:
    """MAP@R and Precision@1 (Musgrave et al. 2020, "A Metric Learning Reality Check"), leave-one-out.

    For each query, R = the number of *other* samples with its label; MAP@R = mean over queries of
    ``(1/R) * sum_{i=1..R} P(i) * rel(i)`` over its first R neighbours (P(i) = precision at rank i, rel(i) = 1 if
    the i-th neighbour has the query's label). Precision@1 = fraction of queries whose nearest other sample
    shares its label (= R@1 but for the convention below).

    Computed by pytorch-metric-learning's ``AccuracyCalculator`` (through
    :class:`~medsim.metrics.accuracy_calculator.EmbeddingAccuracyCalculator`, ``k="max_bin_count"``, CPU) with
    ``get_accuracy(query, query_labels)`` and no reference: that sets ``ref_includes_query=True``, so its
    FaissKNN searches k + 1 neighbours and removes each query's own index (duplicates are kept). The k-NN is
    exact faiss search: ``IndexFlatIP`` on L2-normalised embeddings for ``metric="cosine"``, ``IndexFlatL2`` for
    ``"euclidean"``.

    PML conventions: queries whose class has a single sample ("lone" queries) are *left out* of both averages;
    if every query is lone the values are NaN. Labels are passed as int codes (PML casts labels to float32).

    Args:
        embeddings: (N, D), N >= 2.
        labels: (N,).
        metric: ``"cosine"`` or ``"euclidean"``.

    Returns:
        ``{"map_at_r": float, "precision_at_1": float}`` (full precision; NaN if all classes are singletons).
    """
    metric = check_metric(metric)
    x, y, _, _ = check_inputs(embeddings, labels)
    if len(x) < 2:
        raise ValueError(f"MAP@R needs at least 2 embeddings, got N={len(x)}")
    return _accuracy(x, y, ("mean_average_precision_at_r", "precision_at_1"), ks=(), metric=metric)


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

    One :class:`~medsim.metrics.accuracy_calculator.EmbeddingAccuracyCalculator` call: one k-NN search
    (``max(max(ks), largest class - 1)`` neighbours) serves Recall@K, MAP@R and P@1, one k-means serves NMI/AMI.
    The values equal those of :func:`nmi_ami`, :func:`recall_at_k` and :func:`map_at_r_precision_at_1`.

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
    metric = check_metric(metric)
    x, y, _, _ = check_inputs(embeddings, labels)
    ks_t = check_ks(ks, len(x) - 1)
    if len(x) < 2:
        raise ValueError(f"MAP@R needs at least 2 embeddings, got N={len(x)}")
    include = ("NMI", "AMI", *(f"recall_at_{k}" for k in ks_t), "mean_average_precision_at_r", "precision_at_1")
    out = _accuracy(x, y, include, threads=threads, ks=ks_t, metric=metric, seed=seed)
    return {k: _round(v, digits) for k, v in out.items()}


def class_balanced_retrieval(embeddings: Any, labels: Any, *, metric: str = "cosine", digits: int | None = 4,
                             threads: int | None = None) -> dict[str, float]:
    """Leave-one-out R@1 and MAP@R averaged per class, then over the classes (PML's ``avg_of_avgs``).

    On imbalanced data plain R@1 mostly measures the majority class: 67 % of HAM10000 images are nevi, and frozen
    features of a random-init ResNet18 already reach test R@1 67 % (issue 12). Here every class counts equally.

    Returns:
        ``{"R@1_balanced", "map_at_r_balanced"}`` -> float.
    """
    metric = check_metric(metric)
    x, y, _, _ = check_inputs(embeddings, labels)
    if len(x) < 2:
        raise ValueError(f"MAP@R needs at least 2 embeddings, got N={len(x)}")
    out = _accuracy(x, y, ("precision_at_1", "mean_average_precision_at_r"), threads=threads, ks=(1,),
                    metric=metric, avg_of_avgs=True)
    return {"R@1_balanced": _round(out["precision_at_1"], digits),
            "map_at_r_balanced": _round(out["map_at_r"], digits)}


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
