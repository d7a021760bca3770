"""A Triton Inference Server model repository for an exported model, written and then checked the way Triton
reads it::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx      (platform onnxruntime_onnx)   or   model.plan   (tensorrt_plan)
    <repo>/<name>/manifest.json     (copied: preprocessing, classes, provenance; Triton ignores it)

``config.pbtxt`` declares the model's input and outputs (data types and dims without the batch axis, which
Triton adds because ``max_batch_size > 0``; ``-1`` for the other dynamic axes, e.g. the spatial axes of a dense
SAM export) and a ``dynamic_batching`` block. For ``onnxruntime_onnx`` the tensors come from the ONNX graph of the
file Triton will load; a TensorRT plan cannot be opened without TensorRT, so its tensors come from the export
manifest (the engine was built from it, at the manifest's input size).

:func:`validate_repository` parses every ``config.pbtxt`` into Triton's own ``inference.ModelConfig`` protobuf
message (``tritonclient.grpc.model_config_pb2``; an unknown field fails as it does in Triton) and checks it against
the version folders and the model: names, data types and dims against the ONNX graph (or, for a plan, the manifest
copy), batching and instance groups. :func:`write_triton_repository` assembles the model folder beside its final
place, validates it and only then swaps it in, so a repository that fails the check is never left behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medsim.errors import atomic_path, atomic_write_text
from medsim.export.errors import ExportError, check_choice
from medsim.export.manifest import MANIFEST_NAME

__all__ = ["PLATFORMS", "KINDS", "write_triton_repository", "triton_config_text", "TritonRepositoryError",
           "ModelCheck", "RepositoryReport", "parse_config", "validate_config", "validate_model",
           "validate_repository"]

logger = logging.getLogger(__name__)

PLATFORMS = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
#: the backend each platform runs on (a config may name either; Triton accepts both spellings)
BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
KINDS = ("KIND_GPU", "KIND_CPU")
TRITON_HINT = "pip install 'medsim[triton]' (tritonclient, whose model_config protos describe config.pbtxt)"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: ONNX TensorProto element types → Triton data types
_ONNX_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
               7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
               13: "TYPE_UINT64", 16: "TYPE_BF16"}
#: manifest dtypes (NumPy names) → Triton data types
_MANIFEST_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


class TritonRepositoryError(ExportError):
    """A Triton model repository that Triton would refuse, or that does not match its model (every problem is
    listed, each naming its file)."""


# ---------------------------------------------------------------------------------------------- model I/O
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
    manifest = json.loads(mf.read_text(encoding="utf-8")) if mf.is_file() else None
    return model, manifest


def graph_io(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The graph inputs (initializers excluded) and outputs of an ONNX file, as Triton's onnxruntime backend sees
    them: ``[{"name", "data_type" (TYPE_FP32, ...), "shape" (ints; a name or "?" for a dynamic axis)}]``."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, OSError ...
        raise ExportError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    inits = {i.name for i in m.graph.initializer}

    def describe(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": v.name, "data_type": _ONNX_TYPES.get(t.elem_type, f"ONNX element type {t.elem_type}"),
                "shape": shape}

    return ([describe(v) for v in m.graph.input if v.name not in inits], [describe(v) for v in m.graph.output])


def _manifest_io(manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The export manifest's input and outputs in :func:`graph_io`'s form."""
    def describe(t: dict[str, Any]) -> dict[str, Any]:
        dtype = str(t.get("dtype", "float32"))
        return {"name": t["name"], "data_type": _MANIFEST_TYPES.get(dtype, f"manifest dtype {dtype}"),
                "shape": list(t["shape"])}

    return [describe(manifest["input"])], [describe(o) for o in manifest["outputs"]]


def _is_dynamic(d: Any) -> bool:
    return isinstance(d, str) or int(d) <= 0


def _config_dims(shape: Sequence[Any]) -> list[int]:
    """A model shape as config dims: ``-1`` for each dynamic axis."""
    return [-1 if _is_dynamic(d) else int(d) for d in shape]


def _dims(shape: Sequence[Any], where: str) -> list[int]:
    """Config dims of a batched tensor: the shape without its (dynamic) batch axis."""
    if not shape or not _is_dynamic(shape[0]):
        raise ExportError(f"{where}: the first axis must be the dynamic batch axis (shape {list(shape)}); Triton "
                          "dynamic batching needs it — re-export with medsim export")
    return _config_dims(shape[1:])


