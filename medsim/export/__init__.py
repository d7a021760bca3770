"""Deployment exports of trained runs: ONNX (+ parity vs PyTorch, manifest), INT8 ONNX, TensorRT, Triton.

* :func:`export_onnx` — ``model.onnx`` (one self-contained file, dynamic batch) and ``manifest.json``.
* :func:`quantize_onnx` / :func:`compare_retrieval` — INT8 with onnxruntime and its R@1 cost.
* :mod:`medsim.export.tensorrt` — :class:`TrtBuildConfig`, :func:`build_engine`, :func:`require_tensorrt`.
* :func:`write_triton_repository` — a Triton model repository.
* :func:`export_run` — all of it, as ``medsim export`` runs it.

onnxruntime and tensorrt are imported inside the functions that use them.
"""

from medsim.export.errors import ExportError, ExportParityError, TensorRTBuildError, TensorRTUnavailable
from medsim.export.onnx_export import check_parity, export_onnx
from medsim.export.pipeline import export_run
from medsim.export.quantize import compare_retrieval, quantize_onnx
from medsim.export.tensorrt import TrtBuildConfig, build_engine, require_tensorrt
from medsim.export.triton import write_triton_repository

__all__ = ["ExportError", "ExportParityError", "TensorRTUnavailable", "TensorRTBuildError", "export_onnx",
           "check_parity", "quantize_onnx", "compare_retrieval", "TrtBuildConfig", "build_engine",
           "require_tensorrt", "write_triton_repository", "export_run"]
