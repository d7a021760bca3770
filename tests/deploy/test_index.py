"""CaseIndex (medsim.deploy.index): exactness of flat search, recall of HNSW / IVF-PQ on clustered embeddings,
incremental add/remove, atomic save/load with checksum and model-id checks, PHI refusal, torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from medsim.deploy.index import (  # noqa: E402
    META_FILE, CaseIndex, CaseIndexError, Hit, ModelMismatchError, default_m_pq, default_nlist)
from medsim.errors import MedsimError  # noqa: E402

MODEL = "test-model-1.0"


def clustered(n: int, dim: int, *, n_clusters: int = 100, intrinsic: int = 8, seed: int = 0,
              centers_seed: int = 0) -> np.ndarray:
    """``(n, dim)`` L2-normalised float32 embeddings from ``n_clusters`` clusters, each spread along its own
    ``intrinsic``-dimensional subspace plus a little isotropic noise (real embeddings have low intrinsic
    dimension; uniform noise would make every approximate index look bad). Draws with another ``seed`` and the
    same ``centers_seed`` come from the same distribution."""
    crng = np.random.default_rng(10_000 + centers_seed)
    centers = crng.standard_normal((n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    bases = crng.standard_normal((n_clusters, intrinsic, dim)).astype(np.float32) / np.sqrt(dim)
    rng = np.random.default_rng(seed)
    c = rng.integers(0, n_clusters, n)
    z = rng.standard_normal((n, intrinsic)).astype(np.float32) * 0.35
    x = centers[c] + np.einsum("ni,nid->nd", z, bases[c])
    x += rng.standard_normal((n, dim)).astype(np.float32) * (0.05 / np.sqrt(dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with numpy: (scores, row indices), best first."""
    if metric == "ip":
        s = q @ x.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = (q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None, :]
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def records_for(n: int, start: int = 0) -> list[dict]:
    return [{"uri": f"case{start + i}.png", "label": (start + i) % 7, "patient": f"p-{start + i:016x}",
             "split": "train"} for i in range(n)]


@pytest.fixture(scope="module")
def clustered_20k() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(20_000, 64, seed=0)
    q = clustered(200, 64, seed=1)  # same distribution, not drawn from the database
    _, truth = brute_force(x, q, 10, "ip")
    return x, q, truth


# --------------------------------------------------------------------------- exactness and recall

@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_numpy_brute_force(metric):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    q = rng.standard_normal((50, 32)).astype(np.float32)
    if metric == "ip":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = CaseIndex(32, kind="flat", metric=metric, model_id=MODEL, use_gpu=False)
    ids = index.add(x, records_for(len(x)))
    assert ids.tolist() == list(range(len(x))) and len(index) == len(x)
    scores, order = brute_force(x, q, 10, metric)
    hits = index.search(q, 10)
    assert [[h.id for h in row] for row in hits] == order.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, rtol=1e-5, atol=1e-5)
    assert hits[0][0].record == records_for(len(x))[order[0, 0]]
    assert isinstance(hits[0][0], Hit)


def test_hnsw_recall_on_clustered_embeddings(clustered_20k):
    x, q, truth = clustered_20k
    index = CaseIndex(64, kind="hnsw", model_id=MODEL)
    index.add(x, [{}] * len(x))
    _, found = index.search_arrays(q, 10)
    assert recall_at(found, truth) >= 0.9


def test_ivfpq_recall_on_clustered_embeddings(clustered_20k):
    x, q, _ = clustered_20k
    x = x[:10_000]  # PQ training dominates the test time; 10k of the same clusters keep it short
    _, truth = brute_force(x, q, 10, "ip")
    index = CaseIndex(64, kind="ivfpq", model_id=MODEL)
    assert not index.is_trained
    index.add(x, [{}] * len(x))  # trains on the first add
    assert index.is_trained and index.nlist == default_nlist(len(x)) and index.m_pq == default_m_pq(64) == 32
    _, found = index.search_arrays(q, 10)
    assert recall_at(found, truth) >= 0.9


def test_ivfpq_needs_enough_training_vectors():
    index = CaseIndex(16, kind="ivfpq", model_id=MODEL)
    with pytest.raises(ValueError, match=r"at least .*256.* training vectors, got 100"):
        index.add(np.eye(16, dtype=np.float32)[np.arange(100) % 16], [{}] * 100)
    assert len(index) == 0 and not index.is_trained


