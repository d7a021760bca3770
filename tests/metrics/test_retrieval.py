"""Tests of medsim.metrics.retrieval against brute-force loops written from the metric definitions."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from medsim.metrics import (
    evaluate_embeddings,
    kmeans,
    map_at_r_precision_at_1,
    metrics_table,
    nmi_ami,
    recall_at_k,
)

# ----------------------------------------------------------------------------------------- brute-force helpers


def _dist(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    """Distance in float64 (cosine: 1 - cosine similarity, zero vectors -> similarity 0)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if metric == "euclidean":
        return float(np.sqrt(((a - b) ** 2).sum()))
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 - (float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0)


def _others(q, ql, g, gl, i, metric, leave_one_out):
    """[(distance, gallery index, same label)] for query i, self excluded by index in leave-one-out mode."""
    out = []
    for j in range(len(g)):
        if leave_one_out and j == i:
            continue
        out.append((_dist(q[i], g[j], metric), j, gl[j] == ql[i]))
    return out


def brute_recall_bounds(q, ql, ks, metric, g=None, gl=None, eps=1e-5):
    """Recall@K with ties at the K-th distance resolved against (pessimistic) and for (optimistic) a hit.

    Without ties both bounds are equal to the unique answer.
    """
    loo = g is None
    if loo:
        g, gl = q, ql
    pess = {k: 0 for k in ks}
    opt = {k: 0 for k in ks}
    for i in range(len(q)):
        cands = _others(q, ql, g, gl, i, metric, loo)
        dists = sorted(d for d, _, _ in cands)
        for k in ks:
            dk = dists[k - 1]
            closer = [s for d, _, s in cands if d < dk - eps]
            tied = [s for d, _, s in cands if abs(d - dk) <= eps]
            n_from_tie = k - len(closer)
            hit_closer = any(closer)
            n_neg_tied = sum(1 for s in tied if not s)
            pess[k] += hit_closer or (n_neg_tied < n_from_tie)
            opt[k] += hit_closer or any(tied)
    n = len(q)
    return {f"R@{k}": pess[k] / n for k in ks}, {f"R@{k}": opt[k] / n for k in ks}


def brute_map_at_r_p1(x, y, metric):
    """MAP@R and P@1 from Musgrave et al. 2020, leave-one-out, lone queries (R = 0) left out (PML convention)."""
    aps, p1 = [], []
    for i in range(len(x)):
        cands = sorted(_others(x, y, x, y, i, metric, True))  # by distance, then index
        r = sum(s for _, _, s in cands)
        if r == 0:
            continue
        correct, total = 0, 0.0
        for rank, (_, _, s) in enumerate(cands[:r], start=1):
            if s:
                correct += 1
                total += correct / rank
        aps.append(total / r)
        p1.append(float(cands[0][2]))
    return float(np.mean(aps)), float(np.mean(p1))


def _clusters(n_per: int = 10, n_classes: int = 3, d: int = 8, spread: float = 0.01, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, d)) * 10
    y = np.repeat(np.arange(n_classes), n_per)
    x = centers[y] + spread * rng.normal(size=(len(y), d))
    return x.astype(np.float32), y


