"""Near ties in a search whose queries are embedded at reduced precision (bf16, INT8), and the fp32 recheck that
settles them.

A bf16 query embedding moves every cosine score a little (on a ResNet18 trained on HAM10000: a median 4e-4, p99
2e-3). Where a query's k-th and (k+1)-th neighbours are closer than that, its reduced-precision top-k can hold a
different case than fp32's; everywhere else it is the same set. The fp32 recheck embeds again, in fp32, only the
queries whose top-k boundary gap (``score[k-1] - score[k]``, best first) is below a margin, and searches with those
embeddings. The index must hold fp32 embeddings: the recheck then returns fp32's own top-k for those queries.

The margin is calibrated when the export is made (:func:`calibrate_recheck`), on the validation split: queries at
reduced precision against the split's fp32 embeddings (leave-one-out, as a search of an index built from the same
cases), the smallest margin that makes the top-k *set* equal fp32's for ``target`` of the queries, the largest such
margin over k = 1, 5, 10; on a split too small to show that miss rate, a conservative bound from how far the
precision moves neighbours' score differences, and below 100 images every query. The manifest records it with the
share of queries it sends to fp32 (that share costs time: an fp32 forward pass each).

This is the idea of faiss's refinement step (``IndexRefine``: re-rank approximate candidates with exact
distances), applied to the query embedding's precision instead of the index's compression.

numpy and faiss (imported when searching), no torch: :mod:`medsim.deploy` uses it without torch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["RECHECK_KS", "RECHECK_TARGET", "MARGIN_SLACK", "RECHECK_ALL", "MIN_PAIR_BOUND_IMAGES", "topk_neighbours",
           "boundary_gaps", "pair_flip_errors", "calibrate_recheck", "recheck_outcome", "min_images", "near_ties"]

#: the k at which the margin is calibrated; a search uses the largest margin of them (k beyond 10 included)
RECHECK_KS = (1, 5, 10)
#: added to the calibrated gap: scores of the same pair computed by another BLAS call differ by ~1e-7
MARGIN_SLACK = 1e-6
#: a margin that rechecks every query (above any gap: cosine scores differ by at most 2)
RECHECK_ALL = 3.0
#: fewer calibration images than this: no error tail to estimate, every query is rechecked
MIN_PAIR_BOUND_IMAGES = 100
#: share of validation queries whose top-k set must equal fp32's after the recheck
RECHECK_TARGET = 0.995


def _unit(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, dtype=np.float32)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def topk_neighbours(queries: np.ndarray, gallery: np.ndarray, k: int, *, exclude_diagonal: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best gallery items of each query by cosine, best first: ``(ids (Q, k) int64, scores (Q, k)
    float32)``, from faiss' exact inner-product k-NN (``faiss.knn``, what a flat :class:`CaseIndex` searches) on
    L2-normalised rows. ``exclude_diagonal``: query i is gallery item i and is left out (leave-one-out)."""
    import faiss

    q, g = _unit(queries), _unit(gallery)
    k = min(int(k), len(g) - int(exclude_diagonal))
    if k < 1:
        raise ValueError(f"topk_neighbours needs at least one gallery item besides the query, got {len(g)}")
    scores, ids = faiss.knn(q, g, k + int(exclude_diagonal), metric=faiss.METRIC_INNER_PRODUCT)
    if exclude_diagonal:  # drop the query's own row; where it fell outside (exact duplicates), drop the last
        drop = ids == np.arange(len(q))[:, None]
        drop[~drop.any(1), -1] = True
        keep = ~drop
        ids, scores = ids[keep].reshape(len(q), k), scores[keep].reshape(len(q), k)
    return ids.astype(np.int64), scores.astype(np.float32)


