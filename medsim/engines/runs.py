"""A run folder read as data: checkpoints loaded weights-only, and the run record that rebuilds its network.

Trust model: a bundle is code the user chose to run (like a Python file); a run folder, checkpoint, export or index
is data, possibly from someone else, and loading it never executes anything from it. So:

- checkpoints are saved as plain state (tensors, numbers, strings, lists, dicts: :func:`plain_state`) and loaded
  with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`, through :func:`medsim.files.load_torch_file`, the
  one ``torch.load`` in medsim); a pickle that would import or call anything else is refused, naming the file and
  what it asked for;
- ``medsim train`` writes ``run.json`` (:func:`write_run_record`): the network's and the eval preprocessing's
  ``_target_`` and *resolved plain* arguments, the input size, the classes. ``export`` / ``evaluate`` rebuild the
  network from it (:func:`build_spec`), importing only medsim's own network classes and transform factories; the
  run's ``config.json`` is kept for people to read and is never parsed as a config (its ``$`` expressions never run).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medsim.errors import MedsimError, atomic_write_text
from medsim.files import load_torch_file

__all__ = ["RUN_RECORD", "plain_state", "load_checkpoint", "check_plain_spec", "build_spec", "write_run_record",
           "load_run_record", "resolved_spec"]

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
RUN_RECORD_FORMAT = 1

#: modules whose classes/functions a run record may name: medsim's own networks (and the self-supervised methods
#: and losses wrapped around them), transform factories and the view-pair factory of the label-free evaluations
_TARGET_MODULES = ("medsim.nn", "medsim.ssl", "medsim.data.transforms", "medsim.data.views3d")
_TARGET_RE = re.compile(r"^medsim\.(nn|ssl|data\.transforms|data\.views3d)(\.[A-Za-z_]\w*)+$")
#: the factories of medsim.data.views3d a run record may name
_VIEW_FACTORIES = ("sam_view_transforms",)
#: strings MONAI's config parser would evaluate ($ expression), import (% macro) or resolve (@ reference)
_EXPRESSION_PREFIXES = ("$", "%", "@")


# ----------------------------------------------------------------------------------------------- checkpoints
def plain_state(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as plain data that ``torch.load(weights_only=True)`` reads: numpy arrays become tensors, numpy
    scalars Python numbers; dicts, lists, tuples, tensors, numbers, strings and None are kept.

    Raises:
        TypeError: any other object (it would need unpickling code to load), named by its key path.
    """
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        items = [(k, plain_state(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):
        out = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    raise TypeError(f"{where}: a {type(obj).__qualname__} is not plain data (tensors, numbers, strings, lists, "
                    "dicts); checkpoints must load with weights_only=True")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` on CPU (:func:`medsim.files.load_torch_file`, the
    one ``torch.load`` in medsim): tensors and plain containers only.

    Raises:
        MedsimError: the file is missing or not a PyTorch checkpoint, or its pickle asks for anything beyond plain
            data (e.g. ``os.system``) — refused before any of it runs, naming the file and what it asked for.
    """
    p = Path(path)
    obj = load_torch_file(p, what="checkpoint")
    if not isinstance(obj, dict):
        raise MedsimError(f"{p}: a medsim checkpoint is a dict with a 'network' state_dict, got a "
                          f"{type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------------------- run record
def load_weights(network: torch.nn.Module, checkpoint: str | os.PathLike, *, fits: str = "the run's network",
                 key: str = "network") -> None:
    """Load ``checkpoint``'s ``key`` state_dict (``network``; ``ssl``: a self-supervised method's encoder, heads
    and target) into ``network``, weights-only (nothing in the file runs).

    Raises:
        MedsimError: the file is not a weights-only checkpoint, has no ``key`` state_dict, or its weights do
            not fit ``network`` (the message names the file and ``fits``, the network it was meant for).
    """
    state = load_checkpoint(checkpoint)
    if not isinstance(state.get(key), dict):
        raise MedsimError(f"{checkpoint}: no '{key}' state_dict in the checkpoint (keys: {sorted(state)[:8]})")
    try:
        network.load_state_dict(state[key])
    except RuntimeError as e:
        raise MedsimError(f"{checkpoint}: weights do not fit {fits} ({str(e).splitlines()[0]})") from e


def check_plain_spec(value: Any, where: str) -> None:
    """Check that ``value`` is plain JSON data naming only medsim networks/transforms: no ``$``/``%``/``@``
    strings, no MONAI special keys other than ``_target_``, every ``_target_`` inside medsim.nn or
    medsim.data.transforms.

    Raises:
        MedsimError: naming the key path and the offending value.
    """
    if isinstance(value, str):
        if value.startswith(_EXPRESSION_PREFIXES):
            raise MedsimError(f"{where}: {value[:60]!r} is an expression/reference; a run record holds plain "
                              "values only (nothing in a run folder is evaluated)")
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise MedsimError(f"{where}: key {k!r} is not a string")
            if k.startswith("_") and k != "_target_":
                raise MedsimError(f"{where}: key '{k}' is not allowed in a run record (only _target_)")
            if k == "_target_" and not (isinstance(v, str) and _TARGET_RE.fullmatch(v)):
                raise MedsimError(f"{where}#_target_: {str(v)[:80]!r} is not a medsim network or transform "
                                  f"(allowed: {', '.join(m + '.*' for m in _TARGET_MODULES)})")
            check_plain_spec(v, f"{where}#{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_plain_spec(v, f"{where}#{i}")
    elif not (value is None or isinstance(value, (bool, int, float))):
        raise MedsimError(f"{where}: a {type(value).__name__} is not a plain JSON value")


def _locate(target: str, where: str) -> Any:
    """The class/function ``target`` names: a medsim module, then ONE attribute of it defined in medsim (no
    attribute walking, so ``medsim.nn.os.system``-style names resolve to nothing)."""
    module_name, _, name = target.rpartition(".")
    if not module_name.startswith(_TARGET_MODULES):
        raise MedsimError(f"{where}: {target!r} is outside {', '.join(_TARGET_MODULES)}")
    if any(part.startswith("_") for part in target.split(".")):
        raise MedsimError(f"{where}: {target!r} is a private name; a run record names public medsim network "
                          "classes and transform factories only")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MedsimError(f"{where}: {target!r} is not a medsim network class or transform factory (no module "
                          f"{module_name} in this medsim)") from e
    obj = getattr(module, name, None)
    # a network is an nn.Module class defined in medsim.nn (or a self-supervised method / loss of medsim.ssl around
    # one); a transform is one of the preprocessing or view-pair factories —
    # nothing else (no helper function that takes a reader name or a path and does something with it)
    from torch import nn

    from medsim.preprocessing import FACTORY_KINDS

    is_network = (isinstance(obj, type) and issubclass(obj, nn.Module)
                  and str(getattr(obj, "__module__", "")).startswith(("medsim.nn", "medsim.ssl")))
    factories = {"medsim.data.transforms": tuple(FACTORY_KINDS), "medsim.data.views3d": _VIEW_FACTORIES}
    is_factory = (name in factories.get(module_name, ()) and getattr(obj, "__module__", "") == module_name)
    if not (is_network or is_factory):
        listed = ", ".join(f"{m}.{{{'|'.join(f)}}}" for m, f in factories.items())
        raise MedsimError(f"{where}: {target!r} is not a medsim network class or transform factory (allowed: "
                          f"nn.Module classes of medsim.nn and medsim.ssl, {listed})")
    return obj


def build_spec(spec: Mapping[str, Any], where: str = "run.json") -> Any:
    """Instantiate a checked spec ``{"_target_": "medsim.nn.Embedder", **kwargs}`` (nested specs first).

    The network is built to receive a checkpoint: arguments that only initialise weights (a class's
    ``init_only_args``, e.g. the Embedder's ``backbone_weights`` file) are left out — the checkpoint replaces what
    they would load, and the file they name may not exist where the run is exported or evaluated.
    """
    check_plain_spec(dict(spec), where)

    def build(v: Any, at: str) -> Any:
        if isinstance(v, dict):
            if "_target_" not in v:
                return {k: build(x, f"{at}#{k}") for k, x in v.items()}
            target = _locate(v["_target_"], at)
            skip = {"_target_", *getattr(target, "init_only_args", ())}
            return target(**{k: build(x, f"{at}#{k}") for k, x in v.items() if k not in skip})
        if isinstance(v, list):
            return [build(x, f"{at}#{i}") for i, x in enumerate(v)]
        return v

    if "_target_" not in spec:
        raise MedsimError(f"{where}: no _target_")
    try:
        return build(dict(spec), where)
    except MedsimError:
        raise
    except Exception as e:  # noqa: BLE001 - bad arguments recorded for the class
        raise MedsimError(f"{where}: cannot build {spec['_target_']} from the recorded arguments "
                          f"({type(e).__name__}: {str(e)[:200]}); the run was probably made by another medsim "
                          "version: use that version, or re-train with this one") from e


def resolved_spec(parser: Any, config_id: str) -> dict[str, Any]:
    """The config component ``config_id`` with every reference and expression resolved to its value, not
    instantiated: ``{"_target_": ..., "arg": value, ...}`` (MONAI ``get_parsed_content(instantiate=False)``).

    Raises:
        MedsimError: a resolved argument is not plain JSON data (it could not be recorded as data).
    """

    def plain(v: Any) -> Any:
        if hasattr(v, "get_config") and callable(v.get_config):
            return plain(v.get_config())
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    spec = plain(parser.get_parsed_content(config_id, instantiate=False))
    if not isinstance(spec, dict):
        raise MedsimError(f"config id '{config_id}' is not a component with a _target_")
    check_plain_spec(spec, config_id)
    return spec


def write_run_record(out_dir: str | os.PathLike, parser: Any, *, bundle: str | os.PathLike,
                     variant: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``out_dir/run.json`` from a bundle's parsed config: what ``export``/``evaluate`` need to rebuild
    the network and the eval preprocessing as plain data (see the module docstring). Returns the record."""
    record = record_from_parser(parser, bundle=bundle, variant=variant, overrides=overrides)
    atomic_write_text(Path(out_dir) / RUN_RECORD, json.dumps(record, indent=1))
    return record


def record_from_parser(parser: Any, *, bundle: str | os.PathLike, variant: str | None,
                       overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The run record of a parsed bundle config (nothing written; resolved on a copy of ``parser``, whose own
    resolved objects — the network the trainer will use — stay as they are)."""
    import copy

    from monai.bundle import ConfigParser

    parser = ConfigParser(copy.deepcopy(parser.get()))

    def value(config_id: str, default: Any = None) -> Any:
        try:
            v = parser.get_parsed_content(config_id)
        except (KeyError, ValueError):
            return default
        return v.tolist() if hasattr(v, "tolist") else v

    plain_overrides = {}
    for k, v in overrides.items():
        try:
            check_plain_spec(v, k)
            plain_overrides[k] = v
        except MedsimError:  # an expression the user allowed on the command line: recorded by its value only
            plain_overrides[k] = value(k, "<expression: see run.json's resolved specs>")
    record = {"format": RUN_RECORD_FORMAT, "bundle": Path(bundle).resolve().name, "variant": variant,
              "overrides": plain_overrides,
              "network": resolved_spec(parser, "network_def"),
              "eval_preprocessing": resolved_spec(parser, "eval#preprocessing"),
              "image_size": value("image_size"), "eval_batch_size": int(value("eval_batch_size", 64)),
              "classes": [str(c) for c in value("classes", [])], "mode": value("mode"),
              "select_metric": value("select_metric", "val_nmi"), "evaluation": _evaluation_spec(parser)}
    try:
        json.dumps(record)
    except TypeError as e:
        raise MedsimError(f"the run record of {bundle} is not plain JSON ({e})") from e
    return record


def _evaluation_spec(parser: Any) -> dict[str, Any] | None:
    """What ``medsim evaluate`` runs on a label-free bundle's run (``None`` for the others: retrieval metrics): the
    config's ``evaluation`` (``kind``, the ``seed`` of the fixed pairs) with the self-supervised method's arguments
    other than its encoder (the record's ``network``), the view pairs' transform and, for ``validation_loss``, the
    loss — as plain specs (:func:`medsim.engines.view_pairs.evaluate_pairs_run`). ``parser`` is a copy: the
    method's ``encoder`` is dropped from it."""
    if "evaluation" not in parser:
        return None
    ev = parser.get_parsed_content("evaluation")
    method = parser.get("ssl")
    if not isinstance(ev, dict) or not isinstance(method, dict):
        raise MedsimError("config id 'evaluation' needs {kind, seed} and an 'ssl' method component")
    parser["ssl"] = {k: v for k, v in method.items() if k != "encoder"}
    spec = {"kind": str(ev["kind"]), "seed": int(ev["seed"]), "method": resolved_spec(parser, "ssl"),
            "views": resolved_spec(parser, "views")}
    if spec["kind"] == "validation_loss":
        spec["loss"] = resolved_spec(parser, "loss")
    return spec


def load_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``run_dir/run.json`` (plain values, allowlisted targets); nothing is evaluated.

    Raises:
        MedsimError: missing (an older run folder: its ``config.json`` is not run as code), unreadable, or holding
            an expression, a special key or a target outside medsim's networks/transforms.
    """
    p = Path(run_dir) / RUN_RECORD
    if not p.is_file():
        hint = (" (this run folder was written by an older medsim or by MONAI's runner: its config.json is not "
                "evaluated, since a run folder is data; re-train it with `medsim train`)"
                if (Path(run_dir) / "config.json").is_file() else "")
        raise MedsimError(f"{p}: not found — a `medsim train` run folder records its network there{hint}")
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MedsimError(f"{p}: cannot be read as JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(rec, dict) or not isinstance(rec.get("network"), dict) or \
            not isinstance(rec.get("eval_preprocessing"), dict):
        raise MedsimError(f"{p}: not a run record (needs 'network' and 'eval_preprocessing' objects)")
    if rec.get("format") != RUN_RECORD_FORMAT:
        raise MedsimError(f"{p}: run record format {rec.get('format')!r}, this medsim reads {RUN_RECORD_FORMAT}; "
                          "use the medsim version that wrote it, or re-train with this one")
    for key in ("network", "eval_preprocessing"):
        check_plain_spec(rec[key], f"{p}#{key}")
    for key in ("image_size", "eval_batch_size", "classes", "evaluation"):
        check_plain_spec(rec.get(key), f"{p}#{key}")
    return rec