# -------------------------------------------------------------------------------------------------- Recall@K


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_continuous(metric, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(45, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=45)
    y[0] = 99  # a singleton class: always a miss
    ks = (1, 2, 3, 5, 8, 44)
    lo, hi = brute_recall_bounds(x, y, ks, metric)
    assert lo == hi  # no ties in continuous data
    got = recall_at_k(x, y, ks, metric=metric)
    assert list(got) == [f"R@{k}" for k in ks]
    assert got == pytest.approx(lo, abs=1e-12)
    assert got["R@44"] == pytest.approx(44 / 45)  # everyone but the singleton finds a positive


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_recall_with_ties_and_duplicates_within_tie_bounds(metric, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, size=(30, 3)).astype(np.float32)  # 27 possible points -> many duplicates and ties
    x = np.concatenate([x, x[:6]])  # explicit duplicates
    y = rng.integers(0, 3, size=len(x))
    ks = (1, 2, 4, 7)
    lo, hi = brute_recall_bounds(x, y, ks, metric)
    got = recall_at_k(x, y, ks, metric=metric)
    for k in got:
        assert lo[k] - 1e-12 <= got[k] <= hi[k] + 1e-12, (k, lo[k], got[k], hi[k])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_recall_query_gallery_mode_matches_brute_force(metric):
    rng = np.random.default_rng(7)
    q = rng.normal(size=(20, 6)).astype(np.float32)
    ql = rng.integers(0, 5, size=20)
    g = rng.normal(size=(33, 6)).astype(np.float32)
    gl = rng.integers(0, 5, size=33)
    g[3] = q[0]  # the query itself in the gallery is *not* excluded in this mode
    gl[3] = ql[0]
    ks = (1, 2, 4, 8, 33)
    lo, hi = brute_recall_bounds(q, ql, ks, metric, g, gl)
    assert lo == hi
    got = recall_at_k(q, ql, ks, metric=metric, gallery_embeddings=g, gallery_labels=gl)
    assert got == pytest.approx(lo, abs=1e-12)


def test_recall_query_gallery_string_labels_and_gallery_only_labels():
    q = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    g = np.array([[0.0, 2.0], [3.0, 0.1]], np.float32)
    got = recall_at_k(q, ["a", "b"], (1, 2), gallery_embeddings=g, gallery_labels=["a", "c"])
    assert got == {"R@1": 0.5, "R@2": 0.5}


def test_recall_three_tight_clusters_is_perfect():
    x, y = _clusters()
    for metric in ("cosine", "euclidean"):
        assert recall_at_k(x, y, metric=metric) == {"R@1": 1.0, "R@2": 1.0, "R@4": 1.0, "R@8": 1.0}


def test_recall_hand_built_four_points():
    # 1-D points: 0 and 1 are each other's nearest neighbour (both label 0: hits); 10 is the only label-1 item
    # (never a hit); 12's nearest is 10 (miss), its second nearest is 1 (hit).
    x = np.array([[0.0], [1.0], [10.0], [12.0]], np.float32)
    y = np.array([0, 0, 1, 0])
    assert recall_at_k(x, y, (1, 2, 3), metric="euclidean") == {"R@1": 0.5, "R@2": 0.75, "R@3": 0.75}


def test_recall_duplicates_count_self_excluded_by_index():
    # five exact copies of each of two points: every query's nearest neighbour is a copy at distance 0
    x = np.repeat(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), 5, axis=0)
    y = np.repeat([0, 1], 5)
    for metric in ("cosine", "euclidean"):
        assert recall_at_k(x, y, (1, 4), metric=metric) == {"R@1": 1.0, "R@4": 1.0}
    # a duplicate with a different label is a miss
    x2 = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [9.0, 9.0]], np.float32)
    y2 = np.array([0, 1, 0, 1])
    assert recall_at_k(x2, y2, 1, metric="euclidean") == {"R@1": 0.0}


def test_recall_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(25, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=25)
    want = recall_at_k(x, y)
    xt = torch.from_numpy(x).requires_grad_(True)
    assert recall_at_k(xt, torch.from_numpy(y)) == want
    got_bf16 = recall_at_k(xt.to(torch.bfloat16), torch.from_numpy(y), (1,))  # bfloat16 has no numpy dtype
    assert got_bf16["R@1"] == pytest.approx(want["R@1"], abs=0.1)


# ----------------------------------------------------------------------------------------- k-means / NMI / AMI