def test_explicit_train_then_incremental_adds():
    x = clustered(3000, 16, n_clusters=20)
    index = CaseIndex(16, kind="ivfpq", nlist=16, m_pq=8, model_id=MODEL).train(x)
    assert index.is_trained and len(index) == 0
    index.add(x[:1000], records_for(1000))
    index.add(x[1000:], records_for(2000, 1000))
    assert len(index) == 3000
    with pytest.raises(CaseIndexError, match="retraining"):
        index.train(x)


# --------------------------------------------------------------------------- add / remove / records

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_add_remove_incrementally(kind):
    x = clustered(2000, 16, n_clusters=20, seed=5)
    index = CaseIndex(16, kind=kind, nlist=8 if kind == "ivfpq" else None, nprobe=8, model_id=MODEL)
    a = index.add(x[:1000], records_for(1000))
    b = index.add(x[1000:], records_for(1000, 1000))
    assert a.tolist() == list(range(1000)) and b.tolist() == list(range(1000, 2000))
    removed = np.arange(0, 2000, 3)
    assert index.remove(removed) == removed.size
    assert len(index) == 2000 - removed.size
    gone = set(removed.tolist())
    hits = index.search(x[:300], 20)
    assert all(h.id not in gone for row in hits for h in row)
    assert all(h.record["uri"] == f"case{h.id}.png" for row in hits for h in row)  # records follow ids
    # a query equal to a live vector finds it first (flat and hnsw are exact enough for that)
    if kind != "ivfpq":
        assert hits[1][0].id == 1 and hits[1][0].score == pytest.approx(1.0, abs=1e-5)
    # new adds continue the ids; removed ids cannot be removed twice
    c = index.add(x[:5], records_for(5, 5000))
    assert c.tolist() == list(range(2000, 2005))
    with pytest.raises(ValueError, match=r"not in the index.*\[0\]"):
        index.remove([0, 1])
    assert 1 in index and 0 not in index and index.record(2000)["uri"] == "case5000.png"


def test_hnsw_compacts_when_most_vectors_are_removed():
    x = clustered(3000, 16, n_clusters=20, seed=6)
    index = CaseIndex(16, kind="hnsw", model_id=MODEL)
    index.add(x, records_for(3000))
    index.remove(np.arange(2000))  # tombstones outnumber the live vectors: graph rebuilt
    assert index.faiss_index.ntotal == 1000 and len(index) == 1000
    hits = index.search(x[2500:2501], 5)[0]
    assert hits[0].id == 2500 and all(h.id >= 2000 for h in hits)


def test_explicit_ids_and_id_validation():
    x = clustered(10, 8, n_clusters=2)
    index = CaseIndex(8, model_id=MODEL)
    ids = index.add(x[:3], records_for(3), ids=[100, 7, 42])
    assert ids.tolist() == [100, 7, 42] and index.add(x[3:4], records_for(1)).tolist() == [101]
    with pytest.raises(ValueError, match="already used"):
        index.add(x[4:5], records_for(1), ids=[7])
    with pytest.raises(ValueError, match="duplicates"):
        index.add(x[4:6], records_for(2), ids=[8, 8])


def test_search_fewer_cases_than_k_and_empty_index():
    index = CaseIndex(8, model_id=MODEL)
    assert index.search(np.ones((2, 8), np.float32), 5) == [[], []]
    index.add(np.eye(8, dtype=np.float32)[:3], records_for(3))
    hits = index.search(np.eye(8, dtype=np.float32)[:1], 5)
    assert len(hits[0]) == 3 and hits[0][0].id == 0


# --------------------------------------------------------------------------- input validation

