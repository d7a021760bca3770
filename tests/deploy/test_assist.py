"""medsim.deploy.assist: the torch-free core of the MONAI Label app.

The active-learning functions are checked against brute-force loops written from their definitions (k-center greedy
from Sener & Savarese 2018, Alg. 1; entropy as -Σ p log p; disagreement as 1 - share of the commonest label), and
against a real flat ``CaseIndex``; the :class:`Assistant` on the session's tiny export against ``medsim search`` /
``medsim localize`` (:func:`search_images`, :func:`localize_images`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsim.deploy.assist import (Assistant, AssistConfigError, entropy, kcenter_greedy, rank_unlabelled,
                                  retrieval_disagreement)
from medsim.runtime.errors import DeployError


# ------------------------------------------------------------------------------------------------ references
def _kcenter_reference(pool, centers, n, min_dist=None):
    """k-center greedy by brute force: each step picks the pool point whose smallest Euclidean distance to
    ``centers`` ∪ the points picked so far (∪ ``min_dist``, a known distance to the labelled set) is largest."""
    x = np.asarray(pool, np.float64)
    labelled = [np.asarray(c, np.float64) for c in (centers if centers is not None else [])]
    picked, gaps = [], []
    for _ in range(min(n, len(x))):
        d = []
        for j in range(len(x)):
            cand = [np.linalg.norm(x[j] - c) for c in labelled] + [np.linalg.norm(x[j] - x[i]) for i in picked]
            if min_dist is not None:
                cand.append(float(min_dist[j]))
            d.append(min(cand) if cand else np.inf)
        i = int(np.argmax(d))
        picked.append(i)
        gaps.append(d[i])
    return picked, np.asarray(gaps)


def _entropy_reference(logits):
    """-Σ p log p of softmax(logits), row by row, in log space (log p = z - logsumexp z)."""
    out = []
    for z in np.asarray(logits, np.float64):
        logp = z - np.logaddexp.reduce(z)
        out.append(-float(np.sum(np.exp(logp) * logp)))
    return np.asarray(out)


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _flat_index(vectors, labels):
    from medsim.deploy.index import CaseIndex

    index = CaseIndex(vectors.shape[1], kind="flat", metric="ip", model_id="test:0", use_gpu=False)
    index.add(_unit(vectors), [{"id": f"c-{i:016x}", "label": lab} for i, lab in enumerate(labels)])
    return index


def _nearest_distance(pool, labelled):
    """Euclidean distance of each (unit) pool vector to its nearest labelled one, as sqrt(2 - 2 cos)."""
    cos = np.asarray(pool, np.float64) @ np.asarray(labelled, np.float64).T
    return np.sqrt(np.maximum(2.0 - 2.0 * cos.max(axis=1), 0.0))


# ------------------------------------------------------------------------------------------- kcenter_greedy
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("known", ["nothing", "centers", "min_dist"])
def test_kcenter_greedy_equals_brute_force(seed, known):
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(30, 5))
    centers = rng.normal(size=(7, 5)) if known == "centers" else None
    min_dist = rng.uniform(0.5, 3.0, size=30) if known == "min_dist" else None
    picked, gaps = kcenter_greedy(pool, centers, 8, min_dist=min_dist)
    ref_picked, ref_gaps = _kcenter_reference(pool, centers, 8, min_dist)
    assert picked == ref_picked
    np.testing.assert_allclose(gaps, ref_gaps, rtol=1e-9, atol=1e-9)
    if known == "nothing":
        assert picked[0] == 0 and np.isinf(gaps[0])
    assert np.all(np.diff(gaps) <= 1e-12)  # each gap bounds the next: farthest-first never grows


def test_kcenter_greedy_caps_n_at_the_pool_and_picks_each_point_once():
    rng = np.random.default_rng(5)
    pool, centers = rng.normal(size=(9, 3)), rng.normal(size=(4, 3))
    picked, gaps = kcenter_greedy(pool, centers, 20)
    assert sorted(picked) == list(range(9)) and len(gaps) == 9
    assert picked == _kcenter_reference(pool, centers, 20)[0]
    with pytest.raises(DeployError, match=r"\(N, D\), got shape \(9,\)"):
        kcenter_greedy(pool[:, 0], None, 2)
    with pytest.raises(DeployError, match=r"min_dist must be \(9,\), got \(8,\)"):
        kcenter_greedy(pool, None, 2, min_dist=np.ones(8))


def test_kcenter_greedy_never_picks_a_point_twice_when_some_are_already_labelled():
    """A pool point that is itself labelled (distance 0) is still a point of the pool: asking for every point
    returns each one once, the labelled one last."""
    rng = np.random.default_rng(6)
    pool = rng.normal(size=(6, 3))
    picked, gaps = kcenter_greedy(pool, pool[2:3], 6)
    assert sorted(picked) == list(range(6)), picked
    assert picked[-1] == 2 and gaps[-1] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ entropy
def test_entropy_equals_its_formula():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(size=(5, 4)), 50.0 * rng.normal(size=(5, 4))])
    np.testing.assert_allclose(entropy(z), _entropy_reference(z), rtol=1e-10, atol=1e-12)
    big = np.array([[1000.0, 999.0, -1000.0], [1e4, 0.0, 0.0], [-800.0, -801.0, -802.0]])
    got = entropy(big)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _entropy_reference(big), rtol=1e-10, atol=1e-12)
    assert got[1] == pytest.approx(0.0, abs=1e-12)
    p = np.array([np.e, 1.0]) / (np.e + 1.0)  # softmax([1000, 999]) by hand
    assert got[0] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-10)


@pytest.mark.parametrize("k", [2, 5, 10])
@pytest.mark.parametrize("value", [0.0, -3.5, 1e4])
def test_entropy_of_uniform_logits_is_log_k(k, value):
    assert entropy(np.full((2, k), value)) == pytest.approx([np.log(k)] * 2, rel=1e-12)


# --------------------------------------------------------------------------------- retrieval_disagreement
def test_retrieval_disagreement_by_hand():
    got = retrieval_disagreement([["a", "a", "a"], ["a", "b", "a", "b"], ["a", "b", "c", "d"], ["a", None, "a", "b"],
                                  [None, None], [], ["a", "b", "b", "c"]])
    np.testing.assert_allclose(got, [0.0, 0.5, 0.75, 1 - 2 / 3, 1.0, 1.0, 0.5], rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------------- rank_unlabelled
@pytest.fixture
def labelled():
    rng = np.random.default_rng(1)
    vectors = _unit(rng.normal(size=(20, 8)))
    return vectors, _flat_index(vectors, ["a", "b"] * 10)


def test_diversity_picks_the_pool_point_farthest_from_the_index(labelled):
    vectors, index = labelled
    pool = _unit(np.random.default_rng(2).normal(size=(12, 8)))
    dist = _nearest_distance(pool, vectors)
    ranked = rank_unlabelled({"embedding": pool}, index, strategy="diversity", n=1)
    assert [r["index"] for r in ranked] == [int(np.argmax(dist))]
    assert ranked[0]["distance"] == pytest.approx(dist.max(), abs=1e-5)
    # n picks: k-center greedy from the indexed vectors (unit vectors: Euclidean = sqrt(2 - 2 cos))
    ranked = rank_unlabelled({"embedding": pool}, index, strategy="diversity", n=4)
    ref_picked, ref_gaps = _kcenter_reference(pool, vectors, 4)
    assert [r["index"] for r in ranked] == ref_picked
    np.testing.assert_allclose([r["score"] for r in ranked], ref_gaps, atol=1e-5)
    np.testing.assert_allclose([r["distance"] for r in ranked], dist[ref_picked], atol=1e-5)


def test_diversity_without_labelled_cases_is_farthest_first_from_point_0():
    from medsim.deploy.index import CaseIndex

    pool = _unit(np.random.default_rng(3).normal(size=(10, 8)))
    empty = CaseIndex(8, model_id="test:0", use_gpu=False)
    ranked = rank_unlabelled({"embedding": pool}, empty, strategy="diversity", n=4)
    assert [r["index"] for r in ranked] == _kcenter_reference(pool, None, 4)[0]
    assert ranked[0]["index"] == 0 and all(np.isinf(r["distance"]) for r in ranked)


def test_uncertainty_with_logits_picks_the_max_entropy_row(labelled):
    _, index = labelled
    rng = np.random.default_rng(4)
    pool = {"embedding": _unit(rng.normal(size=(12, 8))), "logits": 3.0 * rng.normal(size=(12, 5))}
    ent = _entropy_reference(pool["logits"]) / np.log(5)
    for uncertainty in ("entropy", "auto"):
        ranked = rank_unlabelled(pool, index, strategy="uncertainty", uncertainty=uncertainty, n=3)
        assert [r["index"] for r in ranked] == list(np.argsort(-ent)[:3])
        np.testing.assert_allclose([r["score"] for r in ranked], np.sort(ent)[::-1][:3], rtol=1e-9)


def test_disagreement_uses_the_labels_of_the_neighbours():
    """Two clusters of indexed cases: around e0 all 'a'; around e2 'a', 'b', 'a', 'b'. A pool point at e2 has
    neighbours that disagree (0.5), one at e0 has not (0) — whatever the logits say."""
    rng = np.random.default_rng(7)
    eye = np.eye(6)
    vectors = np.concatenate([eye[0] + 0.05 * rng.normal(size=(4, 6)), eye[2] + 0.05 * rng.normal(size=(4, 6))])
    index = _flat_index(vectors, ["a", "a", "a", "a", "a", "b", "a", "b"])
    pool = {"embedding": _unit(np.stack([eye[0] + 0.01, eye[2] + 0.01])),
            "logits": np.array([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])}  # row 0 is the uncertain one by entropy
    by_labels = rank_unlabelled(pool, index, strategy="uncertainty", uncertainty="disagreement", n=2, k=4)
    assert [r["index"] for r in by_labels] == [1, 0]
    assert [r["uncertainty"] for r in by_labels] == pytest.approx([0.5, 0.0])
    by_logits = rank_unlabelled(pool, index, strategy="uncertainty", uncertainty="entropy", n=2, k=4)
    assert [r["index"] for r in by_logits] == [0, 1] and by_logits[0]["uncertainty"] == pytest.approx(1.0)
    auto = rank_unlabelled({"embedding": pool["embedding"]}, index, strategy="uncertainty", n=2, k=4)
    assert [r["index"] for r in auto] == [1, 0]  # no logits: auto means disagreement


def test_hybrid_is_kcenter_weighted_by_uncertainty(labelled):
    vectors, index = labelled
    rng = np.random.default_rng(8)
    pool = {"embedding": _unit(rng.normal(size=(12, 8))), "logits": 2.0 * rng.normal(size=(12, 3))}
    unc = _entropy_reference(pool["logits"]) / np.log(3)
    ranked = rank_unlabelled(pool, index, strategy="hybrid", uncertainty="entropy", n=5)
    # reference: greedy on d · (0.5 + u), d = distance to the indexed cases and the earlier picks
    x = pool["embedding"].astype(np.float64)
    d, taken, ref = _nearest_distance(x, vectors), [], []
    for _ in range(5):
        score = np.where(np.isin(np.arange(12), taken), -np.inf, d * (0.5 + unc))
        i = int(np.argmax(score))
        taken.append(i)
        ref.append(score[i])
        d = np.minimum(d, np.linalg.norm(x - x[i], axis=1))
    assert [r["index"] for r in ranked] == taken
    np.testing.assert_allclose([r["score"] for r in ranked], ref, atol=1e-5)
    everything = rank_unlabelled(pool, index, strategy="hybrid", n=50)
    assert sorted(r["index"] for r in everything) == list(range(12))  # n distinct indices, capped at the pool


@pytest.mark.parametrize("kwargs, msg", [
    ({"strategy": "random"}, "unknown active-learning strategy 'random'; choose diversity, uncertainty, hybrid"),
    ({"uncertainty": "margin"}, "unknown uncertainty 'margin'; choose auto, entropy, disagreement"),
    ({"uncertainty": "entropy"}, "uncertainty 'entropy' needs a model with logits"),
    ({"n": 0}, "n must be a positive integer, got 0"),
    ({"k": 1.5}, "k must be a positive integer, got 1.5"),
], ids=["strategy", "uncertainty", "entropy-without-logits", "n", "k"])
def test_rank_unlabelled_names_a_bad_option(labelled, kwargs, msg):
    _, index = labelled
    with pytest.raises(DeployError) as e:
        rank_unlabelled({"embedding": _unit(np.ones((2, 8)))}, index, **kwargs)
    assert msg in str(e.value)


def test_extra_labelled_images_count_as_labelled(labelled):
    vectors, index = labelled
    pool = _unit(np.random.default_rng(2).normal(size=(12, 8)))
    far = rank_unlabelled({"embedding": pool}, index, strategy="diversity", n=1)[0]["index"]
    extra = _unit(pool[far] + 0.01 * np.random.default_rng(9).normal(size=8))[None]
    ranked = rank_unlabelled({"embedding": pool}, index, extra_labelled=extra, strategy="diversity", n=12)
    assert ranked[0]["index"] != far
    row = next(r for r in ranked if r["index"] == far)
    assert row["distance"] == pytest.approx(float(np.linalg.norm(pool[far] - extra[0])), abs=1e-5)
    dist = np.minimum(_nearest_distance(pool, vectors), np.linalg.norm(pool - extra, axis=1))
    assert ranked[0]["index"] == int(np.argmax(dist))


# -------------------------------------------------------------------------------- Assistant on the tiny export
@pytest.fixture(scope="module")
def model_dir(exported) -> Path:
    return Path(exported["onnx_path"]).parent


@pytest.fixture(scope="module")
def index_dir(model_dir, tiny_run, tmp_path_factory) -> Path:
    from medsim.deploy.tasks import build_index

    out = tmp_path_factory.mktemp("assist") / "index"
    build_index(model_dir, tiny_run / "split.json", out, progress=False)
    return out


@pytest.fixture(scope="module")
def assistant(model_dir, index_dir):
    a = Assistant(model_dir, index_dir)
    yield a
    a.close()


@pytest.fixture(scope="module")
def split(tiny_run) -> dict:
    from medsim.data.splits import load_split

    return load_split(tiny_run / "split.json")


def test_similar_cases_equal_medsim_search(assistant, index_dir, split):
    from PIL import Image

    from medsim.deploy.tasks import case_names, search_images

    images = [it["image"] for it in split["test"]][:3]
    for image, ref in zip(images, search_images(index_dir, images, k=5)):
        got = assistant.similar_cases(image, k=5, thumbnails=16)
        assert got["k"] == 5 and got["model_id"] == assistant.model_id
        assert [c["rank"] for c in got["cases"]] == [1, 2, 3, 4, 5]
        assert [c["id"] for c in got["cases"]] == [h.record["id"] for h in ref]
        np.testing.assert_allclose([c["score"] for c in got["cases"]], [h.score for h in ref], atol=1e-6)
        assert [c["label"] for c in got["cases"]] == [h.record["label"] for h in ref]
        for c in got["cases"]:
            head, data = c["thumbnail"].split(",", 1)
            assert head == "data:image/png;base64"
            with Image.open(io.BytesIO(base64.b64decode(data))) as im:
                assert im.format == "PNG" and max(im.size) <= 16
        assert got["query"] == case_names([image])[0]
        text = json.dumps(got)
        assert Path(image).name not in text and Path(image).stem not in text
        bare = assistant.similar_cases(image, k=2, thumbnails=0)
        assert [c["id"] for c in bare["cases"]] == [h.record["id"] for h in ref[:2]]
        assert not any("thumbnail" in c for c in bare["cases"])


def test_similar_cases_exclude_self_drops_the_query_case(assistant, split):
    item = split["training"][0]  # an indexed case
    own = assistant.similar_cases(item["image"], k=3, thumbnails=0)["cases"]
    assert own[0]["id"] == item["id"] and own[0]["score"] == pytest.approx(1.0, abs=1e-5)
    loo = assistant.similar_cases(item["image"], k=3, exclude_self=True, thumbnails=0)["cases"]
    assert item["id"] not in [c["id"] for c in loo] and len(loo) == 3
    assert [c["id"] for c in loo] == [c["id"] for c in
                                     assistant.similar_cases(item["image"], k=4, thumbnails=0)["cases"][1:]]


def test_localize_label_is_medsim_localize_mask(assistant, model_dir, split, tmp_path):
    from PIL import Image

    from medsim.deploy.tasks import localize_images

    for i, image in enumerate([it["image"] for it in split["test"]][:2]):
        got = assistant.localize(image, tmp_path / f"a{i}")
        ref = localize_images(model_dir, [image], tmp_path / f"r{i}", progress=False)
        name = ref["names"][0]
        assert got["name"] == name and Path(got["overlay"]).is_file()
        with Image.open(got["label"]) as im, Image.open(image) as src:
            label = np.asarray(im)
            assert im.format == "PNG" and label.dtype == np.uint8 and label.shape == (src.height, src.width)
        with Image.open(tmp_path / f"r{i}" / f"{name}_mask.png") as m:
            mask = np.asarray(m) > 0
        assert set(np.unique(label)) <= {0, 1}
        np.testing.assert_array_equal(label, mask.astype(np.uint8))
        assert got["boxes"] == json.loads((tmp_path / f"r{i}" / f"{name}_boxes.json").read_text())["boxes"]


def test_classify_needs_logits(assistant, model_dir, split):
    assert not assistant.has_logits
    with pytest.raises(DeployError, match="no logits output") as e:
        assistant.classify(split["test"][0]["image"])
    assert str(model_dir) in str(e.value)


def test_outputs_are_cached_per_file_until_it_changes(assistant, split, tmp_path, monkeypatch):
    images = [Path(it["image"]) for it in split["test"][:3]]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    shutil.copy(images[0], a)
    shutil.copy(images[1], b)
    calls: list[list[str]] = []
    embed = assistant.engine.embed

    def counting(paths, **kw):
        calls.append(list(paths))
        return embed(paths, **kw)

    monkeypatch.setattr(assistant.engine, "embed", counting)
    first = assistant.outputs([a, b])
    again = assistant.outputs([b, a])
    assert calls == [[str(a), str(b)]]
    np.testing.assert_array_equal(again["embedding"], first["embedding"][::-1])
    assert set(first) == set(assistant.engine.output_names) and first["embedding"].shape[0] == 2

    shutil.copy(images[2], a)  # rewritten: another picture, a new modification time
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = assistant.outputs([a, b])
    assert calls[1:] == [[str(a)]]
    np.testing.assert_allclose(changed["embedding"][0], embed([str(images[2])])["embedding"][0], atol=1e-6)
    np.testing.assert_array_equal(changed["embedding"][1], first["embedding"][1])


def test_rank_unlabelled_of_files_equals_the_function(assistant, split):
    images = [it["image"] for it in split["test"]][:4]
    got = assistant.rank_unlabelled(images, strategy="hybrid", n=2)
    ref = rank_unlabelled(assistant.outputs(images), assistant.index, strategy="hybrid", n=2)
    assert got == ref and len({r["index"] for r in got}) == 2
    assert assistant.rank_unlabelled([], strategy="diversity") == []


def test_config_errors_name_the_folders(model_dir, index_dir, tmp_path):
    with pytest.raises(AssistConfigError, match="export folder") as e:
        Assistant(tmp_path / "no_export", index_dir)
    assert str(tmp_path / "no_export") in str(e.value)
    with pytest.raises(AssistConfigError, match="index folder") as e:
        Assistant(model_dir, tmp_path / "no_index")
    assert str(tmp_path / "no_index") in str(e.value)
    (tmp_path / "empty_index").mkdir()
    with pytest.raises(AssistConfigError) as e:
        Assistant(model_dir, tmp_path / "empty_index")
    assert str(tmp_path / "empty_index") in str(e.value)

    other = tmp_path / "other_export"  # the same files, but the manifest says another training run
    shutil.copytree(model_dir, other)
    man = json.loads((other / "manifest.json").read_text())
    man["source"]["sha256"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(AssistConfigError, match="different models") as e:
        Assistant(other, index_dir)
    assert str(other) in str(e.value) and str(index_dir) in str(e.value)
    assert isinstance(e.value, DeployError)


def test_classify_a_model_with_logits(sample_root, tmp_path_factory, tiny_overrides):
    """A classifier export (`--variant classifier`): probabilities are the softmax of the engine's logits, the label
    their argmax, and active learning's `auto` uncertainty is the classifier's normalised entropy."""
    from medsim.deploy.engine import EmbeddingEngine
    from medsim.deploy.tasks import build_index
    from medsim.engines.workflow import train_bundle
    from medsim.export.pipeline import export_run

    tmp = tmp_path_factory.mktemp("assist_cls")
    bundle = Path(__file__).resolve().parents[2] / "bundles" / "isic_dsl"
    train_bundle(bundle, variant="classifier", dataset_dir=str(sample_root / "derm"), output_dir=str(tmp / "run"),
                 overrides=tiny_overrides)
    export_run(tmp / "run", tmp / "export", opt_batch=2)
    build_index(tmp / "export", tmp / "run" / "split.json", tmp / "index", progress=False)
    from medsim.data.splits import load_split

    test = [it["image"] for it in load_split(tmp / "run" / "split.json")["test"]][:6]
    with EmbeddingEngine(tmp / "export", backend="ort-cpu") as e:
        logits = e.embed(test)["logits"].astype(np.float64)
        classes = e.classes
    a = Assistant(tmp / "export", tmp / "index")
    try:
        assert a.has_logits and a.classes == classes
        for img, z in zip(test, logits):
            got = a.classify(img)
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            np.testing.assert_allclose([got["probabilities"][c] for c in classes], p, atol=1e-5)
            assert got["label"] == classes[int(np.argmax(p))]
            assert got["entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-5)
        ranked = a.rank_unlabelled(test, strategy="uncertainty", n=len(test))
        want = entropy(logits) / np.log(len(classes))
        assert [r["index"] for r in ranked] == list(np.argsort(-want, kind="stable"))
        np.testing.assert_allclose([r["uncertainty"] for r in ranked], np.sort(want)[::-1], atol=1e-5)
    finally:
        a.close()


def test_localize_for_the_server_leaves_only_the_label_file(assistant, split, tmp_path, monkeypatch):
    """out_dir=None (what the app does per request): medsim localize's files go to a temporary folder that is gone
    afterwards; the label is one temporary file, equal to the one written with an out_dir."""
    import tempfile

    from PIL import Image

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    image = split["test"][0]["image"]
    got = assistant.localize(image)
    left = sorted(p.name for p in (tmp_path / "tmp").iterdir())
    assert left == [Path(got["label"]).name] and got["overlay"] is None
    ref = assistant.localize(image, tmp_path / "kept")
    np.testing.assert_array_equal(np.asarray(Image.open(got["label"])), np.asarray(Image.open(ref["label"])))
    assert got["boxes"] == ref["boxes"]
