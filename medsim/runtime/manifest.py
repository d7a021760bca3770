"""Reading ``manifest.json``, the file ``medsim export`` writes beside the model: one reader for export and deploy.

Writing and describing manifests needs the training stack and lives in :mod:`medsim.export.manifest`; reading one
needs only ``json``, so it lives here, below both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from medsim.runtime.errors import DeployError

__all__ = ["MANIFEST_NAME", "manifest_path", "read_manifest", "manifest_embedding_dim"]

MANIFEST_NAME = "manifest.json"


def manifest_path(path: str | os.PathLike) -> Path:
    """The manifest of a model directory, of a model file beside it, or the manifest file itself."""
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else (p if p.name == MANIFEST_NAME else p.with_name(MANIFEST_NAME))


def read_manifest(path: str | os.PathLike, *, error: type[Exception] = DeployError) -> dict[str, Any]:
    """Read a manifest from a model directory, a model file beside it, or the manifest file itself.

    Raises:
        ``error`` (default :class:`DeployError`): the path or the manifest is missing, or it is not JSON.
    """
    p = Path(path)
    if not p.exists():
        raise error(f"{p}: not found — give the folder written by `medsim export RUN --out DIR` (it holds "
                    f"model.onnx and {MANIFEST_NAME})")
    f = manifest_path(p)
    if not f.is_file():
        raise error(f"{f}: not found — export the model first (medsim export RUN --out DIR writes "
                    f"model.onnx and {MANIFEST_NAME})")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{f}: not valid JSON (line {e.lineno}: {e.msg}); re-run medsim export") from e


def manifest_embedding_dim(manifest: Mapping[str, Any]) -> int:
    """The embedding size D a manifest declares: ``embedding_dim`` (the name the bundle configs and models use),
    or ``embedding_size`` in exports made before that name was unified; 0 when neither is there."""
    return int(manifest.get("embedding_dim", manifest.get("embedding_size")) or 0)