def triton_config_text(name: str, platform: str, inputs: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]],
                       *, max_batch_size: int, preferred_batch_sizes: Sequence[int], max_queue_delay_us: int,
                       instance_count: int, kind: str) -> str:
    """The ``config.pbtxt`` text. ``inputs``/``outputs``: ``[{"name", "dims" (no batch axis)[, "data_type"]}]``
    (data type default ``TYPE_FP32``)."""

    def tensor(t: dict[str, Any]) -> str:
        return (f"  {{\n    name: \"{t['name']}\"\n    data_type: {t.get('data_type', 'TYPE_FP32')}\n"
                f"    dims: [ {', '.join(str(d) for d in t['dims'])} ]\n  }}")

    lines = [f"name: \"{name}\"", f"platform: \"{platform}\"", f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(tensor(t) for t in inputs), "]",
             "output [", ",\n".join(tensor(t) for t in outputs), "]",
             "dynamic_batching {",
             f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred_batch_sizes)} ]",
             f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}",
             "instance_group [", "  {", f"    count: {instance_count}", f"    kind: {kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- writing
def write_triton_repository(model_dir_or_onnx: str | os.PathLike, repo_dir: str | os.PathLike, *,
                            name: str = "medsim", platform: str = "onnxruntime_onnx", max_batch_size: int = 32,
                            preferred_batch_sizes: Sequence[int] = (8, 16), max_queue_delay_us: int = 100,
                            instance_count: int = 1, kind: str = "KIND_GPU") -> Path:
    """Write ``repo_dir/name/`` (config.pbtxt, version 1 with the model file, manifest copy); returns that folder.

    The folder is assembled beside its final place, checked with :func:`validate_model` and only then swapped in:
    a folder that fails the check is never written, and an earlier one of the same name stays as it was.

    Args:
        model_dir_or_onnx: an export folder (``model.onnx`` / ``model.plan`` + ``manifest.json``) or a model
            file (e.g. ``model.int8.onnx``; its manifest beside it is copied when present).
        repo_dir: the Triton model repository (created; other models in it are left alone).
        name: model name (letters, digits, ``_.-``).
        platform: ``onnxruntime_onnx`` (tensors from the ONNX graph) or ``tensorrt_plan`` (from the manifest).
        max_batch_size: largest batch Triton forms (for a plan, at most the engine profile's max batch).
        preferred_batch_sizes: batch sizes the dynamic batcher aims for, each ``<= max_batch_size``.
        max_queue_delay_us: how long a request may wait for a batch to fill.
        instance_count: model instances per device.
        kind: ``KIND_GPU`` or ``KIND_CPU`` (a TensorRT plan runs on GPU only).

    Raises:
        ExportError: bad names/values (with "did you mean"), a missing model file, a plan without manifest, or a
            ``max_batch_size`` beyond the engine's profile; :class:`TritonRepositoryError`: the written folder
            fails validation (nothing is left behind).
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
    if platform == "onnxruntime_onnx":  # the graph Triton will load, dynamic axes included
        inp, outs = graph_io(model)
        where = str(model)
    elif manifest is None:
        raise ExportError(f"{model.with_name(MANIFEST_NAME)}: not found; a TensorRT plan's inputs and outputs are "
                          "read from the export manifest")
    else:
        trt_max = (manifest.get("tensorrt") or {}).get("max_batch")
        if trt_max is not None and max_batch_size > int(trt_max):
            raise ExportError(f"{model}: the engine's profile ends at batch {trt_max}; max_batch_size "
                              f"{max_batch_size} is larger — lower it or rebuild with a larger --max-batch")
        inp, outs = _manifest_io(manifest)
        where = str(model.with_name(MANIFEST_NAME))
    if len(inp) != 1:
        raise ExportError(f"{where}: a medsim model has one input, found {[t['name'] for t in inp]}")
    text = triton_config_text(name, platform, [{**t, "dims": _dims(t["shape"], where)} for t in inp],
                              [{**t, "dims": _dims(t["shape"], where)} for t in outs],
                              max_batch_size=max_batch_size, preferred_batch_sizes=prefs,
                              max_queue_delay_us=max_queue_delay_us, instance_count=instance_count, kind=kind)

    repo = Path(repo_dir)
    target = repo / name
    staging = repo / f".{name}.tmp{os.getpid()}"  # same file system: the swap below is a rename
    if staging.exists():
        shutil.rmtree(staging)
    try:
        (staging / "1").mkdir(parents=True)
        with atomic_path(staging / "1" / PLATFORMS[platform]) as tmp:
            shutil.copyfile(model, tmp)
        if manifest is not None:
            atomic_write_text(staging / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        atomic_write_text(staging / "config.pbtxt", text)
        check = validate_model(staging, name=name)
        _swap_in(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("Triton model %s: %s", target, check.summary())
    return target


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by the folder ``staging`` (two renames; the old folder is deleted afterwards)."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is None:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


# ------------------------------------------------------------------------------------------------ checking
@dataclass
class ModelCheck:
    """What :func:`validate_model` checked in one model folder.

    Attributes:
        name, platform, max_batch_size: from the config.
        versions: the version folders (``[1]``).
        inputs, outputs: ``[{"name", "data_type", "dims"}]`` as the config declares them.
        reference: what the tensors were checked against (``1/model.onnx graph``, ``manifest.json``, or None).
        notes: what could not be checked and why (e.g. a TensorRT plan is opaque without TensorRT).
    """

    folder: Path
    name: str
    platform: str
    max_batch_size: int
    versions: list[int]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    reference: str | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        dyn = sorted({t["name"] for t in [*self.inputs, *self.outputs] if -1 in t["dims"]})
        return (f"{self.platform}, versions {self.versions}, max_batch_size {self.max_batch_size}, "
                f"{len(self.inputs)} input / {len(self.outputs)} outputs checked against "
                f"{self.reference or 'nothing'}" + (f"; dynamic axes in {', '.join(dyn)}" if dyn else "")
                + "".join(f"; {n}" for n in self.notes))


@dataclass
class RepositoryReport:
    """:func:`validate_repository`'s result: one :class:`ModelCheck` per model folder."""

    path: Path
    models: list[ModelCheck]

    def lines(self) -> list[str]:
        return [f"{m.name}: {m.summary()}" for m in self.models]


