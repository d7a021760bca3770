"""CaseIndex at scale (medsim.deploy.index_scale): the ``ondisk`` (OnDiskInvertedLists) and ``sharded``
(IndexShards) kinds against exact search, block-wise building from a memmap or an iterator, save/load round trips
(also after moving the folder), hostile manifests, interrupted builds, and the benchmark at a tiny size."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from medsim.deploy.index import META_FILE, CaseIndex, CaseIndexError  # noqa: E402
from medsim.errors import MedsimError  # noqa: E402
from test_index import MODEL, clustered, recall_at, records_for  # noqa: E402

SCALE_KINDS = ["ondisk", "sharded"]
#: recall@10 bounds of the approximate settings below, on 4000 × 32 clustered vectors (measured with faiss 1.15.1:
#: 0.987 for flat codes at nprobe 4 of 32 lists; 0.877 for 16-byte PQ codes (nbits 6) at nprobe 8)
RECALL_FLAT_NPROBE4 = 0.95
RECALL_PQ_NPROBE8 = 0.8


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(4000, 32, n_clusters=40, seed=3)
    q = clustered(60, 32, n_clusters=40, seed=4)
    exact = faiss.IndexFlatIP(32)
    exact.add(x)
    scores, ids = exact.search(q, 10)
    return x, q, scores, ids


@pytest.fixture()
def memmap(tmp_path, data) -> np.ndarray:
    f = tmp_path / "x.f32"
    mm = np.memmap(f, np.float32, "w+", shape=data[0].shape)
    mm[:] = data[0]
    mm.flush()
    return np.memmap(f, np.float32, "r", shape=data[0].shape)


def build(tmp_path, vectors, kind, name="cases", **kw):
    kw = {"nlist": 32, "shard_size": 1500, "chunk_size": 700, "model_id": MODEL, **kw}
    return CaseIndex.build(tmp_path / name, vectors, kind=kind, **kw)


def assert_no_leftovers(parent: Path, *allowed: str) -> None:
    assert sorted(p.name for p in parent.iterdir() if p.name not in allowed) == []


# --------------------------------------------------------------------------- against exact search

@pytest.mark.parametrize("kind", SCALE_KINDS)
def test_flat_codes_with_every_list_probed_equal_exact_search(tmp_path, data, memmap, kind):
    _, q, scores, ids = data
    index = build(tmp_path, memmap, kind)
    got_scores, got_ids = index.search_arrays(q, 10, nprobe=32)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-6)
    assert recall_at(index.search_arrays(q, 10, nprobe=4)[1], ids) >= RECALL_FLAT_NPROBE4


@pytest.mark.parametrize("kind", SCALE_KINDS)
def test_pq_codes_recall(tmp_path, data, memmap, kind):
    _, q, _, ids = data
    index = build(tmp_path, memmap, kind, codes="pq", m_pq=16, nbits=6, train_size=4000)
    assert index.factory_string == "IVF32,PQ16x6np"
    assert recall_at(index.search_arrays(q, 10, nprobe=8)[1], ids) >= RECALL_PQ_NPROBE8


# --------------------------------------------------------------------------- building in blocks

@pytest.mark.parametrize("kind", SCALE_KINDS)
def test_memmap_in_blocks_equals_building_in_memory(tmp_path, data, memmap, kind):
    """Trained on all rows both ways, so the only difference is blocks + temporary shards vs one add."""
    x, q, _, _ = data
    blocks = build(tmp_path, memmap, kind, name="blocks", train_size=len(x), chunk_size=333)
    whole = CaseIndex(32, kind=kind, nlist=32, model_id=MODEL)
    whole.add(x)
    for nprobe in (3, 32):
        a, b = blocks.search_arrays(q, 10, nprobe=nprobe), whole.search_arrays(q, 10, nprobe=nprobe)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    if kind == "ondisk":  # the merged lists are byte for byte those of the one-piece index
        whole.save(tmp_path / "whole")
        assert sorted(p.name for p in (tmp_path / "blocks").glob("lists-*")) == \
            sorted(p.name for p in (tmp_path / "whole").glob("lists-*"))


def test_build_from_an_iterator_of_blocks_with_records(tmp_path, data):
    x, q, _, ids = data
    blocks = (x[s:s + 450] for s in range(0, len(x), 450))
    index = CaseIndex.build(tmp_path / "cases", blocks, records_for(len(x)), kind="ondisk", nlist=32,
                            train_size=2000, model_id=MODEL)
    assert len(index) == len(x) and index.record(7)["patient"] == f"p-{7:016x}"
    assert recall_at(index.search_arrays(q, 10, nprobe=32)[1], ids) == 1.0
    assert CaseIndex.load(tmp_path / "cases").search(q[:1], 1)[0][0].record == index.search(q[:1], 1)[0][0].record


def test_identifiers_in_clear_are_refused_before_anything_is_written(tmp_path, data):
    x = data[0][:500]
    recs = records_for(500)
    recs[400] = {"patient_name": "Doe^Jane"}
    with pytest.raises(ValueError, match="rows 400-499 of the vectors: record 0 has the key 'patient_name'"):
        CaseIndex.build(tmp_path / "cases", x, recs, kind="sharded", nlist=8, chunk_size=200, model_id=MODEL)
    assert_no_leftovers(tmp_path)


# --------------------------------------------------------------------------- save, load, add, remove

@pytest.mark.parametrize("kind", SCALE_KINDS)
def test_round_trip_after_moving_the_folder_then_add_remove_and_save_again(tmp_path, data, memmap, kind):
    x, q, _, _ = data
    index = build(tmp_path, memmap, kind)
    before = index.search_arrays(q, 10, nprobe=8)
    moved = tmp_path / "elsewhere" / "cases"
    moved.parent.mkdir()
    shutil.move(tmp_path / "cases", moved)  # the .ivfdata file is found next to the index file, not where built
    loaded = CaseIndex.load(moved, expected_model_id=MODEL)
    assert loaded.kind == kind and loaded.nlist == 32 and len(loaded) == len(x)
    for a, b in zip(loaded.search_arrays(q, 10, nprobe=8), before):
        np.testing.assert_array_equal(a, b)
    new = loaded.add(x[:10] * 0.5 + x[10:20] * 0.5)  # searched beside the saved lists until the next save
    assert new.tolist() == list(range(len(x), len(x) + 10))
    first = loaded.search_arrays(q, 3, nprobe=32)[1][:, 0]
    assert loaded.remove(first[:2]) == 2
    after = loaded.search_arrays(q, 10, nprobe=32)
    assert not np.isin(after[1], first[:2]).any()
    loaded.save(moved)
    again = CaseIndex.load(moved)
    assert len(again) == len(x) + 8
    for a, b in zip(again.search_arrays(q, 10, nprobe=32), after):
        np.testing.assert_array_equal(a, b)
    kept = {"ondisk": ["index-", "lists-", "trained-"], "sharded": ["shard0-", "shard1-", "shard2-", "shard3-"]}
    assert sorted(p.name.split("-")[0] + "-" for p in moved.iterdir() if p.name != META_FILE) == kept[kind]
    assert_no_leftovers(moved.parent, "cases")


def test_an_unchanged_ondisk_index_saves_to_its_folder_and_elsewhere(tmp_path, data):
    """Saving a loaded index without changes links its .ivfdata file (never rewritten); the copy stands alone."""
    x, q, _, _ = data
    build(tmp_path, x[:2000], "ondisk", nlist=16)
    before = sorted(p.name for p in (tmp_path / "cases").iterdir())
    loaded = CaseIndex.load(tmp_path / "cases")
    expected = loaded.search_arrays(q, 10)
    loaded.save(tmp_path / "cases")
    assert sorted(p.name for p in (tmp_path / "cases").iterdir()) == before
    loaded.save(tmp_path / "copy")
    shutil.rmtree(tmp_path / "cases")
    for index in (loaded, CaseIndex.load(tmp_path / "copy")):
        for a, b in zip(index.search_arrays(q, 10), expected):
            np.testing.assert_array_equal(a, b)
    assert_no_leftovers(tmp_path, "copy")


def test_untrained_scale_index_saves_and_loads(tmp_path):
    for kind in SCALE_KINDS:
        out = CaseIndex(8, kind=kind, model_id=MODEL).save(tmp_path / kind)
        loaded = CaseIndex.load(out)
        assert len(loaded) == 0 and not loaded.is_trained and loaded.min_train_size == 1


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("field, value", [
    ("ivfdata_file", "../../etc/x"), ("ivfdata_file", "/etc/passwd"), ("index_file", "sub/index.faiss"),
    ("trained_file", ".."), ("ivfdata_file", None),
])
def test_a_manifest_naming_files_outside_the_folder_is_refused(tmp_path, data, field, value):
    build(tmp_path, data[0][:1000], "ondisk", nlist=8)
    meta_path = tmp_path / "cases" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta[field] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CaseIndexError, match=rf"{META_FILE}: field '{field}' must name a file inside the index "
                                             rf"folder.*got {re.escape(repr(value))}") as err:
        CaseIndex.load(tmp_path / "cases")
    assert isinstance(err.value, MedsimError)


def test_a_shard_entry_outside_the_folder_is_refused(tmp_path, data):
    build(tmp_path, data[0][:1000], "sharded", nlist=8)
    meta_path = tmp_path / "cases" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["shard_files"][1]["file"] = "../../etc/passwd"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CaseIndexError, match=r"field 'shard_files\[1\]\.file' must name a file inside"):
        CaseIndex.load(tmp_path / "cases")


def test_a_symlink_out_of_the_folder_and_a_modified_ivfdata_are_refused(tmp_path, data):
    build(tmp_path, data[0][:1000], "ondisk", nlist=8)
    root = tmp_path / "cases"
    lists = next(root.glob("lists-*.ivfdata"))
    outside = tmp_path / "outside.ivfdata"
    shutil.move(lists, outside)
    lists.symlink_to(outside)
    with pytest.raises(CaseIndexError, match="field 'ivfdata_file'.*outside the index folder"):
        CaseIndex.load(root)
    lists.unlink()
    raw = bytearray(outside.read_bytes())
    raw[100] ^= 1
    lists.write_bytes(bytes(raw))
    with pytest.raises(CaseIndexError, match=rf"{lists.name}: checksum mismatch"):
        CaseIndex.load(root)


def test_a_faiss_file_of_another_structure_is_refused(tmp_path, data):
    build(tmp_path, data[0][:1000], "ondisk", nlist=8)
    meta_path = tmp_path / "cases" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["params"]["codes"] = "pq"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CaseIndexError, match="holds a IndexIVFFlat.*describes a IndexIVFPQ"):
        CaseIndex.load(tmp_path / "cases")


class Interrupted(Exception):
    pass


def blocks_then_failure(x: np.ndarray, after: int):
    for i, s in enumerate(range(0, len(x), 500)):
        if i == after:
            raise Interrupted("the data source failed")
        yield x[s:s + 500]


@pytest.mark.parametrize("kind", SCALE_KINDS)
def test_an_interrupted_build_leaves_no_index_and_an_old_index_intact(tmp_path, data, kind):
    x, q, _, _ = data
    with pytest.raises(Interrupted):  # after temporary shards were written (shard_size 1500 < 3000 rows)
        CaseIndex.build(tmp_path / "new", blocks_then_failure(x, 6), kind=kind, nlist=16, train_size=1000,
                        shard_size=1500, model_id=MODEL)
    assert_no_leftovers(tmp_path)
    old = build(tmp_path, x[:2000], kind, nlist=16)
    files = {p.name: p.read_bytes() for p in (tmp_path / "cases").iterdir()}
    with pytest.raises(Interrupted):
        CaseIndex.build(tmp_path / "cases", blocks_then_failure(x, 6), kind=kind, nlist=16, train_size=1000,
                        shard_size=1500, model_id=MODEL)
    assert {p.name: p.read_bytes() for p in (tmp_path / "cases").iterdir()} == files
    assert_no_leftovers(tmp_path, "cases")
    for a, b in zip(CaseIndex.load(tmp_path / "cases").search_arrays(q, 5), old.search_arrays(q, 5)):
        np.testing.assert_array_equal(a, b)


def test_a_file_where_the_folder_should_be_is_refused(tmp_path, data):
    (tmp_path / "cases").write_text("not a folder")
    with pytest.raises(CaseIndexError, match="cases: cannot build a case index there: it is a file"):
        CaseIndex.build(tmp_path / "cases", data[0], kind="ondisk", model_id=MODEL)


def test_bad_scale_options():
    with pytest.raises(ValueError, match="codes must be 'flat'.*got 'sq8'"):
        CaseIndex(8, kind="ondisk", codes="sq8", model_id=MODEL)
    with pytest.raises(ValueError, match="shards must be positive, got 0"):
        CaseIndex(8, kind="sharded", shards=0, model_id=MODEL)
    with pytest.raises(ValueError, match="codes='pq' applies to kind='ondisk' or 'sharded' only, not 'flat'"):
        CaseIndex(8, codes="pq", model_id=MODEL)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        CaseIndex(8, model_id=MODEL).add_batches(np.ones((2, 8), np.float32), chunk_size=0)


def test_index_build_offers_the_scale_kinds_and_their_options():
    from click.testing import CliRunner

    from medsim.cli import cli

    result = CliRunner().invoke(cli, ["index", "build", "--help"])
    assert result.exit_code == 0
    for option in ("ondisk", "sharded", "--nlist", "--nprobe", "--codes", "--shards"):
        assert option in result.output


def test_index_build_ondisk_through_the_cli_searches_like_flat(exported, tiny_run, tmp_path, capsys):
    """`medsim index build --kind ondisk` on the tiny exported run: every list probed, the hits equal the flat
    index's; the options reach CaseIndex and are saved."""
    from medsim.cli import main
    from medsim.data.splits import load_split
    from medsim.deploy.tasks import search_images

    model_dir = Path(exported["onnx_path"]).parent
    split = tiny_run / "split.json"
    common = ["index", "build", "--model", str(model_dir), "--data", str(split)]
    for argv in ([*common, "--out", str(tmp_path / "flat")],
                 [*common, "--out", str(tmp_path / "ondisk"), "--kind", "ondisk", "--nlist", "2", "--nprobe", "2"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "ondisk" / META_FILE).read_text())
    assert meta["kind"] == "ondisk" and meta["params"]["nlist"] == 2 and meta["params"]["nprobe"] == 2
    assert meta["ivfdata_file"].endswith(".ivfdata") and (tmp_path / "ondisk" / "cases.local.json").is_file()
    test = [it["image"] for it in load_split(split)["test"]]
    ids = [[[h.record["id"] for h in row] for row in search_images(tmp_path / name, test, k=3)]
           for name in ("flat", "ondisk")]
    assert ids[0] == ids[1]


