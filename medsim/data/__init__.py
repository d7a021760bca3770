"""medsim.data: sources → checked MONAI datalists → transforms and datasets; group-aware splits.

Heavy modules (MONAI, pydicom) load when first used, so ``import medsim.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_source": "sources", "detect_layout": "sources", "Source": "sources", "LAYOUTS": "sources",
    "validate_source": "validate", "check_file": "validate",
    "split_items": "splits", "save_split": "splits", "load_split": "splits",
    "make_transforms": "transforms", "rgb2d_transforms": "transforms", "gray2d_transforms": "transforms",
    "ct3d_transforms": "transforms",
    "make_dataset": "datasets",
    "make_sample": "sample", "ensure_sample": "sample",
    "scan_dicom": "dicom", "load_dicom": "dicom", "DicomReader": "dicom",
    "patch_grid": "histology", "patch_dataset": "histology",
    "Anonymizer": "phi",
    "inspect_source": "inspect",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medsim.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medsim.data' has no attribute '{name}'")
