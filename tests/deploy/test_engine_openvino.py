"""The OpenVINO backend of the torch-free runtime: fp32 equal to onnxruntime and PyTorch, bf16 close to fp32 (and
the same top-k through `medsim search`), `auto` choosing from the export's CPU timing, and clear errors (exit 2)
for choices that cannot run.

Skipped where OpenVINO is not installed (`pip install 'medsim[openvino]'`); the bf16 tests also where the CPU has no
bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES lacks BF16)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsim.cli import main
from medsim.deploy import BackendUnavailable, DeployError

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'medsim[openvino]'")


def _has_bf16() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


needs_bf16 = pytest.mark.skipif(not _has_bf16(), reason="this CPU has no bf16 (OpenVINO lists no BF16 capability)")


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture
def model_dir(exported, tmp_path) -> Path:
    d = tmp_path / "export"
    shutil.copytree(Path(exported["onnx_path"]).parent, d)
    return d


@pytest.fixture(scope="module")
def val_images(loaded) -> tuple[np.ndarray, np.ndarray]:
    from medsim.export.run import split_images

    x, y, _ = split_images(loaded, "validation")
    return x, y


def _doctor(model_dir: Path, rates: dict[str, float], passed=("fp32", "bf16")) -> None:
    m = json.loads((model_dir / "manifest.json").read_text())
    m["cpu_timing"] = {"batch": 8, "rounds": 3, "images_per_s": rates}
    m["openvino"] = {p: {"passed": p in passed} for p in ("fp32", "bf16")}
    (model_dir / "manifest.json").write_text(json.dumps(m))


def test_ov_runner_fp32_equals_onnxruntime_and_pytorch(exported, loaded, val_images):
    import torch

    from medsim.runtime.runners import OrtRunner, OvRunner, ort_session, run_batched

    onnx_path = exported["onnx_path"]
    x = val_images[0]
    runner = OvRunner(onnx_path, "fp32", threads=1)
    assert runner.max_batch is None and set(runner.output_names) == {"embedding", "attention"}
    got = run_batched(runner, x, 3)  # dynamic batch: 3, 3, ragged tail
    ref = run_batched(OrtRunner(ort_session(onnx_path, threads=1)), x, 8)
    with torch.no_grad():
        pt = loaded.network.eval()(torch.from_numpy(x))
    for n in runner.output_names:
        assert got[n].dtype == np.float32 and got[n].shape == ref[n].shape
        assert np.abs(got[n] - ref[n]).max() <= 1e-4
        assert np.abs(got[n] - pt[n].numpy()).max() <= 1e-4
    runner.close()


@needs_bf16
def test_bf16_embeddings_close_to_fp32(model_dir, val_images):
    from medsim.deploy.engine import open_engine

    x = val_images[0]
    with open_engine(model_dir, "openvino", "bf16", threads=1) as e16, \
            open_engine(model_dir, "openvino", "fp32", threads=1) as e32:
        assert e16.backend == e32.backend == "openvino"
        a, b = e16.run(x)["embedding"], e32.run(x)["embedding"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.99 and np.abs(a - b).max() > 0  # close, and really another precision


def _topk(stdout: str) -> list[list[str]]:
    """The case ids of each query's hits, from `medsim search`'s printed table."""
    rows: list[list[str]] = []
    for line in stdout.splitlines():
        if line.startswith("query "):
            rows.append([])
        elif rows and re.match(r"\s+\d+\s", line):
            rows[-1].append(line.split()[-1])
    return rows


@pytest.fixture(scope="module")
def ov_export(tiny_run, tmp_path_factory) -> Path:
    """`medsim export` of the tiny run with OpenVINO installed: its manifest holds the OpenVINO checks, the bf16
    recheck margin calibrated on the validation split, and the CPU timing."""
    from medsim.export import export_run

    out = tmp_path_factory.mktemp("ov_export") / "export"
    export_run(tiny_run, out)
    return out


def _search_three_ways(idx: Path, split: Path, capsys) -> tuple[dict, dict, dict]:
    """`medsim search` of the test split at fp32, bf16 and bf16 --no-recheck: printed top-5 ids, stdout, and the
    same searches through the Python API (hits with their recheck record)."""
    from medsim.deploy.tasks import read_cases, search_images

    printed, outs = {}, {}
    for name, prec, extra in (("fp32", "fp32", []), ("bf16", "bf16", []), ("alone", "bf16", ["--no-recheck"])):
        code, out, err = run(["search", "--index", str(idx), "--data", str(split), "--split", "test", "--k", "5",
                              "--backend", "openvino", "--precision", prec, "--threads", "1", *extra], capsys)
        assert code == 0, err
        printed[name], outs[name] = _topk(out), out
    queries = [c["uri"] for c in read_cases(split, split="test")]
    hits = {name: search_images(idx, queries, k=5, backend="openvino", precision=prec, recheck=name != "alone")
            for name, prec in (("fp32", "fp32"), ("bf16", "bf16"), ("alone", "bf16"))}
    for name in hits:
        assert [[str(h.record.get("id", h.id)) for h in row] for row in hits[name]] == printed[name]
    return printed, outs, hits


def _check_recheck(hits: dict, outs: dict, margin: float) -> float:
    """The recheck as the result and the printout report it; the share of queries with fp32's top-5 set."""
    n = len(hits["fp32"])
    assert hits["bf16"].margin == pytest.approx(margin) and hits["alone"].margin is None
    shown = re.search(r"fp32 recheck: (\d+) of (\d+) queries", outs["bf16"])
    assert shown and int(shown.group(1)) == len(hits["bf16"].rechecked) and int(shown.group(2)) == n
    assert "fp32 recheck" not in outs["alone"] and "fp32 recheck" not in outs["fp32"]
    ids = {name: [[h.id for h in row] for row in rows] for name, rows in hits.items()}
    for i in range(n):  # rechecked: searched with the fp32 embedding, fp32's hits in order; others: bf16 alone
        assert ids["bf16"][i] == ids["fp32" if i in hits["bf16"].rechecked else "alone"][i], i
    return float(np.mean([set(a) == set(b) for a, b in zip(ids["fp32"], ids["bf16"])]))


