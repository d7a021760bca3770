"""INT8 ONNX with onnxruntime quantization: static (calibrated) and dynamic, and the R@1 record in the manifest.

The tiny data says nothing about accuracy: the tests check that the numbers are measured and recorded."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsim.errors import MedsimError


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(Path(exported["onnx_path"]).parent, out)
    return out


def _ops(path: Path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_int8_precision_records_r1_delta(tiny_run, export_copy):
    from medsim.export import export_run

    res = export_run(tiny_run, export_copy, onnx=False, precision="int8", calib_split="training")
    m = json.loads((export_copy / "manifest.json").read_text())
    q = m["int8"]
    assert q["model"] == "model.int8.onnx" and q["mode"] == "static" and q["format"] == "QDQ"
    assert q["calibration"] == {"split": "training", "images": 34} and q["evaluation_split"] == "validation"
    assert q["images"] == 7
    for k in ("R@1_fp32", "R@1_int8"):
        assert 0.0 <= q[k] <= 1.0
    assert q["R@1_delta"] == pytest.approx(q["R@1_int8"] - q["R@1_fp32"], abs=1e-6)
    assert 0.0 < q["embedding_max_abs_diff"] and 0.5 < q["embedding_mean_cosine"] <= 1.0 + 1e-6
    assert m["parity"] and m["source"] and "updated" in m  # the ONNX sections survive the update
    assert any(line.startswith("int8") and "R@1 fp32" in line for line in res["lines"])
    ops = _ops(export_copy / "model.int8.onnx")
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0

    from medsim.export.onnx_export import ort_session

    sess = ort_session(export_copy / "model.int8.onnx")  # still dynamic in batch
    emb, att = sess.run(None, {"image": np.zeros((3, 3, 32, 32), np.float32)})
    assert emb.shape == (3, 32) and att.shape == (3, 1, 2, 2)


def test_dynamic_quantization(export_copy, loaded):
    from medsim.export import compare_retrieval, quantize_onnx
    from medsim.export.run import split_images

    out = quantize_onnx(export_copy / "model.onnx", export_copy / "dyn.onnx", mode="dynamic")
    assert _ops(out)["ConvInteger"] > 0
    images, labels, _ = split_images(loaded, "validation")
    cmp = compare_retrieval(export_copy / "model.onnx", out, images, labels)
    assert cmp["images"] == 7 and cmp["R@1_delta"] == pytest.approx(cmp["R@1_int8"] - cmp["R@1_fp32"], abs=1e-6)
    assert sorted(p.name for p in export_copy.iterdir()) == ["dyn.onnx", "manifest.json", "model.onnx"]  # no temp


def test_quantization_errors(export_copy):
    from medsim.export import quantize_onnx

    with pytest.raises(MedsimError, match="did you mean 'static'"):
        quantize_onnx(export_copy / "model.onnx", export_copy / "q.onnx", mode="statc")
    with pytest.raises(MedsimError, match="needs calibration images"):
        quantize_onnx(export_copy / "model.onnx", export_copy / "q.onnx", mode="static")
    with pytest.raises(MedsimError, match="missing.onnx: not found"):
        quantize_onnx(export_copy / "missing.onnx", export_copy / "q.onnx", mode="dynamic")
    assert not (export_copy / "q.onnx").exists()