def test_input_validation_messages():
    index = CaseIndex(128, model_id=MODEL)
    with pytest.raises(ValueError, match=r"expected \(N, 128\) float32 vectors, got \(5, 64\)"):
        index.add(np.ones((5, 64), np.float32), [{}] * 5)
    with pytest.raises(ValueError, match=r"expected \(N, 128\) float32 vectors, got \(128,\)"):
        index.add(np.ones(128, np.float32), [{}])
    with pytest.raises(ValueError, match=r"expected \(Q, 128\) float32 queries, got \(2, 3\)"):
        index.search(np.ones((2, 3), np.float32), 1)
    x = np.ones((4, 128), np.float32)
    x[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite.*\[2\]"):
        index.add(x, [{}] * 4)
    with pytest.raises(ValueError, match="got 3 records for 4 vectors"):
        index.add(np.ones((4, 128), np.float32), [{}] * 3)
    with pytest.raises(ValueError, match="all zeros"):
        index.add(np.zeros((1, 128), np.float32), [{}])
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        index.add(np.ones((1, 128), np.float32), [{"when": object()}])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(np.ones((1, 128), np.float32), 0)
    with pytest.raises(ValueError, match="m_pq=5 must be a positive divisor of dim=128"):
        CaseIndex(128, kind="ivfpq", m_pq=5, model_id=MODEL)
    assert len(index) == 0  # nothing was added by a failed call


def test_ip_normalises_vectors():
    index = CaseIndex(4, model_id=MODEL)
    index.add(np.array([[3, 0, 0, 0], [0, 2, 0, 0]], np.float64), records_for(2))  # float64, not unit length
    hit = index.search(np.array([[10, 1, 0, 0]], np.float32), 1)[0][0]
    assert hit.id == 0 and hit.score == pytest.approx(10 / np.sqrt(101), rel=1e-6)


@pytest.mark.parametrize("key", ["patient_id", "patient_name", "name", "birth_date", "PatientID", "BirthDate"])
def test_refuses_identifiers_in_clear(key):
    index = CaseIndex(4, model_id=MODEL)
    recs = [{"uri": "a.png"}, {"uri": "b.png", key: "DOE^JOHN"}]
    with pytest.raises(ValueError, match=rf"record 1 has the key '{key}'.*hash.*medsim\.data\.phi"):
        index.add(np.eye(4, dtype=np.float32)[:2], recs)
    assert len(index) == 0


# --------------------------------------------------------------------------- GPU selection

def test_gpu_auto_falls_back_to_cpu_and_true_requires_a_gpu(monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    index = CaseIndex(8, model_id=MODEL, use_gpu="auto")
    assert index.use_gpu is False
    index.add(np.eye(8, dtype=np.float32), records_for(8))
    assert index.search(np.eye(8, dtype=np.float32)[:1], 1)[0][0].id == 0
    with pytest.raises(CaseIndexError, match=r"no GPU.*faiss-gpu"):
        CaseIndex(8, model_id=MODEL, use_gpu=True)
    with pytest.raises(ValueError, match="use_gpu"):
        CaseIndex(8, model_id=MODEL, use_gpu="yes")


def test_gpu_replica_is_refreshed_after_changes(monkeypatch):
    """The GPU path with a fake 'GPU' copy (faiss.clone_index): searched, and re-made after add/remove."""
    copies = []

    class Options:
        useFloat16 = False

    def to_gpus(index, co=None):
        copies.append(co)
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus, raising=False)
    index = CaseIndex(8, model_id=MODEL, use_gpu=True)
    assert index.use_gpu
    index.add(np.eye(8, dtype=np.float32), records_for(8))
    q = np.eye(8, dtype=np.float32)[:2]
    assert [h[0].id for h in index.search(q, 1)] == [0, 1] and len(copies) == 1
    index.search(q, 1)
    assert len(copies) == 1  # unchanged index: the replica is reused
    index.remove([0])
    assert index.search(q, 1)[0][0].id != 0 and len(copies) == 2


def test_gpu_copy_failure_falls_back_to_cpu_in_auto_mode(monkeypatch, caplog):
    def fail(index, co=None):
        raise RuntimeError("unsupported on GPU")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", type("Options", (), {}), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", fail, raising=False)
    index = CaseIndex(8, model_id=MODEL)
    index.add(np.eye(8, dtype=np.float32), records_for(8))
    with caplog.at_level("WARNING", logger="medsim.deploy.index"):
        assert index.search(np.eye(8, dtype=np.float32)[:1], 1)[0][0].id == 0
    assert not index.use_gpu and "searching on the CPU" in caplog.text
    strict = CaseIndex(8, model_id=MODEL, use_gpu=True)
    strict.add(np.eye(8, dtype=np.float32), records_for(8))
    with pytest.raises(CaseIndexError, match="cannot copy the flat case index to the GPU"):
        strict.search(np.eye(8, dtype=np.float32)[:1], 1)


