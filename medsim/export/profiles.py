"""Export profiles: named settings files that ``medsim export --profile NAME`` reads.

A profile is data, not code: one JSON object (read with :func:`json.loads`; duplicate keys, ``NaN`` and
``Infinity`` are refused) whose fields are the options of ``medsim export``. Every field is optional; one left out
takes the option's default (:data:`DEFAULTS`), and an option given on the command line beats the profile::

    {
      "schema": 1,                                          # this format (only 1 exists)
      "description": "TensorRT fp16 engine, batch 1/8/32",  # shown by --list-profiles
      "precision": "fp16",                                  # fp32 | fp16 | int8      --precision
      "opset": 17,                                          # ONNX opset, >= 17       --opset
      "batch": {"min": 1, "opt": 8, "max": 32},             # TensorRT profile        --opt-batch, --max-batch
      "trt": true,                                          # build model.plan        --trt / --no-trt
      "quantize": null,                                     # null | static | dynamic | openvino --quantize
      "calibration": {"split": "training", "images": 256},  # INT8 calibration        --calib-split, --calib-images
      "triton": false,                                      # write OUT/triton        --triton / --no-triton
      "triton_kind": "gpu"                                  # gpu | cpu               --triton-kind
    }

``batch.min`` may only be 1 (medsim engines serve partial batches: the runtime's last batch, Triton's dynamic
batcher); ``opt`` is also the ONNX parity batch and Triton's preferred batch, ``max`` Triton's ``max_batch_size``.

``NAME`` is looked up as ``NAME.json`` in the folder named by ``$MEDSIM_EXPORT_PROFILES`` (when set), then in
``export/profiles/`` of the checkout this package lives in; a value ending in ``.json`` or holding a ``/`` is a
path. The manifest of an export made with a profile records it (:meth:`ExportProfile.record`).

Imports nothing heavier than the standard library at module level.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from medsim.export.errors import ExportError, check_choice

__all__ = ["PROFILE_SCHEMA", "ENV_VAR", "SHIPPED_DIR", "DEFAULTS", "OPTIONS", "ProfileError", "ExportProfile",
           "profile_dirs", "available_profiles", "find_profile", "load_profile", "parse_profile", "to_profile_json",
           "load_all_profiles", "format_profile_table"]

#: the profile format this module reads (a profile's optional ``"schema"`` field)
PROFILE_SCHEMA = 1
#: environment variable naming a further folder of ``NAME.json`` profiles, searched before the shipped ones
ENV_VAR = "MEDSIM_EXPORT_PROFILES"
#: ``export/profiles/`` of the checkout holding this package (absent in an installed wheel)
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "export" / "profiles"

#: the settings of an export that names no profile, keyed by :func:`~medsim.export.pipeline.export_run` keyword
#: (``medsim export`` takes its option defaults from here)
DEFAULTS: dict[str, Any] = {"precision": "fp32", "opset": 17, "opt_batch": 8, "max_batch": 32, "trt": False,
                            "quantize": None, "calib_split": "training", "max_calibration": 256, "triton": False,
                            "triton_kind": "gpu"}
#: each setting's ``medsim export`` option
OPTIONS: dict[str, str] = {"precision": "--precision", "opset": "--opset", "opt_batch": "--opt-batch",
                           "max_batch": "--max-batch", "trt": "--trt", "quantize": "--quantize",
                           "calib_split": "--calib-split", "max_calibration": "--calib-images", "triton": "--triton",
                           "triton_kind": "--triton-kind"}

_FIELDS = ("schema", "description", "precision", "opset", "batch", "trt", "quantize", "calibration", "triton",
           "triton_kind")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object", type(None): "null"}


class ProfileError(ExportError):
    """An export profile cannot be found, read or used; the message names the file and the field."""


@dataclass(frozen=True)
class ExportProfile:
    """A validated export profile.

    Attributes:
        name: the file's stem (``trt-fp16``).
        path: the JSON file it was read from.
        description: its ``description`` (``""`` when absent).
        settings: the settings it sets, keyed like :data:`DEFAULTS` (fields it leaves out are absent).
        sha256: SHA-256 of the file's bytes, so a manifest pins the exact profile.
    """

    name: str
    path: Path
    description: str
    settings: dict[str, Any]
    sha256: str

    def resolve(self, given: Mapping[str, Any], explicit: Collection[str]) -> dict[str, Any]:
        """The settings an export runs with: for each key of ``given`` (option values, defaults included), the
        option's value when it is in ``explicit`` (given on the command line) or the profile does not set it,
        else the profile's."""
        return {k: given[k] if k in explicit or k not in self.settings else self.settings[k] for k in given}

    def record(self, settings: Mapping[str, Any], explicit: Collection[str]) -> dict[str, Any]:
        """The manifest's ``export_profile`` section: name, file, SHA-256, the resolved ``settings`` written as a
        profile (saved as a ``.json``, they are a profile of those settings) and the options given on the command
        line (``--calib PATH`` is not a setting: the manifest's ``int8``/``tensorrt`` sections name it)."""
        return {"name": self.name, "file": self.path.name, "sha256": self.sha256, "schema": PROFILE_SCHEMA,
                "description": self.description, "settings": to_profile_json(settings),
                "command_line": [OPTIONS[k] for k in OPTIONS if k in explicit]}


