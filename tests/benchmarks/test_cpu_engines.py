"""benchmarks/cpu_engines.py at smoke size (the tiny run, 1 round, tiny batches): every engine is measured and the
JSON holds what the markdown and the issue's verdict need. Skipped without OpenVINO/NNCF."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'medsim[openvino]'")
pytest.importorskip("nncf", reason="NNCF is not installed: pip install 'medsim[openvino]'")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import cpu_engines as B  # noqa: E402


def test_cpu_engines_smoke_json_fields(tiny_run, tmp_path):
    out = tmp_path / "res"
    assert B.main(["--run", str(tiny_run), "--work", str(tmp_path / "work"), "--out", str(out), "--images", "16",
                   "--batches", "1", "4", "--rounds", "1", "--seconds", "0.05", "--warmup", "0.02",
                   "--pause", "0", "--max-wait", "0", "--threads", "1", "--max-calibration", "16"]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["command"].startswith("python ") and "--run" in doc["command"]
    engines = {r["engine"] for r in doc["rows"]}
    assert engines == set(B.ENGINES) - set(doc["engines_skipped"])
    assert {"pytorch_fp32", "pytorch_bf16_cl", "ort_fp32", "ort_int8", "openvino_fp32", "openvino_int8"} <= engines
    assert {r["batch"] for r in doc["rows"]} == {1, 4} and doc["validation"]["name"] == "test"
    for r in doc["rows"]:
        assert r["img_per_s_median"] > 0 and len(r["rounds"]) == 1
        for k in ("R@1", "R@1_balanced", "dR@1_points", "dR@1_balanced_points", "mean_cosine_to_pytorch_fp32",
                  "ratio_vs_pytorch_fp32"):
            assert isinstance(r[k], float), k
    base = [r for r in doc["rows"] if r["engine"] == "pytorch_fp32"]
    assert all(r["ratio_vs_pytorch_fp32"] == pytest.approx(1.0) and r["dR@1_points"] == 0.0 for r in base)
    assert doc["export_manifest"]["openvino"]["int8"]["model"] == "model.ov-int8.xml"
    assert doc["export_manifest"]["cpu_timing"]["images_per_s"]
    ref = doc["quality"]["pytorch_fp32"]["top5_vs_pytorch_fp32"]
    assert {k: ref[k] for k in ("same_set", "same_order", "within_ties", "same_top1", "score_error_p90")} == \
        {"same_set": 1.0, "same_order": 1.0, "within_ties": 1.0, "same_top1": 1.0, "score_error_p90": 0.0}
    assert "top5_vs_openvino_fp32" in doc["quality"]["openvino_int8"]
    # the tiny run's 7 validation images are too few to calibrate: its export rechecks every query
    assert {"ort_int8", "openvino_int8"} <= set(doc["recheck"])
    for r in doc["recheck"].values():
        assert r["method"] == "all" and {"1", "5"} <= set(r["by_k"]) <= {"1", "5", "10"}  # k <= images - 2
        assert all(v["same_set_rechecked"] == v["recheck_share"] == 1.0 for v in r["by_k"].values())
    pipe = doc["search_pipelines"]
    if "openvino_bf16" in engines:
        assert pipe["rechecked"] == pipe["queries"] == doc["validation"]["images"] and pipe["ratio_vs_pytorch_fp32"]["pytorch_fp32"] == 1.0
    md = out.with_suffix(".md").read_text()
    assert "Command: `python " in md and "OpenVINO INT8 (NNCF)" in md and "Top-5 agreement" in md
    assert "fp32 recheck" in md and ("Whole search" in md) == ("openvino_bf16" in engines)


def test_search_pipeline_rechecks_the_near_ties():
    """The timed search re-embeds exactly the queries whose k-th and (k+1)-th hits are within the margin."""
    from medsim.runtime.ties import near_ties, topk_neighbours

    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(60, 8)).astype(np.float32)
    x = rng.normal(size=(45, 8)).astype(np.float32)  # "images" are embeddings here: the embed functions pass them
    seen = []

    def fp32(xb):
        seen.append(len(xb))
        return xb

    _, sc = topk_neighbours(x, gallery, 6)
    margin = float(np.median(sc[:, 4] - sc[:, 5]))
    n = B.search_pipeline(lambda xb: xb, gallery, x, k=5, batch=16, margin=margin, embed32=fp32)
    assert n == int(near_ties(sc, 5, margin).sum()) == sum(seen) > 0
    assert B.search_pipeline(lambda xb: xb, gallery, x, k=5, batch=16) == 0


def test_topk_agreement_counts_sets_order_and_near_ties():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    same = B.topk_agreement(ref, ref, 5)
    assert same["same_set"] == same["same_order"] == same["within_ties"] == same["same_top1"] == 1.0
    assert same["score_error_p50"] == same["score_error_p90"] == same["ref_gap_below_p90_error"] == 0.0
    noisy = ref + rng.normal(scale=0.05, size=ref.shape).astype(np.float32)  # scores move by about 1e-2
    n = B.topk_agreement(noisy, ref, 5)
    e, f = ref / np.linalg.norm(ref, axis=1)[:, None], noisy / np.linalg.norm(noisy, axis=1)[:, None]
    err = np.abs(f @ f.T - e @ e.T)[~np.eye(40, dtype=bool)]
    assert n["score_error_p90"] == pytest.approx(np.percentile(err, 90)) and 0 < n["ref_gap_below_p90_error"] <= 1
    ids = B.topk_ids(ref, 3)
    e = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    brute = [[j for j in np.argsort(-(e @ e[i])) if j != i][:3] for i in range(40)]
    assert ids.tolist() == brute  # brute force, self excluded
    other = rng.normal(size=(40, 8)).astype(np.float32)  # unrelated embeddings: almost never the same top-5
    agree = B.topk_agreement(other, ref, 5)
    assert agree["same_set"] < 0.2 and agree["within_ties"] < 0.2