def test_hnsw_stays_on_cpu_even_with_gpus(monkeypatch, caplog):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    with caplog.at_level("INFO", logger="medsim.deploy.index"):
        index = CaseIndex(8, kind="hnsw", model_id=MODEL)
    assert index.use_gpu is False and "no GPU version of HNSW" in caplog.text


# --------------------------------------------------------------------------- persistence

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(tmp_path, kind):
    x = clustered(2000, 16, n_clusters=20, seed=7)
    q = clustered(50, 16, n_clusters=20, seed=8)
    index = CaseIndex(16, kind=kind, nlist=8 if kind == "ivfpq" else None, model_id=MODEL)
    index.add(x, records_for(2000))
    index.remove([3, 5, 8])
    before = index.search(q, 10)
    out = index.save(tmp_path / "cases")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["model_id"] == MODEL and meta["count"] == 1997 and meta["kind"] == kind and meta["dim"] == 16
    assert meta["faiss_version"] == faiss.__version__ and len(meta["index_sha256"]) == 64
    loaded = CaseIndex.load(out, expected_model_id=MODEL)
    assert loaded.search(q, 10) == before
    assert len(loaded) == 1997 and loaded.add(x[:1], records_for(1)).tolist() == [2000]
    # saving again replaces the index file (one faiss file per directory) and stays loadable
    loaded.save(out)
    assert len(list(out.glob("index-*.faiss"))) == 1 and len(CaseIndex.load(out / META_FILE)) == 1998


def test_flipped_byte_fails_the_checksum(tmp_path):
    index = CaseIndex(8, model_id=MODEL)
    index.add(np.eye(8, dtype=np.float32), records_for(8))
    out = index.save(tmp_path / "cases")
    (file,) = out.glob("index-*.faiss")
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CaseIndexError, match=rf"{file.name}: checksum mismatch") as err:
        CaseIndex.load(out)
    assert isinstance(err.value, MedsimError)
    file.write_bytes(bytes(data[:100]))
    with pytest.raises(CaseIndexError, match=r"truncated.*100 bytes"):
        CaseIndex.load(out)
    file.unlink()
    with pytest.raises(CaseIndexError, match="missing"):
        CaseIndex.load(out)


def test_other_model_id_is_refused(tmp_path):
    index = CaseIndex(8, model_id="isic-dsl-1.0")
    index.add(np.eye(8, dtype=np.float32), records_for(8))
    out = index.save(tmp_path / "cases")
    with pytest.raises(ModelMismatchError, match=r"'isic-dsl-1\.0'.*'isic-dsl-2\.0'.*rebuild the index with "
                                                 r"`medsim index build`"):
        CaseIndex.load(out, expected_model_id="isic-dsl-2.0")
    with pytest.raises(CaseIndexError, match="no case index here"):
        CaseIndex.load(tmp_path / "elsewhere")


def test_untrained_ivfpq_saves_and_loads(tmp_path):
    out = CaseIndex(16, kind="ivfpq", model_id=MODEL).save(tmp_path / "empty")
    loaded = CaseIndex.load(out)
    assert not loaded.is_trained and len(loaded) == 0


# --------------------------------------------------------------------------- deployment constraint

def test_import_is_torch_free():
    code = ("import sys, medsim.deploy.index as m; m.CaseIndex(4, model_id='x'); "
            "bad = [n for n in ('torch', 'monai') if n in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- ivfpq + exact re-ranking (refine)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_refine_reranks_pq_candidates_exactly(clustered_20k, metric):
    """Re-ranked IVF-PQ: every returned score is the exact distance of the returned id, lists are sorted, and
    recall@10 vs brute force beats plain IVF-PQ with the same quantizers."""
    x, q, _ = clustered_20k
    x = x[:10_000]
    _, truth = brute_force(x, q, 10, metric)
    plain = CaseIndex(64, kind="ivfpq", metric=metric, nlist=64, m_pq=8, model_id=MODEL)
    plain.add(x, [{}] * len(x))
    refined = CaseIndex(64, kind="ivfpq", metric=metric, nlist=64, m_pq=8, refine=8, model_id=MODEL)
    refined.add(x, [{}] * len(x))
    _, found_plain = plain.search_arrays(q, 10)
    scores, found = refined.search_arrays(q, 10)
    xs = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "ip" else x
    qs = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "ip" else q
    exact = (np.einsum("qd,qkd->qk", qs, xs[found]) if metric == "ip"
             else ((xs[found] - qs[:, None]) ** 2).sum(-1))
    np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-6).all() if metric == "ip" else (np.diff(scores, axis=1) >= -1e-6).all()
    r_plain, r_refined = recall_at(found_plain, truth), recall_at(found, truth)
    assert r_refined >= 0.95 and r_refined > r_plain + 0.05, (r_plain, r_refined)