def test_kmeans_deterministic_for_seed_and_shapes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    a1, c1 = kmeans(x, 7, seed=3)
    a2, c2 = kmeans(x, 7, seed=3)
    assert a1.dtype == np.int64 and a1.shape == (200,) and c1.shape == (7, 6)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(c1, c2)
    assert set(np.unique(a1)) <= set(range(7))
    # assignments are the nearest centroids
    d = ((x[:, None, :] - c1[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(a1, d.argmin(1))


def test_kmeans_threads_restored():
    before = faiss.omp_get_max_threads()
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    a1, _ = kmeans(x, 4, seed=0, threads=1)
    assert faiss.omp_get_max_threads() == before
    a2, _ = kmeans(x, 4, seed=0, threads=1)
    np.testing.assert_array_equal(a1, a2)


def test_kmeans_edge_cases():
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    a, c = kmeans(x, 1)
    np.testing.assert_array_equal(a, np.zeros(5, np.int64))
    np.testing.assert_allclose(c[0], x.mean(0), rtol=1e-6, atol=1e-6)
    a, c = kmeans(x, 5)  # k == N: every point its own cluster
    assert sorted(a.tolist()) == [0, 1, 2, 3, 4]
    _, c = kmeans(x, 2, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match=r"N=5 points, k=6 clusters"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match=r"k must be >= 1, got k=0"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match=r"niter must be a positive int, got 0"):
        kmeans(x, 2, niter=0)


def test_nmi_ami_match_sklearn_on_same_assignment():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=120)
    assign, _ = kmeans(x, 4, seed=11)
    got = nmi_ami(x, y, seed=11)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y, assign), abs=1e-12)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(y, assign), abs=1e-12)
    # string labels: same result (k = number of distinct labels)
    names = np.array(["mel", "nev", "bcc", "ak"])[y]
    assert nmi_ami(x, names, seed=11) == pytest.approx(got, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_nmi_perfect_on_separated_clusters(seed):
    # k-means++ init finds all blobs; faiss' default random init (init="random") often puts two seeds in one
    x, y = _clusters(n_per=15, n_classes=12, seed=seed)
    got = nmi_ami(x, y + 10, seed=seed)
    assert got["nmi"] == pytest.approx(1.0, abs=1e-6)
    assert got["ami"] == pytest.approx(1.0, abs=1e-6)


def test_kmeans_random_init_available_and_deterministic():
    x, _ = _clusters(n_per=15, n_classes=4)
    a1, _ = kmeans(x, 4, seed=2, init="random")
    a2, _ = kmeans(x, 4, seed=2, init="random")
    np.testing.assert_array_equal(a1, a2)
    with pytest.raises(ValueError, match=r"init must be one of .* got 'kmeans'"):
        kmeans(x, 4, init="kmeans")


# ------------------------------------------------------------------------------------------------ MAP@R / P@1


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_map_at_r_matches_definition(metric, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=40)
    y[5] = 77  # lone query: PML leaves it out of both averages
    want_map, want_p1 = brute_map_at_r_p1(x, y, metric)
    got = map_at_r_precision_at_1(x, y, metric=metric)
    assert got["map_at_r"] == pytest.approx(want_map, abs=1e-6)
    assert got["precision_at_1"] == pytest.approx(want_p1, abs=1e-6)
    # P@1 differs from R@1 only by the lone query (a miss there, dropped here)
    assert got["precision_at_1"] * 39 / 40 == pytest.approx(recall_at_k(x, y, 1, metric=metric)["R@1"])


def test_map_at_r_perfect_and_duplicates():
    x, y = _clusters()
    assert map_at_r_precision_at_1(x, y) == {"map_at_r": 1.0, "precision_at_1": 1.0}
    xd = np.repeat(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), 4, axis=0)
    yd = np.repeat([0, 1], 4)
    assert map_at_r_precision_at_1(xd, yd, metric="euclidean") == {"map_at_r": 1.0, "precision_at_1": 1.0}


def test_map_at_r_all_lone_is_nan():
    got = map_at_r_precision_at_1(np.eye(4, dtype=np.float32), [0, 1, 2, 3])
    assert np.isnan(got["map_at_r"]) and np.isnan(got["precision_at_1"])


# -------------------------------------------------------------------------------------------- combined, table


def test_evaluate_embeddings_combines_and_rounds():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    y = np.repeat(np.arange(6), 10)
    full = evaluate_embeddings(x, y, ks=(1, 4), seed=1, digits=None)
    assert list(full) == ["nmi", "ami", "R@1", "R@4", "map_at_r", "precision_at_1"]
    assert full["nmi"] == nmi_ami(x, y, seed=1)["nmi"]
    assert full["R@4"] == recall_at_k(x, y, (4,))["R@4"]
    assert full["map_at_r"] == map_at_r_precision_at_1(x, y)["map_at_r"]
    rounded = evaluate_embeddings(x, y, ks=(1, 4), seed=1)
    for k, v in rounded.items():
        assert v == round(full[k], 4)


