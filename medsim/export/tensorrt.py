"""TensorRT engines from the exported ONNX model (GPU hosts only).

``tensorrt`` is imported inside the functions, so this module imports anywhere; :func:`require_tensorrt` says
precisely what is missing on a host that cannot build engines. Engines are specific to the GPU model and the
TensorRT version that built them: build on (a copy of) the serving host.

TensorRT 10 Python API used: ``Builder`` → ``create_network`` (explicit batch: the only mode in TRT 10, the flag
is set where the enum still has it) → ``OnnxParser.parse(bytes)`` → ``create_builder_config`` (workspace pool
limit, FP16/INT8 flags, TF32 cleared for fp32) → one optimisation profile ``set_shape(input, min, opt, max)`` →
``build_serialized_network`` → file (atomic).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.errors import atomic_write_bytes
from medsim.export.errors import ExportError, TensorRTBuildError, TensorRTUnavailable, check_choice

__all__ = ["PRECISIONS", "TrtBuildConfig", "require_tensorrt", "gpu_available", "build_engine",
           "make_int8_calibrator", "run_engine", "INSTALL_HINT"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = ("on a host with an NVIDIA GPU and driver: pip install 'medsim[gpu]' --extra-index-url "
                "https://pypi.nvidia.com (uninstall onnxruntime/faiss-cpu first: the gpu extra replaces them), "
                "then rerun `medsim export ... --trt` (add --no-onnx to reuse OUT/model.onnx)")


@dataclass(frozen=True)
class TrtBuildConfig:
    """What a TensorRT engine is built for.

    Args:
        precision: ``fp32`` (TF32 disabled, comparable with PyTorch), ``fp16``, or ``int8`` (needs a calibrator
            or an ONNX model with Q/DQ nodes, e.g. ``model.int8.onnx`` from static quantization).
        min_batch, opt_batch, max_batch: the optimisation profile's batch range, ``1 <= min <= opt <= max``
            (the engine is tuned for ``opt``).
        workspace_mb: builder workspace memory pool limit, MiB.
        input_shape: one sample's shape without the batch axis, e.g. ``(3, 224, 224)`` (manifest ``input.shape``
            without ``"batch"``).
        input_name: the ONNX input (``image``).

    Raises:
        ExportError: on any invalid value (naming it, with "did you mean" for the precision).
    """

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mb: int = 2048
    input_shape: tuple[int, ...] = field(default=(3, 224, 224))
    input_name: str = "image"

    def __post_init__(self) -> None:
        p = str(self.precision).lower()
        check_choice(p, PRECISIONS, "TensorRT precision")
        object.__setattr__(self, "precision", p)
        for name in ("min_batch", "opt_batch", "max_batch", "workspace_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ExportError(f"TensorRT {name} must be a positive integer, got {v!r}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ExportError(f"TensorRT batch profile needs min <= opt <= max, got min={self.min_batch}, "
                              f"opt={self.opt_batch}, max={self.max_batch}")
        shape = tuple(self.input_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
            raise ExportError(f"TensorRT input_shape must be positive ints without the batch axis, e.g. "
                              f"(3, 224, 224); got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in shape))

    def profile_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(min, opt, max)`` full input shapes for ``IOptimizationProfile.set_shape``."""
        return ((self.min_batch, *self.input_shape), (self.opt_batch, *self.input_shape),
                (self.max_batch, *self.input_shape))

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], **kwargs: Any) -> "TrtBuildConfig":
        """Input name and per-sample shape from an export manifest; everything else from ``kwargs``."""
        inp = manifest.get("input", {})
        shape = [d for d in inp.get("shape", []) if not isinstance(d, str)]
        return cls(input_shape=tuple(shape), input_name=inp.get("name", "image"), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "min_batch": self.min_batch, "opt_batch": self.opt_batch,
                "max_batch": self.max_batch, "workspace_mb": self.workspace_mb,
                "input_shape": list(self.input_shape), "input_name": self.input_name}


