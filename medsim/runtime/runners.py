"""Runners: one exported model on one backend — onnxruntime (CPU or CUDA), OpenVINO (CPU: fp32, bf16, NNCF INT8)
or a TensorRT engine — without PyTorch.

A runner is called with one (B, C, *S) float32 batch and returns ``{output name: (B, ...) float32}``; it has
``output_names``, ``max_batch`` (the TensorRT profile maximum, ``None`` for onnxruntime and OpenVINO) and
``close()``.
:func:`run_batched` feeds it N images in chunks. The export's parity checks (:mod:`medsim.export.onnx_export`,
:mod:`medsim.export.quantize`, :mod:`medsim.export.tensorrt`) and :class:`medsim.deploy.EmbeddingEngine` run models
through these same classes, so the check tests the code that ships.

TensorRT buffers are managed with cuda-python's runtime API (TensorRT 10: ``set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsim.runtime.errors import BackendUnavailable, DeployError
from medsim.threads import configured_threads

__all__ = ["CUDA_EP", "CPU_EP", "ENGINE_NAME", "import_ort", "session_options", "ort_session", "OrtRunner", "import_cudart",
           "cuda_check", "trt_missing", "TrtRunner", "OV_PRECISIONS", "import_openvino", "openvino_missing", "OvRunner",
           "run_batched"]

ENGINE_NAME = "model.plan"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
ORT_HINT = ("pip install 'medsim[cpu]' (onnxruntime) on CPU hosts, or onnxruntime-gpu on GPU hosts (not both: "
            "they overwrite each other)")


# ------------------------------------------------------------------------------------------------ onnxruntime
def import_ort() -> Any:
    """The ``onnxruntime`` module, or :class:`BackendUnavailable` saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailable(f"onnxruntime is not installed ({e}): {ORT_HINT}") from e
    return ort


def session_options(ort: Any, threads: int | None = None) -> Any:
    """``onnxruntime.SessionOptions`` for medsim's sessions: quiet log, ``threads`` (default ``MEDSIM_THREADS``,
    i.e. ``medsim ... --threads``; unset: onnxruntime's choice) intra-op threads."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # a provider that fails to load is judged from get_providers(), not the log
    threads = threads or configured_threads()
    if threads:
        so.intra_op_num_threads = int(threads)
    return so


def ort_session(path: str | os.PathLike, providers: Sequence[Any] = (CPU_EP,), threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` asking for ``providers`` (in order), with medsim's session
    options (``threads`` intra-op threads; default ``MEDSIM_THREADS``, i.e. ``medsim ... --threads``).

    Raises:
        BackendUnavailable: onnxruntime is not installed; DeployError: onnxruntime cannot load the model.
    """
    ort = import_ort()
    so = session_options(ort, threads)
    try:
        return ort.InferenceSession(str(path), so, providers=list(providers))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise DeployError(f"{path}: onnxruntime cannot load the model ({type(e).__name__}: {e})") from e


class OrtRunner:
    """Runs (B, C, *S) float32 batches through an onnxruntime session (``output_names``: a subset to compute;
    default all outputs)."""

    def __init__(self, session: Any, output_names: Sequence[str] | None = None):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = list(output_names or [o.name for o in session.get_outputs()])
        self.max_batch: int | None = None

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: x})
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(self.output_names, outs)}

    def close(self) -> None:
        self.session = None