@needs_bf16
def test_search_bf16_same_topk_as_fp32(ov_export, tiny_run, tmp_path, capsys):
    """The issue's CI check: `medsim search --backend openvino --precision bf16` against an index built at fp32
    finds the same top-5 *set* as fp32 for >= 99 % of the test split's queries.

    bf16 moves cosine scores by ~1e-3 and the tiny 1-epoch model's neighbours are closer than that, so bf16 alone
    changes top-5 sets; the fp32 recheck embeds again in fp32 the queries whose 5th and 6th hits are within the
    export's margin. The tiny run's validation split (7 images) is too small to calibrate a margin, so its export
    rechecks every query (method "all"); a partial recheck (a margin at the median gap) is checked next, and the
    calibrated margin's share on a real model is measured by benchmarks/cpu_engines.py."""
    from medsim.deploy.tasks import read_cases, search_images

    m = json.loads((ov_export / "manifest.json").read_text())
    rec = m["openvino"]["bf16"]["recheck"]
    assert rec["images"] < 100 and rec["method"] == "all" and set(rec["by_k"]) <= {"1", "5", "10"}
    split = tiny_run / "split.json"
    idx = tmp_path / "ix"
    code, _, err = run(["index", "build", "--model", str(ov_export), "--data", str(split), "--out", str(idx),
                        "--threads", "1"], capsys)
    assert code == 0, err
    _, outs, hits = _search_three_ways(idx, split, capsys)
    same = _check_recheck(hits, outs, rec["margin"])
    assert len(hits["bf16"].rechecked) == len(hits["fp32"]) > 0
    assert same >= 0.99, f"bf16 with the fp32 recheck has fp32's top-5 set for {same:.1%} of the queries"

    # a margin between the gaps: only the queries closer to a tie are rechecked, the others keep bf16's hits
    queries = [c["uri"] for c in read_cases(split, split="test")]
    gaps = [row[4].score - row[5].score
            for row in search_images(idx, queries, k=6, backend="openvino", precision="bf16", recheck=False)]
    margin = float(np.median(gaps))
    m["openvino"]["bf16"]["recheck"] = {**rec, "margin": margin}
    (ov_export / "manifest.json").write_text(json.dumps(m))
    try:
        _, outs, hits = _search_three_ways(idx, split, capsys)
        _check_recheck(hits, outs, margin)
        assert 0 < len(hits["bf16"].rechecked) < len(hits["fp32"])
    finally:
        m["openvino"]["bf16"]["recheck"] = rec
        (ov_export / "manifest.json").write_text(json.dumps(m))