def boundary_gaps(scores: np.ndarray, k: int) -> np.ndarray:
    """``scores[:, k-1] - scores[:, k]`` of best-first score rows (Q, >= k+1): how far each query's top-k is from
    taking in its (k+1)-th neighbour. A row with no (k+1)-th score has an infinite gap (its top-k is every item)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] <= k:
        return np.full(len(scores), np.inf)
    return scores[:, k - 1] - scores[:, k]


def pair_flip_errors(reference: np.ndarray, reduced: np.ndarray, pairs: int = max(RECHECK_KS)) -> np.ndarray:
    """How much the reduced precision moves the score difference of neighbours: for each query and its fp32
    neighbours at ranks r and r+1 (r = 1..``pairs``, leave-one-out), ``|(s'_r - s'_(r+1)) - (s_r - s_(r+1))|``
    with ``s`` the fp32 and ``s'`` the reduced query's cosine to the fp32 gallery. A top-k boundary can only
    change where this exceeds the gap. (N * pairs,) float64."""
    ref, red = _unit(reference), _unit(reduced)
    ids, s32 = topk_neighbours(ref, ref, pairs + 1, exclude_diagonal=True)
    sq = np.empty_like(s32)
    for s in range(0, len(ids), 4096):  # the reduced query against the same fp32 neighbours, (c, pairs+1, D) at a time
        sq[s:s + 4096] = np.einsum("nd,nkd->nk", red[s:s + 4096], ref[ids[s:s + 4096]])
    return np.abs(np.diff(sq.astype(np.float64), axis=1) - np.diff(s32.astype(np.float64), axis=1)).ravel()


def calibrate_recheck(reference: np.ndarray, reduced: np.ndarray, *, ks: Sequence[int] = RECHECK_KS,
                      target: float = RECHECK_TARGET) -> dict[str, Any] | None:
    """The fp32-recheck margin of one reduced-precision engine, from the same images embedded in fp32
    (``reference`` (N, D)) and by the engine (``reduced`` (N, D)).

    For each k: queries = ``reduced``, gallery = ``reference`` without the query itself; a query *agrees* when its
    top-k set equals that of its fp32 embedding. A query is rechecked when its boundary gap is below the margin,
    and then agrees by construction (it is searched with its fp32 embedding).

    * ``method="agreement"`` (at least :func:`min_images` images): the margin for k is the smallest that leaves at
      most ``floor((1 - target) * N)`` disagreeing queries (plus :data:`MARGIN_SLACK`); the margin is the largest
      over ``ks``.
    * ``method="pair bound"`` (:data:`MIN_PAIR_BOUND_IMAGES` or more, but too few to see a ``1 - target`` miss
      rate): the ``target`` quantile of :func:`pair_flip_errors`, so a neighbour pair flips past the margin with
      probability at most ``1 - target`` whatever the gaps are. Conservative: on HAM10000 it rechecks about twice
      the queries the agreement margin does.
    * ``method="all"`` (fewer images: nothing to estimate an error tail from): :data:`RECHECK_ALL`, every query is
      rechecked; the result is fp32's, at more than fp32's cost.

    Returns ``{"margin", "method", "target", "images", "pair_bound", "by_k": {k: {"margin" (agreement),
    "same_set" (without recheck), "same_set_rechecked", "recheck_share"}}}`` (shares on these images, with the
    final margin), or ``None`` with fewer than ``min(ks) + 2`` images.
    """
    ref, red = _unit(reference), _unit(reduced)
    n = len(ref)
    ks = sorted({int(k) for k in ks if 1 <= int(k) <= n - 2})
    if not ks:
        return None
    allowed = int(np.floor((1.0 - float(target)) * n + 1e-9))
    per: dict[int, dict[str, Any]] = {}
    for k, (same, gaps) in _same_sets(ref, red, ks).items():
        missed = np.sort(gaps[~same])[::-1]  # disagreeing queries, widest gap first
        # just above the widest gap that must be rechecked (1e-6: float32 scores recomputed elsewhere round apart)
        margin = 0.0 if len(missed) <= allowed else float(missed[allowed]) + MARGIN_SLACK
        per[k] = {"margin": margin, "same_set": float(same.mean()), "_same": same, "_gaps": gaps}
    kmax = max(ks)
    bound = float(np.quantile(pair_flip_errors(ref, red, min(kmax, n - 2)), target)) + MARGIN_SLACK
    if n >= min_images(target):
        margin, method = max(v["margin"] for v in per.values()), "agreement"
    elif n >= MIN_PAIR_BOUND_IMAGES:
        margin, method = bound, "pair bound"
    else:
        margin, method = RECHECK_ALL, "all"
    by_k = {str(k): {"margin": v["margin"], **_outcome(v["_same"], v["_gaps"], margin)} for k, v in per.items()}
    return {"margin": margin, "method": method, "target": float(target), "images": int(n), "pair_bound": bound,
            "by_k": by_k}


def _same_sets(ref: np.ndarray, red: np.ndarray, ks: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each k: which ``red`` queries (leave-one-out against the fp32 gallery ``ref``) have the top-k set of
    their fp32 embedding, (N,) bool, and their boundary gaps at reduced precision, (N,)."""
    kmax = max(ks)
    ids32, _ = topk_neighbours(ref, ref, kmax, exclude_diagonal=True)
    idsq, scq = topk_neighbours(red, ref, kmax + 1, exclude_diagonal=True)
    return {k: (np.array([set(a[:k]) == set(b[:k]) for a, b in zip(ids32.tolist(), idsq.tolist())]),
                boundary_gaps(scq, k)) for k in ks}


def recheck_outcome(reference: np.ndarray, reduced: np.ndarray, margin: float, *,
                    ks: Sequence[int] = RECHECK_KS) -> dict[str, dict[str, float]]:
    """What a recheck with ``margin`` does to these queries (``reduced`` (N, D), leave-one-out against the fp32
    gallery ``reference`` (N, D) of the same images): for each k, the share whose top-k set is fp32's without the
    recheck (``same_set``) and with it (``same_set_rechecked``), and the share rechecked (``recheck_share``)."""
    ref, red = _unit(reference), _unit(reduced)
    ks = sorted({int(k) for k in ks if 1 <= int(k) <= len(ref) - 2})
    sets = _same_sets(ref, red, ks) if ks else {}
    return {str(k): _outcome(same, gaps, margin) for k, (same, gaps) in sets.items()}


def _outcome(same: np.ndarray, gaps: np.ndarray, margin: float) -> dict[str, float]:
    check = gaps < margin
    return {"same_set": round(float(same.mean()), 6), "same_set_rechecked": round(float(np.mean(same | check)), 6),
            "recheck_share": round(float(check.mean()), 6)}


def min_images(target: float = RECHECK_TARGET) -> int:
    """Images the agreement calibration needs: enough that a ``1 - target`` miss rate shows as 2 misses."""
    return int(np.ceil(2.0 / (1.0 - float(target)) - 1e-9))


def near_ties(hit_scores: Sequence[Sequence[float]], k: int, margin: float) -> np.ndarray:
    """Which queries to recheck in fp32: those whose k-th and (k+1)-th hit scores (``hit_scores[i]``: query i's
    hit scores, best first, at least k+1 of them where the index has that many) are closer than ``margin``.
    (Q,) bool; a row with k or fewer hits holds every case and needs no recheck."""
    out = np.zeros(len(hit_scores), dtype=bool)
    if margin <= 0:
        return out
    for i, row in enumerate(hit_scores):
        if len(row) > k:
            out[i] = float(row[k - 1]) - float(row[k]) < margin
    return out