def profile_dirs() -> list[Path]:
    """The folders ``NAME`` is looked up in, first match wins: ``$MEDSIM_EXPORT_PROFILES`` (when set), then
    :data:`SHIPPED_DIR`.

    Raises:
        ProfileError: ``$MEDSIM_EXPORT_PROFILES`` names something that is not a folder.
    """
    dirs = []
    env = os.environ.get(ENV_VAR)
    if env:
        d = Path(env).expanduser()
        if not d.is_dir():
            raise ProfileError(f"{ENV_VAR}={env}: not a folder (it should hold NAME.json export profiles)")
        dirs.append(d)
    dirs.append(SHIPPED_DIR)
    return dirs


def available_profiles() -> dict[str, Path]:
    """``{name: file}`` of every ``*.json`` in :func:`profile_dirs` (an earlier folder hides a later one's name)."""
    found: dict[str, Path] = {}
    for d in profile_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                found.setdefault(p.stem, p)
    return dict(sorted(found.items()))


def find_profile(name_or_path: str | os.PathLike) -> Path:
    """The file of a profile: a path (ends in ``.json`` or holds a ``/``) as it is, a ``NAME`` from
    :func:`profile_dirs`.

    Raises:
        ProfileError: no such file, or no profile of that name (listing those there are, with "did you mean").
    """
    s = os.fspath(name_or_path)
    if s.endswith(".json") or "/" in s or os.sep in s:
        p = Path(s).expanduser()
        if not p.is_file():
            raise ProfileError(f"{p}: export profile not found (give a JSON file, or the NAME of one in "
                               f"{', '.join(map(str, profile_dirs()))})")
        return p
    dirs = profile_dirs()
    if _NAME.match(s):
        for d in dirs:
            if (d / f"{s}.json").is_file():
                return d / f"{s}.json"
    names = list(available_profiles())
    close = difflib.get_close_matches(s, names, n=1, cutoff=0.4)
    raise ProfileError(f"no export profile '{s}' (looked for {s}.json in {', '.join(map(str, dirs))}); "
                       + (f"available: {', '.join(names)}" if names else "none there")
                       + (f" (did you mean '{close[0]}'?)" if close else ""))


def load_profile(name_or_path: str | os.PathLike) -> ExportProfile:
    """Find, read and validate a profile (:func:`find_profile`, :func:`parse_profile`).

    Raises:
        ProfileError: not found, not UTF-8 JSON, a duplicate key, or any field :func:`parse_profile` refuses.
    """
    path = find_profile(name_or_path)
    data = path.read_bytes()
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except ValueError as e:  # from the two hooks
        raise ProfileError(f"{path}: {e}") from e
    description, settings = parse_profile(obj, str(path))
    return ExportProfile(name=path.stem, path=path, description=description, settings=settings,
                         sha256=hashlib.sha256(data).hexdigest())


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ValueError(f"field '{dup}' is given twice")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid value (JSON has no NaN or Infinity)")


def _got(v: Any) -> str:
    return f"{json.dumps(v)} ({_JSON_TYPES.get(type(v), type(v).__name__)})"


