"""Deployment exports of trained runs: ONNX (+ parity vs PyTorch, manifest), INT8 ONNX, TensorRT, Triton.

* :func:`export_onnx` — ``model.onnx`` (one self-contained file, dynamic batch) and ``manifest.json``.
* :func:`quantize_onnx` / :func:`compare_retrieval` — INT8 with onnxruntime and its R@1 cost.
* :mod:`medsim.export.tensorrt` — :class:`TrtBuildConfig`, :func:`build_engine`, :func:`require_tensorrt`.
* :func:`write_triton_repository` — a Triton model repository.
* :func:`export_run` — all of it, as ``medsim export`` runs it.

onnxruntime and tensorrt are imported inside the functions that use them.
"""

import importlib
from typing import Any

# Lazy: `medsim.export.manifest` and `.errors` are torch-free, so the deploy runtime can read manifests with them
# without loading torch; everything else loads its module on first use.
_EXPORTS = {
    "ExportError": "errors", "ExportParityError": "errors", "TensorRTBuildError": "errors",
    "TensorRTUnavailable": "errors", "check_parity": "onnx_export", "export_onnx": "onnx_export",
    "export_run": "pipeline", "compare_retrieval": "quantize", "quantize_onnx": "quantize",
    "TrtBuildConfig": "tensorrt", "build_engine": "tensorrt", "require_tensorrt": "tensorrt",
    "write_triton_repository": "triton",
}

__all__ = ["ExportError", "ExportParityError", "TensorRTUnavailable", "TensorRTBuildError", "export_onnx",
           "check_parity", "quantize_onnx", "compare_retrieval", "TrtBuildConfig", "build_engine",
           "require_tensorrt", "write_triton_repository", "export_run"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medsim.export.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medsim.export' has no attribute '{name}'")
