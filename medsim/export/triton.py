"""A Triton Inference Server model repository for an exported model::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx      (platform onnxruntime_onnx)   or   model.plan   (tensorrt_plan)
    <repo>/<name>/manifest.json     (copied: preprocessing, classes, provenance; Triton ignores it)

``config.pbtxt`` declares the ``image`` input and the model's outputs (TYPE_FP32, dims without the batch axis,
which Triton adds because ``max_batch_size > 0``) and a ``dynamic_batching`` block. Shapes come from the export
manifest (or, without one, from the ONNX graph itself).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from medsim.errors import atomic_path, atomic_write_text
from medsim.export.errors import ExportError, check_choice
from medsim.export.manifest import MANIFEST_NAME

__all__ = ["PLATFORMS", "KINDS", "write_triton_repository", "triton_config_text"]

PLATFORMS = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
KINDS = ("KIND_GPU", "KIND_CPU")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _resolve(model_dir_or_onnx: str | os.PathLike, platform: str) -> tuple[Path, dict[str, Any] | None]:
    """(model file, manifest or None) for the platform."""
    p = Path(model_dir_or_onnx)
    want = PLATFORMS[platform]
    if p.is_dir():
        model = p / want
        if not model.is_file():
            hint = ("build it with medsim export RUN --out DIR --trt on a GPU host" if platform == "tensorrt_plan"
                    else "export it with medsim export RUN --out DIR")
            raise ExportError(f"{model}: not found for platform {platform}; {hint}")
        mf = p / MANIFEST_NAME
    elif p.is_file():
        model, mf = p, p.with_name(MANIFEST_NAME)
        if platform == "onnxruntime_onnx" and p.suffix != ".onnx":
            raise ExportError(f"{p}: platform onnxruntime_onnx needs an .onnx file")
    else:
        raise ExportError(f"{p}: not found (give the export folder holding {want} and {MANIFEST_NAME}, or the "
                          "model file)")
    manifest = None
    if mf.is_file():
        import json

        manifest = json.loads(mf.read_text(encoding="utf-8"))
    return model, manifest


def _io_from_onnx(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from medsim.export.onnx_export import onnx_output_shapes

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    shapes = onnx_output_shapes(path)
    inits = {i.name for i in m.graph.initializer}
    ins = [i.name for i in m.graph.input if i.name not in inits]
    return ({"name": ins[0], "shape": shapes[ins[0]]},
            [{"name": o.name, "shape": shapes[o.name]} for o in m.graph.output])


def _dims(shape: Sequence[Any], where: str) -> list[int]:
    if not shape or not isinstance(shape[0], str):
        raise ExportError(f"{where}: the first axis must be the dynamic batch axis (shape {list(shape)}); Triton "
                          "dynamic batching needs it — re-export with medsim export")
    dims = [d if isinstance(d, int) else -1 for d in shape[1:]]
    return dims


def triton_config_text(name: str, platform: str, inputs: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]],
                       *, max_batch_size: int, preferred_batch_sizes: Sequence[int], max_queue_delay_us: int,
                       instance_count: int, kind: str) -> str:
    """The ``config.pbtxt`` text. ``inputs``/``outputs``: ``[{"name", "dims" (no batch axis)}]``, all FP32."""

    def tensor(t: dict[str, Any]) -> str:
        return (f"  {{\n    name: \"{t['name']}\"\n    data_type: TYPE_FP32\n"
                f"    dims: [ {', '.join(str(d) for d in t['dims'])} ]\n  }}")

    lines = [f"name: \"{name}\"", f"platform: \"{platform}\"", f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(tensor(t) for t in inputs), "]",
             "output [", ",\n".join(tensor(t) for t in outputs), "]",
             "dynamic_batching {",
             f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred_batch_sizes)} ]",
             f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}",
             "instance_group [", "  {", f"    count: {instance_count}", f"    kind: {kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


def write_triton_repository(model_dir_or_onnx: str | os.PathLike, repo_dir: str | os.PathLike, *,
                            name: str = "medsim", platform: str = "onnxruntime_onnx", max_batch_size: int = 32,
                            preferred_batch_sizes: Sequence[int] = (8, 16), max_queue_delay_us: int = 100,
                            instance_count: int = 1, kind: str = "KIND_GPU") -> Path:
    """Write ``repo_dir/name/`` (config.pbtxt, version 1 with the model file, manifest copy); returns that folder.

    Args:
        model_dir_or_onnx: an export folder (``model.onnx`` / ``model.plan`` + ``manifest.json``) or a model
            file (its manifest beside it is used when present; otherwise ONNX shapes come from the graph).
        repo_dir: the Triton model repository (created; other models in it are left alone).
        name: model name (letters, digits, ``_.-``).
        platform: ``onnxruntime_onnx`` or ``tensorrt_plan``.
        max_batch_size: largest batch Triton forms (for a plan, at most the engine profile's max batch).
        preferred_batch_sizes: batch sizes the dynamic batcher aims for, each ``<= max_batch_size``.
        max_queue_delay_us: how long a request may wait for a batch to fill.
        instance_count: model instances per device.
        kind: ``KIND_GPU`` or ``KIND_CPU`` (a TensorRT plan runs on GPU only).

    Raises:
        ExportError: bad names/values (with "did you mean"), a missing model file, a plan without manifest, or a
            ``max_batch_size`` beyond the engine's profile.
    """
    platform = check_choice(platform, list(PLATFORMS), "Triton platform")
    kind = check_choice(kind, KINDS, "Triton instance kind")
    if not _NAME.match(name or ""):
        raise ExportError(f"Triton model name '{name}' may only hold letters, digits, '_', '.' and '-'")
    for label, v in (("max_batch_size", max_batch_size), ("instance_count", instance_count)):
        if not isinstance(v, int) or v < 1:
            raise ExportError(f"Triton {label} must be a positive integer, got {v!r}")
    if not isinstance(max_queue_delay_us, int) or max_queue_delay_us < 0:
        raise ExportError(f"Triton max_queue_delay_us must be >= 0, got {max_queue_delay_us!r}")
    prefs = sorted({int(b) for b in preferred_batch_sizes})
    bad = [b for b in prefs if not 1 <= b <= max_batch_size]
    if bad:
        raise ExportError(f"Triton preferred_batch_sizes {bad} are outside 1..max_batch_size ({max_batch_size})")
    if platform == "tensorrt_plan" and kind != "KIND_GPU":
        raise ExportError("a TensorRT plan runs on GPU only: use kind KIND_GPU (or platform onnxruntime_onnx for "
                          "KIND_CPU)")

    model, manifest = _resolve(model_dir_or_onnx, platform)
    if manifest is not None:
        inp = manifest["input"]
        outs = manifest["outputs"]
        if platform == "tensorrt_plan":
            trt_max = (manifest.get("tensorrt") or {}).get("max_batch")
            if trt_max is not None and max_batch_size > int(trt_max):
                raise ExportError(f"{model}: the engine's profile ends at batch {trt_max}; max_batch_size "
                                  f"{max_batch_size} is larger — lower it or rebuild with a larger --max-batch")
    elif platform == "onnxruntime_onnx":
        inp, outs = _io_from_onnx(model)
    else:
        raise ExportError(f"{model.with_name(MANIFEST_NAME)}: not found; a TensorRT plan's inputs and outputs are "
                          "read from the export manifest")
    where = str(model.with_name(MANIFEST_NAME) if manifest is not None else model)
    inputs = [{"name": inp["name"], "dims": _dims(inp["shape"], where)}]
    outputs = [{"name": o["name"], "dims": _dims(o["shape"], where)} for o in outs]

    target = Path(repo_dir) / name
    version = target / "1"
    version.mkdir(parents=True, exist_ok=True)
    dest = version / PLATFORMS[platform]
    with atomic_path(dest) as tmp:
        shutil.copyfile(model, tmp)
    for other in PLATFORMS.values():  # a repository switched between platforms keeps one model file
        stale = version / other
        if other != dest.name and stale.exists():
            stale.unlink()
    if manifest is not None:
        import json

        atomic_write_text(target / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    text = triton_config_text(name, platform, inputs, outputs, max_batch_size=max_batch_size,
                              preferred_batch_sizes=prefs, max_queue_delay_us=max_queue_delay_us,
                              instance_count=instance_count, kind=kind)
    atomic_write_text(target / "config.pbtxt", text)
    return target
