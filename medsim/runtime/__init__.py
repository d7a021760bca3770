"""medsim.runtime: run an exported model and prepare its input without PyTorch or MONAI.

* :mod:`medsim.runtime.runners` — onnxruntime (CPU / CUDA), OpenVINO (CPU) and TensorRT runners (:class:`OrtRunner`,
  :class:`OvRunner`, :class:`TrtRunner`, :func:`ort_session`, :func:`run_batched`);
* :mod:`medsim.runtime.preprocess` — an image file or array → the model input, from ``manifest.json``'s
  ``preprocessing`` (NumPy + PIL + pydicom); :mod:`medsim.runtime.volume` — the same for 3D CT volumes;
* :mod:`medsim.runtime.manifest` — reading ``manifest.json``; :mod:`medsim.runtime.geometry` — where each
  attention cell sits on the input.

Both the export's parity checks (:mod:`medsim.export`) and the deployment layer (:mod:`medsim.deploy`) use these,
so a parity check tests the code that ships. Imports point down only: this package imports nothing from
``medsim.nn``, ``medsim.engines``, ``medsim.export`` or ``medsim.deploy``, and never torch or monai (tested in
tests/runtime/test_imports.py). Submodules load when a name is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from medsim.runtime.errors import BackendUnavailable, DeployError, UnsupportedPreprocessing

_EXPORTS = {
    "OrtRunner": "runners", "TrtRunner": "runners", "ort_session": "runners", "run_batched": "runners",
    "CPU_EP": "runners", "CUDA_EP": "runners", "OvRunner": "runners",
    "load_manifest": "preprocess", "read_image": "preprocess",
    "preprocess_with_size": "preprocess",
    "read_volume": "volume", "preprocess_volume": "volume",
    "MANIFEST_NAME": "manifest", "read_manifest": "manifest",
}

__all__ = ["DeployError", "BackendUnavailable", "UnsupportedPreprocessing", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medsim.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medsim.runtime' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
