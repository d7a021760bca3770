"""``medsim export``: ONNX + manifest first; --trt on a host without TensorRT/GPU exits 2 with one line, before
anything in the output folder is written or removed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsim.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_export_trt_without_tensorrt_exits_2_writing_nothing(tiny_run, tmp_path, capsys, no_tensorrt):
    out = tmp_path / "out"
    code, stdout, err = run(["export", str(tiny_run), "--out", str(out), "--trt", "--precision", "fp16",
                             "--opt-batch", "2", "--max-batch", "4"], capsys)
    assert code == 2
    assert err.startswith("error: TensorRT export is not possible here") and err.count("\n") == 1
    assert "`tensorrt` Python package" in err and "pip install 'medsim[gpu]'" in err
    assert "nothing in" in err and "was changed (export without --trt" in err
    assert not out.exists()


def test_trt_triton_without_tensorrt_keeps_the_int8_model_and_triton_folder(tiny_run, tmp_path, capsys,
                                                                            no_tensorrt):
    """An INT8 + Triton export, then `--trt --triton` on a host without TensorRT: exit 2 before anything is
    removed — the INT8 model, the Triton folder and the manifest are byte for byte what they were."""
    out = tmp_path / "out"
    code, _, err = run(["export", str(tiny_run), "--out", str(out), "--opt-batch", "2", "--max-batch", "4",
                        "--precision", "int8", "--triton", "--triton-kind", "cpu"], capsys)
    assert code == 0, err
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert {Path("model.int8.onnx"), Path("triton/tiny/1/model.onnx"), Path("manifest.json")} <= set(before)
    code, stdout, err = run(["export", str(tiny_run), "--out", str(out), "--trt", "--triton", "--opt-batch", "2",
                             "--max-batch", "4"], capsys)
    assert code == 2 and "TensorRT export is not possible here" in err and "nothing in" in err
    assert "removed" not in stdout
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before


def test_export_onnx_and_triton(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(["export", str(tiny_run / "best.pt"), "--out", str(out), "--triton", "--opt-batch", "2",
                           "--max-batch", "4"], capsys)
    assert code == 0, stdout
    assert stdout.startswith("onnx ") and "parity vs PyTorch on 7 image(s)" in stdout
    assert (out / "triton" / "tiny" / "1" / "model.onnx").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert m["triton"] == {"repository": "triton", "name": "tiny", "platform": "onnxruntime_onnx",
                           "kind": "KIND_GPU", "max_batch_size": 4, "model": "model.onnx"}


@pytest.mark.parametrize("args, msg", [
    (["--precision", "fp16"], "--precision fp16 needs --trt"),
    (["--trt", "--opt-batch", "8", "--max-batch", "4"], "min <= opt <= max"),
    (["--no-onnx"], "nothing to do"),
    (["--no-onnx", "--triton"], "not found — give the folder written by `medsim export"),
    (["--opset", "11"], "opset 11 is too old"),
    (["--trt", "--triton", "--triton-kind", "cpu"], "cannot serve a TensorRT engine"),
])
def test_bad_options_exit_2_before_work(tiny_run, tmp_path, capsys, args, msg):
    out = tmp_path / "out"
    code, _, err = run(["export", str(tiny_run), "--out", str(out), *args], capsys)
    assert code == 2 and msg in err and err.count("\n") == 1
    assert not (out / "model.onnx").exists()


def test_reexport_removes_what_the_old_model_derived(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "triton" / "old" / "1").mkdir(parents=True)
    (out / "triton" / "old" / "manifest.json").write_text("{}")  # the copy medsim writes beside its model
    (out / "model.plan").write_bytes(b"OLD ENGINE")
    (out / "model.int8.onnx").write_bytes(b"OLD INT8")
    code, stdout, err = run(["export", str(tiny_run), "--out", str(out), "--opt-batch", "2"], capsys)
    assert code == 0, err
    assert "removed   model.int8.onnx, model.plan, triton" in stdout
    assert not (out / "model.plan").exists() and not (out / "model.int8.onnx").exists()
    assert not (out / "triton").exists() and (out / "model.onnx").is_file()
    # another model in the Triton repository is not medsim's to delete
    (out / "triton" / "old" / "1").mkdir(parents=True)
    (out / "triton" / "old" / "manifest.json").write_text("{}")
    (out / "triton" / "someone_else" / "1").mkdir(parents=True)
    code, stdout, err = run(["export", str(tiny_run), "--out", str(out), "--opt-batch", "2"], capsys)
    assert code == 0 and "removed   triton/old" in stdout, err
    assert (out / "triton" / "someone_else" / "1").is_dir() and not (out / "triton" / "old").exists()


def test_calibration_folder_and_cpu_triton_serving_int8(tiny_run, sample_root, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for f in sorted((sample_root / "derm" / "images").glob("*.png"))[:6]:
        (calib / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    code, stdout, err = run(["export", str(tiny_run), "--out", str(out), "--opt-batch", "2", "--max-batch", "4",
                             "--quantize", "static", "--calib", str(calib), "--triton", "--triton-kind", "cpu"],
                            capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["int8"]["calibration"] == {"split": str(calib), "images": 6}
    assert m["triton"]["kind"] == "KIND_CPU" and m["triton"]["model"] == "model.int8.onnx"
    served = out / "triton" / "tiny" / "1" / "model.onnx"
    assert served.read_bytes() == (out / "model.int8.onnx").read_bytes()
    assert "KIND_CPU" in (out / "triton" / "tiny" / "config.pbtxt").read_text()