@needs_bf16
def test_recheck_notes_when_it_cannot_apply(ov_export, tiny_run, tmp_path):
    """An index built at bf16 holds bf16 embeddings: a recheck cannot give fp32's top-k, and the result says so;
    an export without a calibrated margin (made before the recheck) says how to get one."""
    from medsim.deploy.tasks import build_index, read_cases, search_images

    split = tiny_run / "split.json"
    queries = [c["uri"] for c in read_cases(split, split="test")][:4]
    build_index(ov_export, split, tmp_path / "ix16", backend="openvino", precision="bf16", progress=False)
    hits = search_images(tmp_path / "ix16", queries, k=3, backend="openvino", precision="bf16")
    assert hits.margin is None and "holds bf16 embeddings" in hits.recheck_note
    old = tmp_path / "old_export"
    shutil.copytree(ov_export, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["openvino"]["bf16"]["recheck"]
    (old / "manifest.json").write_text(json.dumps(m))
    build_index(old, split, tmp_path / "ix32", progress=False)
    hits = search_images(tmp_path / "ix32", queries, k=3, backend="openvino", precision="bf16")
    assert hits.margin is None and "records no bf16 recheck margin" in hits.recheck_note


@needs_bf16
def test_recheck_margin_from_someone_else_is_checked(ov_export, tmp_path):
    """The margin is read from an export (data from someone else): anything but a finite number >= 0 is refused,
    naming the manifest field."""
    from medsim.deploy import open_engine

    bad = tmp_path / "bad"
    shutil.copytree(ov_export, bad)
    m = json.loads((bad / "manifest.json").read_text())
    for value in ("0.001", -1.0, float("inf"), True, [1e-3]):
        m["openvino"]["bf16"]["recheck"] = {"margin": value}
        (bad / "manifest.json").write_text(json.dumps(m))
        with open_engine(bad, "openvino", "bf16") as eng, pytest.raises(DeployError, match=r"bf16\.recheck\.margin"):
            eng.recheck_margin  # noqa: B018 - the property reads and checks the field
    m["openvino"]["bf16"]["recheck"] = {"margin": 0.002}
    (bad / "manifest.json").write_text(json.dumps(m))
    with open_engine(bad, "openvino", "bf16") as eng, open_engine(bad, "openvino", "fp32") as e32:
        assert eng.recheck_margin == 0.002 and e32.recheck_margin is None


def test_auto_picks_from_the_export_timing(model_dir):
    from medsim.deploy.engine import EmbeddingEngine, timed_cpu_backend

    with EmbeddingEngine(model_dir, threads=1) as e:  # no timing recorded (older export): onnxruntime as before
        assert e.backend == "ort-cpu"
    _doctor(model_dir, {"ort-cpu/fp32": 100.0, "openvino/fp32": 150.0, "openvino/bf16": 300.0})
    with EmbeddingEngine(model_dir, threads=1) as e:
        assert e.backend == "openvino" and e._runner.precision == "fp32"  # fp32 asked: never bf16 behind its back
    _doctor(model_dir, {"ort-cpu/fp32": 200.0, "openvino/fp32": 150.0})
    with EmbeddingEngine(model_dir, threads=1) as e:
        assert e.backend == "ort-cpu"  # never a slower one
    _doctor(model_dir, {"ort-cpu/fp32": 100.0, "openvino/fp32": 150.0}, passed=())
    with EmbeddingEngine(model_dir, threads=1) as e:
        assert e.backend == "ort-cpu"  # faster, but its parity check failed
    m = json.loads((model_dir / "manifest.json").read_text())
    assert timed_cpu_backend(m, "fp32") == "ort-cpu" and timed_cpu_backend(m, "int8") is None


def test_auto_falls_back_to_onnxruntime_without_openvino(model_dir, monkeypatch):
    import sys

    from medsim.deploy.engine import EmbeddingEngine

    _doctor(model_dir, {"ort-cpu/fp32": 100.0, "openvino/fp32": 150.0})
    monkeypatch.setitem(sys.modules, "openvino", None)
    with EmbeddingEngine(model_dir, threads=1) as e:
        assert e.backend == "ort-cpu"
    with pytest.raises(BackendUnavailable, match=r"openvino is not installed.*medsim\[openvino\]"):
        EmbeddingEngine(model_dir, backend="openvino")


def test_bad_choices_exit_2_with_the_fix(model_dir, sample_root, tmp_path, capsys, monkeypatch):
    img = str(sorted((sample_root / "derm" / "images").glob("*.png"))[0])
    base = ["localize", "--model", str(model_dir), img, "--out", str(tmp_path / "l")]
    code, _, err = run(base + ["--backend", "ort-cpu", "--precision", "bf16"], capsys)
    assert code == 2 and "bf16 runs on OpenVINO only" in err and "--backend openvino" in err
    code, _, err = run(base + ["--backend", "openvino", "--precision", "int8"], capsys)
    assert code == 2 and "no OpenVINO INT8 model" in err and "--quantize openvino" in err
    code, _, err = run(base + ["--backend", "tensorrt", "--precision", "bf16"], capsys)
    assert code == 2 and "--precision fp32 --backend tensorrt" in err
    with pytest.raises(DeployError, match="precision must be one of fp32, bf16, int8"):
        from medsim.deploy.engine import open_engine

        open_engine(model_dir, "openvino", "fp16")
    import medsim.runtime.runners as runners

    monkeypatch.setattr(runners, "openvino_missing", lambda precision="fp32": ["a CPU with bf16 support (test)"]
                        if precision == "bf16" else [])
    import medsim.deploy.engine as engine

    monkeypatch.setattr(engine, "openvino_missing", runners.openvino_missing)
    code, _, err = run(base + ["--backend", "openvino", "--precision", "bf16"], capsys)
    assert code == 2 and "OpenVINO bf16 unavailable" in err and "a CPU with bf16 support" in err
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    code, _, err = run(base + ["--backend", "openvino"], capsys)
    assert code == 2 and "openvino is not installed" in err and "medsim[openvino]" in err
