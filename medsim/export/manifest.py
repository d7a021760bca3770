"""``manifest.json``: everything a consumer of an exported model needs besides the model file.

It describes the preprocessing (so a server without MONAI can reproduce it), the outputs and their shapes, the
class names, where the weights came from (SHA-256 of the checkpoint, not its path) and how closely the export
matched PyTorch. It holds no image paths, ids or other patient identifiers.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medsim.errors import atomic_write_text
from medsim.export.errors import ExportError
from medsim.runtime.manifest import MANIFEST_NAME
from medsim.runtime.manifest import read_manifest as _read_manifest

__all__ = ["MANIFEST_NAME", "MANIFEST_SCHEMA", "describe_preprocessing", "preprocessing_kind", "read_manifest",
           "write_manifest", "update_manifest", "utc_now"]

#: bumped when a field changes meaning
MANIFEST_SCHEMA = 1

AXIS_NOTE = ("MONAI axis order: arrays are (C, x, y) with x the image column (PIL width) and y the row, i.e. "
             "spatially transposed relative to PIL/NumPy (H, W, C): feed np.asarray(pil_image).transpose(2, 1, 0); "
             "spatial_size is (x, y) = (width, height)")


def utc_now() -> str:
    """The current time as ISO 8601 UTC, seconds precision (``2026-01-31T12:00:00Z``)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def preprocessing_kind(record: dict[str, Any]) -> str:
    """``rgb2d`` / ``gray2d`` / ``ct3d`` from the ``_target_`` of a run record's ``eval_preprocessing``."""
    spec = record.get("eval_preprocessing") if isinstance(record, dict) else None
    target = str(spec.get("_target_", "")) if isinstance(spec, dict) else ""
    for kind in ("rgb2d", "gray2d", "ct3d"):
        if kind in target:
            return kind
    return "custom"


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


def describe_preprocessing(transform: Any, kind: str) -> dict[str, Any]:
    """Read the eval pipeline (a ``monai.transforms.Compose``) into a JSON description.

    Returns ``{"kind", "spatial_size", "resize_mode", "scale": {"from", "to", "clip"}, "mean", "std",
    "channel_order", "axis_order", "steps": [transform class names]}``; fields a pipeline lacks are omitted
    (``mean``/``std`` are ``None`` when there is no normalisation).
    """
    steps = list(getattr(transform, "transforms", [transform]))
    desc: dict[str, Any] = {"kind": kind, "steps": [type(t).__name__.lstrip("_") for t in steps]}
    desc["mean"] = desc["std"] = None
    for t in steps:
        name = type(t).__name__
        if name == "ScaleIntensityRanged":
            s = t.scaler
            desc["scale"] = {"from": [float(s.a_min), float(s.a_max)], "to": [float(s.b_min), float(s.b_max)],
                             "clip": bool(s.clip)}
        elif name == "ScaleIntensityd":
            s = t.scaler
            desc["scale"] = {"from": "min..max of each image", "to": [_plain(s.minv), _plain(s.maxv)], "clip": False}
        elif name == "Resized":
            desc["spatial_size"] = [int(v) for v in t.resizer.spatial_size]
            desc["resize_mode"] = str(getattr(t.resizer.mode, "value", t.resizer.mode))
        elif name == "NormalizeIntensityd":
            n = t.normalizer
            desc["mean"], desc["std"] = _plain(n.subtrahend), _plain(n.divisor)
            desc["channel_wise"] = bool(n.channel_wise)
        elif name == "Orientationd":
            desc["axcodes"] = str(t.ornt_transform.axcodes)
        elif name == "Spacingd":
            sp = t.spacing_transform
            desc["pixdim"] = [float(v) for v in sp.pixdim]
            desc["spacing"] = {"mode": str(getattr(t.mode[0], "value", t.mode[0])),
                               "padding_mode": str(getattr(t.padding_mode[0], "value", t.padding_mode[0])),
                               "align_corners": bool(t.align_corners[0]), "diagonal": bool(sp.diagonal),
                               "scale_extent": bool(t.scale_extent[0])}
        elif name == "SpatialPadd":
            desc["pad"] = {"method": str(getattr(t.padder.method, "value", t.padder.method)),
                           "mode": str(getattr(t.padder.mode, "value", t.padder.mode))}
            desc.setdefault("spatial_size", [int(v) for v in t.padder.spatial_size])
        elif name == "CenterSpatialCropd" and "spatial_size" not in desc:
            roi = getattr(getattr(t, "cropper", None), "roi_size", None)
            if roi is not None:
                desc["spatial_size"] = [int(v) for v in roi]
    if kind == "ct3d":
        desc["recipe"] = ("NIfTI / DICOM series → float32 (x, y, z) with its RAS affine → orientation to axcodes → "
                          "trilinear resampling to pixdim (MONAI Spacing: voxel centres, border padding) → "
                          "(HU - from[0]) / (from[1] - from[0]) clipped to [0, 1] → symmetric zero pad and centre "
                          "crop to spatial_size → add channel and batch axes")
    desc["channel_order"] = "RGB" if kind == "rgb2d" else "single channel"
    desc["axis_order"] = AXIS_NOTE
    if kind == "rgb2d":
        desc["recipe"] = ("RGB uint8 (alpha dropped, gray repeated to 3 channels) → float32 → (C, x, y) → "
                          "(v - from[0]) / (from[1] - from[0]) * (to[1] - to[0]) + to[0], clipped → resize to "
                          "spatial_size (area) → (v - mean[c]) / std[c] → add the batch axis")
    return desc


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``out_dir/manifest.json`` atomically (temporary file + ``os.replace``)."""
    return atomic_write_text(Path(out_dir) / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read a manifest from a model directory, a model file beside it, or the manifest file itself (the runtime's
    reader, :func:`medsim.runtime.manifest.read_manifest`, raising :class:`ExportError`)."""
    return _read_manifest(path, error=ExportError)


def update_manifest(out_dir: str | os.PathLike, **sections: Any) -> dict[str, Any]:
    """Set top-level ``sections`` of an existing manifest (read, update, atomic write); returns the manifest."""
    m = read_manifest(out_dir)
    m.update(sections)
    m["updated"] = utc_now()
    write_manifest(out_dir, m)
    return m