def test_refine_follows_removals_and_survives_save_load(tmp_path):
    x = clustered(3000, 16, n_clusters=20)
    index = CaseIndex(16, kind="ivfpq", nlist=16, m_pq=8, refine=4, model_id=MODEL)
    index.add(x, records_for(3000))
    _, before = index.search_arrays(x[:5], 3)
    assert (before[:, 0] == np.arange(5)).all()  # each vector finds itself first
    index.remove(np.arange(5))
    _, after = index.search_arrays(x[:5], 3)
    assert not np.isin(after, np.arange(5)).any()
    index.save(tmp_path / "ix")
    # format 2: the full vectors live inside the one faiss file (IndexIDMap2(IndexRefineFlat(IndexIVFPQ)))
    assert len(list((tmp_path / "ix").glob("index-*.faiss"))) == 1
    assert not list((tmp_path / "ix").glob("refine-*.faiss"))
    loaded = CaseIndex.load(tmp_path / "ix")
    assert loaded.refine == 4 and "refine=4" in repr(loaded)
    assert isinstance(faiss.downcast_index(loaded.faiss_index.index), faiss.IndexRefineFlat)
    s1, i1 = index.search_arrays(x[5:50], 5)
    s2, i2 = loaded.search_arrays(x[5:50], 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)
    index_file = next((tmp_path / "ix").glob("index-*.faiss"))
    data = bytearray(index_file.read_bytes())
    data[-len(data) // 4] ^= 0xFF  # inside the full vectors, which follow the PQ codes
    index_file.write_bytes(bytes(data))
    with pytest.raises(CaseIndexError, match="index-.*checksum mismatch"):
        CaseIndex.load(tmp_path / "ix")


def test_refine_fewer_cases_than_candidates_and_bad_arguments():
    x = clustered(400, 16, n_clusters=4)
    index = CaseIndex(16, kind="ivfpq", nlist=4, m_pq=4, nbits=6, refine=4, nprobe=4, model_id=MODEL)
    index.add(x, records_for(400))
    index.remove(np.arange(390))
    scores, ids = index.search_arrays(x[:2], 20)
    assert (ids[:, :10] >= 390).all() and (ids[:, 10:] == -1).all()
    with pytest.raises(ValueError, match="refine=2 applies to kind='ivfpq' only"):
        CaseIndex(16, kind="hnsw", refine=2, model_id=MODEL)
    with pytest.raises(ValueError, match="non-negative integer"):
        CaseIndex(16, kind="ivfpq", refine=-1, model_id=MODEL)


@pytest.mark.parametrize("rec, msg", [
    ({"uri": "b.png", "meta": {"PatientName": "DOE^JOHN"}}, r"record 1\.meta has the key 'PatientName'"),
    ({"uri": "b.png", "studies": [{"dob": "19700101"}]}, r"record 1\.studies\[0\] has the key 'dob'"),
    ({"uri": "b.png", "patient": "PAT-0042"}, r"record 1: 'patient' must be a hashed token"),
    ({"uri": "b.png", "group": 17}, r"record 1: 'group' must be a hashed token"),
])
def test_refuses_identifiers_nested_or_unhashed(rec, msg):
    index = CaseIndex(4, model_id=MODEL)
    with pytest.raises(ValueError, match=msg):
        index.add(np.eye(4, dtype=np.float32)[:2], [{"uri": "a.png", "patient": "p-0123456789abcdef"}, rec])
    assert len(index) == 0


def test_info_round_trips_and_is_checked(tmp_path):
    index = CaseIndex(4, model_id=MODEL)
    index.add(np.eye(4, dtype=np.float32), records_for(4))
    index.info["model_dir"] = "/models/dsl"
    out = index.save(tmp_path / "cases")
    assert CaseIndex.load(out).info == {"model_dir": "/models/dsl"}
    index.info["owner"] = {"patient_id": "123"}
    with pytest.raises(CaseIndexError, match="info.owner has the key 'patient_id'"):
        index.save(tmp_path / "cases")
    assert CaseIndex.load(out).info == {"model_dir": "/models/dsl"}  # the earlier save is untouched


@pytest.mark.parametrize("edit", [
    lambda m: m.update(params=None),
    lambda m: m.update(records=[1, 2, 3, 4]),
    lambda m: m.update(ids=["a", "b", "c", "d"]),
    lambda m: m.update(tombstones=[None]),
])
def test_hand_edited_metadata_gives_a_clear_error(tmp_path, edit):
    index = CaseIndex(4, model_id=MODEL)
    index.add(np.eye(4, dtype=np.float32), records_for(4))
    out = index.save(tmp_path / "cases")
    meta = json.loads((out / META_FILE).read_text())
    edit(meta)
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CaseIndexError, match=rf"{META_FILE}: malformed case index metadata.*rebuild"):
        CaseIndex.load(out)


