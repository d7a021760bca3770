"""``manifest.json``: everything a consumer of an exported model needs besides the model file.

It describes the preprocessing (:func:`medsim.preprocessing.describe` of the run's spec, so a server without MONAI
can reproduce it), the outputs and their shapes, the
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

__all__ = ["MANIFEST_NAME", "MANIFEST_SCHEMA", "read_manifest", "write_manifest", "update_manifest", "utc_now"]

#: bumped when a field changes meaning
MANIFEST_SCHEMA = 1


def utc_now() -> str:
    """The current time as ISO 8601 UTC, seconds precision (``2026-01-31T12:00:00Z``)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


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