def test_metrics_table():
    table = metrics_table({"baseline": {"R@1": 0.5, "nmi": 0.123456}, "dsl|k4": {"R@1": 1.0, "map_at_r": 0.25}})
    lines = table.splitlines()
    assert lines[0] == "| run | R@1 | nmi | map_at_r |"
    assert lines[1] == "|---|---:|---:|---:|"
    assert lines[2] == "| baseline | 0.5000 | 0.1235 |  |"
    assert lines[3] == "| dsl\\|k4 | 1.0000 |  | 0.2500 |"
    assert metrics_table({}) == "| run |\n|---|"
    with pytest.raises(ValueError, match="results\\['a'\\] must be a mapping"):
        metrics_table({"a": 1.0})


# ---------------------------------------------------------------------------------------------- input checks


def test_error_messages():
    x = np.zeros((5, 3), np.float32)
    y = np.arange(5) % 2
    with pytest.raises(ValueError, match=r"expected 2-D embeddings \(N, D\), got shape \(5,\)"):
        recall_at_k(np.zeros(5), y)
    with pytest.raises(ValueError, match=r"4 labels for 5 embeddings"):
        recall_at_k(x, y[:4])
    with pytest.raises(ValueError, match=r"expected 1-D labels \(N,\), got shape \(5, 2\)"):
        nmi_ami(x, np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"K=8 exceeds the gallery size 4"):
        recall_at_k(x, y)
    with pytest.raises(ValueError, match=r"positive int, got 0"):
        recall_at_k(x, y, (0, 1))
    with pytest.raises(ValueError, match=r"metric must be one of .* got 'manhattan'"):
        recall_at_k(x, y, 1, metric="manhattan")
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*row 2"):
        map_at_r_precision_at_1(bad, y)
    with pytest.raises(ValueError, match=r"both gallery_embeddings and gallery_labels"):
        recall_at_k(x, y, 1, gallery_embeddings=x)
    with pytest.raises(ValueError, match=r"dimension D: 3 vs 4"):
        recall_at_k(x, y, 1, gallery_embeddings=np.zeros((6, 4)), gallery_labels=np.zeros(6))
    msg = r"gallery_labels and gallery_embeddings disagree on N: 3 labels for 6 embeddings"
    with pytest.raises(ValueError, match=msg):
        recall_at_k(x, y, 1, gallery_embeddings=np.zeros((6, 3)), gallery_labels=np.zeros(3))
    with pytest.raises(ValueError, match=r"at least 2 embeddings, got N=1"):
        map_at_r_precision_at_1(x[:1], y[:1])
    with pytest.raises(ValueError, match=r"threads must be a positive int or None, got 0"):
        kmeans(x, 2, threads=0)


def test_module_does_not_import_torch():
    code = "import sys, medsim.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_class_balanced_retrieval_weighs_every_class_equally():
    """Issue 12: per-class R@1 / MAP@R averaged over classes. A majority class retrieved perfectly and a minority
    class retrieved never: plain R@1 0.9, class-balanced 0.5. Checked against a hand count."""
    from medsim.metrics.retrieval import class_balanced_retrieval, evaluate_embeddings

    rng = np.random.default_rng(0)
    big = rng.normal(size=(18, 8)) * 0.01 + np.eye(8)[0]  # a tight majority cluster
    small = np.eye(8)[[1, 2]]  # two minority items, each nearest to the majority cluster rather than each other
    small = small * 0.1 + np.eye(8)[0]
    emb = np.vstack([big, small]).astype(np.float32)
    lab = np.array([0] * 18 + [1] * 2)
    plain = evaluate_embeddings(emb, lab, ks=(1,))
    bal = class_balanced_retrieval(emb, lab)
    assert plain["R@1"] == pytest.approx(0.9, abs=1e-4)
    assert bal["R@1_balanced"] == pytest.approx(0.5, abs=1e-4)
    assert bal["map_at_r_balanced"] == pytest.approx((1.0 + 0.0) / 2, abs=1e-3)  # class 0 perfect, class 1 none