def test_min_train_size():
    assert CaseIndex(8, model_id=MODEL).min_train_size == 0
    assert CaseIndex(8, kind="ivfpq", model_id=MODEL).min_train_size == 256
    assert CaseIndex(8, kind="ivfpq", nbits=4, nlist=40, model_id=MODEL).min_train_size == 40


# --------------------------------------------------------------------------- faiss objects from factory strings

def chain(index) -> list[str]:
    """Class names from the outer faiss index inwards (IndexIDMap2 -> .index, IndexRefine -> .base_index)."""
    names = []
    while index is not None:
        index = faiss.downcast_index(index)
        names.append(type(index).__name__)
        index = (index.index if isinstance(index, faiss.IndexIDMap2) else
                 index.base_index if isinstance(index, faiss.IndexRefine) else None)
    return names


@pytest.mark.parametrize("kw, factory, expected", [
    ({"kind": "flat"}, "IDMap2,Flat", ["IndexIDMap2", "IndexFlat"]),
    ({"kind": "flat", "metric": "l2"}, "IDMap2,Flat", ["IndexIDMap2", "IndexFlat"]),
    ({"kind": "hnsw", "hnsw_m": 16}, "IDMap2,HNSW16", ["IndexIDMap2", "IndexHNSWFlat"]),
    ({"kind": "ivfpq", "nlist": 8, "m_pq": 4, "nbits": 6}, "IVF8,PQ4x6np", ["IndexIVFPQ"]),
    ({"kind": "ivfpq", "nlist": 8, "m_pq": 4, "nbits": 6, "refine": 3}, "IDMap2,IVF8,PQ4x6np,RFlat",
     ["IndexIDMap2", "IndexRefineFlat", "IndexIVFPQ"]),
])
def test_faiss_object_is_built_from_the_factory_string(kw, factory, expected, tmp_path):
    """The CaseIndex holds the object faiss.index_factory builds from its factory_string, with the parameters set:
    IndexIDMap2 for the ids (IVF-PQ keeps them natively), IndexRefineFlat for refine, and it survives save/load."""
    x = clustered(1000, 16, n_clusters=10)
    index = CaseIndex(16, model_id=MODEL, use_gpu=False, **kw)
    index.add(x, [{}] * len(x))
    assert index.factory_string == factory
    metric = faiss.METRIC_L2 if kw.get("metric") == "l2" else faiss.METRIC_INNER_PRODUCT
    fresh = faiss.index_factory(16, factory, metric)
    assert chain(index.faiss_index) == chain(fresh) == expected
    assert index.faiss_index.metric_type == fresh.metric_type == metric and index.faiss_index.ntotal == 1000
    if kw["kind"] == "hnsw":
        hnsw = faiss.downcast_index(index.faiss_index.index).hnsw
        assert hnsw.efConstruction == index.ef_construction and hnsw.nb_neighbors(1) == 16
    if kw["kind"] == "ivfpq":
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index.faiss_index))
        assert (ivf.nlist, ivf.pq.M, ivf.pq.nbits, ivf.do_polysemous_training) == (8, 4, 6, False)
    if kw.get("refine"):
        assert faiss.downcast_index(index.faiss_index.index).k_factor == 3
    if chain(index.faiss_index)[0] == "IndexIDMap2":  # ids really live in faiss: reconstruct by id
        np.testing.assert_allclose(index.faiss_index.reconstruct(7), x[7], atol=1e-6)
    loaded = CaseIndex.load(index.save(tmp_path / "ix"))
    assert loaded.factory_string == factory
    assert [n.replace("IP", "").replace("L2", "") for n in chain(loaded.faiss_index)] == expected  # read_index