def gpu_available() -> tuple[bool, str]:
    """Whether an NVIDIA GPU and driver are usable: ``torch.cuda.is_available()``, else ``nvidia-smi -L``
    listing a GPU (a CPU-only torch on a GPU host). Returns ``(ok, what was found)``."""
    try:
        import torch

        if torch.cuda.is_available():
            return True, f"torch sees {torch.cuda.device_count()} CUDA device(s)"
    except Exception:  # noqa: BLE001 - torch missing or broken CUDA init: try nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "no nvidia-smi on PATH and torch.cuda.is_available() is False"
    try:
        r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"nvidia-smi failed ({e})"
    if r.returncode == 0 and "GPU" in r.stdout:
        return True, r.stdout.strip().splitlines()[0]
    return False, f"nvidia-smi lists no GPU ({(r.stderr or r.stdout).strip()[:200] or f'exit {r.returncode}'})"


def require_tensorrt() -> Any:
    """Return the ``tensorrt`` module, or raise :class:`TensorRTUnavailable` naming everything missing.

    Raises:
        TensorRTUnavailable: the ``tensorrt`` Python package cannot be imported and/or no NVIDIA GPU/driver is
            visible; the message says how to get them.
    """
    missing = []
    trt = None
    try:
        import tensorrt as trt  # type: ignore[import-not-found, no-redef]
    except ImportError as e:
        missing.append(f"the `tensorrt` Python package (import failed: {e})")
    ok, why = gpu_available()
    if not ok:
        missing.append(f"an NVIDIA GPU with its driver ({why})")
    if missing:
        raise TensorRTUnavailable("TensorRT export is not possible here: missing " + " and ".join(missing)
                                  + "; " + INSTALL_HINT)
    return trt


def _has_qdq(onnx_bytes: bytes) -> bool:
    return b"QuantizeLinear" in onnx_bytes


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, cfg: TrtBuildConfig, *,
                 calibrator: Any = None, log_level: str = "WARNING") -> Path:
    """Build and serialize a TensorRT engine for ``onnx_path`` (written atomically to ``engine_path``).

    Args:
        onnx_path: a self-contained ONNX model with dynamic batch axis (``model.onnx``; for int8 without a
            calibrator, a Q/DQ model such as ``model.int8.onnx``).
        engine_path: output ``.plan`` file.
        cfg: precision, batch profile, workspace, input shape and name.
        calibrator: a ``tensorrt.IInt8Calibrator`` (see :func:`make_int8_calibrator`) for int8 with an fp32
            model.

    Raises:
        TensorRTUnavailable: no tensorrt package / GPU (see :func:`require_tensorrt`).
        TensorRTBuildError: the parser rejects the model (every parser error is listed), the input does not
            match ``cfg``, int8 has neither calibrator nor Q/DQ nodes, or the builder returns no engine.
    """
    trt = require_tensorrt()
    src, out = Path(onnx_path), Path(engine_path)
    if not src.is_file():
        raise ExportError(f"{src}: ONNX model not found — export it first (medsim export RUN --out DIR)")
    data = src.read_bytes()
    tlog = trt.Logger(getattr(trt.Logger, log_level, trt.Logger.WARNING))
    builder = trt.Builder(tlog)
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None:  # deprecated (always on) in TensorRT 10, required before
        flags |= 1 << int(explicit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, tlog)
    if not parser.parse(data):
        errors = [str(parser.get_error(i)) for i in range(int(parser.num_errors))]
        raise TensorRTBuildError(f"{src}: TensorRT's ONNX parser rejected the model: "
                                 + ("; ".join(errors) or "no error details")
                                 + " — check the opset (17/18 are supported by TensorRT 10) and re-export")
    n_inputs = int(network.num_inputs)
    names = [network.get_input(i).name for i in range(n_inputs)]
    if cfg.input_name not in names:
        raise TensorRTBuildError(f"{src}: no input named '{cfg.input_name}' (inputs: {names}); set "
                                 "TrtBuildConfig.input_name")
    inp = network.get_input(names.index(cfg.input_name))
    dims = [int(d) for d in tuple(inp.shape)]
    if len(dims) == len(cfg.input_shape) + 1 and any(
            d not in (-1, c) for d, c in zip(dims[1:], cfg.input_shape)):
        raise TensorRTBuildError(f"{src}: input '{cfg.input_name}' has shape {dims} but the build config says "
                                 f"(batch, {', '.join(map(str, cfg.input_shape))}); take input_shape from the "
                                 "model's manifest.json")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_mb) * (1 << 20))
    if cfg.precision == "fp32":
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # exact fp32, comparable with PyTorch/onnxruntime
    elif cfg.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        if calibrator is None and not _has_qdq(data):
            raise TensorRTBuildError(f"{src}: int8 needs calibration data or a Q/DQ-quantized model; pass a "
                                     "calibrator (medsim export --trt --precision int8 makes one from "
                                     "--calib-split) or build from model.int8.onnx (static quantization)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers without int8 kernels fall back to fp16, not fp32
        if calibrator is not None:
            config.int8_calibrator = calibrator
    profile = builder.create_optimization_profile()
    profile.set_shape(cfg.input_name, *cfg.profile_shapes())
    config.add_optimization_profile(profile)
    if cfg.precision == "int8" and calibrator is not None:
        config.set_calibration_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"{src}: TensorRT built no engine ({cfg.precision}, batch "
                                 f"{cfg.min_batch}/{cfg.opt_batch}/{cfg.max_batch}, workspace {cfg.workspace_mb} "
                                 "MiB); see the TensorRT log above — a larger workspace_mb or smaller max_batch "
                                 "often helps")
    atomic_write_bytes(out, bytes(serialized))
    return out