# --------------------------------------------------------------------------- the benchmark, tiny

def test_faiss_scale_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "faiss_scale"
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "benchmarks" / "faiss_scale.py"), "--sizes", "2000", "4000", "--dim", "16",
           "--clusters", "20", "--queries", "30", "--latency-queries", "20", "--nprobe", "1,4,512",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["command"].startswith("python ") and "--sizes 2000 4000" in doc["command"]
    assert [r["N"] for r in doc["sizes"]] == [2000, 4000]
    for row in doc["sizes"]:
        assert row["build_s"] > 0 and row["train_s"] > 0 and row["peak_anon_bytes"] > 0 and row["peak_rss_bytes"] > 0
        assert row["index_bytes"] > row["N"] * 16 * 4  # flat codes: the vectors themselves
        assert [r["nprobe"] for r in row["search"]] == [1, 4, row["nlist"]]  # 512 > nlist: clipped
        assert row["search"][-1]["recall@10"] == 1.0  # every list visited, flat codes: exact
        assert all(r["latency_ms_p50"] > 0 and r["qps_batch64"] > 0 for r in row["search"])
        assert row["chosen"]["recall@10"] >= 0.95
    assert {"build_s", "peak_anon_bytes", "index_bytes"} <= set(doc["fit"])
    assert doc["fit"]["index_bytes"]["at_N"] == 100_000_000 and doc["fit"]["index_bytes"]["predicted"] > 0
    assert "Command:" in out.with_suffix(".md").read_text()
    assert not any((tmp_path / "work").iterdir())  # memmaps and indexes are deleted after each size
    # a later run of another size merges the earlier sizes into its table and fit; other settings are refused
    merged = tmp_path / "merged"
    run = subprocess.run(cmd[:3] + ["3000"] + cmd[5:-1] + [str(merged), "--merge", str(out.with_suffix(".json"))],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    doc2 = json.loads(merged.with_suffix(".json").read_text())
    assert [r["N"] for r in doc2["sizes"]] == [2000, 3000, 4000] and doc2["merged"]["sizes"] == [2000, 4000]
    assert doc2["sizes"][0] == doc["sizes"][0] and " ; then " in doc2["command"]
    assert "merged from the earlier run" in merged.with_suffix(".md").read_text()
    bad = subprocess.run(cmd[:3] + ["3000"] + cmd[5:-1] + [str(tmp_path / "bad"), "--dim", "8", "--merge",
                                                            str(out.with_suffix(".json"))],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert bad.returncode != 0 and "settings differ" in bad.stderr and "dim" in bad.stderr