def _model_config_pb2() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ExportError(f"checking a Triton repository needs tritonclient ({e}): {TRITON_HINT}") from e
    return model_config_pb2


def parse_config(text_or_path: str | os.PathLike) -> Any:
    """``config.pbtxt`` (a ``Path``, or the text itself as a ``str``) → Triton's ``inference.ModelConfig``
    message, parsed the way Triton parses it (protobuf text format; an unknown field or a bad enum value is an
    error).

    Raises:
        TritonRepositoryError: the text does not parse (the message names the file, line and field).
    """
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    if isinstance(text_or_path, os.PathLike):
        where, text = str(text_or_path), Path(text_or_path).read_text(encoding="utf-8")
    else:
        where, text = "config.pbtxt", str(text_or_path)
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as e:
        raise TritonRepositoryError(f"{where}: Triton cannot parse it: {e}") from e


def _config_problems(cfg: Any, pb2: Any) -> list[str]:
    """What Triton would refuse in a parsed config on its own (platform, batching, instance groups, tensors)."""
    out: list[str] = []
    platform = cfg.platform or {v: k for k, v in BACKENDS.items()}.get(cfg.backend, "")
    if cfg.platform and cfg.platform not in PLATFORMS:
        out.append(f"platform '{cfg.platform}' is not one medsim writes ({', '.join(PLATFORMS)})")
    if cfg.backend and cfg.backend not in BACKENDS.values():
        out.append(f"backend '{cfg.backend}' is not one medsim writes ({', '.join(BACKENDS.values())})")
    if cfg.platform in BACKENDS and cfg.backend and BACKENDS[cfg.platform] != cfg.backend:
        out.append(f"platform '{cfg.platform}' runs on backend '{BACKENDS[cfg.platform]}', not '{cfg.backend}'")
    if not (cfg.platform or cfg.backend):
        out.append("neither platform nor backend is set")
    mbs = int(cfg.max_batch_size)
    if mbs < 0:
        out.append(f"max_batch_size must be >= 0, got {mbs}")
    scheduling = cfg.WhichOneof("scheduling_choice")
    if mbs > 0 and scheduling != "dynamic_batching":
        out.append(f"max_batch_size {mbs} without a dynamic_batching block (requests would never be batched)")
    if scheduling == "dynamic_batching":
        if mbs == 0:
            out.append("dynamic_batching needs max_batch_size > 0")
        bad = [b for b in cfg.dynamic_batching.preferred_batch_size if not 1 <= b <= max(mbs, 0)]
        if bad:
            out.append(f"dynamic_batching preferred_batch_size {bad} outside 1..max_batch_size ({mbs})")
    elif scheduling is not None:
        out.append(f"{scheduling} is not a scheduler medsim models use (dynamic_batching)")
    kinds = pb2.ModelInstanceGroup.Kind
    if not cfg.instance_group:
        out.append("no instance_group (say where the model runs: KIND_GPU or KIND_CPU)")
    for i, g in enumerate(cfg.instance_group):
        kind = kinds.Name(g.kind)
        if g.count < 1:
            out.append(f"instance_group {i}: count must be >= 1, got {g.count}")
        if kind not in (*KINDS, "KIND_AUTO"):
            out.append(f"instance_group {i}: kind {kind} is not one medsim models use (KIND_GPU or KIND_CPU)")
        if platform == "tensorrt_plan" and kind == "KIND_CPU":
            out.append(f"instance_group {i}: a TensorRT plan runs on GPU only, not {kind}")
    types = pb2.DataType
    for label, tensors in (("input", cfg.input), ("output", cfg.output)):
        if not tensors:
            out.append(f"no {label} declared")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            out.append(f"duplicate {label} names {sorted({n for n in names if names.count(n) > 1})}")
        for t in tensors:
            if t.data_type == types.Value("TYPE_INVALID"):
                out.append(f"{label} '{t.name}': no data_type")
            bad = [d for d in t.dims if d != -1 and d < 1]
            if bad:
                out.append(f"{label} '{t.name}': dims {list(t.dims)} hold {bad} (each dim is >= 1, or -1 for a "
                           "dynamic axis)")
    return out