# --------------------------------------------------------------------------------------------------- OpenVINO
OV_HINT = "pip install 'medsim[openvino]' (openvino and nncf)"
#: OpenVINO CPU inference precisions (``INFERENCE_PRECISION_HINT``); an NNCF INT8 model runs with the fp32 hint
OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def import_openvino() -> Any:
    """The ``openvino`` module, or :class:`BackendUnavailable` saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailable(f"openvino is not installed ({e}): {OV_HINT}") from e
    return openvino


def openvino_missing(precision: str = "fp32") -> list[str]:
    """What stops OpenVINO from running at ``precision`` (``fp32`` / ``bf16``) on this CPU (empty: nothing)."""
    try:
        ov = import_openvino()
    except BackendUnavailable as e:
        return [str(e)]
    if precision != "bf16":
        return []
    caps = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if "BF16" not in caps:
        return [f"a CPU with bf16 support (OpenVINO's CPU OPTIMIZATION_CAPABILITIES are {caps}, no BF16: "
                "AVX512_BF16 or AMX is needed); use --precision fp32 or int8"]
    return []


def _output_name(port: Any) -> str:
    """The graph-output name of an OpenVINO output port: of its tensor names, the ones torch's exporter gives
    internal nodes start with "/", so the first other name (sorted), else any."""
    names = sorted(n for n in port.get_names() if not n.startswith("/"))
    return names[0] if names else port.get_any_name()


class OvRunner:
    """Runs (B, C, *S) float32 batches through an OpenVINO CPU model read from ``path`` (the export's ONNX file, or
    an OpenVINO IR ``.xml`` such as the NNCF INT8 model), compiled with ``INFERENCE_PRECISION_HINT`` from
    ``precision`` (``fp32`` or ``bf16``) and ``INFERENCE_NUM_THREADS`` = ``threads`` (default ``MEDSIM_THREADS``,
    i.e. ``medsim ... --threads``; unset: OpenVINO's choice). The batch axis is dynamic.

    Raises:
        BackendUnavailable: openvino is not installed, or bf16 on a CPU without it; DeployError: an unknown
            precision, or OpenVINO cannot read or compile the model.
    """

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", threads: int | None = None,
                 output_names: Sequence[str] | None = None):
        if precision not in OV_PRECISIONS:
            raise DeployError(f"OpenVINO precision must be one of {', '.join(OV_PRECISIONS)}, got '{precision}'")
        missing = openvino_missing(precision)
        if missing:
            raise BackendUnavailable(f"OpenVINO {precision} unavailable: missing " + "; ".join(missing))
        ov = import_openvino()
        self.path, self.precision, self.max_batch = Path(path), precision, None
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision]}
        threads = threads or configured_threads()
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            model = core.read_model(str(self.path))
            if len(model.inputs) != 1:
                raise DeployError(f"{self.path}: expected one model input, found {len(model.inputs)}")
            shape = model.inputs[0].get_partial_shape()
            if shape.rank.is_static and shape[0].is_static:  # batch axis: dynamic, whatever the file says
                shape[0] = ov.Dimension.dynamic()
                model.reshape({model.inputs[0]: shape})
            self.compiled = core.compile_model(model, "CPU", config)
        except DeployError:
            raise
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own types
            raise DeployError(f"{self.path}: OpenVINO cannot load the model ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        # an output tensor can carry several names (the ONNX graph output and the node that made it, e.g.
        # "/network/Div_4_output_0"): every name finds its port; each port is listed by its graph output name
        ports = {n: o for o in self.compiled.outputs for n in o.get_names()}
        self.output_names = list(output_names or [_output_name(o) for o in self.compiled.outputs])
        unknown = [n for n in self.output_names if n not in ports]
        if unknown:
            raise DeployError(f"{self.path}: no output named {', '.join(unknown)} (the model has "
                              f"{', '.join(_output_name(o) for o in self.compiled.outputs)})")
        self._ports = [ports[n] for n in self.output_names]
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        res = self.request.infer([np.ascontiguousarray(x, dtype=np.float32)])
        # copies: the request reuses its output buffers on the next call
        return {n: np.array(res[p], dtype=np.float32) for n, p in zip(self.output_names, self._ports)}

    def close(self) -> None:
        self.request = self.compiled = None


# --------------------------------------------------------------------------------------------------- TensorRT
def import_cudart() -> Any:
    """cuda-python's runtime API module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as e:
            raise ImportError(f"cuda-python is not installed ({e}); pip install cuda-python") from e
    return cudart


def cuda_check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple; raise :class:`DeployError` unless ``err`` is success."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise DeployError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def trt_missing(plan: Path) -> list[str]:
    """What stops TensorRT from running ``plan`` here (empty when everything is present)."""
    missing = []
    if not plan.is_file():
        missing.append(f"the engine file {plan} (medsim export RUN --out DIR --trt builds it, on this GPU model)")
    try:
        import tensorrt  # noqa: F401  # type: ignore[import-not-found]
    except ImportError as e:
        missing.append(f"the `tensorrt` Python package ({e})")
    try:
        cudart = import_cudart()
    except ImportError as e:
        missing.append(f"cuda-python ({e})")
    else:
        try:
            err, n = cudart.cudaGetDeviceCount()
            if int(err) != 0 or n < 1:
                missing.append(f"a CUDA GPU (cudaGetDeviceCount: {getattr(err, 'name', err)}, {n} device(s))")
        except Exception as e:  # noqa: BLE001 - driver missing: the call itself fails
            missing.append(f"a CUDA GPU and driver ({type(e).__name__}: {e})")
    return missing


class TrtRunner:
    """A deserialized TensorRT engine with device buffers grown to the largest batch seen (TensorRT 10 API:
    ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``)."""

    def __init__(self, plan: str | os.PathLike, device_id: int = 0):
        import tensorrt as trt  # type: ignore[import-not-found]

        self.trt, self.cudart, self.plan = trt, import_cudart(), Path(plan)
        cuda_check(self.cudart.cudaSetDevice(int(device_id)), f"cudaSetDevice({device_id})")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise DeployError(f"{self.plan}: TensorRT cannot deserialize the engine (built by another TensorRT "
                              "version or GPU model?); rebuild it on this host with medsim export --trt --no-onnx")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise DeployError(f"{self.plan}: expected one engine input, found {inputs}")
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n != self.input_name]
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch = int(max_shape[0])
        self.stream = cuda_check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_check(self.cudart.cudaFree(ptr), "cudaFree")
            ptr = int(cuda_check(self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)"))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        trt, cudart = self.trt, self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        x = np.ascontiguousarray(x, dtype=trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        ptr = self._buffer(self.input_name, x.nbytes)
        cuda_check(cudart.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, h2d, self.stream), "copy to GPU")
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise DeployError(f"{self.plan}: input shape {x.shape} is outside the engine's optimisation profile")
        self.context.set_tensor_address(self.input_name, ptr)
        hosts: dict[str, np.ndarray] = {}
        for n in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            hosts[n] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))
            self.context.set_tensor_address(n, self._buffer(n, hosts[n].nbytes))
        if not self.context.execute_async_v3(int(self.stream)):  # cudaStream_t → its handle
            raise DeployError(f"{self.plan}: TensorRT execution failed for a batch of {len(x)}")
        for n, h in hosts.items():
            cuda_check(cudart.cudaMemcpyAsync(h.ctypes.data, self.buffers[n][0], h.nbytes, d2h, self.stream),
                       "copy from GPU")
        cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {n: h.astype(np.float32, copy=False) for n, h in hosts.items()}

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers.clear()
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = self.engine = None

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------- batches
def run_batched(runner: Any, images: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """``images`` (N, C, *S) through ``runner`` in chunks of ``batch`` (capped by ``runner.max_batch``):
    ``{output: (N, ...)}`` float32, in input order. ``N = 0`` gives an empty dict."""
    batch = int(batch)
    if batch < 1:
        raise DeployError(f"batch must be a positive integer, got {batch}")
    if getattr(runner, "max_batch", None):
        batch = min(batch, int(runner.max_batch))
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in runner.output_names}
    for i in range(0, len(images), batch):
        out = runner(np.ascontiguousarray(images[i:i + batch], dtype=np.float32))
        for n in runner.output_names:
            chunks[n].append(out[n])
    return {n: np.concatenate(v) for n, v in chunks.items() if v}
