"""`medsim export --quantize openvino`: the NNCF INT8 model, OpenVINO's parity/cosine/R@1 record and the CPU timing
`--backend auto` reads, all in the manifest. Skipped where OpenVINO/NNCF are not installed.

The tiny data says nothing about accuracy: the tests check that the numbers are measured and recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'medsim[openvino]'")
pytest.importorskip("nncf", reason="NNCF is not installed: pip install 'medsim[openvino]'")


@pytest.fixture(scope="module")
def ov_export(tiny_run, exported, tmp_path_factory) -> tuple[Path, dict]:
    from medsim.export import export_run

    out = tmp_path_factory.mktemp("ov") / "out"
    shutil.copytree(Path(exported["onnx_path"]).parent, out)
    res = export_run(tiny_run, out, onnx=False, quantize="openvino", calib_split="training", max_calibration=16)
    return out, res


def test_openvino_int8_export_writes_its_manifest_entries(ov_export):
    out, res = ov_export
    m = json.loads((out / "manifest.json").read_text())
    ov = m["openvino"]
    assert ov["fp32"]["passed"] and max(ov["fp32"]["max_abs_diff"].values()) <= 1e-4
    q = ov["int8"]
    assert q["model"] == "model.ov-int8.xml" and (out / "model.ov-int8.xml").is_file()
    assert (out / "model.ov-int8.bin").is_file() and not list(out.glob(".*tmp*"))  # atomic: no leftovers
    assert q["calibration"] == {"split": "training", "images": 16} and q["evaluation_split"] == "validation"
    assert q["images"] == 7 and 0.0 <= q["R@1_int8"] <= 1.0
    assert q["R@1_delta"] == pytest.approx(q["R@1_int8"] - q["R@1_fp32"], abs=1e-6)
    assert 0.5 < q["embedding_mean_cosine"] <= 1.0 + 1e-6 and isinstance(q["passed"], bool)
    if "BF16" in __import__("openvino").Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert ov["bf16"]["embedding_mean_cosine"] >= 0.99 and "R@1_bf16" in ov["bf16"]
    else:
        assert ov["bf16"]["passed"] is False and "BF16" in ov["bf16"]["unavailable"]
    rates = m["cpu_timing"]["images_per_s"]
    assert "ort-cpu/fp32" in rates and "openvino/fp32" in rates and all(v > 0 for v in rates.values())
    assert "int8" not in m and not (out / "model.int8.onnx").exists()  # --quantize openvino: no onnxruntime INT8
    assert "openvino/int8" in rates or not q["passed"]  # timed when it passed its check
    assert any(line.startswith("openvino") for line in res["lines"])
    assert any(line.startswith("cpu time") for line in res["lines"])


def test_openvino_int8_model_runs_in_the_engine(ov_export):
    from medsim.deploy.engine import open_engine

    out, _ = ov_export
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with open_engine(out, "openvino", "int8", threads=1) as e8, open_engine(out, "openvino", "fp32", threads=1) as e:
        a, b = e8.run(x), e.run(x)
        assert e8.backend == "openvino" and a["embedding"].shape == (3, 32) and a["attention"].shape == (3, 1, 2, 2)
        assert np.abs(a["embedding"] - b["embedding"]).max() > 1e-6  # really the quantized model


def test_reexport_removes_the_openvino_int8_model(ov_export, tiny_run, tmp_path):
    from medsim.export import export_run

    out = tmp_path / "again"
    shutil.copytree(ov_export[0], out)
    res = export_run(tiny_run, out, opt_batch=2)
    assert not (out / "model.ov-int8.xml").exists() and not (out / "model.ov-int8.bin").exists()
    assert any("model.ov-int8.xml" in line for line in res["lines"] if line.startswith("removed"))
    m = json.loads((out / "manifest.json").read_text())
    assert "int8" not in m["openvino"] and m["openvino"]["fp32"]["passed"] and m["cpu_timing"]


def test_quantize_openvino_without_openvino_exits_2_before_writing(tiny_run, exported, tmp_path, monkeypatch,
                                                                   capsys):
    import sys

    from medsim.cli import main

    out = tmp_path / "out"
    shutil.copytree(Path(exported["onnx_path"]).parent, out)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_run), "--out", str(out), "--quantize", "openvino"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "openvino is not installed" in err and "medsim[openvino]" in err
    assert sorted(p.name for p in out.iterdir()) == before