def _tensor_problems(cfg: Any, reference: tuple[list[dict], list[dict]], pb2: Any) -> list[str]:
    """Where the config's inputs/outputs differ from the model's (``reference``: :func:`graph_io`'s form): names,
    data types, dims (batch axis left out when ``max_batch_size > 0``, ``-1`` for every dynamic axis)."""
    out: list[str] = []
    types, mbs = pb2.DataType, int(cfg.max_batch_size)
    for label, tensors, ref in (("input", cfg.input, reference[0]), ("output", cfg.output, reference[1])):
        have, want = {t.name: t for t in tensors}, {r["name"]: r for r in ref}
        if set(have) != set(want):
            out.append(f"{label}s {sorted(have)} but the model has {sorted(want)}")
        for n in [n for n in want if n in have]:
            t, r = have[n], want[n]
            if types.Name(t.data_type) != r["data_type"]:
                out.append(f"{label} '{n}': data_type {types.Name(t.data_type)}, the model's is {r['data_type']}")
            shape = list(r["shape"])
            if mbs > 0:
                if not shape or not _is_dynamic(shape[0]):
                    out.append(f"{label} '{n}': the model's first axis is fixed ({shape}); max_batch_size > 0 "
                               "needs a dynamic batch axis")
                    continue
                shape = shape[1:]
            want_dims = _config_dims(shape)
            if list(t.dims) != want_dims:
                extra = " (dims leave out the batch axis when max_batch_size > 0)" if mbs > 0 else ""
                out.append(f"{label} '{n}': dims {list(t.dims)}, the model's are {want_dims}{extra}")
    return out


def validate_config(config: str | os.PathLike | Any, *, onnx: str | os.PathLike | None = None,
                    manifest: dict[str, Any] | None = None, name: str | None = None) -> Any:
    """Check one config (a ``config.pbtxt`` ``Path``, its text, or a parsed ``ModelConfig``) on its own or against a
    model: the tensors of the ONNX graph ``onnx``, else the export ``manifest`` (what a TensorRT plan was built
    from). Returns the parsed ``ModelConfig``.

    Raises:
        TritonRepositoryError: every problem, one per line.
    """
    pb2 = _model_config_pb2()
    cfg = config if isinstance(config, pb2.ModelConfig) else parse_config(config)
    problems = _config_problems(cfg, pb2)
    if name is not None and cfg.name != name:
        problems.insert(0, f"name '{cfg.name}' differs from the model folder's name '{name}' (Triton needs them "
                           "equal)")
    if onnx is not None:
        problems += [f"{p} ({onnx})" for p in _tensor_problems(cfg, graph_io(onnx), pb2)]
    elif manifest is not None:
        problems += [f"{p} (manifest)" for p in _tensor_problems(cfg, _manifest_io(manifest), pb2)]
    if problems:
        where = config if isinstance(config, os.PathLike) else "config.pbtxt"
        raise TritonRepositoryError(f"{where}: Triton would refuse it or it does not match the model:\n  - "
                                    + "\n  - ".join(problems))
    return cfg