def _integer(where: str, field: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProfileError(f"{where}: field '{field}': expected an integer, got {_got(v)}")
    if v < minimum:
        raise ProfileError(f"{where}: field '{field}': must be >= {minimum}, got {v}")
    return v


def _boolean(where: str, field: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ProfileError(f"{where}: field '{field}': expected true or false, got {_got(v)}")
    return v


def _choice(where: str, field: str, v: Any, options: Sequence[str], *, nullable: bool = False) -> str | None:
    if v is None and nullable:
        return None
    if not isinstance(v, str):
        allowed = ", ".join(options) + (" or null" if nullable else "")
        raise ProfileError(f"{where}: field '{field}': expected one of {allowed}, got {_got(v)}")
    try:
        return check_choice(v, options, field)
    except ExportError as e:
        raise ProfileError(f"{where}: field '{field}': {e}") from e


def _known_keys(where: str, obj: dict[str, Any], keys: Sequence[str], prefix: str = "") -> None:
    """Refuse the first key of ``obj`` not in ``keys`` (with "did you mean"); ``prefix``: ``"batch."`` etc."""
    for k in obj:
        try:
            check_choice(k, keys, f"{prefix.rstrip('.') or 'profile'} field")
        except ExportError as e:
            raise ProfileError(f"{where}: field '{prefix}{k}': {e}") from e


def _object(where: str, field: str, v: Any, keys: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ProfileError(f"{where}: field '{field}': expected an object with keys {', '.join(keys)}, got {_got(v)}")
    _known_keys(where, v, keys, f"{field}.")
    missing = [k for k in required if k not in v]
    if missing:
        raise ProfileError(f"{where}: field '{field}': missing {', '.join(missing)}")
    return v


def parse_profile(obj: Any, where: str = "<profile>") -> tuple[str, dict[str, Any]]:
    """Validate a profile's JSON value field by field, then the fields together (with
    :func:`~medsim.export.pipeline.check_options`, over :data:`DEFAULTS` for what it leaves out).

    Args:
        obj: the parsed JSON.
        where: the file, for messages.

    Returns:
        ``(description, settings)``; ``settings`` holds only what the profile sets, keyed like :data:`DEFAULTS`.

    Raises:
        ProfileError: an unknown field (with "did you mean"), a wrong type, a value out of range or not among the
            choices, or fields that do not fit together; the message names ``where`` and the field.
    """
    from medsim.export.tensorrt import PRECISIONS  # numpy only, no torch

    if not isinstance(obj, dict):
        raise ProfileError(f"{where}: a profile is a JSON object {{\"field\": value, ...}}, got {_got(obj)}")
    _known_keys(where, obj, _FIELDS)
    if "schema" in obj and _integer(where, "schema", obj["schema"], 1) != PROFILE_SCHEMA:
        raise ProfileError(f"{where}: field 'schema': this medsim reads profile schema {PROFILE_SCHEMA}, got "
                           f"{obj['schema']}")
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise ProfileError(f"{where}: field 'description': expected a string, got {_got(description)}")

    s: dict[str, Any] = {}
    if "precision" in obj:
        s["precision"] = _choice(where, "precision", obj["precision"], PRECISIONS)
    if "opset" in obj:
        s["opset"] = _integer(where, "opset", obj["opset"], 17)
    if "batch" in obj:
        b = _object(where, "batch", obj["batch"], ("min", "opt", "max"), required=("opt", "max"))
        opt, hi = (_integer(where, f"batch.{k}", b[k], 1) for k in ("opt", "max"))
        lo = _integer(where, "batch.min", b["min"], 1) if "min" in b else 1
        if lo != 1:
            raise ProfileError(f"{where}: field 'batch.min': must be 1 (medsim engines serve partial batches: the "
                               f"runtime's last batch, Triton's dynamic batcher), got {lo}")
        if opt > hi:
            raise ProfileError(f"{where}: field 'batch': needs min <= opt <= max, got opt={opt} > max={hi}")
        s["opt_batch"], s["max_batch"] = opt, hi
    for flag in ("trt", "triton"):
        if flag in obj:
            s[flag] = _boolean(where, flag, obj[flag])
    if "quantize" in obj:
        s["quantize"] = _choice(where, "quantize", obj["quantize"], ("static", "dynamic", "openvino"), nullable=True)
    if obj.get("calibration") is not None:
        c = _object(where, "calibration", obj["calibration"], ("split", "images"))
        if "split" in c:
            s["calib_split"] = _choice(where, "calibration.split", c["split"], ("training", "validation", "test"))
        if "images" in c:
            s["max_calibration"] = _integer(where, "calibration.images", c["images"], 1)
    if "triton_kind" in obj:
        s["triton_kind"] = _choice(where, "triton_kind", obj["triton_kind"], ("gpu", "cpu"))

    from medsim.export.pipeline import check_options

    try:
        check_options(**{**DEFAULTS, **s})
    except ExportError as e:
        raise ProfileError(f"{where}: its fields do not fit together: {e}") from e
    return description, s


def to_profile_json(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (keyed like :data:`DEFAULTS`; missing keys take the defaults) written as a profile."""
    s = {**DEFAULTS, **settings}
    return {"schema": PROFILE_SCHEMA, "precision": s["precision"], "opset": s["opset"],
            "batch": {"min": 1, "opt": s["opt_batch"], "max": s["max_batch"]}, "trt": s["trt"],
            "quantize": s["quantize"], "calibration": {"split": s["calib_split"], "images": s["max_calibration"]},
            "triton": s["triton"], "triton_kind": s["triton_kind"]}


def load_all_profiles() -> tuple[list[ExportProfile], list[ProfileError]]:
    """Every profile of :func:`available_profiles`, loaded: ``(valid ones, errors of the invalid ones)``."""
    good, bad = [], []
    for path in available_profiles().values():
        try:
            good.append(load_profile(path))
        except ProfileError as e:
            bad.append(e)
    return good, bad


def format_profile_table(profiles: Sequence[ExportProfile]) -> str:
    """A text table of ``profiles``: each one's settings (defaults filled in) and description."""
    head = ("profile", "precision", "trt", "quantize", "batch", "opset", "calibration", "triton", "description")
    rows = [head]
    for p in profiles:
        s = {**DEFAULTS, **p.settings}
        calib = (f"{s['calib_split']} x{s['max_calibration']}"
                 if {"calib_split", "max_calibration"} & set(p.settings) else "-")
        rows.append((p.name, s["precision"], "yes" if s["trt"] else "no", s["quantize"] or "-",
                     f"1/{s['opt_batch']}/{s['max_batch']}", str(s["opset"]), calib,
                     s["triton_kind"] if s["triton"] else "-", p.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)
