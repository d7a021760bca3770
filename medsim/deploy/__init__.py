"""medsim.deploy: run an exported model (``medsim export RUN --out DIR``) on a host without PyTorch or MONAI.

* :func:`preprocess_image` (``medsim.runtime.preprocess.preprocess``; the short name is the submodule's) — an
  image file or array → the model input (C, x, y), exactly as ``eval#preprocessing`` made it
  during training (NumPy + PIL + pydicom, driven by ``manifest.json``).
* :class:`EmbeddingEngine` / :func:`open_engine` — TensorRT / onnxruntime-CUDA / onnxruntime-CPU / OpenVINO
  inference in batches at ``precision`` fp32, bf16 (OpenVINO) or int8, through the runners of
  :mod:`medsim.runtime.runners` (the ones the export's parity checks run).
* :class:`Localizer` — attention map → heatmap, mask and boxes at image resolution; :func:`dice`, :func:`iou`,
  :func:`pointing_game`, :func:`box_hit`.
* :class:`CaseIndex` — the case index (``medsim.deploy.index``).

Nothing here imports ``torch`` or ``monai``: an inference host has neither. Submodules load when a name is first
used, so ``import medsim.deploy`` is cheap. The errors are :mod:`medsim.runtime.errors`' (same classes).
"""

from __future__ import annotations

import importlib
from typing import Any

from medsim.runtime.errors import BackendUnavailable, DeployError, UnsupportedPreprocessing

__all__ = ["DeployError", "BackendUnavailable", "UnsupportedPreprocessing", "preprocess_image", "load_manifest",
           "read_image", "EmbeddingEngine", "open_engine", "BACKENDS", "PRECISIONS", "Localizer", "Localization", "dice", "iou",
           "pointing_game", "box_hit", "CaseIndex"]


_EXPORTS = {
    "preprocess_image": ("preprocess", "preprocess"), "load_manifest": "preprocess", "read_image": "preprocess",
    "EmbeddingEngine": "engine", "open_engine": "engine", "BACKENDS": "engine", "PRECISIONS": "engine",
    "Localizer": "localizer", "Localization": "localizer", "dice": "localizer", "iou": "localizer",
    "pointing_game": "localizer", "box_hit": "localizer",
    "CaseIndex": "index",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        return getattr(importlib.import_module(f"medsim.deploy.{module}"), attr)
    raise AttributeError(f"module 'medsim.deploy' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