def make_int8_calibrator(images: np.ndarray, *, batch: int, cache_file: str | os.PathLike | None = None) -> Any:
    """An entropy calibrator (``tensorrt.IInt8EntropyCalibrator2``) over preprocessed images (N, C, *S).

    With explicit batch TensorRT calibrates at the calibration profile's ``opt`` shape, so every batch has exactly
    ``batch`` images (= ``TrtBuildConfig.opt_batch``): images are cycled to fill the last one. Device memory is a
    CUDA torch tensor (no pycuda needed). The calibration cache is written to ``cache_file`` when given.
    """
    trt = require_tensorrt()
    import torch

    x = np.ascontiguousarray(images, dtype=np.float32)
    if len(x) == 0:
        raise ExportError("INT8 calibration needs at least one image")
    n_batches = max(1, -(-len(x) // batch))
    x = np.resize(x, (n_batches * batch, *x.shape[1:])).astype(np.float32)  # cycles images to full batches
    cache = Path(cache_file) if cache_file else None

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.i = 0
            self.current: torch.Tensor | None = None

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            if self.i >= len(x):
                return None
            self.current = torch.from_numpy(x[self.i:self.i + batch]).cuda().contiguous()
            self.i += batch
            return [int(self.current.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache is not None and cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            if cache is not None:
                atomic_write_bytes(cache, bytes(data))

    return _Calibrator()


def run_engine(engine_path: str | os.PathLike, images: np.ndarray, *, batch: int) -> dict[str, np.ndarray]:
    """Run preprocessed images (N, C, *S) through a serialized engine on the GPU, in chunks of ``batch``
    (within the engine's profile): ``{output name: (N, ...)}`` float32 — with the runner the deployed
    :class:`~medsim.deploy.EmbeddingEngine` uses (:class:`medsim.runtime.runners.TrtRunner`: TensorRT 10's
    ``execute_async_v3``, cuda-python buffers), so the export's check tests what ships.

    Raises:
        TensorRTUnavailable: no TensorRT / GPU / cuda-python here; TensorRTBuildError: the engine cannot be
            deserialized or run.
    """
    require_tensorrt()
    from medsim.runtime.errors import DeployError
    from medsim.runtime.runners import TrtRunner, import_cudart, run_batched

    try:
        import_cudart()
    except ImportError as e:
        raise TensorRTUnavailable(f"running the TensorRT engine needs cuda-python ({e}); " + INSTALL_HINT) from e
    try:
        with TrtRunner(engine_path) as runner:
            return run_batched(runner, images, batch)
    except DeployError as e:
        raise TensorRTBuildError(str(e)) from e