def test_search_against_numpy_top_k_on_random_data():
    """Gaussian (unclustered) data, explicit non-consecutive ids, some removals: flat equals numpy's top-k (ids and
    scores), the approximate kinds reach a recall bound."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    q = rng.standard_normal((100, 16)).astype(np.float32)
    ids = rng.permutation(3000).astype(np.int64) * 7919 + 10**9  # shuffled, sparse, large
    removed = ids[::10]
    live = np.ones(len(x), bool)
    live[::10] = False
    for metric in ("ip", "l2"):
        xs, qs = (x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)) \
            if metric == "ip" else (x, q)
        scores, rows = brute_force(xs[live], qs, 10, metric)
        truth = ids[live][rows]
        found = {}
        for name, kw in {"flat": {"kind": "flat"}, "hnsw": {"kind": "hnsw"},
                         "ivfpq": {"kind": "ivfpq", "nlist": 16, "nprobe": 16, "nbits": 6},
                         "refine": {"kind": "ivfpq", "nlist": 16, "nprobe": 16, "nbits": 6, "refine": 4}}.items():
            index = CaseIndex(16, metric=metric, model_id=MODEL, use_gpu=False, **kw)
            index.add(x, [{}] * len(x), ids=ids)
            index.remove(removed)
            s, found[name] = index.search_arrays(q, 10)
            if name == "flat":
                np.testing.assert_array_equal(found[name], truth)
                np.testing.assert_allclose(s, scores, rtol=1e-4, atol=1e-4)
        recalls = {name: recall_at(f, truth) for name, f in found.items()}
        # measured (seed 11): hnsw 1.0 / 0.999, refine 0.99 / 0.999, ivfpq 0.71 / 0.79 (ip / l2)
        assert recalls["hnsw"] >= 0.97 and recalls["refine"] >= 0.95 and recalls["ivfpq"] >= 0.6, recalls
        assert not np.isin(np.concatenate(list(found.values())), removed).any()


def test_refine_marks_removals_then_compacts():
    """IndexRefine cannot delete: removed ids are filtered at search time, then dropped by a rebuild once they
    outnumber the live vectors; ids, records and exact self-hits survive the rebuild."""
    x = clustered(3000, 16, n_clusters=20, seed=4)
    index = CaseIndex(16, kind="ivfpq", nlist=16, m_pq=8, refine=4, model_id=MODEL, use_gpu=False)
    index.add(x, records_for(3000))
    index.remove(np.arange(0, 600))
    assert index.faiss_index.ntotal == 3000 and len(index) == 2400  # marked, still stored
    _, found = index.search_arrays(x[:700], 5)
    assert not np.isin(found, np.arange(600)).any() and (found[600:, 0] == np.arange(600, 700)).all()
    index.remove(np.arange(600, 2000))  # 2000 marked > max(1000 live, 1000): rebuilt without them
    assert index.faiss_index.ntotal == 1000 and len(index) == 1000
    assert chain(index.faiss_index) == ["IndexIDMap2", "IndexRefineFlat", "IndexIVFPQ"]
    scores, found = index.search_arrays(x[2000:2100], 3)
    assert (found[:, 0] == np.arange(2000, 2100)).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert index.record(2500)["uri"] == "case2500.png"


def test_gpu_refine_replica_searches_like_the_cpu_index(monkeypatch):
    """With a fake 'GPU' (faiss.clone_index): the IVF-PQ base is replicated, IndexRefine re-ranks on the CPU
    vectors, positions map back to ids; removals compact the index before the replica is rebuilt."""
    copies = []

    def to_gpus(index, co=None):
        copies.append(type(faiss.downcast_index(index)).__name__)
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", type("Options", (), {}), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    x = clustered(3000, 16, n_clusters=20, seed=9)
    q = clustered(50, 16, n_clusters=20, seed=10)
    kw = {"kind": "ivfpq", "nlist": 16, "m_pq": 8, "refine": 4, "model_id": MODEL}
    gpu, cpu = CaseIndex(16, use_gpu=True, **kw), CaseIndex(16, use_gpu=False, **kw)
    ids = np.arange(3000, dtype=np.int64) * 5 + 3
    for index in (gpu, cpu):
        index.add(x, [{}] * len(x), ids=ids)
    for nprobe in (2, 16):
        s_gpu, i_gpu = gpu.search_arrays(q, 10, nprobe=nprobe)
        s_cpu, i_cpu = cpu.search_arrays(q, 10, nprobe=nprobe)
        np.testing.assert_array_equal(i_gpu, i_cpu)
        np.testing.assert_allclose(s_gpu, s_cpu, rtol=1e-5, atol=1e-5)
    assert copies == ["IndexIVFPQ"]  # one replica of the base, reused
    for index in (gpu, cpu):
        index.remove(ids[:100])
    _, i_gpu = gpu.search_arrays(x[:150], 3)
    _, i_cpu = cpu.search_arrays(x[:150], 3)
    np.testing.assert_array_equal(i_gpu, i_cpu)
    assert not np.isin(i_gpu, ids[:100]).any() and len(copies) == 2
    assert gpu.faiss_index.ntotal == 2900 and cpu.faiss_index.ntotal == 3000  # compacted for the GPU only


def _save_format_1_refine(out, x, ids, refine):
    """A refine index as medsim wrote it before format 2: IndexIVFPQ with native ids in index-*.faiss, the full
    vectors as IndexIDMap2(IndexFlatIP) in refine-*.faiss, format_version 1."""
    import hashlib

    plain = CaseIndex(16, kind="ivfpq", nlist=16, m_pq=8, model_id=MODEL, use_gpu=False)
    plain.add(x, records_for(len(x)), ids=ids)
    plain.save(out)
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    exact.add_with_ids(x / np.linalg.norm(x, axis=1, keepdims=True), ids)
    faiss.write_index(exact, str(out / "refine.tmp"))
    data = (out / "refine.tmp").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (out / "refine.tmp").rename(out / f"refine-{sha[:16]}.faiss")
    meta = json.loads((out / META_FILE).read_text())
    meta.pop("factory_string")
    meta["params"]["refine"] = refine
    meta.update(format_version=1, refine_file=f"refine-{sha[:16]}.faiss", refine_bytes=len(data),
                refine_sha256=sha)
    (out / META_FILE).write_text(json.dumps(meta))
    return plain


def test_format_1_refine_index_is_converted_on_load(tmp_path):
    """Indexes saved before the factory-string version load: flat/hnsw/plain ivfpq files are the same faiss objects;
    a format-1 refine index (two files) becomes IndexIDMap2(IndexRefineFlat) with the same results, and the next
    save writes one file."""
    x = clustered(2000, 16, n_clusters=20, seed=12)
    ids = np.arange(2000, dtype=np.int64) * 3
    plain = _save_format_1_refine(tmp_path / "v1", x, ids, refine=4)
    loaded = CaseIndex.load(tmp_path / "v1")
    assert loaded.refine == 4 and chain(loaded.faiss_index) == ["IndexIDMap2", "IndexRefineFlat", "IndexIVFPQ"]
    assert len(loaded) == 2000 and loaded.record(3)["uri"] == "case1.png"
    # the same PQ candidates (same trained base), re-ranked exactly
    _, cand = plain.search_arrays(x[:20], 40)
    scores, found = loaded.search_arrays(x[:20], 10)
    assert (found[:, 0] == ids[:20]).all() and np.isin(found, cand).mean() == 1.0
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    loaded.save(tmp_path / "v1")
    assert not list((tmp_path / "v1").glob("refine-*.faiss"))
    again = CaseIndex.load(tmp_path / "v1")
    np.testing.assert_array_equal(again.search_arrays(x[:20], 10)[1], found)
    assert json.loads((tmp_path / "v1" / META_FILE).read_text())["format_version"] == 2


def test_faiss_file_of_another_structure_is_refused(tmp_path):
    """A case_index.json edited to another kind/refine than its faiss file holds fails with a clear error."""
    index = CaseIndex(16, kind="flat", model_id=MODEL, use_gpu=False)
    index.add(clustered(100, 16, n_clusters=4), records_for(100))
    out = index.save(tmp_path / "ix")
    meta = json.loads((out / META_FILE).read_text())
    meta["kind"] = "hnsw"
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CaseIndexError, match=r"holds IndexIDMap2\(IndexFlat\).*'IDMap2,HNSW32'"):
        CaseIndex.load(out)