def validate_model(folder: str | os.PathLike, *, name: str | None = None) -> ModelCheck:
    """Check one model folder of a repository (``config.pbtxt``, version folders, model files) the way Triton loads
    it. ``name``: the name Triton will know it by (default: the folder's name).

    The tensors are checked against every version's ``model.onnx`` graph; for a TensorRT plan, which cannot be
    opened without TensorRT, against the ``manifest.json`` beside the config (when there is one).

    Raises:
        TritonRepositoryError: every problem found, one per line, each naming its file.
    """
    folder = Path(folder)
    name = name or folder.name
    cfg_path = folder / "config.pbtxt"
    if not cfg_path.is_file():
        raise TritonRepositoryError(f"{cfg_path}: not found (a Triton model folder needs its config.pbtxt)")
    pb2 = _model_config_pb2()
    cfg = parse_config(cfg_path)
    platform = cfg.platform or {v: k for k, v in BACKENDS.items()}.get(cfg.backend, "")
    problems = [f"{cfg_path}: {p}" for p in _config_problems(cfg, pb2)]
    if cfg.name != name:
        problems.append(f"{cfg_path}: name '{cfg.name}' differs from the folder's name '{name}' (Triton needs them "
                        "equal)")
    file_name = cfg.default_model_filename or PLATFORMS.get(platform, "")
    versions, others = [], []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            (versions if p.name.isdigit() and int(p.name) > 0 else others).append(p)
    if others:
        problems.append(f"{folder}: folders {[p.name for p in others]} are not versions (positive integers)")
    if not versions:
        problems.append(f"{folder}: no version folder (Triton loads <model>/1/{file_name})")
    reference, notes = None, []
    manifest_path = folder / MANIFEST_NAME
    for v in versions:
        model = v / file_name
        if not model.is_file():
            problems.append(f"{model}: not found (the model file of version {v.name})")
        elif platform == "onnxruntime_onnx":
            reference = f"{v.name}/{file_name} graph"
            problems += [f"{cfg_path}: {p} ({model})" for p in _tensor_problems(cfg, graph_io(model), pb2)]
    if platform == "tensorrt_plan" and versions:
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            reference = MANIFEST_NAME
            problems += [f"{cfg_path}: {p} ({manifest_path})"
                         for p in _tensor_problems(cfg, _manifest_io(manifest), pb2)]
            trt_max = (manifest.get("tensorrt") or {}).get("max_batch")
            if trt_max is not None and cfg.max_batch_size > int(trt_max):
                problems.append(f"{cfg_path}: max_batch_size {cfg.max_batch_size} exceeds the engine's profile "
                                f"maximum {trt_max} ({manifest_path})")
        notes.append("the TensorRT plan itself is not inspected (no TensorRT here)")
    if problems:
        raise TritonRepositoryError(f"{folder}: Triton would not serve this model as medsim exported it:\n  - "
                                    + "\n  - ".join(problems))
    kinds = pb2.DataType

    def tensors(ts: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "data_type": kinds.Name(t.data_type), "dims": list(t.dims)} for t in ts]

    return ModelCheck(folder=folder, name=cfg.name, platform=platform, max_batch_size=int(cfg.max_batch_size),
                      versions=[int(v.name) for v in versions], inputs=tensors(cfg.input),
                      outputs=tensors(cfg.output), reference=reference, notes=notes)


def validate_repository(path: str | os.PathLike) -> RepositoryReport:
    """Check every model folder of a Triton model repository (``OUT/triton`` of ``medsim export --triton``; a
    model folder or the export folder ``OUT`` work too) with :func:`validate_model`.

    Raises:
        TritonRepositoryError: no model in it, or every problem of every model, one per line.
    """
    path = Path(path)
    if (path / "config.pbtxt").is_file():
        return RepositoryReport(path.parent, [validate_model(path)])
    if not (path / "triton").is_dir() or any(path.glob("*/config.pbtxt")):
        repo = path
    else:
        repo = path / "triton"
    if not repo.is_dir():
        raise TritonRepositoryError(f"{repo}: not a folder (give the Triton model repository, OUT/triton of "
                                    "medsim export --triton)")
    folders = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise TritonRepositoryError(f"{repo}: no model folder in it; write one with medsim export RUN --out OUT "
                                    "--triton")
    models, errors = [], []
    for f in folders:
        try:
            models.append(validate_model(f))
        except TritonRepositoryError as e:
            errors.append(str(e))
    if errors:
        raise TritonRepositoryError("\n".join(errors))
    return RepositoryReport(repo, models)
