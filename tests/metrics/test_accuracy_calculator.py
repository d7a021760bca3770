"""EmbeddingAccuracyCalculator (PML AccuracyCalculator subclass) against the values of the hand-written metrics it
replaced and against numpy loops written from the metric definitions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_metric_learning")

from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # noqa: E402

from medsim.metrics import evaluate_embeddings, kmeans, map_at_r_precision_at_1, nmi_ami, recall_at_k  # noqa: E402
from medsim.metrics.accuracy_calculator import EmbeddingAccuracyCalculator, FlatKNN  # noqa: E402

ALL = ("NMI", "AMI", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "mean_average_precision_at_r",
       "precision_at_1")


def _random(seed: int = 0, n: int = 80, d: int = 6, c: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, size=n)
    y[3] = 99  # a lone query: a Recall@K miss, left out of MAP@R / P@1
    return x, y


def _clustered(seed: int = 0, n_per: int = 12, c: int = 6, d: int = 8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 3
    y = np.repeat(np.arange(c), n_per)
    x = centers[y] + rng.normal(size=(len(y), d))  # overlapping blobs: neither perfect nor chance
    return x.astype(np.float32), y


# Values of the hand-written implementation this class replaced (medsim/metrics/retrieval.py at commit ecf5380:
# faiss k-NN for Recall@K, faiss k-means + sklearn for NMI/AMI, plain PML for MAP@R / P@1), computed with
# evaluate_embeddings(x, y, ks=(1, 2, 4, 8), seed=3, metric=metric, digits=None) on the data above.
PINNED = {
    ("random", "cosine"): {
        "nmi": 0.07106263433849311, "ami": -0.03022935146091147, "R@1": 0.1875, "R@2": 0.3375, "R@4": 0.6125,
        "R@8": 0.8125, "map_at_r": 0.06225632104320337, "precision_at_1": 0.189873417721519},
    ("random", "euclidean"): {
        "nmi": 0.07106263433849311, "ami": -0.03022935146091147, "R@1": 0.175, "R@2": 0.3, "R@4": 0.5625,
        "R@8": 0.85, "map_at_r": 0.06842234237168911, "precision_at_1": 0.17721518987341772},
    ("clustered", "cosine"): {
        "nmi": 0.9179904608986644, "ami": 0.907729234413207, "R@1": 0.9583333333333334, "R@2": 0.9722222222222222,
        "R@4": 0.9861111111111112, "R@8": 1.0, "map_at_r": 0.8910579915314764, "precision_at_1": 0.9583333333333334},
    ("clustered", "euclidean"): {
        "nmi": 0.9179904608986644, "ami": 0.907729234413207, "R@1": 0.9444444444444444, "R@2": 0.9861111111111112,
        "R@4": 0.9861111111111112, "R@8": 1.0, "map_at_r": 0.9044779049513898, "precision_at_1": 0.9444444444444444},
}
DATA = {"random": _random, "clustered": _clustered}


# ---------------------------------------------------------------------------------- numpy loops from definitions


def _ranking(x: np.ndarray, metric: str) -> np.ndarray:
    """(N, N-1): the other samples of each query, nearest first (float64 distances, self excluded by index)."""
    x = x.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = -x @ x.T
    else:
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :-1]


def loop_recall(x, y, ks, metric):
    order = _ranking(x, metric)
    return {f"R@{k}": float(np.mean([(y[order[i, :k]] == y[i]).any() for i in range(len(y))])) for k in ks}


def loop_map_at_r_p1(x, y, metric):
    order = _ranking(x, metric)
    aps, p1 = [], []
    for i in range(len(y)):
        r = int((y == y[i]).sum()) - 1
        if r == 0:  # lone query: left out (PML convention)
            continue
        rel = y[order[i, :r]] == y[i]
        aps.append(float((np.cumsum(rel) / np.arange(1, r + 1) * rel).sum() / r))
        p1.append(float(rel[0]))
    return float(np.mean(aps)), float(np.mean(p1))


# ---------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_values_equal_the_replaced_implementation(data, metric):
    x, y = DATA[data]()
    got = evaluate_embeddings(x, y, ks=(1, 2, 4, 8), seed=3, metric=metric, digits=None)
    assert list(got) == list(PINNED[data, metric])
    assert got == pytest.approx(PINNED[data, metric], abs=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_calculator_matches_definitions(data, metric):
    x, y = DATA[data]()
    calc = EmbeddingAccuracyCalculator(ks=(1, 2, 4, 8), metric=metric, seed=3, include=ALL)
    acc = calc.get_accuracy(x, y)
    assert set(acc) == set(ALL)
    want_recall = loop_recall(x, y, (1, 2, 4, 8), metric)
    for k in (1, 2, 4, 8):
        assert acc[f"recall_at_{k}"] == pytest.approx(want_recall[f"R@{k}"], abs=1e-12)
    want_map, want_p1 = loop_map_at_r_p1(x, y, metric)
    assert acc["mean_average_precision_at_r"] == pytest.approx(want_map, abs=1e-9)
    assert acc["precision_at_1"] == pytest.approx(want_p1, abs=1e-12)
    assignment, _ = kmeans(x, len(np.unique(y)), seed=3)  # the same seeded faiss k-means++ clustering
    assert acc["NMI"] == pytest.approx(normalized_mutual_info_score(y, assignment), abs=1e-12)
    assert acc["AMI"] == pytest.approx(adjusted_mutual_info_score(y, assignment), abs=1e-12)
    # the lone query (label 99 in the random data) is a Recall@1 miss but is left out of P@1
    n_lone = int((np.bincount(np.unique(y, return_inverse=True)[1]) == 1).sum())
    assert acc["recall_at_1"] == pytest.approx(acc["precision_at_1"] * (len(y) - n_lone) / len(y), abs=1e-12)


def test_wrappers_are_the_calculator():
    x, y = _clustered(seed=1)
    full = evaluate_embeddings(x, y, ks=(1, 4), seed=2, digits=None)
    assert {k: full[k] for k in ("nmi", "ami")} == nmi_ami(x, y, seed=2)
    assert {k: full[k] for k in ("R@1", "R@4")} == recall_at_k(x, y, (1, 4))
    assert {k: full[k] for k in ("map_at_r", "precision_at_1")} == map_at_r_precision_at_1(x, y)


def test_same_seed_same_nmi_other_seed_runs_too():
    x, y = _random(seed=4, n=150, c=6)
    a = evaluate_embeddings(x, y, seed=7, digits=None)
    b = evaluate_embeddings(x, y, seed=7, digits=None)
    assert a == b
    calc = EmbeddingAccuracyCalculator(seed=7, include=("NMI", "AMI"))
    assert calc.get_accuracy(x, y) == pytest.approx({"NMI": a["nmi"], "AMI": a["ami"]}, abs=0)


def test_one_knn_search_serves_recall_and_map(monkeypatch):
    calls = []
    original = FlatKNN.__call__

    def counting(self, query, k, reference=None, ref_includes_query=False):
        calls.append(k)
        return original(self, query, k, reference, ref_includes_query)

    monkeypatch.setattr(FlatKNN, "__call__", counting)
    x, y = _clustered()  # 12 per class: MAP@R needs 11 neighbours
    evaluate_embeddings(x, y, ks=(1, 2, 4, 8))
    assert calls == [11]
    calls.clear()
    evaluate_embeddings(x, y, ks=(1, 16))
    assert calls == [16]
    calls.clear()
    recall_at_k(x, y, (1, 2))  # Recall@K alone searches only max(ks)
    assert calls == [2]


# ------------------------------------------------------------------------------------------- PML integration


def test_is_a_pml_calculator_with_recall_metrics():
    calc = EmbeddingAccuracyCalculator(ks=(1, 3))
    assert isinstance(calc, AccuracyCalculator)
    assert {"recall_at_1", "recall_at_3"} <= set(calc.requires_knn())
    assert {"NMI", "AMI", "mean_average_precision_at_r", "precision_at_1", "recall_at_1", "recall_at_3"} <= set(
        calc.get_curr_metrics())
    with pytest.raises(ValueError, match="Primary metrics must be one or more of"):
        EmbeddingAccuracyCalculator(ks=(1,), include=("recall_at_2",))


def test_query_reference_mode_and_string_labels():
    rng = np.random.default_rng(7)
    q = rng.normal(size=(20, 6)).astype(np.float32)
    ql = np.array(list("abcde"))[rng.integers(0, 5, size=20)]
    g = rng.normal(size=(33, 6)).astype(np.float32)
    gl = np.array(list("abcdf"))[rng.integers(0, 5, size=33)]  # no "e" in the gallery: those queries miss
    calc = EmbeddingAccuracyCalculator(ks=(1, 2, 8), metric="euclidean",
                                       include=("recall_at_1", "recall_at_2", "recall_at_8"))
    acc = calc.get_accuracy(q, ql, g, gl)
    d = ((q[:, None].astype(np.float64) - g[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")
    for k in (1, 2, 8):
        want = np.mean([(gl[order[i, :k]] == ql[i]).any() for i in range(len(q))])
        assert acc[f"recall_at_{k}"] == pytest.approx(want, abs=1e-12)
    got = recall_at_k(q, ql, (1, 2, 8), metric="euclidean", gallery_embeddings=g, gallery_labels=gl)
    assert got == {f"R@{k}": acc[f"recall_at_{k}"] for k in (1, 2, 8)}


def test_torch_inputs_and_duplicates_kept_as_neighbours():
    x = np.repeat(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), 3, axis=0)
    y = np.repeat([0, 1], 3)
    calc = EmbeddingAccuracyCalculator(ks=(1, 2), include=("recall_at_1", "recall_at_2", "precision_at_1",
                                                           "mean_average_precision_at_r"))
    acc = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    assert acc == {"recall_at_1": 1.0, "recall_at_2": 1.0, "precision_at_1": 1.0,
                   "mean_average_precision_at_r": 1.0}


def test_all_lone_queries():
    x = np.eye(4, dtype=np.float32)
    calc = EmbeddingAccuracyCalculator(ks=(1,), include=("recall_at_1", "precision_at_1"))
    acc = calc.get_accuracy(x, [0, 1, 2, 3])
    assert acc["recall_at_1"] == 0.0 and np.isnan(acc["precision_at_1"])


# ---------------------------------------------------------------------------------------------- input checks


def test_errors_name_the_bad_input():
    x = np.zeros((5, 3), np.float32)
    y = np.arange(5) % 2
    calc = EmbeddingAccuracyCalculator(ks=(1, 8), include=("recall_at_1", "recall_at_8"))
    bad = x.copy()
    bad[4, 0] = np.inf
    with pytest.raises(ValueError, match=r"query contain 1 non-finite value\(s\).*row 4"):
        calc.get_accuracy(bad, y)
    with pytest.raises(ValueError, match=r"expected 2-D reference \(N, D\), got shape \(5,\)"):
        calc.get_accuracy(x, y, np.zeros(5), y)
    with pytest.raises(ValueError, match=r"query_labels and query disagree on N: 4 labels for 5 embeddings"):
        calc.get_accuracy(x, y[:4])
    with pytest.raises(ValueError, match=r"query and reference differ in dimension D: 3 vs 2"):
        calc.get_accuracy(x, y, np.zeros((6, 2)), np.zeros(6))
    with pytest.raises(ValueError, match=r"K=8 exceeds the gallery size 4"):
        calc.get_accuracy(x, y)
    with pytest.raises(ValueError, match=r"positive int, got 0"):
        EmbeddingAccuracyCalculator(ks=(0, 1))
    with pytest.raises(ValueError, match=r"metric must be one of .* got 'manhattan'"):
        EmbeddingAccuracyCalculator(metric="manhattan")


def test_lazy_export():
    import medsim.metrics

    assert medsim.metrics.EmbeddingAccuracyCalculator is EmbeddingAccuracyCalculator
