"""TensorRT: build config validation, the builder calls against a mocked ``tensorrt`` module, and the clear
error on hosts without TensorRT or a GPU."""

from __future__ import annotations

import sys
import types
from unittest.mock import MagicMock

import pytest

from medsim.errors import MedsimError
from medsim.export.errors import TensorRTBuildError, TensorRTUnavailable
from medsim.export.tensorrt import TrtBuildConfig, build_engine, require_tensorrt

CFG = dict(min_batch=1, opt_batch=4, max_batch=16, workspace_mb=512, input_shape=(3, 32, 32))


def _fake_trt(*, parse_ok: bool = True, errors: tuple[str, ...] = (), engine: bytes | None = b"ENGINE",
              input_shape=(-1, 3, 32, 32)) -> types.ModuleType:
    """A stand-in ``tensorrt`` module: MagicMock classes with the enums/flags build_engine uses."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99-fake"
    trt.Logger = MagicMock(name="Logger")
    trt.Logger.WARNING = "LOG_WARNING"
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FLAG_FP16", INT8="FLAG_INT8", TF32="FLAG_TF32")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="POOL_WORKSPACE")

    network = MagicMock(name="network")
    network.num_inputs = 1
    inp = MagicMock(name="input")
    inp.name = "image"
    inp.shape = input_shape
    network.get_input.return_value = inp
    builder = MagicMock(name="builder")
    builder.create_network.return_value = network
    builder.build_serialized_network.return_value = engine
    trt.Builder = MagicMock(name="Builder", return_value=builder)

    parser = MagicMock(name="parser")
    parser.parse.return_value = parse_ok
    parser.num_errors = len(errors)
    parser.get_error.side_effect = lambda i: errors[i]
    trt.OnnxParser = MagicMock(name="OnnxParser", return_value=parser)
    trt._builder, trt._network, trt._parser = builder, network, parser
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fake tensorrt and pretend a GPU is present; returns a factory that (re)installs one."""
    import medsim.export.tensorrt as mod

    monkeypatch.setattr(mod, "gpu_available", lambda: (True, "fake GPU"))

    def install(**kw):
        trt = _fake_trt(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return install


@pytest.fixture
def onnx_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x07fake-onnx-bytes")
    return p


def test_fp16_build_calls(fake_trt, onnx_file, tmp_path):
    trt = fake_trt()
    out = build_engine(onnx_file, tmp_path / "eng" / "model.plan", TrtBuildConfig(precision="fp16", **CFG))
    assert out.read_bytes() == b"ENGINE" and sorted(p.name for p in out.parent.iterdir()) == ["model.plan"]
    b = trt._builder
    b.create_network.assert_called_once_with(1 << 0)  # the explicit-batch flag
    trt.OnnxParser.assert_called_once_with(trt._network, trt.Logger.return_value)
    trt._parser.parse.assert_called_once_with(onnx_file.read_bytes())
    config = b.create_builder_config.return_value
    config.set_memory_pool_limit.assert_called_once_with("POOL_WORKSPACE", 512 * 1024 * 1024)
    config.set_flag.assert_called_once_with("FLAG_FP16")
    profile = b.create_optimization_profile.return_value
    profile.set_shape.assert_called_once_with("image", (1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))
    config.add_optimization_profile.assert_called_once_with(profile)
    b.build_serialized_network.assert_called_once_with(trt._network, config)


def test_fp32_clears_tf32_and_sets_no_precision_flag(fake_trt, onnx_file, tmp_path):
    trt = fake_trt()
    build_engine(onnx_file, tmp_path / "m.plan", TrtBuildConfig(precision="fp32", **CFG))
    config = trt._builder.create_builder_config.return_value
    config.set_flag.assert_not_called()
    config.clear_flag.assert_called_once_with("FLAG_TF32")


def test_int8_with_calibrator(fake_trt, onnx_file, tmp_path):
    trt = fake_trt()
    calibrator = object()
    build_engine(onnx_file, tmp_path / "m.plan", TrtBuildConfig(precision="int8", **CFG), calibrator=calibrator)
    config = trt._builder.create_builder_config.return_value
    assert [c.args[0] for c in config.set_flag.call_args_list] == ["FLAG_INT8", "FLAG_FP16"]
    assert config.int8_calibrator is calibrator
    config.set_calibration_profile.assert_called_once_with(trt._builder.create_optimization_profile.return_value)


def test_int8_without_calibration_or_qdq_is_refused(fake_trt, onnx_file, tmp_path):
    fake_trt()
    with pytest.raises(TensorRTBuildError, match="int8 needs calibration data or a Q/DQ"):
        build_engine(onnx_file, tmp_path / "m.plan", TrtBuildConfig(precision="int8", **CFG))
    qdq = tmp_path / "model.int8.onnx"
    qdq.write_bytes(b"...QuantizeLinear...DequantizeLinear...")
    assert build_engine(qdq, tmp_path / "m.plan", TrtBuildConfig(precision="int8", **CFG)).is_file()


def test_parser_errors_are_listed(fake_trt, onnx_file, tmp_path):
    fake_trt(parse_ok=False, errors=("node 3: unsupported op Foo", "node 9: bad shape"))
    with pytest.raises(TensorRTBuildError) as e:
        build_engine(onnx_file, tmp_path / "m.plan", TrtBuildConfig(**CFG))
    msg = str(e.value)
    assert str(onnx_file) in msg and "unsupported op Foo" in msg and "bad shape" in msg
    assert not (tmp_path / "m.plan").exists()


def test_input_mismatch_and_failed_build(fake_trt, onnx_file, tmp_path):
    fake_trt(input_shape=(-1, 3, 64, 64))
    with pytest.raises(TensorRTBuildError, match=r"shape \[-1, 3, 64, 64\].*\(batch, 3, 32, 32\)"):
        build_engine(onnx_file, tmp_path / "m.plan", TrtBuildConfig(**CFG))
    fake_trt(engine=None)
    with pytest.raises(TensorRTBuildError, match="built no engine"):
        build_engine(onnx_file, tmp_path / "m.plan", TrtBuildConfig(**CFG))
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.parametrize("kw, match", [
    ({"precision": "fp61"}, "did you mean 'fp16'"),
    ({"precision": "bf16"}, "unknown TensorRT precision .bf16.; choose fp32, fp16, int8"),
    ({"min_batch": 4, "opt_batch": 2}, "min <= opt <= max"),
    ({"opt_batch": 64, "max_batch": 32}, "min <= opt <= max"),
    ({"min_batch": 0}, "min_batch must be a positive integer"),
    ({"workspace_mb": -1}, "workspace_mb"),
    ({"input_shape": (3, 0, 32)}, "input_shape"),
])
def test_build_config_validation(kw, match):
    with pytest.raises(MedsimError, match=match):
        TrtBuildConfig(**{**CFG, **kw})


def test_build_config_from_manifest():
    cfg = TrtBuildConfig.from_manifest({"input": {"name": "image", "shape": ["batch", 3, 32, 32]}}, precision="FP16")
    assert cfg.precision == "fp16" and cfg.input_shape == (3, 32, 32)
    assert cfg.profile_shapes()[2] == (32, 3, 32, 32)


def test_require_tensorrt_names_everything_missing(monkeypatch):
    import medsim.export.tensorrt as mod

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    monkeypatch.setattr(mod, "gpu_available", lambda: (False, "no nvidia-smi on PATH"))
    with pytest.raises(TensorRTUnavailable) as e:
        require_tensorrt()
    msg = str(e.value)
    assert "`tensorrt` Python package" in msg and "and an NVIDIA GPU with its driver (no nvidia-smi" in msg
    assert "pip install 'medsim[gpu]'" in msg
    assert "\n" not in msg

    monkeypatch.setattr(mod, "gpu_available", lambda: (True, "fake"))
    with pytest.raises(TensorRTUnavailable) as e:
        require_tensorrt()
    assert "`tensorrt` Python package" in str(e.value) and "GPU with its driver (" not in str(e.value)

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # package present, no GPU
    monkeypatch.setattr(mod, "gpu_available", lambda: (False, "no nvidia-smi on PATH"))
    with pytest.raises(TensorRTUnavailable) as e:
        require_tensorrt()
    assert "Python package" not in str(e.value) and "missing an NVIDIA GPU with its driver" in str(e.value)


def test_require_tensorrt_on_this_host():
    from medsim.export.tensorrt import gpu_available

    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    if has_trt and gpu_available()[0]:
        pytest.skip("this host has TensorRT and a GPU")
    with pytest.raises(TensorRTUnavailable, match="TensorRT export is not possible here"):
        require_tensorrt()


def test_gpu_detection(monkeypatch):
    import subprocess

    import torch

    import medsim.export.tensorrt as mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mod.shutil, "which", lambda name: None)
    ok, why = mod.gpu_available()
    assert not ok and "nvidia-smi" in why
    monkeypatch.setattr(mod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="GPU 0: NVIDIA H100 (UUID: GPU-x)\n", stderr=""))
    assert mod.gpu_available() == (True, "GPU 0: NVIDIA H100 (UUID: GPU-x)")
    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 9, stdout="", stderr="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"))
    ok, why = mod.gpu_available()
    assert not ok and "couldn't communicate" in why
